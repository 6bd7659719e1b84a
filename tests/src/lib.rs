//! freshet-tests: harnesses for the integration tests in `tests/cluster/`.
//!
//! - [`InProcCluster`]: N PS nodes in this process (real gRPC on 127.0.0.1 port 0),
//!   their peer transport wrapped in shared [`Faults`] (drop, delay, isolate a node,
//!   per-link and per-message-type rules: [`faults`]).
//! - [`ProcCluster`]: N `freshet-server ps` processes on 127.0.0.1 that tests kill -9,
//!   restart from disk, or wipe and replace.
//! - [`Reference`]: replays acknowledged pushes into a fresh state machine to compute
//!   the checksum every replica must have.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::admin::v1::{
    node_status_client::NodeStatusClient, ClusterStatusRequest, ClusterStatusResponse,
};
use freshet_proto::command::v1::{command::Op, Command as Cmd, SparsePush};
use freshet_proto::ps::v1::TableSpec;
use freshet_server::config::{ClusterConfig, ModelSection, NodeAddr, PsConfig, TableConfig};
use freshet_server::fsm::ShardState;
use freshet_server::raft::transport::{GrpcTransport, Transport};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod faults;

pub use faults::{Action, Faults, FaultyTransport, Rule};

/// Logs to the test output when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A small table most tests use.
pub fn test_table(name: &str, dim: u32) -> TableConfig {
    serde_json::from_value(serde_json::json!({
        "name": name, "dim": dim,
        "optimizer": {"type": "adagrad", "lr": 0.1, "initial_accumulator": 0.1},
        "init_scale": 0.05, "seed": 42
    }))
    .expect("valid table")
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// A cluster config of `n` nodes on free 127.0.0.1 ports, replication min(3, n). When
/// `tables` hold the model's tables, the config carries its model section too (default
/// update rule), as `freshet up` writes it.
fn loopback_cluster(n: usize, shards: u32, tables: Vec<TableConfig>) -> ClusterConfig {
    let specs: Vec<TableSpec> = tables.iter().map(TableConfig::to_spec).collect();
    let model = freshet_model::ModelSpec::from_tables(&specs)
        .ok()
        .map(|spec| {
            let json = freshet_local::model_json(&spec, &freshet_model::Hyper::default());
            serde_json::from_value::<ModelSection>(json).expect("model_json is a model section")
        });
    let nodes = (1..=n as u64)
        .map(|id| NodeAddr {
            id,
            addr: free_addr(),
        })
        .collect();
    ClusterConfig {
        nodes,
        shards,
        replication: 3.min(n),
        tables,
        model,
    }
}

/// Status of one node's replicas, straight from that node (no fan-out).
pub async fn node_status(addr: &str, with_checksum: bool) -> Option<ClusterStatusResponse> {
    let ch = freshet_runtime::grpc::endpoint(addr)
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut c = NodeStatusClient::new(ch);
    tokio::time::timeout(
        Duration::from_secs(5),
        c.local_status(ClusterStatusRequest { with_checksum }),
    )
    .await
    .ok()?
    .ok()
    .map(|r| r.into_inner())
}

/// Per shard: node id → (applied index, checksum, role, snapshot index).
pub type Replicas = BTreeMap<u32, BTreeMap<u64, (u64, u64, String, u64)>>;

/// Collects replica status from each address that answers.
pub async fn replicas(addrs: &[String]) -> Replicas {
    let mut out: Replicas = BTreeMap::new();
    for a in addrs {
        if let Some(s) = node_status(a, true).await {
            for sh in s.shards {
                for r in sh.replicas {
                    out.entry(sh.shard).or_default().insert(
                        r.node_id,
                        (r.applied_index, r.checksum, r.role, r.snapshot_index),
                    );
                }
            }
        }
    }
    out
}

/// Waits until every shard has `replicas_per_shard` replicas at one applied index with
/// one checksum, and returns the checksum per shard.
///
/// # Panics
/// When that does not happen within `timeout` (the last status is printed).
pub async fn wait_converged(
    addrs: &[String],
    shards: u32,
    replicas_per_shard: usize,
    timeout: Duration,
) -> BTreeMap<u32, u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = replicas(addrs).await;
        let ok = (0..shards).all(|s| {
            r.get(&s).is_some_and(|reps| {
                reps.len() == replicas_per_shard && {
                    let first = reps.values().next().expect("non-empty");
                    reps.values().all(|x| x.0 == first.0 && x.1 == first.1)
                }
            })
        });
        if ok {
            return r
                .iter()
                .filter(|(s, _)| **s < shards)
                .map(|(s, reps)| (*s, reps.values().next().expect("non-empty").1))
                .collect();
        }
        if Instant::now() > deadline {
            panic!("replicas did not converge: {r:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One acknowledged push, as the client prepared it.
#[derive(Debug, Clone)]
pub struct AckedPush {
    pub shard: u32,
    pub table: String,
    pub client_id: u64,
    pub seq: u64,
    pub ids: Vec<u64>,
    pub grads: Vec<f32>,
}

/// Replays acknowledged pushes, per client in seq order, into fresh state machines.
/// Valid when clients touch disjoint ids and push sequentially: then each row sees its
/// updates in the same order as in any replica's log.
pub struct Reference {
    pub shards: Vec<ShardState>,
}

impl Reference {
    pub fn new(shard_count: u32, tables: &[TableSpec]) -> Self {
        let shards = (0..shard_count)
            .map(|s| {
                let mut st = ShardState::new(s);
                for t in tables {
                    st.apply(
                        &Cmd {
                            op: Some(Op::CreateTable(t.clone())),
                            ..Default::default()
                        },
                        0,
                        0,
                    );
                }
                st
            })
            .collect();
        Reference { shards }
    }

    pub fn replay(&mut self, acked: &[AckedPush]) {
        let mut sorted: Vec<&AckedPush> = acked.iter().collect();
        sorted.sort_by_key(|p| (p.client_id, p.seq, p.shard));
        for (i, p) in sorted.into_iter().enumerate() {
            self.shards[p.shard as usize].apply(
                &Cmd {
                    proposal_id: 0,
                    client_id: p.client_id,
                    seq: p.seq,
                    op: Some(Op::Push(SparsePush {
                        table: p.table.clone(),
                        ids: p.ids.clone(),
                        grads: p.grads.clone(),
                    })),
                },
                i as u64 + 1,
                1,
            );
        }
    }

    pub fn checksums(&self) -> BTreeMap<u32, u64> {
        self.shards
            .iter()
            .map(|s| (s.shard, s.checksum()))
            .collect()
    }
}

/// The checksum every replica of each shard must have at the last of `seals`: the
/// logged steps (every part any worker had acknowledged, in any order) buffered into
/// fresh state machines, then the committed seals applied in epoch order. Only the steps
/// within the committed cuts change the tables, exactly as on the replicas.
pub fn sealed_reference(
    shard_count: u32,
    tables: &[TableSpec],
    parts: &[freshet_proto::ps::v1::PushStepRequest],
    seals: &[freshet_proto::ps::v1::Seal],
) -> BTreeMap<u32, u64> {
    use freshet_proto::command::v1::{ShardSeal, StepPush};
    let mut r = Reference::new(shard_count, tables);
    for p in parts {
        let out = r.shards[p.shard as usize].apply(
            &Cmd {
                op: Some(Op::PushStep(StepPush {
                    inc: p.inc,
                    step: p.step,
                    sparse: p.sparse.clone(),
                    dense: p.dense.clone(),
                })),
                ..Default::default()
            },
            1,
            1,
        );
        assert!(
            matches!(
                out,
                freshet_server::fsm::Outcome::Applied | freshet_server::fsm::Outcome::Duplicate
            ),
            "{out:?}"
        );
    }
    for st in &mut r.shards {
        st.apply(
            &Cmd {
                op: Some(Op::ShardSeal(ShardSeal {
                    seals: seals.to_vec(),
                })),
                ..Default::default()
            },
            2,
            1,
        );
    }
    r.checksums()
}

/// Node settings tests use: fast ticks, frequent snapshots.
pub fn fast_config(node_id: u64, data_dir: PathBuf, cluster: ClusterConfig) -> PsConfig {
    PsConfig {
        node_id,
        data_dir,
        cluster: Some(cluster),
        tick_ms: 20,
        election_ticks: 10,
        heartbeat_ticks: 2,
        snapshot_interval_entries: 200,
        rpc_timeout_ms: 3_000,
        // Tests pick a shard's leader and then act on it; keep leadership where it is.
        leader_balance_ticks: 0,
        lease_ms: 1_000,
        ..PsConfig::default()
    }
}

struct InProcNode {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// N nodes in this process with fault-injecting peer transports.
pub struct InProcCluster {
    pub cluster: ClusterConfig,
    pub faults: Arc<Faults>,
    pub dir: tempfile::TempDir,
    nodes: BTreeMap<u64, InProcNode>,
}

impl InProcCluster {
    /// Starts `n` nodes hosting `shards` shards with the given tables.
    pub async fn start(n: usize, shards: u32, tables: Vec<TableConfig>) -> Self {
        init_tracing();
        let cluster = loopback_cluster(n, shards, tables);
        let mut c = InProcCluster {
            cluster,
            faults: Arc::new(Faults::default()),
            dir: tempfile::tempdir().expect("tempdir"),
            nodes: BTreeMap::new(),
        };
        for id in 1..=n as u64 {
            c.start_node(id).await;
        }
        c
    }

    pub fn addrs(&self) -> Vec<String> {
        self.cluster.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn addr(&self, id: u64) -> String {
        self.cluster
            .nodes
            .iter()
            .find(|n| n.id == id)
            .expect("known node")
            .addr
            .clone()
    }

    /// Starts (or restarts, from its data dir) node `id` on its address.
    pub async fn start_node(&mut self, id: u64) {
        let addr = self.addr(id);
        let cfg = fast_config(
            id,
            self.dir.path().join(format!("node-{id}")),
            self.cluster.clone(),
        );
        let listener = {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::net::TcpListener::bind(&addr).await {
                    Ok(l) => break l,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(error = %e, "rebinding");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("bind {addr}: {e}"),
                }
            }
        };
        let faults = Arc::clone(&self.faults);
        let factory: freshet_server::ps::node::TransportFactory =
            Box::new(move |id, addr, book, rep| {
                let inner: Arc<dyn Transport> = Arc::new(GrpcTransport::new(id, addr, book, rep));
                Arc::new(FaultyTransport::new(id, inner, faults))
            });
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let r = freshet_server::ps::run_with_transport(
                cfg,
                listener,
                None,
                async {
                    let _ = rx.await;
                },
                factory,
            )
            .await;
            if let Err(e) = r {
                panic!("node {id} failed: {e}");
            }
        });
        self.nodes.insert(
            id,
            InProcNode {
                stop: Some(tx),
                task: Some(task),
            },
        );
    }

    /// Gracefully stops node `id` and waits for it.
    pub async fn stop_node(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(s) = n.stop.take() {
                let _ = s.send(());
            }
            if let Some(t) = n.task.take() {
                let _ = t.await;
            }
        }
    }

    pub fn isolate(&self, id: u64) {
        self.faults.isolated.write().insert(id);
    }

    pub fn heal(&self) {
        self.faults.clear();
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
    }
}

/// Path of the `freshet-server` binary built by `cargo build --workspace --bins`.
///
/// # Panics
/// When it has not been built.
pub fn server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FRESHET_SERVER_BIN") {
        return PathBuf::from(p);
    }
    workspace_bin("freshet-server")
}

