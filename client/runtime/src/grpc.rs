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

/// Connections one server holds at once; one more is closed as soon as it is accepted
/// (a caller that opens connections without end cannot exhaust the process's files).
pub const CONNECTIONS_MAX: usize = 4096;
/// Concurrent calls (HTTP/2 streams) per connection.
pub const CALLS_PER_CONNECTION_MAX: usize = 1024;

/// The server settings every Freshet server shares: calls per connection bounded and
/// HTTP/2 keepalive (a peer that vanished without a FIN is noticed within ~20 s and its
/// streams and slots released; TCP keepalive is set on the listener, [`incoming`]). No
/// server-wide request timeout: Raft and feedback streams are long-lived by design; each
/// handler bounds its own wait by the caller's `grpc-timeout`, capped by the server's own
/// maximum.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(CALLS_PER_CONNECTION_MAX)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// A connection holding one of its server's connection slots until it closes.
pub struct Limited<IO> {
    io: IO,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// `incoming` with at most `max` connections open at once: one accepted beyond that is
/// closed at once (and logged), the rest wait for nothing.
pub fn limit_connections<S, IO, E>(
    incoming: S,
    max: usize,
) -> impl futures::Stream<Item = Result<Limited<IO>, E>>
where
    S: futures::Stream<Item = Result<IO, E>>,
{
    use futures::StreamExt as _;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max));
    incoming.filter_map(move |r| {
        let slots = std::sync::Arc::clone(&slots);
        async move {
            match r {
                Ok(io) => match slots.try_acquire_owned() {
                    Ok(slot) => Some(Ok(Limited { io, _slot: slot })),
                    Err(_) => {
                        tracing::warn!(
                            max,
                            "connection refused: the server holds its most connections"
                        );
                        None
                    }
                },
                Err(e) => Some(Err(e)),
            }
        }
    })
}

/// A server's listener with TCP_NODELAY (tonic's `serve_with_incoming` leaves Nagle
/// on), TCP keepalive (the `Server` setting does not reach a listener passed in) and at
/// most [`CONNECTIONS_MAX`] connections.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = Result<Limited<tokio::net::TcpStream>, std::io::Error>> {
    let tcp = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    limit_connections(tcp, CONNECTIONS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_until_a_slot_frees() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<u32, ()>>();
        let mut conns = Box::pin(limit_connections(rx, 2));
        for i in 0..3 {
            tx.unbounded_send(Ok(i)).unwrap();
        }
        let a = conns.next().await.unwrap().unwrap();
        let b = conns.next().await.unwrap().unwrap();
        assert_eq!((a.io, b.io), (0, 1));
        // The third was dropped: with nothing else queued, nothing comes out.
        let nothing = tokio::time::timeout(Duration::from_millis(50), conns.next()).await;
        assert!(nothing.is_err(), "a third connection got a slot");
        // One closes: the next connection is accepted again.
        drop(a);
        tx.unbounded_send(Ok(3)).unwrap();
        assert_eq!(conns.next().await.unwrap().unwrap().io, 3);
        // Accept errors pass through.
        tx.unbounded_send(Err(())).unwrap();
        assert!(conns.next().await.unwrap().is_err());
    }
}
