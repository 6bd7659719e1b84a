//! freshet-worker: the stateless trainer.
//!
//! [`run`] registers an incarnation with the coordinator (advertising its address),
//! takes complete training examples from gateways (`freshet.worker.v1.Worker/Train`),
//! batches them (bounded by count and wait), answers each caller with the (inc, step)
//! that carries its examples *before* pushing, then pulls the rows the step needs,
//! computes the actor-critic gradients of the shared model off the async runtime, and
//! pushes them keyed (inc, step) to every shard involved, retrying the same step until
//! every shard acknowledged it. A heartbeat reports the frontier (renewing the lease);
//! once fenced, the worker registers a fresh incarnation and goes on (the gateways
//! re-send the examples of fenced steps).

pub mod error;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_client::steps::{SparseStep, StepError, StepSession};
use freshet_client::{ClientOptions, PsClient};
use freshet_model::{self as model, Grads, Hyper, ModelSpec, Params, TrainExample, UserInput};
use freshet_proto::ps::v1::ReadConsistency;
use freshet_proto::ps::v1::{AssignStatus, EventAssignResult, EventRef};
use freshet_proto::worker::v1::{
    worker_server::{Worker, WorkerServer},
    Example, TrainRequest, TrainResponse,
};
use freshet_proto::FieldError;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tonic::{Request, Response, Status};

pub use error::WorkerError;

pub const EXAMPLES_SECONDS: &str = "freshet_worker_examples_total";
pub const STEP_SECONDS: &str = "freshet_worker_step_duration_seconds";
pub const PUSH_RETRIES: &str = "freshet_worker_push_retries_total";
pub const LEASE_RENEWALS: &str = "freshet_worker_lease_renewals_total";
pub const REGISTRATIONS: &str = "freshet_worker_registrations_total";
/// Revision of the model spec whose loss weights the worker's new steps use.
pub const MODEL_REVISION: &str = "freshet_worker_model_revision";
/// Steps that pulled before the worker's own earlier steps were sealed (the wait ran out).
pub const STALE_PULLS: &str = "freshet_worker_stale_pulls_total";
/// Time a step waited for its own earlier steps to be sealed.
pub const SEAL_WAIT_SECONDS: &str = "freshet_worker_seal_wait_seconds";

/// Worker settings, validated once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    pub ps: Vec<String>,
    /// Address gateways reach this worker at (default: the bound address).
    pub advertise: Option<String>,
    pub name: String,
    /// Examples per step at most, and how long a step waits to fill.
    pub batch_max: usize,
    pub batch_wait_ms: u64,
    /// Examples one Train call may carry.
    pub examples_per_call_max: usize,
    /// Steps being pulled/computed/pushed at once.
    pub steps_in_flight: usize,
    pub heartbeat_ms: u64,
    /// Read your own writes: a step pulls only once at most this many of this
    /// incarnation's earlier steps are unsealed, at an epoch holding the others, so its
    /// gradients are computed on parameters that include the worker's own updates.
    /// Measured (in-process harness, steps of 96 examples, 4 seeds): 0 stale steps 0.32
    /// whole-run normalised CTR, 1 stale 0.30, 2 stale 0.21 (the critic overshoots
    /// when several steps are computed from the same parameters).
    pub unsealed_steps_max: u64,
    /// How long a step waits for that before pulling anyway (counted in
    /// `freshet_worker_stale_pulls_total`).
    pub unsealed_wait_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            ps: Vec::new(),
            advertise: None,
            name: "worker".into(),
            batch_max: 1024,
            batch_wait_ms: 5,
            examples_per_call_max: 10_000,
            steps_in_flight: 4,
            heartbeat_ms: 50,
            unsealed_steps_max: 0,
            unsealed_wait_ms: 250,
        }
    }
}

impl WorkerConfig {
    /// # Errors
    /// The name of the bad field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.ps.is_empty() {
            return Err(FieldError::new("ps", "at least one PS node address"));
        }
        if !(1..=100_000).contains(&self.batch_max) {
            return Err(FieldError::new("batch_max", "must be 1..=100000"));
        }
        if self.batch_wait_ms > 10_000 {
            return Err(FieldError::new("batch_wait_ms", "at most 10000"));
        }
        if !(1..=64).contains(&self.steps_in_flight) {
            return Err(FieldError::new("steps_in_flight", "must be 1..=64"));
        }
        if !(1..=60_000).contains(&self.heartbeat_ms) {
            return Err(FieldError::new("heartbeat_ms", "must be 1..=60000"));
        }
        if self.unsealed_steps_max > 1_000_000 {
            return Err(FieldError::new("unsealed_steps_max", "at most 1000000"));
        }
        if self.unsealed_wait_ms > 10_000 {
            return Err(FieldError::new("unsealed_wait_ms", "at most 10000"));
        }
        Ok(())
    }
}

