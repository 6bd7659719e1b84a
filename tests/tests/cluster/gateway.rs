//! The gateway from outside: one consistent epoch per answer (marker steps touching every
//! shard are seen on all shards or none), epochs never decrease across a PS leader loss,
//! a late second gateway reaches the same epoch with bit-identical scores, bad input.

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_client::steps::{SparseStep, StepSession};
use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_proto::gateway::v1::{
    Exploration, LookupRequest, RankRequest, UpsertItemsRequest, UserContext,
};
use freshet_proto::ps::v1::Item;
use freshet_proto::shard_for;
use freshet_server::config::TableConfig;
use freshet_tests::{model_tables, InProcCluster, InProcGateway};
use tonic::Code;

const SHARDS: u32 = 3;

/// A table whose rows count marker steps exactly: SGD with lr 1, initial value 0, and
/// every marker step pushes gradient -1 to one row on each shard.
fn marker_table() -> TableConfig {
    serde_json::from_value(serde_json::json!({
        "name": "marker", "dim": 1,
        "optimizer": {"type": "sgd", "lr": 1.0},
        "init_scale": 0.0, "seed": 1
    }))
    .unwrap()
}

fn marker_ids() -> Vec<u64> {
    (0..SHARDS)
        .map(|s| {
            (1_000_000..)
                .find(|id| shard_for(*id, SHARDS) == s)
                .unwrap()
        })
        .collect()
}

fn rank_request(items: &[u64], k: u32) -> RankRequest {
    RankRequest {
        user: Some(UserContext {
            categorical: [("age".to_string(), "30-39".to_string())].into(),
            numeric: vec![0.5, -1.0],
            user_id: "u42".into(),
            query: String::new(),
        }),
        candidates: items.to_vec(),
        k,
        exploration: Some(Exploration {
            temperature: 1.0,
            epsilon: 0.1,
        }),
        candidate_set: String::new(),
        min_epoch: 0,
    }
}

