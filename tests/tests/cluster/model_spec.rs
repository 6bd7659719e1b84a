//! The model spec lives in the meta group: written from the cluster config at bootstrap,
//! read by workers (and anyone) through Coordinator/GetModel from any meta replica; the
//! deploy manifests' cluster configs carry a spec this build runs.

use freshet_client::wait_ready;
use freshet_client::{ClientOptions, PsClient};
use freshet_model::{Hyper, ModelSpec};
use freshet_server::config::ClusterConfig;
use freshet_tests::{model_tables, InProcCluster};

#[tokio::test]
async fn every_component_reads_the_same_model_spec_from_the_meta_group() {
    let c = InProcCluster::start(3, 2, model_tables(8)).await;
    // Leaders elected first (GetModel goes to the meta leader, like every coordinator call).
    wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let want = ModelSpec::new(8).config(&Hyper::default());
    for addr in c.addrs() {
        // From each node's own meta replica.
        let client = PsClient::connect(std::slice::from_ref(&addr), ClientOptions::default())
            .await
            .unwrap();
        let got = client.get_model().await.unwrap();
        assert_eq!(got, want, "node {addr}");
        assert_eq!(
            ModelSpec::from_config(&got).unwrap(),
            (ModelSpec::new(8), Hyper::default())
        );
    }
    // A cluster bootstrapped without a model section says so (NOT_FOUND), not INTERNAL.
    let plain = InProcCluster::start(1, 1, Vec::new()).await;
    wait_ready(&plain.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let client = PsClient::connect(&plain.addrs(), ClientOptions::default())
        .await
        .unwrap();
    match client.get_model().await {
        Err(freshet_client::ClientError::Status(s)) => {
            assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}")
        }
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
}

#[test]
fn the_deploy_cluster_configs_carry_a_model_this_build_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for path in [
        "deploy/k8s/base/cluster.json",
        "deploy/k8s/overlays/prod/cluster.json",
    ] {
        let text = std::fs::read_to_string(root.join(path)).unwrap();
        let c: ClusterConfig = serde_json::from_str(&text).unwrap();
        c.validate().unwrap();
        let m = c
            .model
            .as_ref()
            .unwrap_or_else(|| panic!("{path}: no model section"));
        let (spec, _) = ModelSpec::from_config(&m.to_proto(&c.tables))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(spec.dim as u32, m.dim, "{path}");
        // The very tables this build creates for a fresh cluster of that width (so the
        // manifests do not drift from the tuned defaults: optimizers, rates, new tables).
        assert_eq!(c.tables, model_tables(spec.dim), "{path}");
    }
}

