//! The state of one shard replica and `apply`: tables, sessions, buffered steps and
//! catalog, seals and their change sets.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use freshet_proto::catalog::{validate_item, validate_set};
use freshet_proto::command::v1::{command::Op, Command, StepPush};
use freshet_proto::ps::v1::{ChangeSet, DenseValues, Seal, TableKind, TableRows, TableSpec};
use freshet_proto::META_GROUP;

use crate::error::PsError;

use super::epoch::{self, MetaState, StepCheck, StepState};
use super::impressions::{self, Impressions};
use super::optimizer::{check_optimizer_update, validate_spec, Optimizer};
use super::session::Session;
use super::table::Table;
use super::{Outcome, ROWS_PER_TABLE_MAX, SESSIONS_MAX, SESSION_WINDOW, TABLES_MAX};
use freshet_proto::FieldError;

use super::Rejection;

/// State of one shard.
#[derive(Debug, Clone, Default)]
pub struct ShardState {
    pub shard: u32,
    pub applied_index: u64,
    pub applied_term: u64,
    pub(super) tables: BTreeMap<String, Table>,
    pub(super) sessions: HashMap<u64, Session>,
    /// Meta group only: worker registry and seals.
    pub meta: MetaState,
    /// Data shards only: buffered steps and the sealed epoch.
    pub steps: StepState,
    /// Rows changed by direct (client_id, seq) pushes since the last seal: they go into
    /// the next change set. Not part of snapshots (direct pushes are for bulk loads).
    pub(super) dirty: BTreeMap<String, BTreeSet<u64>>,
    /// Change sets produced by seals since the owner last drained them.
    pub(super) emitted: Vec<ChangeSet>,
    /// Data shards only: served impressions and their events' step assignments.
    pub impressions: Impressions,
    /// Data shards only: forgotten users' ids whose step gradients are still dropped.
    pub(super) forget_guards: super::forget::ForgetGuards,
    /// A forget was applied: the group should write a snapshot soon (not replicated).
    pub(super) snapshot_requested: bool,
    /// Members the group's leaders saw acknowledge log entries (MembersAcknowledged),
    /// at most [`ACKED_MEMBERS_MAX`].
    pub acked_members: BTreeSet<u64>,
}

/// Member ids a group remembers as having acknowledged entries (node ids are never
/// reused in a healthy cluster; past this many the start-up check falls back to the
/// leader's own progress).
pub const ACKED_MEMBERS_MAX: usize = 4096;

impl ShardState {
    pub fn new(shard: u32) -> Self {
        ShardState {
            shard,
            ..Default::default()
        }
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.get(name)
    }

    pub fn specs(&self) -> Vec<TableSpec> {
        self.tables.values().map(|t| t.spec.clone()).collect()
    }

    pub fn row_count(&self) -> u64 {
        self.tables.values().map(|t| t.rows() as u64).sum()
    }

    /// Rows, bytes and removals of every sparse table, for status.
    pub fn table_status(&self) -> Vec<freshet_proto::admin::v1::TableRowStatus> {
        self.tables
            .values()
            .filter(|t| t.spec.kind == TableKind::Sparse as i32)
            .map(|t| freshet_proto::admin::v1::TableRowStatus {
                table: t.spec.name.clone(),
                rows: t.rows() as u64,
                bytes: t.row_bytes(),
                expired: t.expired,
                evicted: t.evicted,
                admitted: t.admitted,
                dropped: t.dropped,
                allocated_bytes: t.allocated_bytes(),
                snapshot_copies: t.snapshot_copies(),
            })
            .collect()
    }

    pub fn is_meta(&self) -> bool {
        self.shard == META_GROUP
    }

    /// The last sealed epoch: committed seals (meta group) or applied seals (data shard).
    pub fn sealed_epoch(&self) -> u64 {
        if self.is_meta() {
            self.meta.last_sealed
        } else {
            self.steps.last_sealed
        }
    }

    /// Change sets emitted by seals applied since the last call.
    pub fn take_emitted(&mut self) -> Vec<ChangeSet> {
        std::mem::take(&mut self.emitted)
    }

