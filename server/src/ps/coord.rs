//! The coordinator: runs on whichever node leads the meta group.
//!
//! It holds only soft state (lease deadlines, reported frontiers, what it proposed);
//! everything that matters is in the meta log. On taking over, a new coordinator gives
//! every live worker a full lease from now and proposes nothing until an entry of its
//! own term is applied (its view of the registry and cuts is then complete), so a leader
//! change never fences a worker early, seals an epoch twice or skips one: epoch numbers
//! are assigned on apply.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use freshet_proto::command::v1::{
    command::Op, Command, FenceWorker, ForgetUsers, RegisterWorker, SealCuts, SetRetention,
};
use freshet_proto::coord::v1::{
    coordinator_server::Coordinator, ForgetUserRequest, ForgetUserResponse, GetModelRequest,
    GetModelResponse, ListWorkersRequest, ListWorkersResponse, RegisterRequest, RegisterResponse,
    ReportFrontierRequest, ReportFrontierResponse, RequestSealRequest, RequestSealResponse,
    SetImpressionRetentionRequest, SetImpressionRetentionResponse, SetModelRequest,
    SetModelResponse, WorkerInfo,
};
use freshet_proto::ps::v1::Cut;
use freshet_proto::META_GROUP;
use parking_lot::Mutex;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::error::PsError;
use crate::fsm::epoch::{self, MetaOutcome};
use crate::fsm::Outcome;
use crate::ps::node::Node;

/// Seal proposals in flight at once (seals pipeline through the meta log).
const SEALS_IN_FLIGHT_MAX: usize = 8;
/// Cuts one seal carries.
const CUTS_PER_SEAL_MAX: usize = 4096;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Default)]
struct Soft {
    /// Meta term this coordinator leads in (0: not leading).
    term: u64,
    ready: bool,
    leases: HashMap<u64, Instant>,
    frontiers: HashMap<u64, u64>,
    /// Highest cut proposed per incarnation and not yet known to have failed.
    proposed: HashMap<u64, u64>,
    fencing: HashSet<u64>,
    seals_in_flight: usize,
    /// An epoch is wanted at the next tick even if no frontier moved.
    seal_requested: bool,
    /// When this coordinator last proposed a seal (or took over).
    last_seal: Option<Instant>,
}

/// One per node; active while the node leads the meta group.
pub struct Coord {
    node: Weak<Node>,
    lease: Duration,
    interval: Duration,
    /// Propose an empty seal when this coordinator proposed none for this long (`None`:
    /// only training, catalog and retention changes, forgets, fences and requests seal).
    idle_seal: Option<Duration>,
    soft: Mutex<Soft>,
    /// SetModel calls run one at a time on this node, from the read of the spec to the
    /// end of its hand-over to the shards, so two changes' rates cannot reach a shard in
    /// the opposite order of their revisions.
    model_changes: tokio::sync::Mutex<()>,
}

impl Coord {
    pub fn new(node: &Arc<Node>) -> Arc<Self> {
        Arc::new(Coord {
            node: Arc::downgrade(node),
            lease: Duration::from_millis(node.cfg.lease_ms),
            interval: Duration::from_millis(node.cfg.seal_interval_ms),
            idle_seal: (node.cfg.idle_seal_ms > 0)
                .then(|| Duration::from_millis(node.cfg.idle_seal_ms)),
            soft: Mutex::new(Soft::default()),
            model_changes: tokio::sync::Mutex::new(()),
        })
    }

