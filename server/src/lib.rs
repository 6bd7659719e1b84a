//! freshet-server: the Freshet parameter-server node (role `ps`).
//!
//! - [`ps::run`]: the role as a library function (`main` and tests call the same one).
//! - [`node`]: a node hosting many shard replicas (multi-raft), one owner task per group.
//! - [`group`]: the I/O-free Raft core of one shard and the task that owns it.
//! - [`state`]: the deterministic state machine (tables, optimizers, sessions, checksum).
//! - [`epoch`]: frontier-cut bookkeeping (registry and seals in the meta group, buffered
//!   steps in data shards); [`coord`]: the coordinator run by the meta leader.
//! - [`wal`] and [`storage`]: the node-wide group-commit log, Raft storage, snapshot files.
//! - [`transport`]: peer transport trait, gRPC implementation, fault injection.
//! - [`service`]: gRPC adapters; [`error`]: typed errors and their one mapping to codes.
//! - [`config`]: typed, validated configuration; [`metrics`]: Prometheus names and endpoint.

// rust-protobuf messages (raft-rs) have private cached-size fields, so they cannot be
// built with struct literals; setting fields after `default()` is the only way.
#![allow(clippy::field_reassign_with_default)]

pub mod changes;
pub mod config;
pub mod coord;
pub mod epoch;
pub mod error;
pub mod group;
pub mod metrics;
pub mod node;
pub mod ps;
pub mod service;
pub mod state;
pub mod storage;
pub mod subscribe;
pub mod transport;
pub mod wal;
