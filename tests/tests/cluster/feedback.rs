//! Feedback end to end (3 PS processes, a gateway, worker processes): acknowledged
//! events are each in exactly one sealed step; a worker stopped past its lease is fenced
//! (its examples re-sent elsewhere) and rejected after SIGCONT; a worker killed -9
//! mid-stream loses nothing; epochs keep advancing meanwhile; the model moves.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use freshet_client::wait_ready;
use freshet_client::ClientOptions;
use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, FeedbackEvent, FeedbackRequest, LookupRequest, RankRequest,
    Reward, RewardKind, UpsertItemsRequest, UserContext,
};
use freshet_proto::ps::v1::{Cut, Item};
use freshet_tests::{model_tables, InProcGateway, ProcCluster, ProcWorker};
use tonic::transport::Channel;
use tonic::Code;

const SHARDS: u32 = 3;

fn rank_request(user: u64, items: &[u64]) -> RankRequest {
    RankRequest {
        user: Some(UserContext {
            categorical: [("segment".to_string(), format!("s{}", user % 3))].into(),
            numeric: vec![(user % 5) as f32 * 0.1],
            user_id: format!("u{user}"),
            query: String::new(),
        }),
        candidates: items.to_vec(),
        k: 3,
        exploration: None,
        candidate_set: String::new(),
        min_epoch: 0,
    }
}

/// Ranks once and sends feedback on every shown slot (a click on even items).
async fn round(
    gw: &mut GatewayClient<Channel>,
    n: u64,
    items: &[u64],
) -> Result<
    (
        Vec<(String, String)>,
        freshet_proto::gateway::v1::FeedbackResponse,
    ),
    tonic::Status,
