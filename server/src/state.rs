//! The replicated state machine of one shard: embedding tables, dense tensors, per-row
//! optimizer state and exactly-once client sessions.
//!
//! Everything here is deterministic: the same log applied in the same order gives the
//! same bits on every replica. Rows live in one flat `Vec<f32>` per table (value and
//! optimizer slots side by side), so cloning for a background snapshot is a memcpy, not
//! an allocation per row. Snapshots and checksums visit ids in sorted order because
//! hash-map order differs between replicas.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use freshet_proto::catalog::{validate_item, validate_set};
use freshet_proto::command::v1::{command::Op, Command, EpochSnapshot, StepPush};
use freshet_proto::ps::v1::{
    optimizer_config, ChangeSet, DenseValues, OptimizerConfig, Seal, TableKind, TableRows,
    TableSpec,
};
use freshet_proto::{splitmix64, META_GROUP};
use prost::Message as _;

use crate::epoch::{self, MetaOutcome, MetaState, StepCheck, StepState};
use crate::error::PsError;

/// Largest row width (floats) a table may declare.
pub const DIM_MAX: u32 = 4096;
/// Largest dense tensor (floats).
pub const DENSE_LEN_MAX: u32 = 1 << 22;
/// Table names are short identifiers.
pub const TABLE_NAME_BYTES_MAX: usize = 128;
/// Tables per cluster.
pub const TABLES_MAX: usize = 256;
/// Rows one table may hold on one shard (bounds memory; row slots are u32).
pub const ROWS_PER_TABLE_MAX: usize = 100_000_000;
/// A client may run this many pushes ahead of its oldest unapplied one (per shard).
pub const SESSION_WINDOW: u64 = 1 << 16;
/// Sessions kept per shard; beyond it the least recently used one is forgotten.
pub const SESSIONS_MAX: usize = 100_000;

/// An optimizer with validated hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    Sgd {
        lr: f32,
    },
    Adagrad {
        lr: f32,
        initial_accumulator: f32,
        eps: f32,
    },
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
    Ftrl {
        alpha: f32,
        beta: f32,
        l1: f32,
        l2: f32,
    },
}

impl Optimizer {
    /// Validates an optimizer config; `field` prefixes the error's field name.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the bad hyper-parameter.
    pub fn from_proto(cfg: Option<&OptimizerConfig>, field: &str) -> Result<Self, PsError> {
        let finite_pos = |v: f32, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(PsError::invalid(
                    format!("{field}.{name}"),
                    "must be finite and > 0",
                ))
            }
        };
        let finite_nonneg = |v: f32, name: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(PsError::invalid(
                    format!("{field}.{name}"),
                    "must be finite and >= 0",
                ))
            }
        };
        let unit = |v: f32, name: &str| {
            if v.is_finite() && (0.0..1.0).contains(&v) {
                Ok(v)
            } else {
                Err(PsError::invalid(
                    format!("{field}.{name}"),
                    "must be in [0, 1)",
                ))
            }
        };
        let Some(kind) = cfg.and_then(|c| c.kind.as_ref()) else {
            return Err(PsError::invalid(field, "an optimizer is required"));
        };
        Ok(match kind {
            optimizer_config::Kind::Sgd(c) => Optimizer::Sgd {
                lr: finite_pos(c.lr, "sgd.lr")?,
            },
            optimizer_config::Kind::Adagrad(c) => Optimizer::Adagrad {
                lr: finite_pos(c.lr, "adagrad.lr")?,
                initial_accumulator: finite_nonneg(
                    c.initial_accumulator,
                    "adagrad.initial_accumulator",
                )?,
                eps: finite_pos(if c.eps == 0.0 { 1e-8 } else { c.eps }, "adagrad.eps")?,
            },
            optimizer_config::Kind::Adam(c) => Optimizer::Adam {
                lr: finite_pos(c.lr, "adam.lr")?,
                beta1: unit(c.beta1, "adam.beta1")?,
                beta2: unit(c.beta2, "adam.beta2")?,
                eps: finite_pos(if c.eps == 0.0 { 1e-8 } else { c.eps }, "adam.eps")?,
            },
            optimizer_config::Kind::Ftrl(c) => Optimizer::Ftrl {
                alpha: finite_pos(c.alpha, "ftrl.alpha")?,
                beta: finite_nonneg(c.beta, "ftrl.beta")?,
                l1: finite_nonneg(c.l1, "ftrl.l1")?,
                l2: finite_nonneg(c.l2, "ftrl.l2")?,
            },
        })
    }

    /// Optimizer slots stored after the `dim` values of a row.
    pub fn state_len(&self, dim: usize) -> usize {
        match self {
            Optimizer::Sgd { .. } => 0,
            Optimizer::Adagrad { .. } => dim,
            // m, v, then beta1^t and beta2^t.
            Optimizer::Adam { .. } => 2 * dim + 2,
            // z, n.
            Optimizer::Ftrl { .. } => 2 * dim,
        }
    }

    fn init_state(&self, state: &mut [f32]) {
        match *self {
            Optimizer::Sgd { .. } => {}
            Optimizer::Adagrad {
                initial_accumulator,
                ..
            } => state.fill(initial_accumulator),
            Optimizer::Adam { .. } => {
                let n = state.len();
                state.fill(0.0);
                state[n - 2] = 1.0;
                state[n - 1] = 1.0;
            }
            Optimizer::Ftrl { .. } => state.fill(0.0),
        }
    }

    /// One optimizer step on one row. Coordinates are visited in index order with f32
    /// arithmetic only, so every replica computes the same bits.
    pub fn apply(&self, w: &mut [f32], state: &mut [f32], g: &[f32]) {
        let dim = w.len();
        match *self {
            Optimizer::Sgd { lr } => {
                for j in 0..dim {
                    w[j] -= lr * g[j];
                }
            }
            Optimizer::Adagrad { lr, eps, .. } => {
                for j in 0..dim {
                    state[j] += g[j] * g[j];
                    w[j] -= lr * g[j] / (state[j].sqrt() + eps);
                }
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let (mv, powers) = state.split_at_mut(2 * dim);
                let (m, v) = mv.split_at_mut(dim);
                powers[0] *= beta1;
                powers[1] *= beta2;
                let c1 = 1.0 - powers[0];
                let c2 = 1.0 - powers[1];
                for j in 0..dim {
                    m[j] = beta1 * m[j] + (1.0 - beta1) * g[j];
                    v[j] = beta2 * v[j] + (1.0 - beta2) * g[j] * g[j];
                    let m_hat = m[j] / c1;
                    let v_hat = v[j] / c2;
                    w[j] -= lr * m_hat / (v_hat.sqrt() + eps);
                }
            }
            Optimizer::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                // FTRL-Proximal (McMahan et al. 2013), per coordinate.
                let (z, n) = state.split_at_mut(dim);
                for j in 0..dim {
                    let n_new = n[j] + g[j] * g[j];
                    let sigma = (n_new.sqrt() - n[j].sqrt()) / alpha;
                    z[j] += g[j] - sigma * w[j];
                    n[j] = n_new;
                    w[j] = if z[j].abs() <= l1 {
                        0.0
                    } else {
                        -(z[j] - z[j].signum() * l1) / ((beta + n[j].sqrt()) / alpha + l2)
                    };
                }
            }
        }
    }
}

