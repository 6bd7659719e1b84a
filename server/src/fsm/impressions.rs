//! Served impressions and the step assignments of their feedback events, replicated on
//! the shard that owns each impression id ([`freshet_proto::impression_shard`]).
//!
//! A gateway appends what each Rank served (asynchronously, batched); any gateway reads
//! it back to join feedback, so gateways hold no state a restart loses. Before a worker's
//! step uses an event, the worker claims it here for (inc, step): the claim is a log
//! entry, so of two gateways or workers racing with the same event id exactly one wins,
//! and a later attempt learns where the event went (sealed: a duplicate; pending: wait
//! for that step; fenced below its step: claim it again).
//!
//! Retention is decided from the log alone: an impression expires once the sealed time
//! (the proposal time of the last applied seal, the coordinator's clock written into the
//! log) is more than the TTL past the sealed time at which it was appended, and the
//! oldest go first beyond the byte bound. Replicas never consult their own clocks, and
//! nothing here iterates a hash map.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use freshet_proto::command::v1::ImpressionEntry;
use freshet_proto::ps::v1::{
    AssignStatus, EventAssignResult, EventAssignment, EventRef, ImpressionRecord, StoredImpression,
};
use freshet_proto::FieldError;
use prost::Message;

use super::epoch::StepState;

/// How long an impression is kept, in sealed time.
pub const IMPRESSION_TTL_MS: u64 = 15 * 60 * 1000;
/// Bytes of impressions one shard keeps; beyond it the oldest are evicted.
pub const IMPRESSION_BYTES_MAX: usize = 256 << 20;
/// Impressions per append command.
pub const IMPRESSIONS_PER_APPEND_MAX: usize = 4096;
/// Events per assign command.
pub const EVENTS_PER_ASSIGN_MAX: usize = 10_000;
/// Distinct event ids one impression may carry (clicks, purchases, ... of its slots).
pub const EVENTS_PER_IMPRESSION_MAX: usize = 256;
/// Impression ids and event ids are short opaque strings.
pub const ID_BYTES_MAX: usize = 128;
/// Slots and candidates one impression may hold (Rank's own bounds are lower).
pub const SHOWN_MAX: usize = 1_000;
pub const CANDIDATES_MAX: usize = 100_000;
/// Fixed overhead counted per impression and per event on top of their encoded size.
const ENTRY_OVERHEAD: usize = 96;
const EVENT_OVERHEAD: usize = 48;

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    /// Shared with a snapshot being written (copy-on-write: claims copy the one they
    /// change), so freezing the impressions copies pointers, not records.
    stored: Arc<StoredImpression>,
    appended_ms: u64,
    seq: u64,
    bytes: usize,
}

/// Retention bounds of a shard's impressions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub ttl_ms: u64,
    pub bytes_max: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            ttl_ms: IMPRESSION_TTL_MS,
            bytes_max: IMPRESSION_BYTES_MAX,
        }
    }
}

/// Shortest and longest impression ttl (1 s, 7 days) and the byte bound's range per shard.
pub const RETENTION_TTL_MS: std::ops::RangeInclusive<u64> = 1_000..=7 * 24 * 3_600_000;
pub const RETENTION_BYTES: std::ops::RangeInclusive<u64> = (1 << 20)..=(64 << 30);

impl Retention {
    /// A retention as the cluster config or SetImpressionRetention gives it.
    ///
    /// # Errors
    /// The field out of range (`ttl_ms`, `bytes_max_per_shard`).
    pub fn checked(ttl_ms: u64, bytes_max_per_shard: u64) -> Result<Self, FieldError> {
        if !RETENTION_TTL_MS.contains(&ttl_ms) {
            return Err(FieldError::new(
                "ttl_ms",
                "must be 1,000..=604,800,000 (1 s to 7 days)",
            ));
        }
        if !RETENTION_BYTES.contains(&bytes_max_per_shard) {
            return Err(FieldError::new(
                "bytes_max_per_shard",
                "must be 1 MiB..=64 GiB",
            ));
        }
        let bytes_max = usize::try_from(bytes_max_per_shard)
            .map_err(|_| FieldError::new("bytes_max_per_shard", "too large for this node"))?;
        Ok(Retention { ttl_ms, bytes_max })
    }

    pub fn from_proto(r: &freshet_proto::ps::v1::ImpressionRetention) -> Result<Self, FieldError> {
        Retention::checked(r.ttl_ms, r.bytes_max_per_shard)
    }