> {
    let r = gw.rank(rank_request(n, items)).await?.into_inner();
    let events: Vec<FeedbackEvent> = r
        .items
        .iter()
        .map(|it| FeedbackEvent {
            event_id: format!("ev-{n}-{}", it.item_id),
            impression_id: r.impression_id.clone(),
            item_id: it.item_id,
            position: it.position,
            rewards: if it.item_id % 2 == 0 {
                vec![Reward {
                    kind: RewardKind::Click as i32,
                    weight: 0.0,
                }]
            } else {
                vec![]
            },
            event_time_ms: 0,
        })
        .collect();
    let ids = events
        .iter()
        .map(|e| (e.event_id.clone(), e.impression_id.clone()))
        .collect();
    let ack = gw.feedback(FeedbackRequest { events }).await?.into_inner();
    Ok((ids, ack))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_feedback_is_sealed_once_across_worker_stop_and_kill() {
    freshet_tests::init_tracing();
    let mut c = ProcCluster::start(3, SHARDS, model_tables(8));
    let addrs = c.live_addrs();
    let opts = ClientOptions {
        deadline: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let client = wait_ready(&addrs, &opts).await.unwrap();
    let w1 = ProcWorker::start("w1", &addrs, c.dir.path());
    let gateway = InProcGateway::start(&addrs).await;
    let mut gw = gateway.client().await;

    let items: Vec<u64> = (1..=12).collect();
    gw.upsert_items(UpsertItemsRequest {
        sets: vec![],
        items: items
            .iter()
            .map(|id| Item {
                id: *id,
                features: vec![format!("cat={}", id % 3)],
                active: true,
                title: String::new(),
            })
            .collect(),
    })
    .await
    .unwrap();

    // acked event id → (its impression, the step that carries it).
    let mut acked: HashMap<String, (String, Cut)> = HashMap::new();
    fn record(
        acked: &mut HashMap<String, (String, Cut)>,
        ids: Vec<(String, String)>,
        ack: &freshet_proto::gateway::v1::FeedbackResponse,
    ) {
        assert_eq!(ack.steps.len(), 1, "one call, one step: {ack:?}");
        for (id, imp) in ids {
            assert!(
                acked.insert(id, (imp, ack.steps[0])).is_none(),
                "event acked twice"
            );
        }
    }
    let mut n = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    // The first rounds wait for the catalog epoch and the worker's registration.
    while acked.len() < 30 {
        n += 1;
        match round(&mut gw, n, &items).await {
            Ok((ids, ack)) => {
                assert_eq!(ack.accepted as usize, ids.len());
                assert!(ack.sealed_epoch > 0);
                record(&mut acked, ids, &ack);
            }
            Err(s) => {
                assert!(
                    matches!(
                        s.code(),
                        Code::Unavailable | Code::NotFound | Code::DeadlineExceeded
                    ),
                    "{s:?}"
                );
                assert!(Instant::now() < deadline, "no feedback acknowledged: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // A retried event id is not trained on twice: same step, counted as duplicate.
    let r = gw
        .rank(rank_request(999, &items))
        .await
        .unwrap()
        .into_inner();
    let ev = FeedbackEvent {
        event_id: "retry-me".into(),
        impression_id: r.impression_id.clone(),
        item_id: r.items[0].item_id,
        position: 1,
        rewards: vec![],
        event_time_ms: 0,
    };
    let a = gw
        .feedback(FeedbackRequest {
            events: vec![ev.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let b = gw
        .feedback(FeedbackRequest {
            events: vec![ev.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((a.accepted, a.duplicates), (1, 0));
    assert_eq!((b.accepted, b.duplicates), (0, 1));
    assert_eq!(a.steps, b.steps);
    acked.insert("retry-me".into(), (r.impression_id.clone(), a.steps[0]));

    // Read your own click: Rank with the acknowledged epoch as min_epoch answers from that
    // version or a newer one (the gateway's replica may still be one behind: it waits).
    for _ in 0..5 {
        let again = gw
            .rank(RankRequest {
                min_epoch: a.sealed_epoch,
                ..rank_request(999, &items)
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            again.epoch >= a.sealed_epoch,
            "{} < {}",
            again.epoch,
            a.sealed_epoch
        );
    }
    // A click is in the user's history row in the version that acknowledges it (and the
    // next Rank with that min_epoch reads it): zero before, not after.
    let history = |gw: &mut GatewayClient<Channel>| {
        let mut gw = gw.clone();
        async move {
            let r = gw
                .lookup(LookupRequest {
                    table: freshet_model::HISTORY_TABLE.into(),
                    ids: vec![freshet_model::user_id_row("u1000")],
                })
                .await
                .unwrap()
                .into_inner();
            (r.epoch, r.values)
        }
    };
    assert!(history(&mut gw).await.1.iter().all(|v| *v == 0.0));
    let r = gw
        .rank(rank_request(1000, &items))
        .await
        .unwrap()
        .into_inner();
    let click = gw
        .feedback(FeedbackRequest {
            events: vec![FeedbackEvent {
                event_id: "history-click".into(),
                impression_id: r.impression_id.clone(),
                item_id: r.items[0].item_id,
                position: 1,
                rewards: vec![Reward::default()],
                event_time_ms: 0,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(click.accepted, 1);
    acked.insert(
        "history-click".into(),
        (r.impression_id.clone(), click.steps[0]),
    );
    gw.rank(RankRequest {
        min_epoch: click.sealed_epoch,
        ..rank_request(1000, &items)
    })
    .await
    .unwrap();
    let (epoch, h) = history(&mut gw).await;
    assert!(epoch >= click.sealed_epoch);
    assert!(
        h.iter().any(|v| *v != 0.0),
        "history row unchanged at epoch {epoch} after a click sealed in {}",
        click.sealed_epoch
    );

    // A Lookup sized by the caller is checked before anything is allocated: 10,000 ids of
    // a dense tensor are refused naming the field.
    let e = gw
        .lookup(LookupRequest {
            table: freshet_model::TOWER.into(),
            ids: (0..10_000).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("ids"), "{}", e.message());
    // A message quotes at most a bounded prefix of the input: a 1 MB table name still
    // gets INVALID_ARGUMENT, not a transport error.
    let e = gw
        .lookup(LookupRequest {
            table: "t".repeat(1 << 20),
            ids: vec![1],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().len() < 2048 && e.message().starts_with("table: "));

    // An epoch nobody sealed: a bounded wait, then UNAVAILABLE naming the field.
    let e = gw
        .rank(RankRequest {
            min_epoch: a.sealed_epoch + 1_000_000,
            ..rank_request(999, &items)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("min_epoch"), "{}", e.message());

    // Bad feedback names the field and changes nothing.
    let mut bad = ev.clone();
    bad.event_id = "bad-1".into();
    bad.impression_id = "nope".into();
    let e = gw
        .feedback(FeedbackRequest { events: vec![bad] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("events[0].impression_id"),
        "{}",
        e.message()
    );
    let mut bad = ev.clone();
    bad.event_id = "bad-2".into();
    bad.item_id = 777;
    let e = gw
        .feedback(FeedbackRequest { events: vec![bad] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("events[0].item_id"), "{}", e.message());

    // SIGSTOP w1 past its lease while w2 takes over: feedback keeps being acknowledged
    // and epochs keep advancing.
    let mut w2 = ProcWorker::start("w2", &addrs, c.dir.path());
    let workers_before = client.list_workers().await.unwrap();
    let w1_inc = workers_before
        .iter()
        .find(|w| w.name == "w1")
        .expect("w1 registered")
        .inc;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client
        .list_workers()
        .await
        .unwrap()
        .iter()
        .any(|w| w.name == "w2")
    {
        assert!(Instant::now() < deadline, "w2 never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w1.pause();
    let paused_at = Instant::now();
    let epoch_before = client.list_seals(0, 1).await.unwrap().last_sealed_epoch;
    let mut during = 0;
    while paused_at.elapsed() < Duration::from_millis(2500) {
        n += 1;
        match round(&mut gw, n, &items).await {
            Ok((ids, ack)) => {
                record(&mut acked, ids, &ack);
                during += 1;
            }
            Err(s) => assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}"),
        }
    }
    assert!(during > 0, "feedback acknowledged while w1 is stopped");
    let seals = client.list_seals(0, 0).await.unwrap();
    assert!(
        seals.last_sealed_epoch > epoch_before,
        "epochs advance with a worker stopped"
    );
    assert!(
        seals.seals.iter().any(|s| s.fenced.contains(&w1_inc)),
        "w1 fenced after its lease"
    );
    w1.resume();
    // After SIGCONT w1's old incarnation is rejected; it registers a new one.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ws = client.list_workers().await.unwrap();
        if ws.iter().any(|w| w.name == "w1" && w.inc != w1_inc) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "w1 did not re-register: {}",
            w1.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(w1.log_tail().contains("fenced"), "{}", w1.log_tail());

    // kill -9 the meta leader (the coordinator) while feedback flows: a new coordinator
    // continues from the log and epochs resume.
    let status = client.cluster_status(false).await.unwrap();
    let meta_leader = status.meta.as_ref().unwrap().leader_id;
    let before = client.list_seals(0, 1).await.unwrap().last_sealed_epoch;
    let feeder = {
        let mut gw = gateway.client().await;
        let items = items.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for k in 0..30u64 {
                if let Ok(r) = round(&mut gw, 50_000 + k, &items).await {
                    out.push(r);
                }
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.kill(meta_leader);
    let killed = Instant::now();
    let survivors: Vec<String> = c.live_addrs();
    let probe = freshet_client::PsClient::connect(&survivors, opts.clone())
        .await
        .unwrap();
    loop {
        if let Ok(r) = probe.list_seals(0, 1).await {
            if r.last_sealed_epoch > before + 2 {
                break;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "epochs stopped after the meta leader died"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Election timeout is 10-20 ticks of 20 ms; the client's retries add to it.
    eprintln!(
        "epochs resumed {:?} after kill -9 of the meta leader",
        killed.elapsed()
    );
    for (ids, ack) in feeder.await.unwrap() {
        record(&mut acked, ids, &ack);
    }
    c.spawn(meta_leader);

    // kill -9 w2 mid-stream: nothing acknowledged is lost, feedback goes on via w1.
    let feeder = {
        let mut gw = gateway.client().await;
        let items = items.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for k in 0..40u64 {
                if let Ok(r) = round(&mut gw, 100_000 + k, &items).await {
                    out.push(r);
                }
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    w2.kill();
    let results = feeder.await.unwrap();
    assert!(results.len() > 10, "feedback continued after the kill");
    for (ids, ack) in results {
        record(&mut acked, ids, &ack);
    }

    // Every acknowledged event is in exactly one sealed step: its step is within its
    // incarnation's committed cut (no event maps to two steps by construction above).
    let seals = client.list_seals(0, 0).await.unwrap();
    let mut cuts: BTreeMap<u64, u64> = BTreeMap::new();
    for s in &seals.seals {
        for c in &s.cuts {
            cuts.insert(c.inc, c.step);
        }
    }
    for (id, (imp, step)) in &acked {
        let cut = cuts.get(&step.inc).copied().unwrap_or(0);
        assert!(
            step.step <= cut,
            "event {id} acked in step {step:?} above the committed cut {cut}"
        );
        // And the impression's shard holds exactly one claim for the event: that step
        // (across the worker stop, the kills and the retries, nothing put it in a second
        // step).
        let shard = client.impression_shard(imp);
        let found = client
            .get_impressions(shard, std::slice::from_ref(imp))
            .await
            .unwrap();
        let claims: Vec<Cut> = found[0]
            .events
            .iter()
            .filter(|e| e.event_id == *id)
            .map(|e| Cut {
                inc: e.inc,
                step: e.step,
            })
            .collect();
        assert_eq!(claims, vec![*step], "event {id}");
    }

    // The model moved: the gateway's rows of the shown items differ from their start.
    let look = gw
        .lookup(LookupRequest {
            table: "item".into(),
            ids: vec![2],
        })
        .await
        .unwrap()
        .into_inner();
    let init: Vec<f32> = (0..8)
        .map(|j| freshet_proto::init_value(1, freshet_proto::fnv1a64("item"), 2, j, 0.1))
        .collect();
    assert_ne!(look.values, init, "trained rows reached the gateway");
    gateway.stop().await;
}
