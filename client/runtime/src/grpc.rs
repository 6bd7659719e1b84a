//! gRPC plumbing shared by every role: a bounded server stop, reflection, peer endpoints.

use std::time::Duration;

use tonic::transport::Endpoint;

/// Waits for a gRPC server told to stop: graceful stop waits for open streams (peers
/// keep Raft streams, subscribers keep change streams), so in-flight calls get a
/// bounded grace and the rest are dropped.
pub async fn stop_server(mut server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    match tokio::time::timeout(Duration::from_secs(2), &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "grpc server error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "grpc server task failed"),
        Err(_) => {
            server.abort();
            tracing::debug!("grpc server stopped after the grace period");
        }
    }
}

/// gRPC reflection v1 and v1alpha (grpcurl 1.8 speaks only v1alpha) over every Freshet
/// proto and grpc.health.v1.
///
/// # Errors
/// An invalid embedded descriptor set (a build problem).
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(freshet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// A client endpoint to a peer with TCP_NODELAY (tonic's default leaves Nagle on, and a
/// small call then waits ~40 ms for a delayed ACK) and HTTP/2 keepalive.
///
/// # Errors
/// A malformed address.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5)))
}
