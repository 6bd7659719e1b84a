//! Node-wide write-ahead log with group commit.
//!
//! Every Raft group on a node appends its entries and hard state to one segmented log.
//! A single writer thread drains whatever batches are queued, writes them, and issues
//! one `fdatasync` for all of them, so one fsync covers the Ready of every group that
//! was waiting (group commit). Records carry a CRC32. Replay tells a torn tail from
//! corruption: a damaged record with nothing intact after it (an incomplete last
//! record, or garbage up to the end of the file: a write the crash interrupted, never
//! acknowledged) is truncated away; a damaged record followed by an intact one, or a
//! damaged segment that is not the last, is corruption of data this node may have
//! acknowledged, and opening fails naming the segment and the byte offset (the operator
//! replaces the node; its peers hold the log). The price: a crash that persisted a later
//! page of an unsynced batch but not an earlier one reads as corruption too, and the
//! node waits for an operator instead of truncating.
//!
//! Why not an embedded B-tree store: the log is append-only and read back only at
//! start-up, so a sequential file is the cheapest durable structure; a copy-on-write
//! B-tree would rewrite pages for every entry. Snapshots live in their own files
//! (see [`crate::snapshot`]), which is what lets whole segments be deleted.
//!
//! Record layout: `len: u32 | crc32(payload): u32 | payload`, payload =
//! `kind: u8 | group: u64 | body`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};
use tokio::sync::{mpsc, oneshot};

use crate::error::PsError;

const KIND_ENTRIES: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
/// Drop every entry of the group written before this record (a snapshot replaced the log).
const KIND_CLEAR: u8 = 3;
/// The group's replica was removed from this node.
const KIND_TOMBSTONE: u8 = 4;

/// A record larger than this is corruption, not data (bounds replay allocations).
const RECORD_BYTES_MAX: u32 = 256 << 20;
/// Batches queued for the writer thread; a full queue applies back-pressure to the groups.
const QUEUE_BATCHES_MAX: usize = 1024;
/// One write call covers at most this many bytes before it syncs.
const GROUP_COMMIT_BYTES_MAX: usize = 32 << 20;

/// What one group asks to make durable in one Ready.
#[derive(Default, Debug, Clone)]
pub struct GroupWrite {
    pub group: u64,
    /// Drop the group's older entries first (snapshot installed).
    pub clear: bool,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub tombstone: bool,
}

impl GroupWrite {
    pub fn is_empty(&self) -> bool {
        !self.clear && self.entries.is_empty() && self.hard_state.is_none() && !self.tombstone
    }
}

/// The log of one group as recovered at start-up.
#[derive(Default, Debug)]
pub struct RecoveredGroup {
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub tombstoned: bool,
}

enum Request {
    Write {
        write: GroupWrite,
        done: oneshot::Sender<Result<(), PsError>>,
    },
    /// Entries of `group` up to `index` are covered by a durable snapshot.
    Compacted { group: u64, index: u64 },
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Wal {
    tx: mpsc::Sender<Request>,
}

/// Options of the log.
#[derive(Debug, Clone)]
pub struct WalOptions {
    pub segment_bytes_max: u64,
    /// fdatasync after every group commit. Off only for tests that measure nothing durable.
    pub fsync: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes_max: 64 << 20,
            fsync: true,
        }
    }
}

struct SegmentInfo {
    path: PathBuf,
    /// Largest entry index per group in this segment.
    max_index: HashMap<u64, u64>,
}

struct Writer {
    dir: PathBuf,
    opts: WalOptions,
    file: File,
    file_bytes: u64,
    next_seq: u64,
    /// Closed segments, oldest first.
    closed: Vec<SegmentInfo>,
    active: SegmentInfo,
    /// Latest hard state per group, re-written at the head of every new segment so that
    /// deleting old segments never loses it.
    hard_states: HashMap<u64, Vec<u8>>,
    tombstoned: HashMap<u64, bool>,
    compacted: HashMap<u64, u64>,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

fn encode_record(buf: &mut Vec<u8>, kind: u8, group: u64, body: &[u8]) {
    let len = (1 + 8 + body.len()) as u32;
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    buf.push(kind);
    buf.extend_from_slice(&group.to_le_bytes());
    buf.extend_from_slice(body);
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let mut body = Vec::with_capacity(entries.iter().map(|e| e.data.len() + 32).sum());
    body.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        let bytes = e.write_to_bytes().expect("entry encodes");
        body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        body.extend_from_slice(&bytes);
    }
    body
}

