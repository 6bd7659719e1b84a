//! `freshet bench ps --distinct-ids N`: memory for an unbounded id space (issue 17).
//!
//! One fresh 3-node cluster with two dim-16 Adagrad tables: `capped` (at most `cap` rows
//! per shard, least recently updated evicted at each seal) and `plain` (no limits). N
//! distinct ids are pushed into `capped` (8 clients, 1,000 ids per call), printing each
//! node's resident memory at 10%, 50% and 100% of the stream; then the same N ids into
//! `plain`. Printed beside each other: push throughput with eviction on and off, and the
//! bytes per row the plain table costs in steady state (RSS growth over the rows it
//! added, per node: every node holds a replica of every shard). The streams ask for a
//! seal every 50 ms, as training would: eviction happens at seals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_client::{ClientOptions, PsClient};
use freshet_local::{LocalCluster, LocalOptions};

use super::{with_cluster, ProcStats};

const BATCH: u64 = 1_000;
const CLIENTS: usize = 8;
const DIM: usize = 16;
/// How often a stream asks the coordinator for a seal (a training worker's steps seal
/// every few ms).
const SEAL_EVERY: Duration = Duration::from_millis(50);
/// A stream stops after this long whatever it reached (the table says how far it got).
const STREAM_MAX: Duration = Duration::from_secs(900);

#[derive(Debug, Clone)]
pub struct MemoryOptions {
    pub server_bin: std::path::PathBuf,
    pub ids: u64,
    pub cap_per_shard: u64,
    pub shards: u32,
    /// Raft entries between snapshots: the log (every push, in memory until the next
    /// snapshot compacts it) is part of what RSS shows.
    pub snapshot_interval_entries: u64,
    pub out: freshet_sim::table::Outputs,
}

