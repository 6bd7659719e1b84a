//! `freshet up`, the README's main command: starts 3 PS nodes, a gateway and a worker with
//! no flags but a data dir, writes cluster.json, ranks and learns from feedback, stops
//! cleanly on SIGTERM, and resumes from the same data dir.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_local::ClusterFile;
use freshet_proto::ps::v1::ReadConsistency;

fn freshet_bin() -> std::path::PathBuf {
    freshet_tests::server_bin().with_file_name("freshet")
}

/// A running `freshet up`; stopped with SIGTERM when dropped, so a failing test does not
/// leave a cluster behind (`freshet up` restarts the processes it runs).
struct Up(Option<std::process::Child>);

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            freshet_local::signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// The child is handed to the caller inside `Up`, which reaps it.
#[allow(clippy::zombie_processes)]
async fn start_up(dir: &std::path::Path) -> (Up, Vec<String>, String) {
    let mut child = Command::new(freshet_bin())
        .arg("up")
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn freshet up");
    let path = dir.join("cluster.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(bytes) = std::fs::read(&path) {
            if let Ok(f) = serde_json::from_slice::<ClusterFile>(&bytes) {
                let of = |role: &str| -> Vec<String> {
                    f.nodes
                        .iter()
                        .filter(|n| n.role == role && n.pid > 0)
                        .map(|n| n.grpc.clone())
                        .collect()
                };
                let (ps, gw, wk) = (of("ps"), of("gateway"), of("worker"));
                if ps.len() == 3 && gw.len() == 1 && wk.len() == 1 {
                    return (Up(Some(child)), ps, gw[0].clone());
                }
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cluster.json never listed 3 PS nodes, a gateway and a worker");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The loop works out of the box: catalog upsert, Rank, Feedback acknowledged (sealed).
async fn rank_and_learn(gateway: &str) {
    use freshet_proto::gateway::v1::{
        gateway_client::GatewayClient, FeedbackEvent, FeedbackRequest, RankRequest, Reward,
        UpsertItemsRequest,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut gw = loop {
        match GatewayClient::connect(format!("http://{gateway}")).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "gateway unreachable: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let items: Vec<freshet_proto::ps::v1::Item> = (1..=10)
        .map(|id| freshet_proto::ps::v1::Item {
            id,
            features: vec![format!("brand={}", id % 3)],
            active: true,
            title: String::new(),
        })
        .collect();
    loop {
        match gw
            .upsert_items(UpsertItemsRequest {
                sets: vec![],
                items: items.clone(),
            })
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "upsert failed: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let ranked = loop {
        let req = RankRequest {
            candidates: (1..=10).collect(),
            k: 3,
            ..Default::default()
        };
        match gw.rank(req).await {
            Ok(r) => break r.into_inner(),
            Err(e) => {
                assert!(Instant::now() < deadline, "rank failed: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(ranked.items.len(), 3);
    let ack = loop {
        let req = FeedbackRequest {
            events: vec![FeedbackEvent {
                event_id: "up-1".into(),
                impression_id: ranked.impression_id.clone(),
                item_id: ranked.items[0].item_id,
                position: 1,
                rewards: vec![Reward::default()],
                event_time_ms: 0,
            }],
        };
        match gw.feedback(req).await {
            Ok(r) => break r.into_inner(),
            Err(e) => {
                assert!(Instant::now() < deadline, "feedback failed: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(ack.sealed_epoch > 0 && ack.steps.len() == 1, "{ack:?}");
}

fn stop(mut up: Up) {
    let mut child = up.0.take().expect("running");
    freshet_local::signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "freshet up exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "freshet up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_stops_on_sigterm_and_resumes_from_its_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addrs, gateway) = start_up(dir.path()).await;
    let client = wait_ready(&addrs, &ClientOptions::default()).await.unwrap();
    rank_and_learn(&gateway).await;
    let ids = [11u64, 22, 33];
    // `freshet up` creates the model's tables at the model's default width.
    let dim = freshet_model::ModelSpec::default().dim;
    client
        .push("item", &ids, &vec![0.5; ids.len() * dim])
        .await
        .unwrap();
    let (_, written) = client
        .pull("item", &ids, ReadConsistency::Linearizable)
        .await
        .unwrap();
    drop(client);
    stop(child);
    let after_stop: ClusterFile =
        serde_json::from_slice(&std::fs::read(dir.path().join("cluster.json")).unwrap()).unwrap();
    assert!(
        after_stop.nodes.is_empty(),
        "stopped nodes are not listed as running"
    );

    let (child, addrs2, _) = start_up(dir.path()).await;
    assert_eq!(addrs, addrs2, "a resumed cluster keeps its addresses");
    let client = wait_ready(&addrs2, &ClientOptions::default())
        .await
        .unwrap();
    let (_, read) = client
        .pull("item", &ids, ReadConsistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(written, read, "rows survive a stop and resume");
    drop(client);
    stop(child);
}
