//! Roles in this process: PS nodes behind the fault-injecting transport, a gateway, a
//! worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_server::config::{ClusterConfig, TableConfig};
use freshet_server::raft::transport::{GrpcTransport, Transport};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::*;

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
    /// Applied to every node's `fast_config`, at each start.
    edit: fn(&mut freshet_server::config::PsConfig),
}

impl InProcCluster {
    /// Starts `n` nodes hosting `shards` shards with the given tables.
    pub async fn start(n: usize, shards: u32, tables: Vec<TableConfig>) -> Self {
        Self::start_with(n, shards, tables, |_| {}).await
    }

    /// As `start`, with every node's config changed by `edit` (at restarts too).
    pub async fn start_with(
        n: usize,
        shards: u32,
        tables: Vec<TableConfig>,
        edit: fn(&mut freshet_server::config::PsConfig),
    ) -> Self {
        init_tracing();
        // Every node's listener is bound before the config names it and handed to the
        // node as it is: no port is released and bound again, so no other process can
        // take it in between.
        let mut listeners = Vec::with_capacity(n);
        for _ in 0..n {
            listeners.push(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind a node listener"),
            );
        }
        let addrs = listeners
            .iter()
            .map(|l| l.local_addr().expect("bound").to_string())
            .collect();
        let cluster = cluster_at(addrs, shards, tables);
        let mut c = InProcCluster {
            cluster,
            faults: Arc::new(Faults::default()),
            dir: tempfile::tempdir().expect("tempdir"),
            nodes: BTreeMap::new(),
            edit,
        };
        for (id, listener) in (1u64..).zip(listeners) {
            c.start_node_on(id, listener);
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

    /// Restarts node `id`, from its data dir, on its address.
    pub async fn start_node(&mut self, id: u64) {
        let addr = self.addr(id);
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
        self.start_node_on(id, listener);
    }

    /// Starts node `id` serving on `listener`.
    fn start_node_on(&mut self, id: u64, listener: tokio::net::TcpListener) {
        let mut cfg = fast_config(
            id,
            self.dir.path().join(format!("node-{id}")),
            self.cluster.clone(),
        );
        (self.edit)(&mut cfg);
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

    /// Nodes whose run ended without being asked to stop (a fatal error).
    pub fn exited(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.stop.is_some() && n.task.as_ref().is_some_and(|t| t.is_finished()))
            .map(|(id, _)| *id)
            .collect()
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

/// A gateway running in this process.
pub struct InProcGateway {
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl InProcGateway {
    /// A cluster of `n` nodes and `shards` shards whose leaders are elected, and a
    /// gateway following it (what the gateway-facing tests start from).
    pub async fn with_cluster(
        n: usize,
        shards: u32,
        tables: Vec<TableConfig>,
    ) -> (InProcCluster, InProcGateway) {
        let c = InProcCluster::start(n, shards, tables).await;
        let opts = freshet_client::ClientOptions {
            deadline: std::time::Duration::from_secs(10),
            attempt_timeout: std::time::Duration::from_secs(1),
            ..Default::default()
        };
        freshet_client::wait_ready(&c.addrs(), &opts)
            .await
            .expect("leaders elected");
        let g = InProcGateway::start(&c.addrs()).await;
        (c, g)
    }

    /// Starts a gateway on a free port, following the PS nodes at `ps`.
    pub async fn start(ps: &[String]) -> Self {
        Self::start_with(freshet_gateway::GatewayConfig {
            ps: ps.to_vec(),
            ..Default::default()
        })
        .await
    }

    /// Starts a gateway with `cfg` (its `ps` set) on a free port.
    pub async fn start_with(cfg: freshet_gateway::GatewayConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
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

/// A worker running in this process.
pub struct InProcWorker {
    /// Where its Worker service listens (for tests that call Train directly).
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl InProcWorker {
    pub async fn start(ps: &[String]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("bound").to_string();
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
            addr,
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
