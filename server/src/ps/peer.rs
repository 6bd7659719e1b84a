//! `freshet.raft.v1.RaftTransport`: Raft messages and snapshots from peer nodes, as opaque
//! bytes (tonic and raft-rs use different prost versions).

use std::sync::Arc;

use freshet_proto::raft::v1::{
    raft_transport_server::RaftTransport, RaftBatch, SendAck, SnapshotChunk,
};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::error::PsError;
use crate::ps::node::Node;
use crate::raft::transport::SNAPSHOT_BYTES_MAX;

/// `freshet.raft.v1.RaftTransport`: the receiving end of [`crate::raft::transport::GrpcTransport`].
pub struct RaftService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    #[tracing::instrument(skip_all)]
    async fn send(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<SendAck>, Status> {
        let mut stream = request.into_inner();
        // A node that stops ends its peers' streams, so they reconnect to whatever serves
        // the address next (a restarted node) instead of writing into a dead one.
        let mut stopping = self.node.shutdown_watch();
        loop {
            let batch = tokio::select! {
                b = stream.message() => match b? {
                    Some(b) => b,
                    None => break,
                },
                _ = stopping.wait_for(|s| *s) => {
                    return Err(PsError::ShuttingDown.into());
                }
            };
            for env in batch.messages {
                let Ok(shard) = u32::try_from(env.group) else {
                    continue;
                };
                match Message::parse_from_bytes(&env.message) {
                    Ok(m) => self.node.on_raft_message(shard, m),
                    Err(e) => {
                        tracing::warn!(from = batch.from_node, error = %e, "bad raft message")
                    }
                }
            }
        }
        Ok(Response::new(SendAck {}))
    }

    #[tracing::instrument(skip_all)]
    async fn send_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SendAck>, Status> {
        let mut stream = request.into_inner();
        let mut header: Option<Message> = None;
        let mut shard = 0u32;
        let mut data: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.message().await? {
            if header.is_none() {
                let m = Message::parse_from_bytes(&chunk.header)
                    .map_err(|e| PsError::invalid("header", e.to_string()))?;
                shard = u32::try_from(chunk.group)
                    .map_err(|_| PsError::invalid("group", "out of range"))?;
                header = Some(m);
            }
            if data.len() + chunk.data.len() > SNAPSHOT_BYTES_MAX {
                return Err(PsError::invalid("data", "snapshot exceeds the size limit").into());
            }
            data.extend_from_slice(&chunk.data);
            if chunk.last {
                let mut m = header.take().expect("set above");
                m.mut_snapshot().data = data.into();
                tracing::info!(
                    shard,
                    from = m.from,
                    index = m.get_snapshot().get_metadata().index,
                    "snapshot received"
                );
                self.node.on_raft_message(shard, m);
                return Ok(Response::new(SendAck {}));
            }
        }
        Err(PsError::invalid("last", "stream ended before the last chunk").into())
    }
}
