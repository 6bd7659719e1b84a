//! The gateway's local replica of the model, assembled into whole sealed epochs.
//!
//! Each shard's state is a [`ShardView`]: tables split into many chunks behind `Arc`s,
//! so applying a change set copies only the chunks it touches (copy-on-write) while the
//! published version keeps the old ones. A [`Version`] is one `ShardView` per shard at
//! one common epoch; it is published by swapping an `Arc`, so every Rank pins one
//! version for its whole computation.
//!
//! The [`Assembler`] takes shard updates (a bootstrap snapshot, then change sets) from
//! the subscriber tasks. Epoch E becomes visible only once every shard has delivered E;
//! shards that are ahead queue their updates meanwhile. The visible epoch only grows.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use freshet_model::{item_feature_id, Params};
use freshet_proto::ps::v1::{ChangeSet, Item, ShardSnapshotPart, TableKind, TableSpec};
use freshet_proto::{dense_shard, fnv1a64, init_value, shard_for, splitmix64};
use parking_lot::RwLock;

/// The version to serve from, or UNAVAILABLE while bootstrapping or stopping.
pub(crate) fn serving(
    published: &Published,
    stopping: &std::sync::atomic::AtomicBool,
) -> Result<Arc<Version>, tonic::Status> {
    if stopping.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(tonic::Status::from(crate::GatewayError::unavailable(
            "gateway is shutting down",
        )));
    }
    published.current().ok_or_else(|| {
        tonic::Status::from(crate::GatewayError::unavailable(
            "gateway is bootstrapping its model replica",
        ))
    })
}

/// Chunks per table: an epoch that touches n rows copies about n chunks of
/// rows/CHUNKS entries each.
const CHUNKS: usize = 4096;

fn chunk_of(id: u64) -> usize {
    // High bits: the low ones already chose the shard.
    ((splitmix64(id) >> 40) as usize) % CHUNKS
}

/// The maps a Rank reads (rows of features, crosses and levels per call, catalog items
/// where the item index does not hold them): hashbrown with foldhash,
/// seeded per process (ids come from callers, so the hash stays keyed), instead of
/// std's SipHash, which was a few percent of the gateway's CPU at 10,000 Ranks/s.
type FastMap<K, V> = hashbrown::HashMap<K, V>;

/// One chunk of a table's rows: each id's slot in one flat vector of values. A read is
/// one probe and one contiguous copy; with an `Arc<[f32]>` per row it chased one more
/// pointer to a separate allocation, a cache miss per row read (a quarter of a Search's
/// CPU was row reads). Copying a chunk on write copies its values in one run instead of
/// touching every row's reference count.
#[derive(Clone, Default)]
struct Rows {
    slot: FastMap<u64, u32>,
    /// The id in each slot (for moving the last row into a removed one's slot).
    ids: Vec<u64>,
    /// ids.len() × dim.
    values: Vec<f32>,
}

impl Rows {
    fn get(&self, id: u64, dim: usize) -> Option<&[f32]> {
        let i = *self.slot.get(&id)? as usize;
        Some(&self.values[i * dim..(i + 1) * dim])
    }

    /// Sets row `id`; true when it is new.
    fn insert(&mut self, id: u64, row: &[f32]) -> bool {
        let dim = row.len();
        match self.slot.get(&id) {
            Some(&i) => {
                let i = i as usize;
                self.values[i * dim..(i + 1) * dim].copy_from_slice(row);
                false
            }
            None => {
                // A chunk is one 4,096th of a shard's table.
                let i = u32::try_from(self.ids.len()).expect("a chunk's rows fit in u32");
                self.slot.insert(id, i);
                self.ids.push(id);
                self.values.extend_from_slice(row);
                true
            }
        }
    }

    /// Drops row `id` (the last row moves into its slot); true when it was there.
    fn remove(&mut self, id: u64, dim: usize) -> bool {
        let Some(i) = self.slot.remove(&id) else {
            return false;
        };
        let (i, last) = (i as usize, self.ids.len() - 1);
        if i != last {
            let moved = self.ids[last];
            self.ids[i] = moved;
            self.values
                .copy_within(last * dim..(last + 1) * dim, i * dim);
            self.slot.insert(moved, i as u32);
        }
        self.ids.pop();
        self.values.truncate(last * dim);
        true
    }
}

