//! The task that owns one Raft group: it feeds the [`GroupCore`] from a bounded mailbox,
//! persists through the node's WAL (group commit: one fsync covers every group's Ready),
//! sends through the node's transport, and answers callers through oneshot channels,
//! matching proposals by an id carried in the entry.
//!
//! One pass of [`GroupTask::run`]: wait for messages (or a tick, or the leader duty's
//! wake-up), handle them, run the leader duty, issue read-index requests, persist and
//! finish every Ready, dispatch the core's events, answer reads, then snapshot in the
//! background when due and publish the status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use raft::eraftpb::{ConfChange, Message, MessageType, Snapshot, SnapshotMetadata};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::PsError;
use crate::raft::core::{Event, GroupCore, RaftOptions};
use crate::raft::storage::{read_snapshot_file, write_snapshot_file, write_snapshot_file_with};
use crate::raft::wal::{GroupWrite, Wal};
use crate::raft::{Feed, StateMachine};

/// Messages the task takes from its mailbox in one pass.
const MESSAGES_PER_PASS: usize = 4096;

/// Requests to a group's owner task.
/// Writes a snapshot file of a frozen state, streamed. Test fault point: the write fails
/// (a full disk, say) on nodes in a failpoint scope.
fn write_snapshot<S: StateMachine>(
    dir: &std::path::Path,
    meta: &SnapshotMetadata,
    frozen: &S::Frozen,
    #[cfg_attr(not(feature = "failpoints"), allow(unused_variables))] scope: bool,
) -> Result<(), PsError> {
    fail::fail_point!(crate::failpoints::SNAPSHOT_WRITE, scope, |_| Err(
        PsError::Storage("failpoint: snapshot write".into())
    ));
    write_snapshot_file_with(dir, meta, |w| S::write_frozen(frozen, w)).map(|_| ())
}

/// How long a group waits to snapshot again after a failed snapshot write.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(1);