    /// Checks a step's parts against the current tables.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the field.
    pub fn validate_step(&self, p: &StepPush) -> Result<(), Rejection> {
        if p.inc == 0 {
            return Err(invalid("inc", "must be non-zero (from Register)"));
        }
        if p.step == 0 {
            return Err(invalid("step", "must be >= 1"));
        }
        if p.sparse.is_empty() && p.dense.is_empty() {
            return Err(invalid("sparse", "a step needs sparse or dense parts"));
        }
        if p.part >= epoch::STEP_PARTS_MAX {
            return Err(invalid(
                "part",
                format!("must be < {}", epoch::STEP_PARTS_MAX),
            ));
        }
        for (i, s) in p.sparse.iter().enumerate() {
            self.validate_push(&s.table, &s.ids, &s.grads)
                .map_err(|e| in_field(e, &format!("sparse[{i}]")))?;
        }
        for (i, d) in p.dense.iter().enumerate() {
            self.validate_push_dense(&d.name, &d.grads)
                .map_err(|e| in_field(e, &format!("dense[{i}]")))?;
        }
        Ok(())
    }

    pub fn session(&self, client_id: u64) -> Option<&Session> {
        self.sessions.get(&client_id)
    }

    /// Checks a sparse push against the current tables.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the field.
    pub fn validate_push(&self, table: &str, ids: &[u64], grads: &[f32]) -> Result<(), Rejection> {
        let t = self.dense_or_sparse(table, TableKind::Sparse)?;
        if ids.is_empty() {
            return Err(invalid("ids", "must not be empty"));
        }
        if grads.len() != ids.len() * t.dim {
            return Err(invalid(
                "grads",
                format!(
                    "expected ids.len() * dim = {} * {} = {} values, got {}",
                    ids.len(),
                    t.dim,
                    ids.len() * t.dim,
                    grads.len()
                ),
            ));
        }
        if let Some(i) = grads.iter().position(|g| !g.is_finite()) {
            return Err(invalid(
                format!("grads[{i}]"),
                "must be finite (NaN or Inf given)",
            ));
        }
        if matches!(t.optimizer, Optimizer::Counts { .. }) {
            if let Some(i) = grads.iter().position(|g| *g < 0.0) {
                return Err(invalid(
                    format!("grads[{i}]"),
                    "a counts table takes counts: every value must be >= 0",
                ));
            }
        }
        // Conservative (counts ids that may already exist) and replicated, so every
        // replica decides the same.
        if t.rows() + ids.len() > ROWS_PER_TABLE_MAX {
            return Err(Rejection::Full(format!(
                "table {table:?} holds {} rows on this shard; the limit is {ROWS_PER_TABLE_MAX}",
                t.rows()
            )));
        }
        Ok(())
    }

    /// Checks a dense push.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the field.
    pub fn validate_push_dense(&self, name: &str, grads: &[f32]) -> Result<(), Rejection> {
        let t = self.dense_or_sparse(name, TableKind::Dense)?;
        if grads.len() != t.dim {
            return Err(invalid(
                "grads",
                format!("expected {} values, got {}", t.dim, grads.len()),
            ));
        }
        if let Some(i) = grads.iter().position(|g| !g.is_finite()) {
            return Err(invalid(
                format!("grads[{i}]"),
                "must be finite (NaN or Inf given)",
            ));
        }
        Ok(())
    }

    /// Looks a table up by name and kind.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown name, INVALID_ARGUMENT for the wrong kind.
    pub fn dense_or_sparse(&self, name: &str, kind: TableKind) -> Result<&Table, Rejection> {
        let field = if kind == TableKind::Dense {
            "name"
        } else {
            "table"
        };
        let t = self
            .tables
            .get(name)
            .ok_or_else(|| invalid(field, format!("unknown table {name:?}")))?;
        if t.spec.kind != kind as i32 {
            return Err(invalid(
                field,
                format!("{name:?} is not a {} table", kind.as_str_name()),
            ));
        }
        Ok(t)
    }

