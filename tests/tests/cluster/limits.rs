//! Issue 17 on a running cluster: row limits remove the same rows on every replica, in
//! one epoch, and the gateway serves them as initial values from that epoch on;
//! admission makes rows only of ids seen often enough, the same on every replica.

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_client::steps::{SparseStep, StepSession};
use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_proto::gateway::v1::LookupRequest;
use freshet_proto::ps::v1::ReadConsistency;
use freshet_server::config::TableConfig;
use freshet_tests::{model_tables, wait_converged, InProcCluster, InProcGateway};

const SHARDS: u32 = 2;
const DIM: usize = 4;
const ROWS_MAX: u64 = 16;

fn table(limits: serde_json::Value) -> TableConfig {
    serde_json::from_value(serde_json::json!({
        "name": "emb", "dim": DIM, "optimizer": {"type": "sgd", "lr": 0.5},
        "init_scale": 0.05, "seed": 42, "limits": limits
    }))
    .expect("valid table")
}

fn limited_table() -> TableConfig {
    table(serde_json::json!({"rows_max": ROWS_MAX}))
}

fn init(id: u64) -> Vec<f32> {
    (0..DIM as u64)
        .map(|j| freshet_proto::init_value(42, freshet_proto::fnv1a64("emb"), id, j, 0.05))
        .collect()
}

/// A 3-node cluster with the model's tables and `emb`, a gateway, and a registered step
/// session kept alive by heartbeats until `stop_tx` says stop.
struct Setup {
    c: InProcCluster,
    client: Arc<freshet_client::PsClient>,
    g: InProcGateway,
    gw: freshet_proto::gateway::v1::gateway_client::GatewayClient<tonic::transport::Channel>,
    session: Arc<StepSession>,
    stop_tx: tokio::sync::watch::Sender<bool>,
}

async fn setup(emb: TableConfig) -> Setup {
    let mut tables = model_tables(8);
    tables.push(emb);
    let c = InProcCluster::start(3, SHARDS, tables).await;
    let client = wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let g = InProcGateway::start(&c.addrs()).await;
    let gw = g.client().await;
    let session = StepSession::register(Arc::clone(&client), "limits")
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(Arc::clone(&session).heartbeat(Duration::from_millis(20), stop_rx));
    Setup {
        c,
        client,
        g,
        gw,
        session,
        stop_tx,
    }
}

