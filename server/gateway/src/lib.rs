//! The `gateway` role: a local replica of the model at one sealed epoch, Rank, Feedback,
//! catalog upserts.
//!
//! - [`replica`]: copy-on-write shard views, whole-epoch assembly, atomic publication.
//! - [`service`]: the `freshet.gateway.v1.Gateway` gRPC service.
//! - [`feedback`]: the feedback pipeline; [`impressions`]: what Rank served, for the join.
//! - Subscriber tasks (here): one per shard, streaming `ParameterService/Subscribe`
//!   from a replica of the shard (the leader first), resuming after the last epoch
//!   delivered on any error, so the gateway's epoch never goes backwards.
//!
//! # The Rank path
//!
//! 1. `Gateway/Rank` ([`service::GatewayService`]) validates the request (every error an
//!    INVALID_ARGUMENT naming the field) and takes the published [`replica::Version`]: one
//!    sealed epoch, whole on every shard, never a mix.
//! 2. The user tower runs once on that version (`freshet_model::user_state`), then
//!    [`service::rank_on`] scores every candidate with one `freshet_model::Scorer` (its
//!    own row and β + ρ from the shard's item index) and `freshet_model::sample_slots`
//!    draws K slots (softmax at the temperature, mixed with ε uniform) with the exact
//!    propensity of each.
//! 3. The impression (user input, candidates, shown slots with propensities, the epoch)
//!    goes to [`impressions::ImpressionLog`] under a fresh impression id, which appends it
//!    to the shard owning that id shortly after the answer (write-behind, batched): any
//!    gateway can join feedback to it, and a gateway restart loses nothing but the
//!    window. The answer names the epoch it was served from.
//!
//! # The Feedback path, from the gateway to the optimizer
//!
//! 1. `Gateway/Feedback` ([`feedback::FeedbackPipeline::handle_feedback`]) reads each
//!    event's impression from its shard (or, for one this gateway served, from its cache,
//!    after waiting for its own writer: [`impressions::ImpressionLog::lookup`]), validates
//!    every event before recording any, and
//!    waits on an event id this gateway is already handling ([`feedback::EventLog`]).
//! 2. The examples go to a worker (`Worker/Train`, [`feedback::Workers`] picks one). The
//!    worker claims each event for the step it will go into on the impression's shard
//!    (`ParameterService/AssignEvents`, a log entry) and answers, per event, with the
//!    `(inc, step)` that carries it: its own step, or the step another attempt (through
//!    any gateway) already put it in. The gateway then waits in [`feedback::SealTracker`]
//!    for those steps: sealed (acknowledge, with the epoch), or fenced below the step (send
//!    again: the shard releases a claim fenced below its step). A timeout or a lost answer
//!    is safe to send again too: the claim on the shard decides, so an event trains once.
//! 3. In `freshet-worker`, the step is computed (`freshet_model::backward_batch`) and
//!    pushed under `(inc, step)` by `freshet_client::steps::StepSession` to every shard it
//!    touches (`ParameterService/PushStep`), where the shard state machine buffers it
//!    (`freshet_server::fsm::epoch::StepState`); the worker reports its frontier.
//! 4. The coordinator (`freshet_server::ps::coord`, on the meta leader) commits a `Seal`
//!    with the new cuts in the meta group; each data-shard leader copies it into its own log
//!    as a `ShardSeal` (`freshet_server::ps::seals`).
//! 5. Applying the shard seal (`freshet_server::fsm::ShardState`) applies the buffered
//!    steps within the cuts in `(inc, step)` order through the table's optimizer and emits
//!    the epoch's change set, which `Subscribe` streams to every gateway; the subscriber
//!    tasks here assemble the next whole version, publish it, and tell the
//!    [`feedback::SealTracker`], which acknowledges the Feedback call.

