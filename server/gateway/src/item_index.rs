//! One shard's active catalog laid out for Recommend: per item its own row, its bias
//! (the item bias plus the item prior, as `freshet_model::item_bias` adds them) and its
//! features as indexes into a small dictionary, in flat vectors, kept in step with the
//! shard's sealed epochs.
//!
//! score(s, a) = u · r_a + β_a + ρ_a + mean_f (u · F_f). The feature rows F_f are shared by
//! many items and trained by every click, so the index does not fold them into item
//! vectors (a feature row's update would touch every item that has it); a Recommend
//! scores each dictionary feature once, then each item is a dot product over contiguous
//! floats plus a mean over a few cached numbers. What an epoch changes in the index is
//! what its change set names: item rows, item biases and priors, and catalog entries. The index is
//! split into chunks behind `Arc`s like the rest of the replica, so patching an epoch
//! copies only the chunks it touches and a pinned version keeps its own.
//!
//! Ranking reads it too: a chunk maps its items' ids to their positions, so scoring a
//! candidate finds its row and β + ρ with one probe ([`ItemIndex::entry`]) instead of
//! three reads from the replica's tables (each a probe in a chunk of its own). An epoch
//! that only trains an item's row, bias or prior overwrites its entry in place.

use std::collections::HashMap;
use std::sync::Arc;

use freshet_model::{ITEM_BIAS_TABLE, ITEM_COUNTS_TABLE, ITEM_PRIOR_TABLE, ITEM_TABLE};

use super::replica::{ItemInfo, ShardView};

/// Chunks per shard index (about 100 items each at 25,000 items a shard). Fewer, longer
/// chunks make the pass over the catalog read longer runs of memory (each chunk start
/// costs a few cache misses: 1,024 chunks a shard were a fifth of Recommend's time at
/// 100,000 items on 4 shards); more chunks make an epoch's patch copy less.
const CHUNKS: usize = 256;

fn chunk_of(id: u64) -> usize {
    // Other bits than the shard's and the replica's own chunking use.
    ((freshet_proto::splitmix64(id) >> 20) as usize) % CHUNKS
}

/// |r|, the bound's factor for a row (see [`Chunk::norms`]), never below the true norm:
/// the squares are summed in f64 (an f32 square of a value under about 10⁻¹⁹ would be
/// subnormal or 0, and the norm far too small for a bound) and the result rounded up to
/// the next f32 when the conversion rounded it down.
pub(crate) fn norm(row: &[f32]) -> f32 {
    let exact = row
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    let n = exact as f32;
    if f64::from(n) < exact {
        n.next_up()
    } else {
        n
    }
}

/// Feature ids of the indexed items, each with a dense index (append-only).
#[derive(Debug, Clone, Default)]
pub struct FeatureDict {
    pub ids: Vec<u64>,
    index: HashMap<u64, u32>,
}

impl FeatureDict {
    fn intern(&mut self, id: u64) -> u32 {
        if let Some(&i) = self.index.get(&id) {
            return i;
        }
        let i = self.ids.len() as u32;
        self.ids.push(id);
        self.index.insert(id, i);
        i
    }
}

/// Items of one chunk, in parallel vectors.
///
/// Every per-item field is flat, features included (item i's are
/// `feature_idx[feature_start[i]..feature_start[i + 1]]`): a pass over 100,000 items
/// then reads memory in order. With a boxed slice per item, the pointer chase to each
/// item's features missed the cache once per item and was half of Recommend's time.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub(crate) ids: Vec<u64>,
    /// ids.len() × dim: each item's own row.
    pub(crate) rows: Vec<f32>,
    /// Each row's Euclidean norm |r_a|, kept with the row: the exact pass bounds
    /// u · r_a by |u| |r_a| and skips the row of an item that cannot reach the top N.
    pub(crate) norms: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    /// ids.len() + 1 offsets into `feature_idx`.
    pub(crate) feature_start: Vec<u32>,
    /// Indexes into the dictionary of every item's features, item after item.
    pub(crate) feature_idx: Vec<u32>,
    /// The catalog entries (feature ids for filters).
    pub(crate) info: Vec<Arc<ItemInfo>>,
    /// Item id → its position (hashbrown: probed once per candidate scored).
    slot: hashbrown::HashMap<u64, u32>,
}

