//! Raft, with nothing about epochs: one group's I/O-free core ([`core`]) and the task
//! that owns it ([`group`]), the node-wide group-commit log ([`wal`]), raft-rs storage and snapshot
//! files ([`storage`]), and the peer transport ([`transport`]).

pub mod core;
pub mod group;
pub mod storage;
pub mod transport;
pub mod wal;