/// Bytes of Train calls a worker holds at once (queued or in a step): a call beyond it
/// answers RESOURCE_EXHAUSTED (the caller tries another worker) instead of the queue
/// growing to its count bound times the message size.
pub const QUEUED_BYTES_MAX: usize = 256 << 20;

/// A Train call waiting for its step number.
struct Pending {
    examples: Vec<Example>,
    reply: oneshot::Sender<Result<TrainResponse, Status>>,
    /// Its share of [`QUEUED_BYTES_MAX`] (in KiB), released when the call is answered.
    _bytes: tokio::sync::OwnedSemaphorePermit,
}

/// The examples of one step after their events were claimed, and each caller's answer.
struct Claimed {
    examples: Vec<Example>,
    answers: Vec<(
        oneshot::Sender<Result<TrainResponse, Status>>,
        TrainResponse,
    )>,
}

/// Claims every feedback event of a step's examples for (inc, step) on its impression's
/// shard (one AssignEvents per shard, concurrently), before the step uses them: an event
/// already in another step that is not fenced below it (sent again through another
/// gateway, or re-sent after a timeout) is left out, and its caller learns where it
/// trains instead. Examples without an event id train as they are.
///
/// # Errors
/// A shard did not answer within the client's deadline: the claims' outcome is unknown,
/// so the step must never be sealed (the caller abandons the incarnation; the fence then
/// releases whatever was claimed).
async fn claim_events(
    client: &PsClient,
    inc: u64,
    step: u64,
    batch: Vec<Pending>,
) -> Result<Claimed, (freshet_client::ClientError, Vec<Pending>)> {
    type Key = (String, String);
    let mut by_shard: BTreeMap<u32, Vec<EventRef>> = BTreeMap::new();
    let mut seen: HashMap<Key, ()> = HashMap::new();
    for p in &batch {
        for ex in p.examples.iter().filter(|e| !e.event_id.is_empty()) {
            let key = (ex.impression_id.clone(), ex.event_id.clone());
            if seen.insert(key, ()).is_none() {
                by_shard
                    .entry(client.impression_shard(&ex.impression_id))
                    .or_default()
                    .push(EventRef {
                        impression_id: ex.impression_id.clone(),
                        event_id: ex.event_id.clone(),
                    });
            }
        }
    }
    let calls = by_shard
        .iter()
        .map(|(shard, refs)| client.assign_events(*shard, inc, step, refs));
    let mut results: HashMap<Key, EventAssignResult> = HashMap::new();
    for ((_, refs), r) in by_shard.iter().zip(futures::future::join_all(calls).await) {
        match r {
            Ok(rs) => {
                for (e, r) in refs.iter().zip(rs) {
                    results.insert((e.impression_id.clone(), e.event_id.clone()), r);
                }
            }
            Err(e) => return Err((e, batch)),
        }
    }
    let mut used: HashMap<Key, ()> = HashMap::new();
    let mut out = Claimed {
        examples: Vec::new(),
        answers: Vec::with_capacity(batch.len()),
    };
    for p in batch {
        let mut resp = TrainResponse {
            inc,
            step,
            events: Vec::with_capacity(p.examples.len()),
        };
        let any_event = p.examples.iter().any(|e| !e.event_id.is_empty());
        for ex in p.examples {
            if ex.event_id.is_empty() {
                // No event to claim: it trains in this step (and says so, keeping the
                // answer's per-example order when the call mixes both kinds).
                out.examples.push(ex);
                if any_event {
                    resp.events.push(EventAssignResult {
                        status: AssignStatus::Assigned as i32,
                        inc,
                        step,
                    });
                }
                continue;
            }
            let key = (ex.impression_id.clone(), ex.event_id.clone());
            let r = results.get(&key).cloned().unwrap_or_default();
            let ours = r.status == AssignStatus::Assigned as i32 && (r.inc, r.step) == (inc, step);
            let mut r = r;
            if ours {
                if used.insert(key, ()).is_none() {
                    out.examples.push(ex);
                } else {
                    // The same event twice in one step (two gateways at once): it trains
                    // once, and the second caller learns it was already there.
                    r.status = AssignStatus::Pending as i32;
                }
            }
            if any_event {
                resp.events.push(r);
            }
        }
        out.answers.push((p.reply, resp));
    }
    Ok(out)
}