    /// The coordinator loop: every `seal_interval_ms`, fence expired leases and seal the
    /// frontiers that moved. Stops when `shutdown` flips.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let Some(node) = self.node.upgrade() else {
                break;
            };
            self.step(&node);
        }
    }

    /// Refreshes leadership; returns whether this node may act as coordinator now.
    fn refresh(&self, node: &Node, soft: &mut Soft) -> bool {
        let Some(g) = node.group(META_GROUP) else {
            *soft = Soft::default();
            return false;
        };
        let (role, term) = {
            let s = g.status.lock();
            (s.role, s.term)
        };
        if role != "leader" {
            if soft.term != 0 {
                tracing::info!(node = node.id, "coordinator stepping down");
            }
            *soft = Soft::default();
            return false;
        }
        let st = g.state.read();
        if soft.term != term {
            *soft = Soft {
                term,
                ..Soft::default()
            };
            tracing::info!(node = node.id, term, "coordinator taking over");
        }
        if !soft.ready {
            if st.applied_term != term {
                return false;
            }
            // Every live worker gets a full lease from now: a new coordinator never fences
            // early on deadlines it could not see.
            let until = Instant::now() + self.lease;
            soft.leases = st
                .meta
                .workers
                .values()
                .filter(|w| !w.fenced)
                .map(|w| (w.inc, until))
                .collect();
            soft.ready = true;
        }
        true
    }

    fn step(self: &Arc<Self>, node: &Arc<Node>) {
        let mut soft = self.soft.lock();
        if !self.refresh(node, &mut soft) {
            return;
        }
        let Some(meta) = node.meta_state() else {
            return;
        };
        let now = Instant::now();
        let mut to_fence = Vec::new();
        let mut cuts = Vec::new();
        {
            let st = meta.read();
            for (&inc, &deadline) in &soft.leases {
                if deadline <= now && !soft.fencing.contains(&inc) {
                    to_fence.push(inc);
                }
            }
            if soft.seals_in_flight < SEALS_IN_FLIGHT_MAX {
                let mut gone = Vec::new();
                for (&inc, &f) in &soft.frontiers {
                    match st.meta.worker(inc) {
                        Some(w) if !w.fenced => {
                            let base = w.cut.max(*soft.proposed.get(&inc).unwrap_or(&0));
                            if f > base && cuts.len() < CUTS_PER_SEAL_MAX {
                                cuts.push(Cut { inc, step: f });
                            }
                        }
                        _ => gone.push(inc),
                    }
                }
                for inc in gone {
                    soft.frontiers.remove(&inc);
                    soft.proposed.remove(&inc);
                }
            }
        }
        for inc in to_fence {
            soft.fencing.insert(inc);
            tracing::info!(inc, "lease expired: fencing worker");
            let this = Arc::clone(self);
            let node = Arc::clone(node);
            tokio::spawn(async move {
                let cmd = Command {
                    op: Some(Op::Fence(FenceWorker { inc })),
                    ..Default::default()
                };
                let r = node.propose(META_GROUP, cmd, this.lease).await;
                let mut soft = this.soft.lock();
                soft.fencing.remove(&inc);
                if r.is_ok() {
                    soft.leases.remove(&inc);
                    soft.frontiers.remove(&inc);
                    soft.proposed.remove(&inc);
                }
            });
        }
        fail::fail_point!(
            crate::failpoints::BEFORE_SEAL,
            crate::failpoints::in_scope(&node.cfg.data_dir),
            |_| ()
        );
        // Everything a seal decides by sealed time (row expiry, impression retention,
        // publishing direct pushes to the gateways) waits for the next seal, so a
        // cluster whose training is idle still seals every `idle_seal` (counted from
        // this coordinator's own seal proposals; a fence or forget in between only
        // makes one extra epoch). The time is the
        // proposal's, carried in the entry: replicas never read their own clocks.
        let last = *soft.last_seal.get_or_insert(now);
        // Only when no seal is in flight: a meta group without quorum then holds one idle
        // proposal at a time, not one per interval.
        let idle = soft.seals_in_flight == 0
            && self
                .idle_seal
                .is_some_and(|every| now.duration_since(last) >= every);
        let force = std::mem::take(&mut soft.seal_requested) || idle;
        if cuts.is_empty() && !force {
            return;
        }
        soft.last_seal = Some(now);
        cuts.sort_by_key(|c| c.inc);
        for c in &cuts {
            soft.proposed.insert(c.inc, c.step);
        }
        soft.seals_in_flight += 1;
        let term = soft.term;
        drop(soft);
        let this = Arc::clone(self);
        let node = Arc::clone(node);
        tokio::spawn(async move {
            let cmd = Command {
                op: Some(Op::Seal(SealCuts {
                    cuts: cuts.clone(),
                    proposed_at_ms: now_ms(),
                    force,
                })),
                ..Default::default()
            };
            let r = node.propose(META_GROUP, cmd, this.lease).await;
            let mut soft = this.soft.lock();
            if soft.term != term {
                return;
            }
            soft.seals_in_flight = soft.seals_in_flight.saturating_sub(1);
            if let Err(e) = r {
                // Outcome unknown: forget what was proposed so the next tick proposes the
                // cuts again (a duplicate moves nothing: cuts only go forward on apply).
                tracing::debug!(error = %e, "seal proposal failed");
                for c in cuts {
                    if soft.proposed.get(&c.inc) == Some(&c.step) {
                        soft.proposed.remove(&c.inc);
                    }
                }
            }
        });
    }

    /// Renews `inc`'s lease and records its frontier.
    ///
    /// # Errors
    /// NotLeader (with hint) off the meta leader, UNAVAILABLE while taking over,
    /// FAILED_PRECONDITION for a fenced or unknown incarnation.
    pub fn report(&self, inc: u64, frontier: u64) -> Result<ReportFrontierResponse, PsError> {
        let node = self.node.upgrade().ok_or(PsError::ShuttingDown)?;
        let mut soft = self.soft.lock();
        if !self.refresh(&node, &mut soft) {
            let g = node
                .group(META_GROUP)
                .ok_or(PsError::ShardNotHere(META_GROUP))?;
            let (role, leader) = {
                let s = g.status.lock();
                (s.role, s.leader_id)
            };
            if role == "leader" {
                return Err(PsError::Unavailable("coordinator is taking over".into()));
            }
            return Err(node.not_leader(META_GROUP, leader));
        }
        let meta = node.meta_state().ok_or(PsError::ShardNotHere(META_GROUP))?;
        let st = meta.read();
        let w = match st.meta.worker(inc) {
            Some(w) if w.fenced => {
                return Err(PsError::FailedPrecondition(format!(
                    "incarnation {inc} is fenced (its lease expired); register again"
                )))
            }
            Some(w) => w,
            None => {
                return Err(PsError::FailedPrecondition(format!(
                    "incarnation {inc} is unknown; register first"
                )))
            }
        };
        if soft.fencing.contains(&inc) {
            return Err(PsError::FailedPrecondition(format!(
                "incarnation {inc} is being fenced (its lease expired); register again"
            )));
        }
        soft.leases.insert(inc, Instant::now() + self.lease);
        let f = soft.frontiers.entry(inc).or_insert(0);
        *f = (*f).max(frontier);
        Ok(ReportFrontierResponse {
            sealed_cut: w.cut,
            last_sealed_epoch: st.meta.last_sealed,
            lease_ms: self.lease.as_millis() as u64,
            model_revision: st.meta.model.as_ref().map_or(0, |m| m.revision),
        })
    }

    /// Asks for an epoch at the next tick.
    ///
    /// # Errors
    /// NotLeader (with hint) off the meta leader.
    pub fn request_seal(&self) -> Result<(), PsError> {
        let node = self.node.upgrade().ok_or(PsError::ShuttingDown)?;
        let mut soft = self.soft.lock();
        if !self.refresh(&node, &mut soft) {
            let leader = node
                .group(META_GROUP)
                .map_or(0, |g| g.status.lock().leader_id);
            return Err(node.not_leader(META_GROUP, leader));
        }
        soft.seal_requested = true;
        Ok(())
    }

    fn registered(&self, inc: u64) {
        let mut soft = self.soft.lock();
        if soft.ready {
            soft.leases.insert(inc, Instant::now() + self.lease);
        }
    }
}