    pub fn to_proto(self) -> freshet_proto::ps::v1::ImpressionRetention {
        freshet_proto::ps::v1::ImpressionRetention {
            ttl_ms: self.ttl_ms,
            bytes_max_per_shard: self.bytes_max as u64,
        }
    }
}

/// The impressions of one shard.
#[derive(Debug, Clone, Default)]
pub struct Impressions {
    /// Lookups only; decisions walk `order`.
    by_id: HashMap<String, Entry>,
    /// Append order (seq → id): the expiry and eviction order.
    order: BTreeMap<u64, String>,
    bytes: usize,
    next_seq: u64,
    /// Proposal time of the last applied seal: the shard's clock for retention.
    pub last_sealed_ms: u64,
    pub retention: Retention,
    /// Since this replica started or restored (not replicated state).
    pub expired: u64,
    pub evicted: u64,
}

/// Checks an impression as a gateway sends it.
///
/// # Errors
/// The field that breaks a bound, under `impressions[i]`.
pub fn validate(r: &ImpressionRecord, at: &str) -> Result<(), FieldError> {
    let bad = |f: &str, why: String| FieldError::new(format!("{at}.{f}"), why);
    if r.id.is_empty() || r.id.len() > ID_BYTES_MAX {
        return Err(bad("id", format!("must be 1..={ID_BYTES_MAX} bytes")));
    }
    if r.shown.is_empty() || r.shown.len() > SHOWN_MAX {
        return Err(bad("shown", format!("must hold 1..={SHOWN_MAX} slots")));
    }
    if r.candidates.len() > CANDIDATES_MAX {
        return Err(bad("candidates", format!("at most {CANDIDATES_MAX}")));
    }
    if let Some(i) = r
        .shown
        .iter()
        .position(|s| !(s.propensity > 0.0 && s.propensity <= 1.0))
    {
        return Err(bad(
            &format!("shown[{i}].propensity"),
            "must be in (0, 1]".into(),
        ));
    }
    if r.numeric.iter().any(|v| !v.is_finite()) {
        return Err(bad("numeric", "must be finite".into()));
    }
    // A row of the model (dim at most 4,096), finite like every stored row.
    if r.history.len() > 4096 || r.history.iter().any(|v| !v.is_finite()) {
        return Err(bad("history", "at most 4,096 finite values".into()));
    }
    let terms = freshet_model::query::QUERY_TERMS_MAX;
    if r.query_terms.len() > terms {
        return Err(bad("query_terms", format!("at most {terms}")));
    }
    let levels = freshet_model::query::LEXICAL_LEVELS;
    if !(r.lexical.is_empty()
        || (r.lexical.len() == r.candidates.len() && !r.query_terms.is_empty()))
        || r.lexical.iter().any(|l| *l > levels)
    {
        return Err(bad(
            "lexical",
            format!("must be empty, or with query_terms one level (0..={levels}) per candidate"),
        ));
    }
    Ok(())
}

/// One impression as the `impressions` field (14) of an `EpochSnapshot`, encoded from
/// the shared record: key, length, then the `ImpressionEntry` fields as prost writes
/// them (defaults left out). Appends to `out`.
pub fn encode_entry(seq: u64, appended_ms: u64, stored: &StoredImpression, out: &mut Vec<u8>) {
    use prost::encoding::{encode_key, encode_varint, message, uint64, WireType};
    let body = entry_body_len(seq, appended_ms, stored);
    encode_key(IMPRESSIONS_FIELD, WireType::LengthDelimited, out);
    encode_varint(body as u64, out);
    message::encode(1, stored, out);
    if appended_ms != 0 {
        uint64::encode(2, &appended_ms, out);
    }
    if seq != 0 {
        uint64::encode(3, &seq, out);
    }
}

fn entry_body_len(seq: u64, appended_ms: u64, stored: &StoredImpression) -> usize {
    use prost::encoding::{message, uint64};
    message::encoded_len(1, stored)
        + if appended_ms != 0 {
            uint64::encoded_len(2, &appended_ms)
        } else {
            0
        }
        + if seq != 0 {
            uint64::encoded_len(3, &seq)
        } else {
            0
        }
}

/// Bytes [`encode_entry`] appends.
pub fn entry_encoded_len(seq: u64, appended_ms: u64, stored: &StoredImpression) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    let body = entry_body_len(seq, appended_ms, stored);
    key_len(IMPRESSIONS_FIELD) + encoded_len_varint(body as u64) + body
}

/// The field number of `EpochSnapshot.impressions`.
const IMPRESSIONS_FIELD: u32 = 14;