struct WorkerService {
    tx: mpsc::Sender<Pending>,
    /// KiB of Train calls held, out of [`QUEUED_BYTES_MAX`].
    held_kib: Arc<Semaphore>,
    max_examples: usize,
    /// The model's width: an example's history is empty or one row of it.
    dim: usize,
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn train(
        &self,
        request: Request<TrainRequest>,
    ) -> Result<Response<TrainResponse>, Status> {
        let kib = u32::try_from(prost::Message::encoded_len(request.get_ref()).div_ceil(1024))
            .unwrap_or(u32::MAX)
            .max(1);
        let bytes = Arc::clone(&self.held_kib)
            .try_acquire_many_owned(kib)
            .map_err(|_| Status::from(WorkerError::QueueFull))?;
        let r = request.into_inner();
        if r.examples.is_empty() || r.examples.len() > self.max_examples {
            return Err(WorkerError::from(FieldError::new(
                "examples",
                format!("must hold 1..={} examples", self.max_examples),
            ))
            .into());
        }
        for (i, ex) in r.examples.iter().enumerate() {
            if ex.candidates.is_empty() || ex.shown as usize >= ex.candidates.len() {
                return Err(WorkerError::from(FieldError::new(
                    format!("examples[{i}].shown"),
                    "must index candidates",
                ))
                .into());
            }
            if ex.numeric.len() > model::NUMERIC_MAX || ex.numeric.iter().any(|v| !v.is_finite()) {
                return Err(WorkerError::from(FieldError::new(
                    format!("examples[{i}].numeric"),
                    format!("at most {} finite values", model::NUMERIC_MAX),
                ))
                .into());
            }
            if !(ex.history.is_empty() || ex.history.len() == self.dim)
                || ex.history.iter().any(|v| !v.is_finite())
            {
                return Err(WorkerError::from(FieldError::new(
                    format!("examples[{i}].history"),
                    format!("must be empty or {} finite values", self.dim),
                ))
                .into());
            }
            if ex.query_terms.len() > model::query::QUERY_TERMS_MAX {
                return Err(WorkerError::from(FieldError::new(
                    format!("examples[{i}].query_terms"),
                    format!("at most {}", model::query::QUERY_TERMS_MAX),
                ))
                .into());
            }
            let levels = u32::from(model::query::LEXICAL_LEVELS);
            // A level exists only under a query (serving computes none without one).
            let most = if ex.query_terms.is_empty() { 0 } else { levels };
            if let Some(c) = ex.candidates.iter().position(|c| c.lexical > most) {
                return Err(WorkerError::from(FieldError::new(
                    format!("examples[{i}].candidates[{c}].lexical"),
                    format!("must be 0..={most} (0 without query_terms)"),
                ))
                .into());
            }
            if !(ex.propensity > 0.0 && ex.propensity <= 1.0 && ex.reward.is_finite()) {
                return Err(WorkerError::from(FieldError::new(
                    format!("examples[{i}]"),
                    "propensity must be in (0, 1] and reward finite",
                ))
                .into());
            }
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Pending {
                examples: r.examples,
                reply,
                _bytes: bytes,
            })
            .map_err(|_| Status::from(WorkerError::QueueFull))?;
        let resp = rx
            .await
            .map_err(|_| Status::from(WorkerError::Stopping))??;
        Ok(Response::new(resp))
    }
}