/// `freshet.coord.v1.Coordinator`.
pub struct CoordService {
    pub node: Arc<Node>,
    pub coord: Arc<Coord>,
}

impl CoordService {
    /// Hands a committed model spec's optimizer hyper-parameters to every shard's tables
    /// (UpdateTable through each shard's log, all in parallel; a table already at these
    /// values is left alone). The meta entry committed first, so a failure here leaves the
    /// spec ahead of some shards: the answer says so, and SetModel again with the new
    /// revision and the same values (which commits nothing) finishes the job.
    async fn apply_rates(
        &self,
        m: &freshet_proto::ps::v1::ModelConfig,
        revision: u64,
        timeout: Duration,
    ) -> Result<(), PsError> {
        let calls = m.tables.iter().flat_map(|t| {
            (0..self.node.shard_count).map(move |shard| async move {
                crate::ps::service::table_on_shard(&self.node, shard, t, true, timeout)
                    .await
                    .map_err(|e| (t.name.clone(), shard, e))
            })
        });
        let mut changed = 0usize;
        for r in futures::future::join_all(calls).await {
            match r {
                Ok(c) => changed += usize::from(c),
                Err((table, shard, e)) => {
                    return Err(PsError::Unavailable(format!(
                        "model revision {revision} is committed but table {table:?} on shard \
                         {shard} did not take its optimizer yet ({e}); send SetModel again \
                         with revision {revision} and the same values to finish"
                    )))
                }
            }
        }
        if changed > 0 {
            tracing::info!(revision, changed, "table optimizers updated");
        }
        Ok(())
    }
}

