//! One Raft group (one shard replica): an I/O-free core and the task that owns it.
//!
//! [`GroupCore`] wraps the raft-rs `RawNode` and the shard state machine. It never touches
//! a file or a socket: Ready handling is split in two phases so the caller can make the
//! log durable in between ([`GroupCore::begin_ready`] returns what must be persisted,
//! [`GroupCore::finish_ready`] continues once it is). Messages to peers collect in an
//! outbox and results in an event list. Unit tests drive three cores by hand.
//!
//! [`run_group`] is the owner task used by a node: it feeds the core from a bounded
//! mailbox, persists through the node's WAL (group commit), sends through the
//! [`crate::transport::Transport`], and answers callers through oneshot channels,
//! matching proposals by an id carried in the entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::command::v1::{command::Op, Command, ShardSeal};
use freshet_proto::ps::v1::ChangeSet;
use freshet_proto::META_GROUP;
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
    SnapshotMetadata,
};
use raft::{RawNode, Ready, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};

use crate::changes::ChangeLog;
use crate::epoch::SHARD_SEAL_BATCH;
use crate::error::PsError;
use crate::state::{Outcome, ShardState};
use crate::storage::{write_snapshot_file, GroupStorage};
use crate::wal::{GroupWrite, Wal};

/// Raft timing and flow-control knobs of a group.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub max_size_per_msg_bytes: u64,
    pub max_inflight_msgs: usize,
    /// Take a snapshot (and compact the log) after this many applied entries.
    pub snapshot_interval_entries: u64,
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
            proposals_pending_max: 4096,
            read_timeout_ms: 5_000,
            leader_balance_ticks: 50,
        }
    }
}

/// What happened inside the core, for the owner to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Applied {
        proposal_id: u64,
        outcome: Outcome,
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
    /// Seals applied: the change set of each epoch, in order.
    ChangeSets(Vec<ChangeSet>),
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
pub struct GroupCore {
    pub shard: u32,
    pub node_id: u64,
    raw: RawNode<GroupStorage>,
    state: Arc<RwLock<ShardState>>,
    conf_state: ConfState,
    leader_id: u64,
    is_leader: bool,
    outbox: Vec<Message>,
    events: Vec<Event>,
    removed: bool,
}

