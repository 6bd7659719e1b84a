//! Recommend's retrieval: the best `n` active catalog items for a user by the model's own
//! policy score at the version the call serves, after the caller's filter.
//!
//! Exact: every active item of every shard's catalog at that version is scored, from
//! each shard's [`crate::item_index::ItemIndex`], which the replica patches with every
//! epoch's change set; so what Recommend may retrieve at epoch E is exactly the catalog
//! and rows of E: an item upserted or deactivated in E is in or out of E's answers, no
//! index lags behind. The cost is one pass over flat vectors per call (a feature row
//! shared by many items is scored once; an item whose score cannot reach the N-th best
//! with its own row's term at the bound |u| |r_a| is passed over without reading the row).
//!
//! Approximate, from `ann_min_items` active items on: the gateway's HNSW index
//! ([`crate::ann`]), built in the background from an earlier version, is searched for
//! 2N items, which are then scored exactly at the call's version and filtered; fewer
//! than N passing falls back to the exact pass. The found items are scored with the
//! exact pass's arithmetic, from the rows the item index holds.
//!
//! Every retrieved item comes with its catalog entry and, from the item index, its row
//! and β + ρ ([`Candidate`]): the ranking scores it from those, reading only its query
//! crosses (and the call's feature rows and level weights) from the tables.
//!
//! With a search query, the retrieved set also takes the best `n` items by BM25 of the
//! query's words against their titles ([`crate::lexical`], at the same epoch, filtered
//! alike), after the model's `n`: an item the model has not learned yet (a new one) is
//! still found by its words, and the ranking then decides with the query's rows and
//! crosses.
//!
//! Last, `explore` active items drawn uniformly from the catalog (from the call's seed,
//! passing the filter) join the set: without them exploration never reaches beyond the
//! model's own top `n`, and an item that rose (or a new one with no learned vector)
//! would never be shown (the simulator's live model then never recovered from a
//! popularity reshuffle; README, Recommend in the simulator). The impression logs the
//! whole set, so the propensities are exact given it.

// hashbrown (foldhash, seeded per process) rather than SipHash: these maps are probed
// once per retrieved item.
use hashbrown::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use freshet_model::{
    dot, item_feature_id, ModelSpec, Params, Scorer, TopN, UserState, FEATURE_TABLE, ITEM_TABLE,
};
use freshet_proto::catalog::FEATURE_BYTES_MAX;
use freshet_proto::gateway::v1::{ItemFilter, RecommendRequest};
use freshet_proto::FieldError;

use super::ann::{AnnIndexAt, AnnState};
use super::item_index::Entry;
use super::replica::{ItemInfo, Version};
use super::GatewayConfig;

/// A candidate to rank: its catalog entry at the call's version and, where the item
/// index holds them, its row and β + ρ (scoring then reads no table for them).
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'v> {
    pub(crate) id: u64,
    pub(crate) info: &'v ItemInfo,
    pub(crate) indexed: Option<(&'v [f32], f32)>,
}

impl<'v> Candidate<'v> {
    /// Active item `id` at `version` (`None`: not in its catalog or inactive).
    pub fn of(version: &'v Version, id: u64) -> Option<Self> {
        match version.indexed(id) {
            Some(e) => Some(Self::from_entry(version, id, e)),
            // Not indexed: inactive, unknown, or a model without the item table.
            None => version.item(id).filter(|i| i.active).map(|info| Candidate {
                id,
                info,
                indexed: None,
            }),
        }
    }