    /// Whether (client_id, seq) was already applied, or is outside the session window.
    ///
    /// # Errors
    /// FAILED_PRECONDITION when seq is 0 or too far ahead.
    pub fn check_seq(&self, client_id: u64, seq: u64) -> Result<bool, Rejection> {
        if seq == 0 {
            return Err(invalid("seq", "must be >= 1"));
        }
        let floor = self.sessions.get(&client_id).map_or(0, |s| s.floor);
        if let Some(s) = self.sessions.get(&client_id) {
            if s.contains(seq) {
                return Ok(true);
            }
        }
        if seq > floor + SESSION_WINDOW {
            return Err(Rejection::SeqAhead {
                seq,
                window: SESSION_WINDOW,
                floor,
            });
        }
        Ok(false)
    }

    /// Moves the applied index to `index` (also for entries that carry no command: a new
    /// leader's empty entry, a conf change). The Raft core asserts that committed entries
    /// arrive without a gap or a repeat.
    pub fn advance(&mut self, index: u64, term: u64) {
        self.applied_index = index;
        self.applied_term = term;
    }

    /// Applies one committed command. Never panics on bad data: a command that would
    /// fail validation is rejected identically on every replica.
    pub fn apply(&mut self, cmd: &Command, index: u64, term: u64) -> Outcome {
        self.advance(index, term);
        self.applied_term = term;
        let Some(op) = &cmd.op else {
            return Outcome::Rejected(Rejection::Malformed("empty command".into()));
        };
        match op {
            Op::CreateTable(spec) => return self.create_table(spec),
            Op::UpdateTable(spec) => return self.update_table(spec),
            Op::PushStep(p) => return self.buffer_step(p),
            Op::ShardSeal(s) => return self.apply_seals(&s.seals),
            Op::RegisterWorker(r) => {
                return Outcome::Meta(self.meta.register(&r.name, &r.addr, index))
            }
            Op::Seal(s) => {
                return Outcome::Meta(self.meta.seal(&s.cuts, s.proposed_at_ms, s.force))
            }
            Op::UpsertItems(u) => return self.buffer_items(&u.items, &u.sets),
            Op::Fence(f) => return Outcome::Meta(self.meta.fence(f.inc, 0)),
            Op::SetModel(m) => return Outcome::Meta(self.meta.set_model(m)),
            Op::AppendImpressions(a) => return self.append_impressions(&a.impressions),
            Op::AssignEvents(a) => return self.assign_events(a.inc, a.step, &a.events),
            Op::ForgetUsers(f) => {
                if !self.is_meta() {
                    return Outcome::Rejected(Rejection::Malformed(
                        "forget_users goes to the meta group".into(),
                    ));
                }
                return Outcome::Meta(self.meta.forget(&f.user_hashes, f.proposed_at_ms));
            }
            Op::SetRetention(r) => {
                let Some(retention) = r.retention.as_ref().filter(|_| self.is_meta()) else {
                    return Outcome::Rejected(Rejection::Malformed(
                        "set_retention goes to the meta group, with a retention".into(),
                    ));
                };
                return Outcome::Meta(self.meta.set_retention(retention, r.proposed_at_ms));
            }
            Op::MembersAcknowledged(m) => {
                for id in &m.node_ids {
                    if self.acked_members.len() >= ACKED_MEMBERS_MAX {
                        break;
                    }
                    self.acked_members.insert(*id);
                }
                return Outcome::Applied;
            }
            Op::Push(_) | Op::PushDense(_) => {}
        }
        match self.check_seq(cmd.client_id, cmd.seq) {
            Ok(true) => return Outcome::Duplicate,
            Ok(false) => {}
            Err(e) => return Outcome::Rejected(e),
        }
        match op {
            Op::Push(p) => {
                if let Err(e) = self.validate_push(&p.table, &p.ids, &p.grads) {
                    return Outcome::Rejected(e);
                }
                self.apply_sparse(&p.table, &p.ids, &p.grads, true);
            }
            Op::PushDense(p) => {
                if let Err(e) = self.validate_push_dense(&p.name, &p.grads) {
                    return Outcome::Rejected(e);
                }
                let t = self.tables.get_mut(&p.name).expect("validated above");
                t.apply_grad(0, &p.grads, super::table::UNSTAMPED);
                self.dirty.entry(p.name.clone()).or_default().insert(0);
            }
            _ => unreachable!("handled above"),
        }
        self.record_session(cmd.client_id, cmd.seq, index);
        Outcome::Applied
    }