impl GroupCore {
    /// Builds the core over recovered storage and state. `state.applied_index` must equal
    /// the storage's snapshot index (the state was restored from that snapshot).
    ///
    /// # Errors
    /// raft-rs configuration errors.
    pub fn new(
        opts: &RaftOptions,
        node_id: u64,
        shard: u32,
        storage: GroupStorage,
        state: Arc<RwLock<ShardState>>,
    ) -> Result<Self, PsError> {
        let applied = state.read().applied_index;
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

    pub fn state(&self) -> &Arc<RwLock<ShardState>> {
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

    fn not_leader(&self) -> PsError {
        PsError::NotLeader {
            shard: self.shard,
            leader_id: self.leader_id(),
            leader_addr: None,
        }
    }

    /// Proposes a command; it is matched to its caller by `cmd.proposal_id` on apply.
    ///
    /// # Errors
    /// NotLeader when this replica does not lead the group.
    pub fn propose(&mut self, cmd: &Command) -> Result<(), PsError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.raw
            .propose(vec![], cmd.encode_to_vec())
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

    pub fn take_events(&mut self) -> Vec<Event> {
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
            let restored = ShardState::decode(&snap.data)?;
            let meta = snap.get_metadata().clone();
            {
                let mut st = self.state.write();
                *st = restored;
                st.shard = self.shard;
                st.applied_index = meta.index;
                st.applied_term = meta.term;
            }
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
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        // The empty entry a new leader appends.
                        st.applied_index = e.index;
                        st.applied_term = e.term;
                        continue;
                    }
                    let (proposal_id, outcome) = match Command::decode(&e.data[..]) {
                        Ok(cmd) => (cmd.proposal_id, st.apply(&cmd, e.index, e.term)),
                        Err(err) => {
                            st.applied_index = e.index;
                            st.applied_term = e.term;
                            (0, Outcome::Rejected(format!("undecodable entry: {err}")))
                        }
                    };
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
                    st.applied_index = e.index;
                    st.applied_term = e.term;
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
                    st.applied_index = e.index;
                    st.applied_term = e.term;
                }
            }
        }
        let emitted = st.take_emitted();
        if !emitted.is_empty() {
            self.events.push(Event::ChangeSets(emitted));
        }
    }

    /// Metadata for a snapshot of the current applied state.
    pub fn snapshot_meta(&self) -> SnapshotMetadata {
        let st = self.state.read();
        let mut meta = SnapshotMetadata::default();
        meta.index = st.applied_index;
        meta.term = st.applied_term;
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

/// Requests to a group's owner task.
pub enum GroupMsg {
    Propose {
        cmd: Command,
        reply: ProposalReply,
    },
    ConfChange {
        cc: ConfChange,
        reply: oneshot::Sender<Result<(), PsError>>,
    },
    /// Resolves with the applied index once a linearizable read may be served.
    ReadIndex {
        reply: oneshot::Sender<Result<u64, PsError>>,
    },
    Raft(Box<Message>),
    TransferLeader {
        to: u64,
        reply: oneshot::Sender<Result<(), PsError>>,
    },
    SnapshotWritten(SnapshotMetadata),
    SnapshotReport {
        to: u64,
        ok: bool,
    },
}

/// Published after every loop of the owner task; read without messaging the task.
#[derive(Debug, Clone, Default)]
pub struct GroupStatus {
    pub role: &'static str,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub first_log_index: u64,
    pub last_log_index: u64,
    pub voters: Vec<u64>,
    /// On the leader: (member, matched index) for every member.
    pub progress: Vec<(u64, u64)>,
    pub last_leader_contact: Option<Instant>,
    pub removed: bool,
}

/// What a node keeps about one of its groups.
#[derive(Clone)]
pub struct GroupHandle {
    pub shard: u32,
    pub tx: mpsc::Sender<GroupMsg>,
    pub state: Arc<RwLock<ShardState>>,
    pub status: Arc<Mutex<GroupStatus>>,
    pub changes: Arc<ChangeLog>,
}

/// Side effects a group task needs from its node.
pub trait GroupEnv: Send + Sync + 'static {
    fn send(&self, shard: u32, msgs: Vec<Message>);
    fn peer_added(&self, node_id: u64, addr: String);
    /// The replica was removed and its data deleted.
    fn group_removed(&self, shard: u32);
    /// The local meta replica committed seals up to `last_sealed`.
    fn meta_applied(&self, last_sealed: u64);
    /// Wakes data-shard leaders when the local meta replica commits a seal.
    fn meta_watch(&self) -> Option<watch::Receiver<u64>>;
    /// The local meta replica, whose committed seals shard leaders copy.
    fn meta_state(&self) -> Option<Arc<RwLock<ShardState>>>;
}

type Waiters<T> = Vec<oneshot::Sender<Result<T, PsError>>>;

type ProposalReply = oneshot::Sender<Result<(Outcome, u64), PsError>>;

/// A data-shard leader's copying of committed meta seals into its own log.
#[derive(Default)]
struct SealCopier {
    /// Highest epoch proposed by this leader (0: nothing outstanding).
    proposed_upto: u64,
    proposed_at: Option<Instant>,
}

impl SealCopier {
    /// Proposes `ShardSeal` for the committed epochs this shard lacks. Proposals
    /// pipeline (each covers the epochs after the previous one); apply skips epochs
    /// already sealed, so a lost proposal is simply proposed again after a timeout.
    fn copy(
        &mut self,
        core: &mut GroupCore,
        meta_last: u64,
        env: &dyn GroupEnv,
        opts: &RaftOptions,
    ) {
        let sealed = core.state().read().steps.last_sealed;
        let lost_after = Duration::from_millis(opts.tick_ms * opts.election_ticks as u64);
        if self.proposed_upto <= sealed
            || self.proposed_at.is_some_and(|t| t.elapsed() > lost_after)
        {
            self.proposed_upto = sealed;
        }
        if meta_last <= self.proposed_upto {
            return;
        }
        let Some(meta) = env.meta_state() else {
            return;
        };
        let seals = meta
            .read()
            .meta
            .seals_after(self.proposed_upto, SHARD_SEAL_BATCH);
        let Some(last) = seals.last().map(|s| s.epoch) else {
            return;
        };
        let cmd = Command {
            op: Some(Op::ShardSeal(ShardSeal { seals })),
            ..Default::default()
        };
        if core.propose(&cmd).is_ok() {
            self.proposed_upto = last;
            self.proposed_at = Some(Instant::now());
        }
    }
}

