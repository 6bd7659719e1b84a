//! Unit tests of the simulator's learning loop (offline harness) and its reports.

//! The model on the simulated world without a cluster: the worker's update (batched,
//! the optimizers as the shards apply them) in one process. It separates what the
//! model can learn from what the system delivers, and is the harness the model's
//! rates were tuned with:
//! `OBD=<dir with obd/> cargo test -p freshet-sim --release offline -- --ignored --nocapture`
//! (`RUNS="n,batch,temperature;..."`, `T_<table>_LR`, `T_<table>_SGD`, `T_<table>_ADAM`
//! with `T_<table>_B1` / `_B2`, `OPT=adam|adagrad` override; `RESET=rows|acc` forgets the
//! user-side rows at the reshuffle and `RESET=counts` empties both windows of every counts
//! row there (unlike the detector's restart, which keeps the short window; the catalog
//! rate is then pooled afresh), diagnostics;
//! `TRAFFIC=returning` with `BASELINES=1` runs the returning-users world beside online
//! popularity and BPR; `NO_BIAS`, `NO_PRIOR`, `NO_HISTORY`, `NO_USER` remove a part,
//! `LEARNED_PRIOR` ranks with the learned item prior instead of the counts;
//! `SCORE=bias|prior|uv|uvp|q|mix:W|bshrink:L` serves by one part of the model (or the
//! policy's score with β scaled) instead of the policy's score, `SCORE=ucb:C` by the
//! policy's score with the counts' ρ at C standard errors above the item's rate (the
//! default model's counts prior only), `SCORE=pop` by the
//! popularity baseline's estimator inside this loop, `SCORE=coec` by it with shown slots
//! weighted by the position discount, `SCORE=popuser:K` by it smoothed towards each
//! user's own counts, `SCORE=hist:W[:clean]` by the world's true appeal plus W times a
//! history of the world's own item vectors (ceilings of a non-personal order and of a
//! history row), `RNG_SALT` draws this arm's slates
//! from another random stream, `PRIOR_COUNTS=K` (with `LEARNED_PRIOR`) replaces the
//! learned item prior by the items' smoothed click counts (forgetting by `COUNTS_DECAY=D`
//! each step, no change detector),
//! `DECAY_<table>=D` shrinks the rows each step updates towards 0 by D, `DIAG` prints per
//! window the greedy order's quality by the model, by the items' true appeal alone and by
//! appeal plus the user's kind's taste, the impressions whose counts restarted, and the CTR
//! of the first 25 recovery windows after the reshuffle over the pre-shift half hour's;
//! diagnostics:
//! see `score_all` and `offline`). With `SCHED=standard` every seed also prints the
//! report's own steady state, recovery to 80% after the reshuffle and whole run, for the
//! model and (with `BASELINES`) for popularity and BPR.
use super::*;
use freshet_model::{self as model, Hyper, ModelSpec, Params, TrainExample, UserInput};
use freshet_proto::ps::v1::{optimizer_config::Kind, TableSpec};
use freshet_proto::{fnv1a64, init_value};
use freshet_server::fsm::Optimizer;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

struct Local {
    specs: Vec<TableSpec>,
    /// (table, id) → (weights, optimizer state).
    rows: HashMap<(String, u64), (Vec<f32>, Vec<f32>)>,
    /// `DECAY_<table>=D`, a diagnostic: each row a step updates then shrinks by D
    /// towards 0.
    decay: HashMap<String, f32>,
    /// Each table's optimizer, as the shards build it from the spec (so the `T_<table>_*`
    /// overrides must pass the shards' checks too: rates > 0, β < 1).
    opts: HashMap<String, Optimizer>,
    /// `RHO=R`, a diagnostic: Adagrad's accumulator decays by R each step (RMSprop-like,
    /// for trying forgetting).
    rho: Option<f32>,
}

/// A table's optimizer as the shards build it from the spec.
fn optimizer(t: &TableSpec) -> Optimizer {
    Optimizer::from_proto(t.optimizer.as_ref(), &t.name)
        .unwrap_or_else(|e| panic!("table {}: {e:?}", t.name))
}

/// One step on one row, as the shards apply it (`freshet_server::fsm::Optimizer`, the
/// same code and bits), except with `rho` (see [`Local::rho`]).
fn apply(opt: &Optimizer, rho: Option<f32>, w: &mut [f32], st: &mut [f32], g: &[f32]) {
    match (opt, rho) {
        (Optimizer::Adagrad { lr, eps, .. }, Some(rho)) => {
            for j in 0..w.len() {
                st[j] = rho * st[j] + g[j] * g[j];
                w[j] -= lr * g[j] / (st[j].sqrt() + eps);
            }
        }
        _ => opt.apply(w, st, g),
    }
}

