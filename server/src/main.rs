//! `freshet-server`: parses flags, sets up tracing, binds, and runs a role until SIGTERM
//! or ctrl-c. All behaviour lives in the library (`freshet_server::ps::run`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use freshet_gateway::GatewayConfig;
use freshet_server::config::{ClusterConfig, PsConfig};

#[derive(Parser)]
#[command(name = "freshet-server", version, about = "Freshet server roles")]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Run one parameter-server node.
    Ps(PsArgs),
    /// Run a gateway: Rank and Feedback from a local replica of the model.
    Gateway(GatewayArgs),
}

#[derive(Args)]
struct GatewayArgs {
    /// PS node addresses to start from (comma-separated; the rest is discovered).
    #[arg(long, env = "FRESHET_PS", value_delimiter = ',', required = true)]
    ps: Vec<String>,
    /// gRPC listen address.
    #[arg(long, env = "FRESHET_LISTEN", default_value = "127.0.0.1:7300")]
    listen: String,
    /// Prometheus /metrics listen address (off when empty).
    #[arg(long, env = "FRESHET_METRICS_LISTEN", default_value = "")]
    metrics_listen: String,
    /// Softmax temperature when a request gives none, relative to the standard deviation
    /// of the candidates' scores (the default is the gateway library's, which the
    /// simulator measured; `freshet_model::relative_temperature` says what it means).
    #[arg(long, default_value_t = GatewayConfig::default().temperature_default)]
    temperature: f32,
    /// Exploration mix when a request gives none.
    #[arg(long, default_value_t = GatewayConfig::default().epsilon_default)]
    epsilon: f32,
    /// Impressions kept for joining feedback.
    #[arg(long, default_value_t = 1_000_000)]
    impressions_max: usize,
    /// How long an impression accepts feedback.
    #[arg(long, default_value_t = 900_000)]
    impression_ttl_ms: u64,
    /// Active catalog items from which Recommend retrieves through an approximate
    /// (HNSW) index rebuilt in the background, instead of scoring every item (0: never).
    #[arg(long, env = "FRESHET_ANN_MIN_ITEMS", default_value_t = GatewayConfig::default().ann_min_items)]
    ann_min_items: usize,
    /// Search breadth of that index (at least twice the items a call retrieves).
    #[arg(long, env = "FRESHET_ANN_EF", default_value_t = GatewayConfig::default().ann_ef)]
    ann_ef: usize,
    /// Least time between the end of one index build and the start of the next.
    #[arg(long, env = "FRESHET_ANN_REBUILD_MS", default_value_t = GatewayConfig::default().ann_rebuild_ms)]
    ann_rebuild_ms: u64,
    /// Random active catalog items Recommend adds to its retrieved set when a call does
    /// not say, per item retrieved (exploration beyond the model's top N).
    #[arg(long, env = "FRESHET_EXPLORE_SHARE", default_value_t = GatewayConfig::default().explore_share_default)]
    explore_share: f32,
    /// Validate the flags, print the resolved config, and exit.
    #[arg(long)]
    check_config: bool,
}

impl GatewayArgs {
    fn to_config(&self) -> GatewayConfig {
        GatewayConfig {
            ps: self.ps.clone(),
            temperature_default: self.temperature,
            epsilon_default: self.epsilon,
            impressions_max: self.impressions_max,
            impression_ttl_ms: self.impression_ttl_ms,
            ann_min_items: self.ann_min_items,
            ann_ef: self.ann_ef,
            ann_rebuild_ms: self.ann_rebuild_ms,
            explore_share_default: self.explore_share,
            ..GatewayConfig::default()
        }
    }
}

async fn bind_metrics(addr: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?,
    ))
}

