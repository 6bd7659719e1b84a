//! Thin gRPC adapters over [`Node`]: validation at the edge, then one call into the node.
//! Errors become gRPC statuses in exactly one place (`From<PsError> for Status`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::catalog::{validate_item, validate_set, ITEMS_PER_CALL_MAX, SETS_PER_CALL_MAX};
use freshet_proto::command::v1::{command::Op, Command, DensePush, SparsePush, StepPush};
use freshet_proto::ps::v1::{
    parameter_service_client::ParameterServiceClient, parameter_service_server::ParameterService,
    AppendImpressionsRequest, AppendImpressionsResponse, AssignEventsRequest, AssignEventsResponse,
    CreateTableRequest, CreateTableResponse, GetImpressionsRequest, GetImpressionsResponse,
    ListTablesRequest, ListTablesResponse, PullDenseRequest, PullDenseResponse, PullRequest,
    PullResponse, PushDenseRequest, PushDenseResponse, PushRequest, PushResponse, PushStepRequest,
    PushStepResponse, ReadConsistency, SubscribeRequest, TableKind, UpsertItemsRequest,
    UpsertItemsResponse,
};
use freshet_proto::{dense_shard, impression_shard, shard_for};
use tonic::{Request, Response, Status};

use crate::error::PsError;
use crate::fsm::{validate_spec, Outcome, ShardState};
use crate::ps::node::Node;
use crate::raft::group::GroupHandle;
use crate::raft::transport::endpoint;

/// The deadline of a call: the client's `grpc-timeout` when given, capped by the node's.
pub(crate) fn deadline<T>(req: &Request<T>, max: Duration) -> Duration {
    req.metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(max, |d| d.min(max))
}

