//! One embedding table (or dense tensor): rows in chunks shared copy-on-write
//! ([`Rows`]), so a background snapshot copies no row it does not see written.

use std::hash::{BuildHasher, RandomState};

use freshet_proto::ps::v1::TableSpec;

use super::optimizer::Optimizer;
use super::rows::Rows;

pub use freshet_proto::init_value;

/// Largest magnitude of one gradient coordinate a row's optimizer sees (see
/// [`Table::apply_grad`]). Training gradients are many orders below it; its square
/// (1e12) leaves optimizer accumulators room for ~1e26 such steps before f32 overflows.
pub const GRAD_MAX: f32 = 1e6;

/// Writes the initial value of row `id` into `out`.
pub(super) fn fill_init(seed: u64, name_hash: u64, scale: f32, id: u64, out: &mut [f32]) {
    for (j, v) in out.iter_mut().enumerate() {
        *v = init_value(seed, name_hash, id, j as u64, scale);
    }
}

/// FNV-1a of a table name; part of the row initialiser, so fixed forever.
pub fn name_hash(name: &str) -> u64 {
    freshet_proto::fnv1a64(name)
}

/// One table (sparse) or dense tensor (a single row with id 0).
#[derive(Debug, Clone)]
pub struct Table {
    pub spec: TableSpec,
    pub optimizer: Optimizer,
    pub(super) name_hash: u64,
    pub(super) dim: usize,
    pub(super) stride: usize,
    /// Slot of each row, keyed by the id the slot's row holds: 4 bytes a bucket where a
    /// map of (id, slot) takes 16 (the id is already in the row). Lookup order only, never
    /// replicated state, so the hash is keyed per replica (SipHash, random keys): ids come
    /// from callers, and a fixed hash would let one craft colliding ids.
    index: hashbrown::HashTable<u32>,
    hasher: RandomState,
    /// Per slot: id, values and optimizer slots, and the sealed time (ms) of the row's
    /// last update, for the table's row limits ([`UNSTAMPED`]: updated by a direct push
    /// since the last seal).
    pub(super) rows: Rows,
    /// Rows updated by direct pushes since the last seal: the next seal stamps them with
    /// its time. Derived from `touched` (rebuilt when a snapshot is read).
    pub(super) unstamped: std::collections::BTreeSet<u64>,
    /// Sightings of ids without a row, while the table's limits ask for admission
    /// (replicated state: snapshots and the checksum carry it).
    pub(super) sketch: Option<Sketch>,
    /// Rows this replica removed by ttl and by the cap, created past admission, and
    /// gradients it dropped before admission, since it started (status only: not
    /// replicated state).
    pub expired: u64,
    pub evicted: u64,
    pub admitted: u64,
    pub dropped: u64,
}

/// Rows of a [`Sketch`] (independent hashes) and counters per row.
pub const SKETCH_DEPTH: usize = 4;
pub const SKETCH_WIDTH: usize = 16_384;

/// A count-min sketch of id sightings: a fixed 128 KiB per table and shard however many
/// ids pass through, where an exact map of candidates would grow with the id space it is
/// there to bound. An estimate is the smallest of the id's counters, so it may run high
/// (a collision admits an id early) but never low. Counters saturate. Hashes are fixed
/// functions of the id: every replica counts the same.
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    pub(super) counts: Vec<u16>,
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch {
            counts: vec![0; SKETCH_DEPTH * SKETCH_WIDTH],
        }
    }
}

