//! Epoch bookkeeping of the frontier-cut protocol (README, "The consistency protocol").
//!
//! Two halves, both replicated state and both deterministic:
//! - [`MetaState`] lives in the meta group: the worker registry (incarnations, their
//!   committed cuts, fences) and the committed seals. The epoch number of a seal is
//!   assigned here, on apply, so no proposer ever picks one and a new coordinator simply
//!   continues from the log.
//! - [`StepState`] lives in every data shard: per incarnation the sealed `floor` and the
//!   buffered (`pending`) steps above it. A seal applies exactly the pending steps within
//!   its cuts, in (inc, step) order, so replaying the logged steps chosen by the
//!   committed cuts reproduces every replica bit for bit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use freshet_proto::command::v1::{EpochSnapshot, PendingInc, StepPush, WorkerRecord};
use freshet_proto::ps::v1::{CandidateSet, Cut, ImpressionRetention, Item, ModelConfig, Seal};
use freshet_proto::FieldError;

/// Seals the meta group keeps for shards and subscribers that are behind; older ones are
/// folded into cumulative base cuts (a shard further behind catches up in one record).
pub const SEALS_KEPT: usize = 65_536;
/// Registered, unfenced workers at one time.
pub const WORKERS_MAX: usize = 10_000;
/// Fenced incarnations remembered (to reject zombies); the oldest are forgotten beyond it.
pub const FENCED_KEPT: usize = 10_000;
/// Buffered steps per shard; beyond it pushes get RESOURCE_EXHAUSTED until seals drain.
pub const PENDING_STEPS_MAX: usize = 65_536;
/// Buffered gradient bytes per shard.
pub const PENDING_BYTES_MAX: usize = 512 << 20;
/// Seals one ShardSeal entry carries.
pub const SHARD_SEAL_BATCH: usize = 256;
/// Catalog items per shard.
pub const ITEMS_PER_SHARD_MAX: usize = 1_000_000;
/// Catalog upserts waiting for the next seal, per shard.
pub const PENDING_ITEMS_MAX: usize = 100_000;
/// Candidate sets per shard.
pub const SETS_PER_SHARD_MAX: usize = 10_000;

pub use freshet_model::config::{check_loss_weights, LOSS_WEIGHT_MAX};

/// Checks a change of the cluster's model spec from `cur` to `new` (SetModel): the loss
/// weights and the tables' optimizer hyper-parameters may change. The shapes, the tables'
/// layouts and their optimizer kinds are fixed at bootstrap because every stored row has
/// the table's dim and its optimizer's slots. The revision is checked separately (it
/// decides between racing changes).
pub fn check_model_update(cur: &ModelConfig, new: &ModelConfig) -> Result<(), FieldError> {
    let fixed = "fixed at bootstrap (the shards' tables have this shape); only the loss \
                 weights (policy_weight, clip, entropy, value_weight, reward_weight, \
                 choice_weight) and the \
                 tables' optimizer hyper-parameters change on a running cluster";
    if new.dim != cur.dim {
        return Err(FieldError::new(
            "model.dim",
            format!("{fixed}; the cluster's is {}", cur.dim),
        ));
    }
    if new.tower != cur.tower {
        return Err(FieldError::new(
            "model.tower",
            format!("{fixed}; the cluster's is {:?}", cur.tower),
        ));
    }
    if new.numeric_max != cur.numeric_max {
        return Err(FieldError::new(
            "model.numeric_max",
            format!("{fixed}; the cluster's is {}", cur.numeric_max),
        ));
    }
    if new.tables.len() != cur.tables.len() {
        return Err(FieldError::new(
            "model.tables",
            format!(
                "{fixed}: the cluster has {} tables; send them as GetModel returned them",
                cur.tables.len()
            ),
        ));
    }
    for (i, (c, n)) in cur.tables.iter().zip(&new.tables).enumerate() {
        super::optimizer::check_optimizer_update(c, n)
            .map_err(|e| e.in_field(&format!("model.tables[{i}]")))?;
    }
    check_loss_weights(new)
}