/// One sparse table's rows on one shard.
#[derive(Clone)]
pub struct TableView {
    pub spec: TableSpec,
    name_hash: u64,
    chunks: Vec<Arc<Rows>>,
    rows: usize,
}

impl TableView {
    fn new(spec: TableSpec) -> Self {
        TableView {
            name_hash: fnv1a64(&spec.name),
            spec,
            chunks: (0..CHUNKS).map(|_| Arc::new(Rows::default())).collect(),
            rows: 0,
        }
    }

    pub fn dim(&self) -> usize {
        self.spec.dim as usize
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `id`, or its deterministic initial value when never trained.
    pub fn read(&self, id: u64, out: &mut [f32]) {
        match self.chunks[chunk_of(id)].get(id, self.dim()) {
            Some(r) => out.copy_from_slice(r),
            None => {
                for (j, v) in out.iter_mut().enumerate() {
                    *v = init_value(
                        self.spec.seed,
                        self.name_hash,
                        id,
                        j as u64,
                        self.spec.init_scale,
                    );
                }
            }
        }
    }

    /// Drops rows the shard removed (RowLimits): they read as their initial value again.
    fn remove(&mut self, ids: &[u64]) {
        let dim = self.dim();
        for id in ids {
            let chunk = Arc::make_mut(&mut self.chunks[chunk_of(*id)]);
            if chunk.remove(*id, dim) {
                self.rows -= 1;
            }
        }
    }

    fn upsert(&mut self, ids: &[u64], values: &[f32]) {
        let dim = self.dim();
        for (i, id) in ids.iter().enumerate() {
            let chunk = Arc::make_mut(&mut self.chunks[chunk_of(*id)]);
            if chunk.insert(*id, &values[i * dim..(i + 1) * dim]) {
                self.rows += 1;
            }
        }
    }
}

/// A catalog entry as the model uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemInfo {
    pub feature_ids: Vec<u64>,
    pub active: bool,
    /// The title's term ids, sorted (empty: no title): what a query's lexical match
    /// level is computed against ([`freshet_model::query::lexical_level`]).
    pub title_terms: Box<[u64]>,
}

impl ItemInfo {
    fn from_item(item: &Item) -> Self {
        let mut feature_ids: Vec<u64> = item.features.iter().map(|f| item_feature_id(f)).collect();
        feature_ids.sort_unstable();
        feature_ids.dedup();
        ItemInfo {
            feature_ids,
            active: item.active,
            title_terms: freshet_model::query::title_term_ids(&item.title).into(),
        }
    }
}

/// One shard's sealed state at `epoch`.
#[derive(Clone, Default)]
pub struct ShardView {
    pub shard: u32,
    pub epoch: u64,
    /// The last epoch whose change set changed anything here (a snapshot's epoch counts):
    /// idle seals move `epoch` every second without changing the model.
    pub changed_epoch: u64,
    pub proposed_at_ms: u64,
    pub tables: BTreeMap<String, Arc<TableView>>,
    pub dense: BTreeMap<String, Arc<Vec<f32>>>,
    items: Vec<Arc<FastMap<u64, Arc<ItemInfo>>>>,
    item_count: usize,
    sets: Arc<BTreeMap<String, Arc<Vec<u64>>>>,
    /// The active items laid out for Recommend, at this view's epoch.
    pub index: crate::item_index::ItemIndex,
    /// The active items' titles for Recommend's lexical candidates, at this epoch.
    pub lexical: crate::lexical::Lexical,
}

impl ShardView {
    fn empty(shard: u32, epoch: u64) -> Self {
        ShardView {
            shard,
            epoch,
            changed_epoch: epoch,
            items: (0..CHUNKS / 16).map(|_| Arc::new(FastMap::new())).collect(),
            ..Default::default()
        }
    }