    /// Sums duplicate ids (in request order) and applies each row's gradient once.
    /// Returns the ids that hold rows afterwards (admission may drop the others).
    fn apply_sparse(&mut self, table: &str, ids: &[u64], grads: &[f32], direct: bool) -> Vec<u64> {
        // Rows updated now carry the sealed clock of the seal being applied; a direct push
        // leaves them for the next seal to stamp. The log's time, never a replica's.
        let now_ms = if direct {
            super::table::UNSTAMPED
        } else {
            self.impressions.last_sealed_ms
        };
        let guards = &self.forget_guards;
        let t = self.tables.get_mut(table).expect("validated by the caller");
        let dim = t.dim;
        let mut ids_sorted: Vec<(u64, usize)> =
            ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        ids_sorted.sort_by_key(|&(id, i)| (id, i));
        let mut sum = vec![0.0f32; dim];
        let mut applied = Vec::with_capacity(ids_sorted.len());
        let mut k = 0;
        while k < ids_sorted.len() {
            let id = ids_sorted[k].0;
            let first = ids_sorted[k].1;
            sum.copy_from_slice(&grads[first * dim..(first + 1) * dim]);
            k += 1;
            while k < ids_sorted.len() && ids_sorted[k].0 == id {
                let i = ids_sorted[k].1;
                for (s, g) in sum.iter_mut().zip(&grads[i * dim..(i + 1) * dim]) {
                    *s += *g;
                }
                k += 1;
            }
            // A forgotten user's row is not written again by a step claimed before the
            // forget (see `forget`).
            if !direct && guards.blocks(id) {
                continue;
            }
            if t.apply_grad(id, &sum, now_ms) {
                applied.push(id);
            }
        }
        if direct {
            let d = self.dirty.entry(table.to_string()).or_default();
            d.extend(applied.iter().copied());
        }
        applied
    }

    /// Buffers catalog upserts until the next seal.
    fn buffer_items(
        &mut self,
        items: &[freshet_proto::ps::v1::Item],
        sets: &[freshet_proto::ps::v1::CandidateSet],
    ) -> Outcome {
        if self.is_meta() {
            return Outcome::Rejected(Rejection::MetaGroup("items"));
        }
        for (i, item) in items.iter().enumerate() {
            if let Err(e) = validate_item(item, &format!("items[{i}]")) {
                return Outcome::Rejected(e.into());
            }
        }
        for (i, set) in sets.iter().enumerate() {
            if let Err(e) = validate_set(set, &format!("sets[{i}]")) {
                return Outcome::Rejected(e.into());
            }
        }
        if self.steps.sets.len() + self.steps.pending_sets.len() + sets.len()
            > epoch::SETS_PER_SHARD_MAX
        {
            return Outcome::Rejected(Rejection::Full(format!(
                "shard {} holds {} candidate sets",
                self.shard,
                self.steps.sets.len()
            )));
        }
        if self.steps.pending_items.len() + items.len() > epoch::PENDING_ITEMS_MAX
            || self.steps.items.len() + self.steps.pending_items.len() + items.len()
                > epoch::ITEMS_PER_SHARD_MAX
        {
            return Outcome::Rejected(Rejection::Full(format!(
                "shard {} holds {} items and {} pending upserts",
                self.shard,
                self.steps.items.len(),
                self.steps.pending_items.len()
            )));
        }
        // Only once every check passed: a rejected upsert leaves nothing behind.
        self.steps.pending_sets.extend_from_slice(sets);
        self.steps.pending_items.extend_from_slice(items);
        Outcome::Applied
    }

