//! `freshet bench serve`: the local cluster (3 PS nodes with fsync on, a gateway, a
//! worker) under a synthetic Rank + Feedback load; prints one table.
//!
//! In the order they run:
//! - Rank latency: 100 candidates, K = 10, paced at 1,000 req/s (open loop).
//! - Freshness at 1,000 events/s: Feedback sent at a target event rate; for each call,
//!   the time from sending it until the gateway serves a version that contains its
//!   update (the ack names the sealed epoch; Lookup shows the served epoch).
//! - Freshness with Feedback sent to the other gateway than the Rank it answers (the
//!   impression is read from its shard), at 1,000 events/s, right after the same-gateway
//!   phase so the two meet the cluster in the same state.
//! - Rank with impression logging (every Rank's impression appended to its shard after
//!   the answer) at each offered rate of `--rank-rates`: achieved rate, latency, calls
//!   skipped at the in-flight bound, and the durability window (Rank answer → append
//!   acknowledged) the gateway measured over its last 1,000 impressions after each.
//! - Freshness at 10,000 events/s.
//! - Recommend over a 100,000-item catalog (retrieval of the best 200 by the model's
//!   score at the served version, then ranking with K = 10): one client in a closed loop
//!   (the per-call cost) and an open loop at 1,000 req/s. Runs last: the large catalog
//!   stays in the gateway's replica.
//!   With `FRESHET_ANN_MIN_ITEMS` at or below 100,000 in the environment, the gateways
//!   retrieve through their approximate index (the phases wait until it is built).
//! - Search: the same Recommend with a query of two title words ("brand12 category34"),
//!   so the retrieved set also takes the best 200 by BM25 of the items' titles and the
//!   ranking reads the query's rows and crosses: closed loop and 1,000 req/s.
//! - Epoch interval: sealed epochs over the run's duration.
//!
//! Each phase also reports the gateway's CPU time per answered call (user + system, from
//! /proc): on a shared two-core machine latency under load moves with everything else
//! that runs, the work a call costs the gateway much less.

use std::time::{Duration, Instant};

use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, LookupRequest, RankRequest, RecommendRequest,
    UpsertItemsRequest, UserContext,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use freshet_client::gateway::{events_for, Gateway, RetryPolicy};
use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_local::fresh_cluster_gateways;

use super::{catalog, drive, with_cluster, Pace, ProcStats, Samples};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub server_bin: std::path::PathBuf,
    pub worker_bin: std::path::PathBuf,
    pub seconds: f64,
    pub shards: u32,
    /// 1 or more; the cross-gateway phase needs 2.
    pub gateways: usize,
    /// Offered req/s of the Rank phases with impressions made durable, one phase each.
    pub rank_rates: Vec<f64>,
    pub out: freshet_sim::table::Outputs,
}

const CANDIDATES: u64 = 100;
const SLOTS: u32 = 10;
const IN_FLIGHT_MAX: usize = 256;
/// Catalog size of the Recommend phases.
const RECOMMEND_ITEMS: u64 = 100_000;

fn user(n: u64) -> UserContext {
    UserContext {
        categorical: [
            ("segment".to_string(), format!("s{}", n % 7)),
            ("device".to_string(), format!("d{}", n % 3)),
        ]
        .into(),
        numeric: vec![(n % 10) as f32 / 10.0],
        user_id: format!("u{}", n % 5000),
        query: String::new(),
    }
}

