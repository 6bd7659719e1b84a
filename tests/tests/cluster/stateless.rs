//! Gateways hold no state a restart loses: impressions and the step claims of feedback
//! events live on the shards. Rank on one gateway, Feedback on another: accepted and
//! trained once; a retry on either gateway, and the same event sent to both at once,
//! train nothing more (the shard holds exactly one claim per event, the acknowledged
//! step); a gateway stopped gracefully leaves every impression it served joinable; a
//! worker frozen past the gateway's Train timeout trains nothing twice; a rolling restart
//! of every gateway under load loses no event; Feedback sent right after Rank to the
//! gateway that ranked waits for that gateway's own writer instead of reading the shard.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use freshet_client::{wait_ready, ClientOptions, PsClient};
use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, FeedbackEvent, FeedbackRequest, FeedbackResponse, RankRequest,
    RankResponse, Reward, RewardKind, StatusRequest, UpsertItemsRequest, UserContext,
};
use freshet_proto::ps::v1::{Cut, Item};
use freshet_tests::{model_tables, Cluster, InProcCluster, InProcGateway, ProcGateway, ProcWorker};
use tonic::transport::Channel;
use tonic::Code;

const SHARDS: u32 = 3;

fn rank_request(user: u64) -> RankRequest {
    RankRequest {
        user: Some(UserContext {
            categorical: [("segment".to_string(), format!("s{}", user % 3))].into(),
            numeric: vec![],
            user_id: format!("u{user}"),
            query: String::new(),
        }),
        candidates: (1..=12).collect(),
        k: 3,
        ..Default::default()
    }
}

fn click(event_id: &str, r: &RankResponse, slot: usize) -> FeedbackEvent {
    FeedbackEvent {
        event_id: event_id.into(),
        impression_id: r.impression_id.clone(),
        item_id: r.items[slot].item_id,
        position: r.items[slot].position,
        rewards: vec![Reward {
            kind: RewardKind::Click as i32,
            weight: 0.0,
        }],
        event_time_ms: 0,
    }
}