impl Default for Chunk {
    fn default() -> Self {
        Chunk {
            ids: Vec::new(),
            rows: Vec::new(),
            norms: Vec::new(),
            bias: Vec::new(),
            feature_start: vec![0],
            feature_idx: Vec::new(),
            info: Vec::new(),
            slot: hashbrown::HashMap::new(),
        }
    }
}

impl Chunk {
    /// Item `i`'s feature indexes.
    pub(crate) fn features(&self, i: usize) -> &[u32] {
        &self.feature_idx[self.feature_start[i] as usize..self.feature_start[i + 1] as usize]
    }

    /// The item at position `i`, as scoring reads it (rows of width `dim`).
    pub(crate) fn entry(&self, i: usize, dim: usize) -> Entry<'_> {
        Entry {
            row: &self.rows[i * dim..(i + 1) * dim],
            bias: self.bias[i],
            info: &self.info[i],
        }
    }

    /// Item `id`'s position: one probe of the chunk's own map, so that scoring an item
    /// finds its row and bias here instead of in three tables (a binary search over
    /// sorted ids, tried first, missed the cache at most of its steps).
    fn position(&self, id: u64) -> Option<usize> {
        self.slot.get(&id).map(|&i| i as usize)
    }

    /// Appends `id` (not in the chunk): its row (filled by `row`), its β + ρ, its feature
    /// indexes and its catalog entry.
    fn insert(
        &mut self,
        id: u64,
        dim: usize,
        row: impl FnOnce(&mut [f32]),
        bias: f32,
        features: &[u32],
        info: Arc<ItemInfo>,
    ) {
        debug_assert!(!self.slot.contains_key(&id), "{id} is in the chunk");
        self.slot.insert(id, self.ids.len() as u32);
        self.ids.push(id);
        self.bias.push(bias);
        self.info.push(info);
        let start = self.rows.len();
        self.rows.resize(start + dim, 0.0);
        row(&mut self.rows[start..]);
        self.norms.push(norm(&self.rows[start..]));
        self.feature_idx.extend_from_slice(features);
        self.feature_start.push(self.feature_idx.len() as u32);
    }

    /// Removes `id`, keeping the order of the rest.
    fn remove(&mut self, id: u64, dim: usize) {
        let Some(i) = self.slot.remove(&id).map(|i| i as usize) else {
            return;
        };
        // The items after it move one place down.
        for (j, later) in self.ids[i + 1..].iter().enumerate() {
            self.slot.insert(*later, (i + j) as u32);
        }
        self.ids.remove(i);
        self.bias.remove(i);
        self.info.remove(i);
        self.rows.drain(i * dim..(i + 1) * dim);
        self.norms.remove(i);
        let (from, to) = (self.feature_start[i], self.feature_start[i + 1]);
        self.feature_idx.drain(from as usize..to as usize);
        self.feature_start.remove(i + 1);
        for s in &mut self.feature_start[i + 1..] {
            *s -= to - from;
        }
    }
}

/// An indexed item as scoring reads it.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Its own row r_a.
    pub row: &'a [f32],
    /// β_a + ρ_a, the same bits as `freshet_model::item_bias`.
    pub bias: f32,
    pub info: &'a ItemInfo,
}

/// The active items of one shard, with their rows and biases at the view's epoch.
#[derive(Debug, Clone, Default)]
pub struct ItemIndex {
    pub dim: usize,
    pub(crate) chunks: Vec<Arc<Chunk>>,
    pub dict: Arc<FeatureDict>,
}

impl ItemIndex {
    /// The index of every active item of `view` (after a snapshot).
    pub fn build(view: &ShardView) -> Self {
        let mut index = ItemIndex {
            dim: view.tables.get(ITEM_TABLE).map_or(0, |t| t.dim()),
            chunks: (0..CHUNKS).map(|_| Arc::new(Chunk::default())).collect(),
            dict: Arc::default(),
        };
        let ids: Vec<u64> = view.items().map(|(id, _)| id).collect();
        index.patch(view, &ids);
        index
    }