pub(crate) fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    if s.len() < 2 {
        return None;
    }
    let (num, unit) = s.split_at(s.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Longest a read waits for its `min_epoch`.
const MIN_EPOCH_WAIT_MAX: Duration = Duration::from_secs(1);

/// Waits (bounded) until replica `g` has applied sealed epoch `min_epoch` (0: no wait).
/// Woken by the replica's change log, which moves with every applied seal; also
/// re-checked every few ms, for a replica that jumped ahead by a snapshot.
async fn wait_sealed(
    g: &GroupHandle<ShardState>,
    min_epoch: u64,
    timeout: Duration,
) -> Result<(), PsError> {
    if min_epoch == 0 {
        return Ok(());
    }
    let mut newest = g.feed.watch();
    let deadline = tokio::time::Instant::now() + timeout.min(MIN_EPOCH_WAIT_MAX);
    loop {
        let sealed = g.state.read().steps.last_sealed;
        if sealed >= min_epoch {
            return Ok(());
        }
        tokio::select! {
            r = newest.changed() => if r.is_err() { return Err(PsError::ShuttingDown) },
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(PsError::Unavailable(format!(
                "min_epoch: this replica has applied sealed epoch {sealed}, not yet {min_epoch}"
            )));
        }
    }
}

pub(crate) fn staleness_ms(g: &GroupHandle<ShardState>) -> u64 {
    let s = g.status.lock();
    if s.role == "leader" {
        return 0;
    }
    s.last_leader_contact
        .map_or(u64::MAX, |t| t.elapsed().as_millis() as u64)
}

/// `freshet.ps.v1.ParameterService`.
pub struct PsService {
    pub node: Arc<Node>,
    /// Bounds concurrent Subscribe streams, in all and per caller.
    pub subscribers: Arc<crate::ps::subscribe::Subscribers>,
}

impl PsService {
    pub fn new(node: Arc<Node>) -> Self {
        PsService {
            node,
            subscribers: Arc::default(),
        }
    }
}

impl PsService {
    fn timeout<T>(&self, req: &Request<T>) -> Duration {
        deadline(req, Duration::from_millis(self.node.cfg.rpc_timeout_ms))
    }

    fn check_ids(&self, shard: u32, ids: &[u64]) -> Result<(), PsError> {
        let max = self.node.cfg.rows_per_call_max;
        if ids.is_empty() {
            return Err(PsError::invalid("ids", "must not be empty"));
        }
        if ids.len() > max {
            return Err(PsError::invalid(
                "ids",
                format!("{} ids exceed the limit of {max} per call", ids.len()),
            ));
        }
        self.check_shard(shard)?;
        if let Some(i) = ids
            .iter()
            .position(|id| shard_for(*id, self.node.shard_count) != shard)
        {
            return Err(PsError::invalid(
                format!("ids[{i}]"),
                format!(
                    "id {} belongs to shard {}, not {shard}",
                    ids[i],
                    shard_for(ids[i], self.node.shard_count)
                ),
            ));
        }
        Ok(())
    }

    async fn replica_for_read(
        &self,
        shard: u32,
        consistency: i32,
        timeout: Duration,
    ) -> Result<GroupHandle<ShardState>, PsError> {
        match ReadConsistency::try_from(consistency) {
            Ok(ReadConsistency::Linearizable) => self.node.read_barrier(shard, timeout).await,
            Ok(ReadConsistency::Local) => self.node.local_replica(shard),
            Err(_) => Err(PsError::invalid(
                "consistency",
                format!("unknown value {consistency}"),
            )),
        }
    }

    async fn propose_push(
        &self,
        shard: u32,
        client_id: u64,
        seq: u64,
        op: Op,
        timeout: Duration,
    ) -> Result<(bool, u64), PsError> {
        if client_id == 0 {
            return Err(PsError::invalid("client_id", "must be non-zero"));
        }
        let cmd = Command {
            proposal_id: 0,
            client_id,
            seq,
            op: Some(op),
        };
        let (outcome, index) = self.node.propose(shard, cmd, timeout).await?;
        match outcome {
            Outcome::Applied => Ok((false, index)),
            Outcome::Duplicate => Ok((true, index)),
            Outcome::Rejected(r) => Err(r.into()),
            other => Err(PsError::Raft(format!("unexpected outcome {other:?}"))),
        }
    }
}

/// Applies a CreateTable (or, with `update`, an UpdateTable: new optimizer
/// hyper-parameters) on one shard: locally when `node` leads it, otherwise on the leader
/// (by hint, else by trying each peer). Ok(whether the shard's table was created or
/// changed).
pub(crate) async fn table_on_shard(
    node: &Node,
    shard: u32,
    spec: &freshet_proto::ps::v1::TableSpec,
    update: bool,
    timeout: Duration,
) -> Result<bool, PsError> {
    let deadline = Instant::now() + timeout;
    let mut hint: Option<String> = None;
    let mut tried_local = false;
    let peers: Vec<String> = node
        .address_book()
        .into_iter()
        .filter(|(id, _)| *id != node.id)
        .map(|(_, a)| a)
        .collect();
    let mut peer_iter = peers.into_iter();
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if !tried_local {
            tried_local = true;
            let op = if update {
                Op::UpdateTable(spec.clone())
            } else {
                Op::CreateTable(spec.clone())
            };
            let cmd = Command {
                op: Some(op),
                ..Default::default()
            };
            match node.propose(shard, cmd, left).await {
                Ok((Outcome::TableCreated(c), _)) => return Ok(c),
                Ok((Outcome::Rejected(r), _)) => return Err(r.into()),
                Ok(_) => return Err(PsError::Raft("unexpected outcome".into())),
                Err(PsError::NotLeader { leader_addr, .. }) => hint = leader_addr,
                Err(PsError::ShardNotHere(_)) => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        let Some(addr) = hint.take().or_else(|| peer_iter.next()) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tried_local = false;
            continue;
        };
        let ch = match endpoint(&addr) {
            Ok(e) => match e.connect().await {
                Ok(c) => c,
                Err(_) => continue,
            },
            Err(_) => continue,
        };
        let mut client = ParameterServiceClient::new(ch);
        let mut req = Request::new(CreateTableRequest {
            spec: Some(spec.clone()),
            shards: vec![shard],
            update_optimizer: update,
        });
        req.set_timeout(left);
        match client.create_table(req).await {
            Ok(r) => return Ok(r.into_inner().created),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                hint = s
                    .metadata()
                    .get(freshet_proto::metadata::LEADER_ADDR)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .filter(|a| *a != addr);
            }
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                return Err(PsError::AlreadyExists(s.message().to_string()))
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                return Err(PsError::FailedPrecondition(s.message().to_string()))
            }
            Err(s) => return Err(PsError::Raft(s.message().to_string())),
        }
    }
    Err(PsError::Timeout(format!(
        "table {:?} on shard {shard}",
        spec.name
    )))
}