async fn rank(gw: &mut GatewayClient<Channel>, user: u64) -> RankResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match gw.rank(rank_request(user)).await {
            Ok(r) => return r.into_inner(),
            Err(s) => {
                assert!(Instant::now() < deadline, "rank: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn feedback(
    gw: &mut GatewayClient<Channel>,
    events: Vec<FeedbackEvent>,
) -> Result<FeedbackResponse, tonic::Status> {
    gw.feedback(FeedbackRequest { events })
        .await
        .map(tonic::Response::into_inner)
}

/// The claims the impression's shard holds for `event_id`: (inc, step) each.
async fn claims(client: &PsClient, impression_id: &str, event_id: &str) -> Vec<Cut> {
    let shard = client.impression_shard(impression_id);
    let found = client
        .get_impressions(shard, &[impression_id.to_string()])
        .await
        .unwrap();
    assert_eq!(
        found.len(),
        1,
        "impression {impression_id} not on its shard"
    );
    found[0]
        .events
        .iter()
        .filter(|e| e.event_id == event_id)
        .map(|e| Cut {
            inc: e.inc,
            step: e.step,
        })
        .collect()
}

async fn setup() -> (InProcCluster, std::sync::Arc<PsClient>, Vec<ProcWorker>) {
    let c = InProcCluster::start(3, SHARDS, model_tables(8)).await;
    let opts = ClientOptions {
        deadline: Duration::from_secs(10),
        ..Default::default()
    };
    let client = wait_ready(&c.addrs(), &opts).await.unwrap();
    (c, client, Vec::new())
}

/// Upserts the 12 test items, retrying while the gateway starts (bounded).
async fn upsert(gw: &mut GatewayClient<Channel>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let req = UpsertItemsRequest {
        sets: vec![],
        items: (1..=12)
            .map(|id| Item {
                id,
                features: vec![format!("cat={}", id % 3)],
                active: true,
                title: String::new(),
            })
            .collect(),
    };
    while let Err(s) = gw.upsert_items(req.clone()).await {
        assert!(
            Instant::now() < deadline,
            "the gateway never took the catalog: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A cluster with one worker and two in-process gateways, the catalog upserted.
struct TwoGateways {
    c: InProcCluster,
    client: std::sync::Arc<PsClient>,
    workers: Vec<ProcWorker>,
    dir: tempfile::TempDir,
    g1: InProcGateway,
    g2: InProcGateway,
}

async fn two_gateways() -> TwoGateways {
    freshet_tests::init_tracing();
    let (c, client, mut workers) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    workers.push(ProcWorker::start("w1", &c.addrs(), dir.path()));
    let g1 = InProcGateway::start(&c.addrs()).await;
    let g2 = InProcGateway::start(&c.addrs()).await;
    upsert(&mut g1.client().await).await;
    TwoGateways {
        c,
        client,
        workers,
        dir,
        g1,
        g2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_gateway_joins_any_feedback_and_each_event_trains_once() {
    let TwoGateways {
        c,
        client,
        workers,
        dir: _dir,
        g1,
        g2,
    } = two_gateways().await;
    let (mut gw1, mut gw2) = (g1.client().await, g2.client().await);

    // Rank on gateway 1, Feedback on gateway 2 (the first rounds wait for the catalog
    // epoch on both and for the worker's registration).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut acked: Vec<(RankResponse, FeedbackEvent, Cut)> = Vec::new();
    let mut n = 0;
    while acked.len() < 10 {
        n += 1;
        let r = rank(&mut gw1, n).await;
        let ev = click(&format!("ev-{n}"), &r, 0);
        match feedback(&mut gw2, vec![ev.clone()]).await {
            Ok(a) => {
                assert_eq!((a.accepted, a.duplicates), (1, 0), "{a:?}");
                assert_eq!(a.steps.len(), 1);
                assert!(a.sealed_epoch > 0);
                acked.push((r, ev, a.steps[0]));
            }
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded),
                    "{s:?}"
                );
                assert!(Instant::now() < deadline, "no feedback acknowledged: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Each acknowledged event holds exactly one claim on its impression's shard: the step
    // that was acknowledged.
    for (r, ev, step) in &acked {
        assert_eq!(
            claims(&client, &r.impression_id, &ev.event_id).await,
            vec![*step]
        );
    }
    // A retry on either gateway trains nothing more: a duplicate in the same step.
    for (i, (_, ev, step)) in acked.iter().enumerate() {
        let gw = if i % 2 == 0 { &mut gw1 } else { &mut gw2 };
        let a = feedback(gw, vec![ev.clone()]).await.unwrap();
        assert_eq!((a.accepted, a.duplicates), (1 - 1, 1), "{a:?}");
        assert_eq!(a.steps, vec![*step]);
    }
    // The same new event sent to both gateways at once: one of them trains it.
    for k in 0..5 {
        let r = rank(&mut gw2, 100 + k).await;
        let ev = click(&format!("both-{k}"), &r, 1);
        let (a, b) = tokio::join!(
            feedback(&mut gw1, vec![ev.clone()]),
            feedback(&mut gw2, vec![ev.clone()])
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.accepted + b.accepted, 1, "{a:?} {b:?}");
        assert_eq!(a.duplicates + b.duplicates, 1, "{a:?} {b:?}");
        assert_eq!(a.steps, b.steps);
        assert_eq!(
            claims(&client, &r.impression_id, &ev.event_id).await,
            a.steps
        );
    }
    // Bad input names the field and changes nothing.
    let r = rank(&mut gw1, 500).await;
    let mut bad = click("bad-1", &r, 0);
    bad.item_id = 777;
    let e = feedback(&mut gw2, vec![bad]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("events[0].item_id"), "{}", e.message());
    let mut bad = click("bad-2", &r, 0);
    bad.impression_id = "no-such-impression".into();
    let e = feedback(&mut gw2, vec![bad]).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("events[0].impression_id"),
        "{}",
        e.message()
    );
    let mut bad = click("bad-3", &r, 0);
    bad.impression_id = "x".repeat(129);
    let e = feedback(&mut gw2, vec![bad]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(claims(&client, &r.impression_id, "bad-1").await.is_empty());

    // A gateway stopped gracefully: every impression it served stays joinable elsewhere.
    let served: Vec<RankResponse> = {
        let mut v = Vec::new();
        for k in 0..20 {
            v.push(rank(&mut gw1, 1000 + k).await);
        }
        v
    };
    g1.stop().await;
    let events: Vec<FeedbackEvent> = served
        .iter()
        .enumerate()
        .map(|(k, r)| click(&format!("after-stop-{k}"), r, 2))
        .collect();
    let a = feedback(&mut gw2, events).await.unwrap();
    assert_eq!((a.accepted, a.duplicates), (20, 0), "{a:?}");
    g2.stop().await;
    drop(workers);
    c.shutdown().await;
}

async fn impression_reads(gw: &mut GatewayClient<Channel>) -> u64 {
    gw.status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .impression_reads
}

/// `count` rounds: Rank on `ranker`, then at once a click on `sender`, each accepted.
async fn click_right_after_rank(
    ranker: &mut GatewayClient<Channel>,
    sender: &mut GatewayClient<Channel>,
    tag: &str,
    first_user: u64,
    count: u64,
) {
    for k in 0..count {
        let r = rank(ranker, first_user + k).await;
        let a = feedback(sender, vec![click(&format!("{tag}-{k}"), &r, 0)])
            .await
            .unwrap();
        assert_eq!((a.accepted, a.duplicates), (1, 0), "{a:?}");
    }
}

/// Feedback sent the moment Rank answers finds its impression still queued in the
/// ranking gateway's write-behind log: that gateway waits for its own writer and joins
/// from what it made durable, reading nothing from the shards (it used to poll the shard
/// with back-off until the append landed). Another gateway reads it from its shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feedback_right_after_rank_waits_for_its_own_gateways_writer() {
    let t = two_gateways().await;
    let (mut gw1, mut gw2) = (t.g1.client().await, t.g2.client().await);
    // Warm-up: the catalog epoch, the worker's registration.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        let r = rank(&mut gw1, n).await;
        match feedback(&mut gw1, vec![click(&format!("warm-{n}"), &r, 0)]).await {
            Ok(_) => break,
            Err(s) => {
                assert!(Instant::now() < deadline, "no feedback acknowledged: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let before = impression_reads(&mut gw1).await;
    let mut same = gw1.clone();
    click_right_after_rank(&mut gw1, &mut same, "own", 200, 20).await;
    // Polling the shard asked for about two ids per call (42 in 20 calls); an append
    // slower than the lookup wait on a loaded machine may add a few.
    let reads = impression_reads(&mut gw1).await - before;
    assert!(
        reads < 10,
        "the ranking gateway asked the shards for {reads} of its own impressions"
    );
    // The other gateway holds none of them: it reads each from its shard.
    let before2 = impression_reads(&mut gw2).await;
    click_right_after_rank(&mut gw1, &mut gw2, "other", 300, 3).await;
    assert!(
        impression_reads(&mut gw2).await >= before2 + 3,
        "the other gateway joined impressions it never held without reading them"
    );
    t.g1.stop().await;
    t.g2.stop().await;
    drop(t.workers);
    t.c.shutdown().await;
}

/// A worker frozen (SIGSTOP, shorter than its lease) while it holds a Train call: the
/// gateway gives up on it after its timeout and sends the events to the other worker;
/// when the frozen one wakes, its claims lose or win, but every event is in exactly one
/// step, and the acknowledged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_slower_than_the_train_timeout_trains_nothing_twice() {
    freshet_tests::init_tracing();
    let (c, client, mut workers) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    workers.push(ProcWorker::start("w1", &c.addrs(), dir.path()));
    workers.push(ProcWorker::start("w2", &c.addrs(), dir.path()));
    let g = InProcGateway::start(&c.addrs()).await;
    let mut gw = g.client().await;
    upsert(&mut gw).await;
    // Warm up until both workers are registered and feedback is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        let r = rank(&mut gw, n).await;
        if feedback(&mut gw, vec![click(&format!("warm-{n}"), &r, 0)])
            .await
            .is_ok()
            && client.list_workers().await.unwrap().len() >= 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "no feedback acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut acked: HashMap<String, (String, Vec<Cut>)> = HashMap::new();
    for round in 0..3 {
        // Freeze w1 for 2.5 s: longer than the gateway's 2 s Train timeout, shorter than
        // the 3 s lease (so it is not fenced and may still push what it claimed).
        workers[0].pause();
        let frozen = Instant::now();
        let mut calls = Vec::new();
        for k in 0..4 {
            let r = rank(&mut gw, 10_000 + round * 10 + k).await;
            let ev = click(&format!("slow-{round}-{k}"), &r, 0);
            let mut gw = gw.clone();
            calls.push(tokio::spawn(async move {
                let a = feedback(&mut gw, vec![ev.clone()]).await;
                (r.impression_id, ev.event_id, a)
            }));
        }
        tokio::time::sleep(Duration::from_millis(2_500).saturating_sub(frozen.elapsed())).await;
        workers[0].resume();
        for call in calls {
            let (imp, ev, a) = call.await.unwrap();
            // Answers during the fault are required, not optional.
            let a = a.unwrap_or_else(|s| panic!("feedback during the freeze: {s:?}"));
            assert_eq!(a.accepted + a.duplicates, 1, "{a:?}");
            acked.insert(ev, (imp, a.steps));
        }
    }
    // The woken worker has handled whatever it held once a later event trains in one of
    // its steps (it takes Train calls in order); then every claim is checked.
    // (If the freeze cost w1 its lease, it trains again under a new incarnation.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        n += 1;
        let w1_inc = client
            .list_workers()
            .await
            .unwrap()
            .iter()
            .find(|w| w.name == "w1")
            .map(|w| w.inc);
        let r = rank(&mut gw, n).await;
        if let Ok(a) = feedback(&mut gw, vec![click(&format!("after-{n}"), &r, 0)]).await {
            if a.steps.iter().any(|s| Some(s.inc) == w1_inc) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the woken worker never trained again"
        );
    }
    for (ev, (imp, steps)) in &acked {
        assert_eq!(&claims(&client, imp, ev).await, steps, "event {ev}");
    }
    g.stop().await;
    drop(workers);
    c.shutdown().await;
}

/// kill -9 of a gateway under Rank + Feedback load from clients that retry on the other
/// gateway, and of a data shard's leader right after: every acknowledged event is in
/// exactly one claimed step (the acknowledged one); every event whose impression was
/// answered more than the durability bound before the kill is trained; nothing is
/// trained twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_under_load_loses_nothing_durable_and_trains_nothing_twice() {
    gateway_lost_under_load(false).await;
}

/// The same load with the gateway stopped by SIGTERM (a rolling update's step), and a
/// data shard's leader killed: the gateway drains its impressions first, so not one
/// event is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_stopped_under_load_loses_no_event() {
    gateway_lost_under_load(true).await;
}

async fn gateway_lost_under_load(graceful: bool) {
    freshet_tests::init_tracing();
    let (mut c, client, mut workers) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    workers.push(ProcWorker::start("w1", &c.addrs(), dir.path()));
    let mut g1 = ProcGateway::start("g1", &c.addrs(), dir.path());
    let g2 = ProcGateway::start("g2", &c.addrs(), dir.path());
    let (mut gw1, mut gw2) = (g1.client().await, g2.client().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    upsert(&mut gw2).await;
    // Warm up: both gateways serve and feedback through gateway 1 is acknowledged.
    let mut n = 0;
    loop {
        n += 1;
        let r = rank(&mut gw1, n).await;
        let _ = rank(&mut gw2, n).await;
        if feedback(&mut gw1, vec![click(&format!("warm-{n}"), &r, 0)])
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "no feedback acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // (impression, event, when Rank answered, acknowledged step).
    type Record = (String, String, Instant, Option<Cut>);
    let stop_at = Instant::now() + Duration::from_secs(5);
    let mut clients = Vec::new();
    for cl in 0..4u64 {
        let (mut gw1, mut gw2) = (gw1.clone(), gw2.clone());
        clients.push(tokio::spawn(async move {
            let mut out: Vec<Record> = Vec::new();
            let mut k = 0u64;
            while Instant::now() < stop_at {
                k += 1;
                let user = 10_000 * (cl + 1) + k;
                // Rank on gateway 1 while it lives, then on gateway 2.
                let r = match tokio::time::timeout(
                    Duration::from_millis(500),
                    gw1.rank(rank_request(user)),
                )
                .await
                {
                    Ok(Ok(r)) => r.into_inner(),
                    _ => match gw2.rank(rank_request(user)).await {
                        Ok(r) => r.into_inner(),
                        Err(_) => continue,
                    },
                };
                let answered = Instant::now();
                let ev = click(&format!("load-{cl}-{k}"), &r, 0);
                // Feedback on gateway 1; on any failure, the same event on gateway 2
                // until acknowledged (NOT_FOUND: the impression was lost in the window).
                let mut ack = match tokio::time::timeout(
                    Duration::from_secs(5),
                    gw1.feedback(FeedbackRequest {
                        events: vec![ev.clone()],
                    }),
                )
                .await
                {
                    Ok(Ok(a)) => Some(a.into_inner()),
                    _ => None,
                };
                let until = Instant::now() + Duration::from_secs(30);
                while ack.is_none() && Instant::now() < until {
                    match feedback(&mut gw2, vec![ev.clone()]).await {
                        Ok(a) => ack = Some(a),
                        Err(s) if s.code() == Code::NotFound => break,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                let step = ack.map(|a| {
                    assert_eq!(a.accepted + a.duplicates, 1, "{a:?}");
                    a.steps[0]
                });
                out.push((r.impression_id, ev.event_id, answered, step));
            }
            out
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    if graceful {
        assert!(g1.terminate(Duration::from_secs(15)), "{}", g1.log_tail());
    } else {
        g1.kill();
    }
    // And the leader of a data shard dies meanwhile (its impressions and claims live on
    // in the other replicas), then comes back from its data dir.
    let victim = client.cluster_status(false).await.unwrap().shards[0].leader_id;
    c.crash(victim).await;
    // Down until the shard has elected another leader (so the load runs against the
    // new one), then back.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = client
            .cluster_status(false)
            .await
            .map_or(0, |s| s.shards[0].leader_id);
        if leader != 0 && leader != victim {
            break;
        }
        assert!(Instant::now() < until, "shard 0 elected no new leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.restart(victim).await;
    let mut records: Vec<Record> = Vec::new();
    for cl in clients {
        records.extend(cl.await.unwrap());
    }
    // The durability bound this test holds the system to (the measured window is a few
    // ms; see `freshet bench serve`).
    let bound = Duration::from_secs(1);
    let before = records.iter().filter(|r| r.2 + bound < killed).count();
    assert!(before > 20, "too little load before the kill: {before}");
    let mut lost_in_window = 0;
    for (imp, ev, answered, step) in &records {
        match step {
            Some(step) => {
                assert_eq!(&claims(&client, imp, ev).await, &vec![*step], "event {ev}");
            }
            None => {
                assert!(!graceful, "event {ev} lost across a graceful stop");
                assert!(
                    *answered + bound >= killed,
                    "event {ev} answered {:?} before the kill was never trained",
                    killed - *answered
                );
                lost_in_window += 1;
            }
        }
    }
    eprintln!(
        "{} events, {before} answered > 1 s before the kill, {lost_in_window} lost in the window",
        records.len()
    );
    drop(workers);
    c.shutdown().await;
}

/// A rolling restart of every gateway (SIGTERM one at a time, its replacement started
/// and serving before the next goes) under Rank + Feedback load from clients that use
/// whichever gateways are up: not one event is lost or trained twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_gateway_loses_no_event() {
    use std::sync::{Arc, RwLock};
    freshet_tests::init_tracing();
    let (c, client, mut workers) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    workers.push(ProcWorker::start("w1", &c.addrs(), dir.path()));
    let mut gateways: Vec<ProcGateway> = (0..2)
        .map(|k| ProcGateway::start(&format!("g{k}"), &c.addrs(), dir.path()))
        .collect();
    let mut first = gateways[0].client().await;
    upsert(&mut first).await;
    for g in &gateways {
        let mut gw = g.client().await;
        rank(&mut gw, 0).await;
    }
    // The gateways the clients may use right now (the test swaps them as it rolls).
    let mut up = Vec::new();
    for g in &gateways {
        up.push(g.client().await);
    }
    let live: Arc<RwLock<Vec<GatewayClient<Channel>>>> = Arc::new(RwLock::new(up));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Events acknowledged so far (the test waits on it between restarts).
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pick = |live: &Arc<RwLock<Vec<GatewayClient<Channel>>>>, k: u64| {
        let l = live.read().unwrap();
        l[k as usize % l.len()].clone()
    };
    let mut clients = Vec::new();
    for cl in 0..4u64 {
        let (live, done, acked) = (live.clone(), done.clone(), acked.clone());
        clients.push(tokio::spawn(async move {
            // (impression, event, acknowledged step).
            let mut out: Vec<(String, String, Cut)> = Vec::new();
            let mut k = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                let user = 10_000 * (cl + 1) + k;
                let Ok(r) = pick(&live, k).rank(rank_request(user)).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let ev = click(&format!("roll-{cl}-{k}"), &r.into_inner(), 0);
                // Feedback on the other gateway; any failure is retried on whichever
                // is up, until acknowledged. NOT_FOUND would be a lost impression.
                let until = Instant::now() + Duration::from_secs(30);
                let mut attempt = k + 1;
                let ack = loop {
                    match feedback(&mut pick(&live, attempt), vec![ev.clone()]).await {
                        Ok(a) => break a,
                        Err(s) => {
                            assert_ne!(
                                s.code(),
                                Code::NotFound,
                                "event {} lost: {s:?}",
                                ev.event_id
                            );
                            assert!(Instant::now() < until, "event {}: {s:?}", ev.event_id);
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                };
                assert_eq!(ack.accepted + ack.duplicates, 1, "{ack:?}");
                out.push((ev.impression_id, ev.event_id, ack.steps[0]));
                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            out
        }));
    }
    // Load flows (a bounded wait on acknowledged events, not on time) before the first
    // restart and after every one.
    let progressed = |from: usize| {
        let acked = acked.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(30);
            while acked.load(std::sync::atomic::Ordering::Relaxed) < from + 20 {
                assert!(Instant::now() < until, "no load acknowledged");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    progressed(0).await;
    for (k, slot) in gateways.iter_mut().enumerate() {
        // Out of the clients' list first (as a load balancer drains an endpoint), then
        // SIGTERM: the gateway drains its impressions before it exits.
        live.write().unwrap().remove(0);
        let mut old = std::mem::replace(
            slot,
            ProcGateway::start(&format!("g{k}-new"), &c.addrs(), dir.path()),
        );
        assert!(old.terminate(Duration::from_secs(15)), "{}", old.log_tail());
        let mut fresh = slot.client().await;
        rank(&mut fresh, 1).await;
        live.write().unwrap().push(fresh);
        progressed(acked.load(std::sync::atomic::Ordering::Relaxed)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut records = Vec::new();
    for cl in clients {
        records.extend(cl.await.unwrap());
    }
    assert!(records.len() > 20, "too little load: {}", records.len());
    for (imp, ev, step) in &records {
        assert_eq!(&claims(&client, imp, ev).await, &vec![*step], "event {ev}");
    }
    eprintln!(
        "{} events across a rolling restart of 2 gateways",
        records.len()
    );
    drop(workers);
    c.shutdown().await;
}