/// Validates a table spec once, at the edge and again on apply.
///
/// # Errors
/// INVALID_ARGUMENT naming the field.
pub fn validate_spec(spec: &TableSpec) -> Result<Optimizer, PsError> {
    if spec.name.is_empty() || spec.name.len() > TABLE_NAME_BYTES_MAX {
        return Err(PsError::invalid(
            "spec.name",
            format!("must be 1..={TABLE_NAME_BYTES_MAX} bytes"),
        ));
    }
    if !spec
        .name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(PsError::invalid("spec.name", "use [A-Za-z0-9_.-] only"));
    }
    let kind = TableKind::try_from(spec.kind)
        .map_err(|_| PsError::invalid("spec.kind", format!("unknown kind {}", spec.kind)))?;
    let max = match kind {
        TableKind::Sparse => DIM_MAX,
        TableKind::Dense => DENSE_LEN_MAX,
    };
    if spec.dim == 0 || spec.dim > max {
        return Err(PsError::invalid("spec.dim", format!("must be 1..={max}")));
    }
    if !spec.init_scale.is_finite() || spec.init_scale < 0.0 {
        return Err(PsError::invalid(
            "spec.init_scale",
            "must be finite and >= 0",
        ));
    }
    Optimizer::from_proto(spec.optimizer.as_ref(), "spec.optimizer")
}

/// Checks that `new` only changes `cur`'s optimizer hyper-parameters (what a running
/// table can take: its rows' layout, their initialiser and the optimizer's slots stay as
/// they are) and validates them. The error is (field under `spec`, reason).
pub fn check_optimizer_update(
    cur: &TableSpec,
    new: &TableSpec,
) -> Result<Optimizer, (String, String)> {
    let fixed = |field: &str| {
        Err((
            field.to_string(),
            format!(
                "fixed when table {:?} was created; only the optimizer's hyper-parameters \
                 change on a running table",
                cur.name
            ),
        ))
    };
    if new.name != cur.name {
        return fixed("name");
    }
    if new.kind != cur.kind {
        return fixed("kind");
    }
    if new.dim != cur.dim {
        return fixed("dim");
    }
    if new.init_scale.to_bits() != cur.init_scale.to_bits() {
        return fixed("init_scale");
    }
    if new.seed != cur.seed {
        return fixed("seed");
    }
    let kind = |t: &TableSpec| {
        t.optimizer
            .as_ref()
            .and_then(|o| o.kind.as_ref())
            .map(std::mem::discriminant)
    };
    if kind(new) != kind(cur) {
        return Err((
            "optimizer".into(),
            "the optimizer kind is fixed when the table is created (its slots are stored \
             with every row); change its hyper-parameters only"
                .into(),
        ));
    }
    Optimizer::from_proto(new.optimizer.as_ref(), "optimizer").map_err(|e| match e {
        PsError::InvalidArgument { field, reason } => (field, reason),
        other => ("optimizer".into(), other.to_string()),
    })
}

pub use freshet_proto::init_value;

/// Writes the initial value of row `id` into `out`.
fn fill_init(seed: u64, name_hash: u64, scale: f32, id: u64, out: &mut [f32]) {
    for (j, v) in out.iter_mut().enumerate() {
        *v = init_value(seed, name_hash, id, j as u64, scale);
    }
}

/// FNV-1a of a table name; part of the row initialiser, so fixed forever.
pub fn name_hash(name: &str) -> u64 {
    freshet_proto::fnv1a64(name)
}

/// One table (sparse) or dense tensor (a single row with id 0).
#[derive(Debug, Clone)]
pub struct Table {
    pub spec: TableSpec,
    pub optimizer: Optimizer,
    name_hash: u64,
    dim: usize,
    stride: usize,
    index: HashMap<u64, u32>,
    ids: Vec<u64>,
    data: Vec<f32>,
}

impl Table {
    fn new(spec: TableSpec, optimizer: Optimizer) -> Self {
        let dim = spec.dim as usize;
        Table {
            name_hash: name_hash(&spec.name),
            stride: dim + optimizer.state_len(dim),
            dim,
            optimizer,
            spec,
            index: HashMap::new(),
            ids: Vec::new(),
            data: Vec::new(),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    /// Copies row `id` (its initial value when never pushed) into `out`.
    pub fn read_into(&self, id: u64, out: &mut [f32]) {
        match self.index.get(&id) {
            Some(&slot) => {
                let s = slot as usize * self.stride;
                out.copy_from_slice(&self.data[s..s + self.dim]);
            }
            None => self.init_row(id, out),
        }
    }

    fn init_row(&self, id: u64, out: &mut [f32]) {
        fill_init(
            self.spec.seed,
            self.name_hash,
            self.spec.init_scale,
            id,
            out,
        );
    }

    fn slot(&mut self, id: u64) -> usize {
        if let Some(&s) = self.index.get(&id) {
            return s as usize;
        }
        let slot = self.ids.len();
        self.ids.push(id);
        self.index.insert(id, slot as u32);
        let start = self.data.len();
        self.data.resize(start + self.stride, 0.0);
        let (w, state) = self.data[start..].split_at_mut(self.dim);
        fill_init(self.spec.seed, self.name_hash, self.spec.init_scale, id, w);
        self.optimizer.init_state(state);
        slot
    }

    fn apply_grad(&mut self, id: u64, g: &[f32]) {
        let slot = self.slot(id);
        let s = slot * self.stride;
        let (w, state) = self.data[s..s + self.stride].split_at_mut(self.dim);
        self.optimizer.apply(w, state, g);
    }

    fn sorted_slots(&self) -> Vec<(u64, usize)> {
        let mut v: Vec<(u64, usize)> = self
            .ids
            .iter()
            .enumerate()
            .map(|(slot, &id)| (id, slot))
            .collect();
        v.sort_unstable_by_key(|(id, _)| *id);
        v
    }
}

/// Exactly-once bookkeeping of one client on one shard: every seq ≤ `floor` is applied,
/// and `above` holds the applied seqs beyond it. Exact, not "highest seen": pipelined
/// pushes may commit out of order across a leader change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    pub floor: u64,
    pub above: BTreeSet<u64>,
    pub last_index: u64,
}

impl Session {
    pub fn contains(&self, seq: u64) -> bool {
        seq <= self.floor || self.above.contains(&seq)
    }

