//! `freshet.admin.v1`: cluster status, membership changes and leadership transfer
//! (Admin), and this node's own view (NodeStatus).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use freshet_proto::admin::v1::{
    admin_server::Admin, node_status_client::NodeStatusClient, node_status_server::NodeStatus,
    AddReplicaRequest, AddReplicaResponse, ClusterStatusRequest, ClusterStatusResponse, NodeInfo,
    PeerProgress, RemoveReplicaRequest, RemoveReplicaResponse, ReplicaStatus, ShardStatus,
    TransferLeaderRequest, TransferLeaderResponse,
};
use freshet_proto::coord::v1::{ListSealsRequest, ListSealsResponse};
use freshet_proto::META_GROUP;
use raft::eraftpb::ConfChangeType;
use tonic::{Request, Response, Status};

use crate::error::PsError;
use crate::ps::node::Node;
use crate::raft::transport::endpoint;

use super::service::*;

/// `freshet.admin.v1.NodeStatus` (used by the ClusterStatus fan-out).
pub struct NodeStatusService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl NodeStatus for NodeStatusService {
    #[tracing::instrument(skip_all)]
    async fn local_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(
            local_status(&self.node, request.into_inner().with_checksum).await,
        ))
    }
}

/// `freshet.admin.v1.Admin`.
pub struct AdminService {
    pub node: Arc<Node>,
}

impl AdminService {
    fn timeout<T>(&self, req: &Request<T>) -> Duration {
        deadline(
            req,
            Duration::from_millis(self.node.cfg.rpc_timeout_ms.max(10_000)),
        )
    }