pub enum GroupMsg<S: StateMachine> {
    Propose {
        cmd: S::Command,
        reply: ProposalReply<S>,
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
    /// The background snapshot write failed (logged): the group tries again later.
    SnapshotFailed,
    /// The latest snapshot file, read in the background for raft-rs (None: unreadable).
    SnapshotLoaded(Option<Box<Snapshot>>),
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
pub struct GroupHandle<S: StateMachine> {
    pub shard: u32,
    pub tx: mpsc::Sender<GroupMsg<S>>,
    pub state: Arc<RwLock<S>>,
    pub status: Arc<Mutex<GroupStatus>>,
    /// What the state machine publishes as it applies (a shard's change sets).
    pub feed: Arc<S::Feed>,
}

// Not derived: a derive would ask `S: Clone` of the handle, which only clones Arcs.
impl<S: StateMachine> Clone for GroupHandle<S> {
    fn clone(&self) -> Self {
        GroupHandle {
            shard: self.shard,
            tx: self.tx.clone(),
            state: Arc::clone(&self.state),
            status: Arc::clone(&self.status),
            feed: Arc::clone(&self.feed),
        }
    }
}

/// Side effects a group task needs from its node.
pub trait GroupEnv<S: StateMachine>: Send + Sync + 'static {
    fn send(&self, shard: u32, msgs: Vec<Message>);
    fn peer_added(&self, node_id: u64, addr: String);
    /// The replica was removed and its data deleted.
    fn group_removed(&self, shard: u32);
    /// Called after every pass of the group task that may have applied entries (the meta
    /// group publishes its sealed epoch from here).
    fn applied(&self, core: &GroupCore<S>);
    /// The leader-only work the layer above Raft does for `shard`, and the signal that
    /// wakes it (a data shard copies the meta group's committed seals into its own log).
    /// None: the group has no such work.
    fn leader_duty(&self, shard: u32) -> Option<(Box<dyn LeaderDuty<S>>, watch::Receiver<u64>)>;
    /// Whether test fault points fire for this node (see `crate::failpoints`).
    fn fault_scope(&self) -> bool {
        false
    }
}

/// Leader-only work a group task runs for the layer above Raft.
pub trait LeaderDuty<S: StateMachine>: Send {
    /// Runs on the leader after each batch of messages and whenever `signal` (the current
    /// value of the wake channel) moves.
    fn run(&mut self, core: &mut GroupCore<S>, signal: u64, opts: &RaftOptions);
    /// Leadership changed: forget what was proposed as the previous leader.
    fn reset(&mut self);
}

type Waiters<T> = Vec<oneshot::Sender<Result<T, PsError>>>;

type ProposalReply<S> = oneshot::Sender<Result<(<S as StateMachine>::Outcome, u64), PsError>>;

/// The handles a group task is wired with by its node.
pub struct GroupWiring<S: StateMachine> {
    pub opts: RaftOptions,
    pub rx: mpsc::Receiver<GroupMsg<S>>,
    /// The task's own mailbox, for results of its background work (snapshot writes).
    pub self_tx: mpsc::Sender<GroupMsg<S>>,
    pub status: Arc<Mutex<GroupStatus>>,
    pub feed: Arc<S::Feed>,
    pub wal: Wal,
    pub env: Arc<dyn GroupEnv<S>>,
    pub shutdown: watch::Receiver<bool>,
}

/// Owns one [`GroupCore`] until shutdown or removal.
/// Returns false when the replica stopped because it cannot go on (its storage
/// failed): the node must not keep looking alive with a dead group.
pub async fn run_group<S: StateMachine>(core: GroupCore<S>, wiring: GroupWiring<S>) -> bool {
    GroupTask::new(core, wiring).run().await
}

/// Why the task stops.
enum Stop {
    /// Shutdown, or the mailbox closed.
    Shutdown,
    /// The replica cannot go on (storage failed); it stops serving.
    Failed,
    /// The replica was removed from the group and its data deleted.
    Removed,
}

/// The owner task of one group and everything it tracks between passes.
pub struct GroupTask<S: StateMachine> {
    core: GroupCore<S>,
    shard: u32,
    opts: RaftOptions,
    rx: mpsc::Receiver<GroupMsg<S>>,
    self_tx: mpsc::Sender<GroupMsg<S>>,
    status: Arc<Mutex<GroupStatus>>,
    feed: Arc<S::Feed>,
    wal: Wal,
    env: Arc<dyn GroupEnv<S>>,
    shutdown: watch::Receiver<bool>,
    /// The layer above's leader-only work, and what wakes it.
    duty: Option<(Box<dyn LeaderDuty<S>>, watch::Receiver<u64>)>,
    /// Proposals in flight by proposal id (node id in the high bits: unique per leader).
    pending: HashMap<u64, ProposalReply<S>>,
    pending_conf: HashMap<u64, oneshot::Sender<Result<(), PsError>>>,
    next_id: u64,
    id_base: u64,
    /// Linearizable reads: waiting for a read index, issued (by context), confirmed (by
    /// the index they wait to be applied).
    reads_new: Waiters<u64>,
    reads_issued: HashMap<u64, (Instant, Waiters<u64>)>,
    reads_ready: Vec<(u64, Waiters<u64>)>,
    snapshot_in_flight: bool,
    /// After a failed snapshot write, no new one before this.
    snapshot_retry_at: Option<Instant>,
    /// A snapshot file is being read for raft-rs.
    load_in_flight: bool,
    last_leader_contact: Option<Instant>,
    ticks: u64,
}

impl<S: StateMachine> GroupTask<S> {
    pub fn new(core: GroupCore<S>, w: GroupWiring<S>) -> Self {
        let shard = core.shard;
        let duty = w.env.leader_duty(shard);
        let id_base = core.node_id << 40;
        GroupTask {
            core,
            shard,
            opts: w.opts,
            rx: w.rx,
            self_tx: w.self_tx,
            status: w.status,
            feed: w.feed,
            wal: w.wal,
            env: w.env,
            shutdown: w.shutdown,
            duty,
            pending: HashMap::new(),
            pending_conf: HashMap::new(),
            next_id: 1,
            id_base,
            reads_new: Vec::new(),
            reads_issued: HashMap::new(),
            reads_ready: Vec::new(),
            snapshot_in_flight: false,
            snapshot_retry_at: None,
            load_in_flight: false,
            last_leader_contact: None,
            ticks: 0,
        }
    }