    fn record(&mut self, seq: u64, index: u64) {
        self.last_index = index;
        if seq == self.floor + 1 {
            self.floor = seq;
            while self.above.remove(&(self.floor + 1)) {
                self.floor += 1;
            }
        } else if seq > self.floor {
            self.above.insert(seq);
        }
    }
}

/// What applying one command did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied,
    /// Already applied under the same (client_id, seq); nothing changed.
    Duplicate,
    /// CreateTable: false when an identical table existed. UpdateTable: whether the
    /// optimizer changed.
    TableCreated(bool),
    /// Rejected deterministically on every replica; nothing changed.
    Rejected(String),
    /// A step of a fenced incarnation; nothing changed.
    Fenced(String),
    /// A bound was reached (buffered steps); nothing changed, retry later.
    Overloaded(String),
    /// Meta group commands.
    Meta(MetaOutcome),
}

/// State of one shard.
#[derive(Debug, Clone, Default)]
pub struct ShardState {
    pub shard: u32,
    pub applied_index: u64,
    pub applied_term: u64,
    tables: BTreeMap<String, Table>,
    sessions: HashMap<u64, Session>,
    /// Meta group only: worker registry and seals.
    pub meta: MetaState,
    /// Data shards only: buffered steps and the sealed epoch.
    pub steps: StepState,
    /// Rows changed by direct (client_id, seq) pushes since the last seal: they go into
    /// the next change set. Not part of snapshots (direct pushes are for bulk loads).
    dirty: BTreeMap<String, BTreeSet<u64>>,
    /// Change sets produced by seals since the owner last drained them.
    emitted: Vec<ChangeSet>,
}

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
    pub fn validate_step(&self, p: &StepPush) -> Result<(), PsError> {
        if p.inc == 0 {
            return Err(PsError::invalid("inc", "must be non-zero (from Register)"));
        }
        if p.step == 0 {
            return Err(PsError::invalid("step", "must be >= 1"));
        }
        if p.sparse.is_empty() && p.dense.is_empty() {
            return Err(PsError::invalid(
                "sparse",
                "a step needs sparse or dense parts",
            ));
        }
        for (i, s) in p.sparse.iter().enumerate() {
            self.validate_push(&s.table, &s.ids, &s.grads)
                .map_err(|e| e.in_field(&format!("sparse[{i}]")))?;
        }
        for (i, d) in p.dense.iter().enumerate() {
            self.validate_push_dense(&d.name, &d.grads)
                .map_err(|e| e.in_field(&format!("dense[{i}]")))?;
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
    pub fn validate_push(&self, table: &str, ids: &[u64], grads: &[f32]) -> Result<(), PsError> {
        let t = self.dense_or_sparse(table, TableKind::Sparse)?;
        if ids.is_empty() {
            return Err(PsError::invalid("ids", "must not be empty"));
        }
        if grads.len() != ids.len() * t.dim {
            return Err(PsError::invalid(
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
            return Err(PsError::invalid(
                format!("grads[{i}]"),
                "must be finite (NaN or Inf given)",
            ));
        }
        // Conservative (counts ids that may already exist) and replicated, so every
        // replica decides the same.
        if t.rows() + ids.len() > ROWS_PER_TABLE_MAX {
            return Err(PsError::Overloaded(format!(
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
    pub fn validate_push_dense(&self, name: &str, grads: &[f32]) -> Result<(), PsError> {
        let t = self.dense_or_sparse(name, TableKind::Dense)?;
        if grads.len() != t.dim {
            return Err(PsError::invalid(
                "grads",
                format!("expected {} values, got {}", t.dim, grads.len()),
            ));
        }
        if let Some(i) = grads.iter().position(|g| !g.is_finite()) {
            return Err(PsError::invalid(
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
    pub fn dense_or_sparse(&self, name: &str, kind: TableKind) -> Result<&Table, PsError> {
        let field = if kind == TableKind::Dense {
            "name"
        } else {
            "table"
        };
        let t = self
            .tables
            .get(name)
            .ok_or_else(|| PsError::invalid(field, format!("unknown table {name:?}")))?;
        if t.spec.kind != kind as i32 {
            return Err(PsError::invalid(
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
    pub fn check_seq(&self, client_id: u64, seq: u64) -> Result<bool, PsError> {
        if seq == 0 {
            return Err(PsError::invalid("seq", "must be >= 1"));
        }
        let floor = self.sessions.get(&client_id).map_or(0, |s| s.floor);
        if let Some(s) = self.sessions.get(&client_id) {
            if s.contains(seq) {
                return Ok(true);
            }
        }
        if seq > floor + SESSION_WINDOW {
            return Err(PsError::FailedPrecondition(format!(
                "seq {seq} is more than {SESSION_WINDOW} ahead of the client's applied floor {floor}"
            )));
        }
        Ok(false)
    }

    /// Applies one committed command. Never panics on bad data: a command that would
    /// fail validation is rejected identically on every replica.
    pub fn apply(&mut self, cmd: &Command, index: u64, term: u64) -> Outcome {
        self.applied_index = index;
        self.applied_term = term;
        let Some(op) = &cmd.op else {
            return Outcome::Rejected("empty command".into());
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
            Op::Push(_) | Op::PushDense(_) => {}
        }
        match self.check_seq(cmd.client_id, cmd.seq) {
            Ok(true) => return Outcome::Duplicate,
            Ok(false) => {}
            Err(e) => return Outcome::Rejected(e.to_string()),
        }
        match op {
            Op::Push(p) => {
                if let Err(e) = self.validate_push(&p.table, &p.ids, &p.grads) {
                    return Outcome::Rejected(e.to_string());
                }
                self.apply_sparse(&p.table, &p.ids, &p.grads, true);
            }
            Op::PushDense(p) => {
                if let Err(e) = self.validate_push_dense(&p.name, &p.grads) {
                    return Outcome::Rejected(e.to_string());
                }
                let t = self.tables.get_mut(&p.name).expect("validated above");
                t.apply_grad(0, &p.grads);
                self.dirty.entry(p.name.clone()).or_default().insert(0);
            }
            _ => unreachable!("handled above"),
        }
        self.record_session(cmd.client_id, cmd.seq, index);
        Outcome::Applied
    }

    /// Sums duplicate ids (in request order) and applies each row's gradient once.
    fn apply_sparse(&mut self, table: &str, ids: &[u64], grads: &[f32], direct: bool) {
        let t = self.tables.get_mut(table).expect("validated by the caller");
        let dim = t.dim;
        let mut ids_sorted: Vec<(u64, usize)> =
            ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        ids_sorted.sort_by_key(|&(id, i)| (id, i));
        let mut sum = vec![0.0f32; dim];
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
            t.apply_grad(id, &sum);
        }
        if direct {
            let d = self.dirty.entry(table.to_string()).or_default();
            d.extend(ids.iter().copied());
        }
    }

    /// Buffers catalog upserts until the next seal.
    fn buffer_items(
        &mut self,
        items: &[freshet_proto::ps::v1::Item],
        sets: &[freshet_proto::ps::v1::CandidateSet],
    ) -> Outcome {
        if self.is_meta() {
            return Outcome::Rejected("items go to data shards".into());
        }
        for (i, item) in items.iter().enumerate() {
            if let Err(e) = validate_item(item, &format!("items[{i}]")) {
                return Outcome::Rejected(e.to_string());
            }
        }
        for (i, set) in sets.iter().enumerate() {
            if let Err(e) = validate_set(set, &format!("sets[{i}]")) {
                return Outcome::Rejected(e.to_string());
            }
        }
        if self.steps.sets.len() + self.steps.pending_sets.len() + sets.len()
            > epoch::SETS_PER_SHARD_MAX
        {
            return Outcome::Overloaded(format!(
                "shard {} holds {} candidate sets",
                self.shard,
                self.steps.sets.len()
            ));
        }
        self.steps.pending_sets.extend_from_slice(sets);
        if self.steps.pending_items.len() + items.len() > epoch::PENDING_ITEMS_MAX
            || self.steps.items.len() + self.steps.pending_items.len() + items.len()
                > epoch::ITEMS_PER_SHARD_MAX
        {
            return Outcome::Overloaded(format!(
                "shard {} holds {} items and {} pending upserts",
                self.shard,
                self.steps.items.len(),
                self.steps.pending_items.len()
            ));
        }
        self.steps.pending_items.extend_from_slice(items);
        Outcome::Applied
    }

    /// Buffers a step until a seal covers it.
    fn buffer_step(&mut self, p: &StepPush) -> Outcome {
        if self.is_meta() {
            return Outcome::Rejected("steps go to data shards".into());
        }
        if let Err(e) = self.validate_step(p) {
            return Outcome::Rejected(e.to_string());
        }
        match self.steps.check(p.inc, p.step) {
            StepCheck::Duplicate => return Outcome::Duplicate,
            StepCheck::Fenced => {
                return Outcome::Fenced(format!("incarnation {} is fenced", p.inc));
            }
            StepCheck::New => {}
        }
        if self.steps.pending_steps >= epoch::PENDING_STEPS_MAX
            || self.steps.pending_bytes + epoch::step_bytes(p) > epoch::PENDING_BYTES_MAX
        {
            return Outcome::Overloaded(format!(
                "shard {} buffers {} unsealed steps ({} bytes)",
                self.shard, self.steps.pending_steps, self.steps.pending_bytes
            ));
        }
        self.steps.buffer(p.clone());
        Outcome::Applied
    }

    /// Applies committed seals in epoch order: the buffered steps within each cut in
    /// (inc, step) order, then the fences; emits one change set per seal.
    fn apply_seals(&mut self, seals: &[Seal]) -> Outcome {
        if self.is_meta() {
            return Outcome::Rejected("seals go to data shards".into());
        }
        let mut applied = 0;
        for seal in seals {
            if seal.epoch <= self.steps.last_sealed {
                continue; // idempotent: already sealed
            }
            if seal.first_epoch != self.steps.last_sealed + 1 || seal.epoch < seal.first_epoch {
                return Outcome::Rejected(format!(
                    "seal {}..={} does not follow epoch {}",
                    seal.first_epoch, seal.epoch, self.steps.last_sealed
                ));
            }
            let mut changed = std::mem::take(&mut self.dirty);
            let mut cuts: Vec<(u64, u64)> = seal.cuts.iter().map(|c| (c.inc, c.step)).collect();
            cuts.sort_unstable();
            for (inc, cut) in cuts {
                for step in self.steps.take_within(inc, cut) {
                    for sp in &step.sparse {
                        // Validated when buffered; tables are never dropped.
                        if self.tables.contains_key(&sp.table) {
                            self.apply_sparse(&sp.table, &sp.ids, &sp.grads, false);
                            changed
                                .entry(sp.table.clone())
                                .or_default()
                                .extend(sp.ids.iter().copied());
                        }
                    }
                    for d in &step.dense {
                        if let Some(t) = self.tables.get_mut(&d.name) {
                            t.apply_grad(0, &d.grads);
                            changed.entry(d.name.clone()).or_default().insert(0);
                        }
                    }
                }
            }
            for inc in &seal.fenced {
                self.steps.fence(*inc);
            }
            self.steps.last_sealed = seal.epoch;
            let mut cs = self.change_set(seal, &changed);
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
                tr.values
                    .extend_from_slice(&t.data[slot * t.stride..slot * t.stride + t.dim]);
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
            Err(e) => return Outcome::Rejected(e.to_string()),
        };
        if let Some(existing) = self.tables.get(&spec.name) {
            return if existing.spec == *spec {
                Outcome::TableCreated(false)
            } else {
                Outcome::Rejected(format!(
                    "table {:?} already exists with a different spec",
                    spec.name
                ))
            };
        }
        if self.tables.len() >= TABLES_MAX {
            return Outcome::Rejected(format!("at most {TABLES_MAX} tables"));
        }
        self.tables
            .insert(spec.name.clone(), Table::new(spec.clone(), optimizer));
        Outcome::TableCreated(true)
    }

    /// New optimizer hyper-parameters for an existing table (checked again here: every
    /// replica decides the same). Rows and slots are kept; later pushes use the new values.
    fn update_table(&mut self, spec: &TableSpec) -> Outcome {
        let Some(t) = self.tables.get_mut(&spec.name) else {
            return Outcome::Rejected(format!("no table {:?}", spec.name));
        };
        match check_optimizer_update(&t.spec, spec) {
            Ok(optimizer) => {
                let changed = t.spec != *spec;
                t.spec = spec.clone();
                t.optimizer = optimizer;
                Outcome::TableCreated(changed)
            }
            Err((field, reason)) => Outcome::Rejected(format!("spec.{field}: {reason}")),
        }
    }

    /// Checksum over sorted state: table specs, every row's values and optimizer slots,
    /// and the sessions. Equal on replicas at the same applied index.
    pub fn checksum(&self) -> u64 {
        let mut h = Hasher::default();
        for (name, t) in &self.tables {
            h.word(name_hash(name));
            h.bytes(&t.spec.encode_to_vec());
            for (id, slot) in t.sorted_slots() {
                h.word(id);
                for v in &t.data[slot * t.stride..(slot + 1) * t.stride] {
                    h.word(u64::from(v.to_bits()));
                }
            }
        }
        let mut clients: Vec<_> = self.sessions.iter().collect();
        clients.sort_unstable_by_key(|(c, _)| **c);
        for (c, s) in clients {
            h.word(*c);
            h.word(s.floor);
            for seq in &s.above {
                h.word(*seq);
            }
        }
        // Sealed state only: buffered steps are not (yet) part of the model.
        h.word(self.steps.last_sealed);
        for (inc, s) in &self.steps.incs {
            h.word(*inc);
            h.word(s.floor);
            h.word(u64::from(s.fenced));
        }
        for item in self.steps.items.values() {
            h.bytes(&item.encode_to_vec());
        }
        for (name, items) in &self.steps.sets {
            h.word(name_hash(name));
            for id in items {
                h.word(*id);
            }
        }
        h.word(self.meta.last_sealed);
        h.word(self.meta.next_inc);
        for w in self.meta.workers.values() {
            h.word(w.inc);
            h.word(w.cut);
            h.word(u64::from(w.fenced));
        }
        h.0
    }

    /// Serialises the state with ids in sorted order.
    pub fn encode(&self) -> Vec<u8> {
        let rows: usize = self.tables.values().map(|t| t.data.len()).sum();
        let mut out = Vec::with_capacity(64 + rows * 4 + self.tables.len() * 64);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        put_u32(&mut out, SNAPSHOT_VERSION);
        put_u32(&mut out, self.shard);
        put_u64(&mut out, self.applied_index);
        put_u64(&mut out, self.applied_term);
        put_u32(&mut out, self.tables.len() as u32);
        for t in self.tables.values() {
            let spec = t.spec.encode_to_vec();
            put_u32(&mut out, spec.len() as u32);
            out.extend_from_slice(&spec);
            let slots = t.sorted_slots();
            put_u64(&mut out, slots.len() as u64);
            for (id, slot) in slots {
                put_u64(&mut out, id);
                for v in &t.data[slot * t.stride..(slot + 1) * t.stride] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        let mut clients: Vec<_> = self.sessions.iter().collect();
        clients.sort_unstable_by_key(|(c, _)| **c);
        put_u32(&mut out, clients.len() as u32);
        for (c, s) in clients {
            put_u64(&mut out, *c);
            put_u64(&mut out, s.floor);
            put_u64(&mut out, s.last_index);
            put_u32(&mut out, s.above.len() as u32);
            for seq in &s.above {
                put_u64(&mut out, *seq);
            }
        }
        let ep = epoch::encode(&self.meta, &self.steps).encode_to_vec();
        put_u64(&mut out, ep.len() as u64);
        out.extend_from_slice(&ep);
        let crc = crc32fast::hash(&out);
        put_u32(&mut out, crc);
        out
    }

    /// Restores a state written by [`ShardState::encode`].
    ///
    /// # Errors
    /// [`PsError::Corrupt`] on a bad checksum, version or truncated data.
    pub fn decode(data: &[u8]) -> Result<Self, PsError> {
        let bad = |what: &str| PsError::Corrupt(format!("snapshot: {what}"));
        if data.len() < 8 + SNAPSHOT_MAGIC.len() {
            return Err(bad("too short"));
        }
        let (body, crc) = data.split_at(data.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("checksum mismatch"));
        }
        let mut r = Reader(body);
        if r.take(SNAPSHOT_MAGIC.len()).ok_or_else(|| bad("magic"))? != SNAPSHOT_MAGIC {
            return Err(bad("magic"));
        }
        let version = r.u32().ok_or_else(|| bad("version"))?;
        if !(1..=SNAPSHOT_VERSION).contains(&version) {
            return Err(bad("unsupported version"));
        }
        let mut s = ShardState::new(r.u32().ok_or_else(|| bad("shard"))?);
        s.applied_index = r.u64().ok_or_else(|| bad("index"))?;
        s.applied_term = r.u64().ok_or_else(|| bad("term"))?;
        let n_tables = r.u32().ok_or_else(|| bad("tables"))?;
        for _ in 0..n_tables {
            let len = r.u32().ok_or_else(|| bad("spec"))? as usize;
            let spec = TableSpec::decode(r.take(len).ok_or_else(|| bad("spec"))?)
                .map_err(|_| bad("spec"))?;
            let optimizer = validate_spec(&spec).map_err(|e| bad(&e.to_string()))?;
            let mut t = Table::new(spec, optimizer);
            let n_rows = r.u64().ok_or_else(|| bad("rows"))? as usize;
            if n_rows > body.len() / 8 {
                return Err(bad("row count"));
            }
            t.ids.reserve(n_rows);
            t.data.reserve(n_rows * t.stride);
            for slot in 0..n_rows {
                let id = r.u64().ok_or_else(|| bad("row id"))?;
                let raw = r.take(t.stride * 4).ok_or_else(|| bad("row data"))?;
                t.data.extend(
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
                );
                t.ids.push(id);
                t.index.insert(id, slot as u32);
            }
            s.tables.insert(t.spec.name.clone(), t);
        }
        let n_sessions = r.u32().ok_or_else(|| bad("sessions"))?;
        for _ in 0..n_sessions {
            let c = r.u64().ok_or_else(|| bad("session"))?;
            let floor = r.u64().ok_or_else(|| bad("session"))?;
            let last_index = r.u64().ok_or_else(|| bad("session"))?;
            let n = r.u32().ok_or_else(|| bad("session"))?;
            let mut above = BTreeSet::new();
            for _ in 0..n {
                above.insert(r.u64().ok_or_else(|| bad("session"))?);
            }
            s.sessions.insert(
                c,
                Session {
                    floor,
                    above,
                    last_index,
                },
            );
        }
        if version >= 2 {
            let len = r.u64().ok_or_else(|| bad("epoch state"))? as usize;
            let raw = r.take(len).ok_or_else(|| bad("epoch state"))?;
            let snap = EpochSnapshot::decode(raw).map_err(|_| bad("epoch state"))?;
            let (meta, steps) = epoch::decode(snap, s.is_meta());
            s.meta = meta;
            s.steps = steps;
        }
        Ok(s)
    }
}

const SNAPSHOT_MAGIC: &[u8] = b"FRESHET-SNAP";
/// 2 added the epoch section (meta registry and seals, buffered steps).
const SNAPSHOT_VERSION: u32 = 2;

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

struct Reader<'a>(&'a [u8]);
impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// Order-dependent 64-bit hash (splitmix64 chaining); fast and stable across builds.
#[derive(Default)]
struct Hasher(u64);
impl Hasher {
    fn word(&mut self, w: u64) {
        self.0 = splitmix64(self.0 ^ w);
    }
    fn bytes(&mut self, b: &[u8]) {
        for c in b.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        self.word(b.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_proto::command::v1::{DensePush, SparsePush};
    use freshet_proto::ps::v1::{AdagradConfig, AdamConfig, FtrlConfig, SgdConfig};

    pub(crate) fn spec(name: &str, dim: u32, opt: optimizer_config::Kind) -> TableSpec {
        TableSpec {
            name: name.into(),
            kind: TableKind::Sparse as i32,
            dim,
            optimizer: Some(OptimizerConfig { kind: Some(opt) }),
            init_scale: 0.01,
            seed: 7,
        }
    }

    fn create(s: &mut ShardState, spec: TableSpec) {
        let cmd = Command {
            op: Some(Op::CreateTable(spec)),
            ..Default::default()
        };
        assert_eq!(s.apply(&cmd, 1, 1), Outcome::TableCreated(true));
    }

    fn push(client: u64, seq: u64, table: &str, ids: Vec<u64>, grads: Vec<f32>) -> Command {
        Command {
            proposal_id: 0,
            client_id: client,
            seq,
            op: Some(Op::Push(SparsePush {
                table: table.into(),
                ids,
                grads,
            })),
        }
    }

    #[test]
    fn update_table_changes_rates_only() {
        let mut s = ShardState::new(0);
        let sgd = |lr| spec("t", 2, optimizer_config::Kind::Sgd(SgdConfig { lr }));
        create(&mut s, sgd(0.5));
        let update = |spec: TableSpec| Command {
            op: Some(Op::UpdateTable(spec)),
            ..Default::default()
        };
        let mut w = [0.0f32; 2];
        s.table("t").unwrap().read_into(5, &mut w);
        assert_eq!(
            s.apply(&push(1, 1, "t", vec![5], vec![1.0, 1.0]), 2, 1),
            Outcome::Applied
        );
        assert_eq!(
            s.apply(&update(sgd(0.25)), 3, 1),
            Outcome::TableCreated(true)
        );
        assert_eq!(
            s.apply(&update(sgd(0.25)), 4, 1),
            Outcome::TableCreated(false)
        );
        assert_eq!(
            s.apply(&push(1, 2, "t", vec![5], vec![1.0, 1.0]), 5, 1),
            Outcome::Applied
        );
        let mut after = [0.0f32; 2];
        s.table("t").unwrap().read_into(5, &mut after);
        assert_eq!(after[0], w[0] - 0.5 - 0.25);
        // Layout, initialiser and optimizer kind are fixed; the rate must be valid; a
        // refused update changes nothing.
        let mut wider = sgd(0.1);
        wider.dim = 3;
        let mut reseeded = sgd(0.1);
        reseeded.seed = 8;
        let adagrad = spec(
            "t",
            2,
            optimizer_config::Kind::Adagrad(AdagradConfig {
                lr: 0.1,
                initial_accumulator: 0.1,
                eps: 1e-8,
            }),
        );
        let missing = spec("u", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 0.1 }));
        for (bad, want) in [
            (wider, "spec.dim"),
            (reseeded, "spec.seed"),
            (adagrad, "spec.optimizer"),
            (sgd(f32::NAN), "spec.optimizer.sgd.lr"),
            (missing, "no table"),
        ] {
            match s.apply(&update(bad), 6, 1) {
                Outcome::Rejected(r) => assert!(r.contains(want), "{want}: {r}"),
                other => panic!("{want}: {other:?}"),
            }
        }
        assert_eq!(s.table("t").unwrap().spec, sgd(0.25));
    }

    #[test]
    fn lazy_init_is_deterministic_and_in_range() {
        let a = init_value(7, name_hash("t"), 42, 3, 0.01);
        let b = init_value(7, name_hash("t"), 42, 3, 0.01);
        assert_eq!(a.to_bits(), b.to_bits());
        assert!(a.abs() <= 0.01);
        assert_ne!(a, init_value(7, name_hash("t"), 43, 3, 0.01));
        assert_ne!(a, init_value(8, name_hash("t"), 42, 3, 0.01));
    }

    #[test]
    fn sgd_and_adagrad_math() {
        let mut s = ShardState::new(0);
        create(
            &mut s,
            spec("sgd", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 0.5 })),
        );
        create(
            &mut s,
            spec(
                "ada",
                1,
                optimizer_config::Kind::Adagrad(AdagradConfig {
                    lr: 1.0,
                    initial_accumulator: 0.0,
                    eps: 1e-8,
                }),
            ),
        );
        let mut before = [0.0f32; 2];
        s.table("sgd").unwrap().read_into(5, &mut before);
        assert_eq!(
            s.apply(&push(1, 1, "sgd", vec![5], vec![1.0, -2.0]), 2, 1),
            Outcome::Applied
        );
        let mut after = [0.0f32; 2];
        s.table("sgd").unwrap().read_into(5, &mut after);
        assert_eq!(after[0], before[0] - 0.5);
        assert_eq!(after[1], before[1] + 1.0);

        let mut w0 = [0.0f32];
        s.table("ada").unwrap().read_into(9, &mut w0);
        s.apply(&push(1, 2, "ada", vec![9], vec![2.0]), 3, 1);
        let mut w1 = [0.0f32];
        s.table("ada").unwrap().read_into(9, &mut w1);
        // accumulator 4, step = 1 * 2 / 2 = 1.
        assert!((w1[0] - (w0[0] - 1.0)).abs() < 1e-6);
    }

    #[test]
    fn adam_and_ftrl_move_against_the_gradient() {
        let mut s = ShardState::new(0);
        create(
            &mut s,
            spec(
                "adam",
                3,
                optimizer_config::Kind::Adam(AdamConfig {
                    lr: 0.1,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                }),
            ),
        );
        create(
            &mut s,
            spec(
                "ftrl",
                3,
                optimizer_config::Kind::Ftrl(FtrlConfig {
                    alpha: 0.1,
                    beta: 1.0,
                    l1: 0.0,
                    l2: 0.0,
                }),
            ),
        );
        for (seq, t) in [(1, "adam"), (2, "ftrl")] {
            let mut w0 = [0.0f32; 3];
            s.table(t).unwrap().read_into(1, &mut w0);
            s.apply(&push(1, seq, t, vec![1], vec![1.0, -1.0, 0.0]), seq + 1, 1);
            let mut w1 = [0.0f32; 3];
            s.table(t).unwrap().read_into(1, &mut w1);
            assert!(
                w1[0] < w0[0] || t == "ftrl" && w1[0] < 0.0,
                "{t}: {w0:?} -> {w1:?}"
            );
            assert!(
                w1[1] > w0[1] || t == "ftrl" && w1[1] > 0.0,
                "{t}: {w0:?} -> {w1:?}"
            );
        }
        // Adam's first step is ~lr in magnitude.
        let mut w = [0.0f32; 3];
        s.table("adam").unwrap().read_into(1, &mut w);
        let init = init_value(7, name_hash("adam"), 1, 0, 0.01);
        assert!(((init - w[0]) - 0.1).abs() < 1e-4);
    }

    #[test]
    fn exactly_once_is_exact_under_reordering() {
        let mut s = ShardState::new(0);
        create(
            &mut s,
            spec("t", 1, optimizer_config::Kind::Sgd(SgdConfig { lr: 1.0 })),
        );
        // Seqs 3, 1, 3 (retry), 2, 1 (retry): each applied once.
        let order = [3u64, 1, 3, 2, 1];
        let mut outcomes = vec![];
        for (i, seq) in order.iter().enumerate() {
            outcomes.push(s.apply(&push(9, *seq, "t", vec![1], vec![1.0]), 10 + i as u64, 1));
        }
        use Outcome::*;
        assert_eq!(
            outcomes,
            vec![Applied, Applied, Duplicate, Applied, Duplicate]
        );
        let sess = s.session(9).unwrap();
        assert_eq!(sess.floor, 3);
        assert!(sess.above.is_empty());
        let mut w = [0.0f32];
        s.table("t").unwrap().read_into(1, &mut w);
        let init = init_value(7, name_hash("t"), 1, 0, 0.01);
        assert_eq!(w[0], ((init - 1.0) - 1.0) - 1.0);
    }

    #[test]
    fn duplicate_ids_in_one_push_are_summed() {
        let mut a = ShardState::new(0);
        let mut b = ShardState::new(0);
        for s in [&mut a, &mut b] {
            create(
                s,
                spec("t", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 1.0 })),
            );
        }
        a.apply(&push(1, 1, "t", vec![4, 4], vec![1.0, 2.0, 3.0, 4.0]), 2, 1);
        b.apply(&push(1, 1, "t", vec![4], vec![4.0, 6.0]), 2, 1);
        assert_eq!(a.checksum(), b.checksum());
    }

    #[test]
    fn bad_commands_are_rejected_without_change() {
        let mut s = ShardState::new(0);
        create(
            &mut s,
            spec("t", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 1.0 })),
        );
        let before = s.checksum();
        for cmd in [
            push(1, 1, "nope", vec![1], vec![1.0, 1.0]),
            push(1, 1, "t", vec![1], vec![1.0]),
            push(1, 1, "t", vec![1], vec![f32::NAN, 1.0]),
            push(1, 1, "t", vec![], vec![]),
            push(1, 0, "t", vec![1], vec![1.0, 1.0]),
            push(1, SESSION_WINDOW + 5, "t", vec![1], vec![1.0, 1.0]),
        ] {
            assert!(
                matches!(s.apply(&cmd, 5, 1), Outcome::Rejected(_)),
                "{cmd:?}"
            );
        }
        let mut different = spec("t", 3, optimizer_config::Kind::Sgd(SgdConfig { lr: 1.0 }));
        let cmd = Command {
            op: Some(Op::CreateTable(different.clone())),
            ..Default::default()
        };
        assert!(matches!(s.apply(&cmd, 6, 1), Outcome::Rejected(_)));
        different.dim = 2;
        let cmd = Command {
            op: Some(Op::CreateTable(different)),
            ..Default::default()
        };
        assert_eq!(s.apply(&cmd, 7, 1), Outcome::TableCreated(false));
        assert_eq!(s.checksum(), before);
    }

    fn step(inc: u64, step: u64, ids: Vec<u64>) -> Command {
        let n = ids.len();
        Command {
            op: Some(Op::PushStep(StepPush {
                inc,
                step,
                sparse: vec![freshet_proto::ps::v1::SparseGrads {
                    table: "t".into(),
                    ids,
                    grads: (0..n * 2).map(|k| k as f32 * 0.1 - 0.3).collect(),
                }],
                dense: vec![],
            })),
            ..Default::default()
        }
    }

    fn seal_cmd(first: u64, epoch: u64, cuts: &[(u64, u64)], fenced: &[u64]) -> Command {
        Command {
            op: Some(Op::ShardSeal(freshet_proto::command::v1::ShardSeal {
                seals: vec![Seal {
                    first_epoch: first,
                    epoch,
                    cuts: cuts
                        .iter()
                        .map(|&(inc, step)| freshet_proto::ps::v1::Cut { inc, step })
                        .collect(),
                    fenced: fenced.to_vec(),
                    proposed_at_ms: 0,
                }],
            })),
            ..Default::default()
        }
    }

    /// A follower restored from a snapshot and promoted before the seal still holds the
    /// buffered steps, floors, fences and catalog upserts, and seals exactly like the
    /// replica the snapshot came from.
    #[test]
    fn buffered_steps_survive_a_snapshot_and_seal_identically() {
        let mut a = ShardState::new(0);
        create(
            &mut a,
            spec("t", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 0.5 })),
        );
        assert_eq!(a.apply(&step(1, 1, vec![5, 6]), 2, 1), Outcome::Applied);
        assert_eq!(a.apply(&step(1, 2, vec![6]), 3, 1), Outcome::Applied);
        assert_eq!(a.apply(&step(2, 1, vec![5]), 4, 1), Outcome::Applied);
        assert_eq!(a.apply(&step(1, 2, vec![6]), 5, 1), Outcome::Duplicate);
        assert_eq!(
            a.apply(&seal_cmd(1, 1, &[(1, 1)], &[]), 6, 1),
            Outcome::Applied
        );
        let items = Command {
            op: Some(Op::UpsertItems(freshet_proto::command::v1::ItemUpsert {
                items: vec![freshet_proto::ps::v1::Item {
                    id: 9,
                    features: vec!["c=1".into()],
                    active: true,
                }],
                sets: vec![freshet_proto::ps::v1::CandidateSet {
                    name: "s".into(),
                    items: vec![9],
                }],
            })),
            ..Default::default()
        };
        assert_eq!(a.apply(&items, 7, 1), Outcome::Applied);
        a.take_emitted();
        let mut b = ShardState::decode(&a.encode()).unwrap();
        assert_eq!(a.checksum(), b.checksum());
        assert_eq!(b.steps.pending_steps, 2);
        assert_eq!(b.steps.check(1, 1), StepCheck::Duplicate);
        // Epoch 2 seals inc 1 step 2 and fences inc 2 (its step 1 is dropped).
        let next = seal_cmd(2, 2, &[(1, 2)], &[2]);
        assert_eq!(a.apply(&next, 8, 1), Outcome::Applied);
        assert_eq!(b.apply(&next, 8, 1), Outcome::Applied);
        assert_eq!(a.checksum(), b.checksum());
        assert_eq!(a.take_emitted(), b.take_emitted());
        assert_eq!(b.steps.pending_steps, 0);
        assert_eq!(b.steps.check(2, 7), StepCheck::Fenced);
        assert_eq!(b.steps.items.len(), 1);
        assert_eq!(b.steps.sets["s"], vec![9]);
        // A gap is refused deterministically; a repeat changes nothing.
        assert!(matches!(
            b.apply(&seal_cmd(4, 4, &[], &[]), 9, 1),
            Outcome::Rejected(_)
        ));
        assert_eq!(b.apply(&next, 10, 1), Outcome::Duplicate);
    }

    #[test]
    fn meta_registry_and_seals_survive_a_snapshot() {
        let mut m = ShardState::new(META_GROUP);
        let reg = Command {
            op: Some(Op::RegisterWorker(
                freshet_proto::command::v1::RegisterWorker {
                    name: "w".into(),
                    addr: "127.0.0.1:1".into(),
                },
            )),
            ..Default::default()
        };
        assert_eq!(
            m.apply(&reg, 1, 1),
            Outcome::Meta(MetaOutcome::Registered(1))
        );
        let seal = Command {
            op: Some(Op::Seal(freshet_proto::command::v1::SealCuts {
                cuts: vec![freshet_proto::ps::v1::Cut { inc: 1, step: 4 }],
                proposed_at_ms: 5,
                force: false,
            })),
            ..Default::default()
        };
        assert_eq!(m.apply(&seal, 2, 1), Outcome::Meta(MetaOutcome::Sealed(1)));
        m.meta.model = Some(freshet_proto::ps::v1::ModelConfig {
            dim: 4,
            tower: "residual_tanh".into(),
            clip: 3.0,
            ..Default::default()
        });
        let mut r = ShardState::decode(&m.encode()).unwrap();
        r.shard = META_GROUP;
        assert_eq!(r.checksum(), m.checksum());
        assert_eq!(
            r.meta.model, m.meta.model,
            "the model spec travels in snapshots"
        );
        assert_eq!(r.meta.last_sealed, 1);
        assert_eq!(r.meta.worker(1).unwrap().addr, "127.0.0.1:1");
        // The next incarnation and epoch continue from the snapshot.
        assert_eq!(
            r.apply(&reg, 3, 1),
            Outcome::Meta(MetaOutcome::Registered(2))
        );
        assert_eq!(r.apply(&seal, 4, 1), Outcome::Meta(MetaOutcome::Unchanged));
    }

    #[test]
    fn snapshot_round_trip_preserves_checksum_and_sessions() {
        let mut s = ShardState::new(3);
        create(
            &mut s,
            spec(
                "t",
                4,
                optimizer_config::Kind::Adam(AdamConfig {
                    lr: 0.01,
                    beta1: 0.9,
                    beta2: 0.99,
                    eps: 1e-8,
                }),
            ),
        );
        let mut dense = spec("d", 5, optimizer_config::Kind::Sgd(SgdConfig { lr: 0.1 }));
        dense.kind = TableKind::Dense as i32;
        create(&mut s, dense);
        for seq in 1..50u64 {
            let ids: Vec<u64> = (0..10).map(|i| (seq * 31 + i * 7) % 97).collect();
            let grads: Vec<f32> = (0..40).map(|k| ((seq + k) % 5) as f32 - 2.0).collect();
            s.apply(&push(11, seq, "t", ids, grads), seq + 1, 2);
        }
        let dense_push = Command {
            client_id: 12,
            seq: 2,
            op: Some(Op::PushDense(DensePush {
                name: "d".into(),
                grads: vec![1.0; 5],
            })),
            ..Default::default()
        };
        assert_eq!(s.apply(&dense_push, 60, 2), Outcome::Applied);
        let bytes = s.encode();
        let r = ShardState::decode(&bytes).unwrap();
        assert_eq!(r.checksum(), s.checksum());
        assert_eq!(r.applied_index, 60);
        assert_eq!(r.session(12).unwrap().above.len(), 1);
        let mut corrupt = bytes.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 1;
        assert!(ShardState::decode(&corrupt).is_err());
        assert!(ShardState::decode(&bytes[..10]).is_err());
    }
}
