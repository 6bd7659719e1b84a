//! The I/O-free core of one Raft group (one shard replica).
//!
//! [`GroupCore`] wraps the raft-rs `RawNode` and the group's [`StateMachine`]. It never touches
//! a file or a socket: Ready handling is split in two phases so the caller can make the
//! log durable in between ([`GroupCore::begin_ready`] returns what must be persisted,
//! [`GroupCore::finish_ready`] continues once it is). Messages to peers collect in an
//! outbox and results in an event list. Unit tests drive three cores by hand.
//!
//! The task that owns a core is [`crate::raft::group`].

use std::sync::Arc;

use parking_lot::RwLock;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot, SnapshotMetadata,
};
use raft::{RawNode, Ready, SnapshotStatus, StateRole};

use crate::error::PsError;
use crate::raft::storage::GroupStorage;
use crate::raft::wal::GroupWrite;
use crate::raft::StateMachine;

/// Raft timing and flow-control knobs of a group.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub max_size_per_msg_bytes: u64,
    pub max_inflight_msgs: usize,
    /// Take a snapshot (and compact the log) after this many applied entries...
    pub snapshot_interval_entries: u64,
    /// ...or once the entries in memory carry this many bytes, whichever comes first.
    pub snapshot_log_bytes: u64,
    pub proposals_pending_max: usize,
    pub read_timeout_ms: u64,
    /// Every this many ticks a leader hands leadership to the shard's preferred replica
    /// when that one is caught up, so leaders spread over nodes (0 = never).
    pub leader_balance_ticks: u64,
}

impl Default for RaftOptions {
    fn default() -> Self {
        RaftOptions {
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_size_per_msg_bytes: 4 << 20,
            max_inflight_msgs: 256,
            snapshot_interval_entries: 10_000,
            snapshot_log_bytes: 64 << 20,
            proposals_pending_max: 4096,
            read_timeout_ms: 5_000,
            leader_balance_ticks: 50,
        }
    }
}

/// What happened inside the core, for the owner to act on: `O` is the state machine's
/// outcome, `E` its effect ([`StateMachine`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Event<O, E> {
    Applied {
        proposal_id: u64,
        outcome: O,
        index: u64,
    },
    ConfApplied {
        proposal_id: u64,
        result: Result<(), String>,
    },
    /// A ReadIndex request was confirmed: serve once applied ≥ index.
    ReadReady {
        ctx: u64,
        index: u64,
    },
    RoleChanged {
        leader_id: u64,
        is_leader: bool,
    },
    /// A peer joined with its address (carried in the conf change context).
    PeerAdded {
        node_id: u64,
        addr: String,
    },
    /// This replica was removed from the group.
    Removed,
    /// What the entries applied in one pass published, in log order.
    Effects(Vec<E>),
}

/// Work of phase one of a Ready, to be made durable before phase two.
pub struct ReadyWork {
    ready: Ready,
    pub write: GroupWrite,
    /// A snapshot received from the leader, to be written to a file.
    pub snapshot: Option<Snapshot>,
    persisted_messages: Vec<Message>,
}

/// Raft-rs logs through slog; forward to tracing (raft-rs "info" is chatty: debug here).
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, record: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}", record.msg())
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}", record.msg()),
            slog::Level::Info => tracing::debug!(target: "raft", "{}", record.msg()),
            _ => tracing::trace!(target: "raft", "{}", record.msg()),
        }
        Ok(())
    }
}

/// A raft-rs logger that forwards to tracing.
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

/// The I/O-free core of one group.
pub struct GroupCore<S: StateMachine> {
    pub shard: u32,
    pub node_id: u64,
    raw: RawNode<GroupStorage>,
    state: Arc<RwLock<S>>,
    conf_state: ConfState,
    leader_id: u64,
    is_leader: bool,
    outbox: Vec<Message>,
    events: Vec<Event<S::Outcome, S::Effect>>,
    removed: bool,
}

