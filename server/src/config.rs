//! Typed, defaulted configuration of a PS node, validated once at start-up.
//!
//! A node is started either with a bootstrap [`ClusterConfig`] (first start of a new
//! cluster), with `join` (a replacement node that receives its replicas by snapshot), or
//! with nothing but its data dir (restart: everything else was persisted there).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use freshet_model::config::{ModelSection, OptimizerSpec, TableConfig};
use serde::{Deserialize, Serialize};

use crate::error::PsError;
use crate::fsm::validate_spec;
use crate::raft::core::RaftOptions;

/// The node's identity file in its data dir (written at first start).
pub const NODE_META_FILE: &str = "node.json";

/// Shards a cluster may have.
pub const SHARDS_MAX: u32 = 1024;
/// Nodes a cluster may list.
pub const NODES_MAX: usize = 256;

/// One node of the cluster and the address its peers and clients reach it at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddr {
    pub id: u64,
    pub addr: String,
}

/// The shape of a new cluster. Only read on a node's first start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub nodes: Vec<NodeAddr>,
    #[serde(default = "default_shards")]
    pub shards: u32,
    #[serde(default = "default_replication")]
    pub replication: usize,
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// The model gateways and workers run (stored in the meta group); optional for a
    /// cluster used as a plain parameter store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSection>,
    /// Retention of served impressions on each data shard (replicated: written into
    /// every shard's bootstrap state, so all replicas decide alike).
    #[serde(default)]
    pub impressions: ImpressionsConfig,
}

/// How long and how much of the served impressions each data shard keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImpressionsConfig {
    /// Kept for this long of sealed time (the seals' proposal times) after the append.
    pub ttl_ms: u64,
    /// Bytes per shard; beyond it the oldest go first.
    pub bytes_max_per_shard: u64,
}

impl Default for ImpressionsConfig {
    fn default() -> Self {
        let r = crate::fsm::impressions::Retention::default();
        ImpressionsConfig {
            ttl_ms: r.ttl_ms,
            bytes_max_per_shard: r.bytes_max as u64,
        }
    }
}

impl ImpressionsConfig {
    pub fn retention(&self) -> crate::fsm::impressions::Retention {
        crate::fsm::impressions::Retention {
            ttl_ms: self.ttl_ms,
            bytes_max: self.bytes_max_per_shard as usize,
        }
    }
}

fn default_shards() -> u32 {
    4
}
fn default_replication() -> usize {
    3
}

impl ClusterConfig {
    /// # Errors
    /// INVALID_ARGUMENT naming the bad field.
    pub fn validate(&self) -> Result<(), PsError> {
        if self.nodes.is_empty() || self.nodes.len() > NODES_MAX {
            return Err(PsError::invalid(
                "nodes",
                format!("must list 1..={NODES_MAX} nodes"),
            ));
        }
        let mut ids = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.id == 0 || !ids.insert(n.id) {
                return Err(PsError::invalid(
                    format!("nodes[{i}].id"),
                    "must be non-zero and unique",
                ));
            }
            if n.addr.parse::<SocketAddr>().is_err() && !n.addr.contains(':') {
                return Err(PsError::invalid(
                    format!("nodes[{i}].addr"),
                    "must be host:port",
                ));
            }
        }
        if self.shards == 0 || self.shards > SHARDS_MAX {
            return Err(PsError::invalid(
                "shards",
                format!("must be 1..={SHARDS_MAX}"),
            ));
        }
        if self.replication == 0 || self.replication > self.nodes.len() {
            return Err(PsError::invalid(
                "replication",
                format!("must be 1..={} (the number of nodes)", self.nodes.len()),
            ));
        }
        if let Some(m) = &self.model {
            m.validate()?;
        }
        crate::fsm::impressions::Retention::checked(
            self.impressions.ttl_ms,
            self.impressions.bytes_max_per_shard,
        )
        .map_err(|e| PsError::from(e.in_field("impressions")))?;
        let mut names = BTreeSet::new();
        for (i, t) in self.tables.iter().enumerate() {
            validate_spec(&t.to_spec()).map_err(|e| {
                PsError::invalid(
                    format!("tables[{i}].{}", e.field.trim_start_matches("spec.")),
                    e.reason,
                )
            })?;
            if !names.insert(&t.name) {
                return Err(PsError::invalid(
                    format!("tables[{i}].name"),
                    "duplicate table",
                ));
            }
        }
        Ok(())
    }

    /// Every node that holds an initial replica of some shard.
    pub fn placement_all(&self) -> BTreeSet<u64> {
        (0..self.shards)
            .flat_map(|s| self.placement(s))
            .chain(self.meta_placement())
            .collect()
    }

    /// Initial voters of the meta group: every node up to five, an odd number (an even
    /// count adds no fault tolerance and one more vote to wait for).
    pub fn meta_placement(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        let n = ids.len().min(5);
        let n = if n.is_multiple_of(2) { n - 1 } else { n };
        ids.truncate(n.max(1));
        ids
    }

    /// Initial replicas of `shard`: `replication` consecutive nodes (by id order) starting
    /// at `shard mod N`, so shards spread evenly and no node holds two replicas of one.
    pub fn placement(&self, shard: u32) -> Vec<u64> {
        let mut ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        let n = ids.len();
        (0..self.replication)
            .map(|k| ids[(shard as usize + k) % n])
            .collect()
    }
}

