//! Recommend from outside: the gateway retrieves from the whole active catalog by the
//! model's own score at the version it serves, honours the filter, samples with exact
//! propensities given the retrieved set, follows catalog changes from the next epoch,
//! and its impressions train like Rank's.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, Exploration, ItemFilter, LookupRequest, RankRequest,
    RankResponse, RecommendRequest, StatusRequest, StatusResponse, UpsertItemsRequest, UserContext,
};
use freshet_proto::ps::v1::Item;
use freshet_tests::{model_tables, InProcGateway, InProcWorker};
use tonic::transport::Channel;
use tonic::Code;

fn user() -> UserContext {
    UserContext {
        categorical: [("segment".to_string(), "s1".to_string())].into(),
        numeric: vec![0.3],
        user_id: "u7".into(),
        query: String::new(),
    }
}

const EXPLORATION: Exploration = Exploration {
    temperature: 0.5,
    epsilon: 0.1,
};

fn item(id: u64, active: bool) -> Item {
    Item {
        id,
        features: vec![format!("cat={}", id % 3), format!("brand={}", id % 2)],
        active,
        title: String::new(),
    }
}

fn recommend(k: u32, retrieve: u32, filter: ItemFilter) -> RecommendRequest {
    RecommendRequest {
        user: Some(user()),
        k,
        exploration: Some(EXPLORATION),
        filter: Some(filter),
        retrieve,
        min_epoch: 0,
        exact: false,
        // The retrieved set alone: these tests check exactly what retrieval found.
        explore: Some(0),
    }
}

/// Every item's policy score at the served version, from one Rank over `items` with K =
/// all of them: (epoch, item → score).
async fn scores(gw: &mut GatewayClient<Channel>, items: &[u64]) -> (u64, HashMap<u64, f32>) {
    let r = gw
        .rank(RankRequest {
            user: Some(user()),
            candidates: items.to_vec(),
            k: items.len() as u32,
            exploration: Some(EXPLORATION),
            candidate_set: String::new(),
            min_epoch: 0,
        })
        .await
        .unwrap()
        .into_inner();
    (
        r.epoch,
        r.items.iter().map(|i| (i.item_id, i.score)).collect(),
    )
}

