//! Failpoints (the `fail` crate) at the design's fault points. They are compiled in only
//! with the `failpoints` feature, which the integration tests turn on; without it every
//! `fail_point!` expands to nothing.
//!
//! A failpoint fires only on nodes whose data dir lies under a scope a test registered
//! with [`enable`]: tests run side by side in one process, each with its own in-process
//! cluster, and the `fail` registry is global.
//!
//! | name | where | what `return` does |
//! |---|---|---|
//! | [`BEFORE_SEAL`] | coordinator, after frontiers are collected | proposes no seal: steps stay acknowledged by the shards and unsealed |
//! | [`BEFORE_SHARD_SEAL`] | a data-shard leader's seal copier | copies no committed meta seal into the shard: the meta log is ahead of the shard |
//! | [`GROUP_TASK`] | a raft group's task, every pass | (`panic`) the task dies: the node turns NOT_SERVING and stops with an error |
//! | [`SNAPSHOT_WRITE`] | a raft group's background snapshot write | the write fails (as on a full disk): the log stays uncompacted and the group tries again later |

/// Between a shard's acknowledgement of a step and the seal that commits it.
pub const BEFORE_SEAL: &str = "coord::before_seal";
/// Between a committed meta seal and the shard seal that applies it.
pub const BEFORE_SHARD_SEAL: &str = "seals::before_shard_seal";
/// At the top of every pass of a raft group's task: `panic` kills the task (as a panic
/// inside raft-rs would); the node must then report NOT_SERVING and stop.
pub const GROUP_TASK: &str = "group::pass";
/// Before a raft group writes a snapshot file: `return` fails the write.
pub const SNAPSHOT_WRITE: &str = "group::snapshot_write";

#[cfg(feature = "failpoints")]
mod scopes {
    use std::path::{Path, PathBuf};

    use parking_lot::Mutex;

    static SCOPES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// Lets failpoints fire on nodes whose data dir is under `scope`.
    pub fn enable(scope: &Path) {
        SCOPES.lock().push(scope.to_path_buf());
    }

    /// Undoes [`enable`].
    pub fn disable(scope: &Path) {
        SCOPES.lock().retain(|s| s != scope);
    }

    /// Whether a node with this data dir is in a registered scope.
    pub fn in_scope(data_dir: &Path) -> bool {
        SCOPES.lock().iter().any(|s| data_dir.starts_with(s))
    }
}

#[cfg(feature = "failpoints")]
pub use scopes::{disable, enable, in_scope};