    /// Stores served impressions (see [`impressions`]).
    fn append_impressions(
        &mut self,
        records: &[freshet_proto::ps::v1::ImpressionRecord],
    ) -> Outcome {
        if self.is_meta() {
            return Outcome::Rejected(Rejection::MetaGroup("impressions"));
        }
        if records.is_empty() || records.len() > impressions::IMPRESSIONS_PER_APPEND_MAX {
            return Outcome::Rejected(invalid(
                "impressions",
                format!("must hold 1..={}", impressions::IMPRESSIONS_PER_APPEND_MAX),
            ));
        }
        for (i, r) in records.iter().enumerate() {
            if let Err(e) = impressions::validate(r, &format!("impressions[{i}]")) {
                return Outcome::Rejected(e.into());
            }
        }
        // A forgotten user's impression that was still queued at a gateway when the
        // forget sealed is not stored (the guard covers the gateways' write-behind).
        if self.forget_guards.is_empty() {
            return Outcome::Appended(self.impressions.append(records));
        }
        let kept: Vec<_> = records
            .iter()
            .filter(|r| !(r.has_user_id && self.forget_guards.blocks(r.user_id_row)))
            .cloned()
            .collect();
        Outcome::Appended(self.impressions.append(&kept))
    }

    /// Claims feedback events for a step (see [`impressions`]).
    fn assign_events(
        &mut self,
        inc: u64,
        step: u64,
        events: &[freshet_proto::ps::v1::EventRef],
    ) -> Outcome {
        if self.is_meta() {
            return Outcome::Rejected(Rejection::MetaGroup("events"));
        }
        if inc == 0 || step == 0 {
            return Outcome::Rejected(invalid("inc", "inc and step must be non-zero"));
        }
        if events.is_empty() || events.len() > impressions::EVENTS_PER_ASSIGN_MAX {
            return Outcome::Rejected(invalid(
                "events",
                format!("must hold 1..={}", impressions::EVENTS_PER_ASSIGN_MAX),
            ));
        }
        for (i, e) in events.iter().enumerate() {
            if e.event_id.is_empty() || e.event_id.len() > impressions::ID_BYTES_MAX {
                return Outcome::Rejected(invalid(
                    format!("events[{i}].event_id"),
                    format!("must be 1..={} bytes", impressions::ID_BYTES_MAX),
                ));
            }
        }
        Outcome::Assigned(self.impressions.assign(inc, step, events, &self.steps))
    }

    /// Buffers a step until a seal covers it.
    fn buffer_step(&mut self, p: &StepPush) -> Outcome {
        if self.is_meta() {
            return Outcome::Rejected(Rejection::MetaGroup("steps"));
        }
        if let Err(e) = self.validate_step(p) {
            return Outcome::Rejected(e);
        }
        match self.steps.check(p.inc, p.step, p.part) {
            StepCheck::Duplicate => return Outcome::Duplicate,
            StepCheck::Fenced => {
                return Outcome::Rejected(Rejection::Fenced(p.inc));
            }
            StepCheck::New => {}
        }
        if self.steps.pending_steps >= epoch::PENDING_STEPS_MAX
            || self.steps.pending_bytes + epoch::step_bytes(p) > epoch::PENDING_BYTES_MAX
        {
            return Outcome::Rejected(Rejection::Full(format!(
                "shard {} buffers {} unsealed steps ({} bytes)",
                self.shard, self.steps.pending_steps, self.steps.pending_bytes
            )));
        }
        self.steps.buffer(p.clone());
        Outcome::Applied
    }