    /// Runs passes until shutdown, removal or a storage failure (false).
    pub async fn run(mut self) -> bool {
        let shard = self.shard;
        let mut ticker = tokio::time::interval(Duration::from_millis(self.opts.tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = loop {
            // Test fault point: this group's task dies (a panic inside raft-rs, say).
            fail::fail_point!(
                crate::failpoints::GROUP_TASK,
                self.env.fault_scope(),
                |_| true
            );
            let mut msgs = Vec::new();
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => break Stop::Shutdown,
                m = self.rx.recv() => match m {
                    Some(m) => {
                        msgs.push(m);
                        while msgs.len() < MESSAGES_PER_PASS {
                            match self.rx.try_recv() {
                                Ok(m) => msgs.push(m),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break Stop::Shutdown,
                },
                Ok(()) = async {
                    match self.duty.as_mut() {
                        Some((_, rx)) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = ticker.tick() => self.on_tick(),
            }
            if let Err(stop) = self.pass(msgs).await {
                break stop;
            }
        };
        match stop {
            Stop::Shutdown => tracing::debug!(shard, "group task stopped"),
            Stop::Failed => {
                tracing::error!(shard, "group task stopped after a storage failure");
                return false;
            }
            Stop::Removed => tracing::info!(shard, "replica removed from this node"),
        }
        true
    }

    /// One pass over a batch of messages.
    async fn pass(&mut self, msgs: Vec<GroupMsg<S>>) -> Result<(), Stop> {
        for m in msgs {
            self.on_msg(m);
        }
        if self.core.is_leader() {
            if let Some((d, rx)) = self.duty.as_mut() {
                let signal = *rx.borrow();
                d.run(&mut self.core, signal, &self.opts);
            }
        }
        self.issue_reads();
        self.persist_ready().await?;
        self.dispatch_events();
        self.env.applied(&self.core);
        self.answer_reads();
        if self.core.removed() {
            self.remove().await;
            return Err(Stop::Removed);
        }
        self.maybe_snapshot();
        self.maybe_load_snapshot();
        self.publish_status();
        Ok(())
    }

    fn on_tick(&mut self) {
        let shard = self.shard;
        self.core.tick();
        self.ticks += 1;
        if self.opts.leader_balance_ticks > 0
            && self.ticks.is_multiple_of(self.opts.leader_balance_ticks)
        {
            if let Some(to) = self.core.preferred_leader_ready() {
                tracing::debug!(shard, to, "handing leadership to the preferred replica");
                self.core.transfer_leader(to);
            }
        }
        let now = Instant::now();
        let read_timeout = Duration::from_millis(self.opts.read_timeout_ms);
        self.reads_issued.retain(|_, (at, waiters)| {
            if now.duration_since(*at) < read_timeout {
                return true;
            }
            for w in waiters.drain(..) {
                let _ = w.send(Err(PsError::Timeout("read index not confirmed".into())));
            }
            false
        });
        self.pending.retain(|_, r| !r.is_closed());
    }

    fn proposal_id(&mut self) -> u64 {
        let id = self.id_base | self.next_id;
        self.next_id += 1;
        id
    }

    fn on_msg(&mut self, m: GroupMsg<S>) {
        let shard = self.shard;
        match m {
            GroupMsg::Propose { mut cmd, reply } => {
                if self.pending.len() >= self.opts.proposals_pending_max {
                    let _ = reply.send(Err(PsError::Overloaded(format!(
                        "shard {shard} has {} proposals in flight",
                        self.pending.len()
                    ))));
                    return;
                }
                let id = self.proposal_id();
                match self.core.propose(&mut cmd, id) {
                    Ok(()) => {
                        self.pending.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            GroupMsg::ConfChange { mut cc, reply } => {
                let id = self.proposal_id();
                cc.id = id;
                match self.core.propose_conf_change(cc) {
                    Ok(()) => {
                        self.pending_conf.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            GroupMsg::ReadIndex { reply } => self.reads_new.push(reply),
            GroupMsg::Raft(m) => {
                if matches!(
                    m.get_msg_type(),
                    MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
                ) {
                    self.last_leader_contact = Some(Instant::now());
                }
                if let Err(e) = self.core.step(*m) {
                    tracing::debug!(shard, error = %e, "raft step failed");
                }
            }
            GroupMsg::TransferLeader { to, reply } => {
                if self.core.is_leader() {
                    self.core.transfer_leader(to);
                    let _ = reply.send(Ok(()));
                } else {
                    let _ = reply.send(Err(self.core.not_leader()));
                }
            }
            GroupMsg::SnapshotWritten(meta) => {
                self.snapshot_in_flight = false;
                let index = meta.index;
                self.core.snapshot_written(meta);
                self.wal
                    .compacted(u64::from(shard), self.core.storage().first() - 1);
                tracing::debug!(shard, index, "snapshot written, log compacted");
            }
            GroupMsg::SnapshotFailed => {
                // Not in flight any more, or no snapshot would ever be taken again and
                // the log would grow without bound; the next try waits a while.
                self.snapshot_in_flight = false;
                self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
            }
            GroupMsg::SnapshotReport { to, ok } => self.core.report_snapshot(to, ok),
            GroupMsg::SnapshotLoaded(snap) => {
                self.load_in_flight = false;
                if let Some(snap) = snap {
                    self.core.storage().set_loaded(*snap);
                }
            }
        }
    }

    /// Read-index requests collected this pass share one read index (the context is an
    /// id of this task, never reused).
    fn issue_reads(&mut self) {
        if self.reads_new.is_empty() {
            return;
        }
        if self.core.is_leader() {
            let ctx = self.next_id;
            self.next_id += 1;
            self.core.read_index(ctx);
            self.reads_issued
                .insert(ctx, (Instant::now(), std::mem::take(&mut self.reads_new)));
        } else {
            let e = self.core.not_leader();
            for w in self.reads_new.drain(..) {
                let _ = w.send(Err(e.clone()));
            }
        }
    }

    /// The Ready loop: persist through the node WAL (one fsync shared with other groups),
    /// then let the core continue. A snapshot received from the leader is made durable
    /// before the log that follows it.
    async fn persist_ready(&mut self) -> Result<(), Stop> {
        let shard = self.shard;
        loop {
            let work = match self.core.begin_ready() {
                Ok(Some(w)) => w,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::error!(shard, error = %e, "cannot install snapshot; stopping group");
                    return Err(Stop::Failed);
                }
            };
            self.flush_outbox();
            if let Some(snap) = &work.snapshot {
                let dir = self.core.storage().snap_dir().to_path_buf();
                let meta = snap.get_metadata().clone();
                let data = snap.data.clone();
                let res =
                    tokio::task::spawn_blocking(move || write_snapshot_file(&dir, &meta, &data))
                        .await;
                if !matches!(res, Ok(Ok(_))) {
                    tracing::error!(shard, "failed to persist received snapshot; stopping group");
                    return Err(Stop::Failed);
                }
            }
            if let Err(e) = self.wal.write(work.write.clone()).await {
                tracing::error!(shard, error = %e, "wal write failed; stopping group");
                return Err(Stop::Failed);
            }
            self.core.finish_ready(work);
            self.flush_outbox();
        }
    }

    fn flush_outbox(&mut self) {
        let out = self.core.take_outbox();
        if !out.is_empty() {
            self.env.send(self.shard, out);
        }
    }

    fn dispatch_events(&mut self) {
        for ev in self.core.take_events() {
            match ev {
                Event::Applied {
                    proposal_id,
                    outcome,
                    index,
                } => {
                    if let Some(reply) = self.pending.remove(&proposal_id) {
                        let _ = reply.send(Ok((outcome, index)));
                    }
                }
                Event::ConfApplied {
                    proposal_id,
                    result,
                } => {
                    if let Some(reply) = self.pending_conf.remove(&proposal_id) {
                        let _ = reply.send(result.map_err(PsError::FailedPrecondition));
                    }
                }
                Event::ReadReady { ctx, index } => {
                    if let Some((_, waiters)) = self.reads_issued.remove(&ctx) {
                        self.reads_ready.push((index, waiters));
                    }
                }
                Event::RoleChanged {
                    leader_id,
                    is_leader,
                } => self.role_changed(leader_id, is_leader),
                Event::PeerAdded { node_id, addr } => self.env.peer_added(node_id, addr),
                Event::Removed => {}
                Event::Effects(effects) => self.feed.publish(effects),
            }
        }
    }

    fn role_changed(&mut self, leader_id: u64, is_leader: bool) {
        let shard = self.shard;
        metrics::counter!(crate::metrics::LEADER_CHANGES, "shard" => shard.to_string())
            .increment(1);
        tracing::info!(
            shard,
            leader_id,
            is_leader,
            term = self.core.term(),
            "leader changed"
        );
        if let Some((d, _)) = self.duty.as_mut() {
            d.reset();
        }
        if !is_leader {
            // Outcomes unknown: callers retry under the same (client, seq).
            let e = PsError::NotLeader {
                shard,
                leader_id,
                leader_addr: None,
            };
            for (_, r) in self.pending.drain() {
                let _ = r.send(Err(e.clone()));
            }
            for (_, r) in self.pending_conf.drain() {
                let _ = r.send(Err(e.clone()));
            }
            for (_, (_, ws)) in self.reads_issued.drain() {
                for w in ws {
                    let _ = w.send(Err(e.clone()));
                }
            }
        }
    }

    /// Answers the reads whose read index is applied.
    fn answer_reads(&mut self) {
        let applied = self.core.applied_index();
        self.reads_ready.retain_mut(|(index, waiters)| {
            if *index > applied {
                return true;
            }
            for w in waiters.drain(..) {
                let _ = w.send(Ok(applied));
            }
            false
        });
    }

    /// This replica was removed: a tombstone in the WAL, its snapshots deleted.
    async fn remove(&mut self) {
        let _ = self
            .wal
            .write(GroupWrite {
                group: u64::from(self.shard),
                tombstone: true,
                ..Default::default()
            })
            .await;
        let _ = std::fs::remove_dir_all(self.core.storage().snap_dir());
        self.status.lock().removed = true;
        self.env.group_removed(self.shard);
    }

    /// Background snapshot: freeze the state (rows shared copy-on-write, see
    /// [`StateMachine::freeze`]), stream it to the file off the task; the log is
    /// compacted when the file is durable.
    fn maybe_snapshot(&mut self) {
        let applied = self.core.applied_index();
        let snap_index = self.core.storage().snapshot_index();
        if self.snapshot_in_flight || applied <= snap_index {
            return;
        }
        if self.snapshot_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        // The state machine may ask for one (a forget: the rows must leave the files).
        let requested = self.core.state().read().snapshot_requested()
            && self.core.state().write().take_snapshot_request();
        let wanted = self.core.storage().take_snapshot_wanted() || requested;
        let due = applied - snap_index >= self.opts.snapshot_interval_entries
            || self.core.storage().removable_bytes(applied) >= self.opts.snapshot_log_bytes;
        if !(wanted || due) {
            return;
        }
        self.snapshot_in_flight = true;
        let meta = self.core.snapshot_meta();
        let frozen = self.core.state().read().freeze();
        let dir = self.core.storage().snap_dir().to_path_buf();
        let tx = self.self_tx.clone();
        let shard = self.shard;
        let scope = self.env.fault_scope();
        tokio::task::spawn_blocking(move || {
            let written = write_snapshot::<S>(&dir, &meta, &frozen, scope);
            // The shared chunks go back to the live state's sole ownership here.
            drop(frozen);
            match written {
                Ok(()) => {
                    let _ = tx.blocking_send(GroupMsg::SnapshotWritten(meta));
                }
                Err(e) => {
                    tracing::error!(shard, error = %e, "snapshot write failed");
                    let _ = tx.blocking_send(GroupMsg::SnapshotFailed);
                }
            }
        });
    }

    /// raft-rs asked for the latest snapshot to send a follower: read the file off the
    /// task; raft-rs asks again at the follower's next probe and gets it from memory.
    fn maybe_load_snapshot(&mut self) {
        if self.load_in_flight {
            return;
        }
        let Some(path) = self.core.storage().take_load_wanted() else {
            return;
        };
        self.load_in_flight = true;
        let shard = self.shard;
        let tx = self.self_tx.clone();
        tokio::task::spawn_blocking(move || {
            let snap = match read_snapshot_file(&path) {
                Ok(s) => Some(Box::new(s)),
                Err(e) => {
                    tracing::warn!(shard, error = %e, "snapshot file unreadable");
                    None
                }
            };
            let _ = tx.blocking_send(GroupMsg::SnapshotLoaded(snap));
        });
    }

    fn publish_status(&self) {
        let shard = self.shard;
        let core = &self.core;
        let mut s = self.status.lock();
        s.role = core.role();
        s.leader_id = core.leader_id();
        s.term = core.term();
        s.commit_index = core.commit_index();
        s.applied_index = core.applied_index();
        s.snapshot_index = core.storage().snapshot_index();
        s.first_log_index = core.storage().first();
        s.last_log_index = core.storage().last();
        s.voters = core.voters();
        s.progress = core.progress();
        s.last_leader_contact = if core.is_leader() {
            Some(Instant::now())
        } else {
            self.last_leader_contact
        };
        metrics::gauge!(crate::metrics::RAFT_PENDING, "shard" => shard.to_string())
            .set(self.pending.len() as f64);
        metrics::gauge!(crate::metrics::HAS_LEADER, "shard" => shard.to_string())
            .set(if core.leader_id() != 0 { 1.0 } else { 0.0 });
    }
}