    pub fn item(&self, id: u64) -> Option<&ItemInfo> {
        self.items[chunk_of(id) % self.items.len()]
            .get(&id)
            .map(AsRef::as_ref)
    }

    pub(crate) fn item_arc(&self, id: u64) -> Option<Arc<ItemInfo>> {
        self.items[chunk_of(id) % self.items.len()]
            .get(&id)
            .cloned()
    }

    pub fn item_count(&self) -> usize {
        self.item_count
    }

    /// Every catalog item of this shard (active or not), in no particular order.
    pub fn items(&self) -> impl Iterator<Item = (u64, &ItemInfo)> {
        self.items
            .iter()
            .flat_map(|chunk| chunk.iter().map(|(id, info)| (*id, info.as_ref())))
    }

    fn upsert_sets(&mut self, sets: &[freshet_proto::ps::v1::CandidateSet]) {
        if sets.is_empty() {
            return;
        }
        let m = Arc::make_mut(&mut self.sets);
        for s in sets {
            if s.items.is_empty() {
                m.remove(&s.name);
            } else {
                m.insert(s.name.clone(), Arc::new(s.items.clone()));
            }
        }
    }

    fn upsert_items(&mut self, items: &[Item]) -> Result<(), ReplicaError> {
        self.lexical
            .upsert(items)
            .map_err(|e| ReplicaError::Lexical(e.to_string()))?;
        let n = self.items.len();
        for item in items {
            let chunk = Arc::make_mut(&mut self.items[chunk_of(item.id) % n]);
            if chunk
                .insert(item.id, Arc::new(ItemInfo::from_item(item)))
                .is_none()
            {
                self.item_count += 1;
            }
        }
        Ok(())
    }

    fn add_part(&mut self, part: &ShardSnapshotPart) -> Result<(), ReplicaError> {
        for spec in &part.tables {
            if spec.kind == TableKind::Sparse as i32 {
                self.tables
                    .insert(spec.name.clone(), Arc::new(TableView::new(spec.clone())));
            }
        }
        for d in &part.dense {
            self.dense
                .insert(d.name.clone(), Arc::new(d.values.clone()));
        }
        for rows in &part.rows {
            let t = self
                .tables
                .get_mut(&rows.table)
                .ok_or_else(|| ReplicaError::UnknownTable(rows.table.clone()))?;
            if rows.values.len() != rows.ids.len() * t.dim() {
                return Err(ReplicaError::RowValues(rows.table.clone()));
            }
            Arc::make_mut(t).upsert(&rows.ids, &rows.values);
        }
        self.upsert_items(&part.items)?;
        self.upsert_sets(&part.sets);
        Ok(())
    }

    /// Applies one change set (which must follow this view's epoch).
    fn apply(&mut self, cs: &ChangeSet) -> Result<(), ReplicaError> {
        if cs.first_epoch != self.epoch + 1 {
            return Err(ReplicaError::Gap {
                shard: self.shard,
                first: cs.first_epoch,
                last: cs.epoch,
                at: self.epoch,
            });
        }
        for rows in &cs.rows {
            let Some(t) = self.tables.get_mut(&rows.table) else {
                return Err(ReplicaError::UnknownTable(rows.table.clone()));
            };
            if rows.values.len() != rows.ids.len() * t.dim() {
                return Err(ReplicaError::RowValues(rows.table.clone()));
            }
            Arc::make_mut(t).upsert(&rows.ids, &rows.values);
        }
        for r in &cs.removed {
            let Some(t) = self.tables.get_mut(&r.table) else {
                return Err(ReplicaError::UnknownTable(r.table.clone()));
            };
            Arc::make_mut(t).remove(&r.ids);
        }
        for d in &cs.dense {
            self.dense
                .insert(d.name.clone(), Arc::new(d.values.clone()));
        }
        self.upsert_items(&cs.items)?;
        self.lexical
            .commit()
            .map_err(|e| ReplicaError::Lexical(e.to_string()))?;
        self.upsert_sets(&cs.sets);
        // The Recommend index follows what this epoch changed of items.
        let item_tables = [
            freshet_model::ITEM_TABLE,
            freshet_model::ITEM_BIAS_TABLE,
            freshet_model::ITEM_PRIOR_TABLE,
            freshet_model::ITEM_COUNTS_TABLE,
        ];
        let mut touched: Vec<u64> = cs.items.iter().map(|i| i.id).collect();
        for rows in cs
            .rows
            .iter()
            .filter(|r| item_tables.contains(&r.table.as_str()))
        {
            touched.extend(&rows.ids);
        }
        for r in cs
            .removed
            .iter()
            .filter(|r| item_tables.contains(&r.table.as_str()))
        {
            touched.extend(&r.ids);
        }
        if !touched.is_empty() {
            touched.sort_unstable();
            touched.dedup();
            let mut index = std::mem::take(&mut self.index);
            index.patch(self, &touched);
            self.index = index;
        }
        if !(cs.rows.is_empty()
            && cs.removed.is_empty()
            && cs.dense.is_empty()
            && cs.items.is_empty()
            && cs.sets.is_empty())
        {
            self.changed_epoch = cs.epoch;
        }
        self.epoch = cs.epoch;
        self.proposed_at_ms = cs.proposed_at_ms;
        Ok(())
    }
}

