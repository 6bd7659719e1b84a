//! The shard seal (README, "The consistency protocol"): each data-shard leader reads
//! the committed seals of its node's meta replica and proposes `ShardSeal` for the epochs
//! its shard lacks. Applying it ([`crate::fsm::ShardState`]) applies the buffered steps
//! within the cuts, in order and idempotently.

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::command::v1::{command::Op, Command, ShardSeal};

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

impl LeaderDuty<ShardState> for SealCopier {
    fn run(&mut self, core: &mut GroupCore<ShardState>, meta_last: u64, opts: &RaftOptions) {
        self.copy(core, meta_last, opts);
    }

    fn reset(&mut self) {
        self.proposed_upto = 0;
        self.proposed_at = None;
    }
}
