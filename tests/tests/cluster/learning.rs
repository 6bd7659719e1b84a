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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_served_policy_learns_to_beat_random() {
    let c = InProcCluster::start(3, 2, model_tables(16)).await;
    let opts = ClientOptions {
        deadline: Duration::from_secs(10),
        ..Default::default()
    };
    wait_ready(&c.addrs(), &opts).await.unwrap();
    let worker = InProcWorker::start(&c.addrs()).await;
    let gateway = InProcGateway::start(&c.addrs()).await;
    let gw = gateway.client().await;
    let schedule = Schedule {
        hour: 1000,
        shift_at: None,
        gradual: None,
        new_items_at: None,
        end: 4000,
    };
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
    let diffs: Vec<f64> = live
        .recs
        .iter()
        .skip(3000)
        .map(|r| f64::from(r.expected) - f64::from(r.random))
        .collect();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (diffs.len() - 1) as f64;
    let se = (var / diffs.len() as f64).sqrt();
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
    gateway.stop().await;
    worker.stop().await;
    c.shutdown().await;
}