fn decode_entries(mut body: &[u8]) -> Option<Vec<Entry>> {
    let n = read_u32(&mut body)? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let len = read_u32(&mut body)? as usize;
        if body.len() < len {
            return None;
        }
        let e = Entry::parse_from_bytes(&body[..len]).ok()?;
        body = &body[len..];
        out.push(e);
    }
    Some(out)
}

fn read_u32(b: &mut &[u8]) -> Option<u32> {
    if b.len() < 4 {
        return None;
    }
    let v = u32::from_le_bytes(b[..4].try_into().ok()?);
    *b = &b[4..];
    Some(v)
}

/// Appends `entries` to a recovered log with Raft's overwrite rule: an entry at index i
/// replaces i and everything after it.
pub fn append_with_overwrite(log: &mut Vec<Entry>, entries: &[Entry]) {
    let Some(first) = entries.first() else {
        return;
    };
    if let Some(pos) = log.iter().position(|e| e.index >= first.index) {
        log.truncate(pos);
    }
    log.extend_from_slice(entries);
}

impl Wal {
    /// Opens (or creates) the log in `dir`, replays it, and starts the writer thread.
    ///
    /// # Errors
    /// I/O errors opening or reading the segments.
    pub fn open(
        dir: &Path,
        opts: WalOptions,
    ) -> Result<(Wal, BTreeMap<u64, RecoveredGroup>), PsError> {
        fs::create_dir_all(dir)?;
        let mut seqs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".wal")?.parse::<u64>().ok()
            })
            .collect();
        seqs.sort_unstable();
        let mut groups: BTreeMap<u64, RecoveredGroup> = BTreeMap::new();
        let mut closed = Vec::new();
        let mut hard_states = HashMap::new();
        let mut tombstoned = HashMap::new();
        let last_seq = seqs.last().copied();
        for &seq in &seqs {
            let path = segment_path(dir, seq);
            let (info, valid_len) = replay_segment(&path, &mut groups, &mut hard_states)?;
            let file_len = fs::metadata(&path)?.len();
            if valid_len < file_len {
                if Some(seq) != last_seq {
                    return Err(PsError::Corrupt(format!(
                        "segment {} is damaged at byte {valid_len} and is not the last one",
                        path.display()
                    )));
                }
                tracing::warn!(segment = %path.display(), valid_len, file_len, "truncating torn wal tail");
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(valid_len)?;
                f.sync_all()?;
            }
            closed.push(info);
        }
        for (g, rec) in &groups {
            if rec.tombstoned {
                tombstoned.insert(*g, true);
            }
        }
        // Always start a fresh segment: simpler than appending after a truncated tail.
        let next_seq = last_seq.map_or(1, |s| s + 1);
        let path = segment_path(dir, next_seq);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(dir)?;
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            opts,
            file,
            file_bytes: 0,
            next_seq: next_seq + 1,
            closed,
            active: SegmentInfo {
                path,
                max_index: HashMap::new(),
            },
            hard_states,
            tombstoned,
            compacted: HashMap::new(),
        };
        writer.write_checkpoint()?;
        let (tx, rx) = mpsc::channel(QUEUE_BATCHES_MAX);
        std::thread::Builder::new()
            .name("freshet-wal".into())
            .spawn(move || writer.run(rx))?;
        Ok((Wal { tx }, groups))
    }

    /// Makes `write` durable; resolves once it is on disk (with every other group's
    /// write that shared the same fsync).
    ///
    /// # Errors
    /// [`PsError::Storage`] when the write or the fsync failed; the node must stop.
    pub async fn write(&self, write: GroupWrite) -> Result<(), PsError> {
        if write.is_empty() {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request::Write { write, done })
            .await
            .map_err(|_| PsError::Storage("wal writer stopped".into()))?;
        rx.await
            .map_err(|_| PsError::Storage("wal writer stopped".into()))?
    }

    /// Tells the log that `group` needs no entry at or below `index` any more.
    pub fn compacted(&self, group: u64, index: u64) {
        // Best effort: a full queue only delays segment deletion.
        let _ = self.tx.try_send(Request::Compacted { group, index });
    }
}

