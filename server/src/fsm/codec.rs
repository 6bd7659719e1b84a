//! The snapshot codec and the replica checksum of a shard's state: ids in sorted order
//! (hash-map order differs between replicas), a version, and a CRC over the whole body.

use std::collections::BTreeSet;
use std::io::{self, Write};

use freshet_proto::command::v1::EpochSnapshot;
use freshet_proto::ps::v1::TableSpec;
use freshet_proto::splitmix64;
use prost::Message as _;

use super::epoch;
use super::optimizer::validate_spec;
use super::rows::Rows;
use super::session::Session;
use super::shard::ShardState;
use super::table::{name_hash, Table};
use crate::error::PsError;

const SNAPSHOT_MAGIC: &[u8] = b"FRESHET-SNAP";
/// 2 added the epoch section (meta registry and seals, buffered steps).
const SNAPSHOT_VERSION: u32 = 4;

/// Bytes a [`Sink`] gathers before it hands them on.
const SINK_BUFFER: usize = 64 * 1024;

/// Writes snapshot bytes through a buffer, keeping the CRC of everything written.
struct Sink<'a> {
    out: &'a mut dyn Write,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
}

impl<'a> Sink<'a> {
    fn new(out: &'a mut dyn Write) -> Self {
        Sink {
            out,
            buf: Vec::with_capacity(SINK_BUFFER),
            crc: crc32fast::Hasher::new(),
        }
    }
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= SINK_BUFFER {
            self.flush()?;
        }
        Ok(())
    }
    fn u32(&mut self, v: u32) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.crc.update(&self.buf);
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
    /// Writes what is buffered, then the CRC of the whole body.
    fn finish(mut self) -> io::Result<()> {
        self.flush()?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())
    }
}

/// One table as of a [`ShardState::freeze`].
#[derive(Debug)]
struct FrozenTable {
    spec: Vec<u8>,
    rows: Rows,
    sketch: Option<Vec<u16>>,
}

/// A shard's state frozen for a snapshot ([`ShardState::freeze`]); [`Frozen::write`]
/// gives [`ShardState::encode`]'s bytes.
#[derive(Debug)]
pub struct Frozen {
    shard: u32,
    applied_index: u64,
    applied_term: u64,
    tables: Vec<FrozenTable>,
    sessions: Vec<(u64, Session)>,
    // Cloned as they are and encoded by `write`, off the group's task.
    meta: epoch::MetaState,
    steps: epoch::StepState,
    /// (seq, appended_ms, record) in append order, records shared copy-on-write.
    impressions: Vec<(
        u64,
        u64,
        std::sync::Arc<freshet_proto::ps::v1::StoredImpression>,
    )>,
    /// The impressions' clock, next seq and retention.
    impression_state: (u64, u64, super::impressions::Retention),
    forget_guards: super::forget::ForgetGuards,
    acked_members: Vec<u64>,
}