/// SetModel changes the loss weights on a running cluster: compare-and-set on the
/// revision, every meta replica follows, a running worker takes the new weights within a
/// heartbeat, and shape or table changes are refused naming the field (changing nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loss_weights_change_on_a_running_cluster() {
    let c = InProcCluster::start(3, 2, model_tables(8)).await;
    let addrs = c.addrs();
    let client = wait_ready(&addrs, &ClientOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker = freshet_tests::ProcWorker::start("w1", &addrs, dir.path());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !worker.log_tail().contains("worker registered") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            worker.log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let cur = client.get_model().await.unwrap();
    assert_eq!(cur.revision, 0);
    let mut edit = cur.clone();
    edit.clip = 5.0;
    edit.entropy = 0.02;
    let set = client.set_model(edit.clone()).await.unwrap();
    assert_eq!(set.revision, 1);
    assert_eq!((set.clip, set.entropy), (5.0, 0.02));
    assert_eq!(set.tables, cur.tables);

    // A change based on a stale revision loses the race (and changes nothing).
    let mut stale = cur.clone();
    stale.clip = 7.0;
    let code = |r: Result<_, freshet_client::ClientError>| match r {
        Err(freshet_client::ClientError::Status(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    };
    let (c0, m0) = code(client.set_model(stale).await);
    assert_eq!(c0, tonic::Code::FailedPrecondition, "{m0}");
    assert!(m0.contains("model.revision"), "{m0}");

    // Shapes and tables are fixed at bootstrap; bad weights are refused; each names its
    // field.
    let base = client.get_model().await.unwrap();
    let mut dim = base.clone();
    dim.dim = 9;
    let mut tables = base.clone();
    tables.tables[0].optimizer = None;
    let mut nan = base.clone();
    nan.clip = f32::NAN;
    let mut neg = base.clone();
    neg.entropy = -1.0;
    let mut actor = base.clone();
    actor.policy_weight = Some(f32::INFINITY);
    for (bad, field) in [
        (dim, "model.dim"),
        (tables, "model.tables"),
        (nan, "model.clip"),
        (neg, "model.entropy"),
        (actor, "model.policy_weight"),
    ] {
        let (code, msg) = code(client.set_model(bad).await);
        assert_eq!(code, tonic::Code::InvalidArgument, "{field}: {msg}");
        assert!(msg.contains(field), "{field}: {msg}");
    }

    // Every meta replica holds revision 1 (followers apply it shortly after the leader).
    for addr in &addrs {
        // Straight to the node (GetModel answers from its own replica; PsClient would
        // route to the meta leader).
        let mut one = freshet_proto::coord::v1::coordinator_client::CoordinatorClient::connect(
            format!("http://{addr}"),
        )
        .await
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let m = one
                .get_model(freshet_proto::coord::v1::GetModelRequest {})
                .await
                .unwrap()
                .into_inner()
                .model
                .unwrap();
            if m == set {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{addr}: {m:?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    assert_eq!(ModelSpec::from_config(&set).unwrap().1.clip, 5.0);

    // The running worker took the new weights (its heartbeat carries the revision).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = plain(&worker.log_tail());
        if log.contains("model spec changed") {
            assert!(
                log.contains("revision=1 policy_weight=0.1") && log.contains("clip=5.0"),
                "{log}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(worker);
    c.shutdown().await;
}

/// SetModel changes a table's learning rate on a running cluster: every shard's table
/// takes it (replicas agree), pushes from then on step by the new rate, rows keep their
/// values and slots, and an optimizer-kind change is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learning_rates_change_on_a_running_cluster() {
    use freshet_proto::ps::v1::{optimizer_config::Kind, ReadConsistency};
    let shards = 2;
    let c = InProcCluster::start(3, shards, model_tables(8)).await;
    let addrs = c.addrs();
    let client = wait_ready(&addrs, &ClientOptions::default()).await.unwrap();
    let rate = |m: &freshet_proto::ps::v1::ModelConfig| match m
        .tables
        .iter()
        .find(|t| t.name == "item")
        .and_then(|t| t.optimizer)
    {
        Some(o) => match o.kind {
            Some(Kind::Adagrad(a)) => a,
            other => panic!("item optimizer {other:?}"),
        },
        None => panic!("no item table"),
    };
    // Item rows start at 0 with Adagrad (accumulator 0.01): one unit gradient moves a row
    // by lr / sqrt(1.01).
    let cur = client.get_model().await.unwrap();
    let before = rate(&cur);
    let step = |lr: f32| -lr / (before.initial_accumulator + 1.0).sqrt();
    let row = |id: u64| {
        let client = client.clone();
        async move {
            client
                .pull("item", &[id], ReadConsistency::Linearizable)
                .await
                .unwrap()
                .1
        }
    };
    // Four fresh rows before the change, four after.
    let ids: Vec<u64> = (1..=8).collect();
    let ones = vec![1.0f32; 8];
    client
        .push(
            "item",
            &ids[..4],
            &[ones.clone(), ones.clone(), ones.clone(), ones.clone()].concat(),
        )
        .await
        .unwrap();
    for id in &ids[..4] {
        let r = row(*id).await;
        assert!((r[0] - step(before.lr)).abs() < 1e-5, "{id}: {r:?}");
    }

    let mut edit = cur.clone();
    let new_lr = before.lr / 5.0;
    for t in &mut edit.tables {
        if let Some(Kind::Adagrad(a)) = t.optimizer.as_mut().and_then(|o| o.kind.as_mut()) {
            if t.name == "item" {
                a.lr = new_lr;
            }
        }
    }
    let set = client.set_model(edit).await.unwrap();
    assert_eq!(set.revision, 1);
    assert_eq!(rate(&set).lr, new_lr);
    // SetModel answers once every shard's table took the rate: fresh rows step by the
    // new one, trained rows keep their values (and accumulators).
    client
        .push(
            "item",
            &ids[4..],
            &[ones.clone(), ones.clone(), ones.clone(), ones.clone()].concat(),
        )
        .await
        .unwrap();
    for id in &ids[4..] {
        let r = row(*id).await;
        assert!((r[0] - step(new_lr)).abs() < 1e-5, "{id}: {r:?}");
    }
    for id in &ids[..4] {
        let r = row(*id).await;
        assert!((r[0] - step(before.lr)).abs() < 1e-5, "{id}: {r:?}");
    }
    // The shards' table specs carry it, on every replica (checksums cover the specs).
    let specs = client.list_tables().await.unwrap();
    let item = specs.iter().find(|t| t.name == "item").unwrap();
    assert_eq!(Some(item), set.tables.iter().find(|t| t.name == "item"));
    freshet_tests::wait_converged(&addrs, shards, 3, std::time::Duration::from_secs(20)).await;
    // The current spec sent back as it is commits nothing (what finishes a change whose
    // hand-over to the shards failed).
    assert_eq!(client.set_model(set.clone()).await.unwrap(), set);

    // The kind is fixed (its slots are stored with every row); a bad rate is refused.
    let code = |r: Result<_, freshet_client::ClientError>| match r {
        Err(freshet_client::ClientError::Status(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    };
    let mut sgd = set.clone();
    sgd.tables[0].optimizer = Some(freshet_proto::ps::v1::OptimizerConfig {
        kind: Some(Kind::Sgd(freshet_proto::ps::v1::SgdConfig { lr: 0.1 })),
    });
    let (c0, m0) = code(client.set_model(sgd).await);
    assert_eq!(c0, tonic::Code::InvalidArgument, "{m0}");
    assert!(m0.contains("model.tables[0].optimizer"), "{m0}");
    let mut zero = set.clone();
    for t in &mut zero.tables {
        if let Some(Kind::Adagrad(a)) = t.optimizer.as_mut().and_then(|o| o.kind.as_mut()) {
            a.lr = 0.0;
        }
    }
    let (c1, m1) = code(client.set_model(zero).await);
    assert_eq!(c1, tonic::Code::InvalidArgument, "{m1}");
    assert!(m1.contains(".optimizer.adagrad.lr"), "{m1}");
    assert_eq!(client.get_model().await.unwrap(), set);
    c.shutdown().await;
}

/// A log without its ANSI colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Issue 17: row limits set on a running cluster (SetModel, as `freshet model --limits`
/// sends it) reach every shard; rows pushed past the cap are evicted at the next seal on
/// every replica; a later change that names no limits keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_limits_change_on_a_running_cluster() {
    let shards = 2;
    let c = InProcCluster::start(3, shards, model_tables(8)).await;
    let addrs = c.addrs();
    let client = wait_ready(&addrs, &ClientOptions::default()).await.unwrap();
    let cur = client.get_model().await.unwrap();
    let mut edit = cur.clone();
    let limits = Some(freshet_proto::ps::v1::RowLimits {
        ttl_ms: 0,
        rows_max: 8,
        ..Default::default()
    });
    edit.tables
        .iter_mut()
        .find(|t| t.name == "feature")
        .unwrap()
        .limits = limits;
    let set = client.set_model(edit).await.unwrap();
    let feature = |m: &freshet_proto::ps::v1::ModelConfig| {
        m.tables
            .iter()
            .find(|t| t.name == "feature")
            .unwrap()
            .limits
    };
    assert_eq!(feature(&set), limits);
    // 40 new feature rows (~20 per shard), then a seal: each shard keeps 7.
    let ids: Vec<u64> = (1..=40).map(|i| i * 7919).collect();
    client
        .push("feature", &ids, &vec![1.0f32; ids.len() * 8])
        .await
        .unwrap();
    client.request_seal().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut held = Vec::new();
        for addr in &addrs {
            let st = freshet_tests::node_status(addr, false).await.unwrap();
            for sh in st.shards.iter().filter(|s| s.shard < shards) {
                let t = sh.replicas[0]
                    .tables
                    .iter()
                    .find(|t| t.table == "feature")
                    .cloned()
                    .unwrap();
                held.push((t.rows, t.evicted));
            }
        }
        if held.len() == 6 && held.iter().all(|&(rows, evicted)| rows == 7 && evicted > 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replicas never enforced the cap: {held:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A change that names no limits (a client that does not know them) keeps them.
    let mut again = set.clone();
    for t in &mut again.tables {
        t.limits = None;
    }
    again.entropy = set.entropy * 2.0;
    let kept = client.set_model(again).await.unwrap();
    assert_eq!(feature(&kept), limits);
    // Bad limits name the field and change nothing.
    let mut bad = kept.clone();
    bad.tables
        .iter_mut()
        .find(|t| t.name == "feature")
        .unwrap()
        .limits = Some(freshet_proto::ps::v1::RowLimits {
        ttl_ms: 0,
        rows_max: 3,
        ..Default::default()
    });
    let e = client.set_model(bad).await.unwrap_err().to_string();
    assert!(e.contains("limits.rows_max"), "{e}");
    assert_eq!(client.get_model().await.unwrap().revision, kept.revision);
    // Limits turned off: the spec has none, and 40 more rows all stay on every replica.
    let mut off = kept.clone();
    off.tables
        .iter_mut()
        .find(|t| t.name == "feature")
        .unwrap()
        .limits = Some(freshet_proto::ps::v1::RowLimits {
        off: true,
        ..Default::default()
    });
    let unlimited = client.set_model(off).await.unwrap();
    assert!(feature(&unlimited).is_some_and(|l| l.off), "{unlimited:?}");
    let more: Vec<u64> = (41..=80).map(|i| i * 7919).collect();
    client
        .push("feature", &more, &vec![1.0f32; more.len() * 8])
        .await
        .unwrap();
    // Past a seal (where a cap would act): every replica's sealed epoch moves on.
    let sealed_before = client.list_seals(0, 1).await.unwrap().last_sealed_epoch;
    client.request_seal().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut rows = 0;
        let mut sealed = u64::MAX;
        for addr in &addrs {
            let st = freshet_tests::node_status(addr, false).await.unwrap();
            for sh in st.shards.iter().filter(|s| s.shard < shards) {
                let t = sh.replicas[0].tables.iter().find(|t| t.table == "feature");
                rows += t.map_or(0, |t| t.rows);
                sealed = sealed.min(sh.replicas[0].sealed_epoch);
            }
        }
        // 7 kept per shard replica before, plus every new row on each of 3 replicas,
        // once every replica applied a seal after the push.
        if rows == 3 * (7 * shards as u64 + 40) && sealed > sealed_before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rows after limits were turned off: {rows}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