/// Rows pulled for one step.
struct Pulled {
    rows: HashMap<(&'static str, u64), Vec<f32>>,
    tower: Vec<f32>,
    critic: Vec<f32>,
}

impl Params for Pulled {
    fn read(&self, table: &str, id: u64, out: &mut [f32]) {
        let key = [
            model::ITEM_TABLE,
            model::FEATURE_TABLE,
            model::USER_TABLE,
            model::ITEM_BIAS_TABLE,
            model::ITEM_PRIOR_TABLE,
            model::ITEM_COUNTS_TABLE,
            model::HISTORY_TABLE,
            model::CROSS_TABLE,
            model::LEXICAL_TABLE,
        ]
        .into_iter()
        .find(|t| *t == table);
        match key.and_then(|t| self.rows.get(&(t, id))) {
            Some(r) => out.copy_from_slice(r),
            None => out.fill(0.0),
        }
    }
    fn dense(&self, name: &str) -> &[f32] {
        match name {
            model::TOWER => &self.tower,
            model::CRITIC => &self.critic,
            _ => &[],
        }
    }
}

fn to_train(ex: &Example) -> TrainExample {
    TrainExample {
        user: UserInput {
            feature_ids: ex.user_feature_ids.clone(),
            user_id: ex.has_user_id.then_some(ex.user_id_row),
            numeric: ex.numeric.clone(),
            history: ex.history.clone(),
            query: ex.query_terms.clone(),
        },
        candidates: ex
            .candidates
            .iter()
            .map(|c| (c.item_id, c.feature_ids.clone()))
            .collect(),
        // Validated at or below LEXICAL_LEVELS (a u8).
        lexical: if ex.candidates.iter().all(|c| c.lexical == 0) {
            Vec::new()
        } else {
            ex.candidates.iter().map(|c| c.lexical as u8).collect()
        },
        shown: ex.shown as usize,
        propensity: ex.propensity,
        reward: ex.reward,
    }
}

/// Pulls what a batch reads (the training view: sealed, linearizable per shard).
async fn pull(
    client: &PsClient,
    spec: &ModelSpec,
    batch: &[TrainExample],
    min_epoch: u64,
) -> Result<Pulled, freshet_client::ClientError> {
    let want = wanted(spec, batch);
    // One table after another: measured on 2 cores, concurrent pulls raised freshness
    // p99 (more contention) rather than lowering it.
    let mut rows = HashMap::new();
    for (table, mut ids) in want {
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            continue;
        }
        let (dim, values) = client
            .pull_at(table, &ids, ReadConsistency::Linearizable, min_epoch)
            .await?;
        for (i, id) in ids.iter().enumerate() {
            rows.insert((table, *id), values[i * dim..(i + 1) * dim].to_vec());
        }
    }
    let tower = client.pull_dense_at(model::TOWER, min_epoch).await?;
    let critic = client.pull_dense_at(model::CRITIC, min_epoch).await?;
    Ok(Pulled {
        rows,
        tower,
        critic,
    })
}

/// The sparse rows a batch's update reads ([`gradients`]), by table (unsorted, with
/// repeats): what [`pull`] fetches. A row missing here would read as 0 in training while
/// serving reads its value.
fn wanted(spec: &ModelSpec, batch: &[TrainExample]) -> BTreeMap<&'static str, Vec<u64>> {
    let mut want: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for ex in batch {
        want.entry(model::FEATURE_TABLE)
            .or_default()
            .extend(&ex.user.feature_ids);
        if let Some(u) = ex.user.user_id {
            want.entry(model::USER_TABLE).or_default().push(u);
            // The history's update reads the row it moves (clicks only).
            if spec.history && ex.reward > 0.0 {
                want.entry(model::HISTORY_TABLE).or_default().push(u);
            }
        }
        if !ex.user.query.is_empty() {
            want.entry(model::FEATURE_TABLE)
                .or_default()
                .extend(model::query::query_rows(&ex.user.query));
        }
        if spec.lexical {
            want.entry(model::LEXICAL_TABLE).or_default().extend(
                (0..ex.candidates.len())
                    .filter_map(|c| model::query::lexical_row(ex.lexical_at(c))),
            );
        }
        for (id, feats) in &ex.candidates {
            want.entry(model::ITEM_TABLE).or_default().push(*id);
            if spec.item_bias {
                want.entry(model::ITEM_BIAS_TABLE).or_default().push(*id);
            }
            if spec.item_prior {
                want.entry(model::ITEM_PRIOR_TABLE).or_default().push(*id);
            }
            if spec.item_counts {
                want.entry(model::ITEM_COUNTS_TABLE).or_default().push(*id);
            }
            want.entry(model::FEATURE_TABLE).or_default().extend(feats);
            if spec.query_cross {
                want.entry(model::CROSS_TABLE)
                    .or_default()
                    .extend(model::query::cross_rows(&ex.user.query, *id, feats));
            }
        }
    }
    want
}