    /// Applies committed seals in epoch order: the buffered steps within each cut in
    /// (inc, step) order, then the fences; emits one change set per seal.
    fn apply_seals(&mut self, seals: &[Seal]) -> Outcome {
        if self.is_meta() {
            return Outcome::Rejected(Rejection::MetaGroup("seals"));
        }
        let mut applied = 0;
        for seal in seals {
            if seal.epoch <= self.steps.last_sealed {
                continue; // idempotent: already sealed
            }
            if seal.first_epoch != self.steps.last_sealed + 1 || seal.epoch < seal.first_epoch {
                return Outcome::Rejected(Rejection::SealGap {
                    first: seal.first_epoch,
                    last: seal.epoch,
                    sealed: self.steps.last_sealed,
                });
            }
            let mut changed = std::mem::take(&mut self.dirty);
            // The sealed clock moves first, so the rows this seal trains carry its time.
            let prev_ms = self.impressions.last_sealed_ms;
            // A retention change takes effect in its own epoch, before its expiry. The meta
            // group checked it; a value that would not pass here is ignored alike on
            // every replica.
            if let Some(r) = seal
                .retention
                .as_ref()
                .and_then(|r| super::impressions::Retention::from_proto(r).ok())
            {
                self.impressions.set_retention(r);
            }
            self.impressions.on_seal(seal.proposed_at_ms);
            let now_ms = self.impressions.last_sealed_ms;
            self.forget_guards.expire(now_ms);
            for t in self.tables.values_mut() {
                t.roll_admission_window(prev_ms, now_ms);
            }
            let mut cuts: Vec<(u64, u64)> = seal.cuts.iter().map(|c| (c.inc, c.step)).collect();
            cuts.sort_unstable();
            for (inc, cut) in cuts {
                for step in self.steps.take_within(inc, cut) {
                    for sp in &step.sparse {
                        // Validated when buffered; tables are never dropped.
                        if self.tables.contains_key(&sp.table) {
                            let rows = self.apply_sparse(&sp.table, &sp.ids, &sp.grads, false);
                            changed.entry(sp.table.clone()).or_default().extend(rows);
                        }
                    }
                    for d in &step.dense {
                        if let Some(t) = self.tables.get_mut(&d.name) {
                            t.apply_grad(0, &d.grads, now_ms);
                            changed.entry(d.name.clone()).or_default().insert(0);
                        }
                    }
                }
            }
            for inc in &seal.fenced {
                let forgotten = self.steps.fence(*inc);
                self.impressions.settle_forgotten(&forgotten);
            }
            // Forgotten users and row limits: removals are part of this epoch, like its
            // updates.
            let mut removed = Vec::new();
            if !seal.forget.is_empty() {
                removed = self.forget_users(&seal.forget, now_ms, &mut changed);
            }
            for (name, t) in &mut self.tables {
                if t.sketch.is_some() {
                    // Per shard (a node hosts several): the replica's own running totals.
                    let labels = [("table", name.clone()), ("shard", self.shard.to_string())];
                    metrics::counter!(crate::metrics::ROWS_ADMITTED, &labels).absolute(t.admitted);
                    metrics::counter!(crate::metrics::GRADIENTS_DROPPED, &labels)
                        .absolute(t.dropped);
                }
                let (gone, expired) = t.enforce_limits(prev_ms, now_ms);
                if gone.is_empty() {
                    continue;
                }
                metrics::counter!(crate::metrics::ROWS_EXPIRED, "table" => name.clone())
                    .increment(expired as u64);
                metrics::counter!(crate::metrics::ROWS_EVICTED, "table" => name.clone())
                    .increment((gone.len() - expired) as u64);
                if let Some(c) = changed.get_mut(name) {
                    for id in &gone {
                        c.remove(id);
                    }
                }
                removed.push(freshet_proto::ps::v1::RemovedRows {
                    table: name.clone(),
                    ids: gone,
                });
            }
            // Seal order: epochs apply one after another, each exactly once.
            assert!(
                seal.epoch > self.steps.last_sealed,
                "shard {}: seal {} applied after epoch {}",
                self.shard,
                seal.epoch,
                self.steps.last_sealed
            );
            self.steps.last_sealed = seal.epoch;
            let mut cs = self.change_set(seal, &changed);
            cs.removed = removed;
            cs.forgotten_users = seal.forget.clone();
            // Catalog upserts land with the first seal after them (the last write wins).
            let items = std::mem::take(&mut self.steps.pending_items);
            let mut latest: BTreeMap<u64, freshet_proto::ps::v1::Item> = BTreeMap::new();
            for item in items {
                latest.insert(item.id, item);
            }
            for item in latest.into_values() {
                self.steps.items.insert(item.id, item.clone());
                cs.items.push(item);
            }
            let sets = std::mem::take(&mut self.steps.pending_sets);
            let mut latest: BTreeMap<String, freshet_proto::ps::v1::CandidateSet> = BTreeMap::new();
            for set in sets {
                latest.insert(set.name.clone(), set);
            }
            for set in latest.into_values() {
                if set.items.is_empty() {
                    self.steps.sets.remove(&set.name);
                } else {
                    self.steps.sets.insert(set.name.clone(), set.items.clone());
                }
                cs.sets.push(set);
            }
            self.emitted.push(cs);
            applied += 1;
        }
        if applied == 0 {
            Outcome::Duplicate
        } else {
            Outcome::Applied
        }
    }

