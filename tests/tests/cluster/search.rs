//! Search from outside: a query given to Rank and Recommend reaches the model through
//! its rows and crosses, the impression carries it to training, and feedback on the
//! items a query's users click changes that query's ranking; bad queries name the field.

use std::time::{Duration, Instant};

use freshet_client::gateway::{events_for, upsert_and_wait};
use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, Exploration, FeedbackRequest, ItemFilter, LookupRequest,
    RankRequest, RecommendRequest, UserContext,
};
use freshet_proto::ps::v1::Item;
use freshet_tests::{model_tables, InProcCluster, InProcGateway, InProcWorker};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_changes_the_ranking_through_its_rows_after_feedback() {
    let c = InProcCluster::start(3, 3, model_tables(8)).await;
    let opts = freshet_client::ClientOptions {
        deadline: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    freshet_client::wait_ready(&c.addrs(), &opts).await.unwrap();
    let g = InProcGateway::start(&c.addrs()).await;
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

    // The same user searches two queries; each query's users click different items.
    // Explore widely so that every item is shown under both queries.
    let explore = Exploration {
        temperature: 1.0,
        epsilon: 0.5,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    loop {
        for query in ["red dress", "blue shoe"] {
            let r = gw.rank(rank(query, 4, explore)).await.unwrap().into_inner();
            let events = events_for(&r, &format!("{query}-{rounds}"), |it| {
                Some(wanted(query, it.item_id))
            });
            let ack = gw
                .feedback(FeedbackRequest { events })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(ack.accepted, 4);
        }
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
