//! freshet-client: the SDK other services use to talk to a Freshet cluster.
//!
//! - [`PsClient`]: routes ids to shards ([`freshet_proto::shard_for`]), caches shard
//!   leaders, follows the leader hint a follower returns (UNAVAILABLE + metadata), retries
//!   with capped exponential backoff under one deadline per call, and numbers pushes for
//!   exactly-once delivery.
//! - Exactly-once: a push is first *prepared* ([`PsClient::prepare_push`]), which fixes
//!   its (client_id, seq) per shard; [`PsClient::send_push`] may then be called again and
//!   again for the same prepared push (after a timeout, a crash of the leader, ...) and
//!   the cluster applies it once.
//! - [`steps::StepSession`]: a training incarnation under the frontier-cut protocol
//!   (register, push steps keyed (inc, step), report the frontier).
//!
//! ```no_run
//! use freshet_client::{ClientOptions, PsClient};
//! use freshet_proto::ps::v1::ReadConsistency;
//!
//! # async fn demo() -> Result<(), freshet_client::ClientError> {
//! let client = PsClient::connect(&["127.0.0.1:7100".to_string()], ClientOptions::default()).await?;
//! // Exactly-once push: prepare once, send (and resend) the same parts.
//! let parts = client.prepare_push("item", &[42], &[0.1; 16])?;
//! for p in &parts {
//!     client.send_push(p).await?;
//! }
//! let (dim, values) = client.pull("item", &[42], ReadConsistency::Linearizable).await?;
//! assert_eq!(values.len(), dim);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use freshet_proto::admin::v1::{
    admin_client::AdminClient, ClusterStatusRequest, ClusterStatusResponse,
};
use freshet_proto::ps::v1::{
    parameter_service_client::ParameterServiceClient, CreateTableRequest, ListTablesRequest,
    PullDenseRequest, PullRequest, PushDenseRequest, PushRequest, PushResponse, ReadConsistency,
    TableSpec,
};
use freshet_proto::{dense_shard, metadata, shard_for};
use std::sync::Mutex;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub mod gateway;
pub mod impressions;
pub mod steps;

/// A lazily connecting channel to `addr` with TCP_NODELAY (small RPCs otherwise wait
/// for delayed ACKs).
///
/// # Errors
/// A malformed address.
pub fn endpoint(addr: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy())
}

/// The most ids one Pull or PushStep call names (the PS's default `rows_per_call_max`);
/// longer reads are split into several calls, larger steps into parts.
pub const ROWS_PER_CALL: usize = 16_384;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cluster answered with a non-retryable status.
    #[error("{0}")]
    Status(#[from] Status),
    #[error("deadline exceeded after {attempts} attempts; last error: {last}")]
    Deadline { attempts: u32, last: String },
    #[error("no node reachable: {0}")]
    NoNode(String),
    #[error("invalid input: {0}")]
    Invalid(String),
}

/// Retry and deadline settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Budget of one logical call, retries included.
    pub deadline: Duration,
    /// Per-attempt RPC timeout.
    pub attempt_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(500),
        }
    }
}

/// One shard's part of a push, with its exactly-once key fixed.
#[derive(Debug, Clone)]
pub struct ShardPush {
    pub shard: u32,
    pub request: PushRequest,
}

/// Retryable: the node is not the leader, is down, or is overloaded.
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
    )
}

/// A cluster handle. Cheap to share behind an `Arc`.
pub struct PsClient {
    client_id: u64,
    shard_count: u32,
    opts: ClientOptions,
    nodes: Mutex<Vec<String>>,
    leaders: Mutex<HashMap<u32, String>>,
    channels: Mutex<HashMap<String, Channel>>,
    seqs: Mutex<HashMap<u32, u64>>,
    rotor: AtomicUsize,
}

