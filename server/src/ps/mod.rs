//! The `ps` role: one PS node serving gRPC (parameters, admin, peer transport, health,
//! reflection) and Prometheus metrics, with an ordered graceful shutdown.
//!
//! - [`node`]: a node hosting many shard replicas (multi-raft), one owner task per group.
//! - [`coord`]: the coordinator run by the meta leader (leases, fences, seals).
//! - [`seals`]: a data-shard leader copying committed meta seals into its own log.
//! - [`subscribe`]: a replica's sealed state as a change-set stream, for gateways.
//! - [`service`], [`admin`], [`peer`]: the gRPC adapters (parameters; admin and node
//!   status; the peer transport).

pub mod admin;
pub mod coord;
pub mod node;
pub mod peer;
pub mod seals;
pub mod service;
pub mod subscribe;

use std::future::Future;
use std::sync::Arc;

use freshet_proto::admin::v1::{admin_server::AdminServer, node_status_server::NodeStatusServer};
use freshet_proto::coord::v1::coordinator_server::CoordinatorServer;
use freshet_proto::ps::v1::parameter_service_server::ParameterServiceServer;
use freshet_proto::raft::v1::raft_transport_server::RaftTransportServer;
use tokio::net::TcpListener;

use crate::config::PsConfig;
use crate::error::PsError;
use crate::ps::admin::{AdminService, NodeStatusService};
use crate::ps::coord::{Coord, CoordService};
use crate::ps::node::{Node, TransportFactory};
use crate::ps::peer::RaftService;
use crate::ps::service::PsService;
use crate::raft::transport::{GrpcTransport, RAFT_MESSAGE_BYTES_MAX};

/// Runs a PS node on `listener` until `shutdown` resolves.
///
/// # Errors
/// Invalid config, unreadable data dir, or a gRPC server failure.
pub async fn run(
    config: PsConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), PsError> {
    let factory: TransportFactory =
        Box::new(|id, addr, book, reporter| Arc::new(GrpcTransport::new(id, addr, book, reporter)));
    run_with_transport(config, listener, metrics_listener, shutdown, factory).await
}

/// [`run`] with a caller-chosen transport (tests wrap the gRPC one with faults).
///
/// # Errors
/// As [`run`].
pub async fn run_with_transport(
    config: PsConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
    transport: TransportFactory,
) -> Result<(), PsError> {
    crate::metrics::install();
    // Held until this function returns: a second node on the same data dir would
    // interleave two WALs.
    let _lock = freshet_runtime::lock_dir(&config.data_dir)
        .map_err(|e| PsError::FailedPrecondition(e.to_string()))?;
    refuse_wiped_member(&config).await?;
    let bound = listener.local_addr()?.to_string();
    let message_bytes_max = config.message_bytes_max;
    let node = Node::start(config, bound, transport)?;
    let coord = Coord::new(&node);
    let (coord_stop_tx, coord_stop_rx) = tokio::sync::watch::channel(false);
    let coord_task = tokio::spawn(Arc::clone(&coord).run(coord_stop_rx));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ParameterServiceServer<PsService>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (reflection_v1, reflection_v1alpha) = freshet_runtime::grpc::reflection()
        .map_err(|e| PsError::Raft(format!("reflection: {e}")))?;

    let ps = ParameterServiceServer::new(PsService::new(Arc::clone(&node)))
        .max_decoding_message_size(message_bytes_max)
        .max_encoding_message_size(message_bytes_max);
    let admin = AdminServer::new(AdminService {
        node: Arc::clone(&node),
    });
    let coordinator = CoordinatorServer::new(CoordService {
        node: Arc::clone(&node),
        coord,
    });
    let node_status = NodeStatusServer::new(NodeStatusService {
        node: Arc::clone(&node),
    });
    let raft = RaftTransportServer::new(RaftService {
        node: Arc::clone(&node),
    })
    .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX);

    let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = metrics_listener.map(|l| {
        tokio::spawn(crate::metrics::serve(l, async {
            let _ = metrics_stop_rx.await;
        }))
    });

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = freshet_runtime::grpc::incoming(listener);
    let server = tokio::spawn(
        freshet_runtime::grpc::server()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(ps)
            .add_service(admin)
            .add_service(coordinator)
            .add_service(node_status)
            .add_service(raft)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );

    // A group task that died takes the node down (NOT_SERVING first): a process that
    // stays up with a dead replica is never restarted by its supervisor.
    let fatal = tokio::select! {
        () = shutdown => None,
        why = node.fatal() => Some(why),
    };
    match &fatal {
        None => tracing::info!(node = node.id, "shutting down"),
        Some(why) => tracing::error!(node = node.id, "stopping: {why}"),
    }
    // Order: stop advertising health, hand off leadership and stop Raft, then gRPC.
    health_reporter
        .set_not_serving::<ParameterServiceServer<PsService>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let _ = coord_stop_tx.send(true);
    let _ = coord_task.await;
    node.shutdown().await;
    let _ = stop_tx.send(());
    freshet_runtime::grpc::stop_server(server).await;
    let _ = metrics_stop_tx.send(());
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    match fatal {
        None => Ok(()),
        Some(why) => Err(PsError::Raft(format!("{why}; the node stopped"))),
    }
}

/// A node whose data dir is empty but whose id the running cluster has seen acknowledge
/// log entries lost its disk: letting it bootstrap again would let it vote twice in a
/// term and forget entries it acknowledged. Peers are asked (briefly; peers that do not
/// answer are skipped, which is the normal case at a fresh bootstrap) what their
/// replicas recorded (MembersAcknowledged, replicated: any later leader knows it too)
/// and, as a second source, what their leaders' progress shows. If every peer is
/// unreachable the check cannot help; raft-rs then still stops the node at the first
/// heartbeat whose commit index its empty log cannot hold.
///
/// # Errors
/// FAILED_PRECONDITION naming what to do instead.
async fn refuse_wiped_member(config: &PsConfig) -> Result<(), PsError> {
    use freshet_proto::admin::v1::{node_status_client::NodeStatusClient, ClusterStatusRequest};
    let fresh = !config.data_dir.join(crate::config::NODE_META_FILE).exists();
    let Some(cluster) = config.cluster.as_ref().filter(|_| fresh && !config.join) else {
        return Ok(());
    };
    for peer in cluster.nodes.iter().filter(|n| n.id != config.node_id) {
        let ask = async {
            let ch = freshet_runtime::grpc::endpoint(&peer.addr)
                .ok()?
                .connect()
                .await
                .ok()?;
            NodeStatusClient::new(ch)
                .local_status(ClusterStatusRequest {
                    with_checksum: false,
                })
                .await
                .ok()
                .map(|r| r.into_inner())
        };
        // A peer that is down refuses the connection at once; one that is up but busy
        // gets a few seconds.
        let Ok(Some(status)) = tokio::time::timeout(std::time::Duration::from_secs(5), ask).await
        else {
            continue;
        };
        for shard in status.shards {
            if shard.acked_members.contains(&config.node_id)
                || shard
                    .progress
                    .iter()
                    .any(|p| p.node_id == config.node_id && p.matched_index > 0)
            {
                return Err(PsError::FailedPrecondition(format!(
                    "node {} has an empty data dir ({}) but shard {} on node {} has seen it \
                     acknowledge log entries: it lost its disk. Remove it from every shard \
                     (Admin/RemoveReplica) and start it with --join under a new node id",
                    config.node_id,
                    config.data_dir.display(),
                    shard.shard,
                    status.node_id
                )));
            }
        }
    }
    Ok(())
}