    fn change_set(&self, seal: &Seal, changed: &BTreeMap<String, BTreeSet<u64>>) -> ChangeSet {
        let mut cs = ChangeSet {
            shard: self.shard,
            first_epoch: seal.first_epoch,
            epoch: seal.epoch,
            proposed_at_ms: seal.proposed_at_ms,
            cuts: seal.cuts.clone(),
            fenced: seal.fenced.clone(),
            state_bytes: self.tables.values().map(Table::row_bytes).sum(),
            ..Default::default()
        };
        for (name, ids) in changed {
            let Some(t) = self.tables.get(name) else {
                continue;
            };
            if t.spec.kind == TableKind::Dense as i32 {
                let mut values = vec![0.0; t.dim];
                t.read_into(0, &mut values);
                cs.dense.push(DenseValues {
                    name: name.clone(),
                    values,
                });
            } else {
                let mut rows = TableRows {
                    table: name.clone(),
                    dim: t.dim as u32,
                    ids: ids.iter().copied().collect(),
                    values: vec![0.0; ids.len() * t.dim],
                };
                for (i, id) in ids.iter().enumerate() {
                    t.read_into(*id, &mut rows.values[i * t.dim..(i + 1) * t.dim]);
                }
                cs.rows.push(rows);
            }
        }
        cs
    }

    /// The sealed values of every row and dense tensor (no optimizer slots), for a
    /// subscriber's bootstrap: tables in name order, ids sorted.
    pub fn sealed_rows(&self) -> (Vec<TableSpec>, Vec<TableRows>, Vec<DenseValues>) {
        // Catalog items come from `self.steps.items` (see the Subscribe handler).
        let mut rows = Vec::new();
        let mut dense = Vec::new();
        for (name, t) in &self.tables {
            if t.spec.kind == TableKind::Dense as i32 {
                let mut values = vec![0.0; t.dim];
                t.read_into(0, &mut values);
                dense.push(DenseValues {
                    name: name.clone(),
                    values,
                });
                continue;
            }
            let slots = t.sorted_slots();
            let mut tr = TableRows {
                table: name.clone(),
                dim: t.dim as u32,
                ids: Vec::with_capacity(slots.len()),
                values: Vec::with_capacity(slots.len() * t.dim),
            };
            for (id, slot) in slots {
                tr.ids.push(id);
                tr.values.extend_from_slice(&t.row(slot)[..t.dim]);
            }
            rows.push(tr);
        }
        (self.specs(), rows, dense)
    }

    fn record_session(&mut self, client_id: u64, seq: u64, index: u64) {
        self.sessions
            .entry(client_id)
            .or_default()
            .record(seq, index);
        if self.sessions.len() > SESSIONS_MAX {
            // Deterministic eviction: least recently applied, ties by client id.
            let victim = self
                .sessions
                .iter()
                .min_by_key(|(c, s)| (s.last_index, **c))
                .map(|(c, _)| *c)
                .expect("non-empty");
            self.sessions.remove(&victim);
        }
    }

