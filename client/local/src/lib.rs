//! A local multi-process cluster on 127.0.0.1: what `freshet up` and `freshet bench` run.
//!
//! The data dir holds `local.json` (the chosen ports and the cluster config, written on
//! the first start so a second `up` resumes with the same addresses), `cluster.json`
//! (every running process: role, id, gRPC and metrics address, pid; rewritten whenever
//! one is (re)started) and one sub-directory and log file per PS node, one log file per
//! gateway and worker.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use freshet_runtime::{lock_dir, DirLock};
use serde::{Deserialize, Serialize};

/// What `local.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLayout {
    pub nodes: Vec<LocalNode>,
    /// The cluster config handed to every node on first start.
    pub cluster: serde_json::Value,
    #[serde(default)]
    pub gateways: Vec<LocalNode>,
    #[serde(default)]
    pub workers: Vec<LocalNode>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalNode {
    pub id: u64,
    pub grpc: String,
    pub metrics: String,
}

/// One line of `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningNode {
    pub role: String,
    pub id: u64,
    pub grpc: String,
    pub metrics: String,
    pub pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub nodes: Vec<RunningNode>,
}

/// Options of a local cluster.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub data_dir: PathBuf,
    pub nodes: usize,
    pub shards: u32,
    pub server_bin: PathBuf,
    pub worker_bin: PathBuf,
    pub extra_args: Vec<String>,
    /// Table definitions (JSON values of the cluster config's `tables`).
    pub tables: serde_json::Value,
    /// The cluster config's `model` section (see [`model_json`]); none for a plain
    /// parameter store.
    pub model: Option<serde_json::Value>,
    /// Gateways and workers to run next to the PS nodes (on a first start).
    pub gateways: usize,
    pub workers: usize,
}

/// The model's `model` section of a cluster config: stored in the meta group at bootstrap,
/// read by every gateway and worker.
pub fn model_json(spec: &freshet_model::ModelSpec, h: &freshet_model::Hyper) -> serde_json::Value {
    serde_json::to_value(freshet_model::config::ModelSection::new(spec, h))
        .expect("a model section serialises")
}

/// The model's tables as cluster-config JSON (what `freshet up` creates).
pub fn model_tables_json(spec: &freshet_model::ModelSpec) -> serde_json::Value {
    let tables: Vec<freshet_model::config::TableConfig> = spec
        .tables()
        .iter()
        .map(|t| {
            freshet_model::config::TableConfig::from_spec(t)
                .expect("the model's tables have optimizers")
        })
        .collect();
    serde_json::to_value(tables).expect("tables serialise")
}

/// A free port. Its listener is parked until the process exits the layout step (see
/// [`PORTS_HELD`]) so that no two ports of one layout can come out equal.
fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    PORTS_HELD.with(|h| h.borrow_mut().push(l));
    Ok(port)
}

thread_local! {
    /// Listeners held while a layout picks its ports; released before processes start.
    static PORTS_HELD: std::cell::RefCell<Vec<TcpListener>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Finds `freshet-server`: next to the running executable, else on PATH.
pub fn default_server_bin() -> PathBuf {
    sibling_bin("freshet-server")
}

/// Finds `freshet-worker`: next to the running executable, else on PATH.
pub fn default_worker_bin() -> PathBuf {
    sibling_bin("freshet-worker")
}

fn sibling_bin(name: &str) -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            for cand in [dir.join(name), dir.join("..").join(name)] {
                if cand.exists() {
                    return cand;
                }
            }
        }
    }
    PathBuf::from(name)
}

fn endpoints(n: usize, first_id: u64) -> anyhow::Result<Vec<LocalNode>> {
    (0..n as u64)
        .map(|i| {
            Ok(LocalNode {
                id: first_id + i,
                grpc: format!("127.0.0.1:{}", free_port()?),
                metrics: format!("127.0.0.1:{}", free_port()?),
            })
        })
        .collect()
}

/// A running local cluster; nodes are child processes.
pub struct LocalCluster {
    pub opts: LocalOptions,
    pub layout: LocalLayout,
    children: Vec<Option<Child>>,
    _lock: DirLock,
}

