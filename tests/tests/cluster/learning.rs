//! Learning smoke test: on a simulated stream (segments with latent preferences,
//! position bias), the policy served by the gateway and trained by the worker from its
//! own feedback beats a uniformly random ranking by a clear margin. Fixed seeds; the
//! threshold is statistical (about ten standard errors), not a timing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use freshet_client::bench::wait_ready;
use freshet_client::sim::{drive, install_catalog, SimConfig, Thompson, World};
use freshet_client::ClientOptions;
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
    let mut gw = gateway.client().await;
    let world = World::new(SimConfig::default());
    install_catalog(&mut gw, &world).await.unwrap();
    let thompson = Arc::new(Mutex::new(Thompson::new(world.cfg.items)));
    let world = Arc::new(Mutex::new(world));
    let windows = drive(gw, world, thompson, 3000, 1000, 8, 42).await.unwrap();
    for (i, w) in windows.iter().enumerate() {
        eprintln!(
            "window {}: CTR {:.3} (Thompson {:.3}, random {:.3}, oracle {:.3}, normalised {:.2})",
            i + 1,
            w.ctr(),
            w.thompson_ctr(),
            w.random_ctr(),
            w.oracle_ctr(),
            w.normalised()
        );
    }
    let last = windows.last().unwrap();
    // Clicks per impression have a standard deviation below 0.7, so over 1,000
    // impressions the standard error is about 0.02: a margin of 0.2 is ~10 of them.
    assert!(
        last.ctr() > last.random_ctr() + 0.2,
        "learned CTR {:.3} vs random {:.3}",
        last.ctr(),
        last.random_ctr()
    );
    assert!(
        last.normalised() > 0.3,
        "normalised CTR {:.2}",
        last.normalised()
    );
    gateway.stop().await;
    worker.stop().await;
    c.shutdown().await;
}
