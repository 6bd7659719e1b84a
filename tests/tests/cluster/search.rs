//! Search from outside: a query given to Rank and Recommend reaches the model through
//! its rows and crosses, the impression carries it to training, and feedback on the
//! items a query's users click changes that query's ranking; bad queries name the field.
//! Recommend with a query also retrieves by the items' titles (BM25), at the served epoch.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use freshet_client::gateway::{events_for, upsert_and_wait};
use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, Exploration, FeedbackRequest, ItemFilter, LookupRequest,
    RankRequest, RecommendRequest, UpsertItemsRequest, UserContext,
};
use freshet_proto::ps::v1::Item;
use freshet_tests::{model_tables, InProcGateway, InProcWorker};
use tonic::transport::Channel;
use tonic::Code;

/// Items 1..=8: (red, blue) × (dress, shoe), two of each.
fn catalog() -> Vec<Item> {
    (1..=8)
        .map(|id| Item {
            id,
            features: vec![
                format!("color={}", if id <= 4 { "red" } else { "blue" }),
                format!(
                    "type={}",
                    if id % 4 == 1 || id % 4 == 2 {
                        "dress"
                    } else {
                        "shoe"
                    }
                ),
            ],
            active: true,
            title: String::new(),
        })
        .collect()
}

/// What a user searching `query` clicks: red dresses for "red dress", blue shoes for
/// "blue shoe".
fn wanted(query: &str, id: u64) -> bool {
    match query {
        "red dress" => id == 1 || id == 2,
        _ => id == 7 || id == 8,
    }
}

fn user(query: &str) -> UserContext {
    UserContext {
        categorical: [("segment".to_string(), "s1".to_string())].into(),
        numeric: vec![],
        user_id: String::new(),
        query: query.into(),
    }
}

fn rank(query: &str, k: u32, exploration: Exploration) -> RankRequest {
    RankRequest {
        user: Some(user(query)),
        candidates: (1..=8).collect(),
        k,
        exploration: Some(exploration),
        candidate_set: String::new(),
        min_epoch: 0,
    }
}

/// The item with the highest score for `query` (one Rank with K = every candidate).
async fn top(gw: &mut GatewayClient<Channel>, query: &str) -> (u64, Vec<(u64, f32)>) {
    let r = gw
        .rank(rank(query, 8, Exploration::default()))
        .await
        .unwrap()
        .into_inner();
    let mut s: Vec<(u64, f32)> = r.items.iter().map(|i| (i.item_id, i.score)).collect();
    s.sort_by(|a, b| b.1.total_cmp(&a.1));
    (s[0].0, s)
}