fn entry_bytes(stored: &StoredImpression) -> usize {
    stored.record.as_ref().map_or(0, Message::encoded_len)
        + ENTRY_OVERHEAD
        + stored
            .events
            .iter()
            .map(|e| e.event_id.len() + EVENT_OVERHEAD)
            .sum::<usize>()
}

impl Impressions {
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// An impression with its events' assignments, if retained.
    pub fn get(&self, id: &str) -> Option<&StoredImpression> {
        self.by_id.get(id).map(|e| &*e.stored)
    }

    /// Appends impressions (validated by the caller; ids already held are kept as they
    /// are, so a re-sent batch changes nothing). Returns how many were new.
    pub fn append(&mut self, records: &[ImpressionRecord]) -> u32 {
        let mut appended = 0;
        for r in records {
            if self.by_id.contains_key(&r.id) {
                continue;
            }
            let stored = StoredImpression {
                record: Some(r.clone()),
                events: Vec::new(),
            };
            let bytes = entry_bytes(&stored);
            let seq = self.next_seq;
            self.next_seq += 1;
            self.order.insert(seq, r.id.clone());
            self.by_id.insert(
                r.id.clone(),
                Entry {
                    stored: Arc::new(stored),
                    appended_ms: self.last_sealed_ms,
                    seq,
                    bytes,
                },
            );
            self.bytes += bytes;
            appended += 1;
        }
        self.evict_over_bound();
        appended
    }

    fn remove_oldest(&mut self) {
        if let Some((_, id)) = self.order.pop_first() {
            let e = self.by_id.remove(&id).expect("order and map agree");
            self.bytes -= e.bytes;
        }
    }

    fn evict_over_bound(&mut self) {
        while self.bytes > self.retention.bytes_max && !self.order.is_empty() {
            self.remove_oldest();
            self.evicted += 1;
            metrics::counter!(crate::metrics::IMPRESSIONS_EVICTED).increment(1);
        }
    }

    /// A new retention (a seal carries it): from now on, and over the byte bound the
    /// oldest go at once.
    pub fn set_retention(&mut self, r: Retention) {
        self.retention = r;
        self.evict_over_bound();
    }

    /// A seal was applied: advances the sealed time and expires what it passed.
    pub fn on_seal(&mut self, proposed_at_ms: u64) {
        self.last_sealed_ms = self.last_sealed_ms.max(proposed_at_ms);
        while let Some((_, id)) = self.order.first_key_value() {
            let e = &self.by_id[id];
            if e.appended_ms.saturating_add(self.retention.ttl_ms) >= self.last_sealed_ms {
                break;
            }
            self.remove_oldest();
            self.expired += 1;
            metrics::counter!(crate::metrics::IMPRESSIONS_EXPIRED).increment(1);
        }
    }

