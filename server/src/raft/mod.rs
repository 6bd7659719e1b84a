//! Raft, with nothing about epochs: one group's I/O-free core ([`core`]) and the task
//! that owns it ([`group`]), the node-wide group-commit log ([`wal`]), raft-rs storage and snapshot
//! files ([`storage`]), and the peer transport ([`transport`]).

pub mod core;
pub mod group;
pub mod storage;
pub mod transport;
pub mod wal;

use crate::error::PsError;

/// What a group replicates, as Raft sees it: a deterministic machine that applies
/// committed entries in log order, snapshots itself and is restored from a snapshot.
/// Raft knows nothing else of it (no epochs, no tables): the parameter server's shard
/// and meta state ([`crate::fsm::ShardState`]) is the one implementation.
pub trait StateMachine: Clone + Send + Sync + 'static {
    /// A proposal; carries the id that matches its outcome to the caller on apply.
    type Command: Send + 'static;
    /// What applying one command did, for its proposer.
    type Outcome: Clone + std::fmt::Debug + PartialEq + Send + 'static;
    /// What applying entries publishes to readers besides outcomes, in log order.
    type Effect: Clone + std::fmt::Debug + PartialEq + Send + 'static;
    /// Where published effects go; the layer above reads them from the group's handle.
    type Feed: Feed<Self::Effect>;

    /// The entry bytes of `cmd`, stamped with `proposal_id`.
    fn encode_command(cmd: &mut Self::Command, proposal_id: u64) -> Vec<u8>;
    /// Applies one committed, non-empty normal entry at `index`; returns the proposal id
    /// it carried (0: none) and its outcome. Bytes that do not decode are rejected, the
    /// same way on every replica: never a panic.
    fn apply_entry(&mut self, data: &[u8], index: u64, term: u64) -> (u64, Self::Outcome);
    /// Moves the applied position over an entry that carries no command.
    fn advance(&mut self, index: u64, term: u64);
    /// (index, term) of the last applied entry.
    fn applied(&self) -> (u64, u64);
    /// Effects of the entries applied since the last call.
    fn take_effects(&mut self) -> Vec<Self::Effect>;
    /// Whether applied entries ask for a snapshot now (e.g. removed data that the files
    /// on disk must stop holding), whatever the usual interval; taking it clears it.
    fn take_snapshot_request(&mut self) -> bool {
        false
    }
    /// Whether [`StateMachine::take_snapshot_request`] would be true (cheap, read-only).
    fn snapshot_requested(&self) -> bool {
        false
    }
    /// The state as of now, for a snapshot written off the owner's task: cheap to take
    /// (it may share storage with the live state, copy-on-write), it does not change as
    /// the state goes on applying.
    type Frozen: Send + 'static;
    fn freeze(&self) -> Self::Frozen;
    /// Streams the snapshot bytes of a frozen state to `out` (deterministic: equal
    /// states, equal bytes), so a snapshot is never a second copy of the state in memory.
    ///
    /// # Errors
    /// `out`'s errors.
    fn write_frozen(frozen: &Self::Frozen, out: &mut dyn std::io::Write) -> std::io::Result<()>;
    /// Snapshot bytes of the whole state, in memory.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Self::write_frozen(&self.freeze(), &mut out).expect("writing to a Vec cannot fail");
        out
    }
    /// The state of `group` from snapshot bytes taken at (`index`, `term`).
    ///
    /// # Errors
    /// The bytes do not decode.
    fn restore(group: u32, data: &[u8], index: u64, term: u64) -> Result<Self, PsError>;
}

/// Where a group publishes its state machine's effects.
pub trait Feed<E>: Send + Sync + 'static {
    fn publish(&self, effects: Vec<E>);
}
