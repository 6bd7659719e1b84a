//! The shard seal (README, "The consistency protocol"): each data-shard leader reads
//! the committed seals of its node's meta replica and proposes `ShardSeal` for the epochs
//! its shard lacks. Applying it ([`crate::fsm::ShardState`]) applies the buffered steps
//! within the cuts, in order and idempotently.

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::command::v1::{command::Op, Command, MembersAcknowledged, ShardSeal};

use crate::fsm::epoch::SHARD_SEAL_BATCH;
use crate::fsm::ShardState;
use crate::raft::core::{GroupCore, RaftOptions};
use crate::raft::group::LeaderDuty;

/// A data-shard leader's copying of committed meta seals into its own log.
/// Finds the node's meta replica (looked up each time: the node may gain or lose it).
pub(crate) type MetaReplica = Box<dyn Fn() -> Option<Arc<parking_lot::RwLock<ShardState>>> + Send>;

pub(crate) struct SealCopier {
    /// The node's meta replica, when it hosts one.
    meta: MetaReplica,
    /// The node's data dir (scopes failpoints to one test's cluster).
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    data_dir: std::path::PathBuf,
    /// Highest epoch proposed by this leader (0: nothing outstanding).
    proposed_upto: u64,
    proposed_at: Option<Instant>,
}

impl SealCopier {
    /// Proposes `ShardSeal` for the committed epochs this shard lacks. Proposals
    /// pipeline (each covers the epochs after the previous one); apply skips epochs
    /// already sealed, so a lost proposal is simply proposed again after a timeout.
    fn copy(&mut self, core: &mut GroupCore<ShardState>, meta_last: u64, opts: &RaftOptions) {
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
        fail::fail_point!(
            crate::failpoints::BEFORE_SHARD_SEAL,
            crate::failpoints::in_scope(&self.data_dir),
            |_| ()
        );
        let Some(meta) = (self.meta)() else {
            return;
        };
        let seals = meta
            .read()
            .meta
            .seals_after(self.proposed_upto, SHARD_SEAL_BATCH);
        let Some(last) = seals.last().map(|s| s.epoch) else {
            return;
        };
        let mut cmd = Command {
            op: Some(Op::ShardSeal(ShardSeal { seals })),
            ..Default::default()
        };
        // Proposal id 0: nobody waits for the outcome; the next pass reads the state.
        if core.propose(&mut cmd, 0).is_ok() {
            self.proposed_upto = last;
            self.proposed_at = Some(Instant::now());
        }
    }
}

impl SealCopier {
    pub(crate) fn new(meta: MetaReplica, data_dir: std::path::PathBuf) -> Self {
        SealCopier {
            meta,
            data_dir,
            proposed_upto: 0,
            proposed_at: None,
        }
    }
}

/// A leader's record of the members it saw acknowledge log entries (matched index > 0):
/// proposed as `MembersAcknowledged`, so every replica, and so any later leader, knows
/// which node ids have held the log (the start-up check of a node that lost its disk
/// reads it). A member is recorded once; a proposal lost with a leader change is
/// proposed again by the next leader, which sees the member acknowledge in its turn.
#[derive(Default)]
pub(crate) struct AckRecorder {
    proposed: std::collections::BTreeSet<u64>,
    proposed_at: Option<Instant>,
    checked_at: Option<Instant>,
}

/// How often a leader compares its progress with the recorded members (the duty runs
/// after every batch of messages; the record only needs to follow within a tick or so).
const ACK_CHECK_EVERY: Duration = Duration::from_millis(50);

impl AckRecorder {
    fn record(&mut self, core: &mut GroupCore<ShardState>, opts: &RaftOptions) {
        if self
            .checked_at
            .is_some_and(|t| t.elapsed() < ACK_CHECK_EVERY)
        {
            return;
        }
        self.checked_at = Some(Instant::now());
        let lost_after = Duration::from_millis(opts.tick_ms * opts.election_ticks as u64);
        if self.proposed_at.is_some_and(|t| t.elapsed() > lost_after) {
            self.proposed.clear();
            self.proposed_at = None;
        }
        let new: Vec<u64> = {
            let state = core.state();
            let st = state.read();
            if st.acked_members.len() >= crate::fsm::shard::ACKED_MEMBERS_MAX {
                return;
            }
            core.progress()
                .into_iter()
                .filter(|(id, matched)| {
                    *matched > 0 && !st.acked_members.contains(id) && !self.proposed.contains(id)
                })
                .map(|(id, _)| id)
                .collect()
        };
        if new.is_empty() {
            return;
        }
        let mut cmd = Command {
            op: Some(Op::MembersAcknowledged(MembersAcknowledged {
                node_ids: new.clone(),
            })),
            ..Default::default()
        };
        if core.propose(&mut cmd, 0).is_ok() {
            self.proposed.extend(new);
            self.proposed_at = Some(Instant::now());
        }
    }
}

/// What a group's leader runs beside Raft: the seal copy (data shards) and the record
/// of acknowledging members (every group).
pub(crate) struct LeaderWork {
    pub(crate) seals: Option<SealCopier>,
    pub(crate) acks: AckRecorder,
}

impl LeaderDuty<ShardState> for LeaderWork {
    fn run(&mut self, core: &mut GroupCore<ShardState>, meta_last: u64, opts: &RaftOptions) {
        if let Some(s) = self.seals.as_mut() {
            s.copy(core, meta_last, opts);
        }
        self.acks.record(core, opts);
    }

    fn reset(&mut self) {
        if let Some(s) = self.seals.as_mut() {
            s.proposed_upto = 0;
            s.proposed_at = None;
        }
        self.acks = AckRecorder::default();
    }
}
