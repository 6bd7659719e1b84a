//! Prometheus metric names and the /metrics endpoint (its own port).

use std::future::Future;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const RAFT_PROPOSALS_COMMITTED: &str = "freshet_raft_proposals_committed_total";
pub const RAFT_APPLIED: &str = "freshet_raft_applied_total";
pub const RAFT_PENDING: &str = "freshet_raft_proposals_pending";
pub const LEADER_CHANGES: &str = "freshet_raft_leader_changes_seen_total";
pub const HAS_LEADER: &str = "freshet_raft_has_leader";
pub const FSYNC_SECONDS: &str = "freshet_wal_fsync_duration_seconds";
pub const WAL_BYTES: &str = "freshet_wal_written_bytes_total";
pub const PUSH_ROWS: &str = "freshet_ps_push_rows_total";
pub const PULL_ROWS: &str = "freshet_ps_pull_rows_total";
pub const PUSH_SECONDS: &str = "freshet_ps_push_duration_seconds";
pub const PULL_SECONDS: &str = "freshet_ps_pull_duration_seconds";
pub const RPC_ERRORS: &str = "freshet_rpc_errors_total";
pub const SEALED_EPOCH: &str = "freshet_sealed_epoch";
pub const GATEWAY_RANK_SECONDS: &str = "freshet_gateway_rank_duration_seconds";
pub const GATEWAY_EPOCH: &str = "freshet_gateway_epoch";
pub const GATEWAY_EPOCH_LAG: &str = "freshet_gateway_epoch_lag_seconds";
pub const FRESHNESS_SECONDS: &str = "freshet_freshness_seconds";
pub const FEEDBACK_EVENTS: &str = "freshet_gateway_feedback_events_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (several in-process nodes share it).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); then ours only renders empty.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    metrics::describe_counter!(
        RAFT_PROPOSALS_COMMITTED,
        "proposals committed and applied on the leader"
    );
    metrics::describe_counter!(RAFT_APPLIED, "log entries applied to the state machine");
    metrics::describe_gauge!(RAFT_PENDING, "proposals waiting for commit");
    metrics::describe_counter!(LEADER_CHANGES, "leader changes observed per shard");
    metrics::describe_gauge!(HAS_LEADER, "1 when the shard replica knows a leader");
    metrics::describe_histogram!(FSYNC_SECONDS, "duration of one group-commit fdatasync");
    metrics::describe_counter!(PUSH_ROWS, "rows pushed (acknowledged)");
    metrics::describe_counter!(PULL_ROWS, "rows pulled");
    metrics::describe_histogram!(PUSH_SECONDS, "push latency");
    metrics::describe_histogram!(PULL_SECONDS, "pull latency");
    metrics::describe_gauge!(
        SEALED_EPOCH,
        "last epoch committed by the meta group (coordinator)"
    );
    metrics::describe_histogram!(GATEWAY_RANK_SECONDS, "Rank latency on the gateway");
    metrics::describe_gauge!(
        GATEWAY_EPOCH,
        "sealed epoch of the model version the gateway serves"
    );
    metrics::describe_gauge!(
        GATEWAY_EPOCH_LAG,
        "age of the served epoch's seal (now - proposal time)"
    );
    metrics::describe_histogram!(
        FRESHNESS_SECONDS,
        "feedback arrival to the first served version containing its update"
    );
    metrics::describe_counter!(FEEDBACK_EVENTS, "feedback events acknowledged");
}

/// Serves `GET /metrics` (and `/`) in the Prometheus text format until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let handle = install();
    tokio::pin!(shutdown);
    loop {
        let (mut sock, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let body = handle.render();
        tokio::spawn(async move {
            // Requests are tiny; read the head (bounded) and answer once.
            let mut buf = [0u8; 4096];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let head = String::from_utf8_lossy(&buf[..n]);
            let ok = head.starts_with("GET /metrics") || head.starts_with("GET / ");
            let resp = if ok {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                    body.len(),
                    body
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_prometheus_text_with_our_names() {
        super::install();
        metrics::counter!(super::PUSH_ROWS).increment(3);
        metrics::histogram!(super::FSYNC_SECONDS).record(0.001);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(super::serve(l, async {
            let _ = rx.await;
        }));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("freshet_ps_push_rows_total"), "{body}");
        assert!(
            body.contains("freshet_wal_fsync_duration_seconds"),
            "{body}"
        );
        let _ = tx.send(());
        task.await.unwrap();
    }
}
