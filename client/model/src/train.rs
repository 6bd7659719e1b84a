//! Training: the off-policy actor-critic loss of a shown slot and its gradients, one
//! example at a time ([`backward`]) or a batch at once ([`backward_batch`]: the dense
//! tower and heads on candle-core, the ragged policy half in plain f32).

use candle_core::{Tensor, Var};

use super::*;

/// One training example: a shown slot and its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainExample {
    pub user: UserInput,
    /// Candidates available at the slot: (item id, hashed feature ids).
    pub candidates: Vec<(u64, Vec<u64>)>,
    /// Each candidate's lexical match level as served ([`query::lexical_level`]), in the
    /// order of `candidates`; empty: no levels (no query, or none logged).
    pub lexical: Vec<u8>,
    /// Index of the shown item in `candidates`.
    pub shown: usize,
    /// Probability the serving policy gave the shown item (the behaviour policy μ).
    pub propensity: f64,
    pub reward: f32,
}

/// Loss weights of the actor-critic update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    /// Weight of the policy-gradient term. Small by default: the actor's logits are the
    /// critic's embeddings' dot product, and its single-sample gradient (importance
    /// weights up to `clip` on explored slots, advantages from 0/1 rewards) is noisy
    /// beside the reward model's cross-entropy on every shown slot. Offline harness, 8
    /// fresh seeds, the report's schedule: weight 1 → 0.1 took whole-run normalised CTR
    /// from 0.33 to 0.39 (steady 0.46 → 0.50, after the reshuffle 0.29 → 0.36); 0 (no
    /// actor) did about as well as 0.1.
    pub policy_weight: f32,
    /// Importance weights are capped: min(π/μ, clip).
    pub clip: f32,
    /// Entropy regularisation (keeps the policy exploring).
    pub entropy: f32,
    pub value_weight: f32,
    pub reward_weight: f32,
    /// Weight of the choice term on clicked slots: -min(r, 1)·log π(a|s), the user's
    /// choice of the clicked item among the slot's candidates (a softmax cross-entropy,
    /// no importance weight, no baseline).
    pub choice_weight: f32,
}

impl Default for Hyper {
    fn default() -> Self {
        Hyper {
            policy_weight: 0.1,
            clip: 10.0,
            entropy: 0.01,
            value_weight: 1.0,
            reward_weight: 1.0,
            choice_weight: 0.0,
        }
    }
}

/// Gradients of a batch, by parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grads {
    /// (table, row id) → gradient of that row.
    pub sparse: std::collections::BTreeMap<(&'static str, u64), Vec<f32>>,
    pub tower: Vec<f32>,
    pub critic: Vec<f32>,
}

impl Grads {
    pub fn new(spec: &ModelSpec) -> Self {
        Grads {
            sparse: Default::default(),
            tower: vec![0.0; spec.tower_len()],
            critic: vec![0.0; spec.critic_len()],
        }
    }

    fn add_row(&mut self, table: &'static str, id: u64, g: &[f32], scale: f32) {
        let row = self
            .sparse
            .entry((table, id))
            .or_insert_with(|| vec![0.0; g.len()]);
        for (r, v) in row.iter_mut().zip(g) {
            *r += v * scale;
        }
    }

    /// Multiplies every gradient by `k` (e.g. 1 / batch size).
    pub fn scale(&mut self, k: f32) {
        for g in self.sparse.values_mut() {
            g.iter_mut().for_each(|v| *v *= k);
        }
        self.tower.iter_mut().for_each(|v| *v *= k);
        self.critic.iter_mut().for_each(|v| *v *= k);
    }
}

/// What one example's update saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f32,
    /// π(a|s) of the shown item under the current model.
    pub pi: f32,
    pub weight: f32,
    pub advantage: f32,
    pub value: f32,
}

struct Forward {
    pi: Vec<f32>,
    entropy: f32,
    value: f32,
    q: f32,
}