/// Mean over the nodes of a /proc memory figure: `VmRSS` (resident now) or `VmHWM` (the
/// most resident since the node started: a snapshot's transient copy shows there).
fn mean_of(cluster: &LocalCluster, figure: fn(u32) -> Option<f64>) -> f64 {
    let v: Vec<f64> = (0..3)
        .filter_map(|i| cluster.pid(i).and_then(figure))
        .collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn mean_rss(cluster: &LocalCluster) -> f64 {
    mean_of(cluster, ProcStats::rss_mib)
}

/// What one stream measured.
struct Stream {
    pushed: u64,
    seconds: f64,
    failed: u64,
    /// Mean node RSS (MiB) before, and at 10%, 50%, 100% of the stream.
    rss: [f64; 4],
    /// Mean node peak RSS (MiB) since the node started, at the end of the stream.
    peak: f64,
}

/// Pushes ids `base..base + n` into `table`, `BATCH` per call from `CLIENTS` loops.
async fn stream(
    cluster: &LocalCluster,
    clients: &[Arc<PsClient>],
    table: &str,
    base: u64,
    n: u64,
) -> Stream {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let grads: Arc<Vec<f32>> = Arc::new(vec![0.01; BATCH as usize * DIM]);
    let mut rss = [mean_rss(cluster), 0.0, 0.0, 0.0];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        let (c, next, failed, grads) = (
            Arc::clone(c),
            Arc::clone(&next),
            Arc::clone(&failed),
            Arc::clone(&grads),
        );
        let table = table.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(BATCH, Ordering::Relaxed);
                if from >= n || start.elapsed() > STREAM_MAX {
                    return;
                }
                let ids: Vec<u64> = (base + from..base + (from + BATCH).min(n)).collect();
                let ok = match c.prepare_push(&table, &ids, &grads[..ids.len() * DIM]) {
                    Ok(parts) => {
                        let res =
                            futures::future::join_all(parts.iter().map(|p| c.send_push(p))).await;
                        res.iter().all(Result::is_ok)
                    }
                    Err(_) => false,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Seals, as training would make them: row limits evict (like expiry and the
    // publication of direct pushes) only at a seal, and without workers nothing else
    // asks for one (the stream's capped table was never capped before this).
    let sealer = {
        let c = Arc::clone(&clients[0]);
        tokio::spawn(async move {
            loop {
                let _ = c.request_seal().await;
                tokio::time::sleep(SEAL_EVERY).await;
            }
        })
    };
    // Sample RSS as the stream passes 10% and 50%.
    for (slot, share) in [(1, 0.1), (2, 0.5)] {
        while next.load(Ordering::Relaxed) < (n as f64 * share) as u64
            && start.elapsed() < STREAM_MAX
            && !tasks.iter().all(|t| t.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rss[slot] = mean_rss(cluster);
    }
    for t in tasks {
        let _ = t.await;
    }
    sealer.abort();
    let seconds = start.elapsed().as_secs_f64();
    rss[3] = mean_rss(cluster);
    Stream {
        pushed: next.load(Ordering::Relaxed).min(n),
        seconds,
        failed: failed.load(Ordering::Relaxed),
        rss,
        peak: mean_of(cluster, ProcStats::peak_rss_mib),
    }
}

/// Runs the memory benchmark and prints its table.
///
/// # Errors
/// The cluster did not start or a client could not connect.
pub async fn bench_memory(opts: MemoryOptions) -> anyhow::Result<()> {
    let copts = ClientOptions {
        deadline: Duration::from_secs(30),
        ..Default::default()
    };
    let adagrad = serde_json::json!({"type": "adagrad", "lr": 0.05});
    let (cluster, first) = freshet_local::start_fresh(
        LocalOptions {
            data_dir: std::path::PathBuf::new(),
            nodes: 3,
            shards: opts.shards,
            server_bin: opts.server_bin.clone(),
            worker_bin: freshet_local::default_worker_bin(),
            extra_args: vec![
                "--snapshot-interval-entries".into(),
                opts.snapshot_interval_entries.to_string(),
            ],
            tables: serde_json::json!([
                {"name": "capped", "dim": DIM, "optimizer": adagrad,
                 "limits": {"rows_max": opts.cap_per_shard}},
                {"name": "plain", "dim": DIM, "optimizer": adagrad}
            ]),
            model: None,
            gateways: 0,
            workers: 0,
        },
        "bench-memory",
        &copts,
    )
    .await?;
    let table = with_cluster(cluster, async |cluster| {
        let mut clients = vec![first];
        for _ in 1..CLIENTS {
            clients.push(PsClient::connect(&cluster.addrs(), copts.clone()).await?);
        }
        let capped = stream(cluster, &clients, "capped", 0, opts.ids).await;
        let plain = stream(cluster, &clients, "plain", 0, opts.ids).await;
        let status = clients[0].cluster_status(false).await?;
        let mut t = freshet_sim::table::Table::new(
            format!(
                "freshet bench ps --distinct-ids {}: 3 nodes x {} shards (fsync on, snapshot every {} entries), dim {DIM} Adagrad, {BATCH} ids per call, {CLIENTS} clients; capped: at most {} rows per shard",
                opts.ids, opts.shards, opts.snapshot_interval_entries, opts.cap_per_shard
            ),
            &[
                "table", "ids pushed", "rows/s", "failed calls", "node RSS MiB before",
                "at 10%", "at 50%", "at 100%", "peak since start",
            ],
        );
        for (name, s) in [("capped", &capped), ("plain (no limits)", &plain)] {
            t.row(vec![
                name.into(),
                s.pushed.to_string(),
                format!("{:.0}", s.pushed as f64 / s.seconds.max(1e-9)),
                s.failed.to_string(),
                format!("{:.0}", s.rss[0]),
                format!("{:.0}", s.rss[1]),
                format!("{:.0}", s.rss[2]),
                format!("{:.0}", s.rss[3]),
                format!("{:.0}", s.peak),
            ]);
        }
        // Every node holds every shard: the plain table's rows per node are the ids.
        let rows = plain.pushed.max(1) as f64;
        let bytes_per_row = (plain.rss[3] - plain.rss[0]) * 1024.0 * 1024.0 / rows;
        let half = (plain.rss[3] - plain.rss[2]) * 1024.0 * 1024.0 / (rows / 2.0);
        // What the table itself takes (its replicas' own accounting: row chunks as
        // allocated and the index), against the RSS figure that holds everything else a
        // node keeps too (Raft log since the last snapshot, change sets, buffers).
        for table in ["capped", "plain"] {
            let (mut alloc, mut held, mut copies) = (0u64, 0u64, 0u64);
            for r in status.shards.iter().flat_map(|s| &s.replicas) {
                for tb in r.tables.iter().filter(|tb| tb.table == table) {
                    alloc += tb.allocated_bytes;
                    held += tb.rows;
                    copies += tb.snapshot_copies;
                }
            }
            t.note(format!(
                "{table} table by its own allocation (row chunks and id index, all replicas): {:.0} MiB a node, {:.0} bytes per row; chunks copied while snapshots held them: {copies} (about {} MiB over all replicas)",
                alloc as f64 / 3.0 / (1 << 20) as f64,
                alloc as f64 / held.max(1) as f64,
                copies * 16 / 1024
            ));
        }
        t.note(format!(
            "plain table, bytes per row (node RSS growth / rows held per node): whole stream {bytes_per_row:.0}, second half {half:.0}; capped rows/s / plain rows/s = {:.2}",
            (capped.pushed as f64 / capped.seconds.max(1e-9))
                / (plain.pushed as f64 / plain.seconds.max(1e-9)).max(1e-9)
        ));
        Ok(t)
    })
    .await?;
    opts.out.emit(&[table])
}
