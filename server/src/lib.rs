//! freshet-server: the Freshet parameter-server node (role `ps`).
//!
//! Three layers, each using only the ones below it:
//! - [`raft`]: one Raft group's I/O-free core and the task that owns it ([`raft::group`]),
//!   the node-wide group-commit WAL, Raft storage and snapshot files, the peer transport.
//!   Nothing here knows about epochs: the layer above plugs its leader duties in through
//!   [`raft::group::GroupEnv`].
//! - [`fsm`]: the deterministic state machines (tables, optimizers, sessions, the epoch
//!   bookkeeping of data shards and of the meta group), their codec and checksum.
//! - [`ps`]: the role: [`ps::run`], the node hosting many groups (multi-raft), the
//!   coordinator run by the meta leader, seal copying, change-set streams, gRPC services.
//!
//! Beside them: [`config`] (typed, validated once), [`error`] (typed errors and their one
//! mapping to gRPC codes), [`metrics`] (Prometheus names), [`failpoints`] (fault points
//! for tests).

// rust-protobuf messages (raft-rs) have private cached-size fields, so they cannot be
// built with struct literals; setting fields after `default()` is the only way.
#![allow(clippy::field_reassign_with_default)]

pub mod config;
pub mod error;
pub mod failpoints;
pub mod fsm;
pub mod metrics;
pub mod ps;
pub mod raft;