pub mod ann;
pub mod error;
pub mod feedback;
pub mod impressions;
pub mod item_index;
pub mod lexical;
pub mod metrics;
pub mod recommend;
pub mod replica;
pub mod service;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use freshet_client::{ClientOptions, PsClient};
use freshet_proto::gateway::v1::gateway_server::GatewayServer;
use freshet_proto::ps::v1::{
    parameter_service_client::ParameterServiceClient, subscribe_response::Event, SubscribeRequest,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use freshet_proto::FieldError;

pub use error::GatewayError;
use replica::{Assembler, Published, SnapshotBuilder, Update};
use service::GatewayService;

/// Gateway settings, validated once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// PS node addresses to start from (the rest is discovered).
    pub ps: Vec<String>,
    pub temperature_default: f32,
    pub temperature_min: f32,
    pub temperature_max: f32,
    pub epsilon_default: f32,
    pub epsilon_max: f32,
    /// Largest K a Rank may ask for.
    pub slots_max: u32,
    /// Most candidates per Rank (and per Recommend's retrieved set).
    pub candidates_max: usize,
    /// Candidates Recommend retrieves when the call does not say.
    pub retrieve_default: usize,
    /// Random catalog items Recommend adds to its retrieved set when the call does not
    /// say, per item retrieved (0.1: a tenth of `retrieve`).
    pub explore_share_default: f32,
    /// Event ids this gateway remembers, and for how long, so that a retry on the same
    /// gateway waits for the first attempt instead of sending again (the claims on the
    /// shards decide where an event trains; impressions live on the shards, kept as the
    /// cluster config's `impressions` section says).
    pub impressions_max: usize,
    pub impression_ttl_ms: u64,
    pub rpc_timeout_ms: u64,
    /// Active catalog items from which Recommend retrieves through the approximate index
    /// ([`ann`]) instead of scoring every item (0: never).
    pub ann_min_items: usize,
    /// The index's search breadth (it is searched at least 2N wide for N retrieved).
    pub ann_ef: usize,
    /// Least time from the end of one index build to the start of the next.
    pub ann_rebuild_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            ps: Vec::new(),
            // What the simulator measured (see the README's Rank notes).
            temperature_default: 0.2,
            temperature_min: 0.05,
            temperature_max: 20.0,
            epsilon_default: 0.02,
            epsilon_max: 0.5,
            slots_max: 100,
            candidates_max: 1000,
            retrieve_default: 200,
            // The simulator (returning users, retrieve 50 of 200 items): without
            // exploration beyond the retrieved set the live model never recovered from a
            // popularity reshuffle (README, Recommend in the simulator).
            explore_share_default: 0.1,
            impressions_max: 1_000_000,
            impression_ttl_ms: 15 * 60 * 1000,
            rpc_timeout_ms: 5_000,
            // `freshet bench ann` (README, design notes): at 100,000 items the exact pass
            // (1.6-2.2 ms) beats the index (3.3 ms at ef 400); at a million the index is
            // 2.2x faster at ef 600 (7.0 against 15.5 ms per query, recall@100 0.958; ef
            // 400 was 4.4 ms at 0.938, below the 0.95 issue 18 asks) and a build takes
            // about 9 minutes of two cores.
            ann_min_items: 500_000,
            ann_ef: 600,
            ann_rebuild_ms: 10 * 60 * 1000,
        }
    }
}

impl GatewayConfig {
    /// # Errors
    /// INVALID_ARGUMENT naming the bad field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.ps.is_empty() {
            return Err(FieldError::new("ps", "at least one PS node address"));
        }
        if !(self.temperature_min > 0.0
            && self.temperature_min <= self.temperature_default
            && self.temperature_default <= self.temperature_max
            && self.temperature_max.is_finite())
        {
            return Err(FieldError::new(
                "temperature_default",
                "need 0 < temperature_min <= temperature_default <= temperature_max",
            ));
        }
        if !(0.0..=1.0).contains(&self.epsilon_max)
            || !(0.0..=self.epsilon_max).contains(&self.epsilon_default)
        {
            return Err(FieldError::new(
                "epsilon_default",
                "need 0 <= epsilon_default <= epsilon_max <= 1",
            ));
        }
        if !(1..=1000).contains(&self.slots_max) {
            return Err(FieldError::new("slots_max", "must be 1..=1000"));
        }
        if !(1..=100_000).contains(&self.candidates_max) {
            return Err(FieldError::new("candidates_max", "must be 1..=100000"));
        }
        if !(0.0..=1.0).contains(&self.explore_share_default) {
            return Err(FieldError::new(
                "explore_share_default",
                "must be in [0, 1]",
            ));
        }
        if !(1..=self.candidates_max).contains(&self.retrieve_default) {
            return Err(FieldError::new(
                "retrieve_default",
                "must be 1..=candidates_max",
            ));
        }
        if !(1..=10_000).contains(&self.ann_ef) {
            return Err(FieldError::new("ann_ef", "must be 1..=10000"));
        }
        if self.ann_rebuild_ms < 1_000 {
            return Err(FieldError::new("ann_rebuild_ms", "must be at least 1000"));
        }
        if self.impressions_max == 0 || self.impression_ttl_ms == 0 {
            return Err(FieldError::new(
                "impressions_max",
                "impression retention must be non-zero",
            ));
        }
        Ok(())
    }
}

/// Updates queued from subscribers to the assembler.
const UPDATES_QUEUED: usize = 256;