    fn check_shard(&self, shard: u32) -> Result<(), PsError> {
        if !self.node.valid_group(shard) {
            return Err(PsError::invalid(
                "shard",
                format!(
                    "must be < {} or {META_GROUP} (the meta group)",
                    self.node.shard_count
                ),
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    #[tracing::instrument(skip(self, request))]
    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let with_checksum = request.into_inner().with_checksum;
        let mine = local_status(&self.node, with_checksum).await;
        let peers: Vec<(u64, String)> = self
            .node
            .address_book()
            .into_iter()
            .filter(|(id, _)| *id != self.node.id)
            .collect();
        let calls = peers.iter().map(|(id, addr)| {
            let addr = addr.clone();
            let id = *id;
            async move {
                let target = addr.clone();
                let fut = async move {
                    let ch = endpoint(&target).ok()?.connect().await.ok()?;
                    let mut c = NodeStatusClient::new(ch);
                    c.local_status(ClusterStatusRequest { with_checksum })
                        .await
                        .ok()
                        .map(|r| r.into_inner())
                };
                (
                    id,
                    addr,
                    tokio::time::timeout(Duration::from_secs(2), fut)
                        .await
                        .ok()
                        .flatten(),
                )
            }
        });
        let answers = futures::future::join_all(calls).await;
        let mut by_shard: BTreeMap<u32, ShardStatus> = BTreeMap::new();
        let mut leader_term: BTreeMap<u32, u64> = BTreeMap::new();
        let mut nodes = mine.nodes.clone();
        let mut merge = |resp: ClusterStatusResponse| {
            for s in resp.shards {
                let e = by_shard.entry(s.shard).or_insert_with(|| ShardStatus {
                    shard: s.shard,
                    ..Default::default()
                });
                for r in &s.replicas {
                    // The leader's own view wins for leader and voters.
                    if r.role == "leader" && r.term >= *leader_term.get(&s.shard).unwrap_or(&0) {
                        leader_term.insert(s.shard, r.term);
                        e.leader_id = r.node_id;
                        e.voters = s.voters.clone();
                        e.progress = s.progress.clone();
                    }
                }
                if e.voters.is_empty() {
                    e.voters = s.voters.clone();
                }
                if e.leader_id == 0 {
                    e.leader_id = s.leader_id;
                }
                // Replicated, so every replica's list is the same or a prefix in time:
                // the union is the newest.
                for m in s.acked_members {
                    if !e.acked_members.contains(&m) {
                        e.acked_members.push(m);
                    }
                }
                e.acked_members.sort_unstable();
                e.replicas.extend(s.replicas);
            }
        };
        merge(mine);
        for (id, addr, answer) in answers {
            nodes.push(NodeInfo {
                id,
                addr,
                reachable: answer.is_some(),
            });
            if let Some(a) = answer {
                merge(a);
            }
        }
        nodes.sort_by_key(|n| n.id);
        let mut meta = by_shard.remove(&META_GROUP);
        if let Some(m) = &mut meta {
            m.replicas.sort_by_key(|r| r.node_id);
        }
        let mut shards: Vec<ShardStatus> = by_shard.into_values().collect();
        for s in &mut shards {
            s.replicas.sort_by_key(|r| r.node_id);
        }
        Ok(Response::new(ClusterStatusResponse {
            node_id: self.node.id,
            shard_count: self.node.shard_count,
            shards,
            nodes,
            meta,
        }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn list_seals(
        &self,
        request: Request<ListSealsRequest>,
    ) -> Result<Response<ListSealsResponse>, Status> {
        const LIMIT_MAX: usize = 10_000;
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        let limit = if r.limit == 0 {
            LIMIT_MAX
        } else {
            (r.limit as usize).min(LIMIT_MAX)
        };
        let g = self.node.read_barrier(META_GROUP, timeout).await?;
        let st = g.state.read();
        Ok(Response::new(ListSealsResponse {
            seals: st.meta.seals_after(r.after_epoch, limit),
            last_sealed_epoch: st.meta.last_sealed,
            base_epoch: st.meta.base_epoch,
            base_cuts: st
                .meta
                .base_cuts
                .iter()
                .map(|(&inc, &step)| freshet_proto::ps::v1::Cut { inc, step })
                .collect(),
        }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let r = request.into_inner();
        self.check_shard(r.shard)?;
        if r.to_node == 0 {
            return Err(PsError::invalid("to_node", "must be non-zero").into());
        }
        self.node.transfer_leader(r.shard, r.to_node).await?;
        Ok(Response::new(TransferLeaderResponse {}))
    }

    #[tracing::instrument(skip(self, request))]
    async fn add_replica(
        &self,
        request: Request<AddReplicaRequest>,
    ) -> Result<Response<AddReplicaResponse>, Status> {
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        self.check_shard(r.shard)?;
        if r.node_id == 0 {
            return Err(PsError::invalid("node_id", "must be non-zero").into());
        }
        if r.addr.is_empty() || !r.addr.contains(':') {
            return Err(PsError::invalid("addr", "must be host:port").into());
        }
        self.node
            .change_membership(
                r.shard,
                ConfChangeType::AddNode,
                r.node_id,
                Some(r.addr),
                timeout,
            )
            .await?;
        Ok(Response::new(AddReplicaResponse {}))
    }

    #[tracing::instrument(skip(self, request))]
    async fn remove_replica(
        &self,
        request: Request<RemoveReplicaRequest>,
    ) -> Result<Response<RemoveReplicaResponse>, Status> {
        let timeout = self.timeout(&request);
        let r = request.into_inner();
        self.check_shard(r.shard)?;
        if r.node_id == 0 {
            return Err(PsError::invalid("node_id", "must be non-zero").into());
        }
        self.node
            .change_membership(
                r.shard,
                ConfChangeType::RemoveNode,
                r.node_id,
                None,
                timeout,
            )
            .await?;
        Ok(Response::new(RemoveReplicaResponse {}))
    }
}

/// Status of every replica hosted here.
pub async fn local_status(node: &Arc<Node>, with_checksum: bool) -> ClusterStatusResponse {
    let mut shards = Vec::new();
    for shard in node.shards() {
        let Some(g) = node.group(shard) else { continue };
        let s = g.status.lock().clone();
        let state = Arc::clone(&g.state);
        // Checksum and applied index are read under one lock: a consistent pair.
        let (applied, rows, checksum, sealed_epoch, imp, tables, acked) =
            tokio::task::spawn_blocking(move || {
                let st = state.read();
                let sum = if with_checksum { st.checksum() } else { 0 };
                let i = &st.impressions;
                let imp = [
                    i.len() as u64,
                    i.bytes() as u64,
                    i.expired,
                    i.evicted,
                    i.retention.ttl_ms,
                    i.retention.bytes_max as u64,
                ];
                let tables = st.table_status();
                let acked: Vec<u64> = st.acked_members.iter().copied().collect();
                (
                    st.applied_index,
                    st.row_count(),
                    sum,
                    st.sealed_epoch(),
                    imp,
                    tables,
                    acked,
                )
            })
            .await
            .unwrap_or((s.applied_index, 0, 0, 0, [0; 6], Vec::new(), Vec::new()));
        shards.push(ShardStatus {
            shard,
            leader_id: s.leader_id,
            voters: s.voters.clone(),
            progress: s
                .progress
                .iter()
                .map(|(node_id, matched_index)| PeerProgress {
                    node_id: *node_id,
                    matched_index: *matched_index,
                })
                .collect(),
            acked_members: acked,
            replicas: vec![ReplicaStatus {
                node_id: node.id,
                role: s.role.to_string(),
                term: s.term,
                commit_index: s.commit_index,
                applied_index: applied,
                row_count: rows,
                checksum,
                snapshot_index: s.snapshot_index,
                first_log_index: s.first_log_index,
                last_log_index: s.last_log_index,
                sealed_epoch,
                impressions: imp[0],
                impression_bytes: imp[1],
                impressions_expired: imp[2],
                impressions_evicted: imp[3],
                impression_ttl_ms: imp[4],
                impression_bytes_max: imp[5],
                tables,
            }],
        });
    }
    ClusterStatusResponse {
        node_id: node.id,
        shard_count: node.shard_count,
        shards,
        nodes: vec![NodeInfo {
            id: node.id,
            addr: node.addr.clone(),
            reachable: true,
        }],
        meta: None,
    }
}
