//! `freshet bench ps`: a 3-node cluster on loopback with fsync on, driven by in-process
//! clients; prints one table of medians so figures are compared side by side in one run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::ps::v1::ReadConsistency;

use freshet_client::{ClientOptions, PsClient};
use freshet_local::LocalOptions;

/// Options of the PS benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub server_bin: std::path::PathBuf,
    pub seconds: f64,
    pub batch: usize,
    pub dim: usize,
    pub id_space: u64,
    pub shards: u32,
    pub fsync: bool,
    pub out: freshet_sim::table::Outputs,
}

struct Phase {
    rows_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The `p` quantile of sorted values (NaN when empty).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ids_for(seed: u64, n: usize, space: u64) -> Vec<u64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = freshet_proto::splitmix64(s);
            s % space
        })
        .collect()
}

/// Runs `clients` loops for `seconds`; each op moves `batch` rows. With `rate_rows`, ops
/// are paced to that aggregate rate (open loop per client).
async fn run_phase(
    clients: &[Arc<PsClient>],
    opts: &BenchOptions,
    push: bool,
    rate_rows: Option<f64>,
) -> anyhow::Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let rows = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (ci, c) in clients.iter().enumerate() {
        let c = Arc::clone(c);
        let stop = Arc::clone(&stop);
        let rows = Arc::clone(&rows);
        let o = opts.clone();
        let interval =
            rate_rows.map(|r| Duration::from_secs_f64(o.batch as f64 * clients.len() as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k: u64 = 0;
            let grads = vec![0.01f32; o.batch * o.dim];
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(iv) = interval {
                    let now = Instant::now();
                    if next > now {
                        tokio::time::sleep(next - now).await;
                    }
                    next += iv;
                }
                k += 1;
                let ids = ids_for((ci as u64) << 32 | k, o.batch, o.id_space);
                let t = Instant::now();
                if push {
                    let parts = c.prepare_push("bench", &ids, &grads)?;
                    let res = futures::future::join_all(parts.iter().map(|p| c.send_push(p))).await;
                    for r in res {
                        r?;
                    }
                } else {
                    c.pull("bench", &ids, ReadConsistency::Linearizable).await?;
                }
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                rows.fetch_add(o.batch as u64, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(opts.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    Ok(Phase {
        rows_per_s: rows.load(Ordering::Relaxed) as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    })
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs the benchmark and prints the table.
///
/// # Errors
/// The cluster did not start or a client call failed.
pub async fn bench_ps(opts: BenchOptions) -> anyhow::Result<()> {
    let mut extra = vec![
        "--snapshot-interval-entries".to_string(),
        "20000".to_string(),
    ];
    if !opts.fsync {
        extra.push("--no-fsync".into());
    }
    let copts = ClientOptions {
        deadline: Duration::from_secs(30),
        ..Default::default()
    };
    let (mut cluster, first) = freshet_local::start_fresh(
        LocalOptions {
            data_dir: PathBuf::new(),
            nodes: 3,
            shards: opts.shards,
            server_bin: opts.server_bin.clone(),
            worker_bin: freshet_local::default_worker_bin(),
            extra_args: extra,
            tables: serde_json::json!([{
                "name": "bench", "dim": opts.dim,
                "optimizer": {"type": "adagrad", "lr": 0.05}
            }]),
            model: None,
            gateways: 0,
            workers: 0,
        },
        "bench",
        &copts,
    )
    .await?;
    let addrs = cluster.addrs();
    let mut clients = vec![first];
    for _ in 1..8 {
        clients.push(PsClient::connect(&addrs, copts.clone()).await?);
    }
    // Let leader balancing (every 50 ticks of 100 ms) spread the shard leaders first.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Warm-up: create rows and connections.
    run_phase(
        &clients,
        &BenchOptions {
            seconds: 1.0,
            ..opts.clone()
        },
        true,
        None,
    )
    .await?;

    let push1 = run_phase(&clients[..1], &opts, true, None).await?;
    let push8 = run_phase(&clients, &opts, true, None).await?;
    let pull1 = run_phase(&clients[..1], &opts, false, None).await?;
    let pull8 = run_phase(&clients, &opts, false, None).await?;
    let half = run_phase(&clients, &opts, true, Some(push8.rows_per_s / 2.0)).await?;

    let rss: Vec<String> = (0..3)
        .map(|i| {
            cluster
                .pid(i)
                .and_then(peak_rss_mib)
                .map_or("?".into(), |m| format!("{m:.0}"))
        })
        .collect();
    let mut t = freshet_sim::table::Table::new(
        format!(
            "freshet bench ps: 3 nodes x {} shards, replication 3, fsync {}, dim {}, Adagrad, {} ids per call, {:.0} s per phase",
            opts.shards,
            if opts.fsync { "on" } else { "off" },
            opts.dim,
            opts.batch,
            opts.seconds
        ),
        &["phase", "clients", "rows/s", "call p50 ms", "call p99 ms"],
    );
    for (name, n, p) in [
        ("push", 1, &push1),
        ("push", 8, &push8),
        ("pull (linearizable)", 1, &pull1),
        ("pull (linearizable)", 8, &pull8),
        ("push at half of peak", 8, &half),
    ] {
        t.row(vec![
            name.into(),
            n.to_string(),
            format!("{:.0}", p.rows_per_s),
            format!("{:.2}", p.p50_ms),
            format!("{:.2}", p.p99_ms),
        ]);
    }
    t.note(format!("peak RSS per node (MiB): {}", rss.join(", ")));
    let emitted = opts.out.emit(&[t]);
    cluster.stop(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(cluster.data_dir());
    emitted
}
