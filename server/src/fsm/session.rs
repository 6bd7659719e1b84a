//! Exactly-once sessions of direct (client_id, seq) pushes.

use std::collections::BTreeSet;

/// Exactly-once bookkeeping of one client on one shard: every seq ≤ `floor` is applied,
/// and `above` holds the applied seqs beyond it. Exact, not "highest seen": pipelined
/// pushes may commit out of order across a leader change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    pub floor: u64,
    pub above: BTreeSet<u64>,
    pub last_index: u64,
}

impl Session {
    pub fn contains(&self, seq: u64) -> bool {
        seq <= self.floor || self.above.contains(&seq)
    }

    pub(super) fn record(&mut self, seq: u64, index: u64) {
        self.last_index = index;
        if seq == self.floor + 1 {
            self.floor = seq;
            while self.above.remove(&(self.floor + 1)) {
                self.floor += 1;
            }
        } else if seq > self.floor {
            self.above.insert(seq);
        }
    }
}
