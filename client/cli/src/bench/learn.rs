//! `freshet bench learn`: training throughput of the local cluster (3 PS nodes with
//! fsync on, a gateway, two workers).
//!
//! - One worker, then two: load generators send Train calls (256 examples each, the
//!   shape the sim produces: 4 user features, 80 candidates with 4 features each, 5%
//!   clicks) as fast as the workers take them (a full queue answers RESOURCE_EXHAUSTED
//!   and the generator backs off); the phase ends when every step answered is within a
//!   committed seal. Examples/s = examples / (first send → last step sealed). The
//!   worker's CPU time comes from /proc, so examples per worker CPU-second is a figure
//!   that does not depend on what else the two cores are doing.
//! - End to end: Rank (80 candidates, K = 3) + Feedback for every slot, acknowledged
//!   once sealed, 256 users in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freshet_proto::gateway::v1::{gateway_client::GatewayClient, RankRequest, UserContext};
use freshet_proto::worker::v1::{worker_client::WorkerClient, Candidate, Example, TrainRequest};
use rand::{Rng, SeedableRng};

use freshet_client::gateway::{events_for, Gateway, RetryPolicy};
use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_model as model;
use freshet_sim::table::{Outputs, Table};

use super::{catalog, drive, with_cluster, Pace, ProcStats};

#[derive(Debug, Clone)]
pub struct LearnOptions {
    pub server_bin: std::path::PathBuf,
    pub worker_bin: std::path::PathBuf,
    pub seconds: f64,
    pub shards: u32,
    pub out: Outputs,
}

const CANDIDATES: u64 = 80;
const EXAMPLES_PER_CALL: usize = 256;
const CALLS_IN_FLIGHT_PER_WORKER: usize = 4;
const USERS_IN_FLIGHT: usize = 256;

fn examples(seed: u64) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..EXAMPLES_PER_CALL)
        .map(|_| {
            let mut user: Vec<u64> = (0..4)
                .map(|k| {
                    model::user_feature_id(
                        &format!("uf{k}"),
                        &format!("v{}", rng.random_range(0..8)),
                    )
                })
                .collect();
            user.sort_unstable();
            let candidates = (1..=CANDIDATES)
                .map(|id| Candidate {
                    item_id: id,
                    feature_ids: (0..4)
                        .map(|k| model::item_feature_id(&format!("f{k}={}", id % (5 + 4 * k))))
                        .collect(),
                    lexical: 0,
                })
                .collect();
            Example {
                user_feature_ids: user,
                candidates,
                shown: rng.random_range(0..CANDIDATES as u32),
                position: 1,
                propensity: 1.0 / CANDIDATES as f64,
                reward: if rng.random::<f64>() < 0.05 { 1.0 } else { 0.0 },
                ..Default::default()
            }
        })
        .collect()
}

struct Phase {
    examples: u64,
    steps: u64,
    seconds: f64,
    cpu: f64,
    busy: u64,
}

/// Train load on `workers` until `seconds` pass, then waits for every answered step to
/// be sealed.
async fn train_phase(
    ps: &freshet_client::PsClient,
    workers: &[String],
    pids: &[u32],
    seconds: f64,
) -> anyhow::Result<Phase> {
    let cpu = || -> f64 { pids.iter().filter_map(|p| ProcStats::cpu_seconds(*p)).sum() };
    let cpu0 = cpu();
    // Per incarnation: the first and last step answered in this phase.
    let last: Arc<Mutex<HashMap<u64, (u64, u64)>>> = Arc::default();
    let mut lanes = Vec::new();
    for (w, addr) in workers.iter().enumerate() {
        let client = WorkerClient::new(freshet_client::endpoint(addr)?);
        for k in 0..CALLS_IN_FLIGHT_PER_WORKER {
            let req = TrainRequest {
                examples: examples((w * 100 + k) as u64),
            };
            lanes.push((client.clone(), req));
        }
    }
    let lanes = Arc::new(lanes);
    let t0 = Instant::now();
    let answered = drive(Pace::Closed(lanes.len()), seconds, {
        let last = Arc::clone(&last);
        move |lane, _| {
            let (mut client, req) = lanes[lane].clone();
            let last = Arc::clone(&last);
            async move {
                let t = Instant::now();
                match client.train(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let mut l = last.lock().expect("lock");
                        let e = l.entry(r.inc).or_insert((r.step, r.step));
                        *e = (e.0.min(r.step), e.1.max(r.step));
                        Some(t.elapsed().as_secs_f64() * 1e3)
                    }
                    Err(_) => {
                        // A full queue: back off a little.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        None
                    }
                }
            }
        }
    })
    .await;
    let want = last.lock().expect("lock").clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ws = ps.list_workers().await?;
        let done = want.iter().all(|(inc, (_, step))| {
            ws.iter()
                .find(|w| w.inc == *inc)
                .is_some_and(|w| w.sealed_cut >= *step)
        });
        if done {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("the steps of the phase were not sealed within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Phase {
        examples: answered.ok() * EXAMPLES_PER_CALL as u64,
        steps: want.values().map(|(a, b)| b - a + 1).sum(),
        seconds: t0.elapsed().as_secs_f64(),
        cpu: cpu() - cpu0,
        busy: answered.errors,
    })
}