/// Polls the gateway's Lookup of `ids` in `emb` (at most 20 s) until `done` holds of
/// an answer; returns its values.
async fn served_when(
    gw: &mut freshet_proto::gateway::v1::gateway_client::GatewayClient<tonic::transport::Channel>,
    ids: &[u64],
    what: &str,
    done: impl Fn(&freshet_proto::gateway::v1::LookupResponse) -> bool,
) -> Vec<f32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = gw
            .lookup(LookupRequest {
                table: "emb".into(),
                ids: ids.to_vec(),
            })
            .await
            .map(|r| r.into_inner());
        match r {
            Ok(r) if done(&r) => return r.values,
            r => assert!(
                Instant::now() < deadline,
                "the gateway never served {what}: {r:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rows of `emb` as the gateway serves them once it serves `epoch`.
async fn served_at(
    gw: &mut freshet_proto::gateway::v1::gateway_client::GatewayClient<tonic::transport::Channel>,
    ids: &[u64],
    epoch: u64,
) -> Vec<f32> {
    served_when(gw, ids, &format!("epoch {epoch}"), |r| r.epoch >= epoch).await
}

/// Pushes one step of gradient 1.0 on every id of `ids` to `emb` and waits for its seal.
async fn step(session: &Arc<StepSession>, ids: Vec<u64>) {
    let step = session.next_step();
    let sparse = vec![SparseStep {
        table: "emb".into(),
        grads: vec![1.0; ids.len() * DIM],
        ids,
    }];
    session.push(step, &sparse, &[]).await.unwrap();
    let sealed = session.wait_sealed(step, Duration::from_secs(20)).await;
    assert!(sealed.is_some(), "step {step} sealed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evicted_rows_leave_every_replica_and_the_gateway_in_one_epoch() {
    let Setup {
        c,
        client,
        g,
        mut gw,
        session,
        stop_tx,
    } = setup(limited_table()).await;
    // Three steps of 60 new ids each (~30 per shard, over the cap of 16 every time).
    let batch = |k: u64| -> Vec<u64> { (k * 1000..k * 1000 + 60).collect() };
    for k in 1..=3 {
        step(&session, batch(k)).await;
    }
    let epoch = session.sealed_epoch();
    // Every replica holds the same state (row removals included).
    wait_converged(&c.addrs(), SHARDS, 3, Duration::from_secs(20)).await;
    // The first batch was evicted everywhere: the PS and the gateway answer initial
    // values; the newest rows of the last batch are trained (init − 0.5).
    let old = batch(1);
    let (_, values) = client
        .pull("emb", &old, ReadConsistency::Linearizable)
        .await
        .unwrap();
    let want: Vec<f32> = old.iter().flat_map(|id| init(*id)).collect();
    assert_eq!(
        values, want,
        "evicted rows read as their initial value on the PS"
    );
    let looked = served_at(&mut gw, &old, epoch).await;
    assert_eq!(looked, want, "the gateway drops evicted rows too");
    let newest = 3 * 1000 + 59;
    let (_, v) = client
        .pull("emb", &[newest], ReadConsistency::Linearizable)
        .await
        .unwrap();
    let trained: Vec<f32> = init(newest).iter().map(|x| x - 0.5).collect();
    assert_eq!(v, trained, "the newest rows stay, trained once");
    // Status shows it per replica: at most the cap held, the rest evicted.
    for addr in c.addrs() {
        let st = freshet_tests::node_status(&addr, false).await.unwrap();
        for sh in st.shards.iter().filter(|s| s.shard < SHARDS) {
            let r = &sh.replicas[0];
            let emb = r.tables.iter().find(|t| t.table == "emb").unwrap();
            assert!(emb.rows <= ROWS_MAX && emb.rows > 0, "{emb:?}");
            assert!(emb.evicted > 0 && emb.expired == 0, "{emb:?}");
            assert_eq!(emb.bytes, emb.rows * (DIM as u64 * 4 + 16), "{emb:?}");
        }
    }
    let _ = stop_tx.send(true);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_makes_rows_only_of_ids_seen_often_enough_on_every_replica() {
    let Setup {
        c,
        client,
        g,
        mut gw,
        session,
        stop_tx,
    } = setup(table(
        serde_json::json!({"admit_after": 2, "admit_window_ms": 3_600_000}),
    ))
    .await;
    // Rare ids once, frequent ids twice (admitted at their second gradient).
    let rare: Vec<u64> = (1000..1040).collect();
    let frequent: Vec<u64> = (2000..2040).collect();
    step(&session, rare.iter().chain(&frequent).copied().collect()).await;
    step(&session, frequent.clone()).await;
    let epoch = session.sealed_epoch();
    wait_converged(&c.addrs(), SHARDS, 3, Duration::from_secs(20)).await;
    // Rare ids have no row: initial values on the PS and on the gateway.
    let want: Vec<f32> = rare.iter().flat_map(|id| init(*id)).collect();
    let (_, values) = client
        .pull("emb", &rare, ReadConsistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(values, want, "ids seen once read as initial on the PS");
    assert_eq!(
        served_at(&mut gw, &rare, epoch).await,
        want,
        "and on the gateway"
    );
    // Frequent ids are rows trained by their second gradient only (the first dropped).
    let trained: Vec<f32> = frequent
        .iter()
        .flat_map(|id| init(*id).into_iter().map(|x| x - 0.5))
        .collect();
    let (_, values) = client
        .pull("emb", &frequent, ReadConsistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(values, trained, "admitted at the second sighting");
    assert_eq!(served_at(&mut gw, &frequent, epoch).await, trained);
    // Status per replica: the frequent ids held, every first sighting dropped.
    let mut held = 0;
    for addr in c.addrs() {
        let st = freshet_tests::node_status(&addr, false).await.unwrap();
        for sh in st.shards.iter().filter(|s| s.shard < SHARDS) {
            let emb = sh.replicas[0]
                .tables
                .iter()
                .find(|t| t.table == "emb")
                .unwrap();
            assert_eq!(emb.rows, emb.admitted, "{emb:?}");
            let on = |ids: &[u64]| {
                ids.iter()
                    .filter(|id| freshet_proto::shard_for(**id, SHARDS) == sh.shard)
                    .count() as u64
            };
            assert_eq!(emb.rows, on(&frequent), "{emb:?}");
            assert_eq!(emb.dropped, on(&rare) + on(&frequent), "{emb:?}");
            held += emb.rows;
        }
    }
    assert_eq!(held, 3 * 40, "40 admitted rows on each of 3 replicas");
    let _ = stop_tx.send(true);
    g.stop().await;
}

/// Every replica's (rows, expired) of `emb`.
async fn emb_rows(c: &InProcCluster) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for addr in c.addrs() {
        let st = freshet_tests::node_status(&addr, false).await.unwrap();
        for sh in st.shards.iter().filter(|s| s.shard < SHARDS) {
            let emb = sh.replicas[0]
                .tables
                .iter()
                .find(|t| t.table == "emb")
                .unwrap();
            out.push((emb.rows, emb.expired));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_cluster_seals_by_itself_so_direct_pushes_publish_and_rows_expire() {
    // No worker, no seal request: only direct pushes, and the coordinator's idle seals.
    let mut tables = model_tables(8);
    tables.push(table(serde_json::json!({"ttl_ms": 1_000})));
    let c = InProcCluster::start_with(3, SHARDS, tables, |cfg| cfg.idle_seal_ms = 200).await;
    let client = wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let g = InProcGateway::start(&c.addrs()).await;
    let mut gw = g.client().await;
    let ids: Vec<u64> = (5000..5040).collect();
    client
        .push("emb", &ids, &vec![1.0; ids.len() * DIM])
        .await
        .unwrap();
    // The gateway serves the pushed rows once a seal publishes them.
    let trained: Vec<f32> = ids
        .iter()
        .flat_map(|id| init(*id).into_iter().map(|x| x - 0.5))
        .collect();
    served_when(&mut gw, &ids, "the direct push", |r| r.values == trained).await;
    // Every replica holds them (a follower may apply the push a moment later).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = emb_rows(&c).await;
        if rows.iter().map(|r| r.0).sum::<u64>() == 3 * 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "40 rows on each of 3 replicas: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second of sealed time later (and a sweep), every replica has removed them.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = emb_rows(&c).await;
        if rows.iter().all(|&(n, expired)| n == 0 && expired > 0) {
            assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), 3 * 40, "{rows:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rows never expired on every replica: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_converged(&c.addrs(), SHARDS, 3, Duration::from_secs(20)).await;
    // And the gateway drops them too: initial values.
    let want: Vec<f32> = ids.iter().flat_map(|id| init(*id)).collect();
    served_when(&mut gw, &ids, "initial values after expiry", |r| {
        r.values == want
    })
    .await;
    g.stop().await;
}