fn replay_segment(
    path: &Path,
    groups: &mut BTreeMap<u64, RecoveredGroup>,
    hard_states: &mut HashMap<u64, Vec<u8>>,
) -> Result<(SegmentInfo, u64), PsError> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut info = SegmentInfo {
        path: path.to_path_buf(),
        max_index: HashMap::new(),
    };
    let mut offset = 0u64;
    let mut header = [0u8; 8];
    loop {
        if read_full(&mut r, &mut header)? < 8 {
            break;
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if !(9..=RECORD_BYTES_MAX).contains(&len) {
            break;
        }
        let mut payload = vec![0u8; len as usize];
        if read_full(&mut r, &mut payload)? < payload.len() {
            break; // an incomplete last record: torn
        }
        if crc32fast::hash(&payload) != crc {
            if next_record_intact(&mut r)? {
                return Err(PsError::Corrupt(format!(
                    "segment {} has a damaged record at byte {offset} followed by an intact \
                     one: corruption, not a torn write (replace this node; its peers hold \
                     the log)",
                    path.display()
                )));
            }
            break; // garbage to the end: torn
        }
        let kind = payload[0];
        let group = u64::from_le_bytes(payload[1..9].try_into().expect("8 bytes"));
        let body = &payload[9..];
        let rec = groups.entry(group).or_default();
        match kind {
            KIND_ENTRIES => {
                let Some(entries) = decode_entries(body) else {
                    break;
                };
                if let Some(last) = entries.last() {
                    let m = info.max_index.entry(group).or_insert(0);
                    *m = (*m).max(last.index);
                }
                rec.tombstoned = false;
                append_with_overwrite(&mut rec.entries, &entries);
            }
            KIND_HARD_STATE => {
                let Ok(hs) = HardState::parse_from_bytes(body) else {
                    break;
                };
                rec.tombstoned = false;
                rec.hard_state = Some(hs);
                hard_states.insert(group, body.to_vec());
            }
            KIND_CLEAR => rec.entries.clear(),
            KIND_TOMBSTONE => {
                *rec = RecoveredGroup {
                    tombstoned: true,
                    ..Default::default()
                };
                hard_states.remove(&group);
            }
            _ => break,
        }
        offset += 8 + u64::from(len);
    }
    Ok((info, offset))
}

