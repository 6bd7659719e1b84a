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

/// Neighbours per node (hnsw_rs's `max_nb_connection`).
pub const ANN_LINKS: usize = 16;
/// Candidates kept while inserting (build breadth).
pub const ANN_BUILD_EF: usize = 100;

/// An HNSW index of item vectors, built once from a fixed set (rebuilt, not patched).
///
/// Items whose (v, β) are bit-identical are one point of the graph, its members listed
/// in `members[start[p]..start[p + 1]]` (ascending ids). A catalog's cold items are
/// exactly such twins (no row of their own yet, the same features: the same vector),
/// and HNSW degrades badly on duplicates: 1,000 groups of 100 identical items gave
/// recall@100 0.62 (min 0), and 1,000 points of 100 members each is a graph it searches
/// exactly.
pub struct AnnIndex {
    graph: Graph,
    start: Vec<u32>,
    members: Vec<u64>,
    dim: usize,
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
        let mut items: Vec<&(u64, Vec<f32>, f32)> =
            items.iter().filter(|(_, v, _)| v.len() == dim).collect();
        // Twins next to each other (by bits), lower ids first.
        let bits = |it: &(u64, Vec<f32>, f32)| {
            it.1.iter()
                .map(|x| x.to_bits())
                .chain([it.2.to_bits()])
                .collect::<Vec<u32>>()
        };
        items.sort_by_cached_key(|it| (bits(it), it.0));
        let mut start: Vec<u32> = Vec::new();
        let mut members: Vec<u64> = Vec::with_capacity(items.len());
        let mut distinct: Vec<&(u64, Vec<f32>, f32)> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            // Bit equality, as the sort key (0.0 and -0.0 are not twins).
            let twin = i > 0 && bits(it) == bits(items[i - 1]);
            if !twin {
                start.push(members.len() as u32);
                distinct.push(it);
            }
            members.push(it.0);
        }
        start.push(members.len() as u32);
        let items = distinct;
        let norms: Vec<f32> = items
            .iter()
            .map(|(_, v, b)| v.iter().map(|x| x * x).sum::<f32>() + b * b)
            .collect();
        let max = norms.iter().copied().fold(0.0f32, f32::max);
        let points: Vec<Vec<f32>> = items
            .iter()
            .zip(&norms)
            .map(|((_, v, b), n)| {
                let mut p = Vec::with_capacity(dim + 2);
                p.extend_from_slice(v);
                p.push(*b);
                if kind == AnnKind::L2Transform {
                    p.push((max - n).max(0.0).sqrt());
                }
                p
            })
            .collect();
        let n = points.len().max(1);
        let layers = 16.min((n as f32).ln().trunc() as usize).max(1);
        let with_ids: Vec<(&Vec<f32>, usize)> = points.iter().zip(0..).collect();
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
            dim,
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

    /// About the `n` items with the largest u·v + β, best first (twins in id order),
    /// searching `ef` wide (at least `n`). Empty for a user vector of another width.
    pub fn search(&self, u: &[f32], n: usize, ef: usize) -> Vec<u64> {
        if u.len() != self.dim || self.members.is_empty() || n == 0 {
            return Vec::new();
        }
        let mut q = Vec::with_capacity(self.dim + 2);
        q.extend_from_slice(u);
        q.push(1.0);
        let found = match &self.graph {
            Graph::L2(h) => {
                q.push(0.0);
                h.search(&q, n, ef.max(n))
            }
            Graph::Ip(h) => h.search(&q, n, ef.max(n)),
        };
        let mut out = Vec::with_capacity(n);
        for nb in found {
            let (Some(&from), Some(&to)) = (self.start.get(nb.d_id), self.start.get(nb.d_id + 1))
            else {
                continue;
            };
            for &id in &self.members[from as usize..to as usize] {
                if out.len() == n {
                    return out;
                }
                out.push(id);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