/// Gradients of a batch as per-table sparse parts and dense parts.
fn gradients(
    spec: &ModelSpec,
    p: &Pulled,
    batch: &[TrainExample],
    h: &Hyper,
) -> (Vec<SparseStep>, Vec<(String, Vec<f32>)>) {
    let mut g = Grads::new(spec);
    model::backward_batch(spec, p, batch, h, &mut g);
    // The clicking users' history rows move towards what they clicked, in this step.
    model::history_updates(spec, p, batch, &mut g);
    // The shown items' click counts, and the regime check on the candidates' windows.
    model::counts_updates(spec, p, batch, &mut g);
    // Dense tensors take the batch mean; sparse rows the sum of their examples'
    // gradients: a row seen in a few examples of a large batch would otherwise get a
    // step that shrinks with the batch size (and with load), as in Monolith and PERSIA.
    // (A per-row mean was tried: every candidate row is read by every example, so it
    // shrinks item rows' steps just the same; the learning test fell to random.)
    let k = 1.0 / batch.len().max(1) as f32;
    g.tower.iter_mut().for_each(|v| *v *= k);
    g.critic.iter_mut().for_each(|v| *v *= k);
    let mut by_table: BTreeMap<&'static str, SparseStep> = BTreeMap::new();
    for ((table, id), grad) in g.sparse {
        let s = by_table.entry(table).or_insert_with(|| SparseStep {
            table: table.to_string(),
            ..Default::default()
        });
        s.ids.push(id);
        s.grads.extend_from_slice(&grad);
    }
    debug_assert!(by_table
        .values()
        .all(|s| s.grads.len() == s.ids.len() * spec.sparse_dim(&s.table)));
    (
        by_table.into_values().collect(),
        vec![
            (model::TOWER.to_string(), g.tower),
            (model::CRITIC.to_string(), g.critic),
        ],
    )
}

/// The current incarnation; replaced when fenced.
struct Current {
    session: RwLock<Arc<StepSession>>,
}