    /// Brings the entries of `ids` up to `view` (their rows, biases or catalog entries
    /// changed): overwritten in place when the catalog entry is the same, else removed
    /// and added again if active.
    pub fn patch(&mut self, view: &ShardView, ids: &[u64]) {
        let dim = self.dim;
        if dim == 0 || ids.is_empty() {
            return;
        }
        let (Some(rows), bias, prior, counts) = (
            view.tables.get(ITEM_TABLE),
            view.tables.get(ITEM_BIAS_TABLE),
            view.tables.get(ITEM_PRIOR_TABLE),
            view.tables.get(ITEM_COUNTS_TABLE),
        ) else {
            return;
        };
        for &id in ids {
            let info = view.item_arc(id).filter(|i| i.active);
            // β_a + ρ_a, added as `freshet_model::item_bias` adds them (0 without a table).
            let width1 = |t: Option<&Arc<crate::replica::TableView>>| {
                let mut b = [0.0f32];
                if let Some(t) = t {
                    t.read(id, &mut b);
                }
                b[0]
            };
            // A model has one prior: learned (one value) or from counts (a function of
            // the item's own row alone, so patching the touched items keeps it exact).
            let rho = match counts {
                Some(t) => {
                    let mut r = [0.0f32; freshet_model::COUNTS_DIM];
                    t.read(id, &mut r);
                    freshet_model::counts_prior(&r)
                }
                None => width1(prior),
            };
            let sum = 0.0f32 + width1(bias) + rho;
            let chunk = Arc::make_mut(&mut self.chunks[chunk_of(id)]);
            if let (Some(info), Some(i)) = (&info, chunk.position(id)) {
                // The same catalog entry (only rows, biases or priors changed: what
                // training does every epoch): overwritten in place.
                if Arc::ptr_eq(info, &chunk.info[i]) {
                    let row = &mut chunk.rows[i * dim..(i + 1) * dim];
                    rows.read(id, row);
                    chunk.norms[i] = norm(row);
                    chunk.bias[i] = sum;
                    continue;
                }
            }
            chunk.remove(id, dim);
            let Some(info) = info else {
                continue;
            };
            // The dictionary is shared with pinned versions: copied only when a feature
            // is new.
            let features: Vec<u32> = info
                .feature_ids
                .iter()
                .map(|f| match self.dict.index.get(f) {
                    Some(&i) => i,
                    None => Arc::make_mut(&mut self.dict).intern(*f),
                })
                .collect();
            chunk.insert(id, dim, |out| rows.read(id, out), sum, &features, info);
        }
    }