/// Path of a workspace binary built next to the test executable.
///
/// # Panics
/// When it has not been built.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        bin.display()
    );
    bin
}

/// One `freshet-server ps` process.
pub struct ProcNode {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub join: bool,
    child: Option<Child>,
}

/// N PS processes on 127.0.0.1.
pub struct ProcCluster {
    pub cluster: ClusterConfig,
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, ProcNode>,
    config_path: PathBuf,
}

impl ProcCluster {
    pub fn start(n: usize, shards: u32, tables: Vec<TableConfig>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = loopback_cluster(n, shards, tables);
        let nodes = cluster.nodes.clone();
        let config_path = dir.path().join("cluster-config.json");
        std::fs::write(&config_path, serde_json::to_vec(&cluster).expect("json")).expect("write");
        let mut c = ProcCluster {
            cluster,
            nodes: BTreeMap::new(),
            config_path,
            dir,
        };
        for n in nodes {
            c.nodes.insert(
                n.id,
                ProcNode {
                    id: n.id,
                    data_dir: c.dir.path().join(format!("node-{}", n.id)),
                    addr: n.addr,
                    join: false,
                    child: None,
                },
            );
            c.spawn(n.id);
        }
        c
    }

    /// (Re)starts the process of node `id` with its data dir.
    pub fn spawn(&mut self, id: u64) {
        let log_dir = self.dir.path().to_path_buf();
        let config_path = self.config_path.clone();
        let n = self.nodes.get_mut(&id).expect("known node");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("node-{id}.log")))
            .expect("log file");
        let mut cmd = Command::new(server_bin());
        cmd.arg("ps")
            .args(["--node-id", &id.to_string()])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .args(["--listen", &n.addr])
            .arg("--cluster-config")
            .arg(&config_path)
            .args(["--tick-ms", "20", "--election-ticks", "10"])
            .args(["--snapshot-interval-entries", "200"])
            .args(["--lease-ms", "1000"])
            .env("RUST_LOG", "info")
            // Panic messages, not backtraces, at the end of the log.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if n.join {
            cmd.arg("--join");
        }
        n.child = Some(cmd.spawn().expect("spawn freshet-server"));
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Waits for node `id`'s process to exit: Some(success) or None on timeout.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<bool> {
        let deadline = Instant::now() + timeout;
        let n = self.nodes.get_mut(&id)?;
        loop {
            let c = n.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                n.child = None;
                return Some(status.success());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Adds a brand-new node (empty data dir) that joins under `id`.
    pub fn add_joining(&mut self, id: u64) -> String {
        let addr = free_addr();
        self.nodes.insert(
            id,
            ProcNode {
                id,
                addr: addr.clone(),
                data_dir: self.dir.path().join(format!("node-{id}")),
                join: true,
                child: None,
            },
        );
        self.spawn(id);
        addr
    }

    pub fn remove(&mut self, id: u64) {
        self.kill(id);
        self.nodes.remove(&id);
    }

    pub fn live_addrs(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(|n| n.addr.clone())
            .collect()
    }

    /// The tail of a node's log (for assertion messages).
    pub fn log_tail(&self, id: u64) -> String {
        let s = std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(100)..].join("\n")
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// Clients pushing continuously, each to its own id range, one push at a time; every
/// part is retried under the same (client_id, seq) until acknowledged, never abandoned.
pub struct Pushers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<JoinHandle<Vec<AckedPush>>>,
    pub acked: Arc<std::sync::atomic::AtomicU64>,
}