impl Frozen {
    /// Streams the snapshot bytes to `out`: header, tables (rows in id order), sessions,
    /// epoch state, CRC. Memory beyond the frozen state: one (id, slot) pair per row of
    /// the table being written, and a 64 KiB buffer.
    ///
    /// # Errors
    /// `out`'s errors.
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut w = Sink::new(out);
        w.bytes(SNAPSHOT_MAGIC)?;
        w.u32(SNAPSHOT_VERSION)?;
        w.u32(self.shard)?;
        w.u64(self.applied_index)?;
        w.u64(self.applied_term)?;
        w.u32(self.tables.len() as u32)?;
        for t in &self.tables {
            w.u32(t.spec.len() as u32)?;
            w.bytes(&t.spec)?;
            let mut slots: Vec<(u64, u32)> = t
                .rows
                .iter()
                .enumerate()
                .map(|(slot, (id, _))| (id, slot as u32))
                .collect();
            slots.sort_unstable();
            w.u64(slots.len() as u64)?;
            for (id, slot) in slots {
                w.u64(id)?;
                w.u64(t.rows.touched(slot as usize))?;
                for v in t.rows.row(slot as usize) {
                    w.bytes(&v.to_le_bytes())?;
                }
            }
            // Version 4: the admission sketch (0 counters when the table has none).
            let counts = t.sketch.as_deref().unwrap_or(&[]);
            w.u32(counts.len() as u32)?;
            for c in counts {
                w.bytes(&c.to_le_bytes())?;
            }
        }
        w.u32(self.sessions.len() as u32)?;
        for (c, s) in &self.sessions {
            w.u64(*c)?;
            w.u64(s.floor)?;
            w.u64(s.last_index)?;
            w.u32(s.above.len() as u32)?;
            for seq in &s.above {
                w.u64(*seq)?;
            }
        }
        let mut ep = epoch::encode(&self.meta, &self.steps);
        let (last_sealed_ms, next_seq, retention) = self.impression_state;
        ep.last_sealed_ms = last_sealed_ms;
        ep.next_impression_seq = next_seq;
        ep.impression_ttl_ms = retention.ttl_ms;
        ep.impression_bytes_max = retention.bytes_max as u64;
        ep.forget_guards = self.forget_guards.encode();
        ep.acked_members = self.acked_members.clone();
        // The impressions (up to the retention's byte bound) are streamed as field 14
        // after the rest, one record at a time from the shared copies, never gathered
        // into one message (a reader merges fields in any order).
        let ep = ep.encode_to_vec();
        let total = ep.len()
            + self
                .impressions
                .iter()
                .map(|(seq, ms, stored)| super::impressions::entry_encoded_len(*seq, *ms, stored))
                .sum::<usize>();
        w.u64(total as u64)?;
        let mut entry = Vec::new();
        w.bytes(&ep)?;
        for (seq, appended_ms, stored) in &self.impressions {
            entry.clear();
            super::impressions::encode_entry(*seq, *appended_ms, stored, &mut entry);
            w.bytes(&entry)?;
        }
        w.finish()
    }
}

struct Reader<'a>(&'a [u8]);
impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// Order-dependent 64-bit hash (splitmix64 chaining); fast and stable across builds.
#[derive(Default)]
struct Hasher(u64);
impl Hasher {
    fn word(&mut self, w: u64) {
        self.0 = splitmix64(self.0 ^ w);
    }
    fn bytes(&mut self, b: &[u8]) {
        for c in b.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        self.word(b.len() as u64);
    }
}

impl ShardState {
    /// Checksum over sorted state: table specs, every row's values and optimizer slots,
    /// and the sessions. Equal on replicas at the same applied index.
    pub fn checksum(&self) -> u64 {
        let mut h = Hasher::default();
        for (name, t) in &self.tables {
            h.word(name_hash(name));
            h.bytes(&t.spec.encode_to_vec());
            let limited = t.spec.limits.is_some();
            for (id, slot) in t.sorted_slots() {
                h.word(id);
                // Row times are state only while they decide removals.
                if limited {
                    h.word(t.rows.touched(slot));
                }
                for v in t.row(slot) {
                    h.word(u64::from(v.to_bits()));
                }
            }
            if let Some(sketch) = &t.sketch {
                for c in sketch.counts.chunks(4) {
                    h.word(c.iter().fold(0u64, |w, v| (w << 16) | u64::from(*v)));
                }
            }
        }
        let mut clients: Vec<_> = self.sessions.iter().collect();
        clients.sort_unstable_by_key(|(c, _)| **c);
        for (c, s) in clients {
            h.word(*c);
            h.word(s.floor);
            for seq in &s.above {
                h.word(*seq);
            }
        }
        // Sealed state only: buffered steps are not (yet) part of the model.
        h.word(self.steps.last_sealed);
        for (inc, s) in &self.steps.incs {
            h.word(*inc);
            h.word(s.floor);
            h.word(u64::from(s.fenced));
        }
        for item in self.steps.items.values() {
            h.bytes(&item.encode_to_vec());
        }
        for (name, items) in &self.steps.sets {
            h.word(name_hash(name));
            for id in items {
                h.word(*id);
            }
        }
        self.impressions.checksum_into(|b| h.bytes(b));
        self.forget_guards.checksum_into(|w| h.word(w));
        h.word(self.meta.last_sealed);
        h.word(self.meta.next_inc);
        for w in self.meta.workers.values() {
            h.word(w.inc);
            h.word(w.cut);
            h.word(u64::from(w.fenced));
        }
        h.0
    }

