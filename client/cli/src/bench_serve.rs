//! `freshet bench serve`: the local cluster (3 PS nodes with fsync on, a gateway, a
//! worker) under a synthetic Rank + Feedback load; prints one table.
//!
//! - Rank latency: 100 candidates, K = 10, paced at a target rate (open loop).
//! - Freshness: Feedback sent at a target event rate; for each call, the time from
//!   sending it until the gateway serves a version that contains its update (the ack
//!   names the sealed epoch; Lookup shows the served epoch).
//! - Freshness with Feedback sent to the other gateway than the Rank it answers (the
//!   impression is read from its shard), at 1,000 events/s, beside the same-gateway figure.
//! - Rank at 10,000 req/s with impression logging (every Rank's impression appended to its
//!   shard after the answer): achieved rate, latency, and the durability window (Rank
//!   answer → append acknowledged) the gateway measured over its last 1,000 impressions.
//! - Epoch interval: sealed epochs over the run's duration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, LookupRequest, RankRequest, UserContext,
};
use freshet_proto::ps::v1::Item;
use tokio::sync::{watch, Semaphore};
use tonic::transport::Channel;

use crate::bench::percentile;
use freshet_client::gateway::{events_for, Gateway, RetryPolicy};
use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_local::fresh_cluster_gateways;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub server_bin: std::path::PathBuf,
    pub worker_bin: std::path::PathBuf,
    pub seconds: f64,
    pub shards: u32,
    /// 1 or more; the cross-gateway phase needs 2.
    pub gateways: usize,
    pub out: freshet_sim::table::Outputs,
}

const CANDIDATES: u64 = 100;
const SLOTS: u32 = 10;
const IN_FLIGHT_MAX: usize = 256;

fn rank_req(n: u64) -> RankRequest {
    RankRequest {
        user: Some(UserContext {
            categorical: [
                ("segment".to_string(), format!("s{}", n % 7)),
                ("device".to_string(), format!("d{}", n % 3)),
            ]
            .into(),
            numeric: vec![(n % 10) as f32 / 10.0],
            user_id: format!("u{}", n % 5000),
        }),
        candidates: (1..=CANDIDATES).collect(),
        k: SLOTS,
        exploration: None,
        candidate_set: String::new(),
        min_epoch: 0,
    }
}

struct PhaseResult {
    achieved: f64,
    p50: f64,
    p99: f64,
    max: f64,
    errors: u64,
}

/// Paces `op` at `rate` per second for `seconds` (bounded in flight) and collects each
/// op's latency in ms.
async fn paced<F, Fut>(rate: f64, seconds: f64, op: F) -> PhaseResult
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Option<f64>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    let mut tasks = Vec::new();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        }
        next += interval;
        let Ok(permit) = Arc::clone(&sem).try_acquire_owned() else {
            continue; // overloaded: the op is skipped (achieved rate shows it)
        };
        n += 1;
        let fut = op(n);
        tasks.push(tokio::spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Some(ms)) => lat.push(ms),
            _ => errors += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    PhaseResult {
        achieved: lat.len() as f64 / elapsed,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or(f64::NAN),
        errors,
    }
}

/// One Feedback call of `events` events on a fresh impression; returns the ms until
/// the gateway serves the sealed epoch of its update (`served` follows the gateway's
/// epoch).
async fn feedback_once(
    gw: GatewayClient<Channel>,
    n: u64,
    events: usize,
    served: watch::Receiver<u64>,
) -> Option<f64> {
    feedback_across(gw.clone(), gw, n, events, served).await
}