    /// `id` from its entry in the item index. The entry's row is used only where it has
    /// the model's width (a shard whose item table disagrees with the model's reads its
    /// tables, as before the index held rows, and fails there for a trained row). The
    /// entry's β + ρ sums the bias and prior tables its shard holds, which is what
    /// `item_bias` adds while every shard holds the tables the model (read from shard 0)
    /// names; they differ only for the moment after a table is created on a live cluster,
    /// until every shard's feed has taken its new snapshot (the exact pass reads the
    /// index the same way).
    pub fn from_entry(version: &Version, id: u64, e: Entry<'v>) -> Self {
        let fits = version.model.as_ref().is_ok_and(|m| m.dim == e.row.len());
        Candidate {
            id,
            info: e.info,
            indexed: fits.then_some((e.row, e.bias)),
        }
    }

    /// Its policy logit ([`Scorer::score`], from the index's row and β + ρ where it has
    /// them: the same bits).
    pub fn score(&self, scorer: &mut Scorer<'_, Version>, level: u8) -> f32 {
        match self.indexed {
            Some((row, bias)) => {
                scorer.score_from(self.id, row, bias, &self.info.feature_ids, level)
            }
            None => scorer.score(self.id, &self.info.feature_ids, level),
        }
    }

    /// Its retrieval score with the exact pass's arithmetic ([`Retrieval::exact`]): u ·
    /// r_a in eight lanes, plus the mean of u · F_f (each feature's product once per
    /// call, kept in `fdot`), plus β_a + ρ_a; so the approximate path orders what it finds
    /// as the exact pass orders the same items.
    fn retrieval_score(
        &self,
        version: &Version,
        spec: &ModelSpec,
        u: &[f32],
        fdot: &mut HashMap<u64, f32>,
        scratch: &mut [f32],
    ) -> f32 {
        let (row_dot, bias) = match self.indexed {
            Some((row, bias)) => (freshet_model::dot_lanes(u, row), bias),
            None => {
                version.read(ITEM_TABLE, self.id, scratch);
                let bias = freshet_model::item_bias(spec, version, self.id);
                (freshet_model::dot_lanes(u, scratch), bias)
            }
        };
        let feature_dots = self.info.feature_ids.iter().map(|f| {
            *fdot.entry(*f).or_insert_with(|| {
                version.read(FEATURE_TABLE, *f, scratch);
                dot(u, scratch)
            })
        });
        retrieval_sum(row_dot, feature_mean(feature_dots), bias)
    }
}

/// The mean of an item's features' u · F_f (in the order of its catalog entry); `None`
/// for an item without features.
fn feature_mean(feature_dots: impl ExactSizeIterator<Item = f32>) -> Option<f32> {
    let n = feature_dots.len();
    (n > 0).then(|| feature_dots.sum::<f32>() / n as f32)
}

/// One item's retrieval score from u · r_a (eight lanes), its [`feature_mean`] and
/// β_a + ρ_a. The exact pass and the approximate path both add through here, so they
/// order the same items alike, near-ties included.
fn retrieval_sum(row_dot: f32, feature_mean: Option<f32>, bias: f32) -> f32 {
    let mut score = row_dot;
    if let Some(mean) = feature_mean {
        score += mean;
    }
    score + bias
}

/// An upper bound on what [`freshet_model::dot_lanes`] computes for u · r, from |u| and
/// |r| (Cauchy–Schwarz; both norms from [`crate::item_index::norm`], never below the
/// true ones), with room for the rounding of the dot product: a relative 10⁻³ against a
/// worst case of about 3·10⁻⁵ at the widest rows a table may have (4,096), and an
/// absolute 10⁻³⁰ for products that underflow (at most 4,096 × 2⁻¹⁵⁰). [`retrieval_sum`]
/// only adds, which rounding keeps monotone, so an item whose sum with the bound is below
/// the N-th best score is below it with its real row too.
/// A NaN or infinite norm makes the comparison false: that item is scored.
fn row_dot_bound(u_norm: f32, row_norm: f32) -> f32 {
    u_norm * row_norm * 1.001 + 1e-30
}

/// Features one filter list may name.
pub const FILTER_FEATURES_MAX: usize = 64;
/// Items one call may exclude.
pub const EXCLUDED_ITEMS_MAX: usize = 10_000;

