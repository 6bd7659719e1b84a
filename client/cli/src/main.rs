//! `freshet`: the command-line tool (local cluster, status, benchmarks).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use freshet_cli::bench::{bench_ps, BenchOptions};
use freshet_client::wait_ready;
use freshet_client::{ClientOptions, PsClient};
use freshet_local::{
    default_server_bin, default_worker_bin, model_json, model_tables_json, LocalCluster,
    LocalOptions,
};

#[derive(Parser)]
#[command(name = "freshet", version, about = "Freshet command-line tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster on 127.0.0.1 (3 PS nodes, a gateway, a worker) and keep it
    /// running until ctrl-c. A second `up` on the same data dir resumes it.
    Up {
        #[arg(long, default_value = "freshet-data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        /// Gateways (0 or more; first start only).
        #[arg(long, default_value_t = 1)]
        gateways: usize,
        /// Workers (first start only).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Embedding width of the model (first start only).
        #[arg(long, default_value_t = freshet_model::ModelSpec::default().dim)]
        dim: usize,
        /// Path of freshet-server (default: next to this binary, else PATH).
        #[arg(long)]
        server_bin: Option<PathBuf>,
        /// Path of freshet-worker (default: next to this binary, else PATH).
        #[arg(long)]
        worker_bin: Option<PathBuf>,
    },
    /// Print the status of every shard replica.
    Status {
        /// A node address; default: the nodes of <data-dir>/cluster.json.
        #[arg(long)]
        addr: Option<String>,
        #[arg(long, default_value = "freshet-data")]
        data_dir: PathBuf,
        /// Include state checksums.
        #[arg(long)]
        checksum: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the cluster's model spec; with any of --clip, --entropy, --value-weight,
    /// --reward-weight, change those loss weights on the running cluster (workers take
    /// them within a heartbeat; shapes and tables are fixed at bootstrap).
    Model {
        /// A node address; default: the nodes of <data-dir>/cluster.json.
        #[arg(long)]
        addr: Option<String>,
        #[arg(long, default_value = "freshet-data")]
        data_dir: PathBuf,
        /// Weight of the policy-gradient (actor) loss.
        #[arg(long)]
        policy_weight: Option<f32>,
        /// Importance-weight cap min(π/μ, clip).
        #[arg(long)]
        clip: Option<f32>,
        /// Entropy bonus.
        #[arg(long)]
        entropy: Option<f32>,
        /// Weight of the value (V) loss.
        #[arg(long)]
        value_weight: Option<f32>,
        /// Weight of the reward-model (Q) loss.
        #[arg(long)]
        reward_weight: Option<f32>,
        /// Weight of the choice term on clicked slots (set it, e.g. 1, when clients
        /// report only positive events).
        #[arg(long)]
        choice_weight: Option<f32>,
        /// A table's learning rate, TABLE=RATE (repeatable); the shards apply it to
        /// pushes from then on.
        #[arg(long = "rate", value_parser = parse_rate)]
        rates: Vec<(String, f32)>,
        /// A sparse table's row limits, TABLE=TTL_MS:ROWS_MAX[:ADMIT_AFTER:WINDOW_MS]
        /// (repeatable; 0 turns one bound off): rows not updated for TTL_MS of sealed
        /// time, and the least recently updated past ROWS_MAX per shard, are removed at
        /// the next seals; an id becomes a row only at its ADMIT_AFTER-th gradient within
        /// WINDOW_MS of sealed time. TABLE=off turns the table's limits off.
        #[arg(long = "limits", value_parser = parse_limits)]
        limits: Vec<(String, freshet_proto::ps::v1::RowLimits)>,
        #[arg(long)]
        json: bool,
    },
    /// Change how long (sealed time) and how much every data shard keeps served
    /// impressions, on a running cluster (from the printed epoch; a shorter ttl expires
    /// older impressions at once, a smaller bound evicts the oldest).
    Retention {
        /// A node address; default: the nodes of <data-dir>/cluster.json.
        #[arg(long)]
        addr: Option<String>,
        #[arg(long, default_value = "freshet-data")]
        data_dir: PathBuf,
        /// Keep an impression this long after it was appended (1,000 ..= 604,800,000).
        #[arg(long)]
        ttl_ms: u64,
        /// Bytes of impressions per shard, oldest evicted beyond (1 MiB ..= 64 GiB).
        #[arg(long)]
        bytes_max_per_shard: u64,
        #[arg(long)]
        json: bool,
    },
    /// Forget a user (a user's right to have their data deleted): in one epoch every
    /// shard removes the user's rows (user-id and history rows) and the impressions
    /// served to them; gateways drop the rows in that version. Safe to repeat.
    Forget {
        /// A node address; default: the nodes of <data-dir>/cluster.json.
        #[arg(long)]
        addr: Option<String>,
        #[arg(long, default_value = "freshet-data")]
        data_dir: PathBuf,
        /// The user id as given in Rank's user context.
        #[arg(long)]
        user: String,
        #[arg(long)]
        json: bool,
    },
    /// One Rank call on a gateway.
    Rank {
        /// Gateway address; default: the gateway of <data-dir>/cluster.json.
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long, default_value = "freshet-data")]
        data_dir: PathBuf,
        /// Candidate item ids (comma-separated).
        #[arg(long, value_delimiter = ',')]
        candidates: Vec<u64>,
        /// Instead of --candidates: a named candidate set.
        #[arg(long, default_value = "")]
        candidate_set: String,
        /// Slots to fill.
        #[arg(long, default_value_t = 3)]
        k: u32,
        #[command(flatten)]
        ask: freshet_cli::cli::AskFlags,
    },
    /// One Recommend call: the gateway retrieves the best catalog items for the user by
    /// the model's score at the version it serves, then ranks them as Rank does.
    Recommend {
        /// Gateway address; default: the gateway of <data-dir>/cluster.json.
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long, default_value = "freshet-data")]
        data_dir: PathBuf,
        /// Slots to fill.
        #[arg(long, default_value_t = 3)]
        k: u32,
        /// Candidates to retrieve before ranking (0: the gateway's default).
        #[arg(long, default_value_t = 0)]
        retrieve: u32,
        /// An item feature every returned item has, as upserted (repeatable).
        #[arg(long = "require")]
        require: Vec<String>,
        /// An item feature no returned item has (repeatable).
        #[arg(long = "exclude")]
        exclude: Vec<String>,
        /// Items never to return (comma-separated).
        #[arg(long, value_delimiter = ',')]
        exclude_items: Vec<u64>,
        /// Score every active item even where the gateway would use its approximate
        /// index (to compare the two).
        #[arg(long)]
        exact: bool,
        /// Random active catalog items added to the retrieved set, so exploration reaches
        /// beyond it (default: the gateway's, a tenth of --retrieve; 0: none).
        #[arg(long)]
        explore: Option<u32>,
        #[command(flatten)]
        ask: freshet_cli::cli::AskFlags,
    },
    /// One Feedback event on a gateway (acknowledged once its training step is sealed).
    Feedback {
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long, default_value = "freshet-data")]
        data_dir: PathBuf,
        /// impression_id from Rank.
        #[arg(long)]
        impression: String,
        #[arg(long)]
        item: u64,
        /// Position it was shown at (0: look it up).
        #[arg(long, default_value_t = 0)]
        position: u32,
        #[arg(long)]
        click: bool,
        #[arg(long)]
        purchase: bool,
        /// Default: a random id (a retry with the same id is trained on once).
        #[arg(long)]
        event_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The drift simulator (grounded in the OBD sample): the live cluster against
    /// random, oracle, Thompson sampling, frozen and hourly-refreshed model copies and
    /// Vowpal Wabbit on the same stream, over several seeds; writes a report with plots.
    Sim {
        /// A running gateway (default: a fresh local cluster per seed).
        #[arg(long)]
        gateway: Option<String>,
        /// Seeds (one run each), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        seeds: Vec<u64>,
        /// Impressions per simulated hour; the schedule is 6.5 hours long.
        #[arg(long, default_value_t = 10_000)]
        hour: u64,
        /// The traffic: `kinds` (every impression a fresh user of one of the sample's
        /// user kinds, 80 items, slates of 3) or `returning` (individual users who come
        /// back in sessions, new users arriving, a catalog with heavy-tailed appeal,
        /// sparse clicks, long slates).
        #[arg(long, value_enum, default_value_t = Traffic::Kinds)]
        traffic: Traffic,
        /// Every impression a search: users type words for attributes of the item they
        /// want (with synonyms and stray words); the report compares Freshet ranking
        /// with the query against the same searches ranked live without it (a second
        /// cluster per seed) and against BM25 order of the items' titles.
        #[arg(long)]
        search: bool,
        /// Items shown per impression (default 3 for kinds, 10 for returning; at most
        /// 100).
        #[arg(long)]
        slots: Option<usize>,
        /// Returning traffic: catalog size before the new items (a fifth more arrive).
        #[arg(long, default_value_t = 200)]
        items: usize,
        /// Serve the live cluster's impressions with Recommend retrieving this many of
        /// the catalog (the gateway finds the candidates) instead of Rank over every
        /// active item.
        #[arg(long)]
        recommend: Option<u32>,
        /// Returning traffic: users at the start (half as many again arrive per hour).
        #[arg(long, default_value_t = 2_000)]
        users: u64,
        /// Click rate of a random item at slot 1 (the OBD sample's is 0.0038; default
        /// 0.05 for kinds, 0.01 for returning).
        #[arg(long)]
        mean_ctr: Option<f64>,
        /// Latent noise beyond what features explain (0: features explain everything).
        #[arg(long, default_value_t = 0.35)]
        noise: f64,
        /// Rank's temperature, relative to the spread of the candidates' scores.
        #[arg(long, default_value_t = 0.2)]
        temperature: f32,
        #[arg(long, default_value_t = 0.02)]
        epsilon: f32,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        /// Where the OBD sample is kept (downloaded with pip if missing).
        #[arg(long, default_value = "freshet-data/obd-cache")]
        obd_cache: PathBuf,
        /// A synthetic world with the OBD schema instead (no download).
        #[arg(long)]
        synthetic: bool,
        /// Vowpal Wabbit arguments (python3 with vowpalwabbit==9.11.9).
        #[arg(long, default_value = "--cb_explore_adf --squarecb -q ui")]
        vw_args: String,
        #[arg(long)]
        no_vw: bool,
        /// Stationary run of this many impressions instead of the drift schedule.
        #[arg(long)]
        quick: Option<u64>,
        /// Report directory.
        #[arg(long, default_value = "freshet-data/sim-report")]
        out: PathBuf,
        #[arg(long)]
        server_bin: Option<PathBuf>,
        #[arg(long)]
        worker_bin: Option<PathBuf>,
    },
    /// Replay logged data through a running gateway.
    Replay {
        #[command(subcommand)]
        what: freshet_cli::replay::ReplayCmd,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

/// `freshet sim --traffic`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Traffic {
    Kinds,
    Returning,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Rank latency and feedback freshness of the local cluster (3 PS nodes with fsync
    /// on, a gateway, a worker).
    Serve {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        /// Gateways (1: skip the phase with Feedback on another gateway; every gateway
        /// replicates the model, so a second one costs CPU on a small machine).
        #[arg(long, default_value_t = 2)]
        gateways: usize,
        /// Offered rates of the phases that Rank with impressions made durable, one phase
        /// each (comma-separated, req/s): the highest rate the cluster sustains is the
        /// largest "achieved" among them.
        #[arg(long, value_delimiter = ',', default_value = "10000,15000")]
        rank_rates: Vec<f64>,
        #[arg(long)]
        server_bin: Option<PathBuf>,
        #[arg(long)]
        worker_bin: Option<PathBuf>,
        #[command(flatten)]
        out: freshet_sim::table::Outputs,
    },
    /// Training throughput: examples/s through one worker and two (Train → sealed), and
    /// end to end (Rank + Feedback acknowledged).
    Learn {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        #[arg(long)]
        server_bin: Option<PathBuf>,
        #[arg(long)]
        worker_bin: Option<PathBuf>,
        #[command(flatten)]
        out: freshet_sim::table::Outputs,
    },
    /// Recommend's approximate index (HNSW) against the exact pass on generated item
    /// vectors: recall@N, build time, per-query cost (no cluster).
    Ann {
        /// Catalog sizes (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
        items: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        dim: usize,
        /// Retrieved per query (N of recall@N).
        #[arg(long, default_value_t = 100)]
        n: usize,
        #[arg(long, default_value_t = 200)]
        queries: usize,
        /// Search breadths to try (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "100,400,1000")]
        ef: Vec<usize>,
        /// Index kinds (comma-separated): `ip` (the inner product itself) and `l2` (L2
        /// over the inner-product transform).
        #[arg(long, value_delimiter = ',', default_value = "ip,l2")]
        kinds: Vec<String>,
        /// `clustered` (centres plus noise of the same size) or `catalog` (near-identical
        /// items: features plus small trained rows; see the bench's docs).
        #[arg(long, default_value = "clustered")]
        shape: String,
        /// `catalog` only: row norms left out of the indexed vector (comma-separated; 0:
        /// every row indexed), one build each.
        #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.2")]
        snap: Vec<f32>,
        #[command(flatten)]
        out: freshet_sim::table::Outputs,
    },
    /// Push/pull throughput and latency of a 3-node cluster with fsync on.
    Ps {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[arg(long, default_value_t = 16)]
        dim: usize,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        #[arg(long, default_value_t = 1_000_000)]
        id_space: u64,
        /// Turn fsync off (to see what durability costs).
        #[arg(long)]
        no_fsync: bool,
        /// Instead of the throughput phases: push this many distinct ids into a table
        /// capped at --cap rows per shard, then into an uncapped one, printing node RSS
        /// along the way and bytes per row (e.g. 10000000).
        #[arg(long, default_value_t = 0)]
        distinct_ids: u64,
        /// Rows per shard of the capped table (with --distinct-ids).
        #[arg(long, default_value_t = 1_000_000)]
        cap: u64,
        /// Raft entries between snapshots (with --distinct-ids; the in-memory log is
        /// part of the RSS it prints).
        #[arg(long, default_value_t = 20_000)]
        snapshot_interval_entries: u64,
        #[arg(long)]
        server_bin: Option<PathBuf>,
        #[command(flatten)]
        out: freshet_sim::table::Outputs,
    },
}

struct UpArgs {
    data_dir: PathBuf,
    nodes: usize,
    shards: u32,
    gateways: usize,
    workers: usize,
    dim: usize,
    server_bin: Option<PathBuf>,
    worker_bin: Option<PathBuf>,
}

async fn up(a: UpArgs) -> anyhow::Result<()> {
    let stop = freshet_runtime::shutdown_signal()?;
    let data_dir = a.data_dir.clone();
    if !(1..=1024).contains(&a.dim) {
        anyhow::bail!("--dim must be 1..=1024");
    }
    let mut cluster = LocalCluster::prepare(LocalOptions {
        data_dir: data_dir.clone(),
        nodes: a.nodes,
        shards: a.shards,
        server_bin: a.server_bin.unwrap_or_else(default_server_bin),
        worker_bin: a.worker_bin.unwrap_or_else(default_worker_bin),
        extra_args: vec![],
        tables: model_tables_json(&freshet_model::ModelSpec::new(a.dim)),
        model: Some(model_json(
            &freshet_model::ModelSpec::new(a.dim),
            &freshet_model::Hyper::default(),
        )),
        gateways: a.gateways,
        workers: a.workers,
    })?;
    cluster.start_all()?;
    let addrs = cluster.addrs();
    let client = wait_ready(&addrs, &ClientOptions::default()).await?;
    let status = client.cluster_status(false).await?;
    println!(
        "freshet: {} PS nodes, {} shards up; data in {}",
        cluster.layout.nodes.len(),
        status.shard_count,
        data_dir.display()
    );
    for n in &cluster.layout.nodes {
        println!(
            "  node {} grpc {} metrics http://{}/metrics",
            n.id, n.grpc, n.metrics
        );
    }
    for g in &cluster.layout.gateways {
        println!(
            "  gateway {} grpc {} metrics http://{}/metrics",
            g.id, g.grpc, g.metrics
        );
    }
    for w in &cluster.layout.workers {
        println!(
            "  worker {} grpc {} metrics http://{}/metrics",
            w.id, w.grpc, w.metrics
        );
    }
    if let Some(g) = cluster.gateway_addrs().first() {
        println!("gateway: {g}");
    }
    println!("cluster file: {}", data_dir.join("cluster.json").display());
    println!("ctrl-c to stop");
    tokio::pin!(stop);
    // The live status line: rewritten in place on a terminal, every 30 s otherwise.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last_line = std::time::Instant::now();
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for p in cluster.supervise()? {
                    println!("freshet: {p} exited and was restarted");
                }
                ticks += 1;
                let due = if tty {
                    ticks.is_multiple_of(4)
                } else {
                    last_line.elapsed() >= Duration::from_secs(30)
                };
                if due {
                    last_line = std::time::Instant::now();
                    let line = match freshet_cli::cli::gateway_status(&data_dir).await.first() {
                        Some((_, Some(s))) => format!(
                            "epoch {} (lag {} ms), {} impressions queued, freshness p50 {:.1} ms, {} catalog items",
                            s.epoch, s.epoch_lag_ms, s.impressions, s.freshness_p50_ms, s.catalog_items
                        ),
                        _ => "gateway not answering yet".to_string(),
                    };
                    if tty {
                        use std::io::Write as _;
                        print!("\r\x1b[2Kfreshet: {line}");
                        let _ = std::io::stdout().flush();
                    } else {
                        println!("freshet: {line}");
                    }
                }
            }
        }
    }
    if tty {
        println!();
    }
    println!("freshet: stopping");
    tokio::task::spawn_blocking(move || cluster.stop(Duration::from_secs(15))).await?;
    Ok(())
}