/// Why a shard's stream could not be applied to the view (the subscriber then starts
/// over from a snapshot).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("shard {shard}: change set {first}..={last} does not follow epoch {at}")]
    Gap {
        shard: u32,
        first: u64,
        last: u64,
        at: u64,
    },
    #[error("rows of unknown table {0:?}")]
    UnknownTable(String),
    #[error("bad row values for table {0:?}")]
    RowValues(String),
    #[error("snapshot parts of different epochs")]
    MixedSnapshot,
    #[error("title index: {0}")]
    Lexical(String),
}

/// Builds a shard view from snapshot parts.
#[derive(Default)]
pub struct SnapshotBuilder {
    view: Option<ShardView>,
}

impl SnapshotBuilder {
    /// Adds a part; returns the view once the last part arrived.
    ///
    /// # Errors
    /// Inconsistent parts (the subscriber then starts over).
    pub fn add(&mut self, part: &ShardSnapshotPart) -> Result<Option<ShardView>, ReplicaError> {
        let view = self.view.get_or_insert_with(|| {
            let mut v = ShardView::empty(part.shard, part.epoch);
            v.proposed_at_ms = part.proposed_at_ms;
            v
        });
        if view.epoch != part.epoch || view.shard != part.shard {
            self.view = None;
            return Err(ReplicaError::MixedSnapshot);
        }
        view.add_part(part)?;
        if part.last {
            let mut view = self.view.take().expect("set above");
            view.index = crate::item_index::ItemIndex::build(&view);
            view.lexical
                .commit()
                .map_err(|e| ReplicaError::Lexical(e.to_string()))?;
            return Ok(Some(view));
        }
        Ok(None)
    }
}

/// One consistent model version: every shard at `epoch`.
pub struct Version {
    pub epoch: u64,
    /// The model's shape read from the tables once per version (not per Rank).
    pub model: Result<freshet_model::ModelSpec, freshet_proto::FieldError>,
    /// When the coordinator proposed the seal of `epoch` (ms since the Unix epoch).
    pub proposed_at_ms: u64,
    pub shards: Vec<ShardView>,
}

