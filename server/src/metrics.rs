//! Prometheus metric names of the PS role (the recorder and the /metrics
//! endpoint are [`freshet_runtime::metrics`]).

use std::sync::Once;

use metrics_exporter_prometheus::PrometheusHandle;

pub const RAFT_PROPOSALS_COMMITTED: &str = "freshet_raft_proposals_committed_total";
pub const RAFT_APPLIED: &str = "freshet_raft_applied_total";
pub const RAFT_PENDING: &str = "freshet_raft_proposals_pending";
pub const LEADER_CHANGES: &str = "freshet_raft_leader_changes_seen_total";
pub const RAFT_DROPPED: &str = "freshet_raft_messages_dropped_total";
pub const RAFT_QUEUED_BYTES: &str = "freshet_raft_peer_queued_bytes";
pub const HAS_LEADER: &str = "freshet_raft_has_leader";
pub const FSYNC_SECONDS: &str = "freshet_wal_fsync_duration_seconds";
pub const WAL_BYTES: &str = "freshet_wal_written_bytes_total";
pub const PUSH_ROWS: &str = "freshet_ps_push_rows_total";
pub const IMPRESSIONS_EXPIRED: &str = "freshet_ps_impressions_expired_total";
pub const IMPRESSIONS_EVICTED: &str = "freshet_ps_impressions_evicted_total";
pub const IMPRESSIONS_APPENDED: &str = "freshet_ps_impressions_appended_total";
pub const ROWS_EXPIRED: &str = "freshet_ps_rows_expired_total";
pub const ROWS_EVICTED: &str = "freshet_ps_rows_evicted_total";
pub const ROWS_ADMITTED: &str = "freshet_ps_rows_admitted_total";
pub const GRADIENTS_DROPPED: &str = "freshet_ps_gradients_dropped_total";
pub const SNAPSHOT_COPIES: &str = "freshet_ps_snapshot_chunk_copies_total";
pub const PULL_ROWS: &str = "freshet_ps_pull_rows_total";
pub const PUSH_SECONDS: &str = "freshet_ps_push_duration_seconds";
pub const PULL_SECONDS: &str = "freshet_ps_pull_duration_seconds";
pub const RPC_ERRORS: &str = "freshet_rpc_errors_total";
pub const SEALED_EPOCH: &str = "freshet_sealed_epoch";

static DESCRIBED: Once = Once::new();

/// Installs the process-wide recorder ([`freshet_runtime::metrics::install`]) and
/// describes the PS metrics once.
pub fn install() -> &'static PrometheusHandle {
    let handle = freshet_runtime::metrics::install();
    DESCRIBED.call_once(describe);
    handle
}

fn describe() {
    metrics::describe_counter!(
        IMPRESSIONS_EXPIRED,
        "impressions removed by their TTL in sealed time (on every replica)"
    );
    metrics::describe_counter!(
        IMPRESSIONS_EVICTED,
        "impressions removed, oldest first, beyond the per-shard byte bound"
    );
    metrics::describe_counter!(IMPRESSIONS_APPENDED, "impressions stored (leader calls)");
    metrics::describe_counter!(
        ROWS_EXPIRED,
        "rows removed by their table's ttl_ms in sealed time (per table, on every replica)"
    );
    metrics::describe_counter!(
        ROWS_EVICTED,
        "rows removed, least recently updated first, beyond their table's rows_max"
    );
    metrics::describe_counter!(
        ROWS_ADMITTED,
        "rows created at their admit_after-th gradient in the admission window"
    );
    metrics::describe_counter!(
        GRADIENTS_DROPPED,
        "gradients dropped because their id was not admitted yet"
    );
    metrics::describe_counter!(
        SNAPSHOT_COPIES,
        "row chunks (about 16 KiB of values each) copied because a snapshot being written held them (per node; per table and replica in ClusterStatus)"
    );
    metrics::describe_counter!(
        RAFT_PROPOSALS_COMMITTED,
        "proposals committed and applied on the leader"
    );
    metrics::describe_counter!(RAFT_APPLIED, "log entries applied to the state machine");
    metrics::describe_gauge!(RAFT_PENDING, "proposals waiting for commit");
    metrics::describe_counter!(LEADER_CHANGES, "leader changes observed per shard");
    metrics::describe_counter!(
        RAFT_DROPPED,
        "Raft messages to a peer dropped over its queue's bounds (8,192 messages, 64 MiB of entries, 8 batches in flight); Raft retransmits"
    );
    metrics::describe_gauge!(
        RAFT_QUEUED_BYTES,
        "bytes of Raft entries queued for a peer, per peer node id"
    );
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
}

pub use freshet_runtime::metrics::serve;

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
