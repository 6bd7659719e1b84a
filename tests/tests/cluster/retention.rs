//! Impression retention changed on a running cluster (issue 15): one call, an epoch of
//! its own; from it every replica of every data shard keeps impressions by the new ttl
//! and byte bound (a shorter ttl expires older impressions at the next seals, Feedback
//! on one is NOT_FOUND from any gateway); bad values are INVALID_ARGUMENT naming the
//! field and change nothing.

use std::time::{Duration, Instant};

use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_proto::gateway::v1::{RankRequest, UserContext};
use freshet_proto::ps::v1::ImpressionRetention;
use freshet_tests::{click, model_tables, plain_items, InProcGateway};
use tonic::Code;

const SHARDS: u32 = 2;
const DIM: usize = 8;

/// (ttl_ms, bytes_max, impressions held) of every data replica.
async fn retention_everywhere(client: &freshet_client::PsClient) -> Vec<(u64, u64, u64)> {
    let status = client.cluster_status(false).await.unwrap();
    status
        .shards
        .iter()
        .filter(|s| s.shard != freshet_proto::META_GROUP)
        .flat_map(|s| &s.replicas)
        .map(|r| (r.impression_ttl_ms, r.impression_bytes_max, r.impressions))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn impression_retention_changes_on_a_running_cluster() {
    let (c, g) = InProcGateway::with_cluster(3, SHARDS, model_tables(DIM)).await;
    let client = wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let mut gw = g.client().await;
    let upsert = plain_items(1..=3);
    gw.upsert_items(upsert.clone()).await.unwrap();
    let rank = RankRequest {
        user: Some(UserContext {
            user_id: "u".into(),
            ..Default::default()
        }),
        candidates: vec![1, 2, 3],
        k: 2,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let served = loop {
        match gw.rank(rank.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(e) => assert!(Instant::now() < deadline, "never ranked: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Held on every replica of its shard, under the bootstrap retention (15 min).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = retention_everywhere(&client).await;
        assert!(r.iter().all(|&(ttl, _, _)| ttl == 15 * 60 * 1000), "{r:?}");
        if r.iter().map(|&(_, _, n)| n).sum::<u64>() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "impression never durable: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Bad values: the field is named and nothing changes.
    for (ttl_ms, bytes_max_per_shard, field) in [
        (10, 1 << 20, "retention.ttl_ms"),
        (60_000, 1000, "retention.bytes_max_per_shard"),
    ] {
        let e = client
            .set_impression_retention(ImpressionRetention {
                ttl_ms,
                bytes_max_per_shard,
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{e}");
    }
    let r = retention_everywhere(&client).await;
    assert!(r.iter().all(|&(ttl, _, _)| ttl == 15 * 60 * 1000), "{r:?}");

    // A 1 s ttl and a 2 MiB bound: every replica takes them in the change's epoch, and
    // the impression (older than 1 s of sealed time at a later seal) goes.
    let changed = client
        .set_impression_retention(ImpressionRetention {
            ttl_ms: 1_000,
            bytes_max_per_shard: 2 << 20,
        })
        .await
        .unwrap();
    assert!(changed.epoch > served.epoch, "{changed:?} {}", served.epoch);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Expiry needs seals and this cluster runs no worker: an upsert asks for one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        gw.upsert_items(upsert.clone()).await.unwrap();
        let r = retention_everywhere(&client).await;
        if r.iter()
            .all(|&(ttl, b, n)| ttl == 1_000 && b == 2 << 20 && n == 0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "retention not applied: {r:?}");
    }
    // Feedback on it from a gateway that never saw it (no cache): NOT_FOUND.
    let other = InProcGateway::start(&c.addrs()).await;
    let mut gw2 = other.client().await;
    let e = gw2
        .feedback(click(
            &served.impression_id,
            served.items[0].item_id,
            1,
            "e1",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    other.stop().await;
    g.stop().await;
}
