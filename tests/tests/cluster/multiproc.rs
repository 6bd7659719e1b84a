//! Multi-process cluster on 127.0.0.1: kill -9 a shard leader under continuous pushes,
//! restart it from disk, replace a node whose disk was lost, and check that every
//! acknowledged push is present exactly once on every replica.

use std::time::{Duration, Instant};

use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_proto::admin::v1::{AddReplicaRequest, RemoveReplicaRequest, TransferLeaderRequest};
use freshet_proto::shard_for;
use freshet_tests::{
    replicas, test_table, wait_converged, Cluster, ProcCluster, Pushers, Reference,
};

const SHARDS: u32 = 4;

/// Retries a membership change while the shard still applies an earlier one (a new
/// leader may not have applied the previous change yet).
async fn retry_membership<T, F, Fut>(f: F) -> Result<T, freshet_client::ClientError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, freshet_client::ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Err(freshet_client::ClientError::Status(s))
                if s.code() == tonic::Code::FailedPrecondition && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_restart_and_replace_nodes_under_load_loses_nothing() {
    freshet_tests::init_tracing();
    let mut c = ProcCluster::start(3, SHARDS, vec![test_table("emb", 8)]);
    let addrs = c.live_addrs();
    let copts = ClientOptions {
        deadline: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let client = wait_ready(&addrs, &copts).await.expect("cluster ready");
    let pushers = Pushers::start(&addrs, 4, "emb", 8, 24).await;
    pushers.wait_more(100, Duration::from_secs(60)).await;

    // kill -9 the leader of shard 0.
    let status = client.cluster_status(false).await.unwrap();
    let victim = status.shards[0].leader_id;
    c.crash(victim).await;
    let killed_at = Instant::now();
    // A fresh client (no cached leader) pushing to shard 0 measures the failover.
    let probe = freshet_client::PsClient::connect(&c.live_addrs(), copts.clone())
        .await
        .unwrap();
    let id = (0..).find(|id| shard_for(*id, SHARDS) == 0).unwrap();
    let part = probe.prepare_push("emb", &[id], &[0.0; 8]).unwrap();
    loop {
        match probe.send_push(&part[0]).await {
            Ok(_) => break,
            Err(e) => assert!(
                killed_at.elapsed() < Duration::from_secs(20),
                "no leader for shard 0 after kill: {e}"
            ),
        }
    }
    let failover = killed_at.elapsed();
    // Election timeout is 10 ticks of 20 ms (randomised up to 2x): a couple of them plus
    // client backoff; generous for a loaded CI machine.
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    eprintln!("shard 0 accepted pushes again {failover:?} after kill -9 of its leader");
    pushers.wait_more(100, Duration::from_secs(60)).await;

    // Restart the killed node from its disk (same id, same data dir); it rejoins with its
    // log and catches up while pushes continue.
    c.restart(victim).await;
    pushers.wait_more(100, Duration::from_secs(60)).await;

    // Node 3 loses its disk: kill it, move every shard's leadership elsewhere, wipe it,
    // remove it from every shard and add a brand-new node 4 in its place (it catches up
    // by snapshot). A node other than the one restarted from disk, so both paths are
    // exercised.
    let replaced = if victim == 3 { 2 } else { 3 };
    // Every shard (and the meta group) has recorded, in replicated state, that the
    // doomed node acknowledged its log.
    let recorded_by = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.cluster_status(false).await.unwrap();
        let groups: Vec<_> = status.shards.iter().chain(status.meta.as_ref()).collect();
        if groups.len() == SHARDS as usize + 1
            && groups.iter().all(|s| s.acked_members.contains(&replaced))
        {
            break;
        }
        assert!(
            Instant::now() < recorded_by,
            "acknowledging members never recorded: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.crash(replaced).await;
    // Leaders elected after the crash, in every group the node was in (the meta group
    // too): their Raft progress has never seen the dead node acknowledge anything
    // (raft-rs resets it on election), so only the replicated record can recognise it.
    let before = client.cluster_status(false).await.unwrap();
    let moved_by = Instant::now() + Duration::from_secs(30);
    for s in before.shards.iter().chain(before.meta.as_ref()) {
        let old = s.leader_id;
        let to = s
            .voters
            .iter()
            .copied()
            .find(|v| *v != old && *v != replaced)
            .unwrap();
        loop {
            let _ = client
                .admin_on_leader(s.shard, |mut a| async move {
                    a.transfer_leader(TransferLeaderRequest {
                        shard: s.shard,
                        to_node: to,
                    })
                    .await
                })
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = client.cluster_status(false).await.unwrap();
            let sh = now
                .shards
                .iter()
                .chain(now.meta.as_ref())
                .find(|x| x.shard == s.shard)
                .unwrap();
            if sh.leader_id != old && sh.leader_id != 0 {
                assert!(
                    !sh.progress
                        .iter()
                        .any(|p| p.node_id == replaced && p.matched_index > 0),
                    "the new leader of shard {} has not heard from the dead node",
                    s.shard
                );
                break;
            }
            assert!(
                Instant::now() < moved_by,
                "shard {} kept leader {old}",
                s.shard
            );
        }
    }
    std::fs::remove_dir_all(&c.nodes[&replaced].data_dir).unwrap();
    // Restarted under its old id with an empty disk, the node must refuse to start
    // (without the record it rejoins: the new leaders send it commit 0 and a snapshot).
    c.restart(replaced).await;
    let exited = c.wait_exit(replaced, Duration::from_secs(20));
    assert_eq!(
        exited,
        Some(false),
        "a wiped node must not rejoin under its old id"
    );
    // Normally the start-up check refuses it; should its peers not answer in time,
    // raft-rs stops it at the first heartbeat its empty log cannot hold.
    let tail = c.log_tail(replaced);
    assert!(
        tail.contains("lost its disk") || tail.contains("out of range"),
        "{tail}"
    );
    eprintln!(
        "wiped node {replaced} refused: {}",
        if tail.contains("lost its disk") {
            "start-up check"
        } else {
            "raft-rs commit check"
        }
    );
    let replaced_addr = c.nodes[&replaced].addr.clone();
    c.remove(replaced);
    client.forget(&replaced_addr);
    for shard in 0..SHARDS {
        retry_membership(|| {
            client.admin_on_leader(shard, |mut a| async move {
                a.remove_replica(RemoveReplicaRequest {
                    shard,
                    node_id: replaced,
                })
                .await
            })
        })
        .await
        .unwrap_or_else(|e| panic!("remove replica of shard {shard}: {e}"));
    }
    let new_id = 4u64;
    let new_addr = c.add_joining(new_id);
    for shard in 0..SHARDS {
        let addr = new_addr.clone();
        retry_membership(|| {
            client.admin_on_leader(shard, |mut a| {
                let addr = addr.clone();
                async move {
                    a.add_replica(AddReplicaRequest {
                        shard,
                        node_id: new_id,
                        addr,
                    })
                    .await
                }
            })
        })
        .await
        .unwrap_or_else(|e| panic!("add replica of shard {shard}: {e}\n{}", c.log_tail(new_id)));
    }
    pushers.wait_more(100, Duration::from_secs(60)).await;

    let acked = pushers.stop().await;
    let live = c.live_addrs();
    let sums = wait_converged(&live, SHARDS, 3, Duration::from_secs(60)).await;
    let specs: Vec<_> = c.cluster.tables.iter().map(|t| t.to_spec()).collect();
    let mut reference = Reference::new(SHARDS, &specs);
    reference.replay(&acked);
    let mut probe_ack = freshet_tests::AckedPush {
        shard: part[0].shard,
        table: "emb".into(),
        client_id: part[0].request.client_id,
        seq: part[0].request.seq,
        ids: part[0].request.ids.clone(),
        grads: part[0].request.grads.clone(),
    };
    reference.replay(std::slice::from_mut(&mut probe_ack));
    assert_eq!(
        sums,
        reference.checksums(),
        "replicas differ from the reference replay"
    );

    // Node 4 holds every shard, received by snapshot (the logs were compacted long before).
    let reps = replicas(&live).await;
    for shard in 0..SHARDS {
        let r = &reps[&shard];
        assert!(
            r.contains_key(&new_id),
            "shard {shard} has no replica on node 4"
        );
        assert!(!r.contains_key(&replaced));
        assert!(r[&new_id].3 > 0, "shard {shard} on node 4 has no snapshot");
    }
    eprintln!(
        "{} pushes acknowledged, all present exactly once on every replica",
        acked.len()
    );
}

/// `--listen-fd` takes only an inherited listening socket: a standard stream, a closed
/// descriptor and a file are refused at start with the flag named.
#[test]
fn a_node_refuses_a_listen_fd_that_is_not_a_listening_socket() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = std::fs::File::create(dir.path().join("not-a-socket")).expect("file");
    let file_fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    for (fd, why) in [
        (1, "is a standard stream"),
        (9, "is not a listening socket"),
        (3, "is not a listening socket"),
    ] {
        let mut cmd = std::process::Command::new(freshet_tests::server_bin());
        cmd.arg("ps")
            .args(["--node-id", "1", "--data-dir"])
            .arg(dir.path().join("node"))
            .args(["--listen-fd", &fd.to_string()]);
        if fd == 3 {
            // SAFETY: dup2 only, in the forked child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(file_fd, 3) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let out = cmd.output().expect("run freshet-server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "fd {fd} was accepted: {stderr}");
        assert!(
            stderr.contains("--listen-fd") && stderr.contains(why),
            "fd {fd}: {stderr}"
        );
    }
}