/// Calls Recommend until `done` holds for an answer (the catalog reaches the gateway
/// with the next epochs), at most 20 s.
async fn recommend_until(
    gw: &mut GatewayClient<Channel>,
    req: RecommendRequest,
    done: impl Fn(&RankResponse) -> bool,
) -> RankResponse {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match gw.recommend(req.clone()).await {
            Ok(r) if done(r.get_ref()) => return r.into_inner(),
            Ok(_) => {}
            Err(s) => assert!(
                matches!(s.code(), Code::Unavailable | Code::NotFound),
                "{s:?}"
            ),
        }
        assert!(
            Instant::now() < deadline,
            "Recommend never reached the state"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ids(r: &RankResponse) -> BTreeSet<u64> {
    r.items.iter().map(|i| i.item_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recommend_retrieves_the_best_filtered_active_items_and_trains() {
    let (c, g) = InProcGateway::with_cluster(3, 3, model_tables(8)).await;
    let mut gw = g.client().await;
    // 60 items, 55..=60 inactive.
    gw.upsert_items(UpsertItemsRequest {
        items: (1..=60).map(|id| item(id, id < 55)).collect(),
        sets: vec![],
    })
    .await
    .unwrap();
    let active: Vec<u64> = (1..55).collect();
    let all = recommend(100, 100, ItemFilter::default());
    let r = recommend_until(&mut gw, all.clone(), |r| r.candidates == 54).await;
    // K above what passes: every active item once, none inactive.
    assert_eq!(ids(&r), active.iter().copied().collect());
    assert_eq!(r.items.len(), 54);
    assert_eq!(
        r.items.last().unwrap().propensity,
        1.0,
        "last slot, one left"
    );

    // The filter: category 0, not brand 1, not item 3.
    let filter = ItemFilter {
        require_features: vec!["cat=0".into()],
        exclude_features: vec!["brand=1".into()],
        exclude_items: vec![6],
    };
    let passing: Vec<u64> = active
        .iter()
        .copied()
        .filter(|id| id % 3 == 0 && id % 2 == 0 && *id != 6)
        .collect();
    let r = gw
        .recommend(recommend(100, 100, filter.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&r), passing.iter().copied().collect());
    assert_eq!(r.candidates as usize, passing.len());

    // Retrieval is the exact top N by the model's own score (no training runs here, so
    // every epoch has the same rows), and the propensities are given the retrieved set:
    // slot 1's is (1 - ε) softmax(s / T) + ε / N over the N retrieved, T relative to their
    // spread, with Rank's scores bit for bit.
    let (_, s) = scores(&mut gw, &active).await;
    let mut by_score: Vec<(f32, u64)> = s.iter().map(|(i, v)| (*v, *i)).collect();
    by_score.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let n = 10;
    let top: BTreeSet<u64> = by_score[..n].iter().map(|(_, i)| *i).collect();
    for _ in 0..5 {
        let r = gw
            .recommend(recommend(3, n as u32, ItemFilter::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.candidates as usize, n);
        assert!(
            ids(&r).is_subset(&top),
            "{:?} not in the top {n} {top:?}",
            ids(&r)
        );
        for it in &r.items {
            assert_eq!(it.score.to_bits(), s[&it.item_id].to_bits(), "{it:?}");
        }
        let retrieved: Vec<f32> = by_score[..n].iter().map(|(v, _)| *v).collect();
        let t = f64::from(freshet_model::relative_temperature(
            &retrieved,
            EXPLORATION.temperature,
        ));
        let max = f64::from(retrieved[0]);
        let total: f64 = retrieved
            .iter()
            .map(|v| ((f64::from(*v) - max) / t).exp())
            .sum();
        let first = &r.items[0];
        let eps = f64::from(EXPLORATION.epsilon);
        let want =
            (1.0 - eps) * ((f64::from(first.score) - max) / t).exp() / total + eps / n as f64;
        assert!(
            (first.propensity - want).abs() < 1e-6,
            "slot 1 propensity {} vs {want}",
            first.propensity
        );
    }

    // Exploration beyond the retrieved set: five random active items join the ten, and
    // the answer ranks all fifteen (none inactive).
    let r = gw
        .recommend(RecommendRequest {
            explore: Some(5),
            ..recommend(10, 10, ItemFilter::default())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.candidates, 15);
    assert!(ids(&r).iter().all(|id| active.contains(id)), "{r:?}");

    // Catalog changes are retrievable / gone from the next epochs.
    gw.upsert_items(UpsertItemsRequest {
        items: vec![item(100, true), item(4, false)],
        sets: vec![],
    })
    .await
    .unwrap();
    let r = recommend_until(&mut gw, all.clone(), |r| ids(r).contains(&100)).await;
    assert!(
        !ids(&r).contains(&4),
        "the deactivated item went in the same epoch"
    );
    assert_eq!(r.candidates, 54);

    // Bad input names the field; a filter nothing passes is NOT_FOUND naming it.
    let bad = |mut f: Box<dyn FnMut(&mut RecommendRequest)>| {
        let mut r = recommend(3, 0, ItemFilter::default());
        f(&mut r);
        r
    };
    for (req, field) in [
        (bad(Box::new(|r| r.k = 0)), "k"),
        (bad(Box::new(|r| r.k = 500)), "k"),
        (bad(Box::new(|r| r.retrieve = 5000)), "retrieve"),
        (bad(Box::new(|r| r.explore = Some(5000))), "explore"),
        (bad(Box::new(|r| r.retrieve = 2)), "k"),
        (
            bad(Box::new(|r| {
                r.filter.as_mut().unwrap().require_features = vec![String::new()]
            })),
            "filter.require_features[0]",
        ),
        (
            bad(Box::new(|r| {
                r.filter.as_mut().unwrap().exclude_features = vec!["x".repeat(200)]
            })),
            "filter.exclude_features[0]",
        ),
        (
            bad(Box::new(|r| {
                r.filter.as_mut().unwrap().exclude_items = (0..10_001).collect()
            })),
            "filter.exclude_items",
        ),
        (
            bad(Box::new(|r| {
                r.user.as_mut().unwrap().numeric = vec![f32::NAN]
            })),
            "user.numeric[0]",
        ),
        (
            bad(Box::new(|r| r.exploration.as_mut().unwrap().epsilon = 2.0)),
            "exploration.epsilon",
        ),
    ] {
        let e = gw.recommend(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let nothing = ItemFilter {
        require_features: vec!["cat=0".into(), "cat=1".into()],
        ..Default::default()
    };
    let e = gw.recommend(recommend(3, 0, nothing)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().starts_with("filter"), "{}", e.message());

    // A recommended impression trains like a ranked one: a click on slot 1 is
    // acknowledged, and the clicked item's row moved at the acknowledging epoch.
    let worker = InProcWorker::start(&c.addrs()).await;
    let r = gw
        .recommend(recommend(3, 20, filter))
        .await
        .unwrap()
        .into_inner();
    let clicked = r.items[0].item_id;
    let row = || LookupRequest {
        table: "item".into(),
        ids: vec![clicked],
    };
    let before = gw.lookup(row()).await.unwrap().into_inner().values;
    let ack = gw
        .feedback(freshet_tests::click(
            &r.impression_id,
            clicked,
            1,
            "rec-click-1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = gw.lookup(row()).await.unwrap().into_inner();
        if l.epoch >= ack.sealed_epoch {
            assert_ne!(l.values, before, "the clicked item's row trained");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "epoch {} never served",
            ack.sealed_epoch
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.stop().await;
    g.stop().await;
    c.shutdown().await;
}

async fn status_until(
    gw: &mut GatewayClient<Channel>,
    what: &str,
    done: impl Fn(&StatusResponse) -> bool,
) -> StatusResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = gw.status(StatusRequest {}).await.unwrap().into_inner();
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never reached, last {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 18, the approximate path end to end: from `ann_min_items` active items on, a
/// gateway retrieves through the HNSW index it builds in the background (and rebuilds
/// after catalog changes). Beside a gateway that scores every item, at the same epoch:
/// the same N items (a small catalog searched wider than itself), items deactivated
/// since the index was built are never retrieved, and a filter that too few of the
/// index's nearest pass falls back to the exact pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recommend_through_the_approximate_index_retrieves_what_the_exact_pass_does() {
    let (c, exact) = InProcGateway::with_cluster(3, 3, model_tables(8)).await;
    let approx = InProcGateway::start_with(freshet_gateway::GatewayConfig {
        ps: c.addrs(),
        ann_min_items: 100,
        ann_ef: 400,
        ann_rebuild_ms: 1_000,
        ..Default::default()
    })
    .await;
    let (mut ge, mut ga) = (exact.client().await, approx.client().await);
    // Every item has a feature of its own, so no two score alike (retrieval ties would
    // go to the lower id on the exact path, anywhere among equals on the index).
    let with_sku = |id: u64, active: bool| {
        let mut it = item(id, active);
        it.features.push(format!("sku={id}"));
        it
    };
    ge.upsert_items(UpsertItemsRequest {
        items: (1..=200).map(|id| with_sku(id, true)).collect(),
        sets: vec![],
    })
    .await
    .unwrap();
    let built = status_until(&mut ga, "index of 200 items", |s| s.ann_items == 200).await;
    assert!(built.ann_epoch > 0 && built.ann_epoch <= built.epoch);
    // No worker trains, so rows stay as they are; both answer at the same epoch or later.
    let at = |epoch: u64, filter: ItemFilter| RecommendRequest {
        min_epoch: epoch,
        ..recommend(20, 20, filter)
    };
    let both = |ge: &mut GatewayClient<Channel>, ga: &mut GatewayClient<Channel>, epoch, f| {
        let (mut ge, mut ga) = (ge.clone(), ga.clone());
        let req = at(epoch, f);
        async move {
            let e = ge.recommend(req.clone()).await.unwrap().into_inner();
            let a = ga.recommend(req).await.unwrap().into_inner();
            (ids(&e), ids(&a))
        }
    };
    let (e, a) = both(&mut ge, &mut ga, built.epoch, ItemFilter::default()).await;
    assert_eq!(e.len(), 20);
    assert_eq!(a, e, "the index's retrieval equals the exact pass");
    let s = ga.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((s.recommend_ann, s.recommend_ann_fallbacks), (1, 0));

    // Deactivate ten of the retrieved items: gone from the index path's answers from
    // the epoch that deactivated them, whether or not the index was rebuilt yet.
    let gone: Vec<u64> = e.iter().copied().take(10).collect();
    ge.upsert_items(UpsertItemsRequest {
        items: gone.iter().map(|id| with_sku(*id, false)).collect(),
        sets: vec![],
    })
    .await
    .unwrap();
    let r = recommend_until(&mut ge, recommend(20, 20, ItemFilter::default()), |r| {
        gone.iter().all(|g| !ids(r).contains(g))
    })
    .await;
    let (e2, a2) = both(&mut ge, &mut ga, r.epoch, ItemFilter::default()).await;
    assert!(gone.iter().all(|g| !a2.contains(g)), "{a2:?}");
    assert_eq!(a2, e2);
    // The rebuild follows the catalog.
    let rebuilt = status_until(&mut ga, "index rebuilt after the change", |s| {
        s.ann_items == 190 && s.ann_epoch >= r.epoch
    })
    .await;

    // Excluding the best 30 leaves at most 10 of the 40 nearest: the exact pass answers.
    let best30 = ge
        .recommend(RecommendRequest {
            min_epoch: rebuilt.epoch,
            ..recommend(30, 30, ItemFilter::default())
        })
        .await
        .unwrap()
        .into_inner();
    let narrow = ItemFilter {
        exclude_items: ids(&best30).into_iter().collect(),
        ..Default::default()
    };
    let (e3, a3) = both(&mut ge, &mut ga, rebuilt.epoch, narrow).await;
    assert_eq!(a3, e3);
    assert!(a3.is_disjoint(&ids(&best30)));
    // A call may ask for the exact pass (to measure the index's recall).
    let exact_req = RecommendRequest {
        exact: true,
        ..at(rebuilt.epoch, ItemFilter::default())
    };
    let a4 = ids(&ga.recommend(exact_req.clone()).await.unwrap().into_inner());
    let e4 = ids(&ge.recommend(exact_req).await.unwrap().into_inner());
    assert_eq!(a4, e4);
    let s = ga.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        s.recommend_ann, 2,
        "the exact call did not go through the index"
    );
    assert_eq!(s.recommend_ann_fallbacks, 1);
    approx.stop().await;
    exact.stop().await;
    c.shutdown().await;
}