/// Users one ForgetUsers command may name.
pub const FORGET_PER_SEAL_MAX: usize = 1000;
/// Forgotten users the cumulative base record keeps (beyond it, a shard that falls behind
/// the retained seals by that many forgets misses the oldest; it is restored from a
/// snapshot long before that in practice).
pub const BASE_FORGET_MAX: usize = 100_000;

/// Meta-group half: registry and seals.
#[derive(Debug, Clone, Default)]
pub struct MetaState {
    /// Next incarnation to hand out (incarnations start at 1).
    pub next_inc: u64,
    pub workers: BTreeMap<u64, WorkerRecord>,
    pub seals: VecDeque<Seal>,
    pub base_epoch: u64,
    pub base_cuts: BTreeMap<u64, u64>,
    pub base_fenced: BTreeSet<u64>,
    /// Users forgotten by seals folded into the base record, oldest first (at most
    /// [`BASE_FORGET_MAX`]): a shard that catches up past the window still forgets them.
    pub base_forget: VecDeque<u64>,
    /// The latest retention change folded into the base record.
    pub base_retention: Option<ImpressionRetention>,
    pub last_sealed: u64,
    /// The cluster's model spec (from the bootstrap snapshot; loss weights and rates by
    /// SetModel).
    pub model: Option<ModelConfig>,
}

/// What a meta command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOutcome {
    Registered(u64),
    /// A new epoch was committed.
    Sealed(u64),
    /// Nothing moved (every cut was stale or named a fenced/unknown incarnation).
    Unchanged,
    Refused(String),
    /// The model spec was changed; its new revision.
    ModelSet(u64),
    /// SetModel named another revision than the current one (which this carries).
    ModelConflict(u64),
}

impl MetaState {
    pub fn live_workers(&self) -> usize {
        self.workers.values().filter(|w| !w.fenced).count()
    }

    /// Applies a committed SetModel. Checked again here, against the state it applies to
    /// (the coordinator checked it against the state it proposed on): every replica
    /// decides the same.
    pub fn set_model(&mut self, new: &ModelConfig) -> MetaOutcome {
        let Some(cur) = &self.model else {
            return MetaOutcome::Refused("the cluster holds no model spec".into());
        };
        if new.revision != cur.revision {
            return MetaOutcome::ModelConflict(cur.revision);
        }
        if let Err(e) = check_model_update(cur, new) {
            return MetaOutcome::Refused(e.to_string());
        }
        let mut m = new.clone();
        // A table whose new spec names no row limits keeps its own (as the shards do).
        // Limits marked `off` are kept as they are: the spec is what the shards are handed
        // again after every change, and `off` (not an absent value, which keeps) is what
        // turns a shard's limits off.
        for (t, c) in m.tables.iter_mut().zip(&cur.tables) {
            if t.limits.is_none() {
                t.limits = c.limits;
            }
        }
        m.revision = cur.revision + 1;
        let rev = m.revision;
        self.model = Some(m);
        MetaOutcome::ModelSet(rev)
    }

    pub fn register(&mut self, name: &str, addr: &str, index: u64) -> MetaOutcome {
        if self.live_workers() >= WORKERS_MAX {
            return MetaOutcome::Refused(format!("{WORKERS_MAX} workers are registered"));
        }
        let inc = self.next_inc.max(1);
        self.next_inc = inc + 1;
        self.workers.insert(
            inc,
            WorkerRecord {
                inc,
                name: name.chars().take(256).collect(),
                cut: 0,
                fenced: false,
                registered_index: index,
                addr: addr.chars().take(256).collect(),
            },
        );
        MetaOutcome::Registered(inc)
    }