/// A validated Recommend retrieval: how many to retrieve and what may be retrieved.
#[derive(Debug, Clone)]
pub struct Retrieval {
    pub n: usize,
    /// The query's words (empty: no query, no lexical candidates).
    query: Vec<String>,
    /// The server's candidate limit: the merged set never exceeds it.
    limit: usize,
    /// Search breadth of the approximate index (at least the 2N it is asked for).
    ann_ef: usize,
    /// The caller asked for the exact pass even where the index would answer.
    exact: bool,
    /// Random active items added to the retrieved set (exploration beyond it).
    explore: usize,
    /// Hashed item features (as [`item_feature_id`]) every item must have.
    require: Vec<u64>,
    exclude_features: HashSet<u64>,
    exclude_items: HashSet<u64>,
}

fn features(list: &[String], field: &str) -> Result<Vec<u64>, FieldError> {
    if list.len() > FILTER_FEATURES_MAX {
        return Err(FieldError::new(
            field,
            format!("at most {FILTER_FEATURES_MAX} features"),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, f)| {
            if f.is_empty() || f.len() > FEATURE_BYTES_MAX {
                Err(FieldError::new(
                    format!("{field}[{i}]"),
                    format!("must be 1..={FEATURE_BYTES_MAX} bytes"),
                ))
            } else {
                Ok(item_feature_id(f))
            }
        })
        .collect()
}

impl Retrieval {
    /// Checks `k`, `retrieve` and the filter of `r`; returns the retrieval and K.
    ///
    /// # Errors
    /// The first field that breaks a rule.
    pub fn validate(
        r: &RecommendRequest,
        cfg: &GatewayConfig,
    ) -> Result<(Self, usize), FieldError> {
        let n = if r.retrieve == 0 {
            cfg.retrieve_default
        } else {
            r.retrieve as usize
        };
        let within_limit = |field: &str, v: usize| {
            if v > cfg.candidates_max {
                return Err(FieldError::new(
                    field,
                    format!(
                        "at most {} (the server's candidate limit)",
                        cfg.candidates_max
                    ),
                ));
            }
            Ok(v)
        };
        within_limit("retrieve", n)?;
        let explore = within_limit(
            "explore",
            match r.explore {
                Some(e) => e as usize,
                None => (n as f32 * cfg.explore_share_default).round() as usize,
            },
        )?;
        let kmax = (cfg.slots_max as usize).min(n);
        if r.k == 0 || r.k as usize > kmax {
            return Err(FieldError::new(
                "k",
                format!("must be 1..={kmax} (retrieve and the server's slot limit)"),
            ));
        }
        let filter = r.filter.clone().unwrap_or_default();
        let ItemFilter {
            require_features,
            exclude_features,
            exclude_items,
        } = filter;
        let mut require = features(&require_features, "filter.require_features")?;
        require.sort_unstable();
        require.dedup();
        let exclude_features: HashSet<u64> =
            features(&exclude_features, "filter.exclude_features")?
                .into_iter()
                .collect();
        if exclude_items.len() > EXCLUDED_ITEMS_MAX {
            return Err(FieldError::new(
                "filter.exclude_items",
                format!("at most {EXCLUDED_ITEMS_MAX} items"),
            ));
        }
        Ok((
            Retrieval {
                n,
                query: freshet_model::query::query_terms(
                    r.user.as_ref().map_or("", |u| u.query.as_str()),
                ),
                limit: cfg.candidates_max,
                ann_ef: cfg.ann_ef,
                exact: r.exact,
                explore,
                require,
                exclude_features,
                exclude_items: exclude_items.into_iter().collect(),
            },
            r.k as usize,
        ))
    }

    fn admits(&self, id: u64, feature_ids: &[u64]) -> bool {
        !self.exclude_items.contains(&id)
            && self
                .require
                .iter()
                .all(|f| feature_ids.binary_search(f).is_ok())
            && !feature_ids
                .iter()
                .any(|f| self.exclude_features.contains(f))
    }

    /// The retrieved set at `version`, best first (empty when nothing passes the filter):
    /// the best `n` by the policy score, from `ann`'s index when it holds one of this
    /// model's width (approximately: [`crate::ann`]), else exactly; then, with a query,
    /// the lexical candidates. Each with its catalog entry, which the ranking reads.
    pub fn retrieve<'v>(
        &self,
        version: &'v Version,
        spec: &ModelSpec,
        user: &UserState,
        ann: Option<&AnnState>,
        seed: u64,
    ) -> Vec<Candidate<'v>> {
        let approximate = ann.filter(|_| !self.exact).and_then(|state| {
            let index = state.current().filter(|i| i.dim == spec.dim)?;
            let found = self.approximate(version, spec, &user.u, &index);
            let counter = if found.is_some() {
                &state.searched
            } else {
                &state.fell_back
            };
            counter.fetch_add(1, Ordering::Relaxed);
            found
        });
        let mut out = approximate.unwrap_or_else(|| self.exact(version, spec, user));
        let mut seen: HashSet<u64> = out.iter().map(|c| c.id).collect();
        if !self.query.is_empty() {
            for found in self.lexical(version) {
                if out.len() >= self.limit {
                    break;
                }
                if seen.insert(found.id) {
                    out.push(found);
                }
            }
        }
        self.add_explored(version, seed, &mut out, &mut seen);
        out
    }

    /// Adds up to `explore` active items drawn uniformly from `version`'s catalog that
    /// pass the filter and are not in `out` yet (within the candidate limit), from `seed`.
    /// A bounded number of draws: a narrow filter may add fewer.
    fn add_explored<'v>(
        &self,
        version: &'v Version,
        seed: u64,
        out: &mut Vec<Candidate<'v>>,
        seen: &mut HashSet<u64>,
    ) {
        use rand::{Rng, SeedableRng};
        let total: usize = version.shards.iter().map(|s| s.index.len()).sum();
        let want = self
            .explore
            .min(total.saturating_sub(seen.len()))
            .min(self.limit.saturating_sub(out.len()));
        if want == 0 {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15);
        let mut added = 0;
        for _ in 0..want * 8 {
            if added == want {
                break;
            }
            // The k-th active item in (shard, chunk, position) order.
            let mut k = rng.random_range(0..total);
            let mut found = None;
            'find: for shard in &version.shards {
                for chunk in &shard.index.chunks {
                    if k < chunk.ids.len() {
                        let id = chunk.ids[k];
                        let entry = chunk.entry(k, shard.index.dim);
                        found = Some(Candidate::from_entry(version, id, entry));
                        break 'find;
                    }
                    k -= chunk.ids.len();
                }
            }
            let Some(c) = found else { break };
            if seen.contains(&c.id) || !self.admits(c.id, &c.info.feature_ids) {
                continue;
            }
            seen.insert(c.id);
            out.push(c);
            added += 1;
        }
    }

    /// The best `n` found among `index`'s 2N nearest, scored at `version` (its active
    /// flags, the filter, its rows) with the exact pass's arithmetic, best first, ties to
    /// the lower id; `None` when fewer than `n` pass (the caller then runs the exact
    /// pass).
    fn approximate<'v>(
        &self,
        version: &'v Version,
        spec: &ModelSpec,
        u: &[f32],
        index: &AnnIndexAt,
    ) -> Option<Vec<Candidate<'v>>> {
        let want = self.n.saturating_mul(2);
        let found = index.index.search(u, want, self.ann_ef.max(want));
        let mut fdot: HashMap<u64, f32> = HashMap::new();
        let mut scratch = vec![0.0f32; spec.dim];
        let mut passed: Vec<(f32, Candidate<'v>)> = Vec::with_capacity(found.len());
        for id in found {
            let Some(c) = Candidate::of(version, id) else {
                continue;
            };
            if !self.admits(id, &c.info.feature_ids) {
                continue;
            }
            let score = c.retrieval_score(version, spec, u, &mut fdot, &mut scratch);
            passed.push((score, c));
        }
        if passed.len() < self.n {
            return None;
        }
        // Best first, ties to the lower id (as `TopN`).
        passed.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
        Some(passed.into_iter().take(self.n).map(|(_, c)| c).collect())
    }

    /// The best `n` by the policy score over every shard's [`ItemIndex`], ties to the
    /// lower id. Each feature of a shard's dictionary is scored once per call.
    ///
    /// [`ItemIndex`]: crate::item_index::ItemIndex
    fn exact<'v>(
        &self,
        version: &'v Version,
        spec: &ModelSpec,
        user: &UserState,
    ) -> Vec<Candidate<'v>> {
        let d = spec.dim;
        let mut row = vec![0.0f32; d];
        let mut feature_dot: HashMap<u64, f32> = HashMap::new();
        let mut top = TopN::new(self.n);
        let u_norm = crate::item_index::norm(&user.u);
        let unfiltered = self.require.is_empty()
            && self.exclude_features.is_empty()
            && self.exclude_items.is_empty();
        for shard in &version.shards {
            let index = &shard.index;
            if index.dim != d {
                continue;
            }
            let fdot: Vec<f32> = index
                .dict
                .ids
                .iter()
                .map(|f| {
                    *feature_dot.entry(*f).or_insert_with(|| {
                        version.read(FEATURE_TABLE, *f, &mut row);
                        dot(&user.u, &row)
                    })
                })
                .collect();
            for chunk in &index.chunks {
                for (i, &item) in chunk.ids.iter().enumerate() {
                    if !unfiltered && !self.admits(item, &chunk.info[i].feature_ids) {
                        continue;
                    }
                    let mean = feature_mean(chunk.features(i).iter().map(|k| fdot[*k as usize]));
                    // Most of a catalog's rows are small beside the feature and bias
                    // terms (an item's own row learns only from its own clicks): an item
                    // whose score cannot reach the N-th best even with u · r_a at its
                    // bound is skipped without reading its row.
                    if let Some(floor) = top.floor() {
                        let bound = row_dot_bound(u_norm, chunk.norms[i]);
                        if retrieval_sum(bound, mean, chunk.bias[i]) < floor {
                            continue;
                        }
                    }
                    let row_dot =
                        freshet_model::dot_lanes(&user.u, &chunk.rows[i * d..(i + 1) * d]);
                    top.offer(item, retrieval_sum(row_dot, mean, chunk.bias[i]));
                }
            }
        }
        top.into_best()
            .into_iter()
            .filter_map(|s| Candidate::of(version, s.item))
            .collect()
    }

    /// The best `n` active items passing the filter by BM25 of the query against their
    /// titles, over every shard (each shard's index scores with its own statistics),
    /// best first, ties to the lower id.
    fn lexical<'v>(&self, version: &'v Version) -> Vec<Candidate<'v>> {
        let mut hits: Vec<(f32, u64)> = Vec::new();
        for shard in &version.shards {
            // Asked for more than n: inactive or filtered-out items are dropped after.
            match shard.lexical.search(&self.query, self.n.saturating_mul(2)) {
                Ok(h) => hits.extend(h),
                Err(e) => tracing::warn!(shard = shard.shard, error = %e, "title search failed"),
            }
        }
        // Best first, then the catalog check until n pass: the shards gave up to 2N hits
        // each, and an item lookup per hit was a tenth of a Search's CPU.
        hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        hits.into_iter()
            .filter_map(|(_, id)| {
                Candidate::of(version, id).filter(|c| self.admits(id, &c.info.feature_ids))
            })
            .take(self.n)
            .collect()
    }
}
