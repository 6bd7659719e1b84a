//! The replicated state machines (data shards and the meta group): embedding tables,
//! dense tensors, per-row optimizer state, exactly-once client sessions, and the epoch
//! bookkeeping of the frontier-cut protocol ([`epoch`]).
//!
//! Everything here is deterministic: the same log applied in the same order gives the
//! same bits on every replica. Rows live in chunks per table (value and optimizer slots
//! side by side, [`rows`]) shared copy-on-write, so a background snapshot
//! ([`ShardState::freeze`]) shares them instead of copying the state. Snapshots and
//! checksums visit ids in sorted order because hash-map and slot order differ between
//! replicas.
//!
//! - [`shard`]: [`ShardState`] and `apply`; [`codec`]: snapshot codec and checksum.
//!   `ShardState` is what Raft replicates ([`crate::raft::StateMachine`]): one type for
//!   data shards and the meta group (the group id decides which commands apply), so the
//!   meta group keeps the same snapshot, checksum and session machinery.
//! - [`optimizer`], [`table`], [`session`]: the parts a shard holds.
//! - [`epoch`]: the meta registry and seals, buffered steps in data shards.

pub mod changes;
pub mod codec;
pub mod epoch;
pub mod forget;
pub mod impressions;
pub mod optimizer;
pub mod rows;
pub mod session;
pub mod shard;
pub mod table;
#[cfg(test)]
mod tests;

pub use epoch::MetaOutcome;
pub use freshet_proto::FieldError;
pub use optimizer::{check_optimizer_update, validate_spec, Optimizer};
pub use session::Session;
pub use shard::ShardState;
pub use table::{init_value, name_hash, Table};

/// Largest row width (floats) a table may declare.
pub const DIM_MAX: u32 = 4096;
/// Largest dense tensor (floats).
pub const DENSE_LEN_MAX: u32 = 1 << 22;
/// Table names are short identifiers.
pub const TABLE_NAME_BYTES_MAX: usize = 128;
/// Tables per cluster.
pub const TABLES_MAX: usize = 256;
/// Rows one table may hold on one shard (bounds memory; row slots are u32).
pub const ROWS_PER_TABLE_MAX: usize = 100_000_000;
/// A client may run this many pushes ahead of its oldest unapplied one (per shard).
pub const SESSION_WINDOW: u64 = 1 << 16;
/// Sessions kept per shard; beyond it the least recently used one is forgotten.
pub const SESSIONS_MAX: usize = 100_000;

/// What applying one command did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied,
    /// Already applied under the same (client_id, seq); nothing changed.
    Duplicate,
    /// CreateTable: false when an identical table existed. UpdateTable: whether the
    /// optimizer changed.
    TableCreated(bool),
    /// Rejected deterministically on every replica; nothing changed.
    Rejected(Rejection),
    /// Meta group commands.
    Meta(MetaOutcome),
    /// AppendImpressions: how many were new.
    Appended(u32),
    /// AssignEvents: per event, where it trains.
    Assigned(Vec<freshet_proto::ps::v1::EventAssignResult>),
}

/// Why a state machine refused a command. Decided from the log alone, so identically on
/// every replica, and nothing changed. [`crate::error::PsError`] maps it to a gRPC code,
/// in one place.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// A field of the command breaks a rule (the services check the same rules before
    /// proposing, so this reaches a caller only through a client that skipped them).
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// A direct push's seq is too far ahead of its client's applied floor.
    #[error("seq {seq} is more than {window} ahead of the client's applied floor {floor}")]
    SeqAhead { seq: u64, window: u64, floor: u64 },
    /// CreateTable of a name that exists with another spec.
    #[error("table {0:?} already exists with a different spec")]
    TableExists(String),
    #[error("at most {TABLES_MAX} tables")]
    TooManyTables,
    /// UpdateTable of a table that does not exist.
    #[error("no table {0:?}")]
    NoTable(String),
    /// UpdateTable changing what a running table cannot change (field under `spec`).
    #[error("spec.{}: {}", .0.field, .0.reason)]
    Fixed(FieldError),
    /// A step of a fenced incarnation.
    #[error("incarnation {0} is fenced")]
    Fenced(u64),
    /// A bound on stored or buffered state was reached; retry once seals drain it.
    #[error("{0}")]
    Full(String),
    /// The command belongs to the other kind of group (data shard or meta group).
    #[error("{0} go to data shards")]
    MetaGroup(&'static str),
    /// A seal that does not follow the shard's last sealed epoch.
    #[error("seal {first}..={last} does not follow epoch {sealed}")]
    SealGap { first: u64, last: u64, sealed: u64 },
    /// An entry without an operation, or one that does not decode.
    #[error("{0}")]
    Malformed(String),
}