    /// Commits the cuts that move forward; the epoch is `last_sealed + 1`. With `force`
    /// an epoch is committed even when nothing moved.
    pub fn seal(&mut self, cuts: &[Cut], proposed_at_ms: u64, force: bool) -> MetaOutcome {
        let mut moved: BTreeMap<u64, u64> = BTreeMap::new();
        for c in cuts {
            if let Some(w) = self.workers.get(&c.inc) {
                if !w.fenced && c.step > w.cut {
                    let e = moved.entry(c.inc).or_insert(0);
                    *e = (*e).max(c.step);
                }
            }
        }
        if moved.is_empty() && !force {
            return MetaOutcome::Unchanged;
        }
        for (inc, step) in &moved {
            self.workers.get_mut(inc).expect("checked above").cut = *step;
        }
        let cuts = moved
            .into_iter()
            .map(|(inc, step)| Cut { inc, step })
            .collect();
        MetaOutcome::Sealed(self.push_seal(cuts, Vec::new(), proposed_at_ms))
    }

    /// Forgets users: an epoch of its own whose seal tells every shard to remove their
    /// rows and impressions. Always a new epoch (a retried forget is a harmless repeat).
    pub fn forget(&mut self, users: &[u64], proposed_at_ms: u64) -> MetaOutcome {
        if users.is_empty() || users.len() > FORGET_PER_SEAL_MAX {
            return MetaOutcome::Refused(format!(
                "user_hashes: 1..={FORGET_PER_SEAL_MAX} per call"
            ));
        }
        let mut users = users.to_vec();
        users.sort_unstable();
        users.dedup();
        let epoch = self.push_seal(Vec::new(), Vec::new(), proposed_at_ms);
        self.seals.back_mut().expect("just pushed").forget = users;
        MetaOutcome::Sealed(epoch)
    }

    /// A new impression retention for every data shard: an epoch of its own whose seal
    /// carries it (each shard takes it before that seal's expiry). Checked here too, so
    /// every replica refuses the same values.
    pub fn set_retention(&mut self, r: &ImpressionRetention, proposed_at_ms: u64) -> MetaOutcome {
        if let Err(e) = super::impressions::Retention::from_proto(r) {
            return MetaOutcome::Refused(e.in_field("retention").to_string());
        }
        let epoch = self.push_seal(Vec::new(), Vec::new(), proposed_at_ms);
        self.seals.back_mut().expect("just pushed").retention = Some(*r);
        MetaOutcome::Sealed(epoch)
    }

    /// Freezes an incarnation at its committed cut (presumed abort). The fence is an epoch
    /// of its own so shards drop the incarnation's buffered steps promptly.
    pub fn fence(&mut self, inc: u64, proposed_at_ms: u64) -> MetaOutcome {
        match self.workers.get_mut(&inc) {
            Some(w) if !w.fenced => w.fenced = true,
            _ => return MetaOutcome::Unchanged,
        }
        let epoch = self.push_seal(Vec::new(), vec![inc], proposed_at_ms);
        // Forget the oldest fenced incarnations beyond the bound.
        let fenced: Vec<u64> = self
            .workers
            .values()
            .filter(|w| w.fenced)
            .map(|w| w.inc)
            .collect();
        if fenced.len() > FENCED_KEPT {
            for inc in &fenced[..fenced.len() - FENCED_KEPT] {
                self.workers.remove(inc);
            }
        }
        MetaOutcome::Sealed(epoch)
    }

    fn push_seal(&mut self, cuts: Vec<Cut>, fenced: Vec<u64>, proposed_at_ms: u64) -> u64 {
        let epoch = self.last_sealed + 1;
        self.last_sealed = epoch;
        self.seals.push_back(Seal {
            first_epoch: epoch,
            epoch,
            cuts,
            fenced,
            proposed_at_ms,
            ..Default::default()
        });
        while self.seals.len() > SEALS_KEPT {
            let old = self.seals.pop_front().expect("non-empty");
            self.base_epoch = old.epoch;
            for c in old.cuts {
                self.base_cuts.insert(c.inc, c.step);
            }
            for f in old.fenced {
                self.base_fenced.insert(f);
            }
            self.base_forget.extend(old.forget);
            if old.retention.is_some() {
                self.base_retention = old.retention;
            }
            while self.base_forget.len() > BASE_FORGET_MAX {
                self.base_forget.pop_front();
            }
        }
        epoch
    }