impl Version {
    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The last epoch that changed anything on any shard (at most `epoch`).
    pub fn changed_epoch(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.changed_epoch)
            .max()
            .unwrap_or(0)
    }

    pub fn item(&self, id: u64) -> Option<&ItemInfo> {
        self.shards[shard_for(id, self.shard_count()) as usize].item(id)
    }

    /// Active item `id`'s entry in its shard's item index (row, β + ρ, catalog entry).
    pub fn indexed(&self, id: u64) -> Option<crate::item_index::Entry<'_>> {
        self.shards[shard_for(id, self.shard_count()) as usize]
            .index
            .entry(id)
    }

    /// A named candidate set at this version.
    pub fn candidate_set(&self, name: &str) -> Option<Arc<Vec<u64>>> {
        self.shards[dense_shard(name, self.shard_count()) as usize]
            .sets
            .get(name)
            .cloned()
    }

    pub fn table(&self, name: &str, id: u64) -> Option<&TableView> {
        self.shards[shard_for(id, self.shard_count()) as usize]
            .tables
            .get(name)
            .map(AsRef::as_ref)
    }

    pub fn table_specs(&self) -> Vec<TableSpec> {
        let mut specs: Vec<TableSpec> = self
            .shards
            .first()
            .map(|s| s.tables.values().map(|t| t.spec.clone()).collect())
            .unwrap_or_default();
        for s in &self.shards {
            for name in s.dense.keys() {
                if !specs.iter().any(|t| &t.name == name) {
                    specs.push(TableSpec {
                        name: name.clone(),
                        kind: TableKind::Dense as i32,
                        dim: s.dense[name].len() as u32,
                        ..Default::default()
                    });
                }
            }
        }
        specs
    }
}

impl Params for Version {
    fn read(&self, table: &str, id: u64, out: &mut [f32]) {
        match self.table(table, id) {
            Some(t) => t.read(id, out),
            None => out.fill(0.0),
        }
    }

    fn dense(&self, name: &str) -> &[f32] {
        self.shards[dense_shard(name, self.shard_count()) as usize]
            .dense
            .get(name)
            .map_or(&[], |v| v.as_slice())
    }
}

/// An update from one shard's subscription.
pub enum Update {
    Snapshot(ShardView),
    Change(ChangeSet),
}

impl Update {
    fn epoch(&self) -> u64 {
        match self {
            Update::Snapshot(v) => v.epoch,
            Update::Change(c) => c.epoch,
        }
    }
}

#[derive(Default)]
struct Feed {
    staged: Option<ShardView>,
    queue: VecDeque<Update>,
}

impl Feed {
    fn reachable(&self) -> Option<u64> {
        self.queue
            .back()
            .map(Update::epoch)
            .or_else(|| self.staged.as_ref().map(|s| s.epoch))
    }
}