/// The policy half of one example's forward pass: π = softmax(u · v_c + β_c) over its
/// candidates and the entropy of π.
fn policy(u: &[f32], vs: &[&[f32]], biases: &[f32]) -> (Vec<f32>, f32) {
    let scores: Vec<f32> = vs.iter().zip(biases).map(|(v, b)| dot(u, v) + b).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let pi: Vec<f32> = exps.iter().map(|e| e / total).collect();
    let entropy = -pi.iter().map(|q| q * q.max(1e-30).ln()).sum::<f32>();
    (pi, entropy)
}

impl TrainExample {
    /// Candidate `c`'s lexical match level (0: none, and always without a query, as
    /// serving computes it: the forward pass and the gradient read the level only here).
    pub fn lexical_at(&self, c: usize) -> u8 {
        if self.user.query.is_empty() {
            return 0;
        }
        self.lexical.get(c).copied().unwrap_or(0)
    }
}

fn forward(spec: &ModelSpec, p: &impl Params, ex: &TrainExample) -> Forward {
    let vs: Vec<Vec<f32>> = ex
        .candidates
        .iter()
        .map(|(id, f)| item_vector(spec, p, *id, f))
        .collect();
    let refs: Vec<&[f32]> = vs.iter().map(Vec::as_slice).collect();
    let biases: Vec<f32> = ex
        .candidates
        .iter()
        .enumerate()
        .map(|(c, (id, f))| {
            item_bias(spec, p, *id)
                + query_cross(spec, p, &ex.user.query, *id, f)
                + lexical_weight(spec, p, ex.lexical_at(c))
        })
        .collect();
    let user = user_state(spec, p, &ex.user);
    let (pi, entropy) = policy(&user.u, &refs, &biases);
    let (value, q) = heads_one(spec, p, &user, refs[ex.shown]);
    Forward {
        pi,
        entropy,
        value,
        q: q + biases[ex.shown],
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The cross-entropy of a click `y` in [0, 1] under σ(`logit`).
fn bce(logit: f32, y: f32) -> f32 {
    let s = sigmoid(logit);
    -(y * s.max(1e-30).ln() + (1.0 - y) * (1.0 - s).max(1e-30).ln())
}

/// The loss with the importance weight `w` and advantage `a` held fixed (they are
/// stop-gradient terms): -w·A·log π(a|s) - β·H(π) + ½(V(s) - r)² + BCE(σ(Q(s,a)), min(r, 1)).
pub fn loss_fixed(
    spec: &ModelSpec,
    p: &impl Params,
    ex: &TrainExample,
    h: &Hyper,
    w: f32,
    a: f32,
) -> f32 {
    loss_of(&forward(spec, p, ex), ex, h, w, a)
}

/// The loss of one example from its forward pass (`w` and `a` held fixed).
fn loss_of(f: &Forward, ex: &TrainExample, h: &Hyper, w: f32, a: f32) -> f32 {
    let y = ex.reward.clamp(0.0, 1.0);
    let logpi = f.pi[ex.shown].max(1e-30).ln();
    -(h.policy_weight * w * a + h.choice_weight * y) * logpi - h.entropy * f.entropy
        + h.value_weight * 0.5 * (f.value - ex.reward).powi(2)
        + h.reward_weight * bce(f.q, y)
}

/// The item prior's own loss on one example: the shown item's click model
/// h.reward_weight · BCE(σ(b_q + ρ_a), min(r, 1)), with the critic's bias b_q (the reward
/// model's base logit) held fixed. ρ_a is trained by this loss alone: the policy and the
/// reward model read it (inside [`item_bias`]) as a fixed input, so [`loss_fixed`]'s
/// gradient does not reach it and this loss's gradient does not reach the critic. 0 for a
/// model without the prior. (With `reward_weight` 0 the prior stops learning, like the
/// reward model.)
pub fn prior_loss(spec: &ModelSpec, p: &impl Params, ex: &TrainExample, h: &Hyper) -> f32 {
    if !spec.item_prior {
        return 0.0;
    }
    h.reward_weight * bce(prior_logit(spec, p, ex), ex.reward.clamp(0.0, 1.0))
}

/// b_q + ρ_a of the shown item.
fn prior_logit(spec: &ModelSpec, p: &impl Params, ex: &TrainExample) -> f32 {
    let b_q = p.dense(CRITIC)[2 * spec.dim + 1];
    b_q + item_prior(spec, p, ex.candidates[ex.shown].0)
}

/// d [`prior_loss`] / d ρ_a.
fn prior_gradient(spec: &ModelSpec, p: &impl Params, ex: &TrainExample, h: &Hyper) -> f32 {
    h.reward_weight * (sigmoid(prior_logit(spec, p, ex)) - ex.reward.clamp(0.0, 1.0))
}

/// Off-policy actor-critic update for one example: adds its gradients to `g`.
/// The importance weight min(π/μ, clip) and the advantage r - V(s) are computed from
/// the current parameters and held fixed.
pub fn backward(
    spec: &ModelSpec,
    p: &impl Params,
    ex: &TrainExample,
    h: &Hyper,
    g: &mut Grads,
) -> StepStats {
    backward_batch(spec, p, std::slice::from_ref(ex), h, g)[0]
}

/// The dense graph of a batch after its backward pass.
struct DenseGrads {
    /// Per example: V(s), Q(s, a) (forward values).
    value: Vec<f32>,
    q: Vec<f32>,
    /// d loss / d x per example (its first d values reach the pooled user rows).
    dx: Vec<Vec<f32>>,
    /// d loss / d (shown item vector) per example.
    dva: Vec<Vec<f32>>,
    /// d loss / d (shown item's bias) per example, through the reward logit.
    dbias: Vec<f32>,
    tower: Vec<f32>,
    critic: Vec<f32>,
}

/// The dense half of a batch's update on candle-core: tower and heads forward, the value
/// and reward losses, and the policy-gradient term entering through `du_pg` (d loss / d u
/// of the ragged policy half, computed by `pg` from the forward values), then autograd.
/// A batch as the dense graph takes it, one row per example.
struct DenseBatch<'a> {
    /// Tower inputs (B × (d + NUMERIC_MAX)).
    xs: &'a [f32],
    /// Shown item vectors (B × d).
    vas: &'a [f32],
    /// Shown items' biases (B).
    biases: &'a [f32],
    rewards: &'a [f32],
}

fn dense_step(
    spec: &ModelSpec,
    p: &impl Params,
    batch: DenseBatch<'_>,
    h: &Hyper,
    pg: impl FnOnce(&[Vec<f32>], &[f32]) -> Vec<f32>,
) -> candle_core::Result<DenseGrads> {
    let DenseBatch {
        xs,
        vas,
        biases,
        rewards,
    } = batch;
    let d = spec.dim;
    let width = d + NUMERIC_MAX;
    let b = rewards.len();
    let cpu = Device::Cpu;
    let x = Var::from_slice(xs, (b, width), &cpu)?;
    let va = Var::from_slice(vas, (b, d), &cpu)?;
    let tw = p.dense(TOWER);
    let tw = Var::from_slice(tw, tw.len(), &cpu)?;
    let c = p.dense(CRITIC);
    let c = Var::from_slice(c, c.len(), &cpu)?;
    let bias = Var::from_slice(biases, b, &cpu)?;
    let u = tower(spec, &x, &tw)?;
    let (value, q) = heads(spec, &u, &va, &c)?;
    let q = q.add(&bias)?;
    let u_vals = u.to_vec2::<f32>()?;
    let v_vals = value.to_vec1::<f32>()?;
    let du_pg = Tensor::from_vec(pg(&u_vals, &v_vals), (b, d), &cpu)?;
    let r = Tensor::from_slice(rewards, b, &cpu)?;
    let y = r.clamp(0.0f32, 1.0f32)?;
    // ½ Σ (V - r)²
    let value_loss = value
        .sub(&r)?
        .sqr()?
        .sum_all()?
        .affine(0.5 * f64::from(h.value_weight), 0.0)?;
    // Σ BCE(σ(q), y) = Σ softplus(q) - y q, softplus(q) = relu(q) + ln(1 + e^-|q|).
    let softplus = q
        .relu()?
        .add(&q.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
    let reward_loss = softplus
        .sub(&q.mul(&y)?)?
        .sum_all()?
        .affine(f64::from(h.reward_weight), 0.0)?;
    // Σ u · du_pg: its gradient in u is du_pg (held fixed), the policy half's.
    let pg_term = u.mul(&du_pg)?.sum_all()?;
    let loss = value_loss.add(&reward_loss)?.add(&pg_term)?;
    let grads = loss.backward()?;
    let grad = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        match grads.get(t) {
            Some(g) => Ok(g.clone()),
            None => Tensor::zeros(n, candle_core::DType::F32, &cpu),
        }
    };
    Ok(DenseGrads {
        value: v_vals,
        q: q.to_vec1::<f32>()?,
        dx: grad(&x, b * width)?.reshape((b, width))?.to_vec2::<f32>()?,
        dva: grad(&va, b * d)?.reshape((b, d))?.to_vec2::<f32>()?,
        dbias: grad(&bias, b)?.to_vec1::<f32>()?,
        tower: grad(&tw, spec.tower_len())?.to_vec1::<f32>()?,
        critic: grad(&c, spec.critic_len())?.to_vec1::<f32>()?,
    })
}

/// [`backward`] for every example of a batch, adding the gradients to `g`: the same
/// sums, but each distinct candidate's item vector is computed once per batch and its
/// gradient is added to its rows once (examples of one batch share most candidates:
/// this is what makes a worker step cheap). The dense tower and heads run as one candle
/// graph over the whole batch.
pub fn backward_batch(
    spec: &ModelSpec,
    p: &impl Params,
    batch: &[TrainExample],
    h: &Hyper,
    g: &mut Grads,
) -> Vec<StepStats> {
    if batch.is_empty() {
        return Vec::new();
    }
    let d = spec.dim;
    let width = d + NUMERIC_MAX;
    // Distinct (item id, feature ids) candidates of the batch.
    let mut by_id: std::collections::HashMap<u64, Vec<usize>> = Default::default();
    let mut distinct: Vec<(u64, &[u64])> = Vec::new();
    let slots: Vec<Vec<usize>> = batch
        .iter()
        .map(|ex| {
            ex.candidates
                .iter()
                .map(|(id, feats)| {
                    let known = by_id.entry(*id).or_default();
                    match known.iter().find(|&&k| distinct[k].1 == feats.as_slice()) {
                        Some(&k) => k,
                        None => {
                            distinct.push((*id, feats));
                            known.push(distinct.len() - 1);
                            distinct.len() - 1
                        }
                    }
                })
                .collect()
        })
        .collect();
    let vs: Vec<Vec<f32>> = distinct
        .iter()
        .map(|(id, f)| item_vector(spec, p, *id, f))
        .collect();
    let bs: Vec<f32> = distinct
        .iter()
        .map(|(id, _)| item_bias(spec, p, *id))
        .collect();
    // c(q, a) + ℓ(q, a) per example and candidate (empty for an example without a query).
    let crosses: Vec<Vec<f32>> = batch
        .iter()
        .map(|ex| {
            if !(spec.query_cross || spec.lexical) || ex.user.query.is_empty() {
                return Vec::new();
            }
            ex.candidates
                .iter()
                .enumerate()
                .map(|(c, (id, f))| {
                    query_cross(spec, p, &ex.user.query, *id, f)
                        + lexical_weight(spec, p, ex.lexical_at(c))
                })
                .collect()
        })
        .collect();
    let logit_bias =
        |k: usize, c: usize, slot: usize| bs[slot] + crosses[k].get(c).copied().unwrap_or(0.0);
    let mut xs = vec![0.0f32; batch.len() * width];
    let mut vas = Vec::with_capacity(batch.len() * d);
    let mut shown_bias = Vec::with_capacity(batch.len());
    for (k, ((ex, slots), x)) in batch
        .iter()
        .zip(&slots)
        .zip(xs.chunks_mut(width))
        .enumerate()
    {
        tower_input(spec, p, &ex.user, x);
        vas.extend_from_slice(&vs[slots[ex.shown]]);
        shown_bias.push(logit_bias(k, ex.shown, slots[ex.shown]));
    }
    let rewards: Vec<f32> = batch.iter().map(|ex| ex.reward).collect();
    let mut dvs: Vec<Vec<f32>> = vec![vec![0.0; d]; distinct.len()];
    let mut dbs: Vec<f32> = vec![0.0; distinct.len()];
    // The policy half, per example on the forward values: π over its candidates, the
    // importance weight min(π/μ, clip) and advantage r - V(s) held fixed, and
    // d loss / d score_c = λ·w·A·(π_c - 1[c = shown]) + β·π_c·(ln π_c + H), λ the policy weight.
    let mut per_ex: Vec<(Vec<f32>, f32, f32, f32)> = Vec::with_capacity(batch.len());
    let dense = dense_step(
        spec,
        p,
        DenseBatch {
            xs: &xs,
            vas: &vas,
            biases: &shown_bias,
            rewards: &rewards,
        },
        h,
        |us, values| {
            let mut du_all = vec![0.0f32; batch.len() * d];
            for (e, (((ex, slots), (u, value)), du)) in batch
                .iter()
                .zip(&slots)
                .zip(us.iter().zip(values))
                .zip(du_all.chunks_mut(d))
                .enumerate()
            {
                let refs: Vec<&[f32]> = slots.iter().map(|&k| vs[k].as_slice()).collect();
                let biases: Vec<f32> = slots
                    .iter()
                    .enumerate()
                    .map(|(c, &k)| logit_bias(e, c, k))
                    .collect();
                let (pi, entropy) = policy(u, &refs, &biases);
                let mu = ex.propensity.max(1e-6) as f32;
                let w = (pi[ex.shown] / mu).min(h.clip);
                let adv = ex.reward - value;
                let coef = h.policy_weight * w * adv + h.choice_weight * ex.reward.clamp(0.0, 1.0);
                for (c, pc) in pi.iter().enumerate() {
                    let ind = if c == ex.shown { 1.0 } else { 0.0 };
                    let gs = coef * (pc - ind) + h.entropy * pc * (pc.max(1e-30).ln() + entropy);
                    dbs[slots[c]] += gs;
                    let dv = &mut dvs[slots[c]];
                    for i in 0..d {
                        du[i] += gs * refs[c][i];
                        dv[i] += gs * u[i];
                    }
                }
                per_ex.push((pi, entropy, w, adv));
            }
            du_all
        },
    );
    let dense = dense_ok(dense);
    for (a, b) in g.tower.iter_mut().zip(&dense.tower) {
        *a += b;
    }
    for (a, b) in g.critic.iter_mut().zip(&dense.critic) {
        *a += b;
    }
    let mut stats = Vec::with_capacity(batch.len());
    for (k, (ex, slots)) in batch.iter().zip(&slots).enumerate() {
        for (a, b) in dvs[slots[ex.shown]].iter_mut().zip(&dense.dva[k]) {
            *a += b;
        }
        dbs[slots[ex.shown]] += dense.dbias[k];
        if spec.item_prior {
            let id = ex.candidates[ex.shown].0;
            g.add_row(ITEM_PRIOR_TABLE, id, &[prior_gradient(spec, p, ex, h)], 1.0);
        }
        // The shown item's crosses and lexical level, from the reward model only (see
        // the crate docs).
        if spec.query_cross && !ex.user.query.is_empty() {
            let (id, feats) = &ex.candidates[ex.shown];
            let scale = 1.0 / ex.user.query.len() as f32;
            for row in query::cross_rows(&ex.user.query, *id, feats) {
                g.add_row(CROSS_TABLE, row, &[dense.dbias[k]], scale);
            }
        }
        if let Some(row) = query::lexical_row(ex.lexical_at(ex.shown)).filter(|_| spec.lexical) {
            g.add_row(LEXICAL_TABLE, row, &[dense.dbias[k]], 1.0);
        }
        // Pooled user rows: an average over the feature rows and the user-id row.
        let dx = &dense.dx[k];
        let n = ex.user.feature_ids.len() + usize::from(ex.user.user_id.is_some());
        if n > 0 {
            let scale = 1.0 / n as f32;
            for id in &ex.user.feature_ids {
                g.add_row(FEATURE_TABLE, *id, &dx[..d], scale);
            }
            if let Some(uid) = ex.user.user_id {
                g.add_row(USER_TABLE, uid, &dx[..d], scale);
            }
        }
        // The query's rows are averaged apart and added (see `tower_input`).
        if !ex.user.query.is_empty() {
            let rows = query::query_rows(&ex.user.query);
            let scale = 1.0 / rows.len() as f32;
            for id in &rows {
                g.add_row(FEATURE_TABLE, *id, &dx[..d], scale);
            }
        }
        let (pi, entropy, w, adv) = std::mem::take(&mut per_ex[k]);
        let f = Forward {
            pi,
            entropy,
            value: dense.value[k],
            q: dense.q[k],
        };
        stats.push(StepStats {
            loss: loss_of(&f, ex, h, w, adv),
            pi: f.pi[ex.shown],
            weight: w,
            advantage: adv,
            value: f.value,
        });
    }
    // Item vectors: id row plus the mean of the item's feature rows, once per
    // distinct candidate.
    for (((id, feats), dv), db) in distinct.iter().zip(&dvs).zip(&dbs) {
        g.add_row(ITEM_TABLE, *id, dv, 1.0);
        if spec.item_bias {
            g.add_row(ITEM_BIAS_TABLE, *id, &[*db], 1.0);
        }
        if !feats.is_empty() {
            let k = 1.0 / feats.len() as f32;
            for fid in *feats {
                g.add_row(FEATURE_TABLE, *fid, dv, k);
            }
        }
    }
    stats
}

/// The history rows' pushes for a batch: per user with clicks (reward > 0) in it,
/// h - mean(v of the clicked items) with h and v read from `p`, into `g` (the history
/// table's SGD at rate α then moves h that share towards the clicks). Nothing for a model
/// without the history table.
pub fn history_updates(spec: &ModelSpec, p: &impl Params, batch: &[TrainExample], g: &mut Grads) {
    if !spec.history {
        return;
    }
    let d = spec.dim;
    let mut clicked: std::collections::BTreeMap<u64, (Vec<f32>, usize)> = Default::default();
    for ex in batch.iter().filter(|ex| ex.reward > 0.0) {
        let Some(uid) = ex.user.user_id else { continue };
        let (id, feats) = &ex.candidates[ex.shown];
        let v = item_vector(spec, p, *id, feats);
        let e = clicked.entry(uid).or_insert_with(|| (vec![0.0; d], 0));
        e.0.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
        e.1 += 1;
    }
    let mut h = vec![0.0f32; d];
    for (uid, (sum, n)) in clicked {
        p.read(HISTORY_TABLE, uid, &mut h);
        let push: Vec<f32> = h.iter().zip(&sum).map(|(h, s)| h - s / n as f32).collect();
        g.add_row(HISTORY_TABLE, uid, &push, 1.0);
    }
}

/// The click counts' pushes for a batch ([`ITEM_COUNTS_TABLE`], `CountsConfig`), from
/// the candidates' rows read from `p`:
/// - per shown slot (one example), its click and the slot on the shown item's row;
/// - per distinct candidate, the batch's slots as passed, so that every candidate's
///   short window forgets at the same pace whether shown or not;
/// - per distinct candidate, the catalog rate p̄ that its estimate is smoothed towards:
///   the candidates' long windows pooled, (Σ clicks + 1) / (Σ shown + K), pushed as
///   passed · p̄ (the shard sets the row's rate to the push's passed-weighted mean; kept
///   in every row so that ρ_a is a function of the item's row alone: the gateway's
///   retrieval index patches only the rows an epoch wrote);
/// - a restart of every candidate's long window when the candidates' short windows
///   disagree with their long ones past [`COUNTS_RESTART_LLR`] (a change of regime, such
///   as a reshuffle of popularity: the long counts then start again from the recent ones
///   instead of outvoting them for thousands of slots).
///
/// Nothing for a model without the table. Every value pushed is >= 0; steps that read
/// the same rows and push at once compose: their clicks and slots add, a restart is
/// idempotent (both set the long window to the short one), and the rate is set, never
/// added, so it cannot overshoot.
pub fn counts_updates(spec: &ModelSpec, p: &impl Params, batch: &[TrainExample], g: &mut Grads) {
    if !spec.item_counts || batch.is_empty() {
        return;
    }
    let mut candidates: Vec<u64> = batch
        .iter()
        .flat_map(|ex| ex.candidates.iter().map(|(id, _)| *id))
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    let rows: Vec<[f32; COUNTS_DIM]> = candidates
        .iter()
        .map(|id| {
            let mut r = [0.0f32; COUNTS_DIM];
            p.read(ITEM_COUNTS_TABLE, *id, &mut r);
            r
        })
        .collect();
    let (clicks, shown) = rows.iter().fold((0.0f64, 0.0f64), |(c, n), r| {
        (c + f64::from(r[0].max(0.0)), n + f64::from(r[1].max(0.0)))
    });
    let rate = ((clicks + 1.0) / (shown + f64::from(COUNTS_WEIGHT))) as f32;
    // Σ shown_short · KL(short rate ‖ long rate), both smoothed alike (so that right after
    // a restart, equal windows, it is 0 whatever their size): a log-likelihood ratio of
    // "these recent slots came from another rate" against "from the long one".
    let llr: f64 = rows
        .iter()
        .map(|r| {
            let short = f64::from(smoothed_rate(r[2], r[3], rate));
            let long = f64::from(smoothed_rate(r[0], r[1], rate));
            f64::from(r[3].max(0.0)) * bernoulli_kl(short, long)
        })
        .sum();
    let restart = if llr > f64::from(COUNTS_RESTART_LLR) {
        1.0
    } else {
        0.0
    };
    let passed = batch.len() as f32;
    for id in &candidates {
        g.add_row(
            ITEM_COUNTS_TABLE,
            *id,
            &[0.0, 0.0, passed, restart, passed * rate],
            1.0,
        );
    }
    for ex in batch {
        let click = if ex.reward > 0.0 { 1.0 } else { 0.0 };
        let id = ex.candidates[ex.shown].0;
        g.add_row(ITEM_COUNTS_TABLE, id, &[click, 1.0, 0.0, 0.0, 0.0], 1.0);
    }
}

/// KL(Bernoulli(p) ‖ Bernoulli(q)), q in (0, 1).
fn bernoulli_kl(p: f64, q: f64) -> f64 {
    let term = |a: f64, b: f64| if a <= 0.0 { 0.0 } else { a * (a / b).ln() };
    term(p, q) + term(1.0 - p, 1.0 - q)
}