    /// Item `id`'s row, β + ρ and catalog entry, if it is an active item of this index.
    pub fn entry(&self, id: u64) -> Option<Entry<'_>> {
        let chunk = self.chunks.get(chunk_of(id))?;
        let i = chunk.position(id)?;
        Some(chunk.entry(i, self.dim))
    }

    pub fn len(&self) -> usize {
        self.chunks.iter().map(|c| c.ids.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use freshet_model::{
        item_feature_id, ModelSpec, Scorer, UserState, COUNTS_DIM, FEATURE_TABLE,
        ITEM_COUNTS_TABLE, ITEM_PRIOR_TABLE,
    };
    use freshet_proto::gateway::v1::{ItemFilter, RecommendRequest};
    use freshet_proto::ps::v1::{
        optimizer_config, ChangeSet, CountsConfig, DenseValues, Item, OptimizerConfig, RemovedRows,
        ShardSnapshotPart, TableKind, TableRows, TableSpec,
    };

    use crate::ann::AnnState;
    use crate::recommend::{Candidate, Retrieval};
    use crate::replica::{Assembler, Published, SnapshotBuilder, Update, Version};

    const D: usize = 4;

    fn table(name: &str, dim: u32) -> TableSpec {
        TableSpec {
            name: name.into(),
            kind: TableKind::Sparse as i32,
            dim,
            init_scale: 0.1,
            seed: 7,
            ..Default::default()
        }
    }

    fn item(id: u64, active: bool) -> Item {
        Item {
            id,
            features: vec![format!("cat={}", id % 5), format!("brand={}", id % 3)],
            active,
            title: String::new(),
        }
    }

    fn rows(table: &str, dim: usize, ids: &[u64], v: f32) -> TableRows {
        TableRows {
            table: table.into(),
            dim: dim as u32,
            ids: ids.to_vec(),
            values: ids
                .iter()
                .flat_map(|id| (0..dim).map(move |j| v * ((*id % 7) as f32 - 3.0 + j as f32 * 0.1)))
                .collect(),
        }
    }

    fn retrieve(v: &Version, n: u32, filter: Option<ItemFilter>) -> Vec<u64> {
        retrieve_with(v, n, filter, None)
    }

    const U: [f32; D] = [0.3, -0.2, 0.5, 0.1];

    fn retrieve_with(
        v: &Version,
        n: u32,
        filter: Option<ItemFilter>,
        ann: Option<&AnnState>,
    ) -> Vec<u64> {
        let spec = v.model.clone().unwrap();
        let user = UserState {
            x: vec![],
            u: U.to_vec(),
            query: vec![],
        };
        let req = RecommendRequest {
            k: 1,
            retrieve: n,
            filter,
            ..Default::default()
        };
        let req = RecommendRequest {
            explore: Some(0),
            ..req
        };
        let (r, _) = Retrieval::validate(&req, &crate::GatewayConfig::default()).unwrap();
        let found = r.retrieve(v, &spec, &user, ann, 1);
        for c in &found {
            // Ranking reads the entry retrieval hands over: the version's own, with the
            // index's row and β + ρ (equal to the tables': the reference tests).
            assert!(std::ptr::eq(c.info, v.item(c.id).unwrap()), "{}", c.id);
            assert!(c.indexed.is_some(), "{}", c.id);
        }
        found.into_iter().map(|c| c.id).collect()
    }

    /// The reference: `freshet_model::top_by_score` over every active item of the version.
    fn reference(v: &Version, n: usize) -> Vec<u64> {
        let spec: ModelSpec = v.model.clone().unwrap();
        let user = UserState {
            x: vec![],
            u: vec![0.3, -0.2, 0.5, 0.1],
            query: vec![],
        };
        let items: Vec<(u64, Vec<u64>)> = v
            .shards
            .iter()
            .flat_map(|s| s.items())
            .filter(|(_, i)| i.active)
            .map(|(id, i)| (id, i.feature_ids.clone()))
            .collect();
        freshet_model::top_by_score(
            &spec,
            v,
            &user,
            items.iter().map(|(id, f)| (*id, f.as_slice())),
            n,
        )
        .into_iter()
        .map(|s| s.item)
        .collect()
    }

    /// A chunk's items keep their own fields (found by id) and their order through
    /// appends and removals.
    #[test]
    fn removing_from_a_chunk_keeps_every_other_items_fields_together() {
        use super::Chunk;
        use crate::replica::ItemInfo;
        let mut c = Chunk::default();
        let features: [&[u32]; 4] = [&[0], &[1, 2], &[], &[3, 4, 5]];
        let info = |id: u64| {
            Arc::new(ItemInfo {
                feature_ids: vec![id],
                active: true,
                title_terms: Box::default(),
            })
        };
        for k in [2, 0, 3, 1] {
            let id = k as u64 + 1;
            let row = [id as f32, -(id as f32)];
            c.insert(
                id,
                2,
                |out| out.copy_from_slice(&row),
                id as f32 / 10.0,
                features[k],
                info(id),
            );
        }
        // Every item's fields, found by its id, are its own.
        let check = |c: &Chunk, present: &[u64]| {
            assert_eq!(c.ids.len(), present.len());
            assert_eq!(c.norms.len(), present.len());
            assert_eq!(c.feature_start.len(), present.len() + 1);
            for id in 1..=5u64 {
                let Some(i) = c.position(id) else {
                    assert!(!present.contains(&id), "{id} lost");
                    continue;
                };
                assert!(present.contains(&id), "{id} still there");
                assert_eq!(c.ids[i], id);
                assert_eq!(c.rows[2 * i..2 * i + 2], [id as f32, -(id as f32)]);
                assert_eq!(c.norms[i], super::norm(&[id as f32, -(id as f32)]));
                assert_eq!(c.bias[i], id as f32 / 10.0);
                assert_eq!(c.features(i), features[id as usize - 1], "{id}");
                assert_eq!(c.info[i].feature_ids, [id]);
            }
        };
        check(&c, &[1, 2, 3, 4]);
        assert_eq!(c.ids, [3, 1, 4, 2], "appended in order");
        c.remove(1, 2);
        c.remove(9, 2); // not there: nothing changes
        check(&c, &[2, 3, 4]);
        assert_eq!(c.ids, [3, 4, 2], "the rest keep their order");
        c.insert(
            1,
            2,
            |out| out.copy_from_slice(&[1.0, -1.0]),
            0.1,
            features[0],
            info(1),
        );
        c.remove(2, 2);
        check(&c, &[1, 3, 4]);
        c.remove(3, 2);
        check(&c, &[1, 4]);
        c.remove(4, 2);
        c.remove(1, 2);
        check(&c, &[]);
        assert_eq!(
            (c.feature_start.as_slice(), c.feature_idx.len()),
            (&[0][..], 0)
        );
    }

    /// Epoch 1 of one shard (from a snapshot) with the item, feature, item bias and user
    /// tables, `prior`, zero dense parameters, `rows` and `items`: what it published, and
    /// the assembler that takes the next epochs.
    fn first_version(
        prior: TableSpec,
        rows: Vec<TableRows>,
        items: Vec<Item>,
    ) -> (Arc<Published>, Assembler) {
        let published = Arc::new(Published::default());
        let mut a = Assembler::new(1, Arc::clone(&published));
        let view = SnapshotBuilder::default()
            .add(&ShardSnapshotPart {
                shard: 0,
                epoch: 1,
                tables: vec![
                    table("item", D as u32),
                    table("feature", D as u32),
                    table("item_bias", 1),
                    prior,
                    table("user", D as u32),
                ],
                dense: vec![
                    DenseValues {
                        name: "user_tower".into(),
                        values: vec![0.0; ModelSpec::new(D).tower_len()],
                    },
                    DenseValues {
                        name: "critic".into(),
                        values: vec![0.0; ModelSpec::new(D).critic_len()],
                    },
                ],
                rows,
                items,
                last: true,
                ..Default::default()
            })
            .unwrap()
            .unwrap();
        a.offer(0, Update::Snapshot(view)).unwrap();
        (published, a)
    }

    /// Versions 1 and 2 of one shard (200 items, every tenth inactive; then epoch 2's
    /// trained rows, biases and feature rows, items deactivated, added and
    /// re-activated, rows removed), with the learned item prior.
    fn two_versions() -> (Arc<Version>, Arc<Version>) {
        two_versions_with(ITEM_PRIOR_TABLE)
    }

    /// [`two_versions`] with the item prior `prior`: the learned one (`item_prior`) or
    /// the counted one (`item_counts`), whose epoch-2 rows give the same items the top
    /// two priors.
    fn two_versions_with(prior: &str) -> (Arc<Version>, Arc<Version>) {
        let prior_table = if prior == ITEM_COUNTS_TABLE {
            TableSpec {
                init_scale: 0.0,
                optimizer: Some(OptimizerConfig {
                    kind: Some(optimizer_config::Kind::Counts(CountsConfig {
                        forget: 1e-3,
                    })),
                }),
                ..table(ITEM_COUNTS_TABLE, COUNTS_DIM as u32)
            }
        } else {
            table(ITEM_PRIOR_TABLE, 1)
        };
        let prior_rows = if prior == ITEM_COUNTS_TABLE {
            // ρ = ln(smoothed long rate / row rate): 41 and 48 at ln 750 (above every
            // other item's score), 9 at ln 0.02 (its bias changes too).
            let row = |c: f32, n: f32, rate: f32| [c, n, c, n, rate];
            TableRows {
                table: ITEM_COUNTS_TABLE.into(),
                dim: COUNTS_DIM as u32,
                ids: vec![9, 41, 48],
                values: [
                    row(0.0, 1000.0, 0.01),
                    row(90.0, 100.0, 0.001),
                    row(90.0, 100.0, 0.001),
                ]
                .concat(),
            }
        } else {
            // Only the priors of 41 and 48 change (to +9: the top two); 9's bias and
            // prior both do (the index holds their sum).
            rows(ITEM_PRIOR_TABLE, 1, &[9, 41, 48], 3.0)
        };
        let ids: Vec<u64> = (1..=200).collect();
        let (published, mut a) = first_version(
            prior_table,
            vec![rows("item", D, &ids[..150], 0.2)],
            ids.iter().map(|id| item(*id, id % 10 != 0)).collect(),
        );
        assert_eq!(
            published.current().unwrap().shards[0].index.len(),
            180,
            "active items only"
        );
        let v1 = published.current().unwrap();
        // Epoch 2: rows, biases and feature rows trained; items deactivated, added,
        // re-activated; a row removed.
        let features: Vec<u64> = (0..5)
            .map(|c| item_feature_id(&format!("cat={c}")))
            .collect();
        let cs = ChangeSet {
            shard: 0,
            first_epoch: 2,
            epoch: 2,
            rows: vec![
                rows("item", D, &[3, 4, 5, 160, 300], -0.7),
                rows("item_bias", 1, &[7, 8, 9, 301], 2.0),
                prior_rows,
                rows(FEATURE_TABLE, D, &features, 0.9),
            ],
            items: vec![
                item(300, true),
                item(301, true),
                item(20, true),
                item(3, false),
                // Re-upserted while active (a new catalog entry, its row trained too):
                // removed and appended again, not overwritten in place.
                item(5, true),
            ],
            removed: vec![RemovedRows {
                table: "item".into(),
                ids: vec![11, 12],
            }],
            ..Default::default()
        };
        assert_eq!(a.offer(0, Update::Change(cs)).unwrap(), Some(2));
        (v1, published.current().unwrap())
    }

    /// Issue 18: the index a replica patches epoch by epoch retrieves exactly what
    /// scoring every active item of that version gives (rows, biases, feature rows, items
    /// upserted, deactivated and re-activated, rows removed), and a version pinned before
    /// a change keeps answering as it did.
    #[test]
    fn the_patched_index_retrieves_what_scoring_every_item_gives() {
        for prior in [ITEM_PRIOR_TABLE, ITEM_COUNTS_TABLE] {
            the_patched_index_retrieves_with(prior);
        }
    }

    fn the_patched_index_retrieves_with(prior: &str) {
        let (v1, v2) = two_versions_with(prior);
        let spec = v1.model.clone().unwrap();
        assert_eq!(
            (spec.item_prior, spec.item_counts),
            (prior == ITEM_PRIOR_TABLE, prior == ITEM_COUNTS_TABLE)
        );
        assert_eq!(retrieve(&v1, 25, None), reference(&v1, 25), "{prior}");
        let before = retrieve(&v1, 25, None);

        for n in [1, 10, 60, 500] {
            assert_eq!(
                retrieve(&v2, n, None),
                reference(&v2, n as usize),
                "{prior}: n {n}"
            );
        }
        let all = retrieve(&v2, 500, None);
        assert!(all.contains(&300) && all.contains(&20) && !all.contains(&3));
        // What ranking reads from the index is what the tables hold, bit for bit: every
        // active item is indexed, and its score from the index equals its score from the
        // tables (rows, biases and priors patched, rows removed, items re-activated).
        for v in [&v1, &v2] {
            let spec = v.model.clone().unwrap();
            let user = UserState {
                x: vec![],
                u: U.to_vec(),
                query: vec![],
            };
            for id in 1..=310u64 {
                let active = v.item(id).is_some_and(|i| i.active);
                let Some(c) = Candidate::of(v, id) else {
                    assert!(!active, "{id} active but not a candidate");
                    continue;
                };
                assert!(active && c.indexed.is_some(), "{prior}: {id}");
                let from_index = c.score(&mut Scorer::new(&spec, v.as_ref(), &user), 0);
                let from_tables =
                    Scorer::new(&spec, v.as_ref(), &user).score(id, &c.info.feature_ids, 0);
                assert_eq!(from_index.to_bits(), from_tables.to_bits(), "{prior}: {id}");
            }
        }
        // An epoch that changed only an item's prior re-patched its entry.
        let top2 = |v: &Version| {
            let mut top = retrieve(v, 2, None);
            top.sort_unstable();
            top
        };
        assert_ne!(top2(&v1), [41, 48], "{prior}");
        assert_eq!(top2(&v2), [41, 48], "{prior}");
        assert_eq!(
            retrieve(&v1, 25, None),
            before,
            "a pinned version is unchanged"
        );
        // The filter applies on the index entries' features.
        let f = ItemFilter {
            require_features: vec!["cat=2".into()],
            exclude_features: vec!["brand=0".into()],
            exclude_items: vec![7],
        };
        let got = retrieve(&v2, 500, Some(f));
        let want: Vec<u64> = reference(&v2, 500)
            .into_iter()
            .filter(|id| id % 5 == 2 && id % 3 != 0 && *id != 7)
            .collect();
        assert_eq!(got, want);
    }

    /// Issue 18: the exact pass skips an item whose score cannot reach the top N with
    /// u · r_a at its bound |u| |r_a|, and that bound follows the row: an item whose own
    /// row an epoch trained in place (same catalog entry) from its small initial value to
    /// far along the user's taste is the best item of the next version, as scoring every
    /// item says.
    #[test]
    fn an_item_whose_row_grew_in_place_is_retrieved_at_the_next_epoch() {
        let ids: Vec<u64> = (1..=200).collect();
        let (published, mut a) = first_version(
            table(ITEM_PRIOR_TABLE, 1),
            vec![rows("item_bias", 1, &ids, 0.1)],
            ids.iter().map(|id| item(*id, true)).collect(),
        );
        let v1 = published.current().unwrap();
        let grown = 77;
        assert_ne!(reference(&v1, 1), [grown]);
        let cs = ChangeSet {
            shard: 0,
            first_epoch: 2,
            epoch: 2,
            rows: vec![TableRows {
                table: "item".into(),
                dim: D as u32,
                ids: vec![grown],
                values: U.iter().map(|x| x * 10.0).collect(),
            }],
            ..Default::default()
        };
        assert_eq!(a.offer(0, Update::Change(cs)).unwrap(), Some(2));
        let v2 = published.current().unwrap();
        assert_eq!(reference(&v2, 1), [grown]);
        for n in [1, 5, 50] {
            assert_eq!(retrieve(&v2, n, None), reference(&v2, n as usize), "n {n}");
        }
        assert_eq!(
            retrieve(&v1, 5, None),
            reference(&v1, 5),
            "a pinned version"
        );
    }

    /// Issue 18: an item's own row of norm at most `ANN_ROW_SNAP` is left out of the
    /// vector the index takes, so it shares its features' vector (one point of the
    /// graph with the other items of those features); a larger row is kept.
    #[test]
    fn the_index_takes_an_item_with_a_small_row_by_its_features() {
        let (v1, _) = two_versions();
        let spec = v1.model.clone().unwrap();
        let folded: std::collections::HashMap<u64, Vec<f32>> = crate::ann::folded_items(&v1, &spec)
            .into_iter()
            .map(|(id, v, _)| (id, v))
            .collect();
        // 17 and 32 have 152's features (cat=2, brand=2); 152 has no row of its own,
        // 17's row has norm 0.075 and 32's 0.46.
        assert_eq!(folded[&17], folded[&152], "a small row is left out");
        assert_ne!(folded[&32], folded[&152], "a larger row is kept");
        let built = crate::ann::build(&v1, &spec);
        assert_eq!(built.items, 180);
        assert!(built.points < 180, "{} points", built.points);
    }

    /// Issue 18, the approximate path: an index built from version 1 and searched at
    /// version 2 returns the best, scored exactly at version 2, of the 2N items it finds
    /// nearest (so version 2's rows, biases, active flags and filter decide; items new
    /// since version 1 are not found), and falls back to the exact pass when fewer than N
    /// of those pass the filter.
    #[test]
    fn the_approximate_index_answers_at_the_calls_version() {
        let (v1, v2) = two_versions();
        let spec = v1.model.clone().unwrap();
        let built = crate::ann::build(&v1, &spec);
        assert_eq!((built.epoch, built.items, built.dim), (1, 180, D));
        let near: Vec<u64> = built.index.search(&U, 50, 400);
        let state = AnnState::default();
        drop(state.set(Some(Arc::new(built))));
        let ann = Some(&state);
        let count = |s: &AnnState| {
            (
                s.searched.load(std::sync::atomic::Ordering::Relaxed),
                s.fell_back.load(std::sync::atomic::Ordering::Relaxed),
            )
        };

        // At the version it was built from, searched wider than the catalog: exact.
        assert_eq!(retrieve_with(&v1, 25, None, ann), reference(&v1, 25));
        // At version 2: version 2's order of what it found.
        let got = retrieve_with(&v2, 25, None, ann);
        let want: Vec<u64> = reference(&v2, 500)
            .into_iter()
            .filter(|id| near.contains(id))
            .take(25)
            .collect();
        assert_eq!(got, want);
        assert!(!got.contains(&3), "deactivated at version 2");
        assert!(
            !got.contains(&300) && !got.contains(&301) && !got.contains(&20),
            "new or re-activated since the build"
        );
        assert!(reference(&v2, 25).contains(&20), "the exact pass finds it");
        assert_eq!(count(&state), (2, 0));

        // A filter that fewer than 25 of the 50 found pass: the exact pass answers.
        let f = ItemFilter {
            require_features: vec!["cat=2".into()],
            exclude_features: vec![],
            exclude_items: vec![],
        };
        let passing = near.iter().filter(|id| *id % 5 == 2).count();
        assert!(passing < 25, "{passing} of the found pass");
        assert_eq!(
            retrieve_with(&v2, 25, Some(f.clone()), ann),
            retrieve(&v2, 25, Some(f))
        );
        assert_eq!(count(&state), (2, 1));
    }

    /// Recommend's exploration beyond the retrieved set: `explore` active items drawn from
    /// the catalog, outside the model's top N, passing the filter, the same for the same
    /// seed; none when the call asks for none.
    #[test]
    fn explored_items_are_active_filtered_and_outside_the_top_n() {
        let (_, v2) = two_versions();
        let spec = v2.model.clone().unwrap();
        let user = UserState {
            x: vec![],
            u: U.to_vec(),
            query: vec![],
        };
        let top = reference(&v2, 20);
        let ask = |explore: Option<u32>, filter: Option<ItemFilter>, seed: u64| {
            let req = RecommendRequest {
                k: 1,
                retrieve: 20,
                filter,
                explore,
                ..Default::default()
            };
            let (r, _) = Retrieval::validate(&req, &crate::GatewayConfig::default()).unwrap();
            r.retrieve(&v2, &spec, &user, None, seed)
                .into_iter()
                .map(|c| c.id)
                .collect::<Vec<u64>>()
        };
        let got = ask(Some(15), None, 7);
        assert_eq!(got.len(), 35);
        assert_eq!(got[..20], top[..], "the model's top N first");
        for id in &got[20..] {
            assert!(!top.contains(id), "{id} already retrieved");
            assert!(v2.item(*id).is_some_and(|i| i.active), "{id} inactive");
        }
        assert_eq!(ask(Some(15), None, 7), got, "same seed, same draw");
        assert_ne!(ask(Some(15), None, 8), got, "another seed, another draw");
        assert_eq!(ask(Some(0), None, 7), top);
        // The server default: a tenth of `retrieve`.
        assert_eq!(ask(None, None, 7).len(), 22);
        let f = ItemFilter {
            require_features: vec!["cat=2".into()],
            ..Default::default()
        };
        let filtered = ask(Some(15), Some(f), 3);
        assert!(filtered.len() > 20);
        assert!(filtered.iter().all(|id| id % 5 == 2), "{filtered:?}");
    }
}