/// Owns one [`GroupCore`] until shutdown or removal.
// The parts are independent handles wired by the node; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn run_group(
    mut core: GroupCore,
    opts: RaftOptions,
    mut rx: mpsc::Receiver<GroupMsg>,
    self_tx: mpsc::Sender<GroupMsg>,
    status: Arc<Mutex<GroupStatus>>,
    changes: Arc<ChangeLog>,
    wal: Wal,
    env: Arc<dyn GroupEnv>,
    mut shutdown: watch::Receiver<bool>,
) {
    let shard = core.shard;
    let is_meta = shard == META_GROUP;
    // Data shards follow the meta group's seals (see `copy_seals`).
    let mut meta_rx = if is_meta { None } else { env.meta_watch() };
    let mut seals = SealCopier::default();
    let mut ticker = tokio::time::interval(Duration::from_millis(opts.tick_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: HashMap<u64, ProposalReply> = HashMap::new();
    let mut pending_conf: HashMap<u64, oneshot::Sender<Result<(), PsError>>> = HashMap::new();
    let mut next_id: u64 = 1;
    let id_base = core.node_id << 40;
    let mut reads_new: Waiters<u64> = Vec::new();
    let mut reads_issued: HashMap<u64, (Instant, Waiters<u64>)> = HashMap::new();
    let mut reads_ready: Vec<(u64, Waiters<u64>)> = Vec::new();
    let mut snapshot_in_flight = false;
    let mut last_leader_contact: Option<Instant> = None;
    let read_timeout = Duration::from_millis(opts.read_timeout_ms);
    let mut ticks: u64 = 0;

    loop {
        let mut msgs = Vec::new();
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            m = rx.recv() => match m {
                Some(m) => {
                    msgs.push(m);
                    while msgs.len() < 4096 {
                        match rx.try_recv() {
                            Ok(m) => msgs.push(m),
                            Err(_) => break,
                        }
                    }
                }
                None => break,
            },
            Ok(()) = async {
                match meta_rx.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = ticker.tick() => {
                core.tick();
                ticks += 1;
                if opts.leader_balance_ticks > 0 && ticks.is_multiple_of(opts.leader_balance_ticks) {
                    if let Some(to) = core.preferred_leader_ready() {
                        tracing::debug!(shard, to, "handing leadership to the preferred replica");
                        core.transfer_leader(to);
                    }
                }
                let now = Instant::now();
                reads_issued.retain(|_, (at, waiters)| {
                    if now.duration_since(*at) < read_timeout {
                        return true;
                    }
                    for w in waiters.drain(..) {
                        let _ = w.send(Err(PsError::Timeout("read index not confirmed".into())));
                    }
                    false
                });
                pending.retain(|_, r| !r.is_closed());
            }
        }
        for m in msgs {
            match m {
                GroupMsg::Propose { mut cmd, reply } => {
                    if pending.len() >= opts.proposals_pending_max {
                        let _ = reply.send(Err(PsError::Overloaded(format!(
                            "shard {shard} has {} proposals in flight",
                            pending.len()
                        ))));
                        continue;
                    }
                    let id = id_base | next_id;
                    next_id += 1;
                    cmd.proposal_id = id;
                    match core.propose(&cmd) {
                        Ok(()) => {
                            pending.insert(id, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                GroupMsg::ConfChange { mut cc, reply } => {
                    let id = id_base | next_id;
                    next_id += 1;
                    cc.id = id;
                    match core.propose_conf_change(cc) {
                        Ok(()) => {
                            pending_conf.insert(id, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                GroupMsg::ReadIndex { reply } => reads_new.push(reply),
                GroupMsg::Raft(m) => {
                    if matches!(
                        m.get_msg_type(),
                        MessageType::MsgAppend
                            | MessageType::MsgHeartbeat
                            | MessageType::MsgSnapshot
                    ) {
                        last_leader_contact = Some(Instant::now());
                    }
                    if let Err(e) = core.step(*m) {
                        tracing::debug!(shard, error = %e, "raft step failed");
                    }
                }
                GroupMsg::TransferLeader { to, reply } => {
                    if core.is_leader() {
                        core.transfer_leader(to);
                        let _ = reply.send(Ok(()));
                    } else {
                        let _ = reply.send(Err(core.not_leader()));
                    }
                }
                GroupMsg::SnapshotWritten(meta) => {
                    snapshot_in_flight = false;
                    let index = meta.index;
                    core.snapshot_written(meta);
                    wal.compacted(u64::from(shard), core.storage().first() - 1);
                    tracing::debug!(shard, index, "snapshot written, log compacted");
                }
                GroupMsg::SnapshotReport { to, ok } => core.report_snapshot(to, ok),
            }
        }
        if !is_meta && core.is_leader() {
            if let Some(rx) = &meta_rx {
                let meta_last = *rx.borrow();
                seals.copy(&mut core, meta_last, env.as_ref(), &opts);
            }
        }
        if !reads_new.is_empty() {
            if core.is_leader() {
                let ctx = next_id;
                next_id += 1;
                core.read_index(ctx);
                reads_issued.insert(ctx, (Instant::now(), std::mem::take(&mut reads_new)));
            } else {
                let e = core.not_leader();
                for w in reads_new.drain(..) {
                    let _ = w.send(Err(e.clone()));
                }
            }
        }

        // Ready loop: persist through the node WAL (one fsync shared with other groups).
        loop {
            let work = match core.begin_ready() {
                Ok(Some(w)) => w,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(shard, error = %e, "cannot install snapshot; stopping group");
                    return;
                }
            };
            let out = core.take_outbox();
            if !out.is_empty() {
                env.send(shard, out);
            }
            if let Some(snap) = &work.snapshot {
                let dir = core.storage().snap_dir().to_path_buf();
                let meta = snap.get_metadata().clone();
                let data = snap.data.clone();
                let res =
                    tokio::task::spawn_blocking(move || write_snapshot_file(&dir, &meta, &data))
                        .await;
                if !matches!(res, Ok(Ok(_))) {
                    tracing::error!(shard, "failed to persist received snapshot; stopping group");
                    return;
                }
            }
            if let Err(e) = wal.write(work.write.clone()).await {
                tracing::error!(shard, error = %e, "wal write failed; stopping group");
                return;
            }
            core.finish_ready(work);
            let out = core.take_outbox();
            if !out.is_empty() {
                env.send(shard, out);
            }
        }

        for ev in core.take_events() {
            match ev {
                Event::Applied {
                    proposal_id,
                    outcome,
                    index,
                } => {
                    if let Some(reply) = pending.remove(&proposal_id) {
                        let _ = reply.send(Ok((outcome, index)));
                    }
                }
                Event::ConfApplied {
                    proposal_id,
                    result,
                } => {
                    if let Some(reply) = pending_conf.remove(&proposal_id) {
                        let _ = reply.send(result.map_err(PsError::FailedPrecondition));
                    }
                }
                Event::ReadReady { ctx, index } => {
                    if let Some((_, waiters)) = reads_issued.remove(&ctx) {
                        reads_ready.push((index, waiters));
                    }
                }
                Event::RoleChanged {
                    leader_id,
                    is_leader,
                } => {
                    metrics::counter!(crate::metrics::LEADER_CHANGES, "shard" => shard.to_string())
                        .increment(1);
                    tracing::info!(
                        shard,
                        leader_id,
                        is_leader,
                        term = core.term(),
                        "leader changed"
                    );
                    seals = SealCopier::default();
                    if !is_leader {
                        // Outcomes unknown: callers retry under the same (client, seq).
                        let e = PsError::NotLeader {
                            shard,
                            leader_id,
                            leader_addr: None,
                        };
                        for (_, r) in pending.drain() {
                            let _ = r.send(Err(e.clone()));
                        }
                        for (_, r) in pending_conf.drain() {
                            let _ = r.send(Err(e.clone()));
                        }
                        for (_, (_, ws)) in reads_issued.drain() {
                            for w in ws {
                                let _ = w.send(Err(e.clone()));
                            }
                        }
                    }
                }
                Event::PeerAdded { node_id, addr } => env.peer_added(node_id, addr),
                Event::Removed => {}
                Event::ChangeSets(sets) => {
                    for cs in sets {
                        changes.push(cs);
                    }
                }
            }
        }
        if is_meta {
            env.meta_applied(core.state().read().meta.last_sealed);
        }
        let applied = core.applied_index();
        reads_ready.retain_mut(|(index, waiters)| {
            if *index > applied {
                return true;
            }
            for w in waiters.drain(..) {
                let _ = w.send(Ok(applied));
            }
            false
        });

        if core.removed() {
            let _ = wal
                .write(GroupWrite {
                    group: u64::from(shard),
                    tombstone: true,
                    ..Default::default()
                })
                .await;
            let _ = std::fs::remove_dir_all(core.storage().snap_dir());
            status.lock().removed = true;
            tracing::info!(shard, "replica removed from this node");
            env.group_removed(shard);
            return;
        }

        // Background snapshot: clone the state (a memcpy of flat rows), encode and write
        // off the task; the log is compacted when the file is durable.
        let snap_index = core.storage().snapshot_index();
        let wanted = core.storage().take_snapshot_wanted();
        if !snapshot_in_flight
            && applied > snap_index
            && (wanted || applied - snap_index >= opts.snapshot_interval_entries)
        {
            snapshot_in_flight = true;
            let meta = core.snapshot_meta();
            let copy = core.state().read().clone();
            let dir = core.storage().snap_dir().to_path_buf();
            let tx = self_tx.clone();
            tokio::task::spawn_blocking(move || {
                let data = copy.encode();
                match write_snapshot_file(&dir, &meta, &data) {
                    Ok(_) => {
                        let _ = tx.blocking_send(GroupMsg::SnapshotWritten(meta));
                    }
                    Err(e) => tracing::error!(error = %e, "snapshot write failed"),
                }
            });
        }

        let mut s = status.lock();
        s.role = core.role();
        s.leader_id = core.leader_id();
        s.term = core.term();
        s.commit_index = core.commit_index();
        s.applied_index = applied;
        s.snapshot_index = core.storage().snapshot_index();
        s.first_log_index = core.storage().first();
        s.last_log_index = core.storage().last();
        s.voters = core.voters();
        s.progress = core.progress();
        s.last_leader_contact = if core.is_leader() {
            Some(Instant::now())
        } else {
            last_leader_contact
        };
        metrics::gauge!(crate::metrics::RAFT_PENDING, "shard" => shard.to_string())
            .set(pending.len() as f64);
        metrics::gauge!(crate::metrics::HAS_LEADER, "shard" => shard.to_string())
            .set(if core.leader_id() != 0 { 1.0 } else { 0.0 });
    }
    tracing::debug!(shard, "group task stopped");
}

#[cfg(test)]
mod tests {
    //! Three cores driven by hand: tick, deliver, persist instantly.
    use super::*;
    use freshet_proto::command::v1::{command::Op, SparsePush};
    use freshet_proto::ps::v1::{
        optimizer_config, OptimizerConfig, SgdConfig, TableKind, TableSpec,
    };
    use std::collections::{HashSet, VecDeque};

    struct Harness {
        cores: HashMap<u64, GroupCore>,
        down: HashSet<u64>,
        events: HashMap<u64, Vec<Event>>,
        _dirs: Vec<tempfile::TempDir>,
    }

    fn opts() -> RaftOptions {
        RaftOptions {
            snapshot_interval_entries: u64::MAX,
            ..Default::default()
        }
    }

    impl Harness {
        fn new(ids: &[u64]) -> Self {
            let mut cores = HashMap::new();
            let mut dirs = Vec::new();
            for &id in ids {
                let dir = tempfile::tempdir().unwrap();
                let mut storage = GroupStorage::new(dir.path().to_path_buf());
                storage.initialize(ConfState::from((ids.to_vec(), vec![])));
                let state = Arc::new(RwLock::new(ShardState::new(0)));
                cores.insert(id, GroupCore::new(&opts(), id, 0, storage, state).unwrap());
                dirs.push(dir);
            }
            Harness {
                cores,
                down: HashSet::new(),
                events: HashMap::new(),
                _dirs: dirs,
            }
        }

        /// Runs Ready rounds and delivers messages until the network is quiet.
        fn settle(&mut self) {
            let mut queue: VecDeque<Message> = VecDeque::new();
            for _ in 0..10_000 {
                let mut progressed = false;
                let ids: Vec<u64> = self.cores.keys().copied().collect();
                for id in ids {
                    let core = self.cores.get_mut(&id).unwrap();
                    while let Some(work) = core.begin_ready().unwrap() {
                        progressed = true;
                        core.finish_ready(work);
                    }
                    queue.extend(core.take_outbox());
                    self.events
                        .entry(id)
                        .or_default()
                        .extend(core.take_events());
                }
                while let Some(m) = queue.pop_front() {
                    progressed = true;
                    if self.down.contains(&m.to) || self.down.contains(&m.from) {
                        continue;
                    }
                    if let Some(c) = self.cores.get_mut(&m.to) {
                        c.step(m).unwrap();
                    }
                }
                if !progressed {
                    return;
                }
            }
            panic!("network never settled");
        }

        fn tick_all(&mut self, n: usize) {
            for _ in 0..n {
                for (id, c) in self.cores.iter_mut() {
                    if !self.down.contains(id) {
                        c.tick();
                    }
                }
                self.settle();
            }
        }

        /// Proposes on core `id`, which must be the leader.
        fn propose(&mut self, id: u64, cmd: &Command) {
            self.cores.get_mut(&id).unwrap().propose(cmd).unwrap();
        }

        /// Ticks until some live core leads (randomised timeouts can split votes).
        fn elect(&mut self) -> u64 {
            for _ in 0..500 {
                if let Some(l) = self.leader() {
                    return l;
                }
                self.tick_all(1);
            }
            panic!("no leader after 500 ticks");
        }

        fn leader(&self) -> Option<u64> {
            self.cores
                .iter()
                .find(|(id, c)| !self.down.contains(id) && c.is_leader())
                .map(|(id, _)| *id)
        }
    }

    fn table_cmd() -> Command {
        Command {
            proposal_id: 1,
            op: Some(Op::CreateTable(TableSpec {
                name: "t".into(),
                kind: TableKind::Sparse as i32,
                dim: 2,
                optimizer: Some(OptimizerConfig {
                    kind: Some(optimizer_config::Kind::Sgd(SgdConfig { lr: 0.1 })),
                }),
                init_scale: 0.1,
                seed: 1,
            })),
            ..Default::default()
        }
    }

    fn push_cmd(id: u64, seq: u64) -> Command {
        Command {
            proposal_id: 100 + seq,
            client_id: 5,
            seq,
            op: Some(Op::Push(SparsePush {
                table: "t".into(),
                ids: vec![seq % 7, 100 + seq],
                grads: vec![1.0, 2.0, 3.0, 4.0],
            })),
        }
        .tap(|c| c.proposal_id = id)
    }

    trait Tap: Sized {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }
    impl Tap for Command {}

    #[test]
    fn elects_a_leader_replicates_and_applies_identically() {
        let mut h = Harness::new(&[1, 2, 3]);
        let leader = h.elect();
        h.propose(leader, &table_cmd());
        for seq in 1..=20 {
            h.propose(leader, &push_cmd(1000 + seq, seq));
        }
        h.settle();
        h.tick_all(3);
        let sums: Vec<u64> = h
            .cores
            .values()
            .map(|c| c.state().read().checksum())
            .collect();
        assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:?}");
        let applied: Vec<u64> = h.cores.values().map(|c| c.applied_index()).collect();
        assert!(applied.windows(2).all(|w| w[0] == w[1]), "{applied:?}");
        // The leader reported every proposal's outcome, matched by id.
        let evs = &h.events[&leader];
        let ids: HashSet<u64> = evs
            .iter()
            .filter_map(|e| match e {
                Event::Applied {
                    proposal_id,
                    outcome: Outcome::Applied,
                    ..
                } => Some(*proposal_id),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 20);
    }

    #[test]
    fn survives_leader_loss_and_retried_push_applies_once() {
        let mut h = Harness::new(&[1, 2, 3]);
        let old = h.elect();
        h.propose(old, &table_cmd());
        h.propose(old, &push_cmd(11, 1));
        h.settle();
        h.down.insert(old);
        let new = h.elect();
        assert_ne!(new, old);
        // Retry of seq 1 (outcome unknown to the client) plus a new seq 2.
        h.propose(new, &push_cmd(21, 1));
        h.propose(new, &push_cmd(22, 2));
        h.settle();
        let evs = &h.events[&new];
        assert!(evs.contains(&Event::Applied {
            proposal_id: 21,
            outcome: Outcome::Duplicate,
            index: h.cores[&new].applied_index() - 1,
        }));
        // The old leader comes back and converges.
        h.down.remove(&old);
        h.tick_all(20);
        let sums: Vec<u64> = h
            .cores
            .values()
            .map(|c| c.state().read().checksum())
            .collect();
        assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:?}");
    }

    #[test]
    fn leadership_moves_to_the_preferred_replica_once_it_is_caught_up() {
        let mut h = Harness::new(&[1, 2, 3]);
        let leader = h.elect();
        h.propose(leader, &table_cmd());
        h.tick_all(5);
        // Shard 0 prefers the first voter, node 1.
        let ready = h.cores[&leader].preferred_leader_ready();
        if leader == 1 {
            assert_eq!(ready, None);
            return;
        }
        assert_eq!(ready, Some(1));
        h.cores.get_mut(&leader).unwrap().transfer_leader(1);
        h.tick_all(5);
        assert_eq!(h.leader(), Some(1));
        assert_eq!(h.cores[&1].preferred_leader_ready(), None);
    }

    #[test]
    fn read_index_confirms_on_the_leader_only() {
        let mut h = Harness::new(&[1, 2, 3]);
        let leader = h.elect();
        h.cores.get_mut(&leader).unwrap().read_index(77);
        h.settle();
        assert!(h.events[&leader]
            .iter()
            .any(|e| matches!(e, Event::ReadReady { ctx: 77, .. })));
        let follower = *h.cores.keys().find(|id| **id != leader).unwrap();
        assert!(matches!(
            h.cores.get_mut(&follower).unwrap().propose(&table_cmd()),
            Err(PsError::NotLeader { leader_id, .. }) if leader_id == leader
        ));
    }

    #[test]
    fn snapshot_brings_a_new_member_up_to_date() {
        let mut h = Harness::new(&[1, 2, 3]);
        let leader = h.elect();
        h.propose(leader, &table_cmd());
        for seq in 1..=10 {
            h.propose(leader, &push_cmd(500 + seq, seq));
        }
        h.settle();
        // Snapshot and compact every replica's log.
        for c in h.cores.values_mut() {
            let meta = c.snapshot_meta();
            let data = c.state().read().encode();
            write_snapshot_file(c.storage().snap_dir(), &meta, &data).unwrap();
            c.snapshot_written(meta);
        }
        // Add node 4 (empty, uninitialised) as a voter.
        let dir = tempfile::tempdir().unwrap();
        let storage = GroupStorage::new(dir.path().to_path_buf());
        let state = Arc::new(RwLock::new(ShardState::new(0)));
        h.cores
            .insert(4, GroupCore::new(&opts(), 4, 0, storage, state).unwrap());
        h._dirs.push(dir);
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = 4;
        cc.id = 9;
        cc.context = b"127.0.0.1:1".to_vec().into();
        h.cores
            .get_mut(&leader)
            .unwrap()
            .propose_conf_change(cc)
            .unwrap();
        // The old snapshot predates node 4's membership: the leader asks for a new one,
        // which its owner (here: the test) builds.
        let mut rebuilt = false;
        for _ in 0..20 {
            h.tick_all(1);
            let c = h.cores.get_mut(&leader).unwrap();
            if c.storage().take_snapshot_wanted() {
                let meta = c.snapshot_meta();
                let data = c.state().read().encode();
                write_snapshot_file(c.storage().snap_dir(), &meta, &data).unwrap();
                c.snapshot_written(meta);
                rebuilt = true;
            }
        }
        assert!(rebuilt);
        let snap4 = h.cores[&4].storage().snapshot_index();
        assert!(snap4 > 0, "node 4 caught up by snapshot");
        let sums: HashSet<u64> = h
            .cores
            .values()
            .map(|c| c.state().read().checksum())
            .collect();
        assert_eq!(sums.len(), 1);
        assert_eq!(h.cores[&4].voters(), vec![1, 2, 3, 4]);
        assert!(h.events[&leader].contains(&Event::PeerAdded {
            node_id: 4,
            addr: "127.0.0.1:1".into()
        }));
    }
}