/// [`feedback_once`] with the Rank on `ranker` and the Feedback on `gw`.
async fn feedback_across(
    ranker: GatewayClient<Channel>,
    gw: GatewayClient<Channel>,
    n: u64,
    events: usize,
    mut served: watch::Receiver<u64>,
) -> Option<f64> {
    // One attempt per call: the bench counts failures instead of hiding them.
    let ranker = Gateway::from_client(ranker, RetryPolicy::NEVER);
    let gw = Gateway::from_client(gw, RetryPolicy::NEVER);
    let r = ranker.rank(&rank_req(n)).await.ok()?;
    let mut i = 0u64;
    let evs = events_for(&r, &format!("bench-{n}"), |_| {
        i += 1;
        (i <= events as u64).then_some((n + i - 1).is_multiple_of(4))
    });
    let t = Instant::now();
    let ack = gw.feedback(&evs).await.ok()?;
    let wait = async {
        while *served.borrow_and_update() < ack.sealed_epoch {
            served.changed().await.ok()?;
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .ok()??;
    Some(t.elapsed().as_secs_f64() * 1e3)
}

/// One poller for the whole run: the gateway's served epoch, every millisecond (one
/// Lookup per ms instead of one per waiting call, so measuring does not load the box).
fn watch_served(
    mut gw: GatewayClient<Channel>,
) -> (watch::Receiver<u64>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(0);
    let task = tokio::spawn(async move {
        loop {
            if let Ok(l) = gw
                .lookup(LookupRequest {
                    table: "item".into(),
                    ids: vec![1],
                })
                .await
            {
                tx.send_if_modified(|e| {
                    let moved = l.get_ref().epoch > *e;
                    *e = (*e).max(l.get_ref().epoch);
                    moved
                });
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    (rx, task)
}

/// Runs the benchmark and prints the table.
///
/// # Errors
/// The cluster did not start.
pub async fn bench_serve(opts: ServeOptions) -> anyhow::Result<()> {
    let (mut cluster, gw_addrs) = fresh_cluster_gateways(
        &opts.server_bin,
        &opts.worker_bin,
        opts.shards,
        1,
        opts.gateways.max(1),
        "bench-serve",
    )
    .await?;
    let gw_addr = gw_addrs[0].clone();
    let other = gw_addrs
        .get(1)
        .map(|a| freshet_client::endpoint(a))
        .transpose()?;
    let client = wait_ready(&cluster.addrs(), &ClientOptions::default()).await?;
    let dir = cluster.data_dir().to_path_buf();
    let ch = freshet_client::endpoint(&gw_addr)?;
    let mut gw = GatewayClient::new(ch.clone());
    let items: Vec<Item> = (1..=CANDIDATES)
        .map(|id| Item {
            id,
            features: vec![format!("brand={}", id % 10), format!("cat={}", id % 7)],
            active: true,
        })
        .collect();
    freshet_client::gateway::upsert_and_wait(
        &mut gw,
        &items,
        freshet_client::gateway::UPSERT_WAIT_DEFAULT,
    )
    .await?;
    let (served, poller) = watch_served(GatewayClient::new(ch.clone()));
    // Warm-up: connections, rows, the worker's registration.
    let _ = paced(200.0, 2.0, |n| {
        feedback_once(GatewayClient::new(ch.clone()), n, 5, served.clone())
    })
    .await;

    let epoch0 = client.list_seals(0, 1).await?.last_sealed_epoch;
    let t0 = Instant::now();
    let rank = paced(1000.0, opts.seconds, |n| {
        let mut gw = GatewayClient::new(ch.clone());
        async move {
            let t = Instant::now();
            gw.rank(rank_req(n)).await.ok()?;
            Some(t.elapsed().as_secs_f64() * 1e3)
        }
    })
    .await;
    // 10 events per call: 100 calls/s = 1k events/s, 1000 calls/s = 10k events/s.
    let f1k = paced(100.0, opts.seconds, |n| {
        feedback_once(
            GatewayClient::new(ch.clone()),
            1_000_000 + n,
            10,
            served.clone(),
        )
    })
    .await;
    let f10k = paced(1000.0, opts.seconds, |n| {
        feedback_once(
            GatewayClient::new(ch.clone()),
            2_000_000 + n,
            10,
            served.clone(),
        )
    })
    .await;
    let across = match &other {
        Some(other) => Some(
            paced(100.0, opts.seconds, |n| {
                feedback_across(
                    GatewayClient::new(other.clone()),
                    GatewayClient::new(ch.clone()),
                    3_000_000 + n,
                    10,
                    served.clone(),
                )
            })
            .await,
        ),
        None => None,
    };
    let rank10k = paced(10_000.0, opts.seconds, |n| {
        let mut gw = GatewayClient::new(ch.clone());
        async move {
            let t = Instant::now();
            gw.rank(rank_req(4_000_000 + n)).await.ok()?;
            Some(t.elapsed().as_secs_f64() * 1e3)
        }
    })
    .await;
    // The last 1,000 impressions' durability windows, as the gateway measured them.
    let durable = GatewayClient::new(ch.clone())
        .status(freshet_proto::gateway::v1::StatusRequest {})
        .await?
        .into_inner();
    let epochs = client.list_seals(0, 1).await?.last_sealed_epoch - epoch0;
    poller.abort();
    let interval_ms = t0.elapsed().as_secs_f64() * 1e3 / epochs.max(1) as f64;

    let mut t = freshet_sim::table::Table::new(
        format!(
            "freshet bench serve: 3 PS nodes x {} shards (fsync on), {} gateway(s), 1 worker, dim {}, {} candidates, K = {SLOTS}, {:.0} s per phase",
            opts.shards, opts.gateways.max(1), freshet_model::ModelSpec::default().dim, CANDIDATES, opts.seconds
        ),
        &["phase", "target", "achieved", "p50 ms", "p99 ms", "max ms", "errors"],
    );
    t.row(vec![
        "Rank (100 candidates, K=10)".into(),
        "1000 req/s".into(),
        format!("{:.0} req/s", rank.achieved),
        format!("{:.2}", rank.p50),
        format!("{:.2}", rank.p99),
        format!("{:.2}", rank.max),
        rank.errors.to_string(),
    ]);
    for (target, r) in [(1000.0, &f1k), (10_000.0, &f10k)] {
        t.row(vec![
            "freshness (feedback → served)".into(),
            format!("{target:.0} events/s"),
            format!("{:.0} events/s", r.achieved * 10.0),
            format!("{:.1}", r.p50),
            format!("{:.1}", r.p99),
            format!("{:.1}", r.max),
            r.errors.to_string(),
        ]);
    }
    if let Some(across) = &across {
        t.row(vec![
            "freshness, Feedback on the other gateway".into(),
            "1000 events/s".into(),
            format!("{:.0} events/s", across.achieved * 10.0),
            format!("{:.1}", across.p50),
            format!("{:.1}", across.p99),
            format!("{:.1}", across.max),
            across.errors.to_string(),
        ]);
    }
    t.row(vec![
        "Rank with impressions made durable".into(),
        "10000 req/s".into(),
        format!("{:.0} req/s", rank10k.achieved),
        format!("{:.2}", rank10k.p50),
        format!("{:.2}", rank10k.p99),
        format!("{:.2}", rank10k.max),
        rank10k.errors.to_string(),
    ]);
    t.note(format!(
        "impression durability window (Rank answer → append acknowledged on its shard), last 1,000 impressions after the 10k phase: p50 {:.1} ms, max {:.1} ms; impressions lost: {}",
        durable.impression_durable_p50_ms, durable.impression_durable_max_ms, durable.impressions_lost
    ));
    t.note(format!(
        "sealed epochs: {epochs}, mean epoch interval {interval_ms:.1} ms"
    ));
    let emitted = opts.out.emit(&[t]);
    cluster.stop(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
    emitted
}