/// Everything a PS node needs to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PsConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    /// Address other nodes and clients use; defaults to the bound gRPC address.
    pub advertise: Option<String>,
    /// The cluster's shape. Read on a node's first start only (later starts need only
    /// the data dir); every node of a cluster gets the same one.
    pub cluster: Option<ClusterConfig>,
    /// First start of a replacement node: it creates no initial replicas and hosts only
    /// what AddReplica gives it (by snapshot). Its id must be new to the cluster.
    pub join: bool,
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_interval_entries: u64,
    /// Snapshot also once a group's in-memory log carries this many bytes.
    pub snapshot_log_bytes: u64,
    pub fsync: bool,
    pub wal_segment_bytes_max: u64,
    pub rows_per_call_max: usize,
    pub message_bytes_max: usize,
    pub proposals_pending_max: usize,
    pub rpc_timeout_ms: u64,
    /// Ticks between leader-balancing checks (0 turns balancing off).
    pub leader_balance_ticks: u64,
    /// How often the coordinator seals the frontiers that moved (the seal interval T).
    pub seal_interval_ms: u64,
    /// A worker that reports no frontier for this long is fenced.
    pub lease_ms: u64,
    /// The coordinator seals at least this often even when no frontier moved, so that
    /// expiry, retention and direct pushes act on a cluster whose training is idle
    /// (0: only training, catalog and retention changes, forgets, fences and explicit
    /// requests seal).
    pub idle_seal_ms: u64,
}

impl Default for PsConfig {
    fn default() -> Self {
        PsConfig {
            node_id: 0,
            data_dir: PathBuf::from("data"),
            advertise: None,
            cluster: None,
            join: false,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval_entries: 10_000,
            snapshot_log_bytes: 64 << 20,
            fsync: true,
            wal_segment_bytes_max: 64 << 20,
            rows_per_call_max: 16_384,
            message_bytes_max: 16 << 20,
            proposals_pending_max: 4096,
            rpc_timeout_ms: 5_000,
            leader_balance_ticks: 50,
            seal_interval_ms: 10,
            lease_ms: 3_000,
            idle_seal_ms: 1_000,
        }
    }
}

impl PsConfig {
    /// # Errors
    /// INVALID_ARGUMENT naming the bad field.
    pub fn validate(&self) -> Result<(), PsError> {
        if self.node_id == 0 && !self.data_dir.join(NODE_META_FILE).exists() {
            return Err(PsError::invalid(
                "node_id",
                "must be set (non-zero) on a node's first start",
            ));
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
            let listed = c.nodes.iter().any(|n| n.id == self.node_id);
            if !self.join && self.node_id != 0 && !listed {
                return Err(PsError::invalid(
                    "cluster.nodes",
                    format!("does not list this node's id {}", self.node_id),
                ));
            }
            if self.join && c.placement_all().contains(&self.node_id) {
                return Err(PsError::invalid(
                    "node_id",
                    "a joining node needs an id that never held an initial replica",
                ));
            }
        } else if self.join {
            return Err(PsError::invalid(
                "cluster",
                "a joining node needs the cluster config",
            ));
        }
        if !(1..=10_000).contains(&self.tick_ms) {
            return Err(PsError::invalid("tick_ms", "must be 1..=10000"));
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err(PsError::invalid(
                "election_ticks",
                "must exceed heartbeat_ticks, which must be >= 1",
            ));
        }
        if self.snapshot_log_bytes < 1 << 20 {
            return Err(PsError::invalid("snapshot_log_bytes", "must be >= 1 MiB"));
        }
        if self.snapshot_interval_entries == 0 {
            return Err(PsError::invalid(
                "snapshot_interval_entries",
                "must be >= 1",
            ));
        }
        if !(1..=1_000_000).contains(&self.rows_per_call_max) {
            return Err(PsError::invalid("rows_per_call_max", "must be 1..=1000000"));
        }
        if !(1024..=(1 << 30)).contains(&self.message_bytes_max) {
            return Err(PsError::invalid("message_bytes_max", "must be 1KiB..=1GiB"));
        }
        if self.wal_segment_bytes_max < 4096 {
            return Err(PsError::invalid("wal_segment_bytes_max", "must be >= 4096"));
        }
        if self.proposals_pending_max == 0 {
            return Err(PsError::invalid("proposals_pending_max", "must be >= 1"));
        }
        if self.rpc_timeout_ms == 0 {
            return Err(PsError::invalid("rpc_timeout_ms", "must be >= 1"));
        }
        if !(1..=10_000).contains(&self.seal_interval_ms) {
            return Err(PsError::invalid("seal_interval_ms", "must be 1..=10000"));
        }
        if self.idle_seal_ms != 0
            && !(self.seal_interval_ms..=3_600_000).contains(&self.idle_seal_ms)
        {
            return Err(PsError::invalid(
                "idle_seal_ms",
                "must be 0 (off) or from seal_interval_ms to an hour",
            ));
        }
        if self.lease_ms < 10 * self.seal_interval_ms || self.lease_ms > 3_600_000 {
            return Err(PsError::invalid(
                "lease_ms",
                "must be at least 10 seal intervals and at most an hour",
            ));
        }
        Ok(())
    }

