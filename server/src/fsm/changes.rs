//! Recent per-epoch change sets of one shard replica, for subscribers (gateways).
//!
//! Every replica applies the same seals, so every replica emits the same change sets
//! and a subscriber may read from any of them. The log is bounded by count and bytes; a
//! subscriber that asks for an epoch no longer here bootstraps again from the replica's
//! sealed state.

use std::collections::VecDeque;
use std::sync::Arc;

use freshet_proto::ps::v1::ChangeSet;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::watch;

/// Change sets kept per replica.
pub const CHANGES_KEPT: usize = 4096;
/// Bytes of change sets kept per replica: a quarter of what the shard's rows hold
/// (`ChangeSet::state_bytes`), within these bounds. A fixed 256 MiB per replica was
/// most of a node's memory under a capped table (every node holds a replica of every
/// shard): 2M ids capped at 200,000 rows per shard cost 298 bytes per row against the
/// table's 144. A subscriber lagging past the log bootstraps again, which is what a
/// gateway that far behind should do anyway.
pub const CHANGES_BYTES_MAX: usize = 256 << 20;
pub const CHANGES_BYTES_MIN: usize = 16 << 20;

/// The byte budget of the change-set log for a shard whose rows hold `state_bytes`.
pub fn changes_budget(state_bytes: u64) -> usize {
    usize::try_from(state_bytes / 4)
        .unwrap_or(usize::MAX)
        .clamp(CHANGES_BYTES_MIN, CHANGES_BYTES_MAX)
}

#[derive(Default)]
struct Inner {
    sets: VecDeque<(Arc<ChangeSet>, usize)>,
    bytes: usize,
}

/// A bounded log of recent change sets plus a watch of the newest epoch in it.
pub struct ChangeLog {
    inner: Mutex<Inner>,
    newest: watch::Sender<u64>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        ChangeLog {
            inner: Mutex::new(Inner::default()),
            newest: watch::channel(0).0,
        }
    }
}

/// What a subscriber gets for "everything after epoch e".
pub enum Since {
    /// The change sets after e that are here (possibly none yet).
    Sets(Vec<Arc<ChangeSet>>),
    /// Epoch e+1 is no longer (or not yet known to be) in the log: bootstrap again.
    Gap,
}

impl crate::raft::Feed<ChangeSet> for ChangeLog {
    fn publish(&self, effects: Vec<ChangeSet>) {
        for cs in effects {
            self.push(cs);
        }
    }
}

impl ChangeLog {
    pub fn push(&self, cs: ChangeSet) {
        let size = cs.encoded_len();
        let epoch = cs.epoch;
        {
            let mut g = self.inner.lock();
            // A replica restored from a snapshot starts a new run: drop what cannot chain.
            if let Some((last, _)) = g.sets.back() {
                if cs.first_epoch != last.epoch + 1 {
                    g.sets.clear();
                    g.bytes = 0;
                }
            }
            let budget = changes_budget(cs.state_bytes);
            g.sets.push_back((Arc::new(cs), size));
            g.bytes += size;
            while g.sets.len() > CHANGES_KEPT || (g.bytes > budget && g.sets.len() > 1) {
                let (_, n) = g.sets.pop_front().expect("non-empty");
                g.bytes -= n;
            }
        }
        self.newest.send_replace(epoch);
    }

    /// Change sets after `after`, at most `max`.
    pub fn since(&self, after: u64, max: usize) -> Since {
        let g = self.inner.lock();
        let Some((first, _)) = g.sets.front() else {
            return Since::Sets(Vec::new());
        };
        if after + 1 < first.first_epoch {
            return Since::Gap;
        }
        Since::Sets(
            g.sets
                .iter()
                .filter(|(cs, _)| cs.epoch > after)
                .take(max)
                .map(|(cs, _)| Arc::clone(cs))
                .collect(),
        )
    }

    /// Oldest epoch a subscriber can resume after without bootstrapping (None: empty).
    pub fn oldest_resumable(&self) -> Option<u64> {
        self.inner
            .lock()
            .sets
            .front()
            .map(|(cs, _)| cs.first_epoch - 1)
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(first: u64, epoch: u64) -> ChangeSet {
        ChangeSet {
            first_epoch: first,
            epoch,
            ..Default::default()
        }
    }

    #[test]
    fn resumes_inside_the_window_and_reports_gaps_outside() {
        let log = ChangeLog::default();
        for e in 1..=(CHANGES_KEPT as u64 + 5) {
            log.push(cs(e, e));
        }
        assert_eq!(log.oldest_resumable(), Some(5));
        assert!(matches!(log.since(3, 10), Since::Gap));
        let Since::Sets(got) = log.since(5, 2) else {
            panic!("expected sets")
        };
        assert_eq!(got.iter().map(|c| c.epoch).collect::<Vec<_>>(), vec![6, 7]);
        // A run that does not chain (replica restored from a snapshot) replaces the log.
        log.push(cs(10_000, 10_000));
        assert_eq!(log.oldest_resumable(), Some(9_999));
    }

    /// The log holds about a quarter of the shard's row bytes, within its bounds.
    #[test]
    fn keeps_bytes_in_proportion_to_the_state() {
        // About 1 MiB per change set.
        let big = |e: u64, state_bytes: u64| ChangeSet {
            fenced: vec![u64::MAX; 105_000],
            state_bytes,
            ..cs(e, e)
        };
        let one = big(1, 0).encoded_len();
        for (state, budget) in [
            (200u64 << 20, 50usize << 20),
            (1 << 20, CHANGES_BYTES_MIN),
            (64 << 30, CHANGES_BYTES_MAX),
        ] {
            assert_eq!(changes_budget(state), budget);
            let log = ChangeLog::default();
            for e in 1..=400 {
                log.push(big(e, state));
            }
            let kept = 400 - log.oldest_resumable().unwrap() as usize;
            assert_eq!(kept, (budget / one).min(400), "state {state}");
        }
    }
}