/// Runs a worker on `listener` until `shutdown` resolves.
///
/// # Errors
/// Invalid config or a gRPC server failure.
pub async fn run(
    config: WorkerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate().map_err(WorkerError::from)?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or(listener.local_addr()?.to_string());
    let mut shutdown = std::pin::pin!(shutdown);
    let opts = ClientOptions::default();
    let Some(client) = PsClient::connect_until(&config.ps, &opts, shutdown.as_mut()).await else {
        return Ok(());
    };
    // The model (shape, layers, loss weights, tables) is the cluster's, from the meta
    // group: every worker trains the same update rule, whatever its flags.
    let (spec, hyper, revision) = loop {
        match client.get_model().await {
            Ok(c) => match ModelSpec::from_config(&c) {
                Ok((spec, hyper)) => break (spec, hyper, c.revision),
                Err(e) => return Err(WorkerError::ModelMismatch(e.to_string()).into()),
            },
            Err(freshet_client::ClientError::Status(s)) if s.code() == tonic::Code::NotFound => {
                return Err(WorkerError::NoModel(s.message().to_string()).into())
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the cluster's model spec");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    tracing::info!(
        dim = spec.dim,
        clip = hyper.clip,
        entropy = hyper.entropy,
        revision,
        "model spec"
    );
    metrics::gauge!(MODEL_REVISION).set(revision as f64);
    // The loss weights new steps use; the heartbeat swaps them when the cluster's
    // revision moves (SetModel).
    let weights = Arc::new(RwLock::new((revision, hyper)));
    let register = |client: Arc<PsClient>, name: String, addr: String| async move {
        loop {
            match StepSession::register_at(Arc::clone(&client), &name, &addr).await {
                Ok(s) => {
                    metrics::counter!(REGISTRATIONS).increment(1);
                    tracing::info!(inc = s.inc(), "worker registered");
                    return s;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "register failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    };
    let first = register(Arc::clone(&client), config.name.clone(), advertise.clone()).await;
    let current = Arc::new(Current {
        session: RwLock::new(first),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    // Heartbeat: report the frontier; on a fence, register again.
    {
        let current = Arc::clone(&current);
        let client = Arc::clone(&client);
        let (name, addr) = (config.name.clone(), advertise.clone());
        let mut stop = stop_rx.clone();
        let every = Duration::from_millis(config.heartbeat_ms);
        let weights = Arc::clone(&weights);
        let refreshing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tasks.push(tokio::spawn(async move {
            loop {
                let s = Arc::clone(&current.session.read());
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(every) => {}
                    // A moved frontier is reported at once: it is what the next seal
                    // (and so freshness) waits for.
                    _ = s.frontier_moved() => {}
                }
                match s.report().await {
                    Ok(r) => {
                        metrics::counter!(LEASE_RENEWALS).increment(1);
                        // Off the heartbeat (a slow read must not cost the lease),
                        // one at a time.
                        if r.model_revision != weights.read().0
                            && !refreshing.swap(true, std::sync::atomic::Ordering::AcqRel)
                        {
                            let (client, weights, refreshing) = (
                                Arc::clone(&client),
                                Arc::clone(&weights),
                                Arc::clone(&refreshing),
                            );
                            tokio::spawn(async move {
                                refresh_weights(&client, spec, &weights).await;
                                refreshing.store(false, std::sync::atomic::Ordering::Release);
                            });
                        }
                    }
                    Err(StepError::Fenced(inc)) => {
                        tracing::warn!(inc, "incarnation fenced; registering a new one");
                        let fresh = register(Arc::clone(&client), name.clone(), addr.clone()).await;
                        *current.session.write() = fresh;
                    }
                    Err(e) => tracing::debug!(error = %e, "frontier report failed"),
                }
            }
        }));
    }

    // Batcher: gathers Train calls into steps.
    let (tx, mut rx) = mpsc::channel::<Pending>(256);
    {
        let current = Arc::clone(&current);
        let client = Arc::clone(&client);
        let cfg = config.clone();
        let slots = Arc::new(Semaphore::new(config.steps_in_flight));
        let weights = Arc::clone(&weights);
        tasks.push(tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let mut n = batch[0].examples.len();
                let until = tokio::time::Instant::now() + Duration::from_millis(cfg.batch_wait_ms);
                while n < cfg.batch_max {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(p)) => {
                            n += p.examples.len();
                            batch.push(p);
                        }
                        _ => break,
                    }
                }
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let session = Arc::clone(&current.session.read());
                let step = session.next_step();
                // Read your own writes (bounded): the step pulls once at most
                // `unsealed_steps_max` of this incarnation's earlier steps are unsealed, at
                // an epoch holding the rest. It keeps taking examples while it waits, so
                // the wait makes steps larger rather than queueing small ones.
                let waited = tokio::time::Instant::now();
                let need = step.saturating_sub(1 + cfg.unsealed_steps_max);
                let min_epoch = {
                    let sealed =
                        session.wait_sealed(need, Duration::from_millis(cfg.unsealed_wait_ms));
                    tokio::pin!(sealed);
                    let mut open = true;
                    loop {
                        tokio::select! {
                            e = &mut sealed => break e,
                            p = rx.recv(), if open && n < cfg.batch_max => match p {
                                Some(p) => {
                                    n += p.examples.len();
                                    batch.push(p);
                                }
                                None => open = false,
                            },
                        }
                    }
                };
                metrics::histogram!(SEAL_WAIT_SECONDS).record(waited.elapsed().as_secs_f64());
                let min_epoch = min_epoch.unwrap_or_else(|| {
                    metrics::counter!(STALE_PULLS).increment(1);
                    0
                });
                let examples = match claim_events(&client, session.inc(), step, batch).await {
                    Ok(c) => {
                        // Answered before pushing: a caller that went away meanwhile
                        // finds its events claimed for this step when it sends again.
                        for (reply, resp) in c.answers {
                            let _ = reply.send(Ok(resp));
                        }
                        c.examples
                    }
                    Err((e, batch)) => {
                        tracing::warn!(step, error = %e, "claiming the step's events failed; abandoning the incarnation");
                        session.abandon();
                        for p in batch {
                            let _ = p.reply.send(Err(Status::from(WorkerError::Claim(e.to_string()))));
                        }
                        continue;
                    }
                };
                let client = Arc::clone(&client);
                // Fixed per step: a retried push carries the gradients it was computed
                // with, whatever changed meanwhile.
                let hyper = weights.read().1;
                tokio::spawn(async move {
                    let _permit = permit;
                    train_step(&client, &session, &spec, step, &examples, &hyper, min_epoch).await;
                });
            }
        }));
    }

    let svc = WorkerServer::new(WorkerService {
        tx,
        held_kib: Arc::new(Semaphore::new(QUEUED_BYTES_MAX >> 10)),
        max_examples: config.examples_per_call_max,
        dim: spec.dim,
    })
    .max_decoding_message_size(64 << 20);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkerServer<WorkerService>>()
        .await;
    // Reflection, as every Freshet server serves it (grpcurl describes the worker too).
    let (reflection_v1, reflection_v1alpha) =
        freshet_runtime::grpc::reflection().map_err(|e| WorkerError::Reflection(e.to_string()))?;
    let incoming = freshet_runtime::grpc::incoming(listener);
    let (grpc_stop_tx, grpc_stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        freshet_runtime::grpc::server()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = grpc_stop_rx.await;
            }),
    );
    shutdown.await;
    tracing::info!("worker shutting down");
    let _ = stop_tx.send(true);
    let _ = grpc_stop_tx.send(());
    freshet_runtime::grpc::stop_server(server).await;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Re-reads the cluster's model spec after its revision moved and takes its loss
/// weights. A spec whose shape differs from the one this worker started with cannot come
/// from SetModel (the meta group refuses shape changes); it is logged and ignored.
async fn refresh_weights(client: &PsClient, spec: ModelSpec, weights: &RwLock<(u64, Hyper)>) {
    let c = match client.get_model().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "reading the changed model spec; retried next heartbeat");
            return;
        }
    };
    match ModelSpec::from_config(&c) {
        Ok((s, hyper)) if s == spec => {
            tracing::info!(
                revision = c.revision,
                policy_weight = hyper.policy_weight,
                clip = hyper.clip,
                entropy = hyper.entropy,
                value_weight = hyper.value_weight,
                reward_weight = hyper.reward_weight,
                choice_weight = hyper.choice_weight,
                "model spec changed: new steps use these loss weights"
            );
            metrics::gauge!(MODEL_REVISION).set(c.revision as f64);
            *weights.write() = (c.revision, hyper);
        }
        Ok(_) => tracing::error!(
            revision = c.revision,
            "the cluster's model changed shape; this worker keeps its own (restart it)"
        ),
        Err(e) => {
            tracing::error!(revision = c.revision, error = %e, "the cluster's model spec does not fit this worker")
        }
    }
}