/// Holds what the gateway serves: the current version, swapped atomically.
pub struct Published {
    current: RwLock<Option<Arc<Version>>>,
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Default for Published {
    fn default() -> Self {
        Published {
            current: RwLock::new(None),
            epoch: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Published {
    /// Watches the published epoch.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// The version a request pins (None while bootstrapping).
    pub fn current(&self) -> Option<Arc<Version>> {
        self.current.read().clone()
    }

    pub fn epoch(&self) -> u64 {
        self.current.read().as_ref().map_or(0, |v| v.epoch)
    }
}

/// Assembles shard updates into whole epochs and publishes them.
pub struct Assembler {
    feeds: Vec<Feed>,
    visible: u64,
    published: Arc<Published>,
}

impl Assembler {
    pub fn new(shard_count: u32, published: Arc<Published>) -> Self {
        Assembler {
            feeds: (0..shard_count).map(|_| Feed::default()).collect(),
            visible: 0,
            published,
        }
    }

    /// Last epoch queued or staged for `shard` (what its subscription resumes after).
    pub fn delivered(&self, shard: u32) -> u64 {
        self.feeds[shard as usize].reachable().unwrap_or(0)
    }

    /// Queues an update; publishes when every shard reached a common new epoch.
    /// Returns the epoch published, if any.
    ///
    /// # Errors
    /// An update that does not chain (the shard must be resubscribed from scratch).
    pub fn offer(&mut self, shard: u32, update: Update) -> Result<Option<u64>, String> {
        let feed = &mut self.feeds[shard as usize];
        let last = feed.reachable();
        match (&update, last) {
            (Update::Change(cs), Some(e)) if cs.first_epoch != e + 1 => {
                return Err(format!(
                    "shard {shard}: change set {}..={} after epoch {e}",
                    cs.first_epoch, cs.epoch
                ));
            }
            (Update::Change(_), None) => {
                return Err(format!("shard {shard}: change set before any snapshot"));
            }
            (Update::Snapshot(v), Some(e)) if v.epoch < e => {
                // Never backwards: an older snapshot (a lagging replica) is ignored.
                return Ok(None);
            }
            _ => {}
        }
        feed.queue.push_back(update);
        Ok(self.assemble())
    }

    fn assemble(&mut self) -> Option<u64> {
        let mut target = u64::MAX;
        for f in &self.feeds {
            target = target.min(f.reachable()?);
        }
        if target <= self.visible && self.published.current().is_some() {
            return None;
        }
        for f in &mut self.feeds {
            while f.queue.front().is_some_and(|u| u.epoch() <= target) {
                match f.queue.pop_front().expect("checked") {
                    Update::Snapshot(v) => f.staged = Some(v),
                    Update::Change(cs) => {
                        let staged = f.staged.as_mut().expect("a snapshot comes first");
                        if let Err(e) = staged.apply(&cs) {
                            tracing::warn!(error = %e, "dropping change set");
                        }
                    }
                }
            }
        }
        // A shard that caught up in one cumulative record may not land exactly on the
        // target: wait until every shard sits on the same epoch.
        if !self
            .feeds
            .iter()
            .all(|f| f.staged.as_ref().is_some_and(|s| s.epoch == target))
        {
            return None;
        }
        let shards: Vec<ShardView> = self
            .feeds
            .iter()
            .map(|f| f.staged.clone().expect("checked"))
            .collect();
        let proposed_at_ms = shards.iter().map(|s| s.proposed_at_ms).max().unwrap_or(0);
        let mut version = Version {
            epoch: target,
            model: Err(freshet_proto::FieldError::new("tables", "not read yet")),
            proposed_at_ms,
            shards,
        };
        version.model = freshet_model::ModelSpec::from_tables(&version.table_specs());
        let version = Arc::new(version);
        *self.published.current.write() = Some(version);
        self.published.epoch.send_replace(target);
        self.visible = target;
        Some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_proto::ps::v1::TableRows;

    fn spec() -> TableSpec {
        TableSpec {
            name: "t".into(),
            kind: TableKind::Sparse as i32,
            dim: 1,
            init_scale: 0.0,
            ..Default::default()
        }
    }

    fn snapshot(shard: u32, epoch: u64) -> ShardView {
        let mut b = SnapshotBuilder::default();
        b.add(&ShardSnapshotPart {
            shard,
            epoch,
            tables: vec![spec()],
            last: true,
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    fn change(shard: u32, epoch: u64, id: u64, v: f32) -> ChangeSet {
        ChangeSet {
            shard,
            first_epoch: epoch,
            epoch,
            rows: vec![TableRows {
                table: "t".into(),
                dim: 1,
                ids: vec![id],
                values: vec![v],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn an_epoch_is_visible_only_once_every_shard_delivered_it() {
        let published = Arc::new(Published::default());
        let mut a = Assembler::new(2, Arc::clone(&published));
        // Shard 0 bootstraps at epoch 3, shard 1 at epoch 1: nothing common yet.
        assert_eq!(a.offer(0, Update::Snapshot(snapshot(0, 3))).unwrap(), None);
        assert_eq!(a.offer(1, Update::Snapshot(snapshot(1, 1))).unwrap(), None);
        assert!(published.current().is_none());
        assert_eq!(
            a.offer(1, Update::Change(change(1, 2, 5, 2.0))).unwrap(),
            None
        );
        assert_eq!(
            a.offer(1, Update::Change(change(1, 3, 5, 3.0))).unwrap(),
            Some(3)
        );
        let v3 = published.current().unwrap();
        // Shard 0 runs ahead: epoch 4 waits for shard 1.
        assert_eq!(
            a.offer(0, Update::Change(change(0, 4, 8, 4.0))).unwrap(),
            None
        );
        assert_eq!(published.epoch(), 3);
        assert_eq!(
            a.offer(1, Update::Change(change(1, 4, 5, 4.0))).unwrap(),
            Some(4)
        );
        // The pinned version is unchanged by later epochs (copy-on-write).
        let mut out = [0.0];
        v3.shards[1].tables["t"].read(5, &mut out);
        assert_eq!(out, [3.0]);
        published.current().unwrap().shards[1].tables["t"].read(5, &mut out);
        assert_eq!(out, [4.0]);
        // Gaps are refused; older snapshots ignored.
        assert!(a.offer(0, Update::Change(change(0, 9, 1, 0.0))).is_err());
        assert_eq!(a.offer(0, Update::Snapshot(snapshot(0, 2))).unwrap(), None);
        assert_eq!(published.epoch(), 4);
    }

    /// The flat chunk layout against a map of rows: upserts, updates and removals in a
    /// random order (a removal moves the last row into the freed slot) read back the same.
    #[test]
    fn a_chunk_reads_what_a_map_of_rows_holds() {
        use rand::{Rng, SeedableRng};
        let dim = 3;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut rows = Rows::default();
        let mut reference: std::collections::HashMap<u64, Vec<f32>> = Default::default();
        for step in 0..5_000 {
            let id = rng.random_range(0..64u64);
            if rng.random_bool(0.4) {
                assert_eq!(rows.remove(id, dim), reference.remove(&id).is_some());
            } else {
                let row: Vec<f32> = (0..dim).map(|j| (step * dim + j) as f32).collect();
                assert_eq!(rows.insert(id, &row), reference.insert(id, row).is_none());
            }
            assert_eq!(rows.ids.len(), reference.len());
            assert_eq!(rows.values.len(), reference.len() * dim);
            if step % 250 == 0 || step == 4_999 {
                for id in 0..64u64 {
                    let want = reference.get(&id).map(Vec::as_slice);
                    assert_eq!(rows.get(id, dim), want, "{id} at step {step}");
                }
            }
        }
    }

    /// An empty change set (an idle seal) moves the epoch, not the changed epoch, which
    /// the approximate index's rebuild reads.
    #[test]
    fn empty_epochs_leave_the_changed_epoch() {
        let published = Arc::new(Published::default());
        let mut a = Assembler::new(1, Arc::clone(&published));
        a.offer(0, Update::Snapshot(snapshot(0, 3))).unwrap();
        assert_eq!(published.current().unwrap().changed_epoch(), 3);
        let empty = |epoch| ChangeSet {
            shard: 0,
            first_epoch: epoch,
            epoch,
            ..Default::default()
        };
        a.offer(0, Update::Change(empty(4))).unwrap();
        a.offer(0, Update::Change(change(0, 5, 7, 1.0))).unwrap();
        a.offer(0, Update::Change(empty(6))).unwrap();
        let v = published.current().unwrap();
        assert_eq!((v.epoch, v.changed_epoch()), (6, 5));
    }

    /// Issue 17: a row the shard removed (RowLimits) is dropped in exactly the version
    /// that removes it; versions pinned before still hold it.
    #[test]
    fn a_removed_row_reads_as_initial_from_the_epoch_that_removed_it() {
        let published = Arc::new(Published::default());
        let mut a = Assembler::new(1, Arc::clone(&published));
        a.offer(0, Update::Snapshot(snapshot(0, 1))).unwrap();
        assert_eq!(
            a.offer(0, Update::Change(change(0, 2, 5, 2.0))).unwrap(),
            Some(2)
        );
        let v2 = published.current().unwrap();
        let mut gone = change(0, 3, 6, 3.0);
        gone.removed = vec![freshet_proto::ps::v1::RemovedRows {
            table: "t".into(),
            ids: vec![5],
        }];
        assert_eq!(a.offer(0, Update::Change(gone)).unwrap(), Some(3));
        let v3 = published.current().unwrap();
        let mut out = [9.0];
        v3.shards[0].tables["t"].read(5, &mut out);
        assert_eq!(out, [0.0], "init_scale 0: the initial value");
        assert_eq!(v3.shards[0].tables["t"].rows(), 1);
        v2.shards[0].tables["t"].read(5, &mut out);
        assert_eq!(out, [2.0]);
    }
}
