//! In-process clusters: real gRPC between nodes, faults injected in the peer transport.

use std::time::Duration;

use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_proto::ps::v1::{
    parameter_service_client::ParameterServiceClient, CreateTableRequest, PullRequest, PushRequest,
    ReadConsistency,
};
use freshet_proto::{metadata, shard_for};
use freshet_tests::{test_table, wait_converged, InProcCluster, Pushers, Reference};
use tonic::Code;

fn specs(c: &InProcCluster) -> Vec<freshet_proto::ps::v1::TableSpec> {
    c.cluster.tables.iter().map(|t| t.to_spec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_drop_and_delay_then_replicas_converge_to_the_reference() {
    let c = InProcCluster::start(3, 2, vec![test_table("emb", 8)]).await;
    let client = wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let pushers = Pushers::start(&c.addrs(), 3, "emb", 8, 16).await;
    pushers.wait_more(30, Duration::from_secs(30)).await;

    // Cut the leader of shard 0 off: the other two elect a leader and pushes go on.
    let status = client.cluster_status(false).await.unwrap();
    let leader = status.shards[0].leader_id;
    assert_ne!(leader, 0);
    c.isolate(leader);
    pushers.wait_more(30, Duration::from_secs(30)).await;
    let status = client.cluster_status(false).await.unwrap();
    assert_ne!(status.shards[0].leader_id, leader, "a new leader took over");

    // Heal, then a lossy, slow network: 20% of peer messages dropped, 5 ms added.
    c.heal();
    *c.faults.drop_rate.write() = 0.2;
    *c.faults.delay.write() = Duration::from_millis(5);
    pushers.wait_more(30, Duration::from_secs(30)).await;
    c.heal();

    let acked = pushers.stop().await;
    assert!(acked.len() >= 90);
    let sums = wait_converged(&c.addrs(), 2, 3, Duration::from_secs(30)).await;
    let mut reference = Reference::new(2, &specs(&c));
    reference.replay(&acked);
    assert_eq!(
        sums,
        reference.checksums(),
        "every acknowledged push applied exactly once"
    );
    assert!(c.faults.dropped.load(std::sync::atomic::Ordering::Relaxed) > 0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_invalid_argument_naming_the_field_and_changes_nothing() {
    let c = InProcCluster::start(3, 2, vec![test_table("emb", 4)]).await;
    let client = wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let status = client.cluster_status(false).await.unwrap();
    let leader = status.shards[0].leader_id;
    let mut ps = ParameterServiceClient::connect(format!("http://{}", c.addr(leader)))
        .await
        .unwrap();
    let id0 = (0..).find(|id| shard_for(*id, 2) == 0).unwrap();
    let id1 = (0..).find(|id| shard_for(*id, 2) == 1).unwrap();
    let good = PushRequest {
        shard: 0,
        table: "emb".into(),
        ids: vec![id0],
        grads: vec![0.5; 4],
        client_id: 77,
        seq: 1,
    };
    ps.push(good.clone()).await.unwrap();
    let before = wait_converged(&c.addrs(), 2, 3, Duration::from_secs(20)).await;

    let cases: Vec<(PushRequest, &str)> = vec![
        (
            PushRequest {
                shard: 9,
                ..good.clone()
            },
            "shard",
        ),
        (
            PushRequest {
                table: "nope".into(),
                ..good.clone()
            },
            "table",
        ),
        (
            PushRequest {
                grads: vec![0.5; 3],
                ..good.clone()
            },
            "grads",
        ),
        (
            PushRequest {
                grads: vec![0.5, f32::NAN, 0.5, 0.5],
                ..good.clone()
            },
            "grads[1]",
        ),
        (
            PushRequest {
                grads: vec![f32::INFINITY; 4],
                ..good.clone()
            },
            "grads[0]",
        ),
        (
            PushRequest {
                ids: vec![],
                grads: vec![],
                ..good.clone()
            },
            "ids",
        ),
        (
            PushRequest {
                ids: vec![id0; 20_000],
                grads: vec![0.1; 80_000],
                ..good.clone()
            },
            "ids",
        ),
        (
            PushRequest {
                ids: vec![id0, id1],
                grads: vec![0.1; 8],
                ..good.clone()
            },
            "ids[1]",
        ),
        (
            PushRequest {
                client_id: 0,
                ..good.clone()
            },
            "client_id",
        ),
        (
            PushRequest {
                seq: 0,
                ..good.clone()
            },
            "seq",
        ),
    ];
    for (req, field) in cases {
        let err = ps.push(req.clone()).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = ps
        .pull(PullRequest {
            shard: 0,
            table: "emb".into(),
            ids: vec![id1],
            consistency: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("ids[0]"));
    let err = ps
        .pull(PullRequest {
            shard: 0,
            table: "emb".into(),
            ids: vec![id0],
            consistency: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("consistency"));

    // Table specs: a bad one names the field; a different one for an existing name clashes.
    let mut bad = test_table("x", 0).to_spec();
    let err = ps
        .create_table(CreateTableRequest {
            spec: Some(bad.clone()),
            shards: vec![],
            update_optimizer: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("spec.dim"), "{}", err.message());
    bad = test_table("emb", 5).to_spec();
    let err = ps
        .create_table(CreateTableRequest {
            spec: Some(bad.clone()),
            shards: vec![],
            update_optimizer: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // Updating a table's optimizer cannot change its layout.
    let err = ps
        .create_table(CreateTableRequest {
            spec: Some(bad),
            shards: vec![],
            update_optimizer: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("spec.dim"), "{}", err.message());

    // A retried push (same client, seq) is acknowledged as a duplicate and changes nothing.
    let dup = ps.push(good).await.unwrap().into_inner();
    assert!(dup.duplicate);
    let after = wait_converged(&c.addrs(), 2, 3, Duration::from_secs(20)).await;
    assert_eq!(before, after);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_redirect_writes_and_serve_local_reads_with_staleness() {
    let c = InProcCluster::start(3, 1, vec![test_table("emb", 2)]).await;
    let client = wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let status = client.cluster_status(false).await.unwrap();
    let leader = status.shards[0].leader_id;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let mut f = ParameterServiceClient::connect(format!("http://{}", c.addr(follower)))
        .await
        .unwrap();
    let req = PushRequest {
        shard: 0,
        table: "emb".into(),
        ids: vec![5],
        grads: vec![1.0, -1.0],
        client_id: 3,
        seq: 1,
    };
    let err = f.push(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let hint = err
        .metadata()
        .get(metadata::LEADER_ADDR)
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(hint, c.addr(leader));

    // The SDK follows the hint; a linearizable read then sees the write.
    let (_, before) = client
        .pull("emb", &[5], ReadConsistency::Linearizable)
        .await
        .unwrap();
    client.push("emb", &[5], &[1.0, -1.0]).await.unwrap();
    let (dim, after) = client
        .pull("emb", &[5], ReadConsistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(dim, 2);
    assert!(
        after[0] < before[0] && after[1] > before[1],
        "{before:?} -> {after:?}"
    );
    // A read larger than one call may carry (40,000 ids on one shard, over the 16,384 a
    // call takes) is split by the SDK and answered whole, in request order.
    let many: Vec<u64> = (0..40_000u64).rev().collect();
    let (_, values) = client
        .pull("emb", &many, ReadConsistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(values.len(), many.len() * 2);
    let at = many.iter().position(|id| *id == 5).unwrap();
    assert_eq!(&values[at * 2..at * 2 + 2], &after[..]);

    // A linearizable read on a follower is redirected; a local one is served with staleness.
    let read_5 = |consistency: ReadConsistency| PullRequest {
        shard: 0,
        table: "emb".into(),
        ids: vec![5],
        consistency: consistency as i32,
        ..Default::default()
    };
    let err = f
        .pull(read_5(ReadConsistency::Linearizable))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // The follower serves the write once it applied it (bounded wait, no fixed sleep).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let local = loop {
        let local = f
            .pull(read_5(ReadConsistency::Local))
            .await
            .unwrap()
            .into_inner();
        if local.values == after {
            break local;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the follower never applied the write: {:?}",
            local.values
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        local.staleness_ms < 1_000,
        "staleness {}",
        local.staleness_ms
    );
    assert_eq!(local.leader_id, leader);
    assert_eq!(local.values, after);
    // Read your own writes: a pull naming an epoch this replica has not sealed waits
    // (bounded) and then says so, naming the field; one it holds answers at once.
    // The caller allows 30 s: UNAVAILABLE (not DEADLINE_EXCEEDED) shows the replica
    // bounded its own wait.
    let mut req = tonic::Request::new(PullRequest {
        min_epoch: local.epoch + 1_000,
        ..read_5(ReadConsistency::Local)
    });
    req.set_timeout(Duration::from_secs(30));
    let err = f.pull(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("min_epoch:"), "{}", err.message());
    let held = f
        .pull(PullRequest {
            min_epoch: local.epoch,
            ..read_5(ReadConsistency::Local)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.values, after);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let c = InProcCluster::start(1, 1, vec![test_table("emb", 2)]).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.addr(1)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(ch.clone());
    let r = h
        .check(HealthCheckRequest {
            service: "freshet.ps.v1.ParameterService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1alpha::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "freshet.ps.v1.ParameterService",
        "freshet.admin.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_recovers_every_acknowledged_push_from_disk() {
    let mut c = InProcCluster::start(3, 2, vec![test_table("emb", 4)]).await;
    wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let pushers = Pushers::start(&c.addrs(), 2, "emb", 4, 16).await;
    // Enough pushes that every shard has snapshotted and compacted (interval 200).
    pushers.wait_more(300, Duration::from_secs(60)).await;
    let acked = pushers.stop().await;
    let before = wait_converged(&c.addrs(), 2, 3, Duration::from_secs(30)).await;
    for id in 1..=3 {
        c.stop_node(id).await;
    }
    for id in 1..=3 {
        c.start_node(id).await;
    }
    let client = wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let after = wait_converged(&c.addrs(), 2, 3, Duration::from_secs(30)).await;
    assert_eq!(before, after, "state after restart differs");
    let mut reference = Reference::new(2, &specs(&c));
    reference.replay(&acked);
    assert_eq!(after, reference.checksums());
    // And the cluster still takes writes.
    client.push("emb", &[1, 2, 3], &[0.1; 12]).await.unwrap();
    c.shutdown().await;
}