/// One step: pull (at `min_epoch`: the worker's own earlier steps), compute, push (same
/// (inc, step) until acknowledged or fenced).
async fn train_step(
    client: &PsClient,
    session: &StepSession,
    spec: &ModelSpec,
    step: u64,
    examples: &[Example],
    hyper: &Hyper,
    min_epoch: u64,
) {
    let start = Instant::now();
    if examples.is_empty() {
        // Every event was already in another step: an empty step (no shard part) only
        // moves the frontier.
        let _ = session.push(step, &[], &[]).await;
        return;
    }
    let batch: Vec<TrainExample> = examples.iter().map(to_train).collect();
    let mut backoff = Duration::from_millis(20);
    // A step is never abandoned while the incarnation holds its lease: transient errors
    // are retried under the same (inc, step). A step that cannot succeed (bad input)
    // abandons the incarnation instead: it stops renewing its lease, is fenced, and the
    // gateways re-send its examples to the next incarnation.
    let permanent = |e: &freshet_client::ClientError| matches!(e, freshet_client::ClientError::Status(s) if s.code() == tonic::Code::InvalidArgument);
    let pulled = loop {
        match pull(client, spec, &batch, min_epoch).await {
            Ok(p) => break p,
            Err(e) if permanent(&e) => {
                tracing::error!(step, error = %e, "step cannot be pulled; abandoning incarnation");
                session.abandon();
                return;
            }
            Err(e) => {
                if session.is_fenced() {
                    return;
                }
                tracing::debug!(step, error = %e, "pull failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    };
    let spec_c = *spec;
    let hyper_c = *hyper;
    let Ok((sparse, dense)) = tokio::task::spawn_blocking(move || {
        let g = gradients(&spec_c, &pulled, &batch, &hyper_c);
        drop(pulled);
        g
    })
    .await
    else {
        return;
    };
    loop {
        match session.push(step, &sparse, &dense).await {
            Ok(()) => break,
            Err(StepError::Fenced(inc)) => {
                tracing::warn!(inc, step, "step abandoned: incarnation fenced");
                return;
            }
            Err(StepError::Client(e)) if permanent(&e) => {
                tracing::error!(step, error = %e, "step rejected; abandoning incarnation");
                session.abandon();
                return;
            }
            Err(e) => {
                metrics::counter!(PUSH_RETRIES).increment(1);
                tracing::debug!(step, error = %e, "push failed; retrying the same step");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
    metrics::counter!(EXAMPLES_SECONDS).increment(examples.len() as u64);
    metrics::histogram!(STEP_SECONDS).record(start.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of the model has a value of its own (none reads as 0).
    struct Whole {
        tower: Vec<f32>,
        critic: Vec<f32>,
    }

    fn value(table: &str, id: u64, j: usize) -> f32 {
        freshet_proto::init_value(11, freshet_proto::fnv1a64(table), id, j as u64, 0.5)
    }

    impl Params for Whole {
        fn read(&self, table: &str, id: u64, out: &mut [f32]) {
            for (j, v) in out.iter_mut().enumerate() {
                *v = value(table, id, j);
            }
        }
        fn dense(&self, name: &str) -> &[f32] {
            match name {
                model::TOWER => &self.tower,
                _ => &self.critic,
            }
        }
    }

    /// The rows `pull` fetches are every row the update reads: training on them alone
    /// gives the gradients training on the whole model gives (a table or row left out of
    /// `wanted` would read as 0 here, as the worker reads a row it did not pull).
    #[test]
    fn a_batch_trains_on_exactly_the_rows_it_pulls() {
        // The default model (counts prior), and one with the learned prior (a cluster
        // created before the counts).
        trains_on_exactly_the_rows_it_pulls(ModelSpec::new(4), model::ITEM_COUNTS_TABLE);
        let learned = ModelSpec {
            item_prior: true,
            item_counts: false,
            ..ModelSpec::new(4)
        };
        trains_on_exactly_the_rows_it_pulls(learned, model::ITEM_PRIOR_TABLE);
    }

    fn trains_on_exactly_the_rows_it_pulls(spec: ModelSpec, prior: &'static str) {
        let whole = Whole {
            tower: (0..spec.tower_len())
                .map(|j| value(model::TOWER, 0, j))
                .collect(),
            critic: (0..spec.critic_len())
                .map(|j| value(model::CRITIC, 0, j))
                .collect(),
        };
        let red = model::item_feature_id("color=red");
        let blue = model::item_feature_id("color=blue");
        let user =
            |uid: &str| UserInput::new([("age", "30"), ("dev", "ios")], &[0.5], uid).unwrap();
        let batch = vec![
            TrainExample {
                user: user("u1").with_query("red dress").unwrap(),
                candidates: vec![(1, vec![red]), (2, vec![blue]), (3, vec![])],
                lexical: vec![9, 6, 0],
                shown: 0,
                propensity: 0.5,
                reward: 1.0,
            },
            TrainExample {
                user: user("u2"),
                candidates: vec![(2, vec![blue]), (4, vec![red, blue])],
                lexical: Vec::new(),
                shown: 1,
                propensity: 0.3,
                reward: 0.0,
            },
            TrainExample {
                user: user(""),
                candidates: vec![(5, vec![]), (1, vec![red])],
                lexical: Vec::new(),
                shown: 0,
                propensity: 0.6,
                reward: 1.0,
            },
        ];
        let mut rows = HashMap::new();
        for (table, ids) in wanted(&spec, &batch) {
            let dim = spec.sparse_dim(table);
            for id in ids {
                let mut r = vec![0.0; dim];
                whole.read(table, id, &mut r);
                rows.insert((table, id), r);
            }
        }
        let pulled = Pulled {
            rows,
            tower: whole.tower.clone(),
            critic: whole.critic.clone(),
        };
        let h = Hyper::default();
        let on = |p: &dyn Fn(&mut Grads)| {
            let mut g = Grads::new(&spec);
            p(&mut g);
            g
        };
        let from_pulled = on(&|g| {
            model::backward_batch(&spec, &pulled, &batch, &h, g);
            model::history_updates(&spec, &pulled, &batch, g);
            model::counts_updates(&spec, &pulled, &batch, g);
        });
        let from_whole = on(&|g| {
            model::backward_batch(&spec, &whole, &batch, &h, g);
            model::history_updates(&spec, &whole, &batch, g);
            model::counts_updates(&spec, &whole, &batch, g);
        });
        assert_eq!(from_pulled, from_whole);
        for table in [
            model::ITEM_BIAS_TABLE,
            prior,
            model::CROSS_TABLE,
            model::LEXICAL_TABLE,
            model::HISTORY_TABLE,
            model::USER_TABLE,
        ] {
            assert!(
                from_whole.sparse.keys().any(|(t, _)| *t == table),
                "the batch trains {table}"
            );
        }
    }
}
