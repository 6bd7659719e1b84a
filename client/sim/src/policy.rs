//! The policies compared with the live cluster, evaluated on the same users in the same
//! world state: context-free Bernoulli Thompson sampling, copies of the cluster's model
//! frozen or refreshed every simulated hour, and Vowpal Wabbit (a Python co-process).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use freshet_proto::gateway::v1::{gateway_client::GatewayClient, LookupRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use super::world::World;
use freshet_model::{self as model, ModelSpec, Params, UserInput};

/// One impression: the user and how many items are on offer.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub n: u64,
    pub user: usize,
    pub active: usize,
    pub slots: usize,
}

/// A ranking policy that may learn from its own outcomes.
pub trait Policy {
    /// Item indices for slots 1..=k with the probability each had of being chosen.
    fn slate(&mut self, world: &World, ctx: Ctx) -> anyhow::Result<Vec<(usize, f64)>>;
    /// The outcome of the slate it returned for `ctx`.
    fn learn(
        &mut self,
        world: &World,
        ctx: Ctx,
        slate: &[(usize, f64)],
        clicks: &[bool],
    ) -> anyhow::Result<()>;
}

/// Gamma(shape, 1) by Marsaglia and Tsang (2000).
fn gamma(rng: &mut impl Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(1e-300);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = super::world::gauss(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>().max(1e-300);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Context-free Bernoulli Thompson sampling with Beta(1, 1) priors: the policy that
/// logged the OBD "bts" data. Slots take the items with the largest sampled rates.
pub struct Thompson {
    ab: Vec<(f64, f64)>,
    rng: rand::rngs::StdRng,
}

impl Thompson {
    pub fn new(items: usize, seed: u64) -> Self {
        Thompson {
            ab: vec![(1.0, 1.0); items],
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }
}

impl Policy for Thompson {
    fn slate(&mut self, _world: &World, ctx: Ctx) -> anyhow::Result<Vec<(usize, f64)>> {
        let mut draws: Vec<(f64, usize)> = (0..ctx.active)
            .map(|i| {
                let (a, b) = self.ab[i];
                let x = gamma(&mut self.rng, a);
                let y = gamma(&mut self.rng, b);
                (x / (x + y), i)
            })
            .collect();
        draws.sort_by(|x, y| y.0.total_cmp(&x.0));
        // The propensity of a Thompson draw has no closed form; it is not needed here.
        Ok(draws
            .into_iter()
            .take(ctx.slots)
            .map(|(_, i)| (i, f64::NAN))
            .collect())
    }

    fn learn(
        &mut self,
        _world: &World,
        _ctx: Ctx,
        slate: &[(usize, f64)],
        clicks: &[bool],
    ) -> anyhow::Result<()> {
        for ((i, _), c) in slate.iter().zip(clicks) {
            if *c {
                self.ab[*i].0 += 1.0;
            } else {
                self.ab[*i].1 += 1.0;
            }
        }
        Ok(())
    }
}

/// How many impressions of the catalog's average rate [`Popularity`] smooths each item's
/// own rate with.
pub const POPULARITY_WEIGHT: f64 = 20.0;

/// Each item's click rate from its (clicks, impressions), smoothed towards the catalog's
/// average rate with the weight of `weight` impressions; and that average.
pub fn smoothed_click_rates(counts: &[(f64, f64)], weight: f64) -> (Vec<f64>, f64) {
    let (c, n) = counts
        .iter()
        .fold((0.0, 0.0), |(c, n), x| (c + x.0, n + x.1));
    let prior = (c + 1.0) / (n + weight);
    let rates = counts
        .iter()
        .map(|(c, n)| (c + weight * prior) / (n + weight))
        .collect();
    (rates, prior)
}

/// Online item popularity, the first baseline any recommender engineer checks: each
/// item's click rate from its own shown slots (smoothed towards the average, learned
/// after every impression), served through Rank's own sampler (the same relative
/// temperature and ε) so that it is compared on what users are shown.
pub struct Popularity {
    /// (clicks, impressions) per item.
    counts: Vec<(f64, f64)>,
    sampler: RankSampler,
}

impl Popularity {
    pub fn new(items: usize, temperature: f32, epsilon: f32, seed: u64) -> Self {
        Popularity {
            counts: vec![(0.0, 0.0); items],
            sampler: RankSampler::new(temperature, epsilon, StdRng::seed_from_u64(seed)),
        }
    }
}

impl Policy for Popularity {
    fn slate(&mut self, _world: &World, ctx: Ctx) -> anyhow::Result<Vec<(usize, f64)>> {
        let (rates, _) = smoothed_click_rates(&self.counts[..ctx.active], POPULARITY_WEIGHT);
        let scores: Vec<f32> = rates.iter().map(|r| r.ln() as f32).collect();
        Ok(self.sampler.slate(&scores, ctx.slots))
    }

    fn learn(
        &mut self,
        _: &World,
        _: Ctx,
        slate: &[(usize, f64)],
        clicks: &[bool],
    ) -> anyhow::Result<()> {
        for ((i, _), c) in slate.iter().zip(clicks) {
            self.counts[*i].1 += 1.0;
            if *c {
                self.counts[*i].0 += 1.0;
            }
        }
        Ok(())
    }
}

/// Lexical search alone: the active items in BM25 order of their titles (one word per
/// feature value, [`World::title`]) against the impression's query (k1 1.2; every title
/// has as many words, so length normalisation drops out), ties in a random order. What a
/// shop's search engine gives before any learning: exact word matches, no synonyms, no
/// taste. Greedy (it learns nothing, so exploring would only cost).
pub struct Bm25 {
    rng: StdRng,
}

impl Bm25 {
    pub fn new(seed: u64) -> Self {
        Bm25 {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl Policy for Bm25 {
    fn slate(&mut self, world: &World, ctx: Ctx) -> anyhow::Result<Vec<(usize, f64)>> {
        const K1: f64 = 1.2;
        let query = world.query(ctx.n, ctx.user);
        let titles: Vec<Vec<String>> = (0..ctx.active).map(|i| world.title(i)).collect();
        let docs = ctx.active as f64;
        let mut scores = vec![0.0f64; ctx.active];
        let mut seen: Vec<&str> = Vec::new();
        for word in query.split_whitespace() {
            if seen.contains(&word) {
                continue;
            }
            seen.push(word);
            let df = titles
                .iter()
                .filter(|t| t.iter().any(|w| w == word))
                .count() as f64;
            let idf = (1.0 + (docs - df + 0.5) / (df + 0.5)).ln();
            for (score, title) in scores.iter_mut().zip(&titles) {
                let tf = title.iter().filter(|w| *w == word).count() as f64;
                *score += idf * tf * (K1 + 1.0) / (tf + K1);
            }
        }
        let mut order: Vec<(f64, f64, usize)> = scores
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, self.rng.random::<f64>(), i))
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.total_cmp(&b.1)));
        Ok(order
            .iter()
            .take(ctx.slots)
            .map(|(_, _, i)| (*i, 1.0))
            .collect())
    }

    fn learn(&mut self, _: &World, _: Ctx, _: &[(usize, f64)], _: &[bool]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Online matrix factorisation (BPR, dim 32, with item biases) on the shown items: after
/// every impression, one SGD step per (clicked, shown but not clicked) pair of its slate
/// on ln σ(s(u, i) − s(u, j)), s = user · item + bias; users are the world's users (their
/// ids, as a user-id row would be). Served through Rank's sampler like [`Popularity`].
pub struct OnlineBpr {
    dim: usize,
    users: HashMap<usize, Vec<f32>>,
    items: Vec<(Vec<f32>, f32)>,
    lr: f32,
    reg: f32,
    sampler: RankSampler,
}

impl OnlineBpr {
    pub fn new(items: usize, temperature: f32, epsilon: f32, seed: u64) -> Self {
        let dim = 32;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let items = (0..items)
            .map(|_| {
                let v = (0..dim)
                    .map(|_| (rng.random::<f32>() - 0.5) * 0.1)
                    .collect();
                (v, 0.0)
            })
            .collect();
        OnlineBpr {
            dim,
            users: HashMap::new(),
            items,
            lr: 0.05,
            reg: 0.01,
            sampler: RankSampler::new(temperature, epsilon, rng),
        }
    }

    fn user(&mut self, u: usize) -> &mut Vec<f32> {
        let dim = self.dim;
        let seed = u as u64;
        self.users.entry(u).or_insert_with(|| {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
            (0..dim).map(|_| (r.random::<f32>() - 0.5) * 0.1).collect()
        })
    }
}

impl Policy for OnlineBpr {
    fn slate(&mut self, _world: &World, ctx: Ctx) -> anyhow::Result<Vec<(usize, f64)>> {
        let u = self.user(ctx.user).clone();
        let scores: Vec<f32> = self.items[..ctx.active]
            .iter()
            .map(|(v, b)| model::dot(&u, v) + b)
            .collect();
        Ok(self.sampler.slate(&scores, ctx.slots))
    }

    fn learn(
        &mut self,
        _: &World,
        ctx: Ctx,
        slate: &[(usize, f64)],
        clicks: &[bool],
    ) -> anyhow::Result<()> {
        let (lr, reg) = (self.lr, self.reg);
        let pos: Vec<usize> = slate
            .iter()
            .zip(clicks)
            .filter(|(_, c)| **c)
            .map(|(s, _)| s.0)
            .collect();
        let neg: Vec<usize> = slate
            .iter()
            .zip(clicks)
            .filter(|(_, c)| !**c)
            .map(|(s, _)| s.0)
            .collect();
        for &i in &pos {
            for &j in &neg {
                let mut u = self.user(ctx.user).clone();
                let (vi, bi) = self.items[i].clone();
                let (vj, bj) = self.items[j].clone();
                let x = model::dot(&u, &vi) + bi - model::dot(&u, &vj) - bj;
                // d/dx ln σ(x) = 1 − σ(x)
                let g = 1.0 / (1.0 + x.exp());
                for k in 0..self.dim {
                    let (uk, ik, jk) = (u[k], vi[k], vj[k]);
                    u[k] += lr * (g * (ik - jk) - reg * uk);
                    self.items[i].0[k] += lr * (g * uk - reg * ik);
                    self.items[j].0[k] += lr * (-g * uk - reg * jk);
                }
                self.items[i].1 += lr * (g - reg * bi);
                self.items[j].1 += lr * (-g - reg * bj);
                *self.user(ctx.user) = u;
            }
        }
        Ok(())
    }
}

/// Ranks by the world's shared feature-value effects, exactly, knowing nothing of the
/// per-user-kind and per-item idiosyncrasies: a reference for how much of the oracle's
/// advantage generalises across users and items.
pub struct FeatureOracle;

impl Policy for FeatureOracle {
    fn slate(&mut self, world: &World, ctx: Ctx) -> anyhow::Result<Vec<(usize, f64)>> {
        let s = world.feature_scores(ctx.n, ctx.user);
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|a, b| s[*b].total_cmp(&s[*a]));
        Ok(order
            .into_iter()
            .take(ctx.slots)
            .map(|i| (i, 1.0))
            .collect())
    }

    fn learn(&mut self, _: &World, _: Ctx, _: &[(usize, f64)], _: &[bool]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Rank's exploration, for the policies served through it: the same temperature
/// (relative to the scores' spread) and ε, with the policy's own random numbers.
pub struct RankSampler {
    temperature: f32,
    epsilon: f32,
    rng: rand::rngs::StdRng,
}

impl RankSampler {
    pub fn new(temperature: f32, epsilon: f32, rng: rand::rngs::StdRng) -> Self {
        RankSampler {
            temperature,
            epsilon,
            rng,
        }
    }

    /// A slate sampled from `scores` as Rank samples it: (candidate index, propensity).
    fn slate(&mut self, scores: &[f32], slots: usize) -> Vec<(usize, f64)> {
        let t = model::relative_temperature(scores, self.temperature);
        let rng = &mut self.rng;
        model::sample_slots(scores, slots, t, self.epsilon, || rng.random::<f64>())
            .into_iter()
            .map(|s| (s.index, s.propensity))
            .collect()
    }
}

/// The world's exact click rates served through the live policy's own exploration
/// (Plackett-Luce at the same temperature and ε mix, on log click rates): the ceiling of
/// any model served that way, so a policy's shortfall splits into what it has not learned
/// and what its exploration costs.
pub struct ExploringOracle {
    sampler: RankSampler,
}

impl ExploringOracle {
    pub fn new(temperature: f32, epsilon: f32, seed: u64) -> Self {
        ExploringOracle {
            sampler: RankSampler::new(temperature, epsilon, StdRng::seed_from_u64(seed)),
        }
    }
}

impl Policy for ExploringOracle {
    fn slate(&mut self, world: &World, ctx: Ctx) -> anyhow::Result<Vec<(usize, f64)>> {
        let scores: Vec<f32> = world
            .attractiveness(ctx.n, ctx.user)
            .iter()
            .map(|a| a.max(1e-12).ln() as f32)
            .collect();
        Ok(self.sampler.slate(&scores, ctx.slots))
    }

    fn learn(&mut self, _: &World, _: Ctx, _: &[(usize, f64)], _: &[bool]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The rows of the cluster's model needed to rank the simulated catalog, read from one
/// gateway version.
pub struct Snapshot {
    pub epoch: u64,
    pub spec: ModelSpec,
    rows: HashMap<(&'static str, u64), Vec<f32>>,
    dense: HashMap<&'static str, Vec<f32>>,
}

impl Params for Snapshot {
    fn read(&self, table: &str, id: u64, out: &mut [f32]) {
        let key = match table {
            model::ITEM_TABLE => model::ITEM_TABLE,
            model::FEATURE_TABLE => model::FEATURE_TABLE,
            model::ITEM_BIAS_TABLE => model::ITEM_BIAS_TABLE,
            model::ITEM_PRIOR_TABLE => model::ITEM_PRIOR_TABLE,
            model::ITEM_COUNTS_TABLE => model::ITEM_COUNTS_TABLE,
            model::HISTORY_TABLE => model::HISTORY_TABLE,
            _ => model::USER_TABLE,
        };
        match self.rows.get(&(key, id)) {
            Some(r) => out.copy_from_slice(r),
            None => out.fill(0.0),
        }
    }

    fn dense(&self, name: &str) -> &[f32] {
        self.dense.get(name).map_or(&[], |v| v.as_slice())
    }
}

/// Every feature row id the world's items and users use.
fn feature_ids(world: &World) -> Vec<u64> {
    let mut ids: Vec<u64> = (0..world.total_items())
        .flat_map(|i| world.catalog_features(i))
        .map(|f| model::item_feature_id(&f))
        .chain((0..world.user_kinds()).flat_map(|u| {
            world
                .kind_fields(u)
                .into_iter()
                .map(|(f, v)| model::user_feature_id(&f, &v))
        }))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl Snapshot {
    /// Reads the rows of every item (new ones too: their initial values) and every
    /// feature, the user tower, and where users have ids every user's row and history
    /// (everyone the run will see), all at one epoch of the gateway.
    ///
    /// # Errors
    /// The gateway failed, or its epoch moved between the reads 50 times running.
    pub async fn read(gw: &GatewayClient<Channel>, world: &World) -> anyhow::Result<Self> {
        let items: Vec<u64> = (0..world.total_items()).map(|i| world.item_id(i)).collect();
        let feats = feature_ids(world);
        let users: Vec<u64> = if world.cfg.returning.is_some() {
            (0..world.population(world.cfg.schedule.end) as usize)
                .map(|u| model::user_id_row(&world.user_id(u)))
                .collect()
        } else {
            Vec::new()
        };
        'read: for _ in 0..50 {
            // Every table in parts of at most 10,000 ids (Lookup's bound); a table the
            // cluster does not have reads as None.
            let mut parts: Vec<(&'static str, &[u64])> = vec![(model::TOWER, &[0][..])];
            for (t, ids) in [
                (model::ITEM_TABLE, &items),
                (model::FEATURE_TABLE, &feats),
                (model::ITEM_BIAS_TABLE, &items),
                (model::ITEM_PRIOR_TABLE, &items),
                (model::ITEM_COUNTS_TABLE, &items),
                (model::USER_TABLE, &users),
                (model::HISTORY_TABLE, &users),
            ] {
                parts.extend(ids.chunks(10_000).map(|c| (t, c)));
            }
            let reads = parts.iter().map(|(table, ids)| {
                let mut gw = gw.clone();
                let req = LookupRequest {
                    table: (*table).into(),
                    ids: ids.to_vec(),
                };
                async move { gw.lookup(req).await.map(tonic::Response::into_inner) }
            });
            let answers = futures::future::join_all(reads).await;
            let mut epoch = None;
            let mut rows = HashMap::new();
            let mut dense = HashMap::new();
            let mut dim = 0;
            let mut has = std::collections::HashSet::new();
            for ((table, ids), answer) in parts.iter().zip(answers) {
                let r = match answer {
                    Ok(r) => r,
                    // A table this cluster was not created with (the learned prior on a
                    // cluster with the counts prior, or the other way round): Lookup
                    // refuses the name as an argument.
                    Err(s)
                        if *table != model::TOWER
                            && (s.code() == tonic::Code::NotFound
                                || s.code() == tonic::Code::InvalidArgument
                                    && s.message().starts_with("table:")) =>
                    {
                        continue;
                    }
                    Err(s) => return Err(s.into()),
                };
                if epoch.is_some_and(|e| e != r.epoch) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue 'read;
                }
                epoch = Some(r.epoch);
                has.insert(*table);
                if *table == model::TOWER {
                    dense.insert(model::TOWER, r.values);
                    continue;
                }
                let width = r.values.len() / ids.len().max(1);
                if *table == model::ITEM_TABLE {
                    dim = r.dim as usize;
                }
                for (k, id) in ids.iter().enumerate() {
                    rows.insert((*table, *id), r.values[k * width..(k + 1) * width].to_vec());
                }
            }
            // A cluster without the bias, prior or history table ranks without them.
            let spec = ModelSpec {
                dim,
                item_bias: has.contains(model::ITEM_BIAS_TABLE),
                history: has.contains(model::HISTORY_TABLE),
                item_prior: has.contains(model::ITEM_PRIOR_TABLE),
                item_counts: has.contains(model::ITEM_COUNTS_TABLE),
                // The simulated traffic types no queries: the copies read no crosses
                // and no lexical levels.
                query_cross: false,
                lexical: false,
            };
            let tower = dense.get(model::TOWER).map_or(0, Vec::len);
            if tower != spec.tower_len() {
                bail!("the cluster's tower has {tower} values");
            }
            return Ok(Snapshot {
                epoch: epoch.unwrap_or_default(),
                spec,
                rows,
                dense,
            });
        }
        bail!("the gateway's epoch kept moving while reading a snapshot")
    }
}

/// Ranks with a copy of the cluster's model: the one in force at impression `n` among
/// `copies` (each valid from its first impression), with the gateway's sampling.
pub struct ModelCopy {
    copies: Vec<(u64, Arc<Snapshot>)>,
    sampler: RankSampler,
    /// Per copy: each item's vector and bias, and user vectors by user.
    items: HashMap<usize, Vec<(Vec<f32>, f32)>>,
    users: HashMap<(usize, usize), Vec<f32>>,
}

impl ModelCopy {
    /// `copies` sorted by first impression; the first must start at 0.
    pub fn new(
        copies: Vec<(u64, Arc<Snapshot>)>,
        temperature: f32,
        epsilon: f32,
        seed: u64,
    ) -> Self {
        ModelCopy {
            copies,
            sampler: RankSampler::new(temperature, epsilon, StdRng::seed_from_u64(seed)),
            items: HashMap::new(),
            users: HashMap::new(),
        }
    }

    fn copy_at(&self, n: u64) -> usize {
        self.copies
            .partition_point(|(from, _)| *from <= n)
            .saturating_sub(1)
    }
}

impl Policy for ModelCopy {
    fn slate(&mut self, world: &World, ctx: Ctx) -> anyhow::Result<Vec<(usize, f64)>> {
        let c = self.copy_at(ctx.n);
        let snap = Arc::clone(&self.copies[c].1);
        let spec = snap.spec;
        let items = self.items.entry(c).or_insert_with(|| {
            (0..world.total_items())
                .map(|i| {
                    let f: Vec<u64> = world
                        .catalog_features(i)
                        .iter()
                        .map(|f| model::item_feature_id(f))
                        .collect();
                    let id = world.item_id(i);
                    (
                        model::item_vector(&spec, snap.as_ref(), id, &f),
                        model::item_bias(&spec, snap.as_ref(), id),
                    )
                })
                .collect()
        });
        let u = self.users.entry((c, ctx.user)).or_insert_with(|| {
            let fields = world.rank_fields(ctx.user);
            let mut input = UserInput::new(
                fields.iter().map(|(f, v)| (f.as_str(), v.as_str())),
                &[],
                &world.user_id(ctx.user),
            )
            .expect("simulated users are valid");
            input.read_history(&spec, snap.as_ref());
            model::user_state(&spec, snap.as_ref(), &input).u
        });
        let scores: Vec<f32> = items[..ctx.active]
            .iter()
            .map(|(v, b)| model::dot(u, v) + b)
            .collect();
        Ok(self.sampler.slate(&scores, ctx.slots))
    }

    fn learn(&mut self, _: &World, _: Ctx, _: &[(usize, f64)], _: &[bool]) -> anyhow::Result<()> {
        Ok(()) // a copy learns nothing between refreshes
    }
}

/// The Python side of the Vowpal Wabbit baseline (run with `python3 -c`).
const VW_SCRIPT: &str = include_str!("vw_policy.py");

/// Checks that the Vowpal Wabbit baseline can run (python3 imports `vowpalwabbit`), so a
/// missing package is said before the live cluster phase rather than after it.
///
/// # Errors
/// python3 or the package is missing; the message says how to install it, or to skip the
/// baseline with `--no-vw`.
pub fn check_vw() -> anyhow::Result<()> {
    let fix = "pip install vowpalwabbit==9.11.9, or run without the baseline: --no-vw";
    let out = Command::new("python3")
        .args(["-c", "import vowpalwabbit"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("the Vowpal Wabbit baseline needs python3 ({fix})"))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let last = why.lines().last().unwrap_or("").trim();
        anyhow::bail!(
            "the Vowpal Wabbit baseline needs the python3 package vowpalwabbit ({last}): {fix}"
        );
    }
    Ok(())
}

/// Vowpal Wabbit `--cb_explore_adf --squarecb` in a Python co-process, fed the same
/// features as the cluster (user fields, and the user id where users have one, as
/// shared features, item fields as action features, quadratic user × item
/// interactions). Each slot is one contextual-bandit
/// decision over the items not shown yet; each learns from its own click.
pub struct Vw {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    seed: u64,
}

impl Vw {
    /// Starts the co-process.
    ///
    /// # Errors
    /// python3 or the `vowpalwabbit` package is missing (the message says how to install
    /// it).
    pub fn start(world: &World, args: &str, seed: u64) -> anyhow::Result<Self> {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(VW_SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting python3 for the Vowpal Wabbit baseline")?;
        let stdin = child.stdin.take().context("vw stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("vw stdout")?);
        let mut vw = Vw {
            child,
            stdin,
            stdout,
            seed,
        };
        let items: Vec<Vec<String>> = (0..world.total_items())
            .map(|i| {
                let mut f: Vec<String> = world
                    .item_fields(i)
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                f.push(format!("id={i}"));
                f
            })
            .collect();
        // The user fields exactly as Rank carries them to Freshet (the cross included).
        let users: Vec<Vec<String>> = (0..world.user_kinds())
            .map(|u| {
                world
                    .kind_fields(u)
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect()
            })
            .collect();
        let reply = vw.call(&serde_json::json!({
            "op": "init", "args": format!("{args} --random_seed {}", seed % 1_000_000),
            "items": items, "users": users,
        }))?;
        if reply.get("ok").is_none() {
            bail!(
                "Vowpal Wabbit baseline: {}",
                reply
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("no answer")
            );
        }
        Ok(vw)
    }

    fn call(&mut self, msg: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let mut line = serde_json::to_string(msg)?;
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush())
            .context("writing to the Vowpal Wabbit co-process")?;
        let mut answer = String::new();
        if self.stdout.read_line(&mut answer)? == 0 {
            bail!("the Vowpal Wabbit co-process exited (see its message above)");
        }
        serde_json::from_str(&answer).context("reading the Vowpal Wabbit co-process")
    }
}

impl Drop for Vw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Policy for Vw {
    fn slate(&mut self, world: &World, ctx: Ctx) -> anyhow::Result<Vec<(usize, f64)>> {
        let u: Vec<f64> = (0..ctx.slots)
            .map(|p| super::world::unit(self.seed ^ 0x77 ^ (ctx.n << 4) ^ p as u64))
            .collect();
        let reply = self.call(&serde_json::json!({
            "op": "rank", "user": world.kind_of(ctx.user), "uid": world.user_id(ctx.user),
            "active": ctx.active, "k": ctx.slots, "u": u,
        }))?;
        let slate = reply
            .get("slate")
            .and_then(|s| s.as_array())
            .context("Vowpal Wabbit: no slate in the answer")?;
        slate
            .iter()
            .map(|p| {
                let i = p.get(0).and_then(serde_json::Value::as_u64);
                let q = p.get(1).and_then(serde_json::Value::as_f64);
                match (i, q) {
                    (Some(i), Some(q)) if (i as usize) < ctx.active => Ok((i as usize, q)),
                    _ => bail!("Vowpal Wabbit: bad slot {p}"),
                }
            })
            .collect()
    }

    fn learn(
        &mut self,
        world: &World,
        ctx: Ctx,
        slate: &[(usize, f64)],
        clicks: &[bool],
    ) -> anyhow::Result<()> {
        let slots: Vec<serde_json::Value> = slate
            .iter()
            .zip(clicks)
            .map(|((i, p), c)| serde_json::json!([i, p, c]))
            .collect();
        let reply = self.call(&serde_json::json!({
            "op": "learn", "user": world.kind_of(ctx.user), "uid": world.user_id(ctx.user),
            "active": ctx.active, "slots": slots,
        }))?;
        if reply.get("ok").is_none() {
            bail!("Vowpal Wabbit learn: {reply}");
        }
        Ok(())
    }
}
