//! An approximate top-N index over item vectors by the policy's retrieval score
//! u·v + β: HNSW from `hnsw_rs`, for catalogs where scoring every item per call is too
//! slow (measured with `freshet bench ann`).
//!
//! HNSW searches a metric, and an inner product is not one: items become
//! [v, β, √(M² − ‖(v, β)‖²)] and users [u, 1, 0], with M² the largest squared item norm,
//! so ‖q − x‖² = ‖q‖² + M² − 2(u·v + β) and the nearest item in L2 is the one with the
//! largest score (Bachrach et al., 2014, "Speeding up the Xbox recommender system using
//! a Euclidean transformation for inner-product spaces").

use anndists::dist::{DistL2, Distance};
use hnsw_rs::hnsw::Hnsw;

/// How the index turns the score into something HNSW searches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnKind {
    /// L2 over the transform above (a metric: what HNSW's guarantees assume).
    L2Transform,
    /// The inner product itself as a dissimilarity, exp(−x·y), as hnswlib's `ip` space
    /// does (not a metric: item-to-item links favour items of large norm).
    InnerProduct,
}

/// exp(−x·y): positive and decreasing in the inner product (clamped against overflow).
#[derive(Debug, Clone, Copy, Default)]
struct NegExpDot;

impl Distance<f32> for NegExpDot {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        // In lanes: a search evaluates this ~ef × links times, and an in-order sum
        // cannot use SIMD.
        let dot = crate::dot_lanes(va, vb);
        (-dot).clamp(-80.0, 80.0).exp()
    }
}