/// Runs a gateway on `listener` until `shutdown` resolves.
///
/// # Errors
/// Invalid config, no PS node reachable, or a gRPC server failure.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GatewayError> {
    config.validate()?;
    crate::metrics::install();
    let opts = ClientOptions {
        deadline: Duration::from_millis(config.rpc_timeout_ms),
        ..ClientOptions::default()
    };
    // The cluster may still be starting: keep trying until shutdown.
    let mut shutdown = std::pin::pin!(shutdown);
    let Some(client) = PsClient::connect_until(&config.ps, &opts, shutdown.as_mut()).await else {
        return Ok(());
    };
    let shard_count = client.shard_count();
    let published = Arc::new(Published::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    let (updates_tx, mut updates_rx) = mpsc::channel::<(u32, Update)>(UPDATES_QUEUED);
    let delivered: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new(
        (0..shard_count)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect(),
    );
    let seals = Arc::new(feedback::SealTracker::default());
    let mut tasks = Vec::new();
    for shard in 0..shard_count {
        tasks.push(tokio::spawn(subscribe_shard(
            Arc::clone(&client),
            shard,
            updates_tx.clone(),
            Arc::clone(&delivered),
            Arc::clone(&seals),
            stop_rx.clone(),
        )));
    }
    {
        // Feedback waits resolve from the change sets; this fills epochs a re-bootstrap
        // skipped, and only polls while someone waits.
        let seals = Arc::clone(&seals);
        let client = Arc::clone(&client);
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                if !seals.has_waiters() {
                    continue;
                }
                if let Ok(r) = client.list_seals(seals.epoch(), 1000).await {
                    for s in &r.seals {
                        seals.observe_seal(s);
                    }
                }
            }
        }));
    }
    drop(updates_tx);
    let (impression_log, impression_writer) =
        impressions::ImpressionLog::start(Arc::clone(&client), stop_rx.clone());
    let assembler_published = Arc::clone(&published);
    let assembler_delivered = Arc::clone(&delivered);
    let assembler_impressions = Arc::clone(&impression_log);
    tasks.push(tokio::spawn(async move {
        let mut a = Assembler::new(shard_count, assembler_published);
        while let Some((shard, update)) = updates_rx.recv().await {
            if let Update::Change(cs) = &update {
                if !cs.forgotten_users.is_empty() {
                    assembler_impressions.forget_users(&cs.forgotten_users);
                }
            }
            match a.offer(shard, update) {
                Ok(Some(epoch)) => {
                    ::metrics::gauge!(crate::metrics::GATEWAY_EPOCH).set(epoch as f64);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(shard, error = %e, "shard update refused"),
            }
            assembler_delivered[shard as usize]
                .store(a.delivered(shard), std::sync::atomic::Ordering::Relaxed);
        }
    }));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let svc = GatewayService::new(
        config.clone(),
        Arc::clone(&client),
        Arc::clone(&published),
        Arc::clone(&seals),
        impression_log,
    );
    // Dropped when `run` returns, by any path: the builder thread then stops.
    let ann_builder = ann::spawn_builder(&config, Arc::clone(&published), Arc::clone(&svc.ann))
        .map_err(|e| GatewayError::internal(format!("starting the index builder: {e}")))?;
    {
        // Serving once the first whole version is published.
        let published = Arc::clone(&published);
        let health = health_reporter.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                if published.current().is_some() {
                    health.set_serving::<GatewayServer<GatewayService>>().await;
                    health
                        .set_service_status("", tonic_health::ServingStatus::Serving)
                        .await;
                    tracing::info!(epoch = published.epoch(), "gateway serving");
                    return;
                }
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }));
    }
    {
        // Epoch lag: how old the visible epoch's seal is.
        let published = Arc::clone(&published);
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                if let Some(v) = published.current() {
                    if v.proposed_at_ms > 0 {
                        let lag = impressions::now_ms().saturating_sub(v.proposed_at_ms);
                        ::metrics::gauge!(crate::metrics::GATEWAY_EPOCH_LAG)
                            .set(lag as f64 / 1000.0);
                    }
                }
            }
        }));
    }

    let (reflection_v1, reflection_v1alpha) = freshet_runtime::grpc::reflection()?;
    let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = metrics_listener.map(|l| {
        tokio::spawn(crate::metrics::serve(l, async {
            let _ = metrics_stop_rx.await;
        }))
    });
    let svc_handle = svc.clone();
    let incoming = freshet_runtime::grpc::incoming(listener);
    let (grpc_stop_tx, grpc_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        freshet_runtime::grpc::server()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(GatewayServer::new(svc))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = grpc_stop_rx.await;
            }),
    );
    shutdown.await;
    tracing::info!("gateway shutting down");
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    svc_handle.stop();
    let _ = grpc_stop_tx.send(());
    freshet_runtime::grpc::stop_server(server).await;
    // No Rank runs any more: make every impression served durable before exiting.
    let _ = stop_tx.send(true);
    let queued = svc_handle.impressions.queued();
    match tokio::time::timeout(impressions::DRAIN_MAX, impression_writer).await {
        Ok(_) => tracing::info!(impressions = queued, "impression log drained"),
        Err(_) => tracing::warn!(
            left = svc_handle.impressions.queued(),
            "impression log not drained in time"
        ),
    }
    drop(ann_builder);
    for t in tasks {
        t.abort();
    }
    let _ = metrics_stop_tx.send(());
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    Ok(())
}