    /// Serialises the state with ids in sorted order (the bytes [`ShardState::freeze`]
    /// and [`Frozen::write`] give).
    pub fn encode(&self) -> Vec<u8> {
        let rows: usize = self.tables.values().map(Table::row_bytes).sum::<u64>() as usize;
        let mut out = Vec::with_capacity(64 + rows + self.tables.len() * 64);
        self.freeze()
            .write(&mut out)
            .expect("writing to a Vec cannot fail");
        out
    }

    /// The state as of now, for a snapshot written off the group's task: the tables'
    /// row chunks are shared copy-on-write (no row is copied here; a write to a chunk
    /// while the snapshot holds it copies that chunk), and so are the impressions' records
    /// (a claim copies the one it changes); the rest (sessions, epoch state) is cloned.
    /// The id index is not needed: the snapshot walks the rows.
    pub fn freeze(&self) -> Frozen {
        let tables = self
            .tables
            .values()
            .map(|t| FrozenTable {
                spec: t.spec.encode_to_vec(),
                rows: t.rows.clone(),
                sketch: t.sketch.as_ref().map(|s| s.counts.clone()),
            })
            .collect();
        let mut clients: Vec<_> = self.sessions.iter().map(|(c, s)| (*c, s.clone())).collect();
        clients.sort_unstable_by_key(|(c, _)| *c);
        Frozen {
            shard: self.shard,
            applied_index: self.applied_index,
            applied_term: self.applied_term,
            tables,
            sessions: clients,
            meta: self.meta.clone(),
            steps: self.steps.clone(),
            impressions: self.impressions.freeze(),
            impression_state: (
                self.impressions.last_sealed_ms,
                self.impressions.next_seq(),
                self.impressions.retention,
            ),
            forget_guards: self.forget_guards.clone(),
            acked_members: self.acked_members.iter().copied().collect(),
        }
    }