/// Rank + Feedback through the gateway for `seconds`; returns acknowledged examples/s.
async fn end_to_end(gw_addr: &str, seconds: f64) -> anyhow::Result<(f64, u64)> {
    let ch = freshet_client::endpoint(gw_addr)?;
    catalog(&ch, CANDIDATES, |id| {
        (0..4)
            .map(|k| format!("f{k}={}", id % (5 + 4 * k)))
            .collect()
    })
    .await?;
    let acked = Arc::new(AtomicU64::new(0));
    let rounds = drive(Pace::Closed(USERS_IN_FLIGHT), seconds, {
        let acked = Arc::clone(&acked);
        move |user, n| {
            // One attempt per call: the bench counts failures instead of hiding them.
            let gw = Gateway::from_client(GatewayClient::new(ch.clone()), RetryPolicy::NEVER);
            let acked = Arc::clone(&acked);
            let mut rng = rand::rngs::StdRng::seed_from_u64((user as u64) << 32 | n);
            async move {
                let t = Instant::now();
                let req = RankRequest {
                    user: Some(UserContext {
                        categorical: (0..4)
                            .map(|k| (format!("uf{k}"), format!("v{}", rng.random_range(0..8))))
                            .collect(),
                        ..Default::default()
                    }),
                    candidates: (1..=CANDIDATES).collect(),
                    k: 3,
                    ..Default::default()
                };
                let r = gw.rank(&req).await.ok()?;
                let events = events_for(&r, &format!("bench-learn-{user}-{n}"), |_| {
                    Some(rng.random::<f64>() < 0.05)
                });
                let k = events.len() as u64;
                gw.feedback(&events).await.ok()?;
                acked.fetch_add(k, Ordering::Relaxed);
                Some(t.elapsed().as_secs_f64() * 1e3)
            }
        }
    })
    .await;
    Ok((
        acked.load(Ordering::Relaxed) as f64 / rounds.seconds,
        rounds.errors,
    ))
}

/// Runs the benchmark and prints the table.
///
/// # Errors
/// The cluster did not start or a phase failed.
pub async fn bench_learn(opts: LearnOptions) -> anyhow::Result<()> {
    let (cluster, gw_addr) = freshet_local::fresh_cluster(
        &opts.server_bin,
        &opts.worker_bin,
        opts.shards,
        2,
        "bench-learn",
    )
    .await?;
    let table = with_cluster(cluster, async |cluster| {
        let ps = wait_ready(&cluster.addrs(), &ClientOptions::default()).await?;
        let workers = cluster.worker_addrs();
        let pids: Vec<u32> = (0..2)
            .filter_map(|w| cluster.pid(cluster.worker_index(w)))
            .collect();
        // Both workers registered with the coordinator.
        let deadline = Instant::now() + Duration::from_secs(30);
        while ps.list_workers().await.map_or(0, |w| w.len()) < 2 {
            if Instant::now() > deadline {
                anyhow::bail!("the workers did not register within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Warm-up: connections, rows created.
        train_phase(&ps, &workers[..1], &pids[..1], 1.0).await?;
        let one = train_phase(&ps, &workers[..1], &pids[..1], opts.seconds).await?;
        let two = train_phase(&ps, &workers, &pids, opts.seconds).await?;
        let (e2e, e2e_errors) = end_to_end(&gw_addr, opts.seconds).await?;
        let mut t = Table::new(
            format!(
                "freshet bench learn: 3 PS nodes x {} shards (fsync on), dim {}, {} candidates per example, {:.0} s per phase",
                opts.shards, freshet_model::ModelSpec::default().dim, CANDIDATES, opts.seconds
            ),
            &["phase", "examples/s", "steps", "examples per step", "worker CPU s", "examples per worker CPU-second", "queue-full answers"],
        );
        for (name, p) in [("Train → sealed, 1 worker", &one), ("Train → sealed, 2 workers", &two)] {
            t.row(vec![
                name.into(),
                format!("{:.0}", p.examples as f64 / p.seconds),
                p.steps.to_string(),
                format!("{:.0}", p.examples as f64 / p.steps.max(1) as f64),
                format!("{:.2}", p.cpu),
                format!("{:.0}", p.examples as f64 / p.cpu.max(1e-9)),
                p.busy.to_string(),
            ]);
        }
        t.row(vec![
            "end to end: Rank + Feedback acknowledged, 1 worker busy".into(),
            format!("{e2e:.0}"),
            "—".into(),
            "—".into(),
            "—".into(),
            "—".into(),
            format!("{e2e_errors} errors"),
        ]);
        t.note(format!(
            "2 workers / 1 worker: {:.2}x (on 2 cores the workers share the CPU with 3 PS nodes, a gateway and the load).",
            (two.examples as f64 / two.seconds) / (one.examples as f64 / one.seconds).max(1e-9)
        ));
        Ok(t)
    })
    .await?;
    opts.out.emit(&[table])
}
