//! Roles as processes of the built binaries: PS nodes that tests kill -9, restart from
//! disk, or wipe and replace; workers that tests pause and kill.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use freshet_server::config::{ClusterConfig, TableConfig};

use crate::*;

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
    /// The listener bound for the node's first start, handed to its process
    /// (`--listen-fd`): no window in which another process can take the port between
    /// writing it into the cluster config and the node listening on it. A restart binds
    /// the same address again (`--listen`).
    listener: Option<std::net::TcpListener>,
}

/// A listener on a free 127.0.0.1 port, kept bound until a node process takes it.
fn bound_listener() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    (l, addr)
}

/// The descriptor number a node process finds its inherited listener at.
const LISTEN_FD: i32 = 3;

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
        let (mut listeners, addrs): (Vec<_>, Vec<_>) = (0..n).map(|_| bound_listener()).unzip();
        let cluster = cluster_at(addrs, shards, tables);
        let nodes = cluster.nodes.clone();
        let config_path = dir.path().join("cluster-config.json");
        std::fs::write(&config_path, serde_json::to_vec(&cluster).expect("json")).expect("write");
        let mut c = ProcCluster {
            cluster,
            nodes: BTreeMap::new(),
            config_path,
            dir,
        };
        for (n, listener) in nodes.into_iter().zip(listeners.drain(..)) {
            c.nodes.insert(
                n.id,
                ProcNode {
                    id: n.id,
                    data_dir: c.dir.path().join(format!("node-{}", n.id)),
                    addr: n.addr,
                    join: false,
                    child: None,
                    listener: Some(listener),
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
            .arg("--cluster-config")
            .arg(&config_path)
            .args(["--tick-ms", "20", "--election-ticks", "10"])
            .args(["--snapshot-interval-entries", "200"])
            .args(["--lease-ms", "1000"])
            // As in `fast_config`: reference replays know only the seals tests ask for.
            .args(["--idle-seal-ms", "0"])
            .env("RUST_LOG", "info")
            // Panic messages, not backtraces, at the end of the log.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if n.join {
            cmd.arg("--join");
        }
        // The parent's copy closes when `listener` drops after the spawn; the child's
        // stays open (dup2 clears close-on-exec on the copy at LISTEN_FD).
        let listener = n.listener.take();
        match &listener {
            Some(l) => {
                use std::os::fd::AsRawFd;
                use std::os::unix::process::CommandExt;
                let fd = l.as_raw_fd();
                cmd.args(["--listen-fd", &LISTEN_FD.to_string()]);
                // SAFETY: runs in the forked child before exec and calls only
                // async-signal-safe functions (dup2, fcntl).
                unsafe {
                    cmd.pre_exec(move || {
                        let r = if fd == LISTEN_FD {
                            libc::fcntl(fd, libc::F_SETFD, 0)
                        } else {
                            libc::dup2(fd, LISTEN_FD)
                        };
                        if r == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            None => {
                cmd.args(["--listen", &n.addr]);
            }
        }
        n.child = Some(cmd.spawn().expect("spawn freshet-server"));
        drop(listener);
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
        let (listener, addr) = bound_listener();
        self.nodes.insert(
            id,
            ProcNode {
                id,
                addr: addr.clone(),
                data_dir: self.dir.path().join(format!("node-{id}")),
                join: true,
                child: None,
                listener: Some(listener),
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

/// A role's process with its log file.
struct RoleProcess {
    log: PathBuf,
    child: Option<Child>,
}

impl RoleProcess {
    /// Starts `cmd` logging into `log` (info level, panic messages without backtraces).
    fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        RoleProcess {
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

    /// kill -9.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit (at most `timeout`); true if it exited.
    fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s[s.len().saturating_sub(4000)..].to_string()
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        // Resumed first: a test may have paused it.
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// A `freshet-worker` process (tests pause, resume and kill it).
pub struct ProcWorker {
    pub name: String,
    process: RoleProcess,
}

impl ProcWorker {
    /// Starts a worker following the PS nodes at `ps`, logging into `dir`.
    pub fn start(name: &str, ps: &[String], dir: &Path) -> Self {
        let mut cmd = Command::new(workspace_bin("freshet-worker"));
        cmd.args(["--ps", &ps.join(",")])
            // The worker binds port 0 itself and advertises what it bound: no window in
            // which another process takes a port picked for it.
            .args(["--listen", "127.0.0.1:0"])
            .args(["--name", name]);
        ProcWorker {
            name: name.to_string(),
            process: RoleProcess::spawn(cmd, dir.join(format!("{name}.log"))),
        }
    }

    /// SIGSTOP: the process freezes (no heartbeats, no pushes).
    pub fn pause(&self) {
        self.process.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.process.signal(libc::SIGCONT);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// A `freshet-server gateway` process (SIGTERM stops it gracefully, kill -9 does not).
pub struct ProcGateway {
    pub addr: String,
    process: RoleProcess,
}

impl ProcGateway {
    /// Starts a gateway following the PS nodes at `ps`, logging into `dir`. It binds
    /// port 0 itself and logs what it bound, which this reads (bounded, 30 s): no window
    /// in which another process takes a port picked for it.
    pub fn start(name: &str, ps: &[String], dir: &Path) -> Self {
        let mut cmd = Command::new(server_bin());
        cmd.arg("gateway")
            .args(["--ps", &ps.join(",")])
            .args(["--listen", "127.0.0.1:0"]);
        let process = RoleProcess::spawn(cmd, dir.join(format!("{name}.log")));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let log = std::fs::read_to_string(&process.log).unwrap_or_default();
            let bound = log
                .lines()
                .find(|l| l.contains("gateway listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next());
            if let Some(addr) = bound {
                break addr.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway {name} never logged its address: {}",
                process.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        ProcGateway { addr, process }
    }

    pub async fn client(
        &self,
    ) -> freshet_proto::gateway::v1::gateway_client::GatewayClient<tonic::transport::Channel> {
        let ch = freshet_runtime::grpc::endpoint(&self.addr)
            .expect("endpoint")
            .connect_lazy();
        freshet_proto::gateway::v1::gateway_client::GatewayClient::new(ch)
    }

    /// kill -9.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM, then waits for the exit (at most `timeout`); true if it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.process.terminate(timeout)
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}