/// One round of searches: the same user searches both queries, each query's users click
/// their items (every slot's feedback acknowledged). Explores widely, so that every item
/// is shown under both queries.
async fn search_round(gw: &mut GatewayClient<Channel>, round: u32) {
    let explore = Exploration {
        temperature: 1.0,
        epsilon: 0.5,
    };
    for query in ["red dress", "blue shoe"] {
        let r = gw.rank(rank(query, 4, explore)).await.unwrap().into_inner();
        let events = events_for(&r, &format!("{query}-{round}"), |it| {
            Some(wanted(query, it.item_id))
        });
        let ack = gw
            .feedback(FeedbackRequest { events })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ack.accepted, 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_changes_the_ranking_through_its_rows_after_feedback() {
    let (c, g) = InProcGateway::with_cluster(3, 3, model_tables(8)).await;
    let worker = InProcWorker::start(&c.addrs()).await;
    let mut gw = g.client().await;
    upsert_and_wait(&mut gw, &catalog(), Duration::from_secs(30))
        .await
        .unwrap();

    // Bad queries name the field, on Rank and on Recommend.
    for q in [" ?! ".to_string(), "dress ".repeat(200)] {
        let e = gw
            .rank(rank(&q, 2, Exploration::default()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with("user.query"), "{}", e.message());
        let e = gw
            .recommend(RecommendRequest {
                user: Some(user(&q)),
                k: 2,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with("user.query"), "{}", e.message());
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    loop {
        search_round(&mut gw, rounds).await;
        rounds += 1;
        if rounds % 10 == 0 {
            let (red, _) = top(&mut gw, "red dress").await;
            let (blue, _) = top(&mut gw, "blue shoe").await;
            if wanted("red dress", red) && wanted("blue shoe", blue) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline && rounds < 400,
            "after {rounds} rounds: red dress {:?}, blue shoe {:?}",
            top(&mut gw, "red dress").await.1,
            top(&mut gw, "blue shoe").await.1
        );
    }
    // The impressions carried the query to training: the cross of the term "red" with
    // the feature color=red moved up on the cluster, the one with color=blue down.
    let red = freshet_model::query::parse_query("red", "q").unwrap();
    let cross = |feature: &str| {
        freshet_model::query::cross_rows(&red, 0, &[freshet_model::item_feature_id(feature)])
            .nth(1)
            .unwrap()
    };
    let l = gw
        .lookup(LookupRequest {
            table: freshet_model::CROSS_TABLE.into(),
            ids: vec![cross("color=red"), cross("color=blue")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        l.values[0] > 0.0 && l.values[1] < 0.0,
        "crosses (red, color=red), (red, color=blue): {:?}",
        l.values
    );
    // Recommend ranks the retrieved set with the query too (retrieve = the catalog, so
    // the answer carries every item's score).
    let r = gw
        .recommend(RecommendRequest {
            user: Some(user("red dress")),
            k: 8,
            retrieve: 8,
            filter: Some(ItemFilter::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let best = r
        .items
        .iter()
        .max_by(|a, b| a.score.total_cmp(&b.score))
        .unwrap();
    assert!(wanted("red dress", best.item_id), "{:?}", r.items);
    eprintln!("queries learned after {rounds} rounds");
    worker.stop().await;
    g.stop().await;
    c.shutdown().await;
}

fn titled(id: u64, title: &str, active: bool) -> Item {
    Item {
        id,
        features: vec![format!("cat={}", id % 3)],
        active,
        title: title.into(),
    }
}

fn recommend(query: &str, n: u32, epsilon: f32) -> RecommendRequest {
    RecommendRequest {
        user: Some(user(query)),
        k: n,
        retrieve: n,
        exploration: Some(Exploration {
            temperature: 0.0,
            epsilon,
        }),
        filter: Some(ItemFilter::default()),
        min_epoch: 0,
        exact: false,
        // The retrieved set alone: these tests check exactly what retrieval found.
        explore: Some(0),
    }
}

/// Every item a Recommend of `req` can show: the union of many answers' slots at
/// uniform-leaning exploration (ε 0.5 over at most six candidates).
async fn shown(gw: &mut GatewayClient<Channel>, req: &RecommendRequest) -> (u32, BTreeSet<u64>) {
    let mut seen = BTreeSet::new();
    let mut candidates = 0;
    for _ in 0..60 {
        let r = gw.recommend(req.clone()).await.unwrap().into_inner();
        candidates = r.candidates;
        seen.extend(r.items.iter().map(|i| i.item_id));
    }
    (candidates, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recommend_with_a_query_retrieves_by_title_at_the_served_epoch() {
    let (c, g) = InProcGateway::with_cluster(3, 3, model_tables(8)).await;
    let mut gw = g.client().await;
    let mut items: Vec<Item> = (1..=60)
        .map(|id| titled(id, &format!("plain thing number{id}"), true))
        .collect();
    items[41] = titled(42, "Crimson evening gown", true);
    items[43] = titled(44, "Crimson gown", true);
    // 43 matches too but is inactive (upserted apart: the wait ranks what it upserts).
    let inactive = items.remove(42);
    upsert_and_wait(&mut gw, &items, Duration::from_secs(30))
        .await
        .unwrap();
    gw.upsert_items(UpsertItemsRequest {
        items: vec![titled(inactive.id, "crimson gown, sold out", false)],
        sets: vec![],
    })
    .await
    .unwrap();
    // Without a query: the model's best 3, nothing else.
    let (n, model) = shown(&mut gw, &recommend("", 3, 0.5)).await;
    assert_eq!((n, model.len()), (3, 3), "{model:?}");
    // With one: the model's 3 and the active titles that match (never the inactive 43);
    // every one of them can be shown.
    let want: BTreeSet<u64> = model.iter().copied().chain([42, 44]).collect();
    let (n, seen) = shown(&mut gw, &recommend("crimson gown", 3, 0.5)).await;
    assert_eq!(n as usize, want.len(), "{seen:?}");
    assert_eq!(seen, want);
    // The filter applies to title matches too.
    let mut no_44 = recommend("crimson gown", 3, 0.5);
    no_44.filter = Some(ItemFilter {
        exclude_items: vec![44],
        ..Default::default()
    });
    let (_, seen) = shown(&mut gw, &no_44).await;
    assert!(!seen.contains(&44) && seen.contains(&42), "{seen:?}");
    // A new title replaces the old words from the epoch that applied it.
    gw.upsert_items(UpsertItemsRequest {
        items: vec![titled(44, "Green scarf", true)],
        sets: vec![],
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = gw
            .recommend(recommend("green scarf", 3, 0.5))
            .await
            .unwrap()
            .into_inner();
        let (_, seen) = shown(&mut gw, &recommend("green scarf", 3, 0.5)).await;
        if seen.contains(&44) {
            let (_, crimson) = shown(&mut gw, &recommend("crimson gown", 3, 0.5)).await;
            assert!(
                crimson.contains(&42) && (!crimson.contains(&44) || model.contains(&44)),
                "epoch {}: {crimson:?}",
                r.epoch
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new title never became searchable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.stop().await;
    c.shutdown().await;
}

/// The impression logs each candidate's title match level, training learns the levels'
/// weights from the clicks, and the weight reaches items no search has shown: of two new
/// items alike in everything but their titles, the one whose title holds the typed words
/// scores higher, by the levels' difference (their learned rows on top of the prior).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_title_match_ranks_items_no_click_has_reached() {
    let (c, g) = InProcGateway::with_cluster(3, 3, model_tables(8)).await;
    let worker = InProcWorker::start(&c.addrs()).await;
    let mut gw = g.client().await;
    // The catalog of the test above, each title its two feature values' words.
    let items: Vec<Item> = catalog()
        .into_iter()
        .map(|mut it| {
            let words: Vec<&str> = it
                .features
                .iter()
                .map(|f| f.split_once('=').unwrap().1)
                .collect();
            it.title = words.join(" ");
            it
        })
        .collect();
    upsert_and_wait(&mut gw, &items, Duration::from_secs(30))
        .await
        .unwrap();
    let level = |query: &str, title: &str| {
        freshet_model::query::lexical_level(
            &freshet_model::query::parse_query(query, "q").unwrap(),
            &freshet_model::query::title_term_ids(title),
        )
    };
    let (full, none) = (
        level("red dress", "red dress"),
        level("red dress", "blue shoe"),
    );
    let rows: Vec<u64> = [full, none]
        .iter()
        .map(|l| freshet_model::query::lexical_row(*l).unwrap())
        .collect();
    let weights = |gw: &mut GatewayClient<Channel>| {
        let req = LookupRequest {
            table: freshet_model::LEXICAL_TABLE.into(),
            ids: rows.clone(),
        };
        let mut gw = gw.clone();
        async move { gw.lookup(req).await.unwrap().into_inner().values }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    loop {
        search_round(&mut gw, rounds).await;
        rounds += 1;
        let w = weights(&mut gw).await;
        // Clicks go to the titles that hold both words, never to those with neither.
        if w[0] > 0.3 && w[1] < 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline && rounds < 400,
            "after {rounds} rounds: levels (both words, neither) {w:?}"
        );
    }
    // Two new items, the same features (never shown: their rows and crosses are
    // untrained alike), one titled with the query's words.
    let fresh = |id: u64, title: &str| Item {
        id,
        features: vec!["color=green".into(), "type=hat".into()],
        active: true,
        title: title.into(),
    };
    upsert_and_wait(
        &mut gw,
        &[fresh(9, "Red dress"), fresh(10, "green hat")],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let r = gw
        .rank(RankRequest {
            candidates: vec![9, 10],
            ..rank("red dress", 2, Exploration::default())
        })
        .await
        .unwrap()
        .into_inner();
    let score = |id: u64| r.items.iter().find(|i| i.item_id == id).unwrap().score;
    let w = weights(&mut gw).await;
    let gap = score(9) - score(10);
    // A level's weight is its row plus the fixed cold-start prior (2 between these two
    // levels); what the rows learned comes on top of it.
    let prior =
        freshet_model::query::lexical_prior(full) - freshet_model::query::lexical_prior(none);
    assert!(gap - prior > 0.3, "scores {:?}, levels {w:?}", r.items);
    // At the version that answered, the gap is the levels' difference alone, rows plus
    // prior (the rows may have moved since by a step or two: the version was read first).
    assert!(
        (gap - (w[0] - w[1] + prior)).abs() < 0.5,
        "gap {gap}, levels {w:?}"
    );
    // Without the query the two are tied: nothing else tells them apart.
    let r = gw
        .rank(RankRequest {
            candidates: vec![9, 10],
            ..rank("", 2, Exploration::default())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.items[0].score, r.items[1].score, "{:?}", r.items);
    eprintln!("levels learned after {rounds} rounds: {w:?}");
    worker.stop().await;
    g.stop().await;
    c.shutdown().await;
}

/// A lexical level is what serving computed: one a Rank could not have produced (above
/// the last level, or without a query) is refused by the worker, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_refuses_lexical_levels_serving_could_not_have_given() {
    use freshet_proto::worker::v1::{
        worker_client::WorkerClient, Candidate, Example, TrainRequest,
    };
    let (c, g) = InProcGateway::with_cluster(3, 3, model_tables(8)).await;
    let worker = InProcWorker::start(&c.addrs()).await;
    let mut client = WorkerClient::new(freshet_client::endpoint(&worker.addr).unwrap());
    let example = |query_terms: Vec<u64>, level: u32| Example {
        user_feature_ids: vec![1],
        candidates: vec![
            Candidate {
                item_id: 1,
                feature_ids: vec![],
                lexical: 0,
            },
            Candidate {
                item_id: 2,
                feature_ids: vec![],
                lexical: level,
            },
        ],
        propensity: 0.5,
        reward: 1.0,
        query_terms,
        ..Default::default()
    };
    let levels = u32::from(freshet_model::query::LEXICAL_LEVELS);
    for ex in [example(vec![7], levels + 1), example(vec![], 1)] {
        // The worker may still be loading the model spec: retry until it answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        let e = loop {
            match client
                .train(TrainRequest {
                    examples: vec![ex.clone()],
                })
                .await
            {
                Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => break r.expect_err("a level serving could not have given"),
            }
        };
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with("examples[0].candidates[1].lexical"),
            "{}",
            e.message()
        );
    }
    worker.stop().await;
    g.stop().await;
    c.shutdown().await;
}