/// `--limits TABLE=TTL_MS:ROWS_MAX[:ADMIT_AFTER:ADMIT_WINDOW_MS]`.
fn parse_limits(s: &str) -> Result<(String, freshet_proto::ps::v1::RowLimits), String> {
    let bad = || {
        format!(
            "{s:?}: expected TABLE=TTL_MS:ROWS_MAX[:ADMIT_AFTER:ADMIT_WINDOW_MS] or TABLE=off, \
             e.g. user=86400000:1000000 or user=0:0:3:3600000"
        )
    };
    let (t, l) = s.split_once('=').ok_or_else(bad)?;
    if t.is_empty() {
        return Err(format!("{s:?}: the table name is empty"));
    }
    if l == "off" {
        let off = freshet_proto::ps::v1::RowLimits {
            off: true,
            ..Default::default()
        };
        return Ok((t.to_string(), off));
    }
    let parts: Vec<u64> = l
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (ttl_ms, rows_max, admit_after, admit_window_ms) = match parts[..] {
        [ttl, rows] => (ttl, rows, 0, 0),
        [ttl, rows, n, w] => (ttl, rows, n, w),
        _ => return Err(bad()),
    };
    let admit_after = u32::try_from(admit_after).map_err(|_| bad())?;
    Ok((
        t.to_string(),
        freshet_proto::ps::v1::RowLimits {
            ttl_ms,
            rows_max,
            admit_after,
            admit_window_ms,
            off: false,
        },
    ))
}

