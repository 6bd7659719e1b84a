//! freshet-tests: harnesses for the integration tests in `tests/cluster/`.
//!
//! - [`InProcCluster`]: N PS nodes in this process (real gRPC on 127.0.0.1 port 0),
//!   their peer transport wrapped in shared [`Faults`] (drop, delay, isolate a node,
//!   per-link and per-message-type rules: [`faults`]).
//! - [`ProcCluster`]: N `freshet-server ps` processes on 127.0.0.1 that tests kill -9,
//!   restart from disk, or wipe and replace.
//! - [`Reference`]: replays acknowledged pushes into a fresh state machine to compute
//!   the checksum every replica must have.
//! - [`Cluster`]: what a test does to either kind of cluster (crash a node, restart it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use freshet_proto::admin::v1::{
    node_status_client::NodeStatusClient, ClusterStatusRequest, ClusterStatusResponse,
};
use freshet_proto::ps::v1::TableSpec;
use freshet_server::config::{ClusterConfig, ModelSection, NodeAddr, PsConfig, TableConfig};

pub mod faults;
pub mod inproc;
pub mod procs;
pub mod reference;

pub use faults::{Action, Faults, FaultyTransport, Rule};
pub use inproc::{InProcCluster, InProcGateway, InProcWorker};
pub use procs::{server_bin, workspace_bin, ProcCluster, ProcGateway, ProcNode, ProcWorker};
pub use reference::{sealed_reference, AckedPush, Pushers, Reference};

/// The cluster harness: the same test steps against PS nodes in this process or as
/// processes of the built binary.
pub trait Cluster {
    /// Every node's gRPC address.
    fn node_addrs(&self) -> Vec<String>;
    /// Takes node `id` down: in this process a stop (with its peer links cut first, so
    /// it hands nothing off), as a process kill -9.
    fn crash(&mut self, id: u64) -> impl std::future::Future<Output = ()> + Send;
    /// Starts node `id` again from its data dir, on its address.
    fn restart(&mut self, id: u64) -> impl std::future::Future<Output = ()> + Send;
}

impl Cluster for InProcCluster {
    fn node_addrs(&self) -> Vec<String> {
        self.addrs()
    }

    async fn crash(&mut self, id: u64) {
        self.isolate(id);
        self.stop_node(id).await;
        self.faults.isolated.write().remove(&id);
    }

    async fn restart(&mut self, id: u64) {
        self.start_node(id).await;
    }
}

impl Cluster for ProcCluster {
    fn node_addrs(&self) -> Vec<String> {
        self.live_addrs()
    }

    async fn crash(&mut self, id: u64) {
        self.kill(id);
    }

    async fn restart(&mut self, id: u64) {
        self.spawn(id);
    }
}

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

/// A cluster config of nodes 1..=n at `addrs`, replication min(3, n). When `tables` hold
/// the model's tables, the config carries its model section too (default update rule), as
/// `freshet up` writes it.
fn cluster_at(addrs: Vec<String>, shards: u32, tables: Vec<TableConfig>) -> ClusterConfig {
    let n = addrs.len();
    let specs: Vec<TableSpec> = tables.iter().map(TableConfig::to_spec).collect();
    let model = freshet_model::ModelSpec::from_tables(&specs)
        .ok()
        .map(|spec| {
            let json = freshet_local::model_json(&spec, &freshet_model::Hyper::default());
            serde_json::from_value::<ModelSection>(json).expect("model_json is a model section")
        });
    let nodes = addrs
        .into_iter()
        .zip(1u64..)
        .map(|(addr, id)| NodeAddr { id, addr })
        .collect();
    ClusterConfig {
        nodes,
        shards,
        replication: 3.min(n),
        tables,
        model,
        impressions: Default::default(),
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
        // Reference replays compare exact checksums at a seal the test knows of, and the
        // sealed epoch is part of them: a seal that the clock inserts would race with
        // that. The tests of idle seals turn them on.
        idle_seal_ms: 0,
        ..PsConfig::default()
    }
}

/// The model's tables (dim `dim`) as cluster config.
pub fn model_tables(dim: usize) -> Vec<TableConfig> {
    freshet_model::ModelSpec::new(dim)
        .tables()
        .iter()
        .map(|t| TableConfig::from_spec(t).expect("model tables have optimizers"))
        .collect()
}

/// An UpsertItems call of active catalog items `ids`, with no features and no title.
pub fn plain_items(
    ids: std::ops::RangeInclusive<u64>,
) -> freshet_proto::gateway::v1::UpsertItemsRequest {
    freshet_proto::gateway::v1::UpsertItemsRequest {
        items: ids
            .map(|id| freshet_proto::ps::v1::Item {
                id,
                features: vec![],
                active: true,
                title: String::new(),
            })
            .collect(),
        sets: vec![],
    }
}

/// A Feedback call with one click on `item` at `position` of the impression `impression_id`.
pub fn click(
    impression_id: &str,
    item: u64,
    position: u32,
    event_id: &str,
) -> freshet_proto::gateway::v1::FeedbackRequest {
    use freshet_proto::gateway::v1::{FeedbackEvent, FeedbackRequest, Reward, RewardKind};
    FeedbackRequest {
        events: vec![FeedbackEvent {
            event_id: event_id.into(),
            impression_id: impression_id.into(),
            item_id: item,
            position,
            rewards: vec![Reward {
                kind: RewardKind::Click as i32,
                weight: 0.0,
            }],
            event_time_ms: 0,
        }],
    }
}
