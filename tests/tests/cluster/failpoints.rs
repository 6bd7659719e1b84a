//! The design's fault points, hit on purpose (freshet_server::failpoints): a node dies
//! between a shard's acknowledgement of a step and the seal that commits it; a shard
//! leader dies between a committed meta seal and the shard seal that applies it; a
//! follower restored from its snapshot is promoted before the shard seal. Every time each
//! acknowledged step is sealed exactly once: every replica ends equal to the reference
//! replay of the steps within the committed cuts. And a raft group's task that dies
//! takes its node down instead of leaving a live-looking process with a dead replica.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freshet_client::steps::StepSession;
use freshet_client::{wait_ready, ClientOptions, PsClient};
use freshet_server::failpoints::{
    self, BEFORE_SEAL, BEFORE_SHARD_SEAL, GROUP_TASK, SNAPSHOT_WRITE,
};
use freshet_tests::{sealed_reference, test_table, wait_converged, Cluster, InProcCluster};

use super::epochs::{dense_table, run_worker, wait_sealed, DIM, SHARDS};

/// Steps each test pushes while its fault point holds.
const STEPS: u64 = 6;

async fn start() -> (InProcCluster, Arc<PsClient>) {
    let c = InProcCluster::start(
        3,
        SHARDS,
        vec![test_table("emb", DIM as u32), dense_table("w", 3)],
    )
    .await;
    failpoints::enable(c.dir.path());
    let opts = ClientOptions {
        deadline: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let client = wait_ready(&c.addrs(), &opts).await.unwrap();
    (c, client)
}

type StepLog = Arc<Mutex<Vec<freshet_proto::ps::v1::PushStepRequest>>>;

/// A registered worker session that heartbeats until the returned sender fires, and the
/// log of every step part it will send.
async fn worker(
    client: &Arc<PsClient>,
    name: &str,
) -> (Arc<StepSession>, StepLog, tokio::sync::watch::Sender<bool>) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let session = StepSession::register(Arc::clone(client), name)
        .await
        .unwrap();
    tokio::spawn(Arc::clone(&session).heartbeat(Duration::from_millis(20), stop_rx));
    (session, Arc::new(Mutex::new(Vec::new())), stop_tx)
}

/// Pushes `steps` steps touching every shard, each retried until acknowledged.
async fn push_steps(session: &Arc<StepSession>, client: &Arc<PsClient>, steps: u64, log: &StepLog) {
    let never = tokio::sync::watch::channel(false).1;
    run_worker(
        Arc::clone(session),
        Arc::clone(client),
        steps,
        Arc::clone(log),
        never,
    )
    .await;
}