impl<S: StateMachine> GroupCore<S> {
    /// Builds the core over recovered storage and state. The state's applied index must equal
    /// the storage's snapshot index (the state was restored from that snapshot).
    ///
    /// # Errors
    /// raft-rs configuration errors.
    pub fn new(
        opts: &RaftOptions,
        node_id: u64,
        shard: u32,
        storage: GroupStorage,
        state: Arc<RwLock<S>>,
    ) -> Result<Self, PsError> {
        let (applied, _) = state.read().applied();
        let cfg = raft::Config {
            id: node_id,
            election_tick: opts.election_ticks,
            heartbeat_tick: opts.heartbeat_ticks,
            applied,
            max_size_per_msg: opts.max_size_per_msg_bytes,
            max_inflight_msgs: opts.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        cfg.validate()?;
        let conf_state = storage.conf_state().clone();
        let raw = RawNode::new(&cfg, storage, &raft_logger())?;
        Ok(GroupCore {
            shard,
            node_id,
            raw,
            state,
            conf_state,
            leader_id: 0,
            is_leader: false,
            outbox: Vec::new(),
            events: Vec::new(),
            removed: false,
        })
    }

    pub fn state(&self) -> &Arc<RwLock<S>> {
        &self.state
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn role(&self) -> &'static str {
        match self.raw.raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        }
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn applied_index(&self) -> u64 {
        self.raw.raft.raft_log.applied
    }

    pub fn storage(&self) -> &GroupStorage {
        self.raw.store()
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.conf_state.voters.clone();
        v.sort_unstable();
        v
    }

    /// (member, matched index) as this replica's leader view knows it; empty unless leader.
    pub fn progress(&self) -> Vec<(u64, u64)> {
        if !self.is_leader() {
            return Vec::new();
        }
        let mut v: Vec<(u64, u64)> = self
            .raw
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| (*id, pr.matched))
            .collect();
        v.sort_unstable();
        v
    }