/// A SetModel whose compare-and-set revision is not the cluster's.
fn stale_revision(sent: u64, current: u64) -> PsError {
    PsError::FailedPrecondition(format!(
        "model.revision: {sent} is not the cluster's current revision {current} (another \
         change landed first); read it again with GetModel"
    ))
}

#[tonic::async_trait]
impl Coordinator for CoordService {
    #[tracing::instrument(skip(self, request))]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = request.into_inner();
        if r.name.len() > 256 {
            return Err(PsError::invalid("name", "at most 256 bytes").into());
        }
        if r.addr.len() > 256 {
            return Err(PsError::invalid("addr", "at most 256 bytes").into());
        }
        let cmd = Command {
            op: Some(Op::RegisterWorker(RegisterWorker {
                name: r.name,
                addr: r.addr,
            })),
            ..Default::default()
        };
        let timeout = Duration::from_millis(self.node.cfg.rpc_timeout_ms);
        match self.node.propose(META_GROUP, cmd, timeout).await? {
            (Outcome::Meta(MetaOutcome::Registered(inc)), _) => {
                self.coord.registered(inc);
                tracing::info!(inc, "worker registered");
                Ok(Response::new(RegisterResponse {
                    inc,
                    lease_ms: self.node.cfg.lease_ms,
                }))
            }
            (Outcome::Meta(MetaOutcome::Refused(r)), _) => Err(PsError::Overloaded(r).into()),
            (other, _) => Err(PsError::Raft(format!("unexpected outcome {other:?}")).into()),
        }
    }

    async fn report_frontier(
        &self,
        request: Request<ReportFrontierRequest>,
    ) -> Result<Response<ReportFrontierResponse>, Status> {
        let r = request.into_inner();
        if r.inc == 0 {
            return Err(PsError::invalid("inc", "must be non-zero (from Register)").into());
        }
        Ok(Response::new(self.coord.report(r.inc, r.frontier)?))
    }

    async fn list_workers(
        &self,
        _request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let meta = self
            .node
            .meta_state()
            .ok_or(PsError::ShardNotHere(META_GROUP))?;
        let st = meta.read();
        Ok(Response::new(ListWorkersResponse {
            workers: st
                .meta
                .workers
                .values()
                .filter(|w| !w.fenced && !w.addr.is_empty())
                .map(|w| WorkerInfo {
                    inc: w.inc,
                    name: w.name.clone(),
                    addr: w.addr.clone(),
                    sealed_cut: w.cut,
                })
                .collect(),
        }))
    }

    async fn get_model(
        &self,
        _request: Request<GetModelRequest>,
    ) -> Result<Response<GetModelResponse>, Status> {
        let meta = self
            .node
            .meta_state()
            .ok_or(PsError::ShardNotHere(META_GROUP))?;
        // Set in the bootstrap snapshot, so every meta replica holds it from index 0.
        let model = meta.read().meta.model.clone().ok_or_else(|| {
            PsError::NotFound(
                "the model spec (the cluster config had no `model` section at bootstrap)".into(),
            )
        })?;
        Ok(Response::new(GetModelResponse { model: Some(model) }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn set_model(
        &self,
        request: Request<SetModelRequest>,
    ) -> Result<Response<SetModelResponse>, Status> {
        let new = request
            .into_inner()
            .model
            .ok_or_else(|| PsError::invalid("model", "required (edit what GetModel returned)"))?;
        let timeout = Duration::from_millis(self.node.cfg.rpc_timeout_ms);
        let _one_at_a_time = tokio::time::timeout(timeout, self.coord.model_changes.lock())
            .await
            .map_err(|_| {
                PsError::Unavailable("another model change is still in progress; retry".into())
            })?;
        // A linearizable read of the spec (on the meta leader, ReadIndex): "unchanged"
        // below must not be decided on a stale replica, or old rates would go out again.
        self.node.read_barrier(META_GROUP, timeout).await?;
        // Checked here for a precise answer; checked again on apply (the entry may commit
        // after another change).
        let unchanged = {
            let meta = self
                .node
                .meta_state()
                .ok_or(PsError::ShardNotHere(META_GROUP))?;
            let st = meta.read();
            let cur = st.meta.model.as_ref().ok_or_else(|| {
                PsError::NotFound(
                    "the model spec (the cluster config had no `model` section at bootstrap)"
                        .into(),
                )
            })?;
            epoch::check_model_update(cur, &new)?;
            // A stale revision is refused before anything is written (the apply checks
            // again, for a change that lands between this read and the commit).
            if new.revision != cur.revision {
                return Err(stale_revision(new.revision, cur.revision).into());
            }
            *cur == new
        };
        if unchanged {
            // The current spec, sent back as it is: nothing to commit, but its rates are
            // handed to the shards again (how a change whose hand-over failed finishes).
            self.apply_rates(&new, new.revision, timeout).await?;
            return Ok(Response::new(SetModelResponse { model: Some(new) }));
        }
        let rev = new.revision;
        let cmd = Command {
            op: Some(Op::SetModel(new)),
            ..Default::default()
        };
        match self.node.propose(META_GROUP, cmd, timeout).await? {
            (Outcome::Meta(MetaOutcome::ModelSet(revision)), _) => {
                tracing::info!(revision, "model spec changed");
                let meta = self
                    .node
                    .meta_state()
                    .ok_or(PsError::ShardNotHere(META_GROUP))?;
                let model = meta.read().meta.model.clone();
                if let Some(m) = &model {
                    self.apply_rates(m, revision, timeout).await?;
                }
                Ok(Response::new(SetModelResponse { model }))
            }
            (Outcome::Meta(MetaOutcome::ModelConflict(current)), _) => {
                Err(stale_revision(rev, current).into())
            }
            (Outcome::Meta(MetaOutcome::Refused(r)), _) => {
                Err(PsError::FailedPrecondition(r).into())
            }
            (other, _) => Err(PsError::Raft(format!("unexpected outcome {other:?}")).into()),
        }
    }

    async fn request_seal(
        &self,
        _request: Request<RequestSealRequest>,
    ) -> Result<Response<RequestSealResponse>, Status> {
        self.coord.request_seal()?;
        Ok(Response::new(RequestSealResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn set_impression_retention(
        &self,
        request: Request<SetImpressionRetentionRequest>,
    ) -> Result<Response<SetImpressionRetentionResponse>, Status> {
        let retention = request
            .into_inner()
            .retention
            .ok_or_else(|| PsError::invalid("retention", "required"))?;
        crate::fsm::impressions::Retention::from_proto(&retention)
            .map_err(|e| PsError::from(e.in_field("retention")))?;
        let cmd = Command {
            op: Some(Op::SetRetention(SetRetention {
                retention: Some(retention),
                proposed_at_ms: now_ms(),
            })),
            ..Default::default()
        };
        let timeout = Duration::from_millis(self.node.cfg.rpc_timeout_ms);
        match self.node.propose(META_GROUP, cmd, timeout).await? {
            (Outcome::Meta(MetaOutcome::Sealed(epoch)), _) => {
                tracing::info!(
                    epoch,
                    ttl_ms = retention.ttl_ms,
                    bytes_max_per_shard = retention.bytes_max_per_shard,
                    "impression retention changed"
                );
                Ok(Response::new(SetImpressionRetentionResponse { epoch }))
            }
            (Outcome::Meta(MetaOutcome::Refused(r)), _) => {
                Err(PsError::invalid("retention", r).into())
            }
            (other, _) => Err(PsError::Raft(format!("unexpected outcome {other:?}")).into()),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn forget_user(
        &self,
        request: Request<ForgetUserRequest>,
    ) -> Result<Response<ForgetUserResponse>, Status> {
        let r = request.into_inner();
        if r.user_id.is_empty() || r.user_id.len() > 256 {
            return Err(PsError::invalid("user_id", "must be 1..=256 bytes").into());
        }
        // The row id every table keys the user's own rows by (the user-id row, the
        // history row); the meta log records only this hash.
        let user_hash = freshet_model::user_id_row(&r.user_id);
        let cmd = Command {
            op: Some(Op::ForgetUsers(ForgetUsers {
                user_hashes: vec![user_hash],
                proposed_at_ms: now_ms(),
            })),
            ..Default::default()
        };
        let timeout = Duration::from_millis(self.node.cfg.rpc_timeout_ms);
        match self.node.propose(META_GROUP, cmd, timeout).await? {
            (Outcome::Meta(MetaOutcome::Sealed(epoch)), _) => {
                tracing::info!(epoch, user_hash, "user forgotten");
                Ok(Response::new(ForgetUserResponse { epoch, user_hash }))
            }
            (Outcome::Meta(MetaOutcome::Refused(r)), _) => {
                Err(PsError::invalid("user_id", r).into())
            }
            (other, _) => Err(PsError::Raft(format!("unexpected outcome {other:?}")).into()),
        }
    }
}