impl LocalCluster {
    /// Loads `local.json` from the data dir, or picks free ports and writes it.
    ///
    /// # Errors
    /// I/O errors or a malformed `local.json`.
    pub fn prepare(opts: LocalOptions) -> anyhow::Result<Self> {
        let lock = lock_dir(&opts.data_dir)?;
        let path = opts.data_dir.join("local.json");
        let layout = if path.exists() {
            let l: LocalLayout = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("parsing {}", path.display()))?;
            l
        } else {
            if opts.nodes < 1 {
                bail!("need at least one node");
            }
            let mut nodes = Vec::new();
            for id in 1..=opts.nodes as u64 {
                nodes.push(LocalNode {
                    id,
                    grpc: format!("127.0.0.1:{}", free_port()?),
                    metrics: format!("127.0.0.1:{}", free_port()?),
                });
            }
            let mut cluster = serde_json::json!({
                "nodes": nodes.iter().map(|n| serde_json::json!({"id": n.id, "addr": n.grpc})).collect::<Vec<_>>(),
                "shards": opts.shards,
                "replication": opts.nodes.min(3),
                "tables": opts.tables,
            });
            if let Some(m) = &opts.model {
                cluster["model"] = m.clone();
            }
            let l = LocalLayout {
                nodes,
                cluster,
                gateways: endpoints(opts.gateways, 1)?,
                workers: endpoints(opts.workers, 1)?,
            };
            std::fs::write(&path, serde_json::to_vec_pretty(&l)?)?;
            l
        };
        // Every port is chosen: let the processes bind them.
        PORTS_HELD.with(|h| h.borrow_mut().clear());
        std::fs::write(
            opts.data_dir.join("cluster-config.json"),
            serde_json::to_vec_pretty(&layout.cluster)?,
        )?;
        check_ports(&layout, &opts.data_dir)?;
        let n = layout.nodes.len() + layout.gateways.len() + layout.workers.len();
        Ok(LocalCluster {
            opts,
            layout,
            children: (0..n).map(|_| None).collect(),
            _lock: lock,
        })
    }

    fn node_dir(&self, id: u64) -> PathBuf {
        self.opts.data_dir.join(format!("node-{id}"))
    }

    /// Every process of the layout: (role, endpoint), PS nodes first.
    fn procs(&self) -> Vec<(&'static str, LocalNode)> {
        let l = &self.layout;
        l.nodes
            .iter()
            .map(|n| ("ps", n.clone()))
            .chain(l.gateways.iter().map(|n| ("gateway", n.clone())))
            .chain(l.workers.iter().map(|n| ("worker", n.clone())))
            .collect()
    }

    /// Starts process `idx` (0-based, PS nodes first) as a child process.
    ///
    /// # Errors
    /// The binary cannot be started.
    pub fn start_node(&mut self, idx: usize) -> anyhow::Result<()> {
        let (role, n) = self.procs()[idx].clone();
        let name = if role == "ps" {
            format!("node-{}", n.id)
        } else {
            format!("{role}-{}", n.id)
        };
        let log_path = self.opts.data_dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let ps = self.addrs().join(",");
        let mut cmd = match role {
            "ps" => {
                let mut c = Command::new(&self.opts.server_bin);
                c.arg("ps")
                    .arg("--node-id")
                    .arg(n.id.to_string())
                    .arg("--data-dir")
                    .arg(self.node_dir(n.id))
                    .arg("--cluster-config")
                    .arg(self.opts.data_dir.join("cluster-config.json"))
                    .args(&self.opts.extra_args);
                c
            }
            "gateway" => {
                let mut c = Command::new(&self.opts.server_bin);
                c.arg("gateway").args(["--ps", &ps]);
                c
            }
            _ => {
                let mut c = Command::new(&self.opts.worker_bin);
                c.args(["--ps", &ps]).args(["--name", &name]);
                c
            }
        };
        let child = cmd
            .arg("--listen")
            .arg(&n.grpc)
            .arg("--metrics-listen")
            .arg(&n.metrics)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the {role} process"))?;
        self.children[idx] = Some(child);
        self.write_cluster_file()
    }

    /// Starts every node.
    ///
    /// # Errors
    /// As [`Self::start_node`].
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.children.len() {
            self.start_node(i)?;
        }
        Ok(())
    }

    /// Rewrites `cluster.json` with the running nodes.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_cluster_file(&self) -> anyhow::Result<()> {
        let nodes = self
            .procs()
            .into_iter()
            .zip(&self.children)
            .filter_map(|((role, n), c)| {
                c.as_ref().map(|c| RunningNode {
                    role: role.into(),
                    id: n.id,
                    grpc: n.grpc.clone(),
                    metrics: n.metrics.clone(),
                    pid: c.id(),
                })
            })
            .collect();
        let path = self.opts.data_dir.join("cluster.json");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&ClusterFile { nodes })?)?;
        std::fs::rename(tmp, path)?;
        Ok(())
    }

    pub fn addrs(&self) -> Vec<String> {
        self.layout.nodes.iter().map(|n| n.grpc.clone()).collect()
    }

    pub fn pid(&self, idx: usize) -> Option<u32> {
        self.children[idx].as_ref().map(Child::id)
    }

    /// Restarts processes that exited on their own; returns which ("role id").
    ///
    /// # Errors
    /// A process cannot be restarted.
    pub fn supervise(&mut self) -> anyhow::Result<Vec<String>> {
        let mut restarted = Vec::new();
        for i in 0..self.children.len() {
            let exited = match self.children[i].as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => false,
            };
            if exited {
                let (role, n) = self.procs()[i].clone();
                tracing::warn!(role, id = n.id, "process exited; restarting");
                self.start_node(i)?;
                restarted.push(format!("{role} {}", n.id));
            }
        }
        Ok(restarted)
    }

    /// Gateway addresses.
    pub fn gateway_addrs(&self) -> Vec<String> {
        self.layout
            .gateways
            .iter()
            .map(|n| n.grpc.clone())
            .collect()
    }

    pub fn worker_addrs(&self) -> Vec<String> {
        self.layout.workers.iter().map(|n| n.grpc.clone()).collect()
    }

    /// The process index of gateway `g` (for [`LocalCluster::pid`]).
    pub fn gateway_index(&self, g: usize) -> usize {
        self.layout.nodes.len() + g
    }

    /// Index (for `pid`) of worker `w` (0-based).
    pub fn worker_index(&self, w: usize) -> usize {
        self.layout.nodes.len() + self.layout.gateways.len() + w
    }

    /// Sends SIGTERM to every process and waits (bounded) for them; SIGKILL after
    /// `grace`. Gateways and workers stop first, then the PS nodes.
    pub fn stop(&mut self, grace: Duration) {
        let n_ps = self.layout.nodes.len();
        for c in self.children[n_ps..].iter().flatten() {
            signal(c.id(), libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace / 3;
        for slot in &mut self.children[n_ps..] {
            if let Some(c) = slot.as_mut() {
                while !matches!(c.try_wait(), Ok(Some(_))) {
                    if std::time::Instant::now() >= deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            *slot = None;
        }
        for c in self.children.iter().flatten() {
            signal(c.id(), libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        for slot in &mut self.children {
            if let Some(c) = slot.as_mut() {
                loop {
                    if matches!(c.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    if std::time::Instant::now() >= deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            *slot = None;
        }
        let _ = self.write_cluster_file();
    }

    pub fn data_dir(&self) -> &Path {
        &self.opts.data_dir
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.children.iter().any(Option::is_some) {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Checks that every port of `layout` can be bound (before starting its processes).
///
/// # Errors
/// A port is taken; the message names the process and what to do.
pub fn check_ports(layout: &LocalLayout, data_dir: &Path) -> anyhow::Result<()> {
    let procs = layout
        .nodes
        .iter()
        .map(|n| ("ps node", n))
        .chain(layout.gateways.iter().map(|n| ("gateway", n)))
        .chain(layout.workers.iter().map(|n| ("worker", n)));
    for (role, n) in procs {
        for addr in [&n.grpc, &n.metrics] {
            if let Err(e) = std::net::TcpListener::bind(addr.as_str()) {
                bail!(
                    "port {addr} of {role} {} is in use ({e}); stop whatever holds it, or \
                     remove {} to pick new ports",
                    n.id,
                    data_dir.join("local.json").display()
                );
            }
        }
    }
    Ok(())
}

/// Starts a local cluster from scratch in `<tmp>/freshet-<name>-<pid>` (cleared first;
/// `opts.data_dir` is replaced by it) and waits until every shard has a leader: how the
/// benches and the simulator start theirs. Returns the cluster and a connected client.
///
/// # Errors
/// The processes did not start or the shards did not elect leaders in time.
pub async fn start_fresh(
    mut opts: LocalOptions,
    name: &str,
    copts: &freshet_client::ClientOptions,
) -> anyhow::Result<(LocalCluster, std::sync::Arc<freshet_client::PsClient>)> {
    let dir = std::env::temp_dir().join(format!("freshet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    opts.data_dir = dir;
    let mut cluster = LocalCluster::prepare(opts)?;
    cluster.start_all()?;
    let client = freshet_client::wait_ready(&cluster.addrs(), copts).await?;
    Ok((cluster, client))
}

/// A fresh local cluster with the model (3 PS nodes with fsync on and the model's
/// tables, a gateway, `workers` workers; see [`start_fresh`]); returns it with the
/// gateway's address. [`fresh_cluster_gateways`] for more gateways.
///
/// # Errors
/// The processes did not start or the shards did not elect leaders within 60 s.
pub async fn fresh_cluster(
    server_bin: &std::path::Path,
    worker_bin: &std::path::Path,
    shards: u32,
    workers: usize,
    name: &str,
) -> anyhow::Result<(LocalCluster, String)> {
    let (c, gws) = fresh_cluster_gateways(server_bin, worker_bin, shards, workers, 1, name).await?;
    Ok((c, gws[0].clone()))
}

/// [`fresh_cluster`] with `gateways` gateways; returns their addresses.
///
/// # Errors
/// The processes did not start or the shards did not elect leaders within 60 s.
pub async fn fresh_cluster_gateways(
    server_bin: &std::path::Path,
    worker_bin: &std::path::Path,
    shards: u32,
    workers: usize,
    gateways: usize,
    name: &str,
) -> anyhow::Result<(LocalCluster, Vec<String>)> {
    let opts = LocalOptions {
        data_dir: PathBuf::new(),
        nodes: 3,
        shards,
        server_bin: server_bin.to_path_buf(),
        worker_bin: worker_bin.to_path_buf(),
        extra_args: vec![],
        tables: model_tables_json(&freshet_model::ModelSpec::default()),
        model: Some(model_json(
            &freshet_model::ModelSpec::default(),
            &freshet_model::Hyper::default(),
        )),
        gateways,
        workers,
    };
    let (cluster, _) = start_fresh(opts, name, &freshet_client::ClientOptions::default()).await?;
    let gws = cluster.gateway_addrs();
    Ok((cluster, gws))
}