    /// The replica that should lead this shard (voters in id order, rotated by shard
    /// number), when this replica leads instead and the preferred one is active and has
    /// the whole log, so a transfer costs no catch-up.
    pub fn preferred_leader_ready(&self) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        let voters = self.voters();
        if voters.is_empty() {
            return None;
        }
        let preferred = voters[self.shard as usize % voters.len()];
        if preferred == self.node_id {
            return None;
        }
        let pr = self.raw.raft.prs().get(preferred)?;
        (pr.recent_active && pr.matched >= self.raw.raft.raft_log.last_index()).then_some(preferred)
    }

    pub fn removed(&self) -> bool {
        self.removed
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Feeds a message from a peer.
    ///
    /// # Errors
    /// raft-rs rejects messages for the wrong group member or of a local type.
    pub fn step(&mut self, m: Message) -> Result<(), PsError> {
        if raft::raw_node::is_local_msg(m.get_msg_type()) {
            return Err(PsError::Raft("local message from the network".into()));
        }
        match self.raw.step(m) {
            Ok(()) | Err(raft::Error::StepPeerNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn not_leader(&self) -> PsError {
        PsError::NotLeader {
            shard: self.shard,
            leader_id: self.leader_id(),
            leader_addr: None,
        }
    }

    /// Proposes a command; `proposal_id` matches it to its caller on apply.
    ///
    /// # Errors
    /// NotLeader when this replica does not lead the group.
    pub fn propose(&mut self, cmd: &mut S::Command, proposal_id: u64) -> Result<(), PsError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.raw
            .propose(vec![], S::encode_command(cmd, proposal_id))
            .map_err(|_| self.not_leader())
    }

    /// Proposes a membership change; `cc.id` matches it to its caller.
    ///
    /// # Errors
    /// NotLeader, or FAILED_PRECONDITION while another change is pending.
    pub fn propose_conf_change(&mut self, cc: ConfChange) -> Result<(), PsError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if self.raw.raft.has_pending_conf() {
            return Err(PsError::FailedPrecondition(
                "another membership change is in progress".into(),
            ));
        }
        self.raw
            .propose_conf_change(vec![], cc)
            .map_err(|e| PsError::FailedPrecondition(e.to_string()))
    }

    /// Starts a ReadIndex round; [`Event::ReadReady`] with the same ctx follows.
    pub fn read_index(&mut self, ctx: u64) {
        self.raw.read_index(ctx.to_le_bytes().to_vec());
    }

    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    pub fn report_snapshot(&mut self, to: u64, ok: bool) {
        let status = if ok {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    pub fn take_outbox(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    pub fn take_events(&mut self) -> Vec<Event<S::Outcome, S::Effect>> {
        std::mem::take(&mut self.events)
    }

    /// Phase one of the documented Ready order: messages a leader may send before its
    /// own append, snapshot install, committed entries, then the entries and hard state
    /// to persist (returned). Nothing here blocks.
    ///
    /// # Errors
    /// A snapshot from the leader that does not decode.
    pub fn begin_ready(&mut self) -> Result<Option<ReadyWork>, PsError> {
        if !self.raw.has_ready() {
            return Ok(None);
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            let is_leader = ss.raft_state == StateRole::Leader;
            if ss.leader_id != self.leader_id || is_leader != self.is_leader {
                self.leader_id = ss.leader_id;
                self.is_leader = is_leader;
                self.events.push(Event::RoleChanged {
                    leader_id: ss.leader_id,
                    is_leader,
                });
            }
        }
        self.outbox.extend(rd.take_messages());
        let mut write = GroupWrite {
            group: u64::from(self.shard),
            ..Default::default()
        };
        let mut snapshot = None;
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let meta = snap.get_metadata().clone();
            *self.state.write() = S::restore(self.shard, &snap.data, meta.index, meta.term)?;
            self.conf_state = meta.get_conf_state().clone();
            self.raw.mut_store().apply_snapshot(meta);
            write.clear = true;
            snapshot = Some(snap);
        }
        for rs in rd.take_read_states() {
            let mut ctx = [0u8; 8];
            let n = rs.request_ctx.len().min(8);
            ctx[..n].copy_from_slice(&rs.request_ctx[..n]);
            self.events.push(Event::ReadReady {
                ctx: u64::from_le_bytes(ctx),
                index: rs.index,
            });
        }
        let committed = rd.take_committed_entries();
        self.apply_committed(committed);
        let entries = rd.take_entries();
        if !entries.is_empty() {
            self.raw.mut_store().append(&entries);
            write.entries = entries;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs.clone());
            write.hard_state = Some(hs.clone());
        }
        let persisted_messages = rd.take_persisted_messages();
        Ok(Some(ReadyWork {
            ready: rd,
            write,
            snapshot,
            persisted_messages,
        }))
    }

    /// Phase two, once `work.write` (and its snapshot) are durable.
    pub fn finish_ready(&mut self, work: ReadyWork) {
        self.outbox.extend(work.persisted_messages);
        let mut light = self.raw.advance(work.ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        self.outbox.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_committed(committed);
        self.raw.advance_apply();
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let state = Arc::clone(&self.state);
        let mut st = state.write();
        for e in entries {
            // Every replica applies the same log with no gap and no repeat, or the
            // replicas' states silently diverge.
            let (applied, _) = st.applied();
            assert_eq!(
                e.index,
                applied + 1,
                "shard {}: committed entry {} after applied {}",
                self.shard,
                e.index,
                applied
            );
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        // The empty entry a new leader appends.
                        st.advance(e.index, e.term);
                        continue;
                    }
                    let (proposal_id, outcome) = st.apply_entry(&e.data, e.index, e.term);
                    metrics::counter!(crate::metrics::RAFT_APPLIED).increment(1);
                    if proposal_id != 0 {
                        self.events.push(Event::Applied {
                            proposal_id,
                            outcome,
                            index: e.index,
                        });
                    }
                }
                EntryType::EntryConfChange => {
                    st.advance(e.index, e.term);
                    let cc = match ConfChange::parse_from_bytes(&e.data) {
                        Ok(cc) => cc,
                        Err(err) => {
                            tracing::error!(shard = self.shard, error = %err, "undecodable conf change");
                            continue;
                        }
                    };
                    let result = match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => {
                            self.conf_state = cs;
                            if cc.get_change_type() == ConfChangeType::AddNode
                                && !cc.context.is_empty()
                            {
                                if let Ok(addr) = std::str::from_utf8(&cc.context) {
                                    self.events.push(Event::PeerAdded {
                                        node_id: cc.node_id,
                                        addr: addr.to_string(),
                                    });
                                }
                            }
                            if cc.get_change_type() == ConfChangeType::RemoveNode
                                && cc.node_id == self.node_id
                            {
                                self.removed = true;
                                self.events.push(Event::Removed);
                            }
                            Ok(())
                        }
                        Err(err) => Err(err.to_string()),
                    };
                    tracing::info!(shard = self.shard, change = ?cc.get_change_type(), node = cc.node_id, ?result, "conf change applied");
                    if cc.id != 0 {
                        self.events.push(Event::ConfApplied {
                            proposal_id: cc.id,
                            result,
                        });
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    // Never proposed by Freshet; skip deterministically.
                    st.advance(e.index, e.term);
                }
            }
        }
        let effects = st.take_effects();
        if !effects.is_empty() {
            self.events.push(Event::Effects(effects));
        }
    }

    /// Metadata for a snapshot of the current applied state.
    pub fn snapshot_meta(&self) -> SnapshotMetadata {
        let (index, term) = self.state.read().applied();
        let mut meta = SnapshotMetadata::default();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        meta
    }

    /// A local snapshot at `meta.index` is durable: serve it and compact the log to it.
    pub fn snapshot_written(&mut self, meta: SnapshotMetadata) {
        let index = meta.index;
        let store = self.raw.mut_store();
        store.set_latest_snapshot(meta);
        store.compact(index);
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