impl Local {
    fn new(spec: ModelSpec) -> Self {
        let mut specs = spec.tables();
        for t in &mut specs {
            let env = |k: &str| {
                std::env::var(format!("T_{}_{k}", t.name))
                    .ok()
                    .and_then(|v| v.parse::<f32>().ok())
            };
            let kind = t.optimizer.as_mut().unwrap().kind.as_mut().unwrap();
            if std::env::var("OPT").as_deref() == Ok("adam") {
                *kind = Kind::Adam(freshet_proto::ps::v1::AdamConfig {
                    lr: 0.01,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.0,
                });
            }
            if std::env::var("OPT").as_deref() == Ok("adagrad") {
                *kind = Kind::Adagrad(freshet_proto::ps::v1::AdagradConfig {
                    lr: 0.1,
                    initial_accumulator: 0.01,
                    eps: 1e-8,
                });
            }
            // `T_<table>_SGD=LR`: plain SGD at a constant rate for that table.
            if let Some(lr) = env("SGD") {
                *kind = Kind::Sgd(freshet_proto::ps::v1::SgdConfig { lr });
            }
            // `T_<table>_ADAM=LR`: Adam for that table.
            if let Some(lr) = env("ADAM") {
                *kind = Kind::Adam(freshet_proto::ps::v1::AdamConfig {
                    lr,
                    beta1: env("B1").unwrap_or(0.9),
                    beta2: env("B2").unwrap_or(0.999),
                    eps: 1e-8,
                    weight_decay: 0.0,
                });
            }
            if let Some(v) = env("INIT") {
                t.init_scale = v;
            }
            let kind = t.optimizer.as_mut().unwrap().kind.as_mut().unwrap();
            if let Some(lr) = env("LR") {
                match kind {
                    Kind::Adagrad(a) => a.lr = lr,
                    Kind::Adam(a) => a.lr = lr,
                    Kind::Sgd(a) => a.lr = lr,
                    _ => {}
                }
            }
        }
        let opts = specs
            .iter()
            .map(|t| (t.name.clone(), optimizer(t)))
            .collect();
        let decay = specs
            .iter()
            .filter_map(|t| {
                let d = std::env::var(format!("DECAY_{}", t.name)).ok()?;
                Some((t.name.clone(), d.parse().ok()?))
            })
            .collect();
        Local {
            specs,
            rows: HashMap::new(),
            decay,
            opts,
            rho: std::env::var("RHO").ok().and_then(|v| v.parse().ok()),
        }
    }

    fn table(&self, name: &str) -> &TableSpec {
        self.specs.iter().find(|t| t.name == name).unwrap()
    }

    fn init(t: &TableSpec, id: u64) -> (Vec<f32>, Vec<f32>) {
        let w = (0..u64::from(t.dim))
            .map(|j| init_value(t.seed, fnv1a64(&t.name), id, j, t.init_scale))
            .collect();
        let opt = optimizer(t);
        let mut state = vec![0.0; opt.state_len(t.dim as usize)];
        opt.init_state(&mut state);
        (w, state)
    }

    /// Applies a step (dense gradients already averaged over the batch).
    fn step(&mut self, g: &model::Grads) {
        let dense = [
            (model::TOWER, g.tower.clone()),
            (model::CRITIC, g.critic.clone()),
        ];
        let parts = g
            .sparse
            .iter()
            .map(|((t, id), grad)| (*t, *id, grad.clone()))
            .chain(dense.into_iter().map(|(t, grad)| (t, 0, grad)));
        for (t, id, grad) in parts {
            let spec = self.table(t).clone();
            let opt = self.opts[t];
            let e = self
                .rows
                .entry((t.to_string(), id))
                .or_insert_with(|| Local::init(&spec, id));
            apply(&opt, self.rho, &mut e.0, &mut e.1, &grad);
            if let Some(d) = self.decay.get(t) {
                e.0.iter_mut().for_each(|w| *w *= 1.0 - d);
            }
        }
    }

    fn get(&self, table: &str, id: u64) -> Vec<f32> {
        match self.rows.get(&(table.to_string(), id)) {
            Some(r) => r.0.clone(),
            None => Local::init(self.table(table), id).0,
        }
    }
}

/// Dense tensors are read by reference: kept initialised in `rows`.
struct View<'a>(&'a Local, Vec<f32>, Vec<f32>);

impl Params for View<'_> {
    fn read(&self, table: &str, id: u64, out: &mut [f32]) {
        out.copy_from_slice(&self.0.get(table, id));
    }
    fn dense(&self, name: &str) -> &[f32] {
        if name == model::TOWER {
            &self.1
        } else {
            &self.2
        }
    }
}

