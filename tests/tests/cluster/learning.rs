//! Learning smoke test: on a simulated stream (the OBD schema: 80 items with categorical
//! features, users with four fields, position bias), the policy served by the gateway and
//! trained by the worker from its own feedback beats a uniformly random ranking by a
//! clear margin. Fixed seeds; the threshold is statistical, not a timing.

use std::sync::Arc;
use std::time::Duration;

use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_sim::policy::Thompson;
use freshet_sim::world::{Grounding, Schedule, World, WorldConfig};
use freshet_sim::{evaluate, live_run, LiveOptions};
use freshet_tests::{model_tables, InProcCluster, InProcGateway, InProcWorker};

/// The learning loop in process: 3 PS nodes (2 shards), a worker and a gateway.
struct Loop {
    cluster: InProcCluster,
    worker: InProcWorker,
    gateway: InProcGateway,
}

impl Loop {
    async fn start() -> Self {
        let cluster = InProcCluster::start(3, 2, model_tables(16)).await;
        let opts = ClientOptions {
            deadline: Duration::from_secs(10),
            ..Default::default()
        };
        wait_ready(&cluster.addrs(), &opts).await.unwrap();
        let worker = InProcWorker::start(&cluster.addrs()).await;
        let gateway = InProcGateway::start(&cluster.addrs()).await;
        Loop {
            cluster,
            worker,
            gateway,
        }
    }

    async fn stop(self) {
        self.gateway.stop().await;
        self.worker.stop().await;
        self.cluster.shutdown().await;
    }
}

/// Mean and standard error of served minus random expected clicks from impression `from`.
fn margin_over_random(recs: &[freshet_sim::Rec], from: usize) -> (f64, f64) {
    let diffs: Vec<f64> = recs[from..]
        .iter()
        .map(|r| f64::from(r.expected) - f64::from(r.random))
        .collect();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (diffs.len() - 1) as f64;
    (mean, (var / diffs.len() as f64).sqrt())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_served_policy_learns_to_beat_random() {
    let lp = Loop::start().await;
    let gw = lp.gateway.client().await;
    let schedule = Schedule::stationary(1000, 4000);
    let mut cfg = WorldConfig::new(42, schedule);
    cfg.mean_ctr = 0.1;
    let world = Arc::new(World::new(cfg, Grounding::synthetic(42)));
    let live = live_run(&gw, &world, LiveOptions::default(), &|_| {})
        .await
        .unwrap();
    // Hourly model copies were read from the gateway at one epoch each.
    assert_eq!(live.copies.len(), 4);
    assert!(live.copies.windows(2).all(|w| w[0].1.epoch <= w[1].1.epoch));
    let mut ts = Thompson::new(world.total_items(), 1);
    let thompson = evaluate(&world, &live.recs, 3, &mut ts).unwrap();
    let window = |xs: &mut dyn Iterator<Item = f32>| -> f64 {
        xs.skip(3000).map(f64::from).sum::<f64>() / 1000.0
    };
    let served = window(&mut live.recs.iter().map(|r| r.expected));
    let random = window(&mut live.recs.iter().map(|r| r.random));
    let oracle = window(&mut live.recs.iter().map(|r| r.oracle));
    let ts = window(&mut thompson.into_iter());
    let normalised = (served - random) / (oracle - random);
    eprintln!(
        "last 1,000 impressions: expected clicks {served:.3} (Thompson {ts:.3}, random {random:.3}, oracle {oracle:.3}), normalised {normalised:.2}"
    );
    // The margin over random, measured against its own standard error over the window
    // (per impression: expected clicks of what was served minus those of a random order).
    let (mean, se) = margin_over_random(&live.recs, 3000);
    assert!(
        served > random + 0.05,
        "learned {served:.3} vs random {random:.3}"
    );
    assert!(
        mean > 5.0 * se,
        "margin {mean:.3} over random is not 5 standard errors ({se:.4})"
    );
    // The Thompson baseline ran on the same impressions: a figure between nothing and
    // the oracle, not a number nobody looks at.
    assert!(
        ts.is_finite() && ts >= 0.0 && ts <= oracle + 1e-6,
        "Thompson {ts:.3} outside [0, oracle {oracle:.3}]"
    );
    assert!(normalised > 0.12, "normalised CTR {normalised:.2}");
    lp.stop().await;
}

/// The same loop on the returning-users world (individual users with ids who come back
/// in sessions, new users arriving, a heavy-tailed catalog of 100 items, slates of 10):
/// each session's Ranks ask for the epoch of the user's previous Feedback, the served
/// policy beats a random ranking by a clear margin, and the hourly copies (read with
/// every user's row and history at one epoch) rank better than random too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_served_policy_learns_returning_users() {
    use freshet_sim::policy::ModelCopy;
    use freshet_sim::world::Returning;
    let lp = Loop::start().await;
    let gw = lp.gateway.client().await;
    let schedule = Schedule::stationary(1000, 3000);
    let returning = Returning {
        users: 300,
        new_users_per_hour: 100,
        items: 100,
        ..Returning::default()
    };
    let mut cfg = WorldConfig::returning(7, schedule, returning);
    // Denser clicks than the default 1%, for a run this short.
    cfg.mean_ctr = 0.03;
    let world = Arc::new(World::new(cfg, Grounding::synthetic(7)));
    let slots = 10;
    let live_opts = LiveOptions {
        slots,
        ..LiveOptions::default()
    };
    let live = live_run(&gw, &world, live_opts, &|_| {}).await.unwrap();
    assert_eq!(live.copies.len(), 3);
    let last = |xs: &[f32]| xs[2000..].iter().map(|x| f64::from(*x)).sum::<f64>() / 1000.0;
    let served: Vec<f32> = live.recs.iter().map(|r| r.expected).collect();
    let random: Vec<f32> = live.recs.iter().map(|r| r.random).collect();
    let oracle: Vec<f32> = live.recs.iter().map(|r| r.oracle).collect();
    let (s, r, o) = (last(&served), last(&random), last(&oracle));
    let (mean, se) = margin_over_random(&live.recs, 2000);
    // Users came back: far fewer distinct users than sessions.
    let users: std::collections::HashSet<u32> = live.recs.iter().map(|r| r.user).collect();
    let hourly = evaluate(
        &world,
        &live.recs,
        slots,
        &mut ModelCopy::new(live.copies.clone(), 0.2, 0.02, 1),
    )
    .unwrap();
    let h = last(&hourly);
    eprintln!(
        "last 1,000 impressions: expected clicks {s:.3} (hourly copy {h:.3}, random {r:.3}, oracle {o:.3}), normalised {:.2}; {} users in 600 sessions",
        (s - r) / (o - r),
        users.len()
    );
    assert!(users.len() < 450, "{} distinct users", users.len());
    assert!(
        mean > 5.0 * se,
        "margin {mean:.4} over random is not 5 standard errors ({se:.4})"
    );
    assert!(
        (s - r) / (o - r) > 0.2,
        "normalised CTR {:.2}",
        (s - r) / (o - r)
    );
    assert!(h > r && h <= o + 1e-6, "hourly copy {h:.3}, random {r:.3}");
    lp.stop().await;
}
