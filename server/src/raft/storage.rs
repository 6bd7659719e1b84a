//! Raft log storage of one group, and the snapshot files it serves from.
//!
//! [`GroupStorage`] is the in-memory view raft-rs reads through the [`raft::Storage`]
//! trait; durability comes from the node's [`crate::raft::wal::Wal`] (entries, hard state) and
//! from snapshot files written here. The log holds entries `offset+1 ..= last`, where
//! `offset` is the compaction point, always covered by a durable snapshot.
//!
//! Snapshot file: `u32 meta_len | SnapshotMetadata (protobuf) | state bytes`, written to
//! a temporary name, fsynced and renamed, so a crash leaves the old or the new one.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::PsError;

/// In-memory Raft log of one group.
pub struct GroupStorage {
    hard_state: HardState,
    /// Conf state as of the latest snapshot; later conf changes are re-applied from the log.
    conf_state: ConfState,
    offset: u64,
    offset_term: u64,
    entries: Vec<Entry>,
    /// Bytes the entries in memory carry (their payloads), for the byte-based snapshot
    /// trigger: a log of large entries (pushes of a thousand rows) must be compacted
    /// long before a count of entries says so.
    entry_bytes: u64,
    snap_dir: PathBuf,
    /// Metadata of the latest durable snapshot file, if any.
    latest_snapshot: Option<SnapshotMetadata>,
    /// Set when raft-rs asked for a snapshot the latest file cannot serve (it predates
    /// the receiver's membership); the owner builds a fresh one.
    snapshot_wanted: AtomicBool,
    /// The latest snapshot file read into memory in the background, waiting to be handed
    /// to raft-rs (its `snapshot()` call never touches the disk: it runs on the group's
    /// task, and a snapshot file is as large as the shard).
    loaded: Mutex<Option<Snapshot>>,
    /// Set when raft-rs asked for the latest snapshot and it was not loaded yet.
    load_wanted: AtomicBool,
}

impl GroupStorage {
    /// A group with no state yet; `snap_dir` is where its snapshot files live.
    pub fn new(snap_dir: PathBuf) -> Self {
        GroupStorage {
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            offset: 0,
            offset_term: 0,
            entries: Vec::new(),
            entry_bytes: 0,
            snap_dir,
            latest_snapshot: None,
            snapshot_wanted: AtomicBool::new(false),
            loaded: Mutex::new(None),
            load_wanted: AtomicBool::new(false),
        }
    }

