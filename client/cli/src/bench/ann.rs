//! `freshet bench ann`: Recommend's approximate index ([`freshet_model::ann`], HNSW from
//! `hnsw_rs`) against the exact pass: recall@N of the ANN top N against the exact top N
//! by the policy score u·v + β, build time, and the per-query cost of each, at catalog
//! sizes up to millions (no cluster: the vectors are generated, so the index can be
//! sized beyond what a test catalog holds).
//!
//! Vectors, two shapes (`--shape`):
//! - `clustered`: learned item vectors are clustered (items sharing feature values are
//!   alike), so items are one of 1,000 centres plus noise of the same size, users
//!   likewise, and biases normal (σ 0.5): harder than real embeddings tend to be for a
//!   graph index, easier than pure noise.
//! - `catalog`: what the gateway folds from a trained catalog: an item's vector is its
//!   features' (one of 1,000 centres, the items sharing them exact twins) plus its own
//!   row, which training moved a little for most items (shown, never clicked: normal,
//!   σ 0.01 per coordinate) and a lot for a tenth (clicked: σ 0.1), and biases normal
//!   (σ 0.2; every shown item's moved). Tight groups of near-identical vectors are what
//!   HNSW searches worst; each `--snap` τ builds the index with rows of norm at most τ
//!   left out of the indexed vector (as the gateway does), so a group's items are one
//!   point again, while recall is measured against the exact top N of the true vectors.

use std::time::Instant;

use rand::{Rng, SeedableRng};

use freshet_model::ann::{AnnIndex, AnnKind, ANN_BUILD_EF, ANN_LINKS};
use freshet_model::TopN;
use freshet_sim::table::{Outputs, Table};

/// Options of `freshet bench ann`.
#[derive(Debug, Clone)]
pub struct AnnOptions {
    /// Catalog sizes, one pass each.
    pub items: Vec<usize>,
    pub dim: usize,
    /// Retrieved per query (N of recall@N).
    pub n: usize,
    pub queries: usize,
    /// Search breadths tried (ef).
    pub ef: Vec<usize>,
    /// Index kinds built (each build is the dominant cost at a million items).
    pub kinds: Vec<AnnKind>,
    pub shape: AnnShape,
    /// `catalog` only: the row norms left out of the indexed vector, one build each.
    pub snap: Vec<f32>,
    pub out: Outputs,
}

/// How `freshet bench ann` generates vectors (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnShape {
    Clustered,
    Catalog,
}

fn gauss(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn quantile(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() as f64 - 1.0) * q).round() as usize]
}