#[tonic::async_trait]
impl ParameterService for PsService {
    #[tracing::instrument(skip(self, request), fields(shard, rows))]
    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        let start = Instant::now();
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        tracing::Span::current()
            .record("shard", r.shard)
            .record("rows", r.ids.len());
        self.check_ids(r.shard, &r.ids)?;
        let g = self
            .replica_for_read(r.shard, r.consistency, timeout)
            .await?;
        wait_sealed(&g, r.min_epoch, timeout).await?;
        let staleness = if r.consistency == ReadConsistency::Local as i32 {
            staleness_ms(&g)
        } else {
            0
        };
        let leader_id = g.status.lock().leader_id;
        let st = g.state.read();
        let t = st.dense_or_sparse(&r.table, TableKind::Sparse)?;
        let dim = t.dim();
        let mut values = vec![0.0f32; r.ids.len() * dim];
        for (i, id) in r.ids.iter().enumerate() {
            t.read_into(*id, &mut values[i * dim..(i + 1) * dim]);
        }
        let applied_index = st.applied_index;
        let epoch = st.steps.last_sealed;
        drop(st);
        metrics::counter!(crate::metrics::PULL_ROWS).increment(r.ids.len() as u64);
        metrics::histogram!(crate::metrics::PULL_SECONDS).record(start.elapsed().as_secs_f64());
        Ok(Response::new(PullResponse {
            dim: dim as u32,
            values,
            applied_index,
            staleness_ms: staleness,
            leader_id,
            epoch,
        }))
    }

    #[tracing::instrument(skip(self, request), fields(shard, rows, client_id, seq))]
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let start = Instant::now();
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        tracing::Span::current()
            .record("shard", r.shard)
            .record("rows", r.ids.len())
            .record("client_id", r.client_id)
            .record("seq", r.seq);
        self.check_ids(r.shard, &r.ids)?;
        if r.client_id == 0 {
            return Err(PsError::invalid("client_id", "must be non-zero").into());
        }
        let g = self.node.local_replica(r.shard)?;
        {
            let st = g.state.read();
            st.validate_push(&r.table, &r.ids, &r.grads)?;
            // Applied already (it is committed): answer without a proposal.
            if st.check_seq(r.client_id, r.seq)? {
                return Ok(Response::new(PushResponse {
                    duplicate: true,
                    applied_index: st.applied_index,
                }));
            }
        }
        let rows = r.ids.len();
        let op = Op::Push(SparsePush {
            table: r.table,
            ids: r.ids,
            grads: r.grads,
        });
        let (duplicate, applied_index) = self
            .propose_push(r.shard, r.client_id, r.seq, op, timeout)
            .await?;
        metrics::counter!(crate::metrics::PUSH_ROWS).increment(rows as u64);
        metrics::histogram!(crate::metrics::PUSH_SECONDS).record(start.elapsed().as_secs_f64());
        Ok(Response::new(PushResponse {
            duplicate,
            applied_index,
        }))
    }

    #[tracing::instrument(skip(self, request), fields(shard, name))]
    async fn pull_dense(
        &self,
        request: Request<PullDenseRequest>,
    ) -> Result<Response<PullDenseResponse>, Status> {
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        tracing::Span::current()
            .record("shard", r.shard)
            .record("name", &r.name);
        self.check_dense_shard(r.shard, &r.name)?;
        let g = self
            .replica_for_read(r.shard, r.consistency, timeout)
            .await?;
        wait_sealed(&g, r.min_epoch, timeout).await?;
        let staleness = if r.consistency == ReadConsistency::Local as i32 {
            staleness_ms(&g)
        } else {
            0
        };
        let st = g.state.read();
        let t = st.dense_or_sparse(&r.name, TableKind::Dense)?;
        let mut values = vec![0.0f32; t.dim()];
        t.read_into(0, &mut values);
        Ok(Response::new(PullDenseResponse {
            values,
            applied_index: st.applied_index,
            staleness_ms: staleness,
            epoch: st.steps.last_sealed,
        }))
    }

    #[tracing::instrument(skip(self, request), fields(shard, name, client_id, seq))]
    async fn push_dense(
        &self,
        request: Request<PushDenseRequest>,
    ) -> Result<Response<PushDenseResponse>, Status> {
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        tracing::Span::current()
            .record("shard", r.shard)
            .record("name", &r.name)
            .record("client_id", r.client_id)
            .record("seq", r.seq);
        self.check_dense_shard(r.shard, &r.name)?;
        let g = self.node.local_replica(r.shard)?;
        {
            let st = g.state.read();
            st.validate_push_dense(&r.name, &r.grads)?;
            if r.client_id != 0 && st.check_seq(r.client_id, r.seq)? {
                return Ok(Response::new(PushDenseResponse {
                    duplicate: true,
                    applied_index: st.applied_index,
                }));
            }
        }
        let op = Op::PushDense(DensePush {
            name: r.name,
            grads: r.grads,
        });
        let (duplicate, applied_index) = self
            .propose_push(r.shard, r.client_id, r.seq, op, timeout)
            .await?;
        Ok(Response::new(PushDenseResponse {
            duplicate,
            applied_index,
        }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn create_table(
        &self,
        request: Request<CreateTableRequest>,
    ) -> Result<Response<CreateTableResponse>, Status> {
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| PsError::invalid("spec", "is required"))?;
        validate_spec(&spec)?;
        let update = r.update_optimizer;
        let shards: Vec<u32> = if r.shards.is_empty() {
            (0..self.node.shard_count).collect()
        } else {
            if let Some(i) = r.shards.iter().position(|s| *s >= self.node.shard_count) {
                return Err(PsError::invalid(format!("shards[{i}]"), "no such shard").into());
            }
            r.shards
        };
        let calls = shards
            .iter()
            .map(|s| table_on_shard(&self.node, *s, &spec, update, timeout));
        let results = futures::future::join_all(calls).await;
        let mut created = false;
        for r in results {
            created |= r?;
        }
        Ok(Response::new(CreateTableResponse { created }))
    }

    #[tracing::instrument(skip(self, request), fields(shard, inc, step, rows))]
    async fn push_step(
        &self,
        request: Request<PushStepRequest>,
    ) -> Result<Response<PushStepResponse>, Status> {
        let start = Instant::now();
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        let rows: usize = r.sparse.iter().map(|p| p.ids.len()).sum();
        tracing::Span::current()
            .record("shard", r.shard)
            .record("inc", r.inc)
            .record("step", r.step)
            .record("rows", rows);
        if r.shard >= self.node.shard_count {
            return Err(PsError::invalid(
                "shard",
                format!("must be < {} (the shard count)", self.node.shard_count),
            )
            .into());
        }
        if rows > self.node.cfg.rows_per_call_max {
            return Err(PsError::invalid(
                "sparse",
                format!(
                    "{rows} ids exceed the limit of {} per call",
                    self.node.cfg.rows_per_call_max
                ),
            )
            .into());
        }
        for (i, p) in r.sparse.iter().enumerate() {
            self.check_ids(r.shard, &p.ids)
                .map_err(|e| e.in_field(&format!("sparse[{i}]")))?;
        }
        for (i, d) in r.dense.iter().enumerate() {
            self.check_dense_shard(r.shard, &d.name)
                .map_err(|e| e.in_field(&format!("dense[{i}]")))?;
        }
        let step = StepPush {
            inc: r.inc,
            step: r.step,
            sparse: r.sparse,
            dense: r.dense,
            part: r.part,
        };
        let g = self.node.local_replica(r.shard)?;
        {
            let st = g.state.read();
            st.validate_step(&step)?;
            match st.steps.check(step.inc, step.step, step.part) {
                crate::fsm::epoch::StepCheck::Duplicate => {
                    return Ok(Response::new(PushStepResponse {
                        duplicate: true,
                        applied_index: st.applied_index,
                    }))
                }
                crate::fsm::epoch::StepCheck::Fenced => {
                    return Err(PsError::FailedPrecondition(format!(
                        "incarnation {} is fenced; register again",
                        step.inc
                    ))
                    .into())
                }
                crate::fsm::epoch::StepCheck::New => {}
            }
        }
        // The local meta replica knows fences (and registrations) at least as early as
        // the shard does; a zombie is turned away before it costs a proposal.
        if let Some(meta) = self.node.meta_state() {
            let m = meta.read();
            match m.meta.worker(step.inc) {
                Some(w) if w.fenced => {
                    return Err(PsError::FailedPrecondition(format!(
                        "incarnation {} is fenced; register again",
                        step.inc
                    ))
                    .into())
                }
                Some(_) => {}
                None if step.inc >= m.meta.next_inc => {
                    return Err(PsError::Unavailable(format!(
                        "incarnation {} is not registered (yet, as far as this node knows)",
                        step.inc
                    ))
                    .into())
                }
                None => {
                    return Err(PsError::FailedPrecondition(format!(
                        "incarnation {} was fenced and forgotten; register again",
                        step.inc
                    ))
                    .into())
                }
            }
        }
        let cmd = Command {
            op: Some(Op::PushStep(step)),
            ..Default::default()
        };
        let (outcome, applied_index) = self.node.propose(r.shard, cmd, timeout).await?;
        let duplicate = match outcome {
            Outcome::Applied => false,
            Outcome::Duplicate => true,
            Outcome::Rejected(r) => return Err(PsError::from(r).into()),
            other => {
                return Err(PsError::Raft(format!("unexpected outcome {other:?}")).into());
            }
        };
        metrics::counter!(crate::metrics::PUSH_ROWS).increment(rows as u64);
        metrics::histogram!(crate::metrics::PUSH_SECONDS).record(start.elapsed().as_secs_f64());
        Ok(Response::new(PushStepResponse {
            duplicate,
            applied_index,
        }))
    }

    #[tracing::instrument(skip(self, request), fields(shard, items))]
    async fn upsert_items(
        &self,
        request: Request<UpsertItemsRequest>,
    ) -> Result<Response<UpsertItemsResponse>, Status> {
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        tracing::Span::current()
            .record("shard", r.shard)
            .record("items", r.items.len());
        // A shard may get only candidate sets (they live on dense_shard(name)), only
        // items, or both; never nothing.
        if (r.items.is_empty() && r.sets.is_empty())
            || r.items.len() > ITEMS_PER_CALL_MAX
            || r.sets.len() > SETS_PER_CALL_MAX
        {
            return Err(PsError::invalid(
                "items",
                format!(
                    "must hold at most {ITEMS_PER_CALL_MAX} items and {SETS_PER_CALL_MAX} sets, not none of either"
                ),
            )
            .into());
        }
        self.check_shard(r.shard)?;
        let ids: Vec<u64> = r.items.iter().map(|i| i.id).collect();
        if !ids.is_empty() {
            self.check_ids(r.shard, &ids).map_err(|e| match e {
                PsError::InvalidArgument { field, reason } => {
                    PsError::invalid(field.replace("ids", "items"), reason)
                }
                other => other,
            })?;
        }
        for (i, item) in r.items.iter().enumerate() {
            validate_item(item, &format!("items[{i}]"))?;
        }
        for (i, set) in r.sets.iter().enumerate() {
            validate_set(set, &format!("sets[{i}]"))?;
            self.check_dense_shard(r.shard, &set.name)
                .map_err(|e| e.in_field(&format!("sets[{i}]")))?;
        }
        let cmd = Command {
            op: Some(Op::UpsertItems(freshet_proto::command::v1::ItemUpsert {
                items: r.items,
                sets: r.sets,
            })),
            ..Default::default()
        };
        match self.node.propose(r.shard, cmd, timeout).await? {
            (Outcome::Applied, _) => Ok(Response::new(UpsertItemsResponse {})),
            (Outcome::Rejected(r), _) => Err(PsError::from(r).into()),
            (other, _) => Err(PsError::Raft(format!("unexpected outcome {other:?}")).into()),
        }
    }

    type SubscribeStream = crate::ps::subscribe::SubscribeStream;

    #[tracing::instrument(skip(self, request))]
    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = request.remote_addr().map(|a| a.ip());
        let r = request.into_inner();
        self.check_shard(r.shard)?;
        let g = self.node.local_replica(r.shard)?;
        let slot = self.subscribers.acquire(caller)?;
        let stream =
            crate::ps::subscribe::start(g, r.after_epoch, slot, self.node.shutdown_watch())?;
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all, fields(shard, impressions))]
    async fn append_impressions(
        &self,
        request: Request<AppendImpressionsRequest>,
    ) -> Result<Response<AppendImpressionsResponse>, Status> {
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        tracing::Span::current()
            .record("shard", r.shard)
            .record("impressions", r.impressions.len());
        self.check_shard(r.shard)?;
        let max = crate::fsm::impressions::IMPRESSIONS_PER_APPEND_MAX;
        if r.impressions.is_empty() || r.impressions.len() > max {
            return Err(PsError::invalid("impressions", format!("must hold 1..={max}")).into());
        }
        for (i, imp) in r.impressions.iter().enumerate() {
            let at = format!("impressions[{i}]");
            crate::fsm::impressions::validate(imp, &at).map_err(PsError::from)?;
            self.check_impression_shard(r.shard, &imp.id, &format!("{at}.id"))?;
        }
        let n = r.impressions.len() as u64;
        let cmd = Command {
            op: Some(Op::AppendImpressions(
                freshet_proto::command::v1::ImpressionAppend {
                    impressions: r.impressions,
                },
            )),
            ..Default::default()
        };
        match self.node.propose(r.shard, cmd, timeout).await? {
            (Outcome::Appended(appended), _) => {
                metrics::counter!(crate::metrics::IMPRESSIONS_APPENDED).increment(n);
                Ok(Response::new(AppendImpressionsResponse { appended }))
            }
            (Outcome::Rejected(r), _) => Err(PsError::from(r).into()),
            (other, _) => Err(PsError::Raft(format!("unexpected outcome {other:?}")).into()),
        }
    }

    #[tracing::instrument(skip_all, fields(shard, ids))]
    async fn get_impressions(
        &self,
        request: Request<GetImpressionsRequest>,
    ) -> Result<Response<GetImpressionsResponse>, Status> {
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        tracing::Span::current()
            .record("shard", r.shard)
            .record("ids", r.ids.len());
        self.check_shard(r.shard)?;
        let max = crate::fsm::impressions::EVENTS_PER_ASSIGN_MAX;
        if r.ids.is_empty() || r.ids.len() > max {
            return Err(PsError::invalid("ids", format!("must hold 1..={max} ids")).into());
        }
        for (i, id) in r.ids.iter().enumerate() {
            self.check_impression_shard(r.shard, id, &format!("ids[{i}]"))?;
        }
        let g = self.node.read_barrier(r.shard, timeout).await?;
        let st = g.state.read();
        let found = r
            .ids
            .iter()
            .filter_map(|id| st.impressions.get(id).cloned())
            .collect();
        Ok(Response::new(GetImpressionsResponse { found }))
    }

    #[tracing::instrument(skip_all, fields(shard, inc, step, events))]
    async fn assign_events(
        &self,
        request: Request<AssignEventsRequest>,
    ) -> Result<Response<AssignEventsResponse>, Status> {
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        tracing::Span::current()
            .record("shard", r.shard)
            .record("inc", r.inc)
            .record("step", r.step)
            .record("events", r.events.len());
        self.check_shard(r.shard)?;
        for (i, e) in r.events.iter().enumerate() {
            self.check_impression_shard(
                r.shard,
                &e.impression_id,
                &format!("events[{i}].impression_id"),
            )?;
        }
        let cmd = Command {
            op: Some(Op::AssignEvents(freshet_proto::command::v1::EventAssign {
                inc: r.inc,
                step: r.step,
                events: r.events,
            })),
            ..Default::default()
        };
        match self.node.propose(r.shard, cmd, timeout).await? {
            (Outcome::Assigned(results), _) => Ok(Response::new(AssignEventsResponse { results })),
            (Outcome::Rejected(r), _) => Err(PsError::from(r).into()),
            (other, _) => Err(PsError::Raft(format!("unexpected outcome {other:?}")).into()),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn list_tables(
        &self,
        _request: Request<ListTablesRequest>,
    ) -> Result<Response<ListTablesResponse>, Status> {
        Ok(Response::new(ListTablesResponse {
            tables: self.node.table_specs(),
        }))
    }
}

impl PsService {
    fn check_shard(&self, shard: u32) -> Result<(), PsError> {
        if shard >= self.node.shard_count {
            return Err(PsError::invalid(
                "shard",
                format!("must be < {} (the shard count)", self.node.shard_count),
            ));
        }
        Ok(())
    }

    fn check_impression_shard(&self, shard: u32, id: &str, field: &str) -> Result<(), PsError> {
        let max = crate::fsm::impressions::ID_BYTES_MAX;
        if id.is_empty() || id.len() > max {
            return Err(PsError::invalid(field, format!("must be 1..={max} bytes")));
        }
        let want = impression_shard(id, self.node.shard_count);
        if want != shard {
            return Err(PsError::invalid(
                field,
                format!("impression {id:?} lives on shard {want}, not {shard}"),
            ));
        }
        Ok(())
    }

    fn check_dense_shard(&self, shard: u32, name: &str) -> Result<(), PsError> {
        if name.is_empty() {
            return Err(PsError::invalid("name", "must not be empty"));
        }
        let want = dense_shard(name, self.node.shard_count);
        if shard != want {
            return Err(PsError::invalid(
                "shard",
                format!("dense tensor {name:?} lives on shard {want}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("10Q"), None);
    }
}