/// Replica addresses of `shard`, leader first.
async fn replica_addrs(client: &PsClient, shard: u32) -> Vec<String> {
    let Ok(status) = client.cluster_status(false).await else {
        return Vec::new();
    };
    let addr_of = |id: u64| {
        status
            .nodes
            .iter()
            .find(|n| n.id == id && n.reachable)
            .map(|n| n.addr.clone())
    };
    let Some(s) = status.shards.iter().find(|s| s.shard == shard) else {
        return Vec::new();
    };
    let mut out: Vec<String> = addr_of(s.leader_id).into_iter().collect();
    for v in &s.voters {
        if let Some(a) = addr_of(*v) {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// Keeps one shard's subscription alive: resumes after the last delivered epoch from
/// whichever replica answers, with capped backoff.
async fn subscribe_shard(
    client: Arc<PsClient>,
    shard: u32,
    updates: mpsc::Sender<(u32, Update)>,
    delivered: Arc<Vec<std::sync::atomic::AtomicU64>>,
    seals: Arc<feedback::SealTracker>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    // Epoch of the last update sent to the assembler (0: nothing yet).
    let mut after: u64 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let addrs = replica_addrs(&client, shard).await;
        for addr in addrs {
            let r = stream_from(
                &addr, shard, &mut after, &updates, &delivered, &seals, &mut stop,
            )
            .await;
            match r {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(shard, addr, error = %e, "subscription interrupted");
                }
            }
            if *stop.borrow() {
                return;
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Idle time after which a subscription is re-established (a replica that stopped
/// sealing, e.g. one cut off from its leader, is left for another).
const IDLE_RECONNECT: Duration = Duration::from_secs(3);

/// Why one subscription ended (the subscriber moves on to the next replica).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("idle for longer than the reconnect bound")]
    Idle,
    #[error("stream ended")]
    Ended,
    #[error("assembler stopped")]
    Stopped,
    #[error(transparent)]
    Replica(#[from] replica::ReplicaError),
}

async fn stream_from(
    addr: &str,
    shard: u32,
    after: &mut u64,
    updates: &mpsc::Sender<(u32, Update)>,
    delivered: &[std::sync::atomic::AtomicU64],
    seals: &feedback::SealTracker,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let ch = freshet_runtime::grpc::endpoint(addr)?.connect().await?;
    let mut ps = ParameterServiceClient::new(ch).max_decoding_message_size(256 << 20);
    let mut stream = ps
        .subscribe(SubscribeRequest {
            shard,
            after_epoch: *after,
        })
        .await?
        .into_inner();
    let mut builder = SnapshotBuilder::default();
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return Ok(()),
            m = tokio::time::timeout(IDLE_RECONNECT, stream.message()) => m,
        };
        let msg = match msg {
            Err(_) => return Err(StreamError::Idle),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(None)) => return Err(StreamError::Ended),
            Ok(Ok(Some(m))) => m,
        };
        let update = match msg.event {
            Some(Event::Snapshot(part)) => match builder.add(&part)? {
                Some(view) => Update::Snapshot(view),
                None => continue,
            },
            Some(Event::Change(cs)) => {
                seals.observe_change(&cs);
                Update::Change(cs)
            }
            None => continue,
        };
        let epoch = match &update {
            Update::Snapshot(v) => v.epoch,
            Update::Change(c) => c.epoch,
        };
        // A lagging replica's older snapshot would move nothing; skip it early.
        if matches!(update, Update::Snapshot(_)) && epoch < *after {
            continue;
        }
        updates
            .send((shard, update))
            .await
            .map_err(|_| StreamError::Stopped)?;
        *after = epoch;
        delivered[shard as usize].store(epoch, std::sync::atomic::Ordering::Relaxed);
    }
}