    pub fn raft_options(&self) -> RaftOptions {
        RaftOptions {
            tick_ms: self.tick_ms,
            election_ticks: self.election_ticks,
            heartbeat_ticks: self.heartbeat_ticks,
            snapshot_interval_entries: self.snapshot_interval_entries,
            snapshot_log_bytes: self.snapshot_log_bytes,
            proposals_pending_max: self.proposals_pending_max,
            leader_balance_ticks: self.leader_balance_ticks,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterConfig {
        serde_json::from_str(
            r#"{"nodes":[{"id":1,"addr":"127.0.0.1:1"},{"id":2,"addr":"127.0.0.1:2"},{"id":3,"addr":"127.0.0.1:3"}],
                "shards":4,
                "tables":[{"name":"item","dim":16,"optimizer":{"type":"adagrad","lr":0.05}}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn impression_retention_is_configured_and_checked() {
        let mut c = cluster();
        assert_eq!(c.impressions.ttl_ms, 15 * 60 * 1000);
        c.impressions.ttl_ms = 10;
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("impressions.ttl_ms"), "{e}");
        let c: ClusterConfig = serde_json::from_str(
            r#"{"nodes":[{"id":1,"addr":"127.0.0.1:1"}],"replication":1,
                "impressions":{"ttl_ms":60000,"bytes_max_per_shard":1048576}}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.impressions.retention().bytes_max, 1 << 20);
    }

    #[test]
    fn parses_defaults_and_places_replicas_on_distinct_nodes() {
        let c = cluster();
        c.validate().unwrap();
        assert_eq!(c.replication, 3);
        for s in 0..c.shards {
            let p = c.placement(s);
            assert_eq!(p.len(), 3);
            assert_eq!(p.iter().collect::<BTreeSet<_>>().len(), 3);
        }
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let mut c = cluster();
        c.replication = 4;
        assert!(
            matches!(c.validate(), Err(PsError::InvalidArgument { field, .. }) if field == "replication")
        );
        let mut c = cluster();
        c.tables[0].dim = 0;
        assert!(
            matches!(c.validate(), Err(PsError::InvalidArgument { field, .. }) if field == "tables[0].dim")
        );
        let mut c = cluster();
        c.nodes[1].id = 1;
        assert!(
            matches!(c.validate(), Err(PsError::InvalidArgument { field, .. }) if field == "nodes[1].id")
        );
        assert!(serde_json::from_str::<ClusterConfig>(r#"{"nodes":[],"bogus":1}"#).is_err());
        let mut c = cluster();
        c.model = Some(serde_json::from_str(r#"{"dim":16,"clip":-1}"#).unwrap());
        assert!(
            matches!(c.validate(), Err(PsError::InvalidArgument { field, .. }) if field == "model.clip")
        );
        assert!(serde_json::from_str::<ModelSection>(r#"{"dim":16,"lr":1}"#).is_err());
    }

    #[test]
    fn the_model_section_defaults_and_carries_the_tables() {
        let mut c = cluster();
        c.model = Some(serde_json::from_str(r#"{"dim":16}"#).unwrap());
        c.validate().unwrap();
        let m = c.model.as_ref().unwrap().to_proto(&c.tables);
        assert_eq!(
            (m.dim, m.tower.as_str(), m.numeric_max),
            (16, "residual_tanh", 8)
        );
        assert_eq!(
            (m.clip, m.entropy, m.value_weight, m.reward_weight),
            (10.0, 0.01, 1.0, 1.0)
        );
        assert_eq!(m.policy_weight, Some(0.1));
        assert_eq!(m.tables, vec![c.tables[0].to_spec()]);
    }
}
