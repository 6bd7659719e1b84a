//! Forgetting a user (a user's right to have their data deleted), on a data shard.
//!
//! The meta group commits a seal that names the users' row ids
//! ([`freshet_model::user_id_row`], the hash every table keys a user's own rows by); each
//! shard applies it like any seal, so the forget is one epoch everywhere: after that
//! seal's steps, the shard removes the users' rows from every sparse table (the removal
//! rides in the epoch's change set, so gateways drop the rows in that version) and every
//! impression served to them (so no feedback on them can be claimed and trained after).
//!
//! One gap remains: a step whose events were claimed before the forget may seal after it
//! and would write the user's row again. For [`FORGET_GUARD_MS`] of sealed time the shard
//! drops step gradients to a forgotten id (direct pushes, an operator's bulk loads, are
//! not held back). A returning user is fresh: their own rows start from initial values
//! once the guard ends; during it their clicks still train every shared row.

use std::collections::{BTreeMap, BTreeSet};

use freshet_proto::command::v1::ForgetGuard;
use freshet_proto::ps::v1::RemovedRows;

use super::shard::ShardState;

/// How long (sealed time) gradients to a forgotten id from steps are dropped: well above
/// the claim → seal time of a live worker's step (a worker that stalls longer is fenced
/// at its lease, and its unsealed steps never apply).
pub const FORGET_GUARD_MS: u64 = 60_000;
/// Guards a shard keeps; past it the ones that end first go.
pub const GUARDS_MAX: usize = 100_000;

/// Forgotten ids and the sealed time their guard ends, replicated state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForgetGuards {
    until: BTreeMap<u64, u64>,
}

impl ForgetGuards {
    /// Whether step gradients to `id` are dropped now.
    pub fn blocks(&self, id: u64) -> bool {
        self.until.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }

    fn insert(&mut self, id: u64, until_ms: u64) {
        self.until.insert(id, until_ms);
        while self.until.len() > GUARDS_MAX {
            // The guard that ends first (ties: the lower id): from the map's contents only.
            let (&first, _) = self
                .until
                .iter()
                .min_by_key(|(id, until)| (**until, **id))
                .expect("non-empty");
            self.until.remove(&first);
        }
    }

    /// Ends the guards whose time passed at a seal at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        if !self.until.is_empty() {
            self.until.retain(|_, until| *until >= now_ms);
        }
    }

    pub fn encode(&self) -> Vec<ForgetGuard> {
        self.until
            .iter()
            .map(|(&id, &until_ms)| ForgetGuard { id, until_ms })
            .collect()
    }

    pub fn decode(guards: &[ForgetGuard]) -> Self {
        ForgetGuards {
            until: guards.iter().map(|g| (g.id, g.until_ms)).collect(),
        }
    }

    pub fn checksum_into(&self, mut word: impl FnMut(u64)) {
        for (id, until) in &self.until {
            word(*id);
            word(*until);
        }
    }
}

impl ShardState {
    /// Applies a seal's forgets at sealed time `now_ms`: removes the users' impressions
    /// and their rows in every sparse table (dropped from `changed`), guards their ids,
    /// and asks for a snapshot so the files on disk soon hold no copy of the rows.
    /// Returns the removed rows per table.
    pub(super) fn forget_users(
        &mut self,
        users: &[u64],
        now_ms: u64,
        changed: &mut BTreeMap<String, BTreeSet<u64>>,
    ) -> Vec<RemovedRows> {
        let set: BTreeSet<u64> = users.iter().copied().collect();
        let impressions = self.impressions.forget_users(&set);
        let mut removed = Vec::new();
        for (name, t) in &mut self.tables {
            let ids: Vec<u64> = set.iter().copied().filter(|id| t.forget(*id)).collect();
            if let Some(c) = changed.get_mut(name) {
                for id in &set {
                    c.remove(id);
                }
            }
            if !ids.is_empty() {
                removed.push(RemovedRows {
                    table: name.clone(),
                    ids,
                });
            }
        }
        for id in &set {
            self.forget_guards
                .insert(*id, now_ms.saturating_add(FORGET_GUARD_MS));
        }
        self.snapshot_requested = true;
        tracing::info!(
            shard = self.shard,
            users = set.len(),
            impressions,
            tables = removed.len(),
            "forgot users"
        );
        removed
    }
}