    /// Rebuilds the storage from a recovered snapshot and log.
    pub fn recover(
        snap_dir: PathBuf,
        snapshot: Option<SnapshotMetadata>,
        hard_state: Option<HardState>,
        mut entries: Vec<Entry>,
    ) -> Self {
        let mut s = GroupStorage::new(snap_dir);
        if let Some(meta) = snapshot {
            s.offset = meta.index;
            s.offset_term = meta.term;
            s.conf_state = meta.get_conf_state().clone();
            s.latest_snapshot = Some(meta);
        }
        entries.retain(|e| e.index > s.offset);
        // Keep only a contiguous run starting right after the snapshot.
        let keep = entries
            .iter()
            .zip(s.offset + 1..)
            .take_while(|(e, expect)| e.index == *expect)
            .count();
        entries.truncate(keep);
        s.entry_bytes = entries.iter().map(payload_bytes).sum();
        s.entries = entries;
        if let Some(hs) = hard_state {
            s.hard_state = hs;
        }
        if s.hard_state.commit < s.offset {
            s.hard_state.commit = s.offset;
        }
        s
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Bootstraps a brand-new group with its initial voters.
    pub fn initialize(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    pub fn snapshot_index(&self) -> u64 {
        self.latest_snapshot.as_ref().map_or(0, |m| m.index)
    }

    /// Whether a fresh snapshot was requested since the last call.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    /// The snapshot file to read in the background, when raft-rs asked for it since the
    /// last call.
    pub fn take_load_wanted(&self) -> Option<PathBuf> {
        if !self.load_wanted.swap(false, Ordering::Relaxed) {
            return None;
        }
        let meta = self.latest_snapshot.as_ref()?;
        Some(snapshot_path(&self.snap_dir, meta.index, meta.term))
    }

    /// Hands a snapshot read in the background to the next `snapshot()` call; ignored
    /// unless it is still the latest.
    pub fn set_loaded(&self, snap: Snapshot) {
        let latest = self.latest_snapshot.as_ref().map(|m| (m.index, m.term));
        let md = snap.get_metadata();
        if latest == Some((md.index, md.term)) {
            *self.loaded.lock() = Some(snap);
        }
    }

    pub fn snap_dir(&self) -> &Path {
        &self.snap_dir
    }

    pub fn first(&self) -> u64 {
        self.offset + 1
    }

    pub fn last(&self) -> u64 {
        self.offset + self.entries.len() as u64
    }

    /// Appends entries, overwriting any conflicting suffix.
    ///
    /// # Panics
    /// When the entries would leave a gap (a raft-rs invariant violation).
    pub fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else {
            return;
        };
        assert!(
            first.index > self.offset && first.index <= self.last() + 1,
            "append at {} leaves a gap after {}..={}",
            first.index,
            self.offset,
            self.last()
        );
        let keep = (first.index - self.offset - 1) as usize;
        let dropped: u64 = self.entries[keep.min(self.entries.len())..]
            .iter()
            .map(payload_bytes)
            .sum();
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
        self.entry_bytes = self.entry_bytes - dropped + ents.iter().map(payload_bytes).sum::<u64>();
    }

    /// Payload bytes of the entries in memory.
    #[cfg(test)]
    pub fn log_bytes(&self) -> u64 {
        self.entry_bytes
    }

    /// About how many of those bytes a snapshot at `applied` would free: the log's bytes
    /// in proportion of its entries up to `applied` (O(1); entries of one group are of
    /// similar size). Entries committed but not applied yet stay after a snapshot, so a
    /// log that is large above `applied` must not keep triggering snapshots.
    pub fn removable_bytes(&self, applied: u64) -> u64 {
        let held = self.last() - self.offset;
        if held == 0 {
            return 0;
        }
        let upto = applied.clamp(self.offset, self.last()) - self.offset;
        (u128::from(self.entry_bytes) * u128::from(upto) / u128::from(held)) as u64
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    pub fn apply_snapshot(&mut self, meta: SnapshotMetadata) {
        self.offset = meta.index;
        self.offset_term = meta.term;
        self.entries.clear();
        self.entry_bytes = 0;
        self.conf_state = meta.get_conf_state().clone();
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        if self.hard_state.term < meta.term {
            self.hard_state.term = meta.term;
        }
        self.latest_snapshot = Some(meta);
    }

    /// Records a newly written local snapshot.
    pub fn set_latest_snapshot(&mut self, meta: SnapshotMetadata) {
        if meta.index > self.snapshot_index() {
            self.latest_snapshot = Some(meta);
        }
    }

    /// Drops entries up to `index` (which a durable snapshot covers).
    pub fn compact(&mut self, index: u64) {
        if index <= self.offset {
            return;
        }
        let index = index.min(self.last()).min(self.snapshot_index());
        if index <= self.offset {
            return;
        }
        let term = self.entry_term(index).expect("index within the log");
        let drop = (index - self.offset) as usize;
        let freed: u64 = self.entries[..drop].iter().map(payload_bytes).sum();
        self.entries.drain(..drop);
        self.entry_bytes -= freed;
        self.offset = index;
        self.offset_term = term;
    }

    fn entry_term(&self, idx: u64) -> Option<u64> {
        if idx == self.offset {
            return Some(self.offset_term);
        }
        if idx < self.offset || idx > self.last() {
            return None;
        }
        Some(self.entries[(idx - self.offset - 1) as usize].term)
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.offset {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.offset - 1) as usize;
        let hi = (high - self.offset - 1) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.offset {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entry_term(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || {
            self.snapshot_wanted.store(true, Ordering::Relaxed);
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ))
        };
        let Some(meta) = &self.latest_snapshot else {
            return unavailable();
        };
        let cs = meta.get_conf_state();
        let knows_receiver = cs.voters.contains(&to) || cs.learners.contains(&to);
        if meta.index < request_index || meta.index == 0 || !knows_receiver {
            return unavailable();
        }
        // Served from memory once the owner task has read the file in the background
        // (raft-rs asks again at the receiver's next probe). Taken, not kept: a cached
        // copy would double the shard's memory until the next snapshot.
        let mut loaded = self.loaded.lock();
        match loaded.take() {
            Some(s) if s.get_metadata().index == meta.index => Ok(s),
            _ => {
                drop(loaded);
                self.load_wanted.store(true, Ordering::Relaxed);
                Err(raft::Error::Store(
                    StorageError::SnapshotTemporarilyUnavailable,
                ))
            }
        }
    }
}

/// What an entry holds in memory beyond its fixed fields.
fn payload_bytes(e: &Entry) -> u64 {
    (e.data.len() + e.context.len()) as u64
}

/// Path of a snapshot file.
pub fn snapshot_path(dir: &Path, index: u64, term: u64) -> PathBuf {
    dir.join(format!("{index:020}-{term:020}.snap"))
}

/// Durably writes a snapshot file and deletes the older ones of the same group.
///
/// # Errors
/// I/O errors.
pub fn write_snapshot_file(
    dir: &Path,
    meta: &SnapshotMetadata,
    data: &[u8],
) -> Result<PathBuf, PsError> {
    write_snapshot_file_with(dir, meta, |w| w.write_all(data))
}

/// [`write_snapshot_file`] with the state bytes streamed by `write` (through a buffer)
/// instead of held in memory first.
///
/// # Errors
/// I/O errors, `write`'s included.
pub fn write_snapshot_file_with(
    dir: &Path,
    meta: &SnapshotMetadata,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<PathBuf, PsError> {
    fs::create_dir_all(dir)?;
    let path = snapshot_path(dir, meta.index, meta.term);
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::io::BufWriter::with_capacity(256 * 1024, File::create(&tmp)?);
        let meta_bytes = meta
            .write_to_bytes()
            .map_err(|e| PsError::Storage(e.to_string()))?;
        f.write_all(&(meta_bytes.len() as u32).to_le_bytes())?;
        f.write_all(&meta_bytes)?;
        write(&mut f)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    for (idx, p) in list_snapshots(dir)? {
        if idx < meta.index {
            let _ = fs::remove_file(p);
        }
    }
    Ok(path)
}

/// Reads a snapshot file back into a raft snapshot.
///
/// # Errors
/// I/O errors and malformed files.
pub fn read_snapshot_file(path: &Path) -> Result<Snapshot, PsError> {
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf)?;
    if buf.len() < 4 {
        return Err(PsError::Corrupt(format!("{} too short", path.display())));
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if buf.len() < 4 + len {
        return Err(PsError::Corrupt(format!("{} truncated", path.display())));
    }
    let meta = SnapshotMetadata::parse_from_bytes(&buf[4..4 + len])
        .map_err(|e| PsError::Corrupt(e.to_string()))?;
    let mut snap = Snapshot::default();
    snap.set_metadata(meta);
    snap.data = buf[4 + len..].to_vec().into();
    Ok(snap)
}

/// Snapshot files in `dir` as (index, path), ascending; temporary files are removed.
///
/// # Errors
/// I/O errors.
pub fn list_snapshots(dir: &Path) -> Result<Vec<(u64, PathBuf)>, PsError> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".tmp") {
            let _ = fs::remove_file(&p);
            continue;
        }
        if let Some(stem) = name.strip_suffix(".snap") {
            if let Some(idx) = stem.split('-').next().and_then(|s| s.parse().ok()) {
                out.push((idx, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! Storage conformance: the properties raft-rs relies on.
    use super::*;
    use raft::Storage;

    fn e(index: u64, term: u64) -> Entry {
        let mut x = Entry::default();
        x.index = index;
        x.term = term;
        x
    }

    fn meta(index: u64, term: u64, voters: Vec<u64>) -> SnapshotMetadata {
        let mut m = SnapshotMetadata::default();
        m.index = index;
        m.term = term;
        m.set_conf_state(ConfState::from((voters, vec![])));
        m
    }

    #[test]
    fn empty_storage_conforms() {
        let s = GroupStorage::new(PathBuf::from("/nonexistent"));
        assert_eq!(s.first_index().unwrap(), 1);
        assert_eq!(s.last_index().unwrap(), 0);
        assert_eq!(s.term(0).unwrap(), 0);
        assert!(s.term(1).is_err());
        assert!(s.snapshot(0, 2).is_err());
        assert!(!s.initial_state().unwrap().initialized());
    }

    #[test]
    fn append_overwrites_conflicting_suffix() {
        let mut s = GroupStorage::new(PathBuf::from("/nonexistent"));
        s.append(&[e(1, 1), e(2, 1), e(3, 1)]);
        s.append(&[e(2, 2), e(3, 2), e(4, 2)]);
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(2).unwrap(), 2);
        let got = s
            .entries(1, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|x| (x.index, x.term)).collect::<Vec<_>>(),
            vec![(1, 1), (2, 2), (3, 2), (4, 2)]
        );
        assert!(s
            .entries(1, 6, None, GetEntriesContext::empty(false))
            .is_err());
    }

    #[test]
    fn entries_respect_max_size_but_return_at_least_one() {
        let mut s = GroupStorage::new(PathBuf::from("/nonexistent"));
        let mut big = e(1, 1);
        big.data = vec![0u8; 1000].into();
        s.append(&[big.clone(), e(2, 1)]);
        let got = s
            .entries(1, 3, Some(1), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 1);
    }

    /// The byte count the snapshot trigger reads follows appends, overwritten suffixes,
    /// compaction and installed snapshots.
    #[test]
    fn log_bytes_follow_the_entries_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = GroupStorage::new(dir.path().to_path_buf());
        let sized = |index: u64, term: u64, n: usize| {
            let mut x = e(index, term);
            x.data = vec![7u8; n].into();
            x
        };
        s.append(&[sized(1, 1, 100), sized(2, 1, 200), sized(3, 1, 300)]);
        assert_eq!(s.log_bytes(), 600);
        // A new leader overwrites 3.. : 300 out, 50 + 60 in.
        s.append(&[sized(3, 2, 50), sized(4, 2, 60)]);
        assert_eq!(s.log_bytes(), 410);
        assert_eq!(
            s.removable_bytes(2),
            410 / 2,
            "half the entries, half the bytes"
        );
        assert_eq!(s.removable_bytes(99), 410);
        let m = meta(2, 1, vec![1]);
        write_snapshot_file(dir.path(), &m, b"state").unwrap();
        s.set_latest_snapshot(m);
        s.compact(2);
        assert_eq!(s.log_bytes(), 110);
        s.apply_snapshot(meta(9, 3, vec![1]));
        assert_eq!(s.log_bytes(), 0);
        let r = GroupStorage::recover(
            dir.path().to_path_buf(),
            Some(meta(1, 1, vec![1])),
            None,
            vec![sized(1, 1, 5), sized(2, 1, 6), sized(3, 1, 7)],
        );
        assert_eq!(
            r.log_bytes(),
            13,
            "entries the snapshot covers are not counted"
        );
    }

    #[test]
    fn compaction_needs_a_snapshot_and_keeps_the_boundary_term() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = GroupStorage::new(dir.path().to_path_buf());
        s.append(&[e(1, 1), e(2, 1), e(3, 2), e(4, 2)]);
        s.compact(3);
        assert_eq!(
            s.first_index().unwrap(),
            1,
            "no snapshot yet: nothing compacts"
        );
        let m = meta(3, 2, vec![1, 2, 3]);
        write_snapshot_file(dir.path(), &m, b"state").unwrap();
        s.set_latest_snapshot(m);
        s.compact(3);
        assert_eq!(s.first_index().unwrap(), 4);
        assert_eq!(s.term(3).unwrap(), 2);
        assert!(matches!(
            s.term(2),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(matches!(
            s.entries(3, 5, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        // raft-rs's call never reads the file: the first asks for a background load, the
        // next is served from memory.
        assert!(matches!(
            s.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        let path = s.take_load_wanted().expect("a load asked for");
        s.set_loaded(read_snapshot_file(&path).unwrap());
        let snap = s.snapshot(0, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 3);
        assert_eq!(&snap.data[..], b"state");
    }

    #[test]
    fn applying_a_snapshot_restarts_the_log() {
        let mut s = GroupStorage::new(PathBuf::from("/nonexistent"));
        s.append(&[e(1, 1), e(2, 1)]);
        s.apply_snapshot(meta(10, 3, vec![1, 2, 4]));
        assert_eq!(s.first_index().unwrap(), 11);
        assert_eq!(s.last_index().unwrap(), 10);
        assert_eq!(s.term(10).unwrap(), 3);
        assert_eq!(s.hard_state().commit, 10);
        assert_eq!(s.conf_state().voters, vec![1, 2, 4]);
        s.append(&[e(11, 3)]);
        assert_eq!(s.last_index().unwrap(), 11);
    }

    #[test]
    fn recovery_keeps_contiguous_entries_after_the_snapshot() {
        let m = meta(5, 2, vec![1, 2, 3]);
        let s = GroupStorage::recover(
            PathBuf::from("/nonexistent"),
            Some(m),
            None,
            vec![e(4, 2), e(5, 2), e(6, 2), e(7, 3), e(9, 3)],
        );
        assert_eq!(s.first_index().unwrap(), 6);
        assert_eq!(s.last_index().unwrap(), 7);
        assert_eq!(s.hard_state().commit, 5);
        assert!(s.initial_state().unwrap().initialized());
    }

    #[test]
    fn snapshot_files_replace_older_ones_atomically() {
        let dir = tempfile::tempdir().unwrap();
        write_snapshot_file(dir.path(), &meta(3, 1, vec![1]), b"a").unwrap();
        write_snapshot_file(dir.path(), &meta(8, 2, vec![1]), b"bb").unwrap();
        fs::write(dir.path().join("junk.tmp"), b"x").unwrap();
        let list = list_snapshots(dir.path()).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].0, 8);
        let snap = read_snapshot_file(&list[0].1).unwrap();
        assert_eq!(&snap.data[..], b"bb");
        assert_eq!(snap.get_metadata().term, 2);
    }
}