/// Whether the bytes at the reader's position are a whole record with a matching CRC.
fn next_record_intact(r: &mut impl Read) -> std::io::Result<bool> {
    let mut header = [0u8; 8];
    if read_full(r, &mut header)? < 8 {
        return Ok(false);
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if !(9..=RECORD_BYTES_MAX).contains(&len) {
        return Ok(false);
    }
    let mut payload = vec![0u8; len as usize];
    Ok(read_full(r, &mut payload)? == payload.len() && crc32fast::hash(&payload) == crc)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut buf = Vec::with_capacity(1 << 20);
        let mut waiters = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    Request::Write { write, done } => {
                        self.encode(&mut buf, &write);
                        waiters.push(done);
                    }
                    Request::Compacted { group, index } => {
                        let c = self.compacted.entry(group).or_insert(0);
                        *c = (*c).max(index);
                    }
                }
                if buf.len() < GROUP_COMMIT_BYTES_MAX {
                    next = rx.try_recv().ok();
                }
            }
            let result = self.flush(&buf);
            buf.clear();
            if let Err(e) = &result {
                tracing::error!(error = %e, "wal write failed");
            }
            for w in waiters.drain(..) {
                let _ = w.send(result.clone());
            }
            if result.is_err() {
                // A log that failed to sync cannot promise anything any more.
                return;
            }
            if let Err(e) = self.maybe_rotate_and_gc() {
                tracing::error!(error = %e, "wal rotation failed");
            }
        }
    }

    fn encode(&mut self, buf: &mut Vec<u8>, w: &GroupWrite) {
        if w.tombstone {
            encode_record(buf, KIND_TOMBSTONE, w.group, &[]);
            self.hard_states.remove(&w.group);
            self.tombstoned.insert(w.group, true);
            return;
        }
        self.tombstoned.remove(&w.group);
        if w.clear {
            encode_record(buf, KIND_CLEAR, w.group, &[]);
        }
        if let Some(last) = w.entries.last() {
            encode_record(buf, KIND_ENTRIES, w.group, &encode_entries(&w.entries));
            let m = self.active.max_index.entry(w.group).or_insert(0);
            *m = (*m).max(last.index);
        }
        if let Some(hs) = &w.hard_state {
            let body = hs.write_to_bytes().expect("hard state encodes");
            encode_record(buf, KIND_HARD_STATE, w.group, &body);
            self.hard_states.insert(w.group, body);
        }
    }

    fn flush(&mut self, buf: &[u8]) -> Result<(), PsError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(buf)?;
        self.file_bytes += buf.len() as u64;
        if self.opts.fsync {
            let start = Instant::now();
            self.file.sync_data()?;
            metrics::histogram!(crate::metrics::FSYNC_SECONDS)
                .record(start.elapsed().as_secs_f64());
        }
        metrics::counter!(crate::metrics::WAL_BYTES).increment(buf.len() as u64);
        Ok(())
    }

    /// Writes every live group's hard state at the head of the active segment.
    fn write_checkpoint(&mut self) -> Result<(), PsError> {
        let mut buf = Vec::new();
        let mut groups: Vec<_> = self.hard_states.iter().collect();
        groups.sort_by_key(|(g, _)| **g);
        for (g, hs) in groups {
            encode_record(&mut buf, KIND_HARD_STATE, *g, hs);
        }
        for (g, _) in self.tombstoned.iter().filter(|(_, t)| **t) {
            encode_record(&mut buf, KIND_TOMBSTONE, *g, &[]);
        }
        self.flush(&buf)?;
        if !self.opts.fsync && !buf.is_empty() {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn maybe_rotate_and_gc(&mut self) -> Result<(), PsError> {
        if self.file_bytes >= self.opts.segment_bytes_max {
            let path = segment_path(&self.dir, self.next_seq);
            self.next_seq += 1;
            self.file.sync_all()?;
            self.file = OpenOptions::new().create(true).append(true).open(&path)?;
            sync_dir(&self.dir)?;
            self.file_bytes = 0;
            let old = std::mem::replace(
                &mut self.active,
                SegmentInfo {
                    path,
                    max_index: HashMap::new(),
                },
            );
            self.closed.push(old);
            self.write_checkpoint()?;
        }
        // A closed segment is garbage once every group's entries in it are compacted.
        let compacted = &self.compacted;
        let tombstoned = &self.tombstoned;
        let mut removed = 0;
        while let Some(seg) = self.closed.first() {
            let done = seg.max_index.iter().all(|(g, max)| {
                tombstoned.get(g).copied().unwrap_or(false)
                    || compacted.get(g).is_some_and(|c| c >= max)
            });
            if !done {
                break;
            }
            fs::remove_file(&seg.path)?;
            self.closed.remove(0);
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
            tracing::debug!(removed, "wal segments deleted");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = data.to_vec().into();
        e
    }

    fn hs(term: u64, commit: u64) -> HardState {
        let mut h = HardState::default();
        h.term = term;
        h.commit = commit;
        h
    }

    #[tokio::test]
    async fn recovers_entries_hard_state_overwrite_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, groups) = Wal::open(dir.path(), WalOptions::default()).unwrap();
            assert!(groups.is_empty());
            wal.write(GroupWrite {
                group: 1,
                entries: vec![entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")],
                hard_state: Some(hs(1, 2)),
                ..Default::default()
            })
            .await
            .unwrap();
            // A new leader overwrites index 3 onwards.
            wal.write(GroupWrite {
                group: 1,
                entries: vec![entry(3, 2, b"C"), entry(4, 2, b"D")],
                hard_state: Some(hs(2, 3)),
                ..Default::default()
            })
            .await
            .unwrap();
            wal.write(GroupWrite {
                group: 2,
                entries: vec![entry(1, 1, b"x")],
                ..Default::default()
            })
            .await
            .unwrap();
            wal.write(GroupWrite {
                group: 2,
                clear: true,
                entries: vec![entry(10, 3, b"y")],
                ..Default::default()
            })
            .await
            .unwrap();
            wal.write(GroupWrite {
                group: 3,
                entries: vec![entry(1, 1, b"z")],
                ..Default::default()
            })
            .await
            .unwrap();
            wal.write(GroupWrite {
                group: 3,
                tombstone: true,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let (_wal, groups) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let g1 = &groups[&1];
        let got: Vec<(u64, u64)> = g1.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(g1.hard_state.as_ref().unwrap().commit, 3);
        let got: Vec<u64> = groups[&2].entries.iter().map(|e| e.index).collect();
        assert_eq!(got, vec![10]);
        assert!(groups[&3].tombstoned);
        assert!(groups[&3].entries.is_empty());
    }

    /// The newest segment holding anything.
    fn last_written_segment(dir: &Path) -> PathBuf {
        let mut segs: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        segs.into_iter()
            .rev()
            .find(|p| fs::metadata(p).unwrap().len() > 0)
            .unwrap()
    }

    #[tokio::test]
    async fn torn_tail_is_truncated_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
            wal.write(GroupWrite {
                group: 1,
                entries: vec![entry(1, 1, b"a"), entry(2, 1, b"b")],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        // Simulate a crash mid-write: garbage half-record at the end of the last segment.
        let last = last_written_segment(dir.path());
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
        drop(f);
        let (_wal, groups) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(groups[&1].entries.len(), 2);
    }

    #[tokio::test]
    async fn a_damaged_record_before_intact_ones_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
            for i in 1..=3u64 {
                wal.write(GroupWrite {
                    group: 1,
                    entries: vec![entry(i, 1, b"payload")],
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }
        let last = last_written_segment(dir.path());
        // Flip one byte inside the second-to-last record's payload (acknowledged data with
        // an intact record after it).
        let mut bytes = fs::read(&last).unwrap();
        let mut offsets = Vec::new();
        let mut at = 0usize;
        while at + 8 <= bytes.len() {
            offsets.push(at);
            at += 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        }
        let victim = offsets[offsets.len() - 2];
        bytes[victim + 12] ^= 0xFF;
        fs::write(&last, &bytes).unwrap();
        let len_before = bytes.len() as u64;
        let err = Wal::open(dir.path(), WalOptions::default())
            .err()
            .expect("corruption refuses to open");
        let msg = err.to_string();
        assert!(matches!(err, PsError::Corrupt(_)), "{msg}");
        assert!(
            msg.contains(&format!("byte {victim}")) && msg.contains(&*last.to_string_lossy()),
            "{msg}"
        );
        // Nothing was truncated.
        assert_eq!(fs::metadata(&last).unwrap().len(), len_before);
    }

    #[tokio::test]
    async fn old_segments_are_deleted_once_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            segment_bytes_max: 4096,
            fsync: false,
        };
        let (wal, _) = Wal::open(dir.path(), opts.clone()).unwrap();
        let payload = vec![7u8; 1000];
        for i in 1..=40u64 {
            wal.write(GroupWrite {
                group: 1,
                entries: vec![entry(i, 1, &payload)],
                hard_state: Some(hs(1, i)),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let count = || fs::read_dir(dir.path()).unwrap().count();
        let before = count();
        assert!(before > 5, "expected rotation, got {before} segments");
        wal.compacted(1, 35);
        // Garbage collection runs after the next write is acknowledged; the one after it
        // is ordered behind that collection.
        for i in 41..=42 {
            wal.write(GroupWrite {
                group: 1,
                entries: vec![entry(i, 1, &payload)],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let after = count();
        assert!(after < before, "{before} -> {after}");
        drop(wal);
        let (_wal, groups) = Wal::open(dir.path(), opts).unwrap();
        let g = &groups[&1];
        // Everything above the compaction point survives, and the hard state too.
        assert!(g.entries.first().unwrap().index <= 36);
        assert_eq!(g.entries.last().unwrap().index, 42);
        assert_eq!(g.hard_state.as_ref().unwrap().commit, 40);
    }
}