    /// Seals after epoch `after`, at most `max` records. A caller behind the retained
    /// window first gets one cumulative record covering `after+1 ..= base_epoch`.
    pub fn seals_after(&self, after: u64, max: usize) -> Vec<Seal> {
        let mut out = Vec::new();
        if after >= self.last_sealed || max == 0 {
            return out;
        }
        if after < self.base_epoch {
            out.push(Seal {
                first_epoch: after + 1,
                epoch: self.base_epoch,
                cuts: self
                    .base_cuts
                    .iter()
                    .map(|(&inc, &step)| Cut { inc, step })
                    .collect(),
                fenced: self.base_fenced.iter().copied().collect(),
                proposed_at_ms: 0,
                forget: self.base_forget.iter().copied().collect(),
                retention: self.base_retention,
            });
        }
        let from = after.max(self.base_epoch) - self.base_epoch;
        out.extend(
            self.seals
                .iter()
                .skip(from as usize)
                .take(max - out.len())
                .cloned(),
        );
        out
    }

    /// The committed cut of `inc`, and whether it is fenced; None when unknown.
    pub fn worker(&self, inc: u64) -> Option<&WorkerRecord> {
        self.workers.get(&inc)
    }
}

/// Parts one step may have on one shard (each at most the node's rows per call).
pub const STEP_PARTS_MAX: u32 = 4096;

/// One incarnation's steps on one shard.
#[derive(Debug, Clone, Default)]
pub struct IncSteps {
    /// Every step <= floor is sealed (applied or never sent to this shard).
    pub floor: u64,
    pub fenced: bool,
    /// Buffered parts by (step, part).
    pub pending: BTreeMap<(u64, u32), StepPush>,
}

/// Data-shard half: buffered steps and the sealed epoch.
#[derive(Debug, Clone, Default)]
pub struct StepState {
    pub incs: BTreeMap<u64, IncSteps>,
    pub pending_steps: usize,
    pub pending_bytes: usize,
    pub last_sealed: u64,
    /// This shard's part of the catalog, and upserts applied at the next seal.
    pub items: BTreeMap<u64, Item>,
    pub pending_items: Vec<Item>,
    /// Named candidate sets held by this shard (dense_shard(name)).
    pub sets: BTreeMap<String, Vec<u64>>,
    pub pending_sets: Vec<CandidateSet>,
}

/// Bytes a buffered step holds (ids and floats), for the memory bound.
pub fn step_bytes(p: &StepPush) -> usize {
    p.sparse
        .iter()
        .map(|s| s.ids.len() * 8 + s.grads.len() * 4 + s.table.len())
        .sum::<usize>()
        + p.dense
            .iter()
            .map(|d| d.grads.len() * 4 + d.name.len())
            .sum::<usize>()
}

/// Whether a step is already known to a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepCheck {
    New,
    Duplicate,
    Fenced,
}

impl StepState {
    /// Whether part `part` of (`inc`, `step`) is new here.
    pub fn check(&self, inc: u64, step: u64, part: u32) -> StepCheck {
        match self.incs.get(&inc) {
            Some(s) if s.fenced => StepCheck::Fenced,
            Some(s) if step <= s.floor || s.pending.contains_key(&(step, part)) => {
                StepCheck::Duplicate
            }
            _ => StepCheck::New,
        }
    }

