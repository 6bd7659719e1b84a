//! `freshet bench ps`: a 3-node cluster on loopback with fsync on, driven by in-process
//! clients; prints one table of medians so figures are compared side by side in one run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::ps::v1::ReadConsistency;

use freshet_client::{ClientOptions, PsClient};
use freshet_local::LocalOptions;

use super::{drive, with_cluster, Pace, ProcStats, Samples};

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

fn ids_for(seed: u64, n: usize, space: u64) -> Vec<u64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = freshet_proto::splitmix64(s);
            s % space
        })
        .collect()
}

/// One phase: calls that each move `batch` rows, from `clients` (one closed loop per
/// client, or paced at `rate_rows` rows/s in all).
async fn phase(
    clients: &[Arc<PsClient>],
    opts: &BenchOptions,
    push: bool,
    rate_rows: Option<f64>,
) -> Samples {
    let pace = match rate_rows {
        None => Pace::Closed(clients.len()),
        Some(r) => Pace::Open {
            per_s: r / opts.batch as f64,
            in_flight_max: clients.len(),
        },
    };
    let open = rate_rows.is_some();
    let clients: Arc<Vec<Arc<PsClient>>> = Arc::new(clients.to_vec());
    let (batch, dim, space) = (opts.batch, opts.dim, opts.id_space);
    let grads: Arc<Vec<f32>> = Arc::new(vec![0.01f32; batch * dim]);
    drive(pace, opts.seconds, move |lane, n| {
        let (clients, grads) = (Arc::clone(&clients), Arc::clone(&grads));
        async move {
            // A closed loop is one client; an open loop spreads its calls over them all.
            let c = &clients[if open { n as usize } else { lane } % clients.len()];
            let ids = ids_for((lane as u64) << 32 | n, batch, space);
            let t = Instant::now();
            if push {
                let parts = c.prepare_push("bench", &ids, &grads).ok()?;
                let res = futures::future::join_all(parts.iter().map(|p| c.send_push(p))).await;
                if res.iter().any(Result::is_err) {
                    return None;
                }
            } else {
                c.pull("bench", &ids, ReadConsistency::Linearizable)
                    .await
                    .ok()?;
            }
            Some(t.elapsed().as_secs_f64() * 1e3)
        }
    })
    .await
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
    let (cluster, first) = freshet_local::start_fresh(
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
    let table = with_cluster(cluster, async |cluster| {
        let addrs = cluster.addrs();
        let mut clients = vec![first];
        for _ in 1..8 {
            clients.push(PsClient::connect(&addrs, copts.clone()).await?);
        }
        // Let leader balancing (every 50 ticks of 100 ms) spread the shard leaders first.
        tokio::time::sleep(Duration::from_secs(6)).await;
        // Warm-up: create rows and connections.
        let warm = BenchOptions {
            seconds: 1.0,
            ..opts.clone()
        };
        phase(&clients, &warm, true, None).await;

        let push1 = phase(&clients[..1], &opts, true, None).await;
        let push8 = phase(&clients, &opts, true, None).await;
        let pull1 = phase(&clients[..1], &opts, false, None).await;
        let pull8 = phase(&clients, &opts, false, None).await;
        let peak_rows = push8.rate() * opts.batch as f64;
        let half = phase(&clients, &opts, true, Some(peak_rows / 2.0)).await;

        let rss: Vec<String> = (0..3)
            .map(|i| {
                cluster
                    .pid(i)
                    .and_then(ProcStats::peak_rss_mib)
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
            &["phase", "clients", "rows/s", "call p50 ms", "call p99 ms", "failed calls"],
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
                format!("{:.0}", p.rate() * opts.batch as f64),
                format!("{:.2}", p.quantile(0.5)),
                format!("{:.2}", p.quantile(0.99)),
                p.errors.to_string(),
            ]);
        }
        t.note(format!("peak RSS per node (MiB): {}", rss.join(", ")));
        Ok(t)
    })
    .await?;
    opts.out.emit(&[table])
}