/// Runs the passes and prints one table.
///
/// # Errors
/// Writing the table failed.
pub fn bench_ann(opts: AnnOptions) -> anyhow::Result<()> {
    let d = opts.dim;
    let mut table = Table::new(
        format!(
            "freshet bench ann: HNSW (hnsw_rs, {ANN_LINKS} links, build ef {ANN_BUILD_EF}; L2 over the inner-product transform, and the inner product itself) against the exact pass, dim {d}, N = {}, {} queries",
            opts.n, opts.queries
        ),
        &[
            "items",
            "graph points",
            "build s",
            "search",
            "recall@N mean",
            "recall@N min",
            "query p50 ms",
            "query p99 ms",
        ],
    );
    for &size in &opts.items {
        let mut rng = rand::rngs::StdRng::seed_from_u64(size as u64);
        let centres: Vec<Vec<f32>> = (0..1000)
            .map(|_| (0..d).map(|_| 0.3 * gauss(&mut rng)).collect())
            .collect();
        let draw = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
            let c = &centres[rng.random_range(0..centres.len())];
            c.iter().map(|x| x + 0.3 * gauss(rng)).collect()
        };
        // Each item: its features' vector (a centre) and its own row; the true vector
        // is their sum.
        let mut base: Vec<usize> = Vec::with_capacity(size);
        let mut rows: Vec<Vec<f32>> = Vec::with_capacity(size);
        let mut items: Vec<Vec<f32>> = Vec::with_capacity(size);
        for _ in 0..size {
            let c = rng.random_range(0..centres.len());
            let row: Vec<f32> = match opts.shape {
                AnnShape::Clustered => (0..d).map(|_| 0.3 * gauss(&mut rng)).collect(),
                AnnShape::Catalog => {
                    let sd = if rng.random::<f32>() < 0.1 { 0.1 } else { 0.01 };
                    (0..d).map(|_| sd * gauss(&mut rng)).collect()
                }
            };
            items.push(centres[c].iter().zip(&row).map(|(x, r)| x + r).collect());
            base.push(c);
            rows.push(row);
        }
        let bias_sd = match opts.shape {
            AnnShape::Clustered => 0.5,
            AnnShape::Catalog => 0.2,
        };
        let bias: Vec<f32> = (0..size).map(|_| bias_sd * gauss(&mut rng)).collect();
        let users: Vec<Vec<f32>> = (0..opts.queries).map(|_| draw(&mut rng)).collect();
        // The exact pass: what Recommend's retrieval does today (one core).
        let mut exact_ms = Vec::with_capacity(users.len());
        let exact: Vec<Vec<u64>> = users
            .iter()
            .map(|u| {
                let t = Instant::now();
                let mut top = TopN::new(opts.n);
                for (i, (v, b)) in items.iter().zip(&bias).enumerate() {
                    top.offer(i as u64, freshet_model::dot(u, v) + b);
                }
                let best: Vec<u64> = top.into_best().into_iter().map(|s| s.item).collect();
                exact_ms.push(t.elapsed().as_secs_f64() * 1e3);
                best
            })
            .collect();
        let catalog: Vec<(u64, Vec<f32>, f32)> = items
            .into_iter()
            .zip(bias)
            .enumerate()
            .map(|(i, (v, b))| (i as u64, v, b))
            .collect();
        let mut ms = exact_ms.clone();
        table.row(vec![
            size.to_string(),
            "—".into(),
            "—".into(),
            "exact".into(),
            "1.000".into(),
            "1.000".into(),
            format!("{:.2}", quantile(&mut ms, 0.5)),
            format!("{:.2}", quantile(&mut ms, 0.99)),
        ]);
        // What each build indexes: the true vectors, or (catalog) the vectors with
        // small rows left out.
        let snaps: Vec<Option<f32>> = match opts.shape {
            AnnShape::Clustered => vec![None],
            AnnShape::Catalog => opts.snap.iter().map(|&t| Some(t)).collect(),
        };
        for (&kind, snap) in opts
            .kinds
            .iter()
            .flat_map(|k| snaps.iter().map(move |s| (k, s)))
        {
            let mut name = match kind {
                AnnKind::L2Transform => "HNSW, L2 transform".to_string(),
                AnnKind::InnerProduct => "HNSW, inner product".to_string(),
            };
            let indexed: std::borrow::Cow<[(u64, Vec<f32>, f32)]> = match snap {
                None => std::borrow::Cow::Borrowed(&catalog),
                Some(tau) => {
                    name = format!("{name}, rows of norm ≤ {tau} left out");
                    catalog
                        .iter()
                        .map(|(id, v, b)| {
                            let i = *id as usize;
                            let norm = freshet_model::dot(&rows[i], &rows[i]).sqrt();
                            let v = if norm <= *tau {
                                centres[base[i]].clone()
                            } else {
                                v.clone()
                            };
                            (*id, v, *b)
                        })
                        .collect::<Vec<_>>()
                        .into()
                }
            };
            let t = Instant::now();
            let index = AnnIndex::build_as(kind, d, &indexed);
            let build_s = t.elapsed().as_secs_f64();
            drop(indexed);
            // Two ways of asking: the N nearest at breadth ef, and the gateway's own
            // path (Recommend: the 2N nearest at breadth max(ef, 2N), each re-scored
            // exactly by its true vector, the best N kept), whose recall is what a
            // Recommend gets.
            for (&ef, gateway) in opts.ef.iter().flat_map(|ef| [(ef, false), (ef, true)]) {
                let mut ms = Vec::with_capacity(users.len());
                let mut recalls = Vec::with_capacity(users.len());
                for (u, truth) in users.iter().zip(&exact) {
                    let t = Instant::now();
                    let found = if gateway {
                        let want = opts.n.saturating_mul(2);
                        let mut top = TopN::new(opts.n);
                        for id in index.search(u, want, ef.max(want)) {
                            let (_, v, b) = &catalog[id as usize];
                            top.offer(id, freshet_model::dot(u, v) + b);
                        }
                        top.into_best().into_iter().map(|s| s.item).collect()
                    } else {
                        index.search(u, opts.n, ef)
                    };
                    ms.push(t.elapsed().as_secs_f64() * 1e3);
                    let hits = found.iter().filter(|id| truth.contains(id)).count();
                    recalls.push(hits as f64 / truth.len().max(1) as f64);
                }
                let mean = recalls.iter().sum::<f64>() / recalls.len().max(1) as f64;
                let min = recalls.iter().copied().fold(1.0, f64::min);
                let search = if gateway {
                    format!(
                        "{name}, 2N at ef {}, re-scored (Recommend's path)",
                        ef.max(opts.n * 2)
                    )
                } else {
                    format!("{name}, ef {ef}")
                };
                table.row(vec![
                    size.to_string(),
                    index.points().to_string(),
                    format!("{build_s:.1}"),
                    search,
                    format!("{mean:.3}"),
                    format!("{min:.3}"),
                    format!("{:.2}", quantile(&mut ms, 0.5)),
                    format!("{:.2}", quantile(&mut ms, 0.99)),
                ]);
            }
        }
    }
    table.note(
        "Per query on one core; the exact pass is a dot product per item into a bounded heap (Recommend's retrieval also adds each item's mean feature score, one more add per item).".to_string(),
    );
    opts.out.emit(&[table])
}