/// Waits until every replica of every data shard has sealed the meta group's last epoch,
/// then checks the replicas against the reference replay.
async fn check_sealed_once(c: &InProcCluster, client: &PsClient, log: &StepLog) {
    let seals = client.list_seals(0, 0).await.unwrap();
    let last = seals.last_sealed_epoch;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.cluster_status(false).await.unwrap();
        if status
            .shards
            .iter()
            .all(|s| s.replicas.len() == 3 && s.replicas.iter().all(|r| r.sealed_epoch >= last))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shards did not seal epoch {last}: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seals = client.list_seals(0, 0).await.unwrap();
    let sums = wait_converged(&c.addrs(), SHARDS, 3, Duration::from_secs(30)).await;
    let specs: Vec<_> = c.cluster.tables.iter().map(|t| t.to_spec()).collect();
    let logged = log.lock().unwrap().clone();
    assert_eq!(
        sums,
        sealed_reference(SHARDS, &specs, &logged, &seals.seals),
        "replicas equal the replay of the steps within the committed cuts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steps_acknowledged_before_their_seal_survive_the_coordinators_death() {
    let scenario = fail::FailScenario::setup();
    let (mut c, client) = start().await;
    let (session, log, stop_tx) = worker(&client, "fp-seal").await;

    // Every shard acknowledges the steps; the coordinator proposes no seal.
    fail::cfg(BEFORE_SEAL, "return").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // a seal in flight lands
    let sealed_before = client.list_seals(0, 0).await.unwrap().last_sealed_epoch;
    push_steps(&session, &client, STEPS, &log).await;
    assert_eq!(session.frontier(), STEPS, "every step acknowledged");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        client.list_seals(0, 0).await.unwrap().last_sealed_epoch,
        sealed_before,
        "the failpoint held every seal"
    );
    assert!(session.sealed_cut() < STEPS);

    // The coordinator's node dies before sealing them; a new one takes over.
    let status = client.cluster_status(false).await.unwrap();
    let meta_leader = status.meta.as_ref().unwrap().leader_id;
    assert_ne!(meta_leader, 0);
    c.crash(meta_leader).await;
    fail::remove(BEFORE_SEAL);
    wait_sealed(&session, Duration::from_secs(30)).await;
    assert_eq!(session.sealed_cut(), STEPS);
    c.restart(meta_leader).await;

    check_sealed_once(&c, &client, &log).await;
    let _ = stop_tx.send(true);
    failpoints::disable(c.dir.path());
    scenario.teardown();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_leader_dying_between_the_meta_seal_and_its_shard_seal_loses_nothing() {
    let scenario = fail::FailScenario::setup();
    let (mut c, client) = start().await;
    let (session, log, stop_tx) = worker(&client, "fp-shard-seal").await;

    // The meta group seals the steps; no shard leader copies the seals into its shard.
    fail::cfg(BEFORE_SHARD_SEAL, "return").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // a shard seal in flight lands
    let status = client.cluster_status(false).await.unwrap();
    let shard_sealed: Vec<u64> = status
        .shards
        .iter()
        .flat_map(|s| s.replicas.iter().map(|r| r.sealed_epoch))
        .collect();
    push_steps(&session, &client, STEPS, &log).await;
    wait_sealed(&session, Duration::from_secs(30)).await;
    let meta_last = client.list_seals(0, 0).await.unwrap().last_sealed_epoch;
    let status = client.cluster_status(false).await.unwrap();
    let now_sealed: Vec<u64> = status
        .shards
        .iter()
        .flat_map(|s| s.replicas.iter().map(|r| r.sealed_epoch))
        .collect();
    assert_eq!(
        now_sealed, shard_sealed,
        "the failpoint held every shard seal"
    );
    assert!(now_sealed.iter().all(|e| *e < meta_last));

    // The leader of shard 0 dies with the seals committed in the meta log only.
    let leader = status
        .shards
        .iter()
        .find(|s| s.shard == 0)
        .map(|s| s.leader_id)
        .unwrap();
    assert_ne!(leader, 0);
    c.crash(leader).await;
    fail::remove(BEFORE_SHARD_SEAL);
    c.restart(leader).await;

    check_sealed_once(&c, &client, &log).await;
    let _ = stop_tx.send(true);
    failpoints::disable(c.dir.path());
    scenario.teardown();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_restored_from_its_snapshot_and_promoted_before_the_seal_has_the_steps() {
    let scenario = fail::FailScenario::setup();
    let (mut c, client) = start().await;
    let (session, log, stop_tx) = worker(&client, "fp-snapshot").await;

    // Shard seals held: every step stays buffered on the shards. More steps than the
    // snapshot interval (200 entries in tests), so every replica snapshots its buffered
    // steps.
    fail::cfg(BEFORE_SHARD_SEAL, "return").unwrap();
    push_steps(&session, &client, 250, &log).await;
    wait_sealed(&session, Duration::from_secs(30)).await;
    let meta_last = client.list_seals(0, 0).await.unwrap().last_sealed_epoch;
    let status = client.cluster_status(false).await.unwrap();
    let shard0 = status.shards.iter().find(|s| s.shard == 0).unwrap();
    let follower = shard0
        .replicas
        .iter()
        .find(|r| r.node_id != shard0.leader_id)
        .unwrap();
    assert!(
        follower.snapshot_index > 0,
        "the follower snapshotted its buffered steps: {follower:?}"
    );
    assert!(
        follower.sealed_epoch < meta_last,
        "the shard seals were held: {follower:?}"
    );
    let follower = follower.node_id;

    // The follower restarts from its snapshot (and the log after it), then leads the
    // shard before any shard seal: the buffered steps must come with it.
    c.crash(follower).await;
    c.restart(follower).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = client
            .admin_on_leader(0, |mut a| async move {
                a.transfer_leader(freshet_proto::admin::v1::TransferLeaderRequest {
                    shard: 0,
                    to_node: follower,
                })
                .await
            })
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = client.cluster_status(false).await.unwrap();
        if status
            .shards
            .iter()
            .any(|s| s.shard == 0 && s.leader_id == follower)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {follower} never led shard 0"
        );
    }
    fail::remove(BEFORE_SHARD_SEAL);

    check_sealed_once(&c, &client, &log).await;
    let _ = stop_tx.send(true);
    failpoints::disable(c.dir.path());
    scenario.teardown();
    c.shutdown().await;
}