    /// Claims each event for (inc, step), deciding from the log alone (see the module
    /// docs). `steps` says which steps are sealed and which incarnations fenced.
    pub fn assign(
        &mut self,
        inc: u64,
        step: u64,
        events: &[EventRef],
        steps: &StepState,
    ) -> Vec<EventAssignResult> {
        let result = |status: AssignStatus, inc: u64, step: u64| EventAssignResult {
            status: status as i32,
            inc,
            step,
        };
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let Some(e) = self.by_id.get_mut(&ev.impression_id) else {
                out.push(result(AssignStatus::NoImpression, 0, 0));
                continue;
            };
            let existing = e
                .stored
                .events
                .iter()
                .position(|a| a.event_id == ev.event_id);
            match existing {
                Some(k) => {
                    let a = &e.stored.events[k];
                    if (a.inc, a.step) == (inc, step) {
                        out.push(result(AssignStatus::Assigned, inc, step));
                        continue;
                    }
                    let state = steps.incs.get(&a.inc);
                    if a.sealed || state.is_some_and(|s| s.floor >= a.step) {
                        out.push(result(AssignStatus::Sealed, a.inc, a.step));
                    } else if state.is_some_and(|s| s.fenced) {
                        // Fenced below its step: that step never trains; claim it again.
                        let a = &mut Arc::make_mut(&mut e.stored).events[k];
                        a.inc = inc;
                        a.step = step;
                        out.push(result(AssignStatus::Assigned, inc, step));
                    } else {
                        out.push(result(AssignStatus::Pending, a.inc, a.step));
                    }
                }
                None if e.stored.events.len() >= EVENTS_PER_IMPRESSION_MAX => {
                    out.push(result(AssignStatus::Full, 0, 0));
                }
                None => {
                    Arc::make_mut(&mut e.stored).events.push(EventAssignment {
                        event_id: ev.event_id.clone(),
                        inc,
                        step,
                        sealed: false,
                    });
                    let added = ev.event_id.len() + EVENT_OVERHEAD;
                    e.bytes += added;
                    self.bytes += added;
                    out.push(result(AssignStatus::Assigned, inc, step));
                }
            }
        }
        self.evict_over_bound();
        out
    }

    /// Incarnations the shard forgot (fenced long ago, with their floors): their events'
    /// assignments settle now, sealed or released, because the shard can no longer tell.
    pub fn settle_forgotten(&mut self, forgotten: &[(u64, u64)]) {
        if forgotten.is_empty() {
            return;
        }
        let floors: BTreeMap<u64, u64> = forgotten.iter().copied().collect();
        for id in self.order.values() {
            let e = self.by_id.get_mut(id).expect("order and map agree");
            if !e.stored.events.iter().any(|a| floors.contains_key(&a.inc)) {
                continue; // unchanged: not copied if a snapshot shares it
            }
            Arc::make_mut(&mut e.stored)
                .events
                .retain_mut(|a| match floors.get(&a.inc) {
                    Some(floor) if a.step <= *floor => {
                        a.sealed = true;
                        true
                    }
                    Some(_) => false,
                    None => true,
                });
        }
    }

    /// Removes every impression served to one of `users` (their user-id rows); returns how
    /// many. Walks append order, so every replica removes the same ones.
    pub fn forget_users(&mut self, users: &std::collections::BTreeSet<u64>) -> usize {
        let gone: Vec<u64> = self
            .order
            .iter()
            .filter(|(_, id)| {
                self.by_id[*id]
                    .stored
                    .record
                    .as_ref()
                    .is_some_and(|r| r.has_user_id && users.contains(&r.user_id_row))
            })
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &gone {
            let id = self.order.remove(seq).expect("listed above");
            let e = self.by_id.remove(&id).expect("order and map agree");
            self.bytes -= e.bytes;
        }
        gone.len()
    }

    /// The snapshot form, in append order, gathered in memory (tests compare with it; snapshots stream
    /// [`Impressions::freeze`] instead).
    #[cfg(test)]
    pub fn encode(&self) -> Vec<ImpressionEntry> {
        self.order
            .values()
            .map(|id| {
                let e = &self.by_id[id];
                ImpressionEntry {
                    stored: Some((*e.stored).clone()),
                    appended_ms: e.appended_ms,
                    seq: e.seq,
                }
            })
            .collect()
    }

    /// The impressions in append order as (seq, appended_ms, record), sharing the
    /// records: what a snapshot writes ([`encode_entry`]) without copying them.
    pub fn freeze(&self) -> Vec<(u64, u64, Arc<StoredImpression>)> {
        self.order
            .values()
            .map(|id| {
                let e = &self.by_id[id];
                (e.seq, e.appended_ms, Arc::clone(&e.stored))
            })
            .collect()
    }

    /// Restores the snapshot form.
    pub fn decode(
        entries: Vec<ImpressionEntry>,
        last_sealed_ms: u64,
        next_seq: u64,
        retention: Retention,
    ) -> Self {
        let mut s = Impressions {
            last_sealed_ms,
            next_seq,
            retention,
            ..Default::default()
        };
        for ent in entries {
            let Some(stored) = ent.stored else { continue };
            let Some(id) = stored.record.as_ref().map(|r| r.id.clone()) else {
                continue;
            };
            let bytes = entry_bytes(&stored);
            s.bytes += bytes;
            s.order.insert(ent.seq, id.clone());
            s.by_id.insert(
                id,
                Entry {
                    stored: Arc::new(stored),
                    appended_ms: ent.appended_ms,
                    seq: ent.seq,
                    bytes,
                },
            );
        }
        s
    }

    /// Feeds the replica checksum, in append order.
    pub fn checksum_into(&self, mut feed: impl FnMut(&[u8])) {
        feed(&self.retention.ttl_ms.to_le_bytes());
        feed(&(self.retention.bytes_max as u64).to_le_bytes());
        feed(&self.last_sealed_ms.to_le_bytes());
        feed(&self.next_seq.to_le_bytes());
        for (seq, id) in &self.order {
            let e = &self.by_id[id];
            feed(&seq.to_le_bytes());
            feed(&e.appended_ms.to_le_bytes());
            feed(&e.stored.encode_to_vec());
        }
    }
}