/// The gateways' `--ann-min-items` when this run sets it through the environment (their
/// processes inherit it) at or below the Recommend catalog: the Recommend phases then go
/// through the approximate index, once it is built.
fn ann_min_items() -> Option<u64> {
    std::env::var("FRESHET_ANN_MIN_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=RECOMMEND_ITEMS).contains(n))
}

/// How long the Recommend phases wait for the gateway's approximate index.
const ANN_BUILD_WAIT: Duration = Duration::from_secs(600);

/// Adds items up to [`RECOMMEND_ITEMS`] to the catalog (10,000 per call) and waits until
/// the gateway serves all of them (and, with [`ann_min_items`], until its approximate
/// index holds them: that status is returned).
async fn large_catalog(
    ch: &Channel,
) -> anyhow::Result<Option<freshet_proto::gateway::v1::StatusResponse>> {
    let mut gw = GatewayClient::new(ch.clone());
    let ids: Vec<u64> = (CANDIDATES + 1..=RECOMMEND_ITEMS).collect();
    for chunk in ids.chunks(freshet_proto::catalog::ITEMS_PER_CALL_MAX) {
        let items: Vec<_> = chunk
            .iter()
            .map(|id| freshet_proto::ps::v1::Item {
                id: *id,
                features: vec![format!("brand={}", id % 1000), format!("cat={}", id % 100)],
                active: true,
                // Titles for the Search phase's lexical candidates.
                title: format!("brand{} category{} model{}", id % 1000, id % 100, id % 7919),
            })
            .collect();
        Gateway::from_client(gw.clone(), RetryPolicy::default())
            .upsert(&UpsertItemsRequest {
                items,
                sets: vec![],
            })
            .await?;
    }
    let st = status_until(&mut gw, Duration::from_secs(60), |st| {
        st.catalog_items >= RECOMMEND_ITEMS
    })
    .await?;
    anyhow::ensure!(
        st.catalog_items >= RECOMMEND_ITEMS,
        "the gateway serves {} of {RECOMMEND_ITEMS} catalog items after 60 s",
        st.catalog_items
    );
    if ann_min_items().is_none() {
        return Ok(None);
    }
    let st = status_until(&mut gw, ANN_BUILD_WAIT, |st| {
        st.ann_items >= RECOMMEND_ITEMS
    })
    .await?;
    anyhow::ensure!(
        st.ann_items >= RECOMMEND_ITEMS,
        "the gateway's approximate index holds {} items after {ANN_BUILD_WAIT:?}",
        st.ann_items
    );
    Ok(Some(st))
}

/// Polls the gateway's Status every 100 ms until `done` holds or `wait` runs out; the
/// last status seen either way.
async fn status_until(
    gw: &mut GatewayClient<Channel>,
    wait: Duration,
    done: impl Fn(&freshet_proto::gateway::v1::StatusResponse) -> bool,
) -> anyhow::Result<freshet_proto::gateway::v1::StatusResponse> {
    let deadline = Instant::now() + wait;
    loop {
        let st = gw
            .status(freshet_proto::gateway::v1::StatusRequest {})
            .await?
            .into_inner();
        if done(&st) || Instant::now() >= deadline {
            return Ok(st);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Mean and least recall@`n` of Recommend's retrieval through the gateway's approximate
/// index against its exact pass, over 100 users (each pair at one epoch). An item counts
/// as found when its score is at least the exact pass's n-th best: among items of equal
/// score (this bench's catalog has many) the exact pass keeps the lower ids and the
/// index any of them, and either is a correct answer.
async fn ann_recall(ch: &Channel, n: u32, base: u64) -> anyhow::Result<(f64, f64, u64)> {
    let mut gw = GatewayClient::new(ch.clone());
    let (mut sum, mut min, mut epoch) = (0.0f64, 1.0f64, 0);
    let users = 100;
    for u in 0..users {
        let req = RecommendRequest {
            user: Some(user(base + u)),
            k: n,
            retrieve: n,
            // The retrieved set alone (no random catalog items beside it).
            explore: Some(0),
            ..Default::default()
        };
        // The pair must come from one epoch; a seal in between asks again (a few times).
        let mut tries = 0;
        let (approx, exact) = loop {
            let approx = gw.recommend(req.clone()).await?.into_inner();
            let exact = gw
                .recommend(RecommendRequest {
                    exact: true,
                    min_epoch: approx.epoch,
                    ..req.clone()
                })
                .await?
                .into_inner();
            tries += 1;
            if exact.epoch == approx.epoch {
                break (approx, exact);
            }
            anyhow::ensure!(
                tries < 10,
                "the model kept moving between the two calls (epoch {} then {})",
                approx.epoch,
                exact.epoch
            );
        };
        let nth = exact
            .items
            .iter()
            .map(|i| i.score)
            .fold(f32::INFINITY, f32::min);
        let hit = approx.items.iter().filter(|i| i.score >= nth).count();
        let r = hit as f64 / exact.items.len().max(1) as f64;
        epoch = exact.epoch;
        sum += r;
        min = min.min(r);
    }
    Ok((sum / users as f64, min, epoch))
}

fn rank_req(n: u64) -> RankRequest {
    RankRequest {
        user: Some(user(n)),
        candidates: (1..=CANDIDATES).collect(),
        k: SLOTS,
        exploration: None,
        candidate_set: String::new(),
        min_epoch: 0,
    }
}

/// Calls started at `per_s` a second, at most [`IN_FLIGHT_MAX`] unanswered.
fn open(per_s: f64) -> Pace {
    Pace::Open {
        per_s,
        in_flight_max: IN_FLIGHT_MAX,
    }
}

/// One Feedback call of `events` events on a fresh impression ranked on `ranker` (the
/// same gateway or the other one) and sent to `gw`; returns the ms until `gw` serves
/// the sealed epoch of its update (`served` follows that gateway's epoch).
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
/// It polls only while `on` holds true: the freshness phases need it, and in the Rank
/// phases its Lookups would be a tenth of the gateway's load at 1,000 Ranks/s.
fn watch_served(
    mut gw: GatewayClient<Channel>,
    mut on: watch::Receiver<bool>,
) -> (watch::Receiver<u64>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(0);
    let task = tokio::spawn(async move {
        loop {
            if on.wait_for(|on| *on).await.is_err() {
                return;
            }
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

/// [`drive`], and the CPU time of processes `pids` (the gateways a phase calls) over the
/// phase per answered call in ms (NaN when one cannot be read or nothing answered).
async fn drive_cpu<F, Fut>(pids: &[u32], pace: Pace, seconds: f64, op: F) -> Samples
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<f64>> + Send + 'static,
{
    let cpu = || -> Option<f64> {
        if pids.is_empty() {
            return None;
        }
        pids.iter().map(|p| ProcStats::cpu_seconds(*p)).sum()
    };
    let before = cpu();
    let mut r = drive(pace, seconds, op).await;
    r.cpu_ms = match (before, cpu()) {
        (Some(a), Some(b)) if r.ok() > 0 => (b - a) * 1e3 / r.ok() as f64,
        _ => f64::NAN,
    };
    r
}

/// Runs the benchmark and prints the table.
///
/// # Errors
/// The cluster did not start.
pub async fn bench_serve(opts: ServeOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        !opts.rank_rates.is_empty()
            && opts
                .rank_rates
                .iter()
                .all(|r| r.is_finite() && (1.0..=1e6).contains(r)),
        "--rank-rates: one or more rates, each from 1 to 1,000,000 req/s"
    );
    let (cluster, gw_addrs) = fresh_cluster_gateways(
        &opts.server_bin,
        &opts.worker_bin,
        opts.shards,
        1,
        opts.gateways.max(1),
        "bench-serve",
    )
    .await?;
    let table = with_cluster(cluster, async |cluster| {
        let gw_addr = gw_addrs[0].clone();
        let other = gw_addrs
            .get(1)
            .map(|a| freshet_client::endpoint(a))
            .transpose()?;
        let client = wait_ready(&cluster.addrs(), &ClientOptions::default()).await?;
        let ch = freshet_client::endpoint(&gw_addr)?;
        let gw_pid: Vec<u32> = cluster.pid(cluster.gateway_index(0)).into_iter().collect();
        // The cross-gateway phase ranks on the second gateway and sends Feedback to the
        // first: both gateways' CPU is counted (a same-gateway call costs one gateway both).
        let both_pids: Vec<u32> = (0..gw_addrs.len().min(2))
            .filter_map(|g| cluster.pid(cluster.gateway_index(g)))
            .collect();
        catalog(&ch, CANDIDATES, |id| {
            vec![format!("brand={}", id % 10), format!("cat={}", id % 7)]
        })
        .await?;
        let (polling, on) = watch::channel(true);
        let (served, poller) = watch_served(GatewayClient::new(ch.clone()), on);
        // Feedback of `events` events per call on fresh impressions numbered from `base`,
        // ranked on `ranker`, sent to the first gateway.
        let feedback = |ranker: Channel, base: u64, events: usize| {
            let (ch, served) = (ch.clone(), served.clone());
            move |_, n| {
                feedback_across(
                    GatewayClient::new(ranker.clone()),
                    GatewayClient::new(ch.clone()),
                    base + n,
                    events,
                    served.clone(),
                )
            }
        };
        let rank = |base: u64| {
            let ch = ch.clone();
            move |_, n| {
                let mut gw = GatewayClient::new(ch.clone());
                async move {
                    let t = Instant::now();
                    gw.rank(rank_req(base + n)).await.ok()?;
                    Some(t.elapsed().as_secs_f64() * 1e3)
                }
            }
        };
        // Warm-up: connections, rows, the worker's registration.
        drive(open(200.0), 2.0, feedback(ch.clone(), 0, 5)).await;

        let epoch0 = client.list_seals(0, 1).await?.last_sealed_epoch;
        let t0 = Instant::now();
        polling.send_replace(false);
        let rank1k = drive_cpu(&gw_pid, open(1000.0), opts.seconds, rank(0)).await;
        polling.send_replace(true);
        // 10 events per call: 100 calls/s = 1k events/s, 1000 calls/s = 10k events/s.
        let f1k = drive_cpu(&gw_pid, open(100.0), opts.seconds, feedback(ch.clone(), 1_000_000, 10)).await;
        // Right after the same-gateway phase at the same rate, so that the two meet the
        // cluster in the same state (run after the 10,000 events/s phase, its backlog
        // made this one about a fifth slower whichever gateway ranked).
        let across = match &other {
            Some(other) => {
                let op = feedback(other.clone(), 3_000_000, 10);
                Some(drive_cpu(&both_pids, open(100.0), opts.seconds, op).await)
            }
            None => None,
        };
        polling.send_replace(false);
        // Each rate's phase, then the durability windows of its last 1,000 impressions,
        // as the gateway measured them.
        let mut durable_ranks = Vec::new();
        for (i, &rate) in opts.rank_rates.iter().enumerate() {
            let base = 4_000_000 + i as u64 * 10_000_000;
            let r = drive_cpu(&gw_pid, open(rate), opts.seconds, rank(base)).await;
            let durable = GatewayClient::new(ch.clone())
                .status(freshet_proto::gateway::v1::StatusRequest {})
                .await?
                .into_inner();
            durable_ranks.push((rate, r, durable));
        }
        polling.send_replace(true);
        let f10k = drive_cpu(&gw_pid, open(1000.0), opts.seconds, feedback(ch.clone(), 2_000_000, 10)).await;
        polling.send_replace(false);
        let epochs = client.list_seals(0, 1).await?.last_sealed_epoch - epoch0;
        poller.abort();
        let interval_ms = t0.elapsed().as_secs_f64() * 1e3 / epochs.max(1) as f64;

        let ann = large_catalog(&ch).await?;
        let recommend = |base: u64, search: bool| {
            let ch = ch.clone();
            move |_, n: u64| {
                let mut gw = GatewayClient::new(ch.clone());
                let mut user = user(base + n);
                if search {
                    user.query = format!("brand{} category{}", n % 1000, (n / 7) % 100);
                }
                async move {
                    let t = Instant::now();
                    gw.recommend(RecommendRequest {
                        user: Some(user),
                        k: SLOTS,
                        ..Default::default()
                    })
                    .await
                    .ok()?;
                    Some(t.elapsed().as_secs_f64() * 1e3)
                }
            }
        };
        let rec1 = drive_cpu(&gw_pid, Pace::Closed(1), opts.seconds, recommend(5_000_000, false)).await;
        let rec1k = drive_cpu(&gw_pid, open(1000.0), opts.seconds, recommend(6_000_000, false)).await;
        // The index's recall@100 in the running gateway: each user's 100 retrieved
        // through it against the exact pass at the same epoch (K = retrieve, so the answer
        // lists the whole retrieved set).
        let recall = match &ann {
            Some(_) => Some(ann_recall(&ch, 100, 9_000_000).await?),
            None => None,
        };
        let search1 = drive_cpu(&gw_pid, Pace::Closed(1), opts.seconds, recommend(7_000_000, true)).await;
        let search1k = drive_cpu(&gw_pid, open(1000.0), opts.seconds, recommend(8_000_000, true)).await;

        let mut t = freshet_sim::table::Table::new(
            format!(
                "freshet bench serve: 3 PS nodes x {} shards (fsync on), {} gateway(s), 1 worker, dim {}, {} candidates, K = {SLOTS}, {:.0} s per phase",
                opts.shards, opts.gateways.max(1), freshet_model::ModelSpec::default().dim, CANDIDATES, opts.seconds
            ),
            &[
                "phase",
                "target",
                "achieved",
                "p50 ms",
                "p99 ms",
                "max ms",
                "errors",
                "skipped",
                "gateway CPU ms/call",
            ],
        );
        let mut row = |phase: &str, target: &str, achieved: String, r: &Samples, digits: usize| {
            t.row(vec![
                phase.into(),
                target.into(),
                achieved,
                format!("{:.digits$}", r.quantile(0.5)),
                format!("{:.digits$}", r.quantile(0.99)),
                format!("{:.digits$}", r.max()),
                r.errors.to_string(),
                r.skipped.to_string(),
                format!("{:.3}", r.cpu_ms),
            ]);
        };
        let req_s = |r: &Samples| format!("{:.0} req/s", r.rate());
        let events_s = |r: &Samples| format!("{:.0} events/s", r.rate() * 10.0);
        // In the order the phases ran.
        row("Rank (100 candidates, K=10)", "1000 req/s", req_s(&rank1k), &rank1k, 2);
        let phase = "freshness (feedback → served)";
        row(phase, "1000 events/s", events_s(&f1k), &f1k, 1);
        if let Some(across) = &across {
            let phase = "freshness, Feedback on the other gateway";
            row(phase, "1000 events/s", events_s(across), across, 1);
        }
        let phase = "Rank with impressions made durable";
        for (rate, r, _) in &durable_ranks {
            row(phase, &format!("{rate:.0} req/s"), req_s(r), r, 2);
        }
        let phase = "freshness (feedback → served)";
        row(phase, "10000 events/s", events_s(&f10k), &f10k, 1);
        let phase = "Recommend (100k items, retrieve 200, K=10)";
        row(phase, "1 client, closed loop", req_s(&rec1), &rec1, 2);
        row(phase, "1000 req/s", req_s(&rec1k), &rec1k, 2);
        let phase = "Search: Recommend with a query (+ BM25 200 by title)";
        row(phase, "1 client, closed loop", req_s(&search1), &search1, 2);
        row(phase, "1000 req/s", req_s(&search1k), &search1k, 2);
        for (rate, _, durable) in &durable_ranks {
            t.note(format!(
                "impression durability window (Rank answer → append acknowledged on its shard), last 1,000 impressions after the {rate:.0} req/s phase: p50 {:.1} ms, max {:.1} ms; impressions lost: {}",
                durable.impression_durable_p50_ms, durable.impression_durable_max_ms, durable.impressions_lost
            ));
        }
        t.note(
            format!("skipped: calls an open loop did not start because {IN_FLIGHT_MAX} of its calls were unanswered (the cluster fell behind the offered rate); achieved: answered calls over the phase's wall time, to the last answer"),
        );
        t.note(format!(
            "sealed epochs: {epochs}, mean epoch interval {interval_ms:.1} ms"
        ));
        t.note(
            "gateway CPU ms/call: user + system CPU time of the gateway that answered the phase's calls (both gateways in the phase with Feedback on the other one), over the phase, per answered call; it includes the gateways' background work (replicating the model; in the freshness phases also the Lookup calls that watch the served epoch)",
        );
        if let Some((mean, min, epoch)) = recall {
            t.note(format!(
                "recall@100 of the approximate index against the exact pass at the same epoch (found: a score at least the exact 100th best), 100 users at epoch {epoch}: mean {mean:.3}, min {min:.2}"
            ));
        }
        if let Some(built) = ann {
            let after = GatewayClient::new(ch.clone())
                .status(freshet_proto::gateway::v1::StatusRequest {})
                .await?
                .into_inner();
            t.note(format!(
                "Recommend through the approximate index (FRESHET_ANN_MIN_ITEMS={}, ef {}): {} items from epoch {}, built in {:.1} s on one thread; calls through it {}, fell back to the exact pass {}",
                ann_min_items().unwrap_or(0),
                std::env::var("FRESHET_ANN_EF").unwrap_or_else(|_| "600".into()),
                built.ann_items,
                built.ann_epoch,
                built.ann_build_ms as f64 / 1000.0,
                after.recommend_ann,
                after.recommend_ann_fallbacks
            ));
        }
        Ok(t)
    })
    .await?;
    opts.out.emit(&[table])
}