    ///
    /// # Panics
    /// When `inc` is fenced or the step is at or below its floor (the caller checked
    /// [`StepState::check`]): a fenced incarnation's step is never applied.
    pub fn buffer(&mut self, p: StepPush) {
        if let Some(s) = self.incs.get(&p.inc) {
            assert!(
                !s.fenced,
                "buffering a step of fenced incarnation {}",
                p.inc
            );
            assert!(
                p.step > s.floor,
                "buffering sealed step {} of {}",
                p.step,
                p.inc
            );
        }
        self.pending_steps += 1;
        self.pending_bytes += step_bytes(&p);
        self.incs
            .entry(p.inc)
            .or_default()
            .pending
            .insert((p.step, p.part), p);
    }

    /// Removes and returns the pending steps of `inc` within `cut`, in step order, and
    /// raises its floor. Nothing for a fenced incarnation.
    pub fn take_within(&mut self, inc: u64, cut: u64) -> Vec<StepPush> {
        let e = self.incs.entry(inc).or_default();
        if e.fenced {
            return Vec::new();
        }
        // A cut of u64::MAX (a frontier reported by anyone, unchecked) must not overflow
        // in apply: that would stop every replica at the same entry, for good.
        let above = match cut.checked_add(1) {
            Some(next) => e.pending.split_off(&(next, 0)),
            None => BTreeMap::new(),
        };
        let within = std::mem::replace(&mut e.pending, above);
        // Floors only grow; what stays buffered is above the floor.
        let before = e.floor;
        e.floor = e.floor.max(cut);
        assert!(e.floor >= before);
        assert!(e.pending.keys().next().is_none_or(|(s, _)| *s > e.floor));
        let out: Vec<StepPush> = within.into_values().collect();
        for p in &out {
            self.unbuffer(p);
        }
        out
    }

    /// Counts a buffered step out.
    fn unbuffer(&mut self, p: &StepPush) {
        assert!(
            self.pending_steps > 0 && self.pending_bytes >= step_bytes(p),
            "buffered step counters out of step with the buffered steps"
        );
        self.pending_steps -= 1;
        self.pending_bytes -= step_bytes(p);
    }

    /// Fences `inc`: drops every buffered step above its floor.
    /// Fences `inc`; returns the incarnations forgotten beyond [`FENCED_KEPT`] with their
    /// floors (their events' assignments must settle).
    pub fn fence(&mut self, inc: u64) -> Vec<(u64, u64)> {
        let e = self.incs.entry(inc).or_default();
        e.fenced = true;
        let dropped = std::mem::take(&mut e.pending);
        for p in dropped.values() {
            self.unbuffer(p);
        }
        let fenced: Vec<u64> = self
            .incs
            .iter()
            .filter(|(_, s)| s.fenced)
            .map(|(i, _)| *i)
            .collect();
        let mut forgotten = Vec::new();
        if fenced.len() > FENCED_KEPT {
            for i in &fenced[..fenced.len() - FENCED_KEPT] {
                if let Some(s) = self.incs.remove(i) {
                    forgotten.push((*i, s.floor));
                }
            }
        }
        forgotten
    }
}

/// Both halves in snapshot form.
pub fn encode(meta: &MetaState, steps: &StepState) -> EpochSnapshot {
    EpochSnapshot {
        next_inc: meta.next_inc,
        workers: meta.workers.values().cloned().collect(),
        seals: meta.seals.iter().cloned().collect(),
        base_epoch: meta.base_epoch,
        base_cuts: meta
            .base_cuts
            .iter()
            .map(|(&inc, &step)| Cut { inc, step })
            .collect(),
        base_fenced: meta.base_fenced.iter().copied().collect(),
        base_forget: meta.base_forget.iter().copied().collect(),
        base_retention: meta.base_retention,
        last_sealed: meta.last_sealed.max(steps.last_sealed),
        model: meta.model.clone(),
        incs: steps
            .incs
            .iter()
            .map(|(&inc, s)| PendingInc {
                inc,
                floor: s.floor,
                fenced: s.fenced,
                pending: s.pending.values().cloned().collect(),
            })
            .collect(),
        items: steps.items.values().cloned().collect(),
        pending_items: steps.pending_items.clone(),
        sets: steps
            .sets
            .iter()
            .map(|(name, items)| CandidateSet {
                name: name.clone(),
                items: items.clone(),
            })
            .collect(),
        pending_sets: steps.pending_sets.clone(),
        // Impressions: filled by the shard's codec.
        ..Default::default()
    }
}