/// The policy score of every candidate for one user. `SCORE` (`bias`, `prior`, `uv`,
/// `uvp`, `q`, `mix:W`, `bshrink:L`, `ucb:C`), diagnostics: serve by the item bias and
/// prior alone (β + ρ), by the item prior alone (ρ), by u · v alone, by u · v + ρ (the
/// policy's score without β), by the reward model's logit (Q + β + ρ), by the policy's
/// score plus W times that logit, by the policy's score with β scaled by L, or by it with
/// an optimistic ρ (the counts' upper bound at C standard errors).
fn score_all(spec: &ModelSpec, p: &View, input: &UserInput, cands: &[(u64, Vec<u64>)]) -> Vec<f32> {
    let u = model::user_state(spec, p, input);
    let mode = std::env::var("SCORE").unwrap_or_default();
    cands
        .iter()
        .map(|(id, f)| match mode.as_str() {
            "bias" => model::item_bias(spec, p, *id),
            "prior" => model::item_prior(spec, p, *id),
            "uv" => model::dot(&u.u, &model::item_vector(spec, p, *id, f)),
            "uvp" => {
                model::dot(&u.u, &model::item_vector(spec, p, *id, f))
                    + model::item_prior(spec, p, *id)
            }
            "q" => {
                let v = model::item_vector(spec, p, *id, f);
                model::reward_logit(spec, p, &u, &v) + model::item_bias(spec, p, *id)
            }
            m if m.starts_with("bshrink:") => {
                let l: f32 = m[8..].parse().unwrap();
                let beta = model::item_bias(spec, p, *id) - model::item_prior(spec, p, *id);
                model::score(spec, p, &u, *id, f, 0) - (1.0 - l) * beta
            }
            m if m.starts_with("ucb:") => {
                // The policy's score with ρ replaced by ln(upper bound / p̄): the smoothed
                // rate plus C standard errors of it at the long window's slots.
                let c: f32 = m[4..].parse().unwrap();
                let mut r = [0.0f32; model::COUNTS_DIM];
                p.read(model::ITEM_COUNTS_TABLE, *id, &mut r);
                let rate = model::counts_rate(&r);
                let sm = model::smoothed_rate(r[0], r[1], rate);
                let se = (sm * (1.0 - sm) / (r[1].max(0.0) + model::COUNTS_WEIGHT)).sqrt();
                model::score(spec, p, &u, *id, f, 0) - model::counts_prior(&r)
                    + ((sm + c * se) / rate).ln()
            }
            m if m.starts_with("mix:") => {
                let w: f32 = m[4..].parse().unwrap();
                let v = model::item_vector(spec, p, *id, f);
                model::score(spec, p, &u, *id, f, 0)
                    + w * (model::reward_logit(spec, p, &u, &v) + model::item_bias(spec, p, *id))
            }
            _ => model::score(spec, p, &u, *id, f, 0),
        })
        .collect()
}

/// A batch's gradients as the worker pushes them: dense ones averaged, sparse rows summed.
fn gradients(spec: &ModelSpec, p: &View, batch: &[TrainExample], h: &Hyper) -> model::Grads {
    let mut g = model::Grads::new(spec);
    model::backward_batch(spec, p, batch, h, &mut g);
    model::history_updates(spec, p, batch, &mut g);
    model::counts_updates(spec, p, batch, &mut g);
    let k = 1.0 / batch.len() as f32;
    g.tower.iter_mut().for_each(|v| *v *= k);
    g.critic.iter_mut().for_each(|v| *v *= k);
    g
}

/// `h` with the loss weights that `H_POLICY`, `H_CLIP`, `H_ENTROPY`, `H_VALUE`,
/// `H_REWARD`, `H_CHOICE` override.
fn hyper_from_env(mut h: Hyper) -> Hyper {
    for (k, v) in [
        ("H_POLICY", &mut h.policy_weight),
        ("H_CLIP", &mut h.clip),
        ("H_ENTROPY", &mut h.entropy),
        ("H_VALUE", &mut h.value_weight),
        ("H_REWARD", &mut h.reward_weight),
        ("H_CHOICE", &mut h.choice_weight),
    ] {
        if let Some(x) = std::env::var(k).ok().and_then(|x| x.parse().ok()) {
            *v = x;
        }
    }
    h
}