/// A raft group's task that dies (a panic, as one inside raft-rs would be) takes its node
/// down: the node's run ends with the reason (NOT_SERVING first) instead of staying up
/// with a dead replica that status would show as a follower. The other nodes keep every
/// shard serving, and the node restarted from its data dir rejoins and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_group_task_takes_its_node_down() {
    let scenario = fail::FailScenario::setup();
    let (mut c, client) = start().await;
    assert!(c.exited().is_empty());
    fail::cfg(GROUP_TASK, "1*panic").unwrap();
    let armed = Instant::now();
    let deadline = armed + Duration::from_secs(20);
    let dead = loop {
        if let Some(id) = c.exited().first() {
            break *id;
        }
        assert!(
            Instant::now() < deadline,
            "no node stopped after one of its group tasks died"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    fail::remove(GROUP_TASK);
    assert_eq!(
        c.exited(),
        vec![dead],
        "only the node whose group died stops"
    );
    // Its address serves nothing any more (the supervisor sees the process gone).
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        freshet_runtime::grpc::endpoint(&c.addr(dead))
            .unwrap()
            .connect_lazy(),
    );
    assert!(health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_err());
    // The other two keep every shard writable and sealing.
    let (session, log, stop_tx) = worker(&client, "fp-group").await;
    push_steps(&session, &client, STEPS, &log).await;
    wait_sealed(&session, Duration::from_secs(30)).await;
    c.restart(dead).await;
    check_sealed_once(&c, &client, &log).await;
    let _ = stop_tx.send(true);
    c.shutdown().await;
    scenario.teardown();
}

/// A snapshot write that fails (a full disk, say) does not stop the group from
/// snapshotting: the write is tried again a second later and, once it succeeds, every
/// replica has a snapshot. (One failed write used to leave the group's snapshot "in
/// flight" for good: no snapshot again, and a log that only grew.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_snapshot_write_is_tried_again() {
    let scenario = fail::FailScenario::setup();
    let (c, client) = start().await;
    let (session, log, stop_tx) = worker(&client, "fp-snapshot-write").await;
    let data_shards = |s: &&freshet_proto::admin::v1::ShardStatus| s.shard < SHARDS;

    // Every snapshot write fails while more steps than the snapshot interval (200
    // entries in tests) go through: no replica gets a snapshot.
    fail::cfg(SNAPSHOT_WRITE, "return").unwrap();
    push_steps(&session, &client, 250, &log).await;
    wait_sealed(&session, Duration::from_secs(30)).await;
    let status = client.cluster_status(false).await.unwrap();
    for s in status.shards.iter().filter(data_shards) {
        for r in &s.replicas {
            // A snapshot was due (past the 200-entry interval), and none was written.
            assert!(r.applied_index > 200, "shard {}: {r:?}", s.shard);
            assert_eq!(
                r.snapshot_index, 0,
                "shard {}: no snapshot while writes fail: {r:?}",
                s.shard
            );
        }
    }

    // The disk is back: every replica of every data shard writes one.
    fail::remove(SNAPSHOT_WRITE);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.cluster_status(false).await.unwrap();
        if status
            .shards
            .iter()
            .filter(data_shards)
            .all(|s| s.replicas.len() == 3 && s.replicas.iter().all(|r| r.snapshot_index > 0))
        {
            break;
        }
        let indexes: Vec<(u32, Vec<u64>)> = status
            .shards
            .iter()
            .map(|s| {
                (
                    s.shard,
                    s.replicas.iter().map(|r| r.snapshot_index).collect(),
                )
            })
            .collect();
        assert!(
            Instant::now() < deadline,
            "snapshots never resumed after the failed writes (shard, snapshot indexes): {indexes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_sealed_once(&c, &client, &log).await;
    let _ = stop_tx.send(true);
    failpoints::disable(c.dir.path());
    scenario.teardown();
    c.shutdown().await;
}