impl Sketch {
    fn cells(id: u64) -> [usize; SKETCH_DEPTH] {
        let mut out = [0; SKETCH_DEPTH];
        for (row, cell) in out.iter_mut().enumerate() {
            let h =
                freshet_proto::splitmix64(id ^ (row as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            *cell = row * SKETCH_WIDTH + (h % SKETCH_WIDTH as u64) as usize;
        }
        out
    }

    /// Counts one sighting of `id`; returns its estimated count including this one.
    pub fn see(&mut self, id: u64) -> u32 {
        let mut est = u16::MAX;
        for c in Self::cells(id) {
            self.counts[c] = self.counts[c].saturating_add(1);
            est = est.min(self.counts[c]);
        }
        u32::from(est)
    }

    pub fn clear(&mut self) {
        self.counts.fill(0);
    }
}

/// Row time of a row a direct push updated since the last seal: never expired or evicted
/// before the next seal gives it that seal's time (a bulk load between seals must not read
/// as old, whatever the last seal's time was).
pub const UNSTAMPED: u64 = u64::MAX;

impl Table {
    pub(super) fn new(mut spec: TableSpec, optimizer: Optimizer) -> Self {
        // Limits that say "off" are no limits (one form in specs and checksums).
        if spec.limits.is_some_and(|l| l.off) {
            spec.limits = None;
        }
        let dim = spec.dim as usize;
        Table {
            name_hash: name_hash(&spec.name),
            stride: dim + optimizer.state_len(dim),
            dim,
            optimizer,
            spec,
            index: hashbrown::HashTable::new(),
            hasher: RandomState::new(),
            rows: Rows::new(dim + optimizer.state_len(dim)),
            unstamped: std::collections::BTreeSet::new(),
            sketch: None,
            expired: 0,
            evicted: 0,
            admitted: 0,
            dropped: 0,
        }
        .with_admission()
    }

    /// The sketch exactly when the limits ask for admission (created empty, dropped
    /// when admission is turned off).
    fn with_admission(mut self) -> Self {
        self.sync_sketch();
        self
    }

    fn admit_after(&self) -> u32 {
        self.spec.limits.map_or(0, |l| l.admit_after)
    }

    fn sync_sketch(&mut self) {
        if self.admit_after() >= 2 {
            self.sketch.get_or_insert_with(Sketch::default);
        } else {
            self.sketch = None;
        }
    }

    /// Bytes the rows hold: values and optimizer slots, id and update time.
    pub fn row_bytes(&self) -> u64 {
        (self.rows.len() * (self.stride * 4 + 16)) as u64
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Memory the table takes here: row chunks as allocated and the index's buckets (4
    /// bytes and a control byte each; the index grows by doubling at 7/8 full).
    pub fn allocated_bytes(&self) -> u64 {
        let buckets = if self.index.capacity() == 0 {
            0
        } else {
            (self.index.capacity() * 8 / 7).next_power_of_two()
        };
        (self.rows.allocated_bytes() + buckets * 5) as u64
    }

    /// Row chunks copied on write while a snapshot held them (status only).
    pub fn snapshot_copies(&self) -> u64 {
        self.rows.copied_chunks()
    }

    /// Values and optimizer slots of the row in `slot`.
    pub(super) fn row(&self, slot: usize) -> &[f32] {
        self.rows.row(slot)
    }

    /// The slot of row `id`, if the table holds it.
    pub(super) fn find(&self, id: u64) -> Option<usize> {
        let rows = &self.rows;
        self.index
            .find(self.hasher.hash_one(id), |&s| rows.id(s as usize) == id)
            .map(|&s| s as usize)
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        self.find(id).is_some()
    }

    /// Indexes the row just put in `slot`.
    pub(super) fn index_slot(&mut self, slot: usize) {
        let (rows, hasher) = (&self.rows, &self.hasher);
        let id = rows.id(slot);
        debug_assert!(self.find(id).is_none(), "row {id} indexed twice");
        self.index
            .insert_unique(hasher.hash_one(id), slot as u32, |&s| {
                hasher.hash_one(rows.id(s as usize))
            });
    }

    /// Copies row `id` (its initial value when never pushed) into `out`.
    pub fn read_into(&self, id: u64, out: &mut [f32]) {
        match self.find(id) {
            Some(slot) => out.copy_from_slice(&self.rows.row(slot)[..self.dim]),
            None => self.init_row(id, out),
        }
    }

    pub(super) fn init_row(&self, id: u64, out: &mut [f32]) {
        fill_init(
            self.spec.seed,
            self.name_hash,
            self.spec.init_scale,
            id,
            out,
        );
    }

    pub(super) fn slot(&mut self, id: u64) -> usize {
        if let Some(s) = self.find(id) {
            return s;
        }
        let slot = self.rows.push(id, 0);
        self.index_slot(slot);
        let (seed, hash, scale, dim) = (
            self.spec.seed,
            self.name_hash,
            self.spec.init_scale,
            self.dim,
        );
        let (w, state) = self.rows.row_mut(slot).split_at_mut(dim);
        fill_init(seed, hash, scale, id, w);
        self.optimizer.init_state(state);
        slot
    }

    /// One optimizer step on row `id`. The gradient saturates first: each coordinate is
    /// clamped to ±[`GRAD_MAX`] (a NaN, which finite inputs cannot produce, counts as 0).
    /// Pushes are checked finite, but duplicate ids of one push are summed in f32 and a
    /// sum can overflow (two 3e38 make inf, and Adagrad would then store inf and NaN); the
    /// clamp keeps every replica's rows and optimizer slots finite, identically.
    ///
    /// Admission: an id without a row becomes one only at its `admit_after`-th sighting
    /// in the window; before that its gradient is dropped. Returns whether the id has a
    /// row now.
    pub(super) fn apply_grad(&mut self, id: u64, g: &[f32], now_ms: u64) -> bool {
        let existing = self.find(id);
        if let (Some(sketch), None) = (&mut self.sketch, existing) {
            let need = self.spec.limits.map_or(0, |l| l.admit_after);
            if sketch.see(id) < need {
                self.dropped += 1;
                return false;
            }
            self.admitted += 1;
        }
        let slot = match existing {
            Some(s) => s,
            None => self.slot(id),
        };
        self.rows.set_touched(slot, now_ms);
        if now_ms == UNSTAMPED {
            self.unstamped.insert(id);
        }
        let dim = self.dim;
        let (w, state) = self.rows.row_mut(slot).split_at_mut(dim);
        if g.iter().all(|v| v.abs() <= GRAD_MAX) {
            self.optimizer.apply(w, state, g);
        } else {
            let clamped: Vec<f32> = g
                .iter()
                .map(|v| {
                    if v.is_nan() {
                        0.0
                    } else {
                        v.clamp(-GRAD_MAX, GRAD_MAX)
                    }
                })
                .collect();
            self.optimizer.apply(w, state, &clamped);
        }
        true
    }

    /// New row limits: every row's time restarts at `now_ms` when limits are turned on
    /// (times recorded while a table had none may differ between replicas restored from
    /// snapshots of different builds; from here on they are equal). Absent limits keep
    /// the current ones; limits marked `off` remove them.
    pub(super) fn set_limits(
        &mut self,
        limits: Option<freshet_proto::ps::v1::RowLimits>,
        now_ms: u64,
    ) {
        let Some(limits) = limits else {
            return;
        };
        if limits.off {
            // Rows stay as they are; their times no longer decide anything.
            self.spec.limits = None;
            self.sync_sketch();
            return;
        }
        if self.spec.limits.is_none() {
            self.rows.touch_all(now_ms);
            self.unstamped.clear();
        }
        self.spec.limits = Some(limits);
        self.sync_sketch();
    }

    /// Admission counts sightings within windows of sealed time: a seal whose clock moves
    /// from `prev_ms` into a new window forgets them, before the seal's steps apply (they
    /// are sightings of the new window).
    pub(super) fn roll_admission_window(&mut self, prev_ms: u64, now_ms: u64) {
        let (Some(sketch), Some(limits)) = (&mut self.sketch, self.spec.limits) else {
            return;
        };
        let w = limits.admit_window_ms.max(1);
        if now_ms / w > prev_ms / w {
            sketch.clear();
        }
    }

    /// Removes row `id` if the table holds it (a forgotten user's row); returns whether
    /// it did.
    pub(super) fn forget(&mut self, id: u64) -> bool {
        if !self.contains(id) {
            return false;
        }
        self.remove(id);
        self.unstamped.remove(&id);
        true
    }

    /// Removes row `id` (value and optimizer slots): the last slot moves into its place.
    fn remove(&mut self, id: u64) {
        let Some(slot) = self.find(id) else {
            return;
        };
        let (rows, hasher) = (&self.rows, &self.hasher);
        if let Ok(entry) = self
            .index
            .find_entry(hasher.hash_one(id), |&s| rows.id(s as usize) == id)
        {
            entry.remove();
        }
        let last = self.rows.len() - 1;
        if let Some(moved) = self.rows.swap_remove(slot) {
            // The moved row's bucket still says `last`: point it at its new slot.
            let at = self
                .index
                .find_mut(self.hasher.hash_one(moved), |&s| s as usize == last)
                .expect("every row is indexed");
            *at = slot as u32;
        }
    }

    /// Applies the table's [`RowLimits`] at a seal whose clock moved from `prev_ms` to
    /// `now_ms`: expired rows (swept when the clock crosses a sweep boundary), then, over
    /// the cap, the least recently updated down to 7/8 of it. Decided from row times and
    /// ids only, so identical on every replica whatever its slot layout. Returns the
    /// removed ids (sorted) and how many of them expired.
    pub(super) fn enforce_limits(&mut self, prev_ms: u64, now_ms: u64) -> (Vec<u64>, usize) {
        // Rows directly pushed since the last seal take this seal's time.
        for id in std::mem::take(&mut self.unstamped) {
            if let Some(slot) = self.find(id) {
                self.rows.set_touched(slot, now_ms);
            }
        }
        let Some(limits) = self.spec.limits else {
            return (Vec::new(), 0);
        };
        let mut gone: Vec<u64> = Vec::new();
        if limits.ttl_ms > 0 {
            let every = (limits.ttl_ms / 16).max(1000);
            if now_ms / every > prev_ms / every {
                let horizon = now_ms.saturating_sub(limits.ttl_ms);
                gone.extend(
                    self.rows
                        .iter()
                        .filter(|&(_, t)| t < horizon)
                        .map(|(id, _)| id),
                );
            }
        }
        let expired = gone.len();
        gone.sort_unstable();
        let cap = limits.rows_max as usize;
        if cap > 0 && self.rows.len() - expired > cap {
            let keep = cap - cap / 8;
            let mut by_age: Vec<(u64, u64)> = self
                .rows
                .iter()
                .filter(|(id, _)| gone.binary_search(id).is_err())
                .map(|(id, t)| (t, id))
                .collect();
            by_age.sort_unstable();
            let excess = by_age.len() - keep;
            gone.extend(by_age[..excess].iter().map(|&(_, id)| id));
        }
        gone.sort_unstable();
        for id in &gone {
            self.remove(*id);
        }
        self.expired += expired as u64;
        self.evicted += (gone.len() - expired) as u64;
        (gone, expired)
    }

    pub(super) fn sorted_slots(&self) -> Vec<(u64, usize)> {
        let mut v: Vec<(u64, usize)> = self
            .rows
            .iter()
            .enumerate()
            .map(|(slot, (id, _))| (id, slot))
            .collect();
        v.sort_unstable_by_key(|(id, _)| *id);
        v
    }
}