/// Normalised CTR per window of `n / 10` impressions, with an abrupt reshuffle at
/// `n / 2`.
fn offline(n: u64, batch: usize, temperature: f32, epsilon: f32, seed: u64) -> Vec<f64> {
    // `SCHED=standard`: the report's schedule (shift, gradual drift, new items) in
    // `n` impressions, windows of half a simulated hour; otherwise one abrupt
    // reshuffle at `n / 2`, windows of `n / 10`.
    let standard = std::env::var("SCHED").as_deref() == Ok("standard");
    let schedule = if standard {
        let mut s = Schedule::standard(n * 2 / 13);
        s.end = n;
        s
    } else {
        Schedule {
            hour: 1000,
            shift_at: Some(n / 2),
            gradual: None,
            new_items_at: None,
            end: n,
        }
    };
    let windows = if standard { 13 } else { 10 };
    // `TRAFFIC=returning`: returning users, a heavy-tailed catalog, sparse clicks and
    // slates of `SLOTS` (default 10); `ITEMS` and `USERS` size it.
    let returning = (std::env::var("TRAFFIC").as_deref() == Ok("returning")).then(|| {
        let d = crate::world::Returning::default();
        let env = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let envf = |k: &str, d: f64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        crate::world::Returning {
            appeal_zipf: envf("ZIPF", d.appeal_zipf),
            individual: envf("INDIVIDUAL", d.individual),
            activity: envf("ACTIVITY", d.activity),
            items: env("ITEMS", d.items as u64) as usize,
            users: env("USERS", d.users),
            new_users_per_hour: env("USERS", d.users) / 2,
            ..d
        }
    });
    let cfg = match returning {
        Some(r) => WorldConfig::returning(seed, schedule, r),
        None => WorldConfig::new(seed, schedule),
    };
    let slots: usize = std::env::var("SLOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if returning.is_some() { 10 } else { 3 });
    let grounding = match std::env::var("OBD") {
        Ok(dir) => Grounding::from_obd(std::path::Path::new(&dir), "all").unwrap(),
        Err(_) => Grounding::synthetic(seed),
    };
    let world = World::new(cfg, grounding);
    let mut spec = match std::env::var("DIM").ok().and_then(|v| v.parse().ok()) {
        Some(dim) => ModelSpec::new(dim),
        None => ModelSpec::default(),
    };
    // `NO_BIAS=1`: without the item bias (to measure what it adds).
    spec.item_bias = std::env::var("NO_BIAS").is_err();
    // `NO_PRIOR=1`: without an item prior; `LEARNED_PRIOR=1`: the learned prior instead
    // of the counts (the model before the counts).
    let learned = std::env::var("LEARNED_PRIOR").is_ok();
    spec.item_prior = std::env::var("NO_PRIOR").is_err() && learned;
    spec.item_counts = std::env::var("NO_PRIOR").is_err() && !learned;
    // `NO_HISTORY=1`: without the users' recent clicks.
    spec.history = std::env::var("NO_HISTORY").is_err();
    let mut p = Local::new(spec);
    // `RNG_SALT=N`: another random stream for this arm's sampler (same world, users and
    // coins), to see how much of a difference between arms the stream alone makes.
    let salt: u64 = std::env::var("RNG_SALT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9 ^ seed ^ salt);
    let mut pending: Vec<TrainExample> = Vec::new();
    let delay: usize = std::env::var("DELAY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut delayed = std::collections::VecDeque::new();
    let hyper = hyper_from_env(Hyper::default());
    let w = (n / windows) as usize;
    let mut sums = vec![(0.0, 0.0, 0.0); windows as usize];
    // Diagnostics per window: the greedy top-3's expected clicks, and the ratio of
    // the scores' spread to the true log rates' spread (the calibration the served
    // temperature acts on).
    let mut greedy = vec![0.0f64; windows as usize];
    let mut spread = vec![0.0f64; windows as usize];
    let mut diag_ap = vec![0.0f64; windows as usize];
    let mut diag_kt = vec![0.0f64; windows as usize];
    // `NO_USER=1`: no user id (no per-user row, no history).
    let with_uid = std::env::var("NO_USER").is_err();
    let mut recs = Vec::with_capacity(n as usize);
    // (clicks, impressions) per item, for `SCORE=pop`.
    let mut pop_counts: Vec<(f64, f64)> = vec![(0.0, 0.0); world.total_items()];
    // `PRIOR_COUNTS=K`: a diagnostic: after every step the prior rows are the items'
    // smoothed click rates from counts (weight K impressions), centred on the catalog's;
    // `COUNTS_DECAY=D`: those counts forget by D each step.
    let prior_weight = std::env::var("PRIOR_COUNTS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|_| spec.item_prior);
    let counts_decay: f64 = std::env::var("COUNTS_DECAY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let mut prior_counts = pop_counts.clone();
    // `SCORE=coec`, `SCORE=popuser:K`, `SCORE=hist:W[:clean]` (read once): the counts
    // and clicks they serve by, kept only for the mode that reads them.
    let score_mode = std::env::var("SCORE").unwrap_or_default();
    let popuser: Option<f64> = score_mode
        .strip_prefix("popuser:")
        .map(|k| k.parse().expect("SCORE=popuser:K"));
    let hist: Option<(f64, bool)> = score_mode.strip_prefix("hist:").map(|rest| {
        let (w, clean) = match rest.strip_suffix(":clean") {
            Some(w) => (w, true),
            None => (rest, false),
        };
        (w.parse().expect("SCORE=hist:W[:clean]"), clean)
    });
    let coec = score_mode == "coec";
    let mut coec_counts = pop_counts.clone();
    let mut user_clicks: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut ui_counts: HashMap<(usize, usize), (f64, f64)> = HashMap::new();
    let diag = std::env::var("DIAG").is_ok();
    // Steps per window whose counts pushes restarted the long windows.
    let mut restarts = vec![0u32; windows as usize];
    for k in 0..n {
        let user = world.user(k);
        let fields = world.rank_fields(user);
        let uid = if with_uid {
            world.user_id(user)
        } else {
            String::new()
        };
        let mut input = UserInput::new(
            fields.iter().map(|(f, v)| (f.as_str(), v.as_str())),
            &[],
            &uid,
        )
        .unwrap();
        let active = world.active(k);
        let cands: Vec<(u64, Vec<u64>)> = (0..active)
            .map(|i| {
                let mut f: Vec<u64> = world
                    .catalog_features(i)
                    .iter()
                    .map(|s| model::item_feature_id(s))
                    .collect();
                f.sort_unstable();
                (world.item_id(i), f)
            })
            .collect();
        // `RESET=rows|acc`, a diagnostic with the world's knowledge: at the reshuffle,
        // forget the user-side feature rows (weights and accumulators) or only reset
        // their accumulators, to measure what stale user rows cost the relearning.
        if world.cfg.schedule.shift_at == Some(k) {
            // `RESET=counts`: empty both windows of every counts row at the reshuffle (a
            // restart at the exact change point, with the world's knowledge; the catalog
            // rate is pooled afresh from the next step's long windows).
            if std::env::var("RESET").as_deref() == Ok("counts") {
                for ((t, _), row) in p.rows.iter_mut() {
                    if t == model::ITEM_COUNTS_TABLE {
                        row.0[..4].iter_mut().for_each(|x| *x = 0.0);
                    }
                }
            } else if let Ok(mode) = std::env::var("RESET") {
                let user_rows: std::collections::HashSet<u64> = (0..world.user_kinds())
                    .flat_map(|u| world.kind_fields(u))
                    .map(|(f, v)| model::user_feature_id(&f, &v))
                    .collect();
                let spec = p.table(model::FEATURE_TABLE).clone();
                p.rows.retain(|(t, id), row| {
                    if t != model::FEATURE_TABLE || !user_rows.contains(id) {
                        return true;
                    }
                    if mode == "acc" {
                        row.1 = Local::init(&spec, *id).1;
                        return true;
                    }
                    false
                });
            }
        }
        let view = View(&p, p.get(model::TOWER, 0), p.get(model::CRITIC, 0));
        input.read_history(&spec, &view);
        let mut scores = score_all(&spec, &view, &input, &cands);
        // `SCORE=pop`, a diagnostic: serve by the popularity baseline's own estimator
        // (this arm's click counts, updated after every impression), to separate what the
        // model misses from what this loop costs against `evaluate`'s.
        if std::env::var("SCORE").as_deref() == Ok("pop") {
            let (rates, _) =
                policy::smoothed_click_rates(&pop_counts[..active], policy::POPULARITY_WEIGHT);
            scores = rates.iter().map(|r| r.ln() as f32).collect();
        }
        // `SCORE=popuser:K`: the same counts, each item's rate then smoothed again
        // towards the user's own (clicks, shown) of it with the weight of K slots.
        if let Some(kw) = popuser {
            let (rates, _) =
                policy::smoothed_click_rates(&pop_counts[..active], policy::POPULARITY_WEIGHT);
            scores = rates
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let (c, s) = ui_counts.get(&(user, i)).copied().unwrap_or((0.0, 0.0));
                    (((c + kw * r) / (s + kw)).ln()) as f32
                })
                .collect();
        }
        // `SCORE=hist:W[:clean]`: the world's own numbers, a ceiling: every item's true
        // appeal plus W times the world's taste term between the item and the mean of the
        // world's vectors of the items this user clicked so far (`clean`: the vectors'
        // feature parts), what a history row could reach with item vectors learned
        // perfectly; `hist:0` is the best non-personal order, served.
        if let Some((wt, clean)) = hist {
            let clicked = user_clicks.get(&user).map_or(&[][..], Vec::as_slice);
            scores = world
                .history_oracle_scores(k, clicked, wt, clean)
                .iter()
                .map(|&v| v as f32)
                .collect();
        }
        // `SCORE=coec`: popularity's counts with each shown slot weighted by the world's
        // position discount (clicks over expected examinations).
        if coec {
            let (rates, _) =
                policy::smoothed_click_rates(&coec_counts[..active], policy::POPULARITY_WEIGHT);
            scores = rates.iter().map(|r| r.ln() as f32).collect();
        }
        // `ABS_T=1`: the temperature in score units (as Rank sampled before it became
        // relative to the candidates' spread), for comparing the two.
        let t = if std::env::var("ABS_T").is_ok() {
            temperature
        } else {
            model::relative_temperature(&scores, temperature)
        };
        let picked = model::sample_slots(&scores, slots, t, epsilon, || rng.random::<f64>());
        let attr = world.attractiveness(k, user);
        let (r, o) = world.random_and_oracle(&attr, slots);
        recs.push(Rec {
            user: user as u32,
            random: r as f32,
            oracle: o as f32,
            ..Rec::default()
        });
        let mine_k = recs.len() - 1;
        let wi = (k as usize / w).min(windows as usize - 1);
        {
            let sc: Vec<f64> = scores.iter().map(|&v| f64::from(v)).collect();
            greedy[wi] += world.greedy_clicks(&sc, &attr, slots);
            if diag {
                let [ap, kt] = world.appeal_and_kind_scores(k, user);
                diag_ap[wi] += world.greedy_clicks(&ap, &attr, slots);
                diag_kt[wi] += world.greedy_clicks(&kt, &attr, slots);
            }
            let sd = |x: &[f64]| {
                let m = x.iter().sum::<f64>() / x.len() as f64;
                (x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / x.len() as f64).sqrt()
            };
            let la: Vec<f64> = attr.iter().map(|a| a.ln()).collect();
            spread[wi] += sd(&sc) / sd(&la).max(1e-9);
        }
        let win = &mut sums[wi];
        win.1 += r;
        win.2 += o;
        let mut shown = Vec::new();
        for (pos, s) in picked.iter().enumerate() {
            let pc = world.at_slot(attr[s.index], pos);
            let click = world.coin(k, s.index) < pc;
            win.0 += pc;
            recs[mine_k].expected += pc as f32;
            let remaining: Vec<(u64, Vec<u64>)> = cands
                .iter()
                .enumerate()
                .filter(|(i, _)| !shown.contains(i))
                .map(|(_, c)| c.clone())
                .collect();
            let idx = remaining
                .iter()
                .position(|c| c.0 == cands[s.index].0)
                .unwrap();
            pending.push(TrainExample {
                lexical: Vec::new(),
                user: input.clone(),
                candidates: remaining,
                shown: idx,
                propensity: s.propensity,
                reward: if click { 1.0 } else { 0.0 },
            });
            shown.push(s.index);
            pop_counts[s.index].1 += 1.0;
            prior_counts[s.index].1 += 1.0;
            if coec {
                // Shown slots weighted by the world's own position discount.
                coec_counts[s.index].1 += world.at_slot(1.0, pos);
                coec_counts[s.index].0 += f64::from(u8::from(click));
            }
            if popuser.is_some() {
                let e = ui_counts.entry((user, s.index)).or_insert((0.0, 0.0));
                e.1 += 1.0;
                e.0 += f64::from(u8::from(click));
            }
            if click && hist.is_some() {
                user_clicks.entry(user).or_default().push(s.index);
            }
            if click {
                pop_counts[s.index].0 += 1.0;
                prior_counts[s.index].0 += 1.0;
            }
        }
        if pending.len() >= batch {
            let g = gradients(&spec, &view, &pending, &hyper);
            if g.sparse
                .iter()
                .any(|((t, _), v)| *t == model::ITEM_COUNTS_TABLE && v[3] > 0.0)
            {
                restarts[wi] += 1;
                if diag {
                    eprintln!("seed {seed} counts restart at impression {k}");
                }
            }
            // Applied `DELAY` steps later, as a worker's steps are (pipeline, seal).
            delayed.push_back(g);
            if delayed.len() > delay {
                let g = delayed.pop_front().unwrap();
                p.step(&g);
            }
            // `PRIOR_COUNTS`: the prior rows from the counts (see above).
            if let Some(kw) = prior_weight {
                prior_counts.iter_mut().for_each(|(c, n)| {
                    (*c, *n) = (*c * (1.0 - counts_decay), *n * (1.0 - counts_decay))
                });
                let (rates, pbar) = policy::smoothed_click_rates(&prior_counts[..active], kw);
                let pspec = p.table(model::ITEM_PRIOR_TABLE).clone();
                for (i, rate) in rates.iter().enumerate() {
                    let v = (rate / pbar).ln() as f32;
                    let e = p
                        .rows
                        .entry((model::ITEM_PRIOR_TABLE.to_string(), world.item_id(i)))
                        .or_insert_with(|| Local::init(&pspec, world.item_id(i)));
                    e.0[0] = v;
                }
            }
            pending.clear();
        }
    }
    if diag {
        let g: Vec<String> = sums
            .iter()
            .zip(&greedy)
            .map(|((_, r, o), g)| format!("{:.2}", (g - r) / (o - r)))
            .collect();
        let sp: Vec<String> = spread
            .iter()
            .map(|v| format!("{:.2}", v / w as f64))
            .collect();
        eprintln!("seed {seed} greedy {}", g.join(" "));
        for (name, d) in [("appeal", &diag_ap), ("kind", &diag_kt)] {
            let g: Vec<String> = sums
                .iter()
                .zip(d)
                .map(|((_, r, o), g)| format!("{:.2}", (g - r) / (o - r)))
                .collect();
            eprintln!("seed {seed} greedy-{name} {}", g.join(" "));
        }
        eprintln!("seed {seed} spread {}", sp.join(" "));
        let r: Vec<String> = restarts.iter().map(u32::to_string).collect();
        eprintln!("seed {seed} counts restarts {}", r.join(" "));
    }
    // The report's per-seed figures (steady state, recovery to 80% after the reshuffle
    // in windows of 1/50 hour) for this arm and, with `BASELINES=1`, beside them.
    let run = crate::report::SeedRun {
        seed,
        series: Vec::new(),
        random: recs.iter().map(|r| r.random).collect(),
        oracle: recs.iter().map(|r| r.oracle).collect(),
    };
    let report_line = |name: &str, series: &[f32]| {
        let m = crate::report::metrics(&run, series, &world.cfg.schedule);
        eprintln!(
            "seed {seed} {name} steady {:.3} recovery {} whole {:.3}",
            m.steady,
            m.recovery.map_or("none".to_string(), |r| r.to_string()),
            m.overall
        );
    };
    if standard {
        let mine: Vec<f32> = recs.iter().map(|r| r.expected).collect();
        report_line("freshet", &mine);
        // `DIAG`: CTR per recovery window after the reshuffle, over the pre-shift half
        // hour's (the report's recovery reads the first window at 0.8).
        if let (true, Some(at)) = (diag, world.cfg.schedule.shift_at) {
            let (at, h) = (at as usize, world.cfg.schedule.hour as usize);
            let m = |r: std::ops::Range<usize>| {
                let n = r.len() as f64;
                mine[r].iter().map(|&x| f64::from(x)).sum::<f64>() / n
            };
            let pre = m(at - h / 2..at);
            let w = crate::report::recovery_window(&world.cfg.schedule) as usize;
            let traj: Vec<String> = (0..25)
                .take_while(|j| at + (j + 1) * w <= mine.len())
                .map(|j| format!("{:.2}", m(at + j * w..at + (j + 1) * w) / pre))
                .collect();
            eprintln!(
                "seed {seed} after shift (pre-shift {pre:.4} expected clicks per impression) {}",
                traj.join(" ")
            );
        }
    }
    // `BASELINES=1`: online popularity and BPR on the same users, same windows.
    if std::env::var("BASELINES").is_ok() {
        let per: Vec<f64> = sums.iter().map(|(m, r, o)| (m - r) / (o - r)).collect();
        let whole = per.iter().sum::<f64>() / per.len() as f64;
        let per: Vec<String> = per.iter().map(|x| format!("{x:.2}")).collect();
        eprintln!("seed {seed} freshet {} | whole {whole:.3}", per.join(" "));
        let mut pop = policy::Popularity::new(world.total_items(), temperature, epsilon, seed);
        let mut bpr = policy::OnlineBpr::new(world.total_items(), temperature, epsilon, seed);
        for (name, pol) in [
            ("popularity", &mut pop as &mut dyn Policy),
            ("bpr", &mut bpr as &mut dyn Policy),
        ] {
            let got = evaluate(&world, &recs, slots, pol).unwrap();
            if standard {
                report_line(name, &got);
            }
            let per: Vec<String> = (0..windows as usize)
                .map(|wi| {
                    let ks = wi * w..((wi + 1) * w).min(recs.len());
                    let (mut m, mut r, mut o) = (0.0, 0.0, 0.0);
                    for k in ks {
                        m += f64::from(got[k]);
                        r += f64::from(recs[k].random);
                        o += f64::from(recs[k].oracle);
                    }
                    format!("{:.2}", (m - r) / (o - r))
                })
                .collect();
            let whole =
                per.iter().map(|x| x.parse::<f64>().unwrap()).sum::<f64>() / per.len() as f64;
            eprintln!("seed {seed} {name} {} | whole {whole:.3}", per.join(" "));
        }
    }
    sums.iter().map(|(m, r, o)| (m - r) / (o - r)).collect()
}

#[test]
#[ignore = "tuning harness, see the module docs"]
fn offline_learning_curve() {
    let runs: Vec<(u64, usize, f32)> = match std::env::var("RUNS") {
        Ok(v) => v
            .split(';')
            .map(|r| {
                let f: Vec<&str> = r.split(',').collect();
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect(),
        Err(_) => vec![(40_000, 32, 0.5)],
    };
    let seeds: Vec<u64> = std::env::var("SEEDS")
        .map(|v| v.split(',').map(|s| s.parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![42]);
    for (n, batch, t) in runs {
        // Seeds in parallel (the harness is single-threaded per run).
        let curves: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = seeds
                .iter()
                .map(|&seed| s.spawn(move || offline(n, batch, t, 0.02, seed)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mean: Vec<f64> = (0..curves[0].len())
            .map(|j| curves.iter().map(|c| c[j]).sum::<f64>() / curves.len() as f64)
            .collect();
        let c: Vec<String> = mean.iter().map(|x| format!("{x:.2}")).collect();
        eprintln!(
            "n {n} batch {batch} T {t} seeds {seeds:?}: normalised per window {}",
            c.join(" ")
        );
        if mean.len() == 13 {
            let avg = |r: std::ops::Range<usize>| {
                let k = r.len() as f64;
                mean[r].iter().sum::<f64>() / k
            };
            eprintln!(
                "  steady {:.3} after shift {:.3} gradual {:.3} new items {:.3} whole {:.3}",
                avg(3..5),
                avg(5..8),
                avg(8..10),
                avg(11..13),
                avg(0..13)
            );
        }
    }
}

/// The `freshet replay events` protocol on a generated log, in process (the worker's
/// update, the shards' optimizers, batches of `BATCH` clicks): what the model learns from
/// positive events alone, beside online popularity and BPR on the same candidates.
/// `EVENTS`, `USERS`, `ITEMS`, `SEED`, `BATCH`, `T` (relative temperature) override.
#[test]
#[ignore = "tuning harness"]
fn offline_events() {
    use crate::events::{self, gen, Placed};
    let env = |k: &str, d: usize| -> usize {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let log = gen::generate(&gen::GenOptions {
        events: env("EVENTS", 20_000),
        users: env("USERS", 2_000),
        items: env("ITEMS", 1_000),
        seed: env("SEED", 1) as u64,
    });
    let opts = events::ReplayOptions {
        candidates: 100,
        k: 10,
        concurrency: 1,
        seed: 1,
        limit: None,
    };
    let (tasks, users) = events::plan(&log, &opts);
    let (items, _) = events::log::catalog(&log, events::FIRST_ITEM);
    let feats: Vec<Vec<u64>> = items
        .iter()
        .map(|i| {
            let mut f: Vec<u64> = i
                .features
                .iter()
                .map(|s| model::item_feature_id(s))
                .collect();
            f.sort_unstable();
            f
        })
        .collect();
    // `NO_BIAS=1`, `NO_PRIOR=1`, `NO_HISTORY=1`: without the item bias, the item prior,
    // the users' recent clicks; `H_CHOICE=0`: without the choice term.
    let spec = ModelSpec {
        item_bias: std::env::var("NO_BIAS").is_err(),
        item_counts: std::env::var("NO_PRIOR").is_err(),
        history: std::env::var("NO_HISTORY").is_err(),
        ..ModelSpec::default()
    };
    let mut p = Local::new(spec);
    // The choice term on by default here: the log holds positive events only.
    let hyper = hyper_from_env(Hyper {
        choice_weight: 1.0,
        ..Hyper::default()
    });
    let batch = env("BATCH", 16);
    let t: f32 = std::env::var("T")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.2);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut pending = Vec::new();
    let (mut served, mut scored) = (Vec::new(), Vec::new());
    for task in &tasks {
        // `NO_USER=1`: no user id (no per-user row, no history).
        let uid = if std::env::var("NO_USER").is_ok() {
            ""
        } else {
            users[task.user].as_str()
        };
        let mut input = UserInput::new([], &[], uid).unwrap();
        let cands: Vec<(u64, Vec<u64>)> = task
            .cands
            .iter()
            .map(|&c| (items[c].id, feats[c].clone()))
            .collect();
        let view = View(&p, p.get(model::TOWER, 0), p.get(model::CRITIC, 0));
        input.read_history(&spec, &view);
        let scores = score_all(&spec, &view, &input, &cands);
        let target = task.cands.iter().position(|&c| c == task.item).unwrap();
        scored.push(Placed::from_scores(&scores, target));
        let temp = model::relative_temperature(&scores, t);
        let slots = model::sample_slots(&scores, scores.len(), temp, 0.02, || rng.random::<f64>());
        let at = slots.iter().position(|s| s.index == target).unwrap();
        served.push(Placed::at(at + 1));
        let shown: std::collections::HashSet<usize> = slots[..at].iter().map(|s| s.index).collect();
        let remaining: Vec<(u64, Vec<u64>)> = (0..cands.len())
            .filter(|i| !shown.contains(i))
            .map(|i| cands[i].clone())
            .collect();
        let idx = remaining
            .iter()
            .position(|c| c.0 == cands[target].0)
            .unwrap();
        pending.push(TrainExample {
            lexical: Vec::new(),
            user: input,
            candidates: remaining,
            shown: idx,
            propensity: slots[at].propensity,
            reward: 1.0,
        });
        if pending.len() >= batch {
            let g = gradients(&spec, &view, &pending, &hyper);
            p.step(&g);
            pending.clear();
        }
    }
    let n = tasks.len();
    let hr = |xs: &[Placed], from: usize| {
        xs[from..].iter().map(|x| x.metrics(10).0).sum::<f64>() / (n - from) as f64
    };
    let curve = |xs: &[Placed]| {
        (0..10)
            .map(|w| {
                let (a, b) = (w * n / 10, (w + 1) * n / 10);
                let s: f64 = xs[a..b].iter().map(|x| x.metrics(10).0).sum();
                format!("{:.2}", s / (b - a) as f64)
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let first: Vec<usize> = (0..n).filter(|&i| tasks[i].first_of_user).collect();
    let hr_first = |xs: &[Placed]| {
        first.iter().map(|&i| xs[i].metrics(10).0).sum::<f64>() / first.len().max(1) as f64
    };
    let pop = events::popularity(&tasks, items.len());
    let bpr = events::bpr(&tasks, users.len(), items.len(), 1);
    for (name, xs) in [
        ("served", &served),
        ("scored", &scored),
        ("popularity", &pop),
        ("bpr", &bpr),
    ] {
        eprintln!(
            "{name:>10}: HR@10 whole {:.3} second half {:.3} first events {:.3} | {}",
            hr(xs, 0),
            hr(xs, n / 2),
            hr_first(xs),
            curve(xs)
        );
    }
}