/// Restores both halves; `is_meta` says which one `last_sealed` belongs to.
pub fn decode(snap: EpochSnapshot, is_meta: bool) -> (MetaState, StepState) {
    let mut meta = MetaState {
        next_inc: snap.next_inc,
        workers: snap.workers.into_iter().map(|w| (w.inc, w)).collect(),
        seals: snap.seals.into(),
        base_epoch: snap.base_epoch,
        base_cuts: snap.base_cuts.iter().map(|c| (c.inc, c.step)).collect(),
        base_fenced: snap.base_fenced.into_iter().collect(),
        base_forget: snap.base_forget.into(),
        base_retention: snap.base_retention,
        last_sealed: 0,
        model: snap.model,
    };
    let mut steps = StepState {
        items: snap.items.into_iter().map(|i| (i.id, i)).collect(),
        pending_items: snap.pending_items,
        sets: snap.sets.into_iter().map(|s| (s.name, s.items)).collect(),
        pending_sets: snap.pending_sets,
        ..StepState::default()
    };
    for p in snap.incs {
        let mut s = IncSteps {
            floor: p.floor,
            fenced: p.fenced,
            pending: BTreeMap::new(),
        };
        for step in p.pending {
            steps.pending_steps += 1;
            steps.pending_bytes += step_bytes(&step);
            s.pending.insert((step.step, step.part), step);
        }
        steps.incs.insert(p.inc, s);
    }
    if is_meta {
        meta.last_sealed = snap.last_sealed;
    } else {
        steps.last_sealed = snap.last_sealed;
    }
    (meta, steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_proto::ps::v1::{optimizer_config, AdagradConfig, OptimizerConfig, SgdConfig};

    fn cut(inc: u64, step: u64) -> Cut {
        Cut { inc, step }
    }

    #[test]
    fn set_model_is_a_compare_and_set_of_the_loss_weights_and_rates() {
        let mut m = MetaState::default();
        let spec = ModelConfig {
            dim: 8,
            tower: "residual_tanh".into(),
            numeric_max: 8,
            clip: 10.0,
            entropy: 0.01,
            value_weight: 1.0,
            reward_weight: 1.0,
            choice_weight: 0.0,
            tables: vec![freshet_proto::ps::v1::TableSpec {
                name: "item".into(),
                dim: 8,
                optimizer: Some(OptimizerConfig {
                    kind: Some(optimizer_config::Kind::Adagrad(AdagradConfig {
                        lr: 0.1,
                        initial_accumulator: 0.01,
                        eps: 1e-8,
                    })),
                }),
                ..Default::default()
            }],
            revision: 0,
            policy_weight: None,
        };
        assert!(matches!(m.set_model(&spec), MetaOutcome::Refused(_)));
        m.model = Some(spec.clone());
        let mut next = spec.clone();
        next.clip = 5.0;
        assert_eq!(m.set_model(&next), MetaOutcome::ModelSet(1));
        assert_eq!(
            m.model.as_ref().map(|x| (x.revision, x.clip)),
            Some((1, 5.0))
        );
        // The same entry applied again (a replayed log, a retried proposal) is stale.
        assert_eq!(m.set_model(&next), MetaOutcome::ModelConflict(1));
        let mut wider = m.model.clone().unwrap();
        wider.dim = 16;
        assert!(
            matches!(m.set_model(&wider), MetaOutcome::Refused(r) if r.starts_with("model.dim"))
        );
        let mut retabled = m.model.clone().unwrap();
        retabled.tables[0].dim = 16;
        assert!(
            matches!(m.set_model(&retabled), MetaOutcome::Refused(r) if r.starts_with("model.tables[0].dim"))
        );
        // A table's optimizer may change its hyper-parameters, not its kind.
        let mut resgd = m.model.clone().unwrap();
        resgd.tables[0].optimizer = Some(OptimizerConfig {
            kind: Some(optimizer_config::Kind::Sgd(SgdConfig { lr: 0.1 })),
        });
        assert!(
            matches!(m.set_model(&resgd), MetaOutcome::Refused(r) if r.starts_with("model.tables[0].optimizer:"))
        );
        let with_rate = |m: &MetaState, lr: f32| {
            let mut c = m.model.clone().unwrap();
            c.tables[0].optimizer = Some(OptimizerConfig {
                kind: Some(optimizer_config::Kind::Adagrad(AdagradConfig {
                    lr,
                    initial_accumulator: 0.01,
                    eps: 1e-8,
                })),
            });
            c
        };
        let bad_rate = with_rate(&m, -1.0);
        assert!(
            matches!(m.set_model(&bad_rate), MetaOutcome::Refused(r) if r.starts_with("model.tables[0].optimizer.adagrad.lr"))
        );
        let slower = with_rate(&m, 0.05);
        assert_eq!(m.set_model(&slower), MetaOutcome::ModelSet(2));
        next = m.model.clone().unwrap();
        let mut inf = m.model.clone().unwrap();
        inf.reward_weight = f32::INFINITY;
        assert!(
            matches!(m.set_model(&inf), MetaOutcome::Refused(r) if r.starts_with("model.reward_weight"))
        );
        let mut negative_choice = m.model.clone().unwrap();
        negative_choice.choice_weight = -1.0;
        assert!(
            matches!(m.set_model(&negative_choice), MetaOutcome::Refused(r) if r.starts_with("model.choice_weight"))
        );
        // A record from before the actor's weight existed reads as weight 1; a negative
        // one is refused.
        let mut negative = m.model.clone().unwrap();
        negative.policy_weight = Some(-0.5);
        assert!(
            matches!(m.set_model(&negative), MetaOutcome::Refused(r) if r.starts_with("model.policy_weight"))
        );
        assert_eq!(
            m.model.as_ref().map(|x| (x.revision, x.clip)),
            Some((2, 5.0))
        );
        assert_eq!(
            m.model.as_ref(),
            Some(&ModelConfig {
                revision: 2,
                ..next
            })
        );
        // The revision travels in snapshots.
        let (back, _) = decode(encode(&m, &StepState::default()), true);
        assert_eq!(back.model, m.model);
    }

    #[test]
    fn epochs_are_assigned_on_apply_and_stale_cuts_are_dropped() {
        let mut m = MetaState::default();
        assert_eq!(m.register("a", "", 1), MetaOutcome::Registered(1));
        assert_eq!(m.register("b", "", 2), MetaOutcome::Registered(2));
        assert_eq!(m.seal(&[cut(1, 3)], 0, false), MetaOutcome::Sealed(1));
        // A duplicate proposal (retried by a new coordinator) moves nothing: no epoch.
        assert_eq!(m.seal(&[cut(1, 3)], 0, false), MetaOutcome::Unchanged);
        assert_eq!(
            m.seal(&[cut(1, 2), cut(2, 1)], 0, false),
            MetaOutcome::Sealed(2)
        );
        assert_eq!(m.seals[1].cuts, vec![cut(2, 1)]);
        // Unknown incarnations are ignored.
        assert_eq!(m.seal(&[cut(9, 1)], 0, false), MetaOutcome::Unchanged);
        // Forced (catalog upserts waiting): an epoch without cuts.
        assert_eq!(m.seal(&[], 0, true), MetaOutcome::Sealed(3));
        assert!(m.seals[2].cuts.is_empty());
        assert_eq!(m.fence(2, 0), MetaOutcome::Sealed(4));
        assert_eq!(m.fence(2, 0), MetaOutcome::Unchanged);
        // A fenced incarnation's cut is frozen.
        assert_eq!(m.seal(&[cut(2, 5)], 0, false), MetaOutcome::Unchanged);
        assert_eq!(m.worker(2).unwrap().cut, 1);
    }

    #[test]
    fn a_caller_behind_the_window_gets_cumulative_cuts_first() {
        let mut m = MetaState::default();
        m.register("a", "", 1);
        for s in 1..=(SEALS_KEPT as u64 + 10) {
            m.seal(&[cut(1, s)], 0, false);
        }
        assert_eq!(m.base_epoch, 10);
        let got = m.seals_after(3, 3);
        assert_eq!((got[0].first_epoch, got[0].epoch), (4, 10));
        assert_eq!(got[0].cuts, vec![cut(1, 10)]);
        assert_eq!(got[1].epoch, 11);
        assert_eq!(got[2].epoch, 12);
        let got = m.seals_after(20, 2);
        assert_eq!(
            got.iter().map(|s| s.epoch).collect::<Vec<_>>(),
            vec![21, 22]
        );
        assert!(m.seals_after(m.last_sealed, 5).is_empty());
    }

    #[test]
    fn steps_within_a_cut_come_out_in_order_and_fences_drop_the_rest() {
        let mut s = StepState::default();
        for step in [3, 1, 2, 5] {
            s.buffer(StepPush {
                inc: 7,
                step,
                ..Default::default()
            });
        }
        assert_eq!(s.check(7, 2, 0), StepCheck::Duplicate);
        assert_eq!(s.check(7, 4, 0), StepCheck::New);
        let got: Vec<u64> = s.take_within(7, 3).iter().map(|p| p.step).collect();
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(s.check(7, 1, 0), StepCheck::Duplicate);
        assert_eq!(s.pending_steps, 1);
        s.fence(7);
        assert_eq!(s.pending_steps, 0);
        assert_eq!(s.check(7, 9, 0), StepCheck::Fenced);
    }

    #[test]
    fn a_cut_at_the_largest_step_applies_everything_without_overflow() {
        let mut s = StepState::default();
        s.buffer(StepPush {
            inc: 7,
            step: 3,
            ..Default::default()
        });
        let got = s.take_within(7, u64::MAX);
        assert_eq!(got.len(), 1);
        assert_eq!(s.pending_steps, 0);
        assert_eq!(s.check(7, u64::MAX, 0), StepCheck::Duplicate);
    }

    #[test]
    fn parts_of_a_step_are_deduplicated_one_by_one_and_sealed_in_order() {
        let mut s = StepState::default();
        for (step, part) in [(4, 1), (4, 0), (5, 0), (4, 2)] {
            assert_eq!(s.check(7, step, part), StepCheck::New);
            s.buffer(StepPush {
                inc: 7,
                step,
                part,
                ..Default::default()
            });
        }
        assert_eq!(s.check(7, 4, 1), StepCheck::Duplicate);
        assert_eq!(s.check(7, 4, 3), StepCheck::New);
        assert_eq!(s.pending_steps, 4);
        let got: Vec<(u64, u32)> = s
            .take_within(7, 4)
            .iter()
            .map(|p| (p.step, p.part))
            .collect();
        assert_eq!(got, vec![(4, 0), (4, 1), (4, 2)]);
        // Sealed: every part of step 4 is now a duplicate; step 5 still waits.
        assert_eq!(s.check(7, 4, 3), StepCheck::Duplicate);
        assert_eq!(s.check(7, 5, 0), StepCheck::Duplicate);
        assert_eq!(s.check(7, 5, 1), StepCheck::New);
    }
}