    /// Restores a state written by [`ShardState::encode`].
    ///
    /// # Errors
    /// [`PsError::Corrupt`] on a bad checksum, version or truncated data.
    pub fn decode(data: &[u8]) -> Result<Self, PsError> {
        let bad = |what: &str| PsError::Corrupt(format!("snapshot: {what}"));
        if data.len() < 8 + SNAPSHOT_MAGIC.len() {
            return Err(bad("too short"));
        }
        let (body, crc) = data.split_at(data.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("checksum mismatch"));
        }
        let mut r = Reader(body);
        if r.take(SNAPSHOT_MAGIC.len()).ok_or_else(|| bad("magic"))? != SNAPSHOT_MAGIC {
            return Err(bad("magic"));
        }
        let version = r.u32().ok_or_else(|| bad("version"))?;
        if !(1..=SNAPSHOT_VERSION).contains(&version) {
            return Err(bad("unsupported version"));
        }
        let mut s = ShardState::new(r.u32().ok_or_else(|| bad("shard"))?);
        s.applied_index = r.u64().ok_or_else(|| bad("index"))?;
        s.applied_term = r.u64().ok_or_else(|| bad("term"))?;
        let n_tables = r.u32().ok_or_else(|| bad("tables"))?;
        for _ in 0..n_tables {
            let len = r.u32().ok_or_else(|| bad("spec"))? as usize;
            let spec = TableSpec::decode(r.take(len).ok_or_else(|| bad("spec"))?)
                .map_err(|_| bad("spec"))?;
            let optimizer = validate_spec(&spec).map_err(|e| bad(&e.to_string()))?;
            let mut t = Table::new(spec, optimizer);
            let n_rows = r.u64().ok_or_else(|| bad("rows"))? as usize;
            if n_rows > body.len() / 8 {
                return Err(bad("row count"));
            }
            t.rows.reserve(n_rows);
            for slot in 0..n_rows {
                let id = r.u64().ok_or_else(|| bad("row id"))?;
                // Version 3 carries each row's last update time (RowLimits).
                let touched = if version >= 3 {
                    r.u64().ok_or_else(|| bad("row time"))?
                } else {
                    0
                };
                if touched == super::table::UNSTAMPED {
                    t.unstamped.insert(id);
                }
                let raw = r.take(t.stride * 4).ok_or_else(|| bad("row data"))?;
                if t.contains(id) {
                    return Err(bad("a row id twice"));
                }
                let at = t.rows.push(id, touched);
                debug_assert_eq!(at, slot);
                for (v, b) in t.rows.row_mut(at).iter_mut().zip(raw.chunks_exact(4)) {
                    *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                }
                t.index_slot(at);
            }
            if version >= 4 {
                let n = r.u32().ok_or_else(|| bad("sketch"))? as usize;
                let want = t.sketch.as_ref().map_or(0, |s| s.counts.len());
                if n != want {
                    return Err(bad("sketch size does not match the table's admission"));
                }
                if let Some(sketch) = &mut t.sketch {
                    let raw = r.take(n * 2).ok_or_else(|| bad("sketch"))?;
                    for (c, b) in sketch.counts.iter_mut().zip(raw.chunks_exact(2)) {
                        *c = u16::from_le_bytes([b[0], b[1]]);
                    }
                }
            }
            s.tables.insert(t.spec.name.clone(), t);
        }
        let n_sessions = r.u32().ok_or_else(|| bad("sessions"))?;
        for _ in 0..n_sessions {
            let c = r.u64().ok_or_else(|| bad("session"))?;
            let floor = r.u64().ok_or_else(|| bad("session"))?;
            let last_index = r.u64().ok_or_else(|| bad("session"))?;
            let n = r.u32().ok_or_else(|| bad("session"))?;
            let mut above = BTreeSet::new();
            for _ in 0..n {
                above.insert(r.u64().ok_or_else(|| bad("session"))?);
            }
            s.sessions.insert(
                c,
                Session {
                    floor,
                    above,
                    last_index,
                },
            );
        }
        if version >= 2 {
            let len = r.u64().ok_or_else(|| bad("epoch state"))? as usize;
            let raw = r.take(len).ok_or_else(|| bad("epoch state"))?;
            let mut snap = EpochSnapshot::decode(raw).map_err(|_| bad("epoch state"))?;
            let mut retention = s.impressions.retention;
            if snap.impression_ttl_ms > 0 {
                retention.ttl_ms = snap.impression_ttl_ms;
            }
            if snap.impression_bytes_max > 0 {
                retention.bytes_max = snap.impression_bytes_max as usize;
            }
            s.impressions = super::impressions::Impressions::decode(
                std::mem::take(&mut snap.impressions),
                snap.last_sealed_ms,
                snap.next_impression_seq,
                retention,
            );
            s.forget_guards = super::forget::ForgetGuards::decode(&snap.forget_guards);
            s.acked_members = std::mem::take(&mut snap.acked_members)
                .into_iter()
                .take(super::shard::ACKED_MEMBERS_MAX)
                .collect();
            let (meta, steps) = epoch::decode(snap, s.is_meta());
            s.meta = meta;
            s.steps = steps;
        }
        Ok(s)
    }
}