/// `--rate TABLE=RATE`.
fn parse_rate(s: &str) -> Result<(String, f32), String> {
    let (t, r) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected TABLE=RATE, e.g. item=0.05"))?;
    let r: f32 = r
        .parse()
        .map_err(|_| format!("{s:?}: the rate {r:?} is not a number"))?;
    if t.is_empty() {
        return Err(format!("{s:?}: the table name is empty"));
    }
    Ok((t.to_string(), r))
}

/// A client of the PS nodes at `addr`, or of those in `<data_dir>/cluster.json`.
async fn connect_ps(
    addr: Option<String>,
    data_dir: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<PsClient>> {
    let addrs = match addr {
        Some(a) => vec![a],
        None => freshet_cli::cli::addrs_of(data_dir, "ps")?,
    };
    let opts = ClientOptions {
        deadline: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    PsClient::connect(&addrs, opts)
        .await
        .with_context(|| format!("no PS node answered at {addrs:?}"))
}

async fn status(
    addr: Option<String>,
    data_dir: PathBuf,
    checksum: bool,
    json: bool,
) -> anyhow::Result<()> {
    let client = connect_ps(addr, &data_dir).await?;
    let s = client.cluster_status(checksum).await?;
    let sealed = client
        .list_seals(0, 1)
        .await
        .ok()
        .map(|r| r.last_sealed_epoch);
    // The model spec (none on a plain parameter store).
    let model = client.get_model().await.ok();
    let gateways = freshet_cli::cli::gateway_status(&data_dir).await;
    if json {
        println!(
            "{}",
            freshet_cli::cli::status_json(&s, sealed, &gateways, model.as_ref())
        );
        return Ok(());
    }
    if let Some(m) = &model {
        println!("{}", freshet_cli::cli::model_line(m));
    }
    if let Some(e) = sealed {
        println!("sealed epoch {e}");
    }
    for (addr, g) in &gateways {
        match g {
            Some(g) => {
                println!(
                    "gateway {addr}: epoch {} (lag {} ms), freshness p50 {:.1} ms max {:.1} ms, \
                     {} impressions queued (durable in p50 {:.1} ms, max {:.1} ms; {} lost; \
                     {} ids asked of shards by Feedback), {} items",
                    g.epoch,
                    g.epoch_lag_ms,
                    g.freshness_p50_ms,
                    g.freshness_max_ms,
                    g.impressions,
                    g.impression_durable_p50_ms,
                    g.impression_durable_max_ms,
                    g.impressions_lost,
                    g.impression_reads,
                    g.catalog_items
                );
                if g.ann_items > 0 {
                    println!(
                        "  approximate index: {} items from epoch {} (built in {} ms); \
                         Recommend calls through it {}, fell back to the exact pass {}",
                        g.ann_items,
                        g.ann_epoch,
                        g.ann_build_ms,
                        g.recommend_ann,
                        g.recommend_ann_fallbacks
                    );
                }
            }
            None => println!("gateway {addr}: unreachable"),
        }
    }
    for n in &s.nodes {
        println!(
            "node {} {} {}",
            n.id,
            n.addr,
            if n.reachable { "up" } else { "unreachable" }
        );
    }
    println!(
        "shard  leader  voters      node role       term  commit  applied  epoch    rows      impressions (bytes, expired)  checksum"
    );
    let meta = s.meta.iter().map(|m| ("meta".to_string(), m));
    let shards = s.shards.iter().map(|sh| (sh.shard.to_string(), sh));
    for (name, sh) in shards.chain(meta) {
        for r in &sh.replicas {
            println!(
                "{:<6} {:<7} {:<11} {:<4} {:<10} {:<5} {:<7} {:<8} {:<8} {:<9} {:<29} {:016x}",
                name,
                sh.leader_id,
                format!("{:?}", sh.voters),
                r.node_id,
                r.role,
                r.term,
                r.commit_index,
                r.applied_index,
                r.sealed_epoch,
                r.row_count,
                format!(
                    "{} ({} B, {})",
                    r.impressions, r.impression_bytes, r.impressions_expired
                ),
                r.checksum
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `up` stops its cluster gracefully on a signal itself; every other command that
    // may run local processes (sim, bench) is dropped on one, which stops them.
    let result = if matches!(cli.cmd, Cmd::Up { .. }) {
        run(cli).await
    } else {
        interruptible(run(cli)).await
    };
    freshet_runtime::exit_code("freshet", result)
}

/// Runs `f` until it ends or SIGINT/SIGTERM arrives; on a signal `f` is dropped (a
/// local cluster it started is stopped by its `Drop`).
async fn interruptible(
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = f => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted (local processes stopped)"),
        _ = term.recv() => anyhow::bail!("terminated (local processes stopped)"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match cli.cmd {
        Cmd::Up {
            data_dir,
            nodes,
            shards,
            gateways,
            workers,
            dim,
            server_bin,
            worker_bin,
        } => {
            up(UpArgs {
                data_dir,
                nodes,
                shards,
                gateways,
                workers,
                dim,
                server_bin,
                worker_bin,
            })
            .await
        }
        Cmd::Status {
            addr,
            data_dir,
            checksum,
            json,
        } => status(addr, data_dir, checksum, json).await,
        Cmd::Replay { what } => freshet_cli::replay::run(what).await,
        Cmd::Sim {
            gateway,
            seeds,
            hour,
            traffic,
            search,
            slots,
            items,
            recommend,
            users,
            mean_ctr,
            noise,
            temperature,
            epsilon,
            concurrency,
            shards,
            obd_cache,
            synthetic,
            vw_args,
            no_vw,
            quick,
            out,
            server_bin,
            worker_bin,
        } => {
            if seeds.is_empty() || hour < 100 || concurrency == 0 {
                anyhow::bail!("--seeds needs one seed, --hour at least 100, --concurrency >= 1");
            }
            let returning =
                (traffic == Traffic::Returning).then(|| freshet_sim::world::Returning {
                    users,
                    new_users_per_hour: users / 2,
                    items,
                    ..Default::default()
                });
            if (returning.is_some() && !(80..=100_000).contains(&items)) || users == 0 {
                anyhow::bail!("--items must be in 80..=100000 and --users at least 1");
            }
            let mean_ctr = mean_ctr.unwrap_or(if returning.is_some() { 0.01 } else { 0.05 });
            let slots = slots.unwrap_or(if returning.is_some() { 10 } else { 3 });
            if recommend.is_some_and(|n| (n as usize) < slots || n > 1000) {
                anyhow::bail!("--recommend must be at least --slots and at most 1000");
            }
            if !(mean_ctr > 0.0 && mean_ctr <= 0.3) {
                anyhow::bail!("--mean-ctr must be in (0, 0.3]");
            }
            if !(0.0..=2.0).contains(&noise) {
                anyhow::bail!("--noise must be in [0, 2]");
            }
            freshet_sim::run(freshet_sim::SimOptions {
                gateway,
                server_bin: server_bin.unwrap_or_else(default_server_bin),
                worker_bin: worker_bin.unwrap_or_else(default_worker_bin),
                shards,
                seeds,
                hour,
                mean_ctr,
                noise,
                live: freshet_sim::LiveOptions {
                    temperature,
                    epsilon,
                    slots,
                    concurrency,
                    query: true,
                    retrieve: recommend,
                },
                obd_cache: (!synthetic).then_some(obd_cache),
                vw_args: (!no_vw).then_some(vw_args),
                out,
                quick,
                returning,
                search: search.then(freshet_sim::world::Search::default),
            })
            .await
        }
        Cmd::Model {
            addr,
            data_dir,
            policy_weight,
            clip,
            entropy,
            value_weight,
            reward_weight,
            choice_weight,
            rates,
            limits,
            json,
        } => {
            let client = connect_ps(addr, &data_dir).await?;
            let set = freshet_cli::cli::ModelChange {
                policy_weight,
                clip,
                entropy,
                value_weight,
                reward_weight,
                choice_weight,
                rates,
                limits,
            };
            freshet_cli::cli::model(&client, set, json).await
        }
        Cmd::Retention {
            addr,
            data_dir,
            ttl_ms,
            bytes_max_per_shard,
            json,
        } => {
            let client = connect_ps(addr, &data_dir).await?;
            let r = client
                .set_impression_retention(freshet_proto::ps::v1::ImpressionRetention {
                    ttl_ms,
                    bytes_max_per_shard,
                })
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                println!("{}", serde_json::json!({"epoch": r.epoch}));
            } else {
                println!(
                    "impressions kept {ttl_ms} ms and at most {bytes_max_per_shard} bytes per shard from epoch {}",
                    r.epoch
                );
            }
            Ok(())
        }
        Cmd::Forget {
            addr,
            data_dir,
            user,
            json,
        } => {
            let client = connect_ps(addr, &data_dir).await?;
            let r = client
                .forget_user(&user)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"epoch": r.epoch, "user_hash": format!("{:016x}", r.user_hash)})
                );
            } else {
                println!(
                    "user {user:?} (row {:016x}) forgotten in epoch {}",
                    r.user_hash, r.epoch
                );
            }
            Ok(())
        }
        Cmd::Rank {
            gateway,
            data_dir,
            candidates,
            candidate_set,
            k,
            ask,
        } => {
            let gateway = freshet_cli::cli::gateway_addr(gateway, &data_dir)?;
            freshet_cli::cli::rank(freshet_cli::cli::RankArgs {
                gateway,
                candidates,
                candidate_set,
                k,
                ask,
            })
            .await
        }
        Cmd::Recommend {
            gateway,
            data_dir,
            k,
            retrieve,
            require,
            exclude,
            exclude_items,
            exact,
            explore,
            ask,
        } => {
            let gateway = freshet_cli::cli::gateway_addr(gateway, &data_dir)?;
            freshet_cli::cli::recommend(freshet_cli::cli::RecommendArgs {
                gateway,
                k,
                retrieve,
                require,
                exclude,
                exclude_items,
                exact,
                explore,
                ask,
            })
            .await
        }
        Cmd::Feedback {
            gateway,
            data_dir,
            impression,
            item,
            position,
            click,
            purchase,
            event_id,
            json,
        } => {
            let gateway = freshet_cli::cli::gateway_addr(gateway, &data_dir)?;
            freshet_cli::cli::feedback(freshet_cli::cli::FeedbackArgs {
                gateway,
                impression,
                item,
                position,
                click,
                purchase,
                event_id,
                json,
            })
            .await
        }
        Cmd::Bench {
            what:
                BenchCmd::Serve {
                    seconds,
                    shards,
                    gateways,
                    rank_rates,
                    server_bin,
                    worker_bin,
                    out,
                },
        } => {
            freshet_cli::bench::bench_serve(freshet_cli::bench::ServeOptions {
                server_bin: server_bin.unwrap_or_else(default_server_bin),
                worker_bin: worker_bin.unwrap_or_else(default_worker_bin),
                seconds,
                shards,
                gateways,
                rank_rates,
                out,
            })
            .await
        }
        Cmd::Bench {
            what:
                BenchCmd::Ann {
                    items,
                    dim,
                    n,
                    queries,
                    ef,
                    kinds,
                    shape,
                    snap,
                    out,
                },
        } => {
            let shape = match shape.as_str() {
                "clustered" => freshet_cli::bench::AnnShape::Clustered,
                "catalog" => freshet_cli::bench::AnnShape::Catalog,
                other => anyhow::bail!("--shape: {other:?} is not clustered or catalog"),
            };
            if snap.is_empty() || snap.iter().any(|t| !(0.0..=10.0).contains(t)) {
                anyhow::bail!("--snap: each must be in 0..=10");
            }
            let kinds = kinds
                .iter()
                .map(|k| match k.as_str() {
                    "ip" => Ok(freshet_model::ann::AnnKind::InnerProduct),
                    "l2" => Ok(freshet_model::ann::AnnKind::L2Transform),
                    other => Err(anyhow::anyhow!("--kinds: {other:?} is not ip or l2")),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if items.iter().any(|&i| i < n || i > 10_000_000)
                || !(1..=1024).contains(&dim)
                || n == 0
                || queries == 0
                || ef.is_empty()
            {
                anyhow::bail!(
                    "--items must each be in n..=10000000, --dim in 1..=1024, --n, --queries and --ef at least 1"
                );
            }
            freshet_cli::bench::bench_ann(freshet_cli::bench::AnnOptions {
                items,
                dim,
                n,
                queries,
                ef,
                kinds,
                shape,
                snap,
                out,
            })
        }
        Cmd::Bench {
            what:
                BenchCmd::Learn {
                    seconds,
                    shards,
                    server_bin,
                    worker_bin,
                    out,
                },
        } => {
            freshet_cli::bench::bench_learn(freshet_cli::bench::LearnOptions {
                server_bin: server_bin.unwrap_or_else(default_server_bin),
                worker_bin: worker_bin.unwrap_or_else(default_worker_bin),
                seconds,
                shards,
                out,
            })
            .await
        }
        Cmd::Bench {
            what:
                BenchCmd::Ps {
                    seconds,
                    batch,
                    dim,
                    shards,
                    id_space,
                    no_fsync,
                    distinct_ids,
                    cap,
                    snapshot_interval_entries,
                    server_bin,
                    out,
                },
        } => {
            if distinct_ids > 0 {
                return freshet_cli::bench::bench_memory(freshet_cli::bench::MemoryOptions {
                    server_bin: server_bin.unwrap_or_else(default_server_bin),
                    ids: distinct_ids,
                    cap_per_shard: cap,
                    shards,
                    snapshot_interval_entries,
                    out,
                })
                .await;
            }
            bench_ps(BenchOptions {
                server_bin: server_bin.unwrap_or_else(default_server_bin),
                seconds,
                batch,
                dim,
                id_space,
                shards,
                fsync: !no_fsync,
                out,
            })
            .await
        }
    }
}
