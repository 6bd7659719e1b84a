//! The model spec lives in the meta group: written from the cluster config at bootstrap,
//! read by workers (and anyone) through Coordinator/GetModel from any meta replica; the
//! deploy manifests' cluster configs carry a spec this build runs.

use freshet_client::bench::wait_ready;
use freshet_client::model::{Hyper, ModelSpec};
use freshet_client::{ClientOptions, PsClient};
use freshet_server::config::ClusterConfig;
use freshet_tests::{model_tables, InProcCluster};

#[tokio::test]
async fn every_component_reads_the_same_model_spec_from_the_meta_group() {
    let c = InProcCluster::start(3, 2, model_tables(8)).await;
    // Leaders elected first (GetModel goes to the meta leader, like every coordinator call).
    wait_ready(&c.addrs(), &ClientOptions::default())
        .await
        .unwrap();
    let want = ModelSpec { dim: 8 }.config(&Hyper::default());
    for addr in c.addrs() {
        // From each node's own meta replica.
        let client = PsClient::connect(std::slice::from_ref(&addr), ClientOptions::default())
            .await
            .unwrap();
        let got = client.get_model().await.unwrap();
        assert_eq!(got, want, "node {addr}");
        assert_eq!(
            ModelSpec::from_config(&got).unwrap(),
            (ModelSpec { dim: 8 }, Hyper::default())
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
    }
}