    fn create_table(&mut self, spec: &TableSpec) -> Outcome {
        let optimizer = match validate_spec(spec) {
            Ok(o) => o,
            Err(e) => return Outcome::Rejected(e.into()),
        };
        if let Some(existing) = self.tables.get(&spec.name) {
            return if existing.spec == *spec {
                Outcome::TableCreated(false)
            } else {
                Outcome::Rejected(Rejection::TableExists(spec.name.clone()))
            };
        }
        if self.tables.len() >= TABLES_MAX {
            return Outcome::Rejected(Rejection::TooManyTables);
        }
        self.tables
            .insert(spec.name.clone(), Table::new(spec.clone(), optimizer));
        Outcome::TableCreated(true)
    }

    /// New optimizer hyper-parameters for an existing table (checked again here: every
    /// replica decides the same). Rows and slots are kept; later pushes use the new values.
    fn update_table(&mut self, spec: &TableSpec) -> Outcome {
        let Some(t) = self.tables.get_mut(&spec.name) else {
            return Outcome::Rejected(Rejection::NoTable(spec.name.clone()));
        };
        match check_optimizer_update(&t.spec, spec) {
            Ok(optimizer) => {
                // An update that names no limits keeps the table's (a rate change built
                // from the model spec must not drop them).
                let mut new = spec.clone();
                if new.limits.is_none() {
                    new.limits = t.spec.limits;
                }
                let before = t.spec.clone();
                t.set_limits(new.limits, self.impressions.last_sealed_ms);
                // What the limits became (`off` leaves none).
                new.limits = t.spec.limits;
                let changed = before != new;
                t.spec = new;
                t.optimizer = optimizer;
                Outcome::TableCreated(changed)
            }
            Err(e) => Outcome::Rejected(Rejection::Fixed(e)),
        }
    }
}

/// What Raft sees of a shard (or the meta group): commands are `Command` protos, effects
/// are the change sets seals emit.
impl crate::raft::StateMachine for ShardState {
    type Command = Command;
    type Outcome = Outcome;
    type Effect = ChangeSet;
    type Feed = super::changes::ChangeLog;

    fn encode_command(cmd: &mut Command, proposal_id: u64) -> Vec<u8> {
        use prost::Message as _;
        cmd.proposal_id = proposal_id;
        cmd.encode_to_vec()
    }

    fn apply_entry(&mut self, data: &[u8], index: u64, term: u64) -> (u64, Outcome) {
        use prost::Message as _;
        match Command::decode(data) {
            Ok(cmd) => (cmd.proposal_id, self.apply(&cmd, index, term)),
            Err(err) => {
                self.advance(index, term);
                let why = format!("undecodable entry: {err}");
                (0, Outcome::Rejected(Rejection::Malformed(why)))
            }
        }
    }

    fn advance(&mut self, index: u64, term: u64) {
        ShardState::advance(self, index, term);
    }

    fn applied(&self) -> (u64, u64) {
        (self.applied_index, self.applied_term)
    }

    fn take_effects(&mut self) -> Vec<ChangeSet> {
        self.take_emitted()
    }

    fn take_snapshot_request(&mut self) -> bool {
        std::mem::take(&mut self.snapshot_requested)
    }

    fn snapshot_requested(&self) -> bool {
        self.snapshot_requested
    }

    type Frozen = super::codec::Frozen;

    fn freeze(&self) -> super::codec::Frozen {
        ShardState::freeze(self)
    }

    fn write_frozen(
        frozen: &super::codec::Frozen,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<()> {
        frozen.write(out)
    }

    fn restore(group: u32, data: &[u8], index: u64, term: u64) -> Result<Self, PsError> {
        let mut st = ShardState::decode(data)?;
        st.shard = group;
        st.applied_index = index;
        st.applied_term = term;
        Ok(st)
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Rejection {
    Rejection::Invalid(FieldError::new(field, reason))
}

/// An invalid field's error prefixed with the part it came from; others unchanged.
fn in_field(e: Rejection, prefix: &str) -> Rejection {
    match e {
        Rejection::Invalid(f) => Rejection::Invalid(f.in_field(prefix)),
        other => other,
    }
}