enum Graph {
    L2(Hnsw<'static, f32, DistL2>),
    Ip(Hnsw<'static, f32, NegExpDot>),
}

/// An item as the index takes it: (id, v, β).
type Item = (u64, Vec<f32>, f32);

/// An item's own row of at most this norm is left out of the vector it is indexed by
/// (the caller's choice, the gateway's default): items that share their features are
/// then bit-identical, one point of the index, instead of a tight group of
/// near-duplicates, which HNSW searches badly. Training moves the row of every shown
/// item a little (shown, never clicked) and of a clicked one a lot; a row this small
/// changes a score by at most ‖u‖ times it, and Recommend re-scores what it finds with
/// the true rows (`freshet bench ann --shape catalog`, README design notes).
pub const ANN_ROW_SNAP: f32 = 0.1;

/// At most this many points of two or more members are scored exactly on every search
/// besides the graph's (20,000 dot products of 33 numbers: about 0.1 ms); above it the
/// graph alone finds them.
pub const ANN_SCAN_GROUPS: usize = 20_000;

/// Neighbours per node (hnsw_rs's `max_nb_connection`).
pub const ANN_LINKS: usize = 16;
/// Candidates kept while inserting (build breadth).
pub const ANN_BUILD_EF: usize = 100;

/// An HNSW index of item vectors, built once from a fixed set (rebuilt, not patched).
///
/// Items whose vectors v are bit-identical are one point of the index, whatever their
/// biases: the point is (v, the group's largest β), its members listed in
/// `members[start[p]..start[p + 1]]` by descending β (ties: ascending id), each with its
/// β in `bias`. A catalog's cold items are exactly such twins (no row of their own yet,
/// the same features: the same vector), and once they have been shown their biases
/// differ while their vectors stay the same. HNSW degrades badly on duplicates and on
/// tight groups of near-duplicates: 1,000 groups of 100 identical items gave recall@100
/// 0.62 (min 0), and 1,000 points of 100 members each is a graph it searches exactly.
/// Within a group, a member's score is the point's score less the gap between the
/// largest β and its own, so members come back in exact score order.
///
/// A point of many members stands for all of them, and the graph can miss it: on a
/// generated trained catalog of a million items the search returned the clicked items
/// around a group's vector but not the group's own point (with its 900 members), for
/// every breadth tried. So while there are at most [`ANN_SCAN_GROUPS`] points of two or
/// more members, every search scores each of them exactly (a dot product each) and the
/// graph holds only the others.
pub struct AnnIndex {
    graph: Graph,
    start: Vec<u32>,
    members: Vec<u64>,
    bias: Vec<f32>,
    /// The points of two or more members (ids into `start`) and their (v, β_max), flat,
    /// when there are at most [`ANN_SCAN_GROUPS`] of them; empty otherwise.
    groups: Vec<usize>,
    group_points: Vec<f32>,
    /// Points in the graph (all but the scanned ones).
    graph_points: usize,
    dim: usize,
    /// M² of the L2 transform (0 for the inner product), to turn a distance back into
    /// the point's score.
    max_norm: f32,
}

impl AnnIndex {
    /// Builds the index of `items` (id, v, β) with every v of length `dim` (others are
    /// skipped), inserting in parallel.
    pub fn build(dim: usize, items: &[(u64, Vec<f32>, f32)]) -> Self {
        Self::build_as(AnnKind::L2Transform, dim, items)
    }

    /// [`AnnIndex::build`] with the chosen way of searching inner products.
    pub fn build_as(kind: AnnKind, dim: usize, items: &[(u64, Vec<f32>, f32)]) -> Self {
        Self::build_inner(kind, dim, items, true)
    }

    /// [`AnnIndex::build_as`] inserting on the calling thread only: for a background
    /// rebuild beside serving, which should take one core, not every core for a shorter
    /// time.
    pub fn build_on_this_thread(kind: AnnKind, dim: usize, items: &[(u64, Vec<f32>, f32)]) -> Self {
        Self::build_inner(kind, dim, items, false)
    }

    fn build_inner(
        kind: AnnKind,
        dim: usize,
        items: &[(u64, Vec<f32>, f32)],
        parallel: bool,
    ) -> Self {
        // Twins (the same v, by bits) next to each other, the largest β first, then the
        // lower id. Bit equality, as the key (0.0 and -0.0 are not twins).
        let mut keyed: Vec<(Vec<u32>, &Item)> = items
            .iter()
            .filter(|(_, v, _)| v.len() == dim)
            .map(|it| (it.1.iter().map(|x| x.to_bits()).collect(), it))
            .collect();
        keyed.sort_unstable_by(|(ka, a), (kb, b)| {
            ka.cmp(kb).then(b.2.total_cmp(&a.2)).then(a.0.cmp(&b.0))
        });
        let mut start: Vec<u32> = Vec::new();
        let mut members: Vec<u64> = Vec::with_capacity(keyed.len());
        let mut bias: Vec<f32> = Vec::with_capacity(keyed.len());
        // Each point: its v and its largest β (its first member's).
        let mut distinct: Vec<(&[f32], f32)> = Vec::new();
        for (i, (key, it)) in keyed.iter().enumerate() {
            let twin = i > 0 && *key == keyed[i - 1].0;
            if !twin {
                start.push(members.len() as u32);
                distinct.push((&it.1, it.2));
            }
            members.push(it.0);
            bias.push(it.2);
        }
        start.push(members.len() as u32);
        let norms: Vec<f32> = distinct
            .iter()
            .map(|(v, b)| v.iter().map(|x| x * x).sum::<f32>() + b * b)
            .collect();
        let max = match kind {
            AnnKind::L2Transform => norms.iter().copied().fold(0.0f32, f32::max),
            AnnKind::InnerProduct => 0.0,
        };
        let points: Vec<Vec<f32>> = distinct
            .iter()
            .zip(&norms)
            .map(|((v, b), n)| {
                let mut p = Vec::with_capacity(dim + 2);
                p.extend_from_slice(v);
                p.push(*b);
                if kind == AnnKind::L2Transform {
                    p.push((max - n).max(0.0).sqrt());
                }
                p
            })
            .collect();
        let groups: Vec<usize> = (0..distinct.len())
            .filter(|&p| start[p + 1] - start[p] >= 2)
            .collect();
        let (groups, group_points) = if groups.len() <= ANN_SCAN_GROUPS {
            let flat = groups
                .iter()
                .flat_map(|&p| distinct[p].0.iter().copied().chain([distinct[p].1]))
                .collect();
            (groups, flat)
        } else {
            (Vec::new(), Vec::new())
        };
        // Scanned points stay out of the graph: it holds the others (ids: point indices).
        let mut scanned = vec![false; points.len()];
        for &p in &groups {
            scanned[p] = true;
        }
        let with_ids: Vec<(&Vec<f32>, usize)> = points
            .iter()
            .zip(0..)
            .filter(|(_, p)| !scanned[*p])
            .collect();
        let graph_points = with_ids.len();
        let n = graph_points.max(1);
        let layers = 16.min((n as f32).ln().trunc() as usize).max(1);
        fn fill<D: Distance<f32> + Send + Sync>(
            h: &Hnsw<'static, f32, D>,
            points: &[(&Vec<f32>, usize)],
            parallel: bool,
        ) {
            if parallel {
                h.parallel_insert(points);
            } else {
                for (p, id) in points {
                    h.insert((p.as_slice(), *id));
                }
            }
        }
        let graph = match kind {
            AnnKind::L2Transform => {
                let h = Hnsw::new(ANN_LINKS, n, layers, ANN_BUILD_EF, DistL2 {});
                fill(&h, &with_ids, parallel);
                Graph::L2(h)
            }
            AnnKind::InnerProduct => {
                let h = Hnsw::new(ANN_LINKS, n, layers, ANN_BUILD_EF, NegExpDot);
                fill(&h, &with_ids, parallel);
                Graph::Ip(h)
            }
        };
        AnnIndex {
            graph,
            start,
            members,
            bias,
            groups,
            group_points,
            graph_points,
            dim,
            max_norm: max,
        }
    }

    /// Items indexed (twins included).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Distinct vectors indexed (the graph's points).
    pub fn points(&self) -> usize {
        self.start.len().saturating_sub(1)
    }

    /// About the `n` items with the largest u·v + β, best first (ties: the lower id),
    /// searching `ef` wide (at least `n`) for points and taking each point's members while
    /// they still beat the `n` kept so far. Empty for a user vector of another width.
    pub fn search(&self, u: &[f32], n: usize, ef: usize) -> Vec<u64> {
        if u.len() != self.dim || self.members.is_empty() || n == 0 {
            return Vec::new();
        }
        let mut q = Vec::with_capacity(self.dim + 2);
        q.extend_from_slice(u);
        q.push(1.0);
        let found = match &self.graph {
            _ if self.graph_points == 0 => Vec::new(),
            Graph::L2(h) => h.search(&[&q[..], &[0.0]].concat(), n, ef.max(n)),
            Graph::Ip(h) => h.search(&q, n, ef.max(n)),
        };
        // The point's score u·v + β_max back from its distance: exp(−s) for the inner
        // product; for the transform ‖q − x‖² = ‖q‖² + M² − 2s.
        let q_norm: f32 = q.iter().map(|x| x * x).sum();
        let score = |d: f32| match &self.graph {
            Graph::Ip(_) => -d.max(f32::MIN_POSITIVE).ln(),
            Graph::L2(_) => 0.5 * (q_norm + self.max_norm - d * d),
        };
        // The graph's points with their scores, and the best n of the scanned groups.
        let mut points: Vec<(usize, f32)> = found
            .iter()
            .map(|nb| (nb.d_id, score(nb.distance)))
            .collect();
        if !self.groups.is_empty() {
            let mut best = crate::TopN::new(n);
            for (i, x) in self.group_points.chunks_exact(self.dim + 1).enumerate() {
                best.offer(i as u64, crate::dot_lanes(&q, x));
            }
            points.extend(
                best.into_best()
                    .into_iter()
                    .map(|s| (self.groups[s.item as usize], s.score)),
            );
        }
        let mut top = crate::TopN::new(n);
        for (p, point_score) in points {
            let (Some(&from), Some(&to)) = (self.start.get(p), self.start.get(p + 1)) else {
                continue;
            };
            let (from, to) = (from as usize, to as usize);
            let uv = point_score - self.bias[from];
            for k in from..to {
                let s = uv + self.bias[k];
                // Members come by descending β: none after this one can get in.
                if top.floor().is_some_and(|f| s < f) {
                    break;
                }
                top.offer(self.members[k], s);
            }
        }
        top.into_best().into_iter().map(|s| s.item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact top `n` of `items` for `u`, best first (ties: the lower id).
    fn exact_top(items: &[(u64, Vec<f32>, f32)], u: &[f32], n: usize) -> Vec<u64> {
        let mut top = crate::TopN::new(n);
        for (id, v, b) in items {
            top.offer(*id, crate::dot(u, v) + b);
        }
        top.into_best().into_iter().map(|s| s.item).collect()
    }

    /// On a small catalog searched wide, the index finds exactly the exact top N.
    #[test]
    fn agrees_with_the_exact_top_n_on_a_small_catalog() {
        let dim = 8;
        let key = |i: u64, j: u64| freshet_proto::init_value(5, 1, i, j, 1.0);
        let items: Vec<(u64, Vec<f32>, f32)> = (0..500u64)
            .map(|i| {
                (
                    1000 + i,
                    (0..dim as u64).map(|j| key(i, j)).collect(),
                    key(i, 99) * 0.5,
                )
            })
            .collect();
        for (kind, parallel) in [
            (AnnKind::L2Transform, true),
            (AnnKind::InnerProduct, true),
            (AnnKind::InnerProduct, false),
        ] {
            let index = if parallel {
                AnnIndex::build_as(kind, dim, &items)
            } else {
                AnnIndex::build_on_this_thread(kind, dim, &items)
            };
            assert_eq!(index.len(), 500);
            for q in 0..20u64 {
                let u: Vec<f32> = (0..dim as u64).map(|j| key(10_000 + q, j)).collect();
                let mut exact: Vec<(f32, u64)> = items
                    .iter()
                    .map(|(id, v, b)| (crate::dot(&u, v) + b, *id))
                    .collect();
                exact.sort_by(|a, b| b.0.total_cmp(&a.0));
                let want: Vec<u64> = exact[..10].iter().map(|(_, id)| *id).collect();
                let mut got = index.search(&u, 10, 500);
                let mut want_sorted = want.clone();
                got.sort_unstable();
                want_sorted.sort_unstable();
                assert_eq!(got, want_sorted, "{kind:?} parallel {parallel} query {q}");
            }
            assert!(index.search(&[0.0; 3], 10, 100).is_empty(), "wrong width");
        }
    }

    /// Items with bit-identical vectors (cold items sharing their features) are one
    /// point: 1,000 such groups of 20 are searched exactly, twins come back in id order.
    #[test]
    fn twins_are_one_point_and_come_back_together() {
        let dim = 8;
        let key = |i: u64, j: u64| freshet_proto::init_value(5, 1, i, j, 1.0);
        let group: Vec<Vec<f32>> = (0..1000u64)
            .map(|g| (0..dim as u64).map(|j| key(g, j)).collect())
            .collect();
        // Ids in a scrambled order, so the grouping cannot lean on the input order.
        let items: Vec<(u64, Vec<f32>, f32)> = (0..20_000u64)
            .map(|k| {
                let id = freshet_proto::splitmix64(k) % 1_000_000_007;
                (id, group[(k % 1000) as usize].clone(), 0.0)
            })
            .collect();
        let index = AnnIndex::build_on_this_thread(AnnKind::InnerProduct, dim, &items);
        assert_eq!((index.len(), index.points()), (20_000, 1000));
        for q in 0..20u64 {
            let u: Vec<f32> = (0..dim as u64).map(|j| key(10_000 + q, j)).collect();
            let best = (0..1000usize)
                .max_by(|a, b| crate::dot(&u, &group[*a]).total_cmp(&crate::dot(&u, &group[*b])))
                .unwrap();
            let mut twins: Vec<u64> = items
                .iter()
                .filter(|it| it.1 == group[best])
                .map(|it| it.0)
                .collect();
            twins.sort_unstable();
            assert_eq!(index.search(&u, 20, 100), twins, "query {q}");
            assert_eq!(index.search(&u, 5, 100), twins[..5], "query {q}");
        }
    }

    /// Twins whose biases differ (shown items of the same features: each bias moved, the
    /// vector did not) are still one point, and come back in exact score order across
    /// groups: the index's answer is the exact top N.
    #[test]
    fn twins_with_their_own_biases_come_back_in_score_order() {
        let dim = 8;
        let key = |i: u64, j: u64| freshet_proto::init_value(7, 1, i, j, 1.0);
        let group: Vec<Vec<f32>> = (0..500u64)
            .map(|g| (0..dim as u64).map(|j| key(g, j)).collect())
            .collect();
        let items: Vec<(u64, Vec<f32>, f32)> = (0..10_000u64)
            .map(|k| {
                let id = freshet_proto::splitmix64(k) % 1_000_000_007;
                (id, group[(k % 500) as usize].clone(), 0.3 * key(k, 99))
            })
            .collect();
        for kind in [AnnKind::InnerProduct, AnnKind::L2Transform] {
            let index = AnnIndex::build_on_this_thread(kind, dim, &items);
            assert_eq!((index.len(), index.points()), (10_000, 500));
            for q in 0..20u64 {
                let u: Vec<f32> = (0..dim as u64).map(|j| key(10_000 + q, j)).collect();
                let want = exact_top(&items, &u, 30);
                assert_eq!(index.search(&u, 30, 500), want, "{kind:?} query {q}");
            }
        }
    }

    /// Points of several members are scored exactly besides the graph's search (and
    /// kept out of the graph): with a search too narrow for the graph to find
    /// everything, every group member that belongs in the exact top N is returned.
    #[test]
    fn groups_are_found_even_where_the_graph_search_is_narrow() {
        let dim = 8;
        let key = |i: u64, j: u64| freshet_proto::init_value(9, 1, i, j, 1.0);
        // 50 feature vectors, each with 100 distinct items close around it (clicked:
        // rows of their own) and a group of 20 exactly at it (the same vector).
        let mut items: Vec<(u64, Vec<f32>, f32)> = Vec::new();
        for g in 0..50u64 {
            let v: Vec<f32> = (0..dim as u64).map(|j| key(100_000 + g, j)).collect();
            for m in 0..100u64 {
                let id = g * 1000 + m;
                let near = v
                    .iter()
                    .zip(0..)
                    .map(|(x, j)| x + 0.1 * key(id, j))
                    .collect();
                items.push((id, near, 0.1 * key(id, 99)));
            }
            for m in 0..20u64 {
                items.push((g * 1000 + 500 + m, v.clone(), 0.3 + 0.1 * key(g, 50 + m)));
            }
        }
        let index = AnnIndex::build_on_this_thread(AnnKind::InnerProduct, dim, &items);
        assert_eq!(index.points(), 5_050);
        for q in 0..50u64 {
            let u: Vec<f32> = (0..dim as u64).map(|j| key(200_000 + q, j)).collect();
            let got = index.search(&u, 10, 1);
            let in_groups: Vec<u64> = exact_top(&items, &u, 10)
                .into_iter()
                .filter(|id| id % 1000 >= 500)
                .collect();
            assert!(
                !in_groups.is_empty(),
                "query {q}: the check needs group members"
            );
            for id in in_groups {
                assert!(got.contains(&id), "query {q}: group member {id} missing");
            }
        }
    }
}
