//! `freshet up`, the README's main command: starts 3 nodes with no flags but a data dir,
//! writes cluster.json, stops cleanly on SIGTERM, and resumes from the same data dir.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use freshet_client::bench::wait_ready;
use freshet_client::local::ClusterFile;
use freshet_client::ClientOptions;
use freshet_proto::ps::v1::ReadConsistency;

fn freshet_bin() -> std::path::PathBuf {
    freshet_tests::server_bin().with_file_name("freshet")
}

// The child is handed to the caller, which reaps it in `stop`.
#[allow(clippy::zombie_processes)]
async fn start_up(dir: &std::path::Path) -> (std::process::Child, Vec<String>) {
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
                if f.nodes.len() == 3 && f.nodes.iter().all(|n| n.role == "ps" && n.pid > 0) {
                    return (child, f.nodes.into_iter().map(|n| n.grpc).collect());
                }
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cluster.json never listed 3 nodes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stop(mut child: std::process::Child) {
    freshet_client::local::signal(child.id(), libc::SIGTERM);
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
    let (child, addrs) = start_up(dir.path()).await;
    let client = wait_ready(&addrs, &ClientOptions::default()).await.unwrap();
    let ids = [11u64, 22, 33];
    client.push("item", &ids, &[0.5; 48]).await.unwrap();
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

    let (child, addrs2) = start_up(dir.path()).await;
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
