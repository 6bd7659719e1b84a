//! Forgetting a user on a running cluster (issue 17): one call, and from the epoch it
//! answers every replica and the gateway read the user's rows as initial values, the
//! impressions served to them are gone (Feedback on one is NOT_FOUND), other users keep
//! theirs, no file in any data dir still holds the user's row bytes once the snapshots
//! after the forget are written, and a repeated forget is harmless.

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_client::steps::{SparseStep, StepSession};
use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_model::{user_id_row, USER_TABLE};
use freshet_proto::gateway::v1::{
    FeedbackEvent, FeedbackRequest, LookupRequest, RankRequest, Reward, RewardKind, UserContext,
};
use freshet_proto::ps::v1::ReadConsistency;
use freshet_tests::{model_tables, plain_items, wait_converged, InProcCluster, InProcGateway};
use tonic::Code;

const SHARDS: u32 = 2;
const DIM: usize = 8;

fn rank(user: &str) -> RankRequest {
    RankRequest {
        user: Some(UserContext {
            user_id: user.into(),
            ..Default::default()
        }),
        candidates: vec![1, 2, 3],
        k: 2,
        ..Default::default()
    }
}

fn row_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Files under `dir` whose bytes contain `needle`.
fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forgotten_user_leaves_every_replica_gateway_impression_and_file() {
    let c = InProcCluster::start(3, SHARDS, model_tables(DIM)).await;
    let opts = ClientOptions {
        deadline: Duration::from_secs(10),
        ..Default::default()
    };
    let client = wait_ready(&c.addrs(), &opts).await.unwrap();
    let g = InProcGateway::start(&c.addrs()).await;
    let mut gw = g.client().await;
    let (alice, bob) = (user_id_row("alice"), user_id_row("bob"));

    // Both users' rows are trained (one step), and each is served an impression.
    let session = StepSession::register(Arc::clone(&client), "forget")
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(Arc::clone(&session).heartbeat(Duration::from_millis(20), stop_rx));
    let step = session.next_step();
    let sparse = [SparseStep {
        table: USER_TABLE.into(),
        ids: vec![alice, bob],
        grads: (0..2 * DIM).map(|j| 0.25 + j as f32 * 0.01).collect(),
    }];
    session.push(step, &sparse, &[]).await.unwrap();
    assert!(session
        .wait_sealed(step, Duration::from_secs(20))
        .await
        .is_some());
    let pull = |ids: Vec<u64>| {
        let client = Arc::clone(&client);
        async move {
            client
                .pull(USER_TABLE, &ids, ReadConsistency::Linearizable)
                .await
                .unwrap()
                .1
        }
    };
    // A sealed step's rows apply when the shard applies its seal, which may come a
    // moment after the meta seal `wait_sealed` saw: read until both rows have it.
    let initial_row = |id: u64| -> Vec<f32> {
        let spec = model_tables(DIM)
            .into_iter()
            .find(|t| t.name == USER_TABLE)
            .unwrap();
        (0..DIM as u64)
            .map(|j| {
                freshet_proto::init_value(
                    spec.seed,
                    freshet_proto::fnv1a64(USER_TABLE),
                    id,
                    j,
                    spec.init_scale,
                )
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (trained, bob_row) = loop {
        let (a, b) = (pull(vec![alice]).await, pull(vec![bob]).await);
        if a != initial_row(alice) && b != initial_row(bob) {
            break (a, b);
        }
        assert!(
            Instant::now() < deadline,
            "the sealed step never reached the rows"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    gw.upsert_items(plain_items(1..=3)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (imp_alice, imp_bob) = loop {
        match (gw.rank(rank("alice")).await, gw.rank(rank("bob")).await) {
            (Ok(a), Ok(b)) => break (a.into_inner(), b.into_inner()),
            (a, b) => assert!(Instant::now() < deadline, "never ranked: {a:?} {b:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The impressions are durable before the forget (the gateway's write-behind).
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw
        .status(freshet_proto::gateway::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .impressions
        > 0
    {
        assert!(Instant::now() < deadline, "impressions never durable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The row's bytes reach a snapshot file: tests snapshot every 200 entries, so other
    // steps (on feature rows of every shard) fill the logs until one is written. How
    // many entries a step makes depends on how seals batch steps, so the filler goes on
    // in rounds of 50 steps until a file holds the row (at most 1,000 steps).
    let needle = row_bytes(&trained);
    let mut k = 0u64;
    while files_holding(c.dir.path(), &needle).is_empty() {
        if k >= 1_000 {
            // What each replica applied and snapshotted, to tell "too few entries" from
            // "snapshots stopped".
            let status = client.cluster_status(false).await.unwrap();
            let indexes: Vec<(u32, Vec<(u64, u64)>)> = status
                .shards
                .iter()
                .map(|s| {
                    let r = s.replicas.iter();
                    (
                        s.shard,
                        r.map(|r| (r.applied_index, r.snapshot_index)).collect(),
                    )
                })
                .collect();
            // And whether the row is still what was trained (a later change would keep
            // its first bytes out of every newer snapshot).
            let now = pull(vec![alice]).await;
            let first = files_holding(c.dir.path(), &needle[..4]).len();
            panic!(
                "the trained row never reached a file (shard, [(applied, snapshot index)]): \
                 {indexes:?}; trained {trained:?}, now {now:?}; files holding its first value: \
                 {first}"
            );
        }
        let mut last = 0;
        for _ in 0..50 {
            last = session.next_step();
            let filler = [SparseStep {
                table: freshet_model::FEATURE_TABLE.into(),
                ids: (0..8).map(|i| 10_000 + k * 8 + i).collect(),
                grads: vec![0.01; 8 * DIM],
            }];
            session.push(last, &filler, &[]).await.unwrap();
            k += 1;
        }
        assert!(session
            .wait_sealed(last, Duration::from_secs(30))
            .await
            .is_some());
        // A snapshot is written off the group's task: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        while files_holding(c.dir.path(), &needle).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let forgot = client.forget_user("alice").await.unwrap();
    assert_eq!(forgot.user_hash, alice);
    assert!(forgot.epoch > 0);

    // Every replica converges without the row; the PS and the gateway read it as initial.
    wait_converged(&c.addrs(), SHARDS, 3, Duration::from_secs(20)).await;
    let initial = initial_row(alice);
    assert_eq!(pull(vec![alice]).await, initial, "the PS forgot the row");
    assert_eq!(pull(vec![bob]).await, bob_row, "other users keep theirs");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = gw
            .lookup(LookupRequest {
                table: USER_TABLE.into(),
                ids: vec![alice],
            })
            .await
            .unwrap()
            .into_inner();
        if l.epoch >= forgot.epoch {
            assert_eq!(
                l.values, initial,
                "the gateway forgot the row in that epoch"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "epoch {} never served",
            forgot.epoch
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Feedback on the user's impression finds nothing to join; another user's joins
    // (it goes on to wait for a worker, which this cluster lacks: any answer but
    // NOT_FOUND).
    let click = |imp: &freshet_proto::gateway::v1::RankResponse, id: &str| FeedbackRequest {
        events: vec![FeedbackEvent {
            event_id: id.into(),
            impression_id: imp.impression_id.clone(),
            item_id: imp.items[0].item_id,
            position: 1,
            rewards: vec![Reward {
                kind: RewardKind::Click as i32,
                weight: 0.0,
            }],
            event_time_ms: 0,
        }],
    };
    let e = gw.feedback(click(&imp_alice, "a1")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let mut short = tonic::Request::new(click(&imp_bob, "b1"));
    short.set_timeout(Duration::from_millis(1500));
    if let Err(e) = gw.feedback(short).await {
        assert_ne!(e.code(), Code::NotFound, "bob's impression was kept: {e:?}");
    }
    // The snapshots after the forget hold no copy of the row (older ones are deleted).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = files_holding(c.dir.path(), &needle);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "files still hold the row: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A repeated forget is harmless: a new epoch, nothing else changes.
    let again = client.forget_user("alice").await.unwrap();
    assert!(again.epoch > forgot.epoch);
    wait_converged(&c.addrs(), SHARDS, 3, Duration::from_secs(20)).await;
    assert_eq!(pull(vec![bob]).await, bob_row);
    let e = client.forget_user("").await.unwrap_err().to_string();
    assert!(e.contains("user_id"), "{e}");
    let _ = stop_tx.send(true);
    g.stop().await;
}