#[derive(Args)]
struct PsArgs {
    /// This node's id (required on first start; stored in the data dir).
    #[arg(long, env = "FRESHET_NODE_ID", default_value_t = 0)]
    node_id: u64,
    /// Derive the node id from the host name's trailing ordinal plus one
    /// (StatefulSet pod `freshet-ps-0` is node 1), when --node-id is not given.
    #[arg(long, env = "FRESHET_NODE_ID_FROM_HOSTNAME")]
    node_id_from_hostname: bool,
    /// Where the WAL, snapshots and node metadata live.
    #[arg(long, env = "FRESHET_DATA_DIR", default_value = "data/ps")]
    data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, env = "FRESHET_LISTEN", default_value = "127.0.0.1:7100")]
    listen: String,
    /// Serve gRPC on this inherited file descriptor, a listening TCP socket the parent
    /// bound (socket activation, or a test harness that names every node's address in
    /// the cluster config before any node starts), instead of binding `--listen`.
    #[arg(long, env = "FRESHET_LISTEN_FD", conflicts_with = "listen")]
    listen_fd: Option<i32>,
    /// Prometheus /metrics listen address (off when empty).
    #[arg(long, env = "FRESHET_METRICS_LISTEN", default_value = "")]
    metrics_listen: String,
    /// Address peers and clients use for this node (default: the bound listen address).
    #[arg(long, env = "FRESHET_ADVERTISE")]
    advertise: Option<String>,
    /// Cluster config (JSON: nodes, shards, replication, tables); read on first start.
    #[arg(long, env = "FRESHET_CLUSTER_CONFIG")]
    cluster_config: Option<PathBuf>,
    /// First start of a replacement node (new id): host only what AddReplica assigns.
    #[arg(long, env = "FRESHET_JOIN")]
    join: bool,
    /// Raft tick.
    #[arg(long, default_value_t = 100)]
    tick_ms: u64,
    /// Election timeout in ticks.
    #[arg(long, default_value_t = 10)]
    election_ticks: usize,
    /// Snapshot (and compact the log) every this many applied entries per shard.
    #[arg(long, default_value_t = 10_000)]
    snapshot_interval_entries: u64,
    /// ...or once a shard's in-memory Raft log carries this many bytes (bounds a node's
    /// memory for logs of large entries; at least 1 MiB).
    #[arg(long, default_value_t = 64 << 20)]
    snapshot_log_bytes: u64,
    /// Ticks between leader-balancing checks; 0 turns balancing off.
    #[arg(long, default_value_t = 50)]
    leader_balance_ticks: u64,
    /// How often the coordinator (meta-group leader) seals the worker frontiers that moved.
    #[arg(long, default_value_t = 10)]
    seal_interval_ms: u64,
    /// A worker silent for this long is fenced (its unsealed steps are dropped).
    #[arg(long, default_value_t = 3_000)]
    lease_ms: u64,
    /// Seal at least this often while training is idle, so row expiry, impression
    /// retention and direct pushes take effect (0: only when something asks).
    #[arg(long, env = "FRESHET_IDLE_SEAL_MS", default_value_t = 1_000)]
    idle_seal_ms: u64,
    /// Skip fdatasync (tests and benchmarks that measure nothing durable only).
    #[arg(long)]
    no_fsync: bool,
    /// Validate the flags and the cluster config, print the resolved config, and exit.
    #[arg(long)]
    check_config: bool,
}

impl PsArgs {
    fn to_config(&self) -> anyhow::Result<PsConfig> {
        let cluster = match &self.cluster_config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                let c: ClusterConfig = serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", p.display()))?;
                Some(c)
            }
            None => None,
        };
        let node_id = if self.node_id == 0 && self.node_id_from_hostname {
            node_id_from_hostname()?
        } else {
            self.node_id
        };
        Ok(PsConfig {
            node_id,
            data_dir: self.data_dir.clone(),
            advertise: self.advertise.clone(),
            cluster,
            join: self.join,
            tick_ms: self.tick_ms,
            election_ticks: self.election_ticks,
            snapshot_interval_entries: self.snapshot_interval_entries,
            snapshot_log_bytes: self.snapshot_log_bytes,
            fsync: !self.no_fsync,
            leader_balance_ticks: self.leader_balance_ticks,
            seal_interval_ms: self.seal_interval_ms,
            lease_ms: self.lease_ms,
            idle_seal_ms: self.idle_seal_ms,
            ..PsConfig::default()
        })
    }
}

fn node_id_from_hostname() -> anyhow::Result<u64> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .context("no host name (HOSTNAME or /etc/hostname)")?;
    let ordinal: u64 = host
        .rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("host name {host:?} does not end in -<ordinal>"))?;
    Ok(ordinal + 1)
}