impl Pushers {
    pub async fn start(
        seeds: &[String],
        clients: usize,
        table: &str,
        dim: usize,
        ids_per_push: usize,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for ci in 0..clients {
            let opts = freshet_client::ClientOptions {
                deadline: Duration::from_secs(5),
                attempt_timeout: Duration::from_secs(1),
                ..Default::default()
            };
            let client = freshet_client::PsClient::connect(seeds, opts)
                .await
                .expect("connect");
            let stop = Arc::clone(&stop);
            let acked = Arc::clone(&acked);
            let table = table.to_string();
            tasks.push(tokio::spawn(async move {
                let mut log = Vec::new();
                let mut k: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    // Disjoint ranges per client; repeats inside a push test summing.
                    let base = (ci as u64 + 1) * 1_000_000;
                    let mut s = k.wrapping_mul(0x9E37_79B9) ^ ci as u64;
                    let ids: Vec<u64> = (0..ids_per_push)
                        .map(|_| {
                            s = freshet_proto::splitmix64(s);
                            base + s % 5_000
                        })
                        .collect();
                    let grads: Vec<f32> = (0..ids_per_push * dim)
                        .map(|j| ((j as u64 + k) % 7) as f32 * 0.1 - 0.3)
                        .collect();
                    let parts = client.prepare_push(&table, &ids, &grads).expect("prepare");
                    for p in &parts {
                        loop {
                            match client.send_push(p).await {
                                Ok(_) => break,
                                Err(freshet_client::ClientError::Status(s)) => {
                                    panic!("push rejected: {s:?}")
                                }
                                Err(e) => tracing::info!(error = %e, "push retry"),
                            }
                        }
                        log.push(AckedPush {
                            shard: p.shard,
                            table: table.clone(),
                            client_id: p.request.client_id,
                            seq: p.request.seq,
                            ids: p.request.ids.clone(),
                            grads: p.request.grads.clone(),
                        });
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                log
            }));
        }
        Pushers { stop, tasks, acked }
    }

    pub fn count(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more pushes are acknowledged (or panics after `timeout`).
    pub async fn wait_more(&self, n: u64, timeout: Duration) {
        let target = self.count() + n;
        let deadline = Instant::now() + timeout;
        while self.count() < target {
            assert!(
                Instant::now() < deadline,
                "pushes stalled at {}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> Vec<AckedPush> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("pusher task"));
        }
        all
    }
}

/// The model's tables (dim `dim`) as cluster config.
pub fn model_tables(dim: usize) -> Vec<TableConfig> {
    freshet_model::ModelSpec { dim }
        .tables()
        .iter()
        .map(|t| TableConfig::from_spec(t).expect("model tables have optimizers"))
        .collect()
}

/// A gateway running in this process.
pub struct InProcGateway {
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl InProcGateway {
    /// Starts a gateway on a free port, following the PS nodes at `ps`.
    pub async fn start(ps: &[String]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let cfg = freshet_gateway::GatewayConfig {
            ps: ps.to_vec(),
            ..Default::default()
        };
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            freshet_gateway::run(cfg, listener, None, async {
                let _ = rx.await;
            })
            .await
            .expect("gateway failed");
        });
        InProcGateway {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn client(
        &self,
    ) -> freshet_proto::gateway::v1::gateway_client::GatewayClient<tonic::transport::Channel> {
        let ch = freshet_runtime::grpc::endpoint(&self.addr)
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to gateway");
        freshet_proto::gateway::v1::gateway_client::GatewayClient::new(ch)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// A `freshet-worker` process.
pub struct ProcWorker {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl ProcWorker {
    /// Starts a worker following the PS nodes at `ps`, logging into `dir`.
    pub fn start(name: &str, ps: &[String], dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(workspace_bin("freshet-worker"))
            .args(["--ps", &ps.join(",")])
            .args(["--listen", &free_addr()])
            .args(["--name", name])
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn freshet-worker");
        ProcWorker {
            name: name.to_string(),
            log,
            child: Some(child),
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGSTOP: the process freezes (no heartbeats, no pushes).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s[s.len().saturating_sub(4000)..].to_string()
    }
}

impl Drop for ProcWorker {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// A worker running in this process.
pub struct InProcWorker {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl InProcWorker {
    pub async fn start(ps: &[String]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let cfg = freshet_worker::WorkerConfig {
            ps: ps.to_vec(),
            name: "inproc".into(),
            ..Default::default()
        };
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            freshet_worker::run(cfg, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("worker failed");
        });
        InProcWorker {
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