impl PsClient {
    /// [`PsClient::connect`] retried every 500 ms (the cluster may still be starting)
    /// until it succeeds, or None once `shutdown` resolves first. Roles call this at
    /// start-up.
    pub async fn connect_until<F: std::future::Future>(
        seeds: &[String],
        opts: &ClientOptions,
        mut shutdown: std::pin::Pin<&mut F>,
    ) -> Option<Arc<Self>> {
        loop {
            tokio::select! {
                _ = &mut shutdown => return None,
                r = PsClient::connect(seeds, opts.clone()) => match r {
                    Ok(c) => return Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "PS cluster not reachable yet");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
            }
        }
    }

    /// Connects through any of `seeds` and learns the shard count, nodes and leaders.
    ///
    /// # Errors
    /// No seed answered within the deadline.
    pub async fn connect(seeds: &[String], opts: ClientOptions) -> Result<Arc<Self>, ClientError> {
        if seeds.is_empty() {
            return Err(ClientError::Invalid("no seed addresses".into()));
        }
        let client = PsClient {
            client_id: loop {
                let id: u64 = rand::random();
                if id != 0 {
                    break id;
                }
            },
            shard_count: 0,
            opts,
            nodes: Mutex::new(seeds.to_vec()),
            leaders: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            seqs: Mutex::new(HashMap::new()),
            rotor: AtomicUsize::new(0),
        };
        let status = client.cluster_status(false).await?;
        let mut c = client;
        c.shard_count = status.shard_count;
        c.learn(&status);
        Ok(Arc::new(c))
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    fn learn(&self, status: &ClusterStatusResponse) {
        let addr_of: HashMap<u64, String> = status
            .nodes
            .iter()
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        {
            let mut nodes = self.nodes.lock().expect("lock");
            for n in &status.nodes {
                if !nodes.contains(&n.addr) {
                    nodes.push(n.addr.clone());
                }
            }
        }
        let mut leaders = self.leaders.lock().expect("lock");
        for s in &status.shards {
            if let Some(a) = addr_of.get(&s.leader_id) {
                leaders.insert(s.shard, a.clone());
            }
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut chans = self.channels.lock().expect("lock");
        if let Some(c) = chans.get(addr) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ClientError::Invalid(format!("address {addr}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let ch = ep.connect_lazy();
        chans.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn pick(&self, shard: Option<u32>) -> Option<String> {
        if let Some(s) = shard {
            if let Some(a) = self.leaders.lock().expect("lock").get(&s) {
                return Some(a.clone());
            }
        }
        let nodes = self.nodes.lock().expect("lock");
        if nodes.is_empty() {
            return None;
        }
        let i = self.rotor.fetch_add(1, Ordering::Relaxed) % nodes.len();
        Some(nodes[i].clone())
    }

    /// Runs `f` against the right node until it succeeds, fails for good, or the
    /// deadline passes. Follows leader hints and rotates through nodes otherwise.
    pub(crate) async fn call<T, F, Fut>(&self, shard: Option<u32>, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + self.opts.deadline;
        let mut backoff = self.opts.backoff_initial;
        let mut attempts = 0u32;
        let mut last = String::from("no attempt");
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Deadline { attempts, last });
            }
            let Some(addr) = self.pick(shard) else {
                return Err(ClientError::NoNode("no known node".into()));
            };
            attempts += 1;
            let timeout = self.opts.attempt_timeout.min(deadline - now);
            let ch = self.channel(&addr)?;
            match f(ch, timeout).await {
                Ok(v) => {
                    if let Some(s) = shard {
                        self.leaders.lock().expect("lock").insert(s, addr);
                    }
                    return Ok(v);
                }
                Err(status) if retryable(&status) => {
                    last = format!("{addr}: {:?} {}", status.code(), status.message());
                    let hint = status
                        .metadata()
                        .get(metadata::LEADER_ADDR)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    if let Some(s) = shard {
                        let mut leaders = self.leaders.lock().expect("lock");
                        match &hint {
                            Some(h) if *h != addr => {
                                leaders.insert(s, h.clone());
                                // A fresh hint is worth trying at once.
                                continue;
                            }
                            _ => {
                                leaders.remove(&s);
                            }
                        }
                    }
                    tokio::time::sleep(
                        backoff.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                    backoff = (backoff * 2).min(self.opts.backoff_max);
                }
                Err(status) => return Err(ClientError::Status(status)),
            }
        }
    }

    /// Splits a push by shard and assigns each part its exactly-once (client_id, seq).
    ///
    /// # Errors
    /// `grads.len()` is not a multiple of `ids.len()`.
    pub fn prepare_push(
        &self,
        table: &str,
        ids: &[u64],
        grads: &[f32],
    ) -> Result<Vec<ShardPush>, ClientError> {
        if ids.is_empty() || !grads.len().is_multiple_of(ids.len()) {
            return Err(ClientError::Invalid(
                "grads must be ids.len() * dim values".into(),
            ));
        }
        let dim = grads.len() / ids.len();
        let mut parts: HashMap<u32, (Vec<u64>, Vec<f32>)> = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            let p = parts.entry(shard_for(*id, self.shard_count)).or_default();
            p.0.push(*id);
            p.1.extend_from_slice(&grads[i * dim..(i + 1) * dim]);
        }
        let mut seqs = self.seqs.lock().expect("lock");
        let mut out: Vec<ShardPush> = parts
            .into_iter()
            .map(|(shard, (ids, grads))| {
                let seq = seqs.entry(shard).or_insert(0);
                *seq += 1;
                ShardPush {
                    shard,
                    request: PushRequest {
                        shard,
                        table: table.to_string(),
                        ids,
                        grads,
                        client_id: self.client_id,
                        seq: *seq,
                    },
                }
            })
            .collect();
        out.sort_by_key(|p| p.shard);
        Ok(out)
    }

    /// Delivers one prepared part; safe to call again with the same part.
    ///
    /// # Errors
    /// A non-retryable status (bad input) or the deadline.
    pub async fn send_push(&self, part: &ShardPush) -> Result<PushResponse, ClientError> {
        self.call(Some(part.shard), |ch, timeout| {
            let mut req = tonic::Request::new(part.request.clone());
            req.set_timeout(timeout);
            async move {
                let mut c = ParameterServiceClient::new(ch).max_decoding_message_size(64 << 20);
                c.push(req).await.map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Pushes gradients of `ids` (row-major, `dim` per id) to their shards in parallel.
    /// On error, parts may or may not have been applied: use [`Self::prepare_push`] and
    /// [`Self::send_push`] to retry them exactly once.
    ///
    /// # Errors
    /// As [`Self::send_push`].
    pub async fn push(&self, table: &str, ids: &[u64], grads: &[f32]) -> Result<(), ClientError> {
        let parts = self.prepare_push(table, ids, grads)?;
        let results = futures::future::join_all(parts.iter().map(|p| self.send_push(p))).await;
        for r in results {
            r?;
        }
        Ok(())
    }

    /// Reads rows (in request order, `dim` floats each) from their shards in parallel.
    ///
    /// # Errors
    /// A non-retryable status or the deadline.
    pub async fn pull(
        &self,
        table: &str,
        ids: &[u64],
        consistency: ReadConsistency,
    ) -> Result<(usize, Vec<f32>), ClientError> {
        self.pull_at(table, ids, consistency, 0).await
    }

    /// [`PsClient::pull`] from replicas that have applied sealed epoch `min_epoch` (read
    /// your own writes: name the epoch that sealed your steps; 0 for any).
    ///
    /// # Errors
    /// A non-retryable status or the deadline.
    pub async fn pull_at(
        &self,
        table: &str,
        ids: &[u64],
        consistency: ReadConsistency,
        min_epoch: u64,
    ) -> Result<(usize, Vec<f32>), ClientError> {
        if ids.is_empty() {
            return Err(ClientError::Invalid("ids must not be empty".into()));
        }
        let mut parts: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            parts
                .entry(shard_for(*id, self.shard_count))
                .or_default()
                .push(i);
        }
        // Calls are split by size: a shard answers at most ROWS_PER_CALL ids per
        // call, and a step that reads more (1,000 candidates × 64 features) must still
        // be readable. Each chunk reads at `min_epoch` or later on its own.
        let calls = parts
            .iter()
            .flat_map(|(shard, idx)| idx.chunks(ROWS_PER_CALL).map(move |c| (*shard, c)))
            .map(|(shard, chunk)| {
                let sub: Vec<u64> = chunk.iter().map(|i| ids[*i]).collect();
                async move {
                    let r = self
                        .pull_shard_at(shard, table, sub, consistency, min_epoch)
                        .await?;
                    Ok::<_, ClientError>((chunk, r))
                }
            });
        let results = futures::future::join_all(calls).await;
        let mut dim = 0usize;
        let mut out = Vec::new();
        for r in results {
            let (chunk, (d, values)) = r?;
            if out.is_empty() {
                dim = d;
                out = vec![0.0f32; ids.len() * dim];
            }
            for (k, i) in chunk.iter().enumerate() {
                out[i * dim..(i + 1) * dim].copy_from_slice(&values[k * dim..(k + 1) * dim]);
            }
        }
        Ok((dim, out))
    }

    /// Reads rows that all live on `shard`.
    ///
    /// # Errors
    /// A non-retryable status or the deadline.
    pub async fn pull_shard(
        &self,
        shard: u32,
        table: &str,
        ids: Vec<u64>,
        consistency: ReadConsistency,
    ) -> Result<(usize, Vec<f32>), ClientError> {
        self.pull_shard_at(shard, table, ids, consistency, 0).await
    }

    async fn pull_shard_at(
        &self,
        shard: u32,
        table: &str,
        ids: Vec<u64>,
        consistency: ReadConsistency,
        min_epoch: u64,
    ) -> Result<(usize, Vec<f32>), ClientError> {
        let local = consistency == ReadConsistency::Local;
        let resp = self
            .call(if local { None } else { Some(shard) }, |ch, timeout| {
                let mut req = tonic::Request::new(PullRequest {
                    shard,
                    table: table.to_string(),
                    ids: ids.clone(),
                    consistency: consistency as i32,
                    min_epoch,
                });
                req.set_timeout(timeout);
                async move {
                    let mut c = ParameterServiceClient::new(ch).max_decoding_message_size(64 << 20);
                    c.pull(req).await.map(|r| r.into_inner())
                }
            })
            .await?;
        Ok((resp.dim as usize, resp.values))
    }

    /// Reads a dense tensor.
    ///
    /// # Errors
    /// A non-retryable status or the deadline.
    pub async fn pull_dense(&self, name: &str) -> Result<Vec<f32>, ClientError> {
        self.pull_dense_at(name, 0).await
    }

    /// [`PsClient::pull_dense`] from a replica that has applied sealed epoch `min_epoch`.
    ///
    /// # Errors
    /// A non-retryable status or the deadline.
    pub async fn pull_dense_at(&self, name: &str, min_epoch: u64) -> Result<Vec<f32>, ClientError> {
        let shard = dense_shard(name, self.shard_count);
        let r = self
            .call(Some(shard), |ch, timeout| {
                let mut req = tonic::Request::new(PullDenseRequest {
                    shard,
                    name: name.to_string(),
                    consistency: ReadConsistency::Linearizable as i32,
                    min_epoch,
                });
                req.set_timeout(timeout);
                async move {
                    ParameterServiceClient::new(ch)
                        .pull_dense(req)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(r.values)
    }

    /// Pushes a dense gradient exactly once (its seq is fixed before the first attempt).
    ///
    /// # Errors
    /// A non-retryable status or the deadline.
    pub async fn push_dense(&self, name: &str, grads: &[f32]) -> Result<(), ClientError> {
        let shard = dense_shard(name, self.shard_count);
        let seq = {
            let mut seqs = self.seqs.lock().expect("lock");
            let s = seqs.entry(shard).or_insert(0);
            *s += 1;
            *s
        };
        self.call(Some(shard), |ch, timeout| {
            let mut req = tonic::Request::new(PushDenseRequest {
                shard,
                name: name.to_string(),
                grads: grads.to_vec(),
                client_id: self.client_id,
                seq,
            });
            req.set_timeout(timeout);
            async move {
                ParameterServiceClient::new(ch)
                    .push_dense(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await?;
        Ok(())
    }

    /// Creates a table on every shard (idempotent for an identical spec).
    ///
    /// # Errors
    /// ALREADY_EXISTS for a different spec, INVALID_ARGUMENT for a bad one.
    pub async fn create_table(&self, spec: TableSpec) -> Result<bool, ClientError> {
        let r = self
            .call(None, |ch, timeout| {
                let mut req = tonic::Request::new(CreateTableRequest {
                    spec: Some(spec.clone()),
                    shards: vec![],
                    update_optimizer: false,
                });
                req.set_timeout(timeout);
                async move {
                    ParameterServiceClient::new(ch)
                        .create_table(req)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(r.created)
    }

    /// Lists the tables.
    ///
    /// # Errors
    /// No node answered.
    pub async fn list_tables(&self) -> Result<Vec<TableSpec>, ClientError> {
        let r = self
            .call(None, |ch, _| async move {
                ParameterServiceClient::new(ch)
                    .list_tables(ListTablesRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await?;
        Ok(r.tables)
    }

    /// Cluster-wide status (fanned out by the node that answers).
    ///
    /// # Errors
    /// No node answered.
    pub async fn cluster_status(
        &self,
        with_checksum: bool,
    ) -> Result<ClusterStatusResponse, ClientError> {
        let r = self
            .call(None, |ch, timeout| {
                let mut req = tonic::Request::new(ClusterStatusRequest { with_checksum });
                req.set_timeout(timeout.max(Duration::from_secs(5)));
                async move {
                    AdminClient::new(ch)
                        .cluster_status(req)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        self.learn(&r);
        Ok(r)
    }

    /// Admin client for the node at `addr`.
    ///
    /// # Errors
    /// A malformed address.
    pub fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, ClientError> {
        Ok(AdminClient::new(self.channel(addr)?))
    }

    /// Admin call routed to the leader of `shard` (follows hints, retries).
    ///
    /// # Errors
    /// A non-retryable status or the deadline.
    pub async fn admin_on_leader<T, F, Fut>(&self, shard: u32, f: F) -> Result<T, ClientError>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.call(Some(shard), |ch, _| f(AdminClient::new(ch)))
            .await
    }

    /// Forgets cached leaders and connections to `addr` (it is known to be gone).
    pub fn forget(&self, addr: &str) {
        self.channels.lock().expect("lock").remove(addr);
        self.leaders.lock().expect("lock").retain(|_, a| a != addr);
    }
}

/// Connects and waits until every shard has a leader.
///
/// # Errors
/// The cluster did not become ready in 60 s (a loaded machine can take a while to
/// elect every shard's leader from cold processes).
pub async fn wait_ready(
    addrs: &[String],
    copts: &ClientOptions,
) -> Result<Arc<PsClient>, ClientError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(c) = PsClient::connect(addrs, copts.clone()).await {
            if let Ok(s) = c.cluster_status(false).await {
                if s.shards.len() as u32 == s.shard_count
                    && s.shards.iter().all(|s| s.leader_id != 0)
                {
                    return Ok(c);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(ClientError::NoNode(format!(
                "cluster at {addrs:?} not ready after 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