/// The listening TCP socket at inherited descriptor `fd` (`--listen-fd`).
///
/// # Errors
/// `fd` is a standard stream, not open, or not a listening socket.
fn inherited_listener(fd: i32) -> anyhow::Result<tokio::net::TcpListener> {
    use std::os::fd::FromRawFd;
    anyhow::ensure!(fd > 2, "--listen-fd: {fd} is a standard stream");
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `listening`; a descriptor
    // that is not open or not a socket makes it fail, which is checked.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    anyhow::ensure!(
        r == 0 && listening == 1,
        "--listen-fd: {fd} is not a listening socket ({})",
        if r == 0 {
            "not listening".to_string()
        } else {
            std::io::Error::last_os_error().to_string()
        }
    );
    // SAFETY: `fd` is an open listening socket (checked above) that this process owns
    // from here on: the parent handed it over and nothing else here uses it.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    std_listener
        .local_addr()
        .context("--listen-fd: not a TCP socket")?;
    std_listener
        .set_nonblocking(true)
        .context("--listen-fd: set non-blocking")?;
    // Not handed on to anything this process might start.
    // SAFETY: fcntl(2) on a descriptor this process owns.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    tokio::net::TcpListener::from_std(std_listener).context("--listen-fd")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    freshet_runtime::exit_code("freshet-server", run().await)
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.role {
        Role::Ps(args) => {
            let config = args.to_config()?;
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
            if args.check_config {
                println!("{}", serde_json::to_string_pretty(&config)?);
                return Ok(());
            }
            let shutdown = freshet_runtime::shutdown_signal()?;
            let listener = match args.listen_fd {
                Some(fd) => inherited_listener(fd)?,
                None => tokio::net::TcpListener::bind(&args.listen)
                    .await
                    .with_context(|| format!("binding {}", args.listen))?,
            };
            let metrics = bind_metrics(&args.metrics_listen).await?;
            freshet_server::ps::run(config, listener, metrics, shutdown).await?;
        }
        Role::Gateway(args) => {
            let config = args.to_config();
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
            if args.check_config {
                println!("{}", serde_json::to_string_pretty(&config)?);
                return Ok(());
            }
            let shutdown = freshet_runtime::shutdown_signal()?;
            let listener = tokio::net::TcpListener::bind(&args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            // What it bound (`--listen 127.0.0.1:0` picks a free port: supervisors and
            // tests read it here instead of picking a port that another process may take).
            let bound = listener.local_addr().context("listen address")?;
            tracing::info!(addr = %bound, "gateway listening");
            let metrics = bind_metrics(&args.metrics_listen).await?;
            freshet_gateway::run(config, listener, metrics, shutdown).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary's flags default to the library's config (they once said 0.1 for the
    /// temperature while the library and README said 0.2).
    #[test]
    fn gateway_flags_default_to_the_library_config() {
        // Flags read these from the environment (a bench run may export them).
        for var in [
            "FRESHET_PS",
            "FRESHET_LISTEN",
            "FRESHET_METRICS_LISTEN",
            "FRESHET_ANN_MIN_ITEMS",
            "FRESHET_ANN_EF",
            "FRESHET_ANN_REBUILD_MS",
            "FRESHET_EXPLORE_SHARE",
        ] {
            std::env::remove_var(var);
        }
        let Role::Gateway(args) =
            Cli::parse_from(["freshet-server", "gateway", "--ps", "a:1"]).role
        else {
            panic!("not the gateway role");
        };
        let got = serde_json::to_value(args.to_config()).unwrap();
        let want = serde_json::to_value(GatewayConfig {
            ps: vec!["a:1".into()],
            ..GatewayConfig::default()
        })
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn ps_flags_default_to_the_library_config() {
        for var in [
            "FRESHET_NODE_ID",
            "FRESHET_DATA_DIR",
            "FRESHET_LISTEN",
            "FRESHET_ADVERTISE",
            "FRESHET_CLUSTER_CONFIG",
            "FRESHET_JOIN",
            "FRESHET_IDLE_SEAL_MS",
        ] {
            std::env::remove_var(var);
        }
        let Role::Ps(args) = Cli::parse_from(["freshet-server", "ps", "--node-id", "1"]).role
        else {
            panic!("not the ps role");
        };
        let got = serde_json::to_value(args.to_config().unwrap()).unwrap();
        let want = serde_json::to_value(PsConfig {
            node_id: 1,
            data_dir: args.data_dir.clone(),
            ..PsConfig::default()
        })
        .unwrap();
        assert_eq!(got, want);
    }
}