/// Reads every marker row from the version the gateway serves now: (epoch, counts).
async fn markers(
    gw: &mut freshet_proto::gateway::v1::gateway_client::GatewayClient<tonic::transport::Channel>,
) -> Option<(u64, Vec<f32>)> {
    let r = gw
        .lookup(LookupRequest {
            table: "marker".into(),
            ids: marker_ids(),
        })
        .await
        .ok()?
        .into_inner();
    Some((r.epoch, r.values))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_answer_comes_from_one_epoch_and_gateways_agree() {
    let mut tables = model_tables(8);
    tables.push(marker_table());
    let c = InProcCluster::start(3, SHARDS, tables).await;
    let opts = ClientOptions {
        deadline: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let client = wait_ready(&c.addrs(), &opts).await.unwrap();
    let g1 = InProcGateway::start(&c.addrs()).await;
    let mut gw = g1.client().await;

    // Catalog: items become rankable with the next epoch.
    let items: Vec<u64> = (1..=20).collect();
    gw.upsert_items(UpsertItemsRequest {
        sets: vec![freshet_proto::ps::v1::CandidateSet {
            name: "top10".into(),
            items: (1..=10).collect(),
        }],
        items: items
            .iter()
            .map(|id| Item {
                id: *id,
                features: vec![format!("brand={}", id % 4), format!("cat={}", id % 3)],
                active: true,
                title: String::new(),
            })
            .collect(),
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        match gw.rank(rank_request(&items, 5)).await {
            Ok(r) => break r.into_inner(),
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Unavailable | Code::NotFound),
                    "{s:?}"
                );
                assert!(Instant::now() < deadline, "gateway never served: {s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(first.items.len(), 5);
    assert!(first.epoch >= 1);
    assert!(!first.impression_id.is_empty());
    let mut shown: Vec<u64> = first.items.iter().map(|i| i.item_id).collect();
    shown.sort_unstable();
    shown.dedup();
    assert_eq!(shown.len(), 5, "slots hold distinct items");
    for (pos, it) in first.items.iter().enumerate() {
        assert_eq!(it.position as usize, pos + 1);
        // epsilon 0.1 spread over the remaining candidates: a floor on every propensity.
        assert!(
            it.propensity >= 0.1 / 20.0 && it.propensity <= 1.0,
            "{it:?}"
        );
    }

    // A named candidate set, replicated with the catalog.
    let mut by_set = rank_request(&[], 4);
    by_set.candidate_set = "top10".into();
    let r = gw.rank(by_set.clone()).await.unwrap().into_inner();
    assert_eq!(r.items.len(), 4);
    assert!(r.items.iter().all(|i| (1..=10).contains(&i.item_id)));
    by_set.candidate_set = "nope".into();
    let e = gw.rank(by_set.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("candidate_set"), "{}", e.message());
    by_set.candidates = vec![1];
    let e = gw.rank(by_set.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // A candidate set alone (no items in the call): its shard takes it by itself.
    gw.upsert_items(UpsertItemsRequest {
        items: vec![],
        sets: vec![freshet_proto::ps::v1::CandidateSet {
            name: "odd".into(),
            items: vec![1, 3, 5, 7],
        }],
    })
    .await
    .unwrap();
    by_set.candidates = vec![];
    by_set.candidate_set = "odd".into();
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        match gw.rank(by_set.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) => {
                assert_eq!(s.code(), Code::NotFound, "{s:?}");
                assert!(Instant::now() < deadline, "the set never became rankable");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(r.items.iter().all(|i| [1, 3, 5, 7].contains(&i.item_id)));

    // Bad input names the field and changes nothing.
    let e = gw.rank(rank_request(&items, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("k:"), "{}", e.message());
    let e = gw.rank(rank_request(&[1, 99_999], 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("candidates[1]"), "{}", e.message());
    let mut bad = rank_request(&items, 2);
    bad.exploration = Some(Exploration {
        temperature: 1000.0,
        epsilon: 0.0,
    });
    let e = gw.rank(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("exploration.temperature"),
        "{}",
        e.message()
    );
    let mut bad = rank_request(&items, 2);
    bad.user.as_mut().unwrap().numeric = vec![f32::NAN];
    let e = gw.rank(bad).await.unwrap_err();
    assert!(e.message().contains("user.numeric[0]"), "{}", e.message());
    let e = gw.rank(rank_request(&[3, 3], 1)).await.unwrap_err();
    assert!(e.message().contains("candidates[1]"), "{}", e.message());

    // Marker steps touch one row on every shard; a reader checks every answer.
    let session = StepSession::register(Arc::clone(&client), "markers")
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(Arc::clone(&session).heartbeat(Duration::from_millis(20), stop_rx.clone()));
    let writer = {
        let session = Arc::clone(&session);
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut steps = 0u64;
            while !*stop.borrow() {
                let step = session.next_step();
                let sparse = [SparseStep {
                    table: "marker".into(),
                    ids: marker_ids(),
                    grads: vec![-1.0; SHARDS as usize],
                }];
                // Same (inc, step) until acknowledged.
                while session.push(step, &sparse, &[]).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                steps += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            steps
        })
    };
    let check = |epoch: u64, values: &[f32], last: &mut u64| {
        assert!(
            values.iter().all(|v| *v == values[0]),
            "epoch {epoch}: markers differ across shards {values:?}"
        );
        assert!(epoch >= *last, "epoch went back from {last} to {epoch}");
        *last = epoch;
    };
    let mut last = 0;
    let mut seen_counts = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        if let Some((e, v)) = markers(&mut gw).await {
            check(e, &v, &mut last);
            seen_counts.insert(v[0] as u64);
        }
    }
    // Cut the leader of shard 1 off mid-stream: the gateway keeps answering from whole
    // epochs and never goes back.
    let status = client.cluster_status(false).await.unwrap();
    let victim = status.shards[1].leader_id;
    c.isolate(victim);
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        if let Some((e, v)) = markers(&mut gw).await {
            check(e, &v, &mut last);
            seen_counts.insert(v[0] as u64);
        }
        if let Ok(r) = gw.rank(rank_request(&items, 3)).await {
            let r = r.into_inner();
            assert!(r.epoch >= last, "rank epoch {} after {last}", r.epoch);
            last = r.epoch;
        }
    }
    c.heal();
    // A worker dies mid-step: its step 1 went to every shard and it reported that
    // progress; of step 2 one shard received its part, the others never will. It is
    // fenced at cut 1: step 1 applies everywhere, step 2's part never (the marker rows
    // would disagree).
    let marker_step = || SparseStep {
        table: "marker".into(),
        ids: marker_ids(),
        grads: vec![-1.0; SHARDS as usize],
    };
    let dying = StepSession::register(Arc::clone(&client), "dies-mid-step")
        .await
        .unwrap();
    let dying_inc = dying.inc();
    dying.push(1, &[marker_step()], &[]).await.unwrap();
    // Its progress is sealed (reported until a seal covers step 1; a report that only
    // reached a coordinator about to lose its leadership would not count).
    dying
        .wait_sealed(1, Duration::from_secs(20))
        .await
        .expect("the dying worker's step 1 sealed");
    let parts = client
        .prepare_step(dying_inc, 2, &[marker_step()], &[])
        .unwrap();
    client.send_step_part(&parts[0]).await.unwrap();
    drop(dying);
    // And the meta leader (the coordinator) is cut off for a while.
    let meta_leader = client
        .cluster_status(false)
        .await
        .unwrap()
        .meta
        .unwrap()
        .leader_id;
    c.isolate(meta_leader);
    let until = Instant::now() + Duration::from_millis(2000);
    while Instant::now() < until {
        if let Some((e, v)) = markers(&mut gw).await {
            check(e, &v, &mut last);
            seen_counts.insert(v[0] as u64);
        }
    }
    c.heal();
    let _ = stop_tx.send(true);
    let steps = writer.await.unwrap();
    assert!(
        seen_counts.len() > 3,
        "the gateway followed the markers: {seen_counts:?}"
    );

    // The dying worker is fenced (its lease lapsed) at the cut it reported: step 1.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seals = client.list_seals(0, 0).await.unwrap();
        let cut = seals
            .seals
            .iter()
            .flat_map(|s| &s.cuts)
            .filter(|c| c.inc == dying_inc)
            .map(|c| c.step)
            .max();
        if seals.seals.iter().any(|s| s.fenced.contains(&dying_inc)) {
            assert_eq!(cut, Some(1), "fenced at the reported cut");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dying worker was never fenced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Everything sealed becomes visible: the final count equals the steps pushed (the
    // writer's, and the dying worker's step 1).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = session.report().await;
        if let Some((e, v)) = markers(&mut gw).await {
            check(e, &v, &mut last);
            if v[0] as u64 == steps + 1 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "gateway never showed all {steps} steps"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A second gateway started late reaches the same epoch with bit-identical scores.
    let g2 = InProcGateway::start(&c.addrs()).await;
    let mut gw2 = g2.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((e2, _)) = markers(&mut gw2).await {
            if e2 == last {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "second gateway did not reach {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = gw
        .rank(rank_request(&items, 20))
        .await
        .unwrap()
        .into_inner();
    let b = gw2
        .rank(rank_request(&items, 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.epoch, b.epoch);
    let scores = |r: &freshet_proto::gateway::v1::RankResponse| {
        let mut v: Vec<(u64, u32)> = r
            .items
            .iter()
            .map(|i| (i.item_id, i.score.to_bits()))
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(scores(&a), scores(&b), "bit-identical scores at one epoch");
    g2.stop().await;
    g1.stop().await;
    c.shutdown().await;
}
