//! Unit tests of the model: forward, sampling, gradient checks.

use super::*;
use std::collections::HashMap;

struct Fixed {
    rows: HashMap<(String, u64), Vec<f32>>,
    dense: HashMap<String, Vec<f32>>,
    dim: usize,
}

impl Params for Fixed {
    fn read(&self, table: &str, id: u64, out: &mut [f32]) {
        match self.rows.get(&(table.to_string(), id)) {
            Some(r) => out.copy_from_slice(r),
            None => out.fill(0.01 * self.dim as f32),
        }
    }
    fn dense(&self, name: &str) -> &[f32] {
        &self.dense[name]
    }
}

#[test]
fn propensities_are_exact_and_sum_to_one_per_slot() {
    // Enumerate every first slot of a 3-candidate ranking: the propensities reported
    // for slot 1 over all outcomes are the slot-1 distribution and sum to 1.
    let scores = [1.0f32, 0.5, -0.3];
    let mut seen = HashMap::new();
    for r in [0.0, 0.2, 0.4, 0.6, 0.8, 0.999] {
        let mut once = Some(r);
        let s = sample_slots(&scores, 1, 0.7, 0.1, || once.take().unwrap_or(0.0));
        seen.insert(s[0].index, s[0].propensity);
    }
    let total: f64 = seen.values().sum();
    assert_eq!(seen.len(), 3);
    assert!((total - 1.0).abs() < 1e-12, "{seen:?}");
    // The epsilon floor: every candidate has at least epsilon / n.
    assert!(seen.values().all(|p| *p >= 0.1 / 3.0));
    // Slots are distinct.
    let mut x = 0.0;
    let s = sample_slots(&scores, 3, 1.0, 0.0, || {
        x += 0.3;
        x % 1.0
    });
    let mut idx: Vec<usize> = s.iter().map(|s| s.index).collect();
    idx.sort_unstable();
    assert_eq!(idx, vec![0, 1, 2]);
    assert_eq!(s[2].propensity, 1.0);
}

#[test]
fn forward_pass_matches_a_hand_computation() {
    // The learned prior (a cluster created before the counts prior; that one is
    // `the_counts_prior_follows_counts_and_restarts_on_a_change_of_regime`).
    let spec = ModelSpec {
        item_prior: true,
        item_counts: false,
        ..ModelSpec::new(2)
    };
    let width = 2 + NUMERIC_MAX;
    let mut tower = vec![0.0f32; spec.tower_len()];
    tower[0] = 1.0; // u0 = x0 + tanh(x0)
    tower[width + 2] = 1.0; // u1 = x1 + tanh(numeric0)
    let mut p = Fixed {
        rows: HashMap::new(),
        dense: HashMap::new(),
        dim: 2,
    };
    p.dense.insert(TOWER.into(), tower);
    p.dense
        .insert(CRITIC.into(), vec![1.0, 1.0, 0.5, 2.0, 3.0, -1.0]);
    let f = user_feature_id("age", "30");
    p.rows.insert((FEATURE_TABLE.into(), f), vec![0.5, -0.5]);
    p.rows.insert((ITEM_TABLE.into(), 9), vec![1.0, 2.0]);
    p.rows.insert((ITEM_BIAS_TABLE.into(), 9), vec![0.25]);
    p.rows.insert((ITEM_PRIOR_TABLE.into(), 9), vec![0.125]);
    let input = UserInput::new([("age", "30")], &[0.25], "").unwrap();
    let user = user_state(&spec, &p, &input);
    assert_eq!(user.u, vec![0.5 + 0.5f32.tanh(), -0.5 + 0.25f32.tanh()]);
    let v = item_vector(&spec, &p, 9, &[]);
    assert_eq!(v, vec![1.0, 2.0]);
    let s = dot(&user.u, &v);
    assert!((s - (user.u[0] + 2.0 * user.u[1])).abs() < 1e-6);
    assert!((value(&spec, &p, &user) - (user.u[0] + user.u[1] + 0.5)).abs() < 1e-6);
    let q = reward_logit(&spec, &p, &user, &v);
    assert!((q - (3.0 * user.u[0] * 1.0 + 4.0 * user.u[1] * 2.0 - 1.0)).abs() < 1e-6);
    // The item bias and the item prior add to the policy score (and, in training, to
    // the reward logit).
    assert!((score(&spec, &p, &user, 9, &[], 0) - (s + 0.25 + 0.125)).abs() < 1e-6);
    let no_bias = ModelSpec {
        item_bias: false,
        ..spec
    };
    assert!((score(&no_bias, &p, &user, 9, &[], 0) - (s + 0.125)).abs() < 1e-6);
    let neither = ModelSpec {
        item_prior: false,
        ..no_bias
    };
    assert!((score(&neither, &p, &user, 9, &[], 0) - s).abs() < 1e-6);
}

/// The counts prior: ρ_a from an item's long window smoothed towards the catalog rate its
/// row holds (0 for an item never shown) adds to the item's bias; a batch pushes each
/// shown slot's click to its item, the batch's slots as passed and the pooled catalog
/// rate to every candidate; the candidates' long windows restart when their short
/// windows disagree with them past the threshold, and only then.
#[test]
fn the_counts_prior_follows_counts_and_restarts_on_a_change_of_regime() {
    let spec = ModelSpec::new(2);
    assert!(spec.item_counts && !spec.item_prior);
    let mut p = Fixed {
        rows: HashMap::new(),
        dense: HashMap::new(),
        dim: 2,
    };
    let counts = |p: &mut Fixed, id: u64, r: [f32; COUNTS_DIM]| {
        p.rows.insert((ITEM_COUNTS_TABLE.into(), id), r.to_vec());
    };
    // Item 1 clicked at 10% (5% in its recent slots: ρ reads the long window), item 2
    // never in 100 slots, item 3 never shown; the rows hold the catalog rate 5%.
    counts(&mut p, 1, [10.0, 100.0, 2.0, 40.0, 0.05]);
    counts(&mut p, 2, [0.0, 100.0, 0.0, 100.0, 0.05]);
    counts(&mut p, 3, [0.0, 0.0, 0.0, 0.0, 0.05]);
    for id in [1, 2, 3] {
        p.rows.insert((ITEM_BIAS_TABLE.into(), id), vec![0.5]);
    }
    let rho = |c: f32, n: f32| ((c + COUNTS_WEIGHT * 0.05) / (n + COUNTS_WEIGHT) / 0.05).ln();
    for (id, c, n) in [(1, 10.0, 100.0), (2, 0.0, 100.0), (3, 0.0, 0.0)] {
        assert!((item_prior(&spec, &p, id) - rho(c, n)).abs() < 1e-6, "{id}");
    }
    assert!(item_prior(&spec, &p, 1) > 0.5 && item_prior(&spec, &p, 2) < -1.5);
    assert!(
        item_prior(&spec, &p, 3).abs() < 1e-6,
        "never shown: at the catalog rate"
    );
    assert_eq!(item_bias(&spec, &p, 1), 0.5 + item_prior(&spec, &p, 1));
    // A row no step has written: ρ = 0 too.
    counts(&mut p, 4, [0.0; COUNTS_DIM]);
    assert!(item_prior(&spec, &p, 4).abs() < 1e-6);
    let example = |shown: usize, reward: f32| TrainExample {
        lexical: Vec::new(),
        user: UserInput::new([], &[], "").unwrap(),
        candidates: vec![(1, vec![]), (2, vec![]), (3, vec![])],
        shown,
        propensity: 0.5,
        reward,
    };
    let batch = [example(0, 1.0), example(1, 0.0), example(0, 0.0)];
    let pushes = |p: &Fixed| {
        let mut g = Grads::new(&spec);
        counts_updates(&spec, p, &batch, &mut g);
        [1u64, 2, 3].map(|id| g.sparse[&(ITEM_COUNTS_TABLE, id)].clone())
    };
    // Windows that nearly agree: counts, passed slots and the pooled rate (the long
    // windows' 11 / 220) times the slots passed, no restart.
    let rate = 3.0 * (11.0f32 / 220.0);
    assert_eq!(
        pushes(&p),
        [
            vec![1.0, 2.0, 3.0, 0.0, rate],
            vec![0.0, 1.0, 3.0, 0.0, rate],
            vec![0.0, 0.0, 3.0, 0.0, rate]
        ]
    );
    // A small disagreement (8 recent clicks in 100 against 10%): no restart.
    counts(&mut p, 1, [10.0, 100.0, 8.0, 100.0, 0.05]);
    assert!(pushes(&p).iter().all(|g| g[3] == 0.0));
    // The two items swapped places in the recent 200 slots each: every candidate
    // restarts.
    counts(&mut p, 1, [10.0, 100.0, 0.0, 200.0, 0.05]);
    counts(&mut p, 2, [0.0, 100.0, 20.0, 200.0, 0.05]);
    assert!(pushes(&p).iter().all(|g| g[3] == 1.0), "{:?}", pushes(&p));
    // A model without the table neither reads nor pushes counts.
    let without = ModelSpec {
        item_counts: false,
        ..spec
    };
    assert_eq!(item_prior(&without, &p, 1), 0.0);
    let mut g = Grads::new(&without);
    counts_updates(&without, &p, &batch, &mut g);
    assert!(g.sparse.is_empty());
    // The cluster's tables name the counts prior; both priors at once are refused.
    assert!(ModelSpec::from_tables(&spec.tables()).unwrap().item_counts);
    let both = ModelSpec {
        item_prior: true,
        ..spec
    };
    assert!(ModelSpec::from_tables(&both.tables()).is_err());
}

/// The rows of `table` that `g` trains, in id order.
fn trained(g: &Grads, table: &str) -> Vec<u64> {
    g.sparse
        .keys()
        .filter(|(t, _)| *t == table)
        .map(|(_, id)| *id)
        .collect()
}

/// Random parameters (rows created on first read) for the gradient check.
struct Random {
    rows: std::cell::RefCell<HashMap<(String, u64), Vec<f32>>>,
    dense: HashMap<String, Vec<f32>>,
}

impl Params for Random {
    fn read(&self, table: &str, id: u64, out: &mut [f32]) {
        let mut rows = self.rows.borrow_mut();
        let r = rows.entry((table.to_string(), id)).or_insert_with(|| {
            (0..out.len())
                .map(|j| freshet_proto::init_value(9, fnv1a64(table), id, j as u64, 0.5))
                .collect()
        });
        out.copy_from_slice(r);
    }
    fn dense(&self, name: &str) -> &[f32] {
        &self.dense[name]
    }
}

/// Checks every gradient `backward` gives for `ex` against central differences of
/// [`loss_fixed`] (the item prior's rows against [`prior_loss`], the only loss that
/// trains them); returns the gradients.
fn check_gradients(spec: &ModelSpec, p: &mut Random, ex: &TrainExample, h: &Hyper) -> Grads {
    let mut g = Grads::new(spec);
    let stats = backward(spec, p, ex, h, &mut g);
    let (w, a) = (stats.weight, stats.advantage);
    let eps = 1e-2f32;
    let check = |analytic: f32, plus: f32, minus: f32, what: &str| {
        let numeric = (plus - minus) / (2.0 * eps);
        let tol = 2e-3 + 2e-2 * numeric.abs().max(analytic.abs());
        assert!(
            (numeric - analytic).abs() <= tol,
            "{what}: analytic {analytic} vs numeric {numeric}"
        );
    };
    for ((table, id), grad) in g.sparse.clone() {
        // The prior learns from its own loss alone (the rest of the model reads it as a
        // fixed input).
        let loss = |p: &Random| {
            if table == ITEM_PRIOR_TABLE {
                prior_loss(spec, p, ex, h)
            } else {
                loss_fixed(spec, p, ex, h, w, a)
            }
        };
        for (j, an) in grad.iter().enumerate() {
            let key = (table.to_string(), id);
            let orig = p.rows.borrow()[&key][j];
            p.rows.borrow_mut().get_mut(&key).unwrap()[j] = orig + eps;
            let plus = loss(p);
            p.rows.borrow_mut().get_mut(&key).unwrap()[j] = orig - eps;
            let minus = loss(p);
            p.rows.borrow_mut().get_mut(&key).unwrap()[j] = orig;
            check(*an, plus, minus, &format!("{table}[{id}][{j}]"));
        }
    }
    for (name, grad) in [(TOWER, g.tower.clone()), (CRITIC, g.critic.clone())] {
        for (j, an) in grad.iter().enumerate() {
            let orig = p.dense[name][j];
            p.dense.get_mut(name).unwrap()[j] = orig + eps;
            let plus = loss_fixed(spec, p, ex, h, w, a);
            p.dense.get_mut(name).unwrap()[j] = orig - eps;
            let minus = loss_fixed(spec, p, ex, h, w, a);
            p.dense.get_mut(name).unwrap()[j] = orig;
            check(*an, plus, minus, &format!("{name}[{j}]"));
        }
    }
    g
}

/// One plain SGD step of `g` on `p` (sparse rows at 0.1, dense at 0.05).
fn sgd_step(p: &mut Random, g: &Grads) {
    let mut rows = p.rows.borrow_mut();
    for ((table, id), grad) in &g.sparse {
        let row = rows.get_mut(&(table.to_string(), *id)).unwrap();
        row.iter_mut().zip(grad).for_each(|(r, g)| *r -= 0.1 * g);
    }
    drop(rows);
    for (name, grad) in [(TOWER, &g.tower), (CRITIC, &g.critic)] {
        let d = p.dense.get_mut(name).unwrap();
        d.iter_mut().zip(grad).for_each(|(r, g)| *r -= 0.05 * g);
    }
}

fn random_params(spec: &ModelSpec) -> Random {
    let rand_vec = |n: usize, seed: u64| -> Vec<f32> {
        (0..n)
            .map(|j| freshet_proto::init_value(seed, 1, 2, j as u64, 0.5))
            .collect()
    };
    let mut p = Random {
        rows: Default::default(),
        dense: HashMap::new(),
    };
    p.dense.insert(TOWER.into(), rand_vec(spec.tower_len(), 3));
    p.dense
        .insert(CRITIC.into(), rand_vec(spec.critic_len(), 4));
    p
}

#[test]
fn gradients_match_finite_differences() {
    // The learned prior (the counts prior has no gradient: it is counted).
    let spec = ModelSpec {
        item_prior: true,
        item_counts: false,
        ..ModelSpec::new(3)
    };
    let mut p = random_params(&spec);
    let ex = TrainExample {
        lexical: Vec::new(),
        user: UserInput::new([("age", "30"), ("dev", "ios")], &[0.3, -0.2], "u1").unwrap(),
        candidates: vec![(1, vec![item_feature_id("b=1")]), (2, vec![]), (3, vec![])],
        shown: 1,
        propensity: 0.4,
        reward: 1.0,
    };
    let h = Hyper {
        entropy: 0.05,
        policy_weight: 0.7,
        choice_weight: 0.5,
        ..Hyper::default()
    };
    let g = check_gradients(&spec, &mut p, &ex, &h);
    assert!(g.sparse.len() >= 10, "rows touched: {:?}", g.sparse.keys());
    assert_eq!(
        g.sparse
            .keys()
            .filter(|(t, _)| *t == ITEM_BIAS_TABLE)
            .count(),
        3,
        "every candidate's bias gets a gradient"
    );
    assert_eq!(
        trained(&g, ITEM_PRIOR_TABLE),
        [2],
        "only the shown item's prior learns"
    );
    // The prior is an input of the policy and the reward model: moving it moves the
    // loss that trains the rest, though none of that loss's gradient reaches it.
    let key = (ITEM_PRIOR_TABLE.to_string(), 2);
    let stats = backward(&spec, &p, &ex, &h, &mut Grads::new(&spec));
    let before = loss_fixed(&spec, &p, &ex, &h, stats.weight, stats.advantage);
    p.rows.borrow_mut().get_mut(&key).unwrap()[0] += 0.5;
    let after = loss_fixed(&spec, &p, &ex, &h, stats.weight, stats.advantage);
    assert!((after - before).abs() > 1e-4, "{before} {after}");
}

/// Each shown slot moves its item's prior towards the item's own click rate against the
/// critic's average (b_q): after the same impressions, an item clicked one time in four
/// ends above one never clicked, and the two move in opposite directions from 0.
#[test]
fn the_item_prior_learns_each_items_own_click_rate() {
    // The learned prior (the counts prior has no gradient: it is counted).
    let spec = ModelSpec {
        item_prior: true,
        item_counts: false,
        ..ModelSpec::new(3)
    };
    let mut p = random_params(&spec);
    // The critic's bias at the log-odds of a 10% rate.
    let bq = 2 * spec.dim + 1;
    p.dense.get_mut(CRITIC).unwrap()[bq] = (0.1f32 / 0.9).ln();
    for id in [1, 2] {
        p.rows
            .borrow_mut()
            .insert((ITEM_PRIOR_TABLE.into(), id), vec![0.0]);
    }
    let h = Hyper::default();
    for n in 0..200 {
        let mut batch = Vec::new();
        for (shown, clicked) in [(0, n % 4 == 0), (1, false)] {
            batch.push(TrainExample {
                lexical: Vec::new(),
                user: UserInput::new([("age", "30")], &[], "u1").unwrap(),
                candidates: vec![(1, vec![]), (2, vec![])],
                shown,
                propensity: 0.5,
                reward: if clicked { 1.0 } else { 0.0 },
            });
        }
        let mut g = Grads::new(&spec);
        backward_batch(&spec, &p, &batch, &h, &mut g);
        // Only the prior moves here, so the critic's rate stays where it was put.
        let mut rows = p.rows.borrow_mut();
        for id in [1, 2] {
            let grad = g.sparse[&(ITEM_PRIOR_TABLE, id)][0];
            rows.get_mut(&(ITEM_PRIOR_TABLE.to_string(), id)).unwrap()[0] -= 0.05 * grad;
        }
    }
    let prior = |id: u64| item_prior(&spec, &p, id);
    let (clicked, never) = (prior(1), prior(2));
    assert!(clicked > 0.5, "a 25% item above the 10% average: {clicked}");
    assert!(never < -0.5, "a 0% item below it: {never}");
    // Both are inside the policy's and the reward model's bias.
    let mut b = [0.0f32];
    p.read(ITEM_BIAS_TABLE, 1, &mut b);
    assert_eq!(item_bias(&spec, &p, 1), b[0] + clicked);
}

/// A query's rows (terms and the pair) get the tower input's gradient; the shown item's
/// crosses get the reward model's (the policy terms, which treat the crosses as fixed,
/// are off here so that the whole loss is what the gradient is of).
#[test]
fn query_gradients_match_finite_differences() {
    let spec = ModelSpec::new(3);
    let mut p = random_params(&spec);
    let red = item_feature_id("color=red");
    let ex = TrainExample {
        // The shown item's title holds both words (level 9), the other's one (level 6).
        lexical: vec![9, 6],
        user: UserInput::new([("age", "30")], &[0.3], "u1")
            .unwrap()
            .with_query("Red dress")
            .unwrap(),
        candidates: vec![(1, vec![red]), (2, vec![item_feature_id("color=blue")])],
        shown: 0,
        propensity: 0.4,
        reward: 1.0,
    };
    for reward in [1.0, 0.0] {
        let ex = TrainExample {
            reward,
            ..ex.clone()
        };
        let h = Hyper {
            entropy: 0.0,
            policy_weight: 0.0,
            choice_weight: 0.0,
            ..Hyper::default()
        };
        let g = check_gradients(&spec, &mut p, &ex, &h);
        let rows = query::query_rows(&ex.user.query);
        assert_eq!(rows.len(), 3, "two terms and their pair");
        for r in &rows {
            assert!(g.sparse.contains_key(&(FEATURE_TABLE, *r)), "query row {r}");
        }
        let crosses: Vec<u64> = query::cross_rows(&ex.user.query, 1, &[red]).collect();
        assert_eq!(
            crosses.len(),
            4,
            "(term, id) and (term, feature) for 2 terms"
        );
        let crossed = trained(&g, CROSS_TABLE);
        assert_eq!(crossed.len(), 4, "only the shown item's crosses");
        assert!(crosses.iter().all(|c| crossed.contains(c)));
        // A click raises the crosses, a miss lowers them.
        let dir = g.sparse[&(CROSS_TABLE, crosses[0])][0];
        assert!(if reward > 0.0 { dir < 0.0 } else { dir > 0.0 }, "{dir}");
        // The shown item's lexical level, and only its, learns the same way.
        let level = query::lexical_row(9).unwrap();
        assert_eq!(trained(&g, LEXICAL_TABLE), [level]);
        let dir = g.sparse[&(LEXICAL_TABLE, level)][0];
        assert!(if reward > 0.0 { dir < 0.0 } else { dir > 0.0 }, "{dir}");
    }
}

#[test]
fn a_batch_sums_its_examples() {
    let spec = ModelSpec::new(3);
    let p = random_params(&spec);
    let f = item_feature_id("b=1");
    let ex = |user: &str, shown: usize, reward: f32, feats: Vec<u64>, query: &str| TrainExample {
        // Examples with a query carry lexical levels (shared rows across examples).
        lexical: if query.is_empty() {
            Vec::new()
        } else {
            vec![5, 0, 5]
        },
        user: UserInput::new([("age", user)], &[0.1], "")
            .unwrap()
            .with_query(query)
            .unwrap(),
        candidates: vec![(1, feats), (2, vec![f]), (3, vec![])],
        shown,
        propensity: 0.3,
        reward,
    };
    // Item 1 appears with two feature lists: two distinct candidates. Two examples
    // carry queries (their crosses are per example, not per candidate).
    let batch = vec![
        ex("30", 0, 1.0, vec![f], "blue"),
        ex("40", 2, 0.0, vec![], ""),
        ex("30", 1, 0.0, vec![f], "b red"),
    ];
    let h = Hyper::default();
    let mut together = Grads::new(&spec);
    let stats = backward_batch(&spec, &p, &batch, &h, &mut together);
    let mut apart = Grads::new(&spec);
    for (e, s) in batch.iter().zip(&stats) {
        let one = backward(&spec, &p, e, &h, &mut apart);
        // Equal up to rounding: one user's tower takes the broadcast kernel, a batch
        // the matmul one.
        let near = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + a.abs());
        assert!(
            near(one.loss, s.loss)
                && near(one.pi, s.pi)
                && near(one.weight, s.weight)
                && near(one.advantage, s.advantage)
                && near(one.value, s.value),
            "{one:?} vs {s:?}"
        );
        assert!((one.loss - loss_fixed(&spec, &p, e, &h, one.weight, one.advantage)).abs() < 1e-5);
    }
    assert_eq!(
        together.sparse.keys().collect::<Vec<_>>(),
        apart.sparse.keys().collect::<Vec<_>>()
    );
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
    for (k, v) in &together.sparse {
        assert!(close(v, &apart.sparse[k]), "{k:?}");
    }
    assert!(close(&together.tower, &apart.tower) && close(&together.critic, &apart.critic));
}

#[test]
fn bad_user_input_names_the_field() {
    let e = UserInput::new([], &[f32::NAN], "").unwrap_err();
    assert_eq!(e.field, "user.numeric[0]");
    let e = UserInput::new([], &[0.0; NUMERIC_MAX + 1], "").unwrap_err();
    assert_eq!(e.field, "user.numeric");
}

#[test]
fn relative_temperature_does_not_drift_with_the_scale_of_scores() {
    let scores = [0.3f32, -0.1, 0.05, 0.2, -0.4];
    let draw = |scale: f32| {
        let s: Vec<f32> = scores.iter().map(|v| v * scale).collect();
        let t = relative_temperature(&s, 0.2);
        let mut x = 0.0;
        sample_slots(&s, 3, t, 0.02, || {
            x += 0.37;
            x % 1.0
        })
    };
    // The same model a hundred times less spread out explores exactly as much.
    let (a, b) = (draw(1.0), draw(0.01));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.index, y.index);
        assert!((x.propensity - y.propensity).abs() < 1e-4, "{a:?} vs {b:?}");
    }
    // Tied scores: uniform, not a division by zero.
    let t = relative_temperature(&[0.5; 4], 0.2);
    assert!(t > 0.0);
    let s = sample_slots(&[0.5; 4], 1, t, 0.0, || 0.9);
    assert!((s[0].propensity - 0.25).abs() < 1e-9);
}

#[test]
fn a_click_moves_the_users_history_and_their_next_ranking() {
    let spec = ModelSpec::new(4);
    let unit = |k: usize| {
        (0..4)
            .map(|i| f32::from(u8::from(i == k)))
            .collect::<Vec<_>>()
    };
    let mut p = Fixed {
        rows: HashMap::new(),
        dense: [
            (TOWER.to_string(), vec![0.0; spec.tower_len()]),
            (CRITIC.to_string(), vec![0.0; spec.critic_len()]),
        ]
        .into(),
        dim: 0,
    };
    // Two items with orthogonal vectors and no bias; the user's rows are zero.
    for (id, k) in [(1u64, 0usize), (2, 1)] {
        p.rows.insert((ITEM_TABLE.into(), id), unit(k));
        p.rows.insert((ITEM_BIAS_TABLE.into(), id), vec![0.0]);
    }
    let mut user = UserInput::new([], &[], "u1").unwrap();
    let uid = user.user_id.unwrap();
    let scores = |p: &Fixed, user: &mut UserInput| {
        user.read_history(&spec, p);
        let s = user_state(&spec, p, user);
        [
            score(&spec, p, &s, 1, &[], 0),
            score(&spec, p, &s, 2, &[], 0),
        ]
    };
    assert_eq!(scores(&p, &mut user), [0.0, 0.0]);
    assert_eq!(
        user.history,
        vec![0.0; 4],
        "served with the (empty) history row"
    );
    let example = |reward: f32, user: &UserInput| TrainExample {
        lexical: Vec::new(),
        user: user.clone(),
        candidates: vec![(1, vec![]), (2, vec![])],
        shown: 1,
        propensity: 0.5,
        reward,
    };
    // A non-click and an anonymous click move no history row.
    let mut g = Grads::new(&spec);
    let anonymous = UserInput::new([], &[], "").unwrap();
    history_updates(
        &spec,
        &p,
        &[example(0.0, &user), example(1.0, &anonymous)],
        &mut g,
    );
    assert!(g.sparse.is_empty());
    // The click on item 2: h ← h - α (h - v₂) = α v₂, so item 2 now ranks first for this
    // user, before any weight learned anything.
    history_updates(&spec, &p, &[example(1.0, &user)], &mut g);
    let push = &g.sparse[&(HISTORY_TABLE, uid)];
    let h: Vec<f32> = push.iter().map(|g| -HISTORY_RATE * g).collect();
    p.rows.insert((HISTORY_TABLE.into(), uid), h);
    let [s1, s2] = scores(&p, &mut user);
    assert!(s2 > s1 && (s2 - HISTORY_RATE).abs() < 1e-6, "{s1} {s2}");
    // A model without the history table neither reads nor moves it.
    let without = ModelSpec {
        history: false,
        ..spec
    };
    user.read_history(&without, &p);
    assert!(user.history.is_empty());
    let mut g = Grads::new(&without);
    history_updates(&without, &p, &[example(1.0, &user)], &mut g);
    assert!(g.sparse.is_empty());
    assert!(ModelSpec::from_tables(&spec.tables()).unwrap().history);
}

#[test]
fn retrieval_returns_the_exact_top_n_by_score_whatever_the_order() {
    // Random rows, 300 items sharing 12 features (2–3 each, some none): the top 25 by
    // `top_by_score` are the top 25 of `score` over every item, in order, ties to the
    // lower id, from any input order.
    let spec = ModelSpec::new(4);
    let mut p = Random {
        rows: Default::default(),
        dense: HashMap::new(),
    };
    p.dense.insert(
        TOWER.into(),
        (0..spec.tower_len())
            .map(|j| freshet_proto::init_value(3, 1, 2, j as u64, 0.5))
            .collect(),
    );
    let input = UserInput::new([("age", "30")], &[0.5], "u1").unwrap();
    let user = user_state(&spec, &p, &input);
    let items: Vec<(u64, Vec<u64>)> = (0..300u64)
        .map(|i| {
            let mut f: Vec<u64> = (0..i % 4)
                .map(|j| item_feature_id(&format!("f{}", (i + j * 5) % 12)))
                .collect();
            f.sort_unstable();
            f.dedup();
            (1000 + i, f)
        })
        .collect();
    let mut brute: Vec<(f32, u64)> = items
        .iter()
        .map(|(i, f)| (score(&spec, &p, &user, *i, f, 0), *i))
        .collect();
    brute.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let got = top_by_score(
        &spec,
        &p,
        &user,
        items.iter().map(|(i, f)| (*i, f.as_slice())),
        25,
    );
    assert_eq!(got.len(), 25);
    for (g, b) in got.iter().zip(&brute) {
        assert_eq!(g.item, b.1, "{got:?}");
        assert!((g.score - b.0).abs() < 1e-5);
    }
    let reversed = top_by_score(
        &spec,
        &p,
        &user,
        items.iter().rev().map(|(i, f)| (*i, f.as_slice())),
        25,
    );
    assert_eq!(got, reversed);
    // Fewer items than n: all of them; n = 0: none.
    assert_eq!(
        top_by_score(
            &spec,
            &p,
            &user,
            items[..3].iter().map(|(i, f)| (*i, f.as_slice())),
            25
        )
        .len(),
        3
    );
    assert!(top_by_score(
        &spec,
        &p,
        &user,
        items.iter().map(|(i, f)| (*i, f.as_slice())),
        0
    )
    .is_empty());
    // Ties go to the lower id: two items with identical rows.
    let mut tied = Fixed {
        rows: HashMap::new(),
        dense: p.dense.clone(),
        dim: 4,
    };
    tied.rows.insert((ITEM_TABLE.into(), 7), vec![1.0; 4]);
    tied.rows.insert((ITEM_TABLE.into(), 5), vec![1.0; 4]);
    let top = top_by_score(
        &spec,
        &tied,
        &user,
        [(7u64, &[][..]), (5, &[][..]), (9, &[][..])],
        2,
    );
    assert_eq!(top.iter().map(|s| s.item).collect::<Vec<_>>(), vec![5, 7]);
}

#[test]
fn queries_are_cut_into_words_in_english_and_chinese() {
    use query::*;
    assert_eq!(
        query_terms("Red DRESS, red dresses!"),
        ["red", "dress", "dresses"]
    );
    assert_eq!(
        query_terms("  it's a 2-piece "),
        ["it's", "a", "2", "piece"]
    );
    // Chinese: dictionary words, not one term per character.
    let zh = query_terms("红色连衣裙");
    assert!(zh.len() >= 2 && zh.len() < 5, "{zh:?}");
    assert_eq!(zh.concat(), "红色连衣裙");
    let mixed = query_terms("iPhone 15 手机壳");
    assert_eq!(&mixed[..2], ["iphone", "15"]);
    assert_eq!(mixed[2..].concat(), "手机壳");
    // At most 16 terms, each once.
    let many: String = (0..40).map(|i| format!("w{i} ")).collect();
    assert_eq!(query_terms(&many).len(), QUERY_TERMS_MAX);
    // Ids: the same words give the same rows whatever the case and punctuation.
    assert_eq!(
        parse_query("Red dress", "q").unwrap(),
        parse_query("red, DRESS", "q").unwrap()
    );
    assert!(parse_query("", "q").unwrap().is_empty());
    let e = parse_query(" ?! ", "user.query").unwrap_err();
    assert_eq!(e.field, "user.query");
    let e = parse_query(&"a".repeat(QUERY_BYTES_MAX + 1), "user.query").unwrap_err();
    assert_eq!(e.field, "user.query");
    // A pair row per two consecutive terms; crosses per term with the id and features.
    let t = parse_query("red dress", "q").unwrap();
    assert_eq!(query_rows(&t).len(), 3);
    assert_ne!(
        query_rows(&t)[2],
        query_rows(&[t[1], t[0]])[2],
        "pairs are ordered"
    );
    assert_eq!(cross_rows(&t, 7, &[1, 2]).count(), 6);
}

/// Training on "red dress" searches where only the red dress is clicked makes it the
/// top-scored item for that query, through the query's rows and crosses, while the
/// ranking without a query stays a different one.
#[test]
fn a_query_learns_which_items_its_users_click() {
    let spec = ModelSpec::new(4);
    let mut p = random_params(&spec);
    let feats = |color: &str, kind: &str| {
        vec![
            item_feature_id(&format!("color={color}")),
            item_feature_id(&format!("type={kind}")),
        ]
    };
    let candidates: Vec<(u64, Vec<u64>)> = vec![
        (1, feats("red", "dress")),
        (2, feats("blue", "dress")),
        (3, feats("red", "shoe")),
        (4, feats("blue", "shoe")),
        (5, feats("green", "dress")),
        (6, feats("green", "shoe")),
    ];
    let user = |query: &str| {
        UserInput::new([("age", "30")], &[], "")
            .unwrap()
            .with_query(query)
            .unwrap()
    };
    let scores = |p: &Random, query: &str| -> Vec<f32> {
        let u = user_state(&spec, p, &user(query));
        candidates
            .iter()
            .map(|(id, f)| score(&spec, p, &u, *id, f, 0))
            .collect()
    };
    let h = Hyper::default();
    for step in 0..400usize {
        // Every item shown in turn, uniformly (propensity 1/6); only the red dress clicks.
        let shown = step % candidates.len();
        let ex = TrainExample {
            lexical: Vec::new(),
            user: user("red dress"),
            candidates: candidates.clone(),
            shown,
            propensity: 1.0 / 6.0,
            reward: if shown == 0 { 1.0 } else { 0.0 },
        };
        let mut g = Grads::new(&spec);
        backward(&spec, &p, &ex, &h, &mut g);
        sgd_step(&mut p, &g);
    }
    let with = scores(&p, "red dress");
    let top = (0..with.len())
        .max_by(|&a, &b| with[a].total_cmp(&with[b]))
        .unwrap();
    assert_eq!(top, 0, "scores for 'red dress': {with:?}");
    let margin = with[0] - with[1..].iter().copied().fold(f32::MIN, f32::max);
    assert!(margin > 0.5, "margin {margin}: {with:?}");
    // The crosses carry part of it: (red, color=red) learned a positive weight.
    let red = query::parse_query("red", "q").unwrap();
    let mut w = [0.0f32];
    let row = query::cross_rows(&red, 1, &candidates[0].1).nth(1).unwrap();
    p.read(CROSS_TABLE, row, &mut w);
    assert!(w[0] > 0.1, "cross (red, color=red) {}", w[0]);
    // Without the query, the red dress's lead is smaller: the query made the difference.
    let without = scores(&p, "");
    let margin_without = without[0] - without[1..].iter().copied().fold(f32::MIN, f32::max);
    assert!(margin_without < margin, "{margin_without} vs {margin}");
}

#[test]
fn a_title_match_level_counts_the_query_words_the_title_holds() {
    use query::{lexical_level, lexical_row, parse_query, title_term_ids, LEXICAL_LEVELS};
    let title = title_term_ids("Red silk Dress, size M");
    let q = |text: &str| parse_query(text, "q").unwrap();
    // 1 + 4 * matched + missing, each capped at 3.
    assert_eq!(lexical_level(&q("red dress"), &title), 1 + 4 * 2);
    assert_eq!(lexical_level(&q("RED shoe"), &title), 1 + 4 + 1);
    assert_eq!(lexical_level(&q("green shoe"), &title), 1 + 2);
    assert_eq!(
        lexical_level(&q("red silk dress size m"), &title),
        1 + 4 * 3,
        "matches cap at 3"
    );
    assert_eq!(
        lexical_level(&q("red silk dress x y z w"), &title),
        LEXICAL_LEVELS
    );
    assert_eq!(
        lexical_level(&q("a b c d e"), &title),
        1 + 3,
        "misses cap at 3"
    );
    // No query or no title: no level, no row.
    assert_eq!(lexical_level(&[], &title), 0);
    assert_eq!(lexical_level(&q("red"), &title_term_ids("")), 0);
    assert_eq!(lexical_row(0), None);
    let rows: std::collections::HashSet<u64> =
        (1..=LEXICAL_LEVELS).filter_map(lexical_row).collect();
    assert_eq!(rows.len(), usize::from(LEXICAL_LEVELS));
}

/// The user state of a plain user (one field, no id) searching `query`.
fn searcher(spec: &ModelSpec, p: &Random, query: &str) -> UserState {
    let input = UserInput::new([("age", "30")], &[], "")
        .unwrap()
        .with_query(query)
        .unwrap();
    user_state(spec, p, &input)
}

/// Searches whose clicks go to items whose titles hold the typed words teach the level
/// weights, and the weight reaches any item at that level: one never shown (a new item)
/// whose title holds the words outscores itself at the level of a title that does not.
#[test]
fn a_title_match_level_learns_from_clicks_and_reaches_unseen_items() {
    let spec = ModelSpec::new(4);
    let mut p = random_params(&spec);
    let words = ["red", "blue", "green", "dress", "shoe", "hat"];
    let h = Hyper::default();
    let mut rng = 7u64;
    let mut next = |n: usize| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as usize % n
    };
    for _ in 0..300 {
        // Six items with two-word titles; the query is one item's title, and that item
        // (all words matched) is the one clicked when shown.
        let titles: Vec<String> = (0..6)
            .map(|_| format!("{} {}", words[next(3)], words[3 + next(3)]))
            .collect();
        let want = next(6);
        let query = query::parse_query(&titles[want], "q").unwrap();
        let lexical: Vec<u8> = titles
            .iter()
            .map(|t| query::lexical_level(&query, &query::title_term_ids(t)))
            .collect();
        let shown = next(6);
        let ex = TrainExample {
            user: UserInput {
                query: query.clone(),
                ..UserInput::new([("age", "30")], &[], "").unwrap()
            },
            candidates: (0..6)
                .map(|i| (100 + next(1000) as u64 * 6 + i, vec![]))
                .collect(),
            lexical: lexical.clone(),
            shown,
            propensity: 1.0 / 6.0,
            reward: if lexical[shown] == lexical[want] {
                1.0
            } else {
                0.0
            },
        };
        let mut g = Grads::new(&spec);
        backward(&spec, &p, &ex, &h, &mut g);
        sgd_step(&mut p, &g);
    }
    let full = 1 + 4 * 2; // both words in the title
    let none = 1 + 2; // neither
    let weight = |level: u8| lexical_weight(&spec, &p, level);
    // What the rows learned, beside the fixed prior (which alone puts full 2 above none).
    let learned = |level: u8| weight(level) - query::lexical_prior(level);
    assert!(
        learned(full) > learned(none) + 0.5,
        "full {} none {}",
        learned(full),
        learned(none)
    );
    // An item no example touched: the level alone moves its score, by the weights.
    let u = searcher(&spec, &p, "red dress");
    let unseen = 999_999;
    let gap = score(&spec, &p, &u, unseen, &[], full) - score(&spec, &p, &u, unseen, &[], none);
    assert!((gap - (weight(full) - weight(none))).abs() < 1e-5, "{gap}");
    // A model without the table reads no level.
    let plain = ModelSpec {
        lexical: false,
        ..spec
    };
    assert_eq!(lexical_weight(&plain, &p, full), 0.0);
}

/// Before any click, a search ranks by how much of the query a title holds: the prior
/// of each level is 2 × the share of the typed words matched, whatever the lacking ones,
/// and a fresh model (every level row 0) orders unseen items by it.
#[test]
fn a_fresh_model_ranks_by_the_share_of_the_query_a_title_holds() {
    use query::{lexical_level, lexical_prior, parse_query, title_term_ids};
    let spec = ModelSpec::new(4);
    // Every level's row at 0, as a new cluster has them (the rest random).
    let p = random_params(&spec);
    for l in 1..=query::LEXICAL_LEVELS {
        let row = query::lexical_row(l).unwrap();
        p.rows
            .borrow_mut()
            .insert((LEXICAL_TABLE.to_string(), row), vec![0.0]);
    }
    let q = parse_query("red silk dress", "q").unwrap();
    let level = |title: &str| lexical_level(&q, &title_term_ids(title));
    let (all, two, one, none) = (
        level("red silk dress"),
        level("red dress long"),
        level("silk scarf"),
        level("blue shoe"),
    );
    assert_eq!(lexical_prior(all), 2.0);
    assert_eq!(lexical_prior(two), 2.0 * 2.0 / 3.0);
    assert_eq!(lexical_prior(one), 2.0 / 3.0);
    assert_eq!(lexical_prior(none), 0.0);
    assert_eq!(lexical_prior(0), 0.0);
    // Three words matched of four typed: the share, not the count.
    let q4 = parse_query("red silk dress m", "q").unwrap();
    assert_eq!(
        lexical_prior(lexical_level(&q4, &title_term_ids("red silk dress"))),
        1.5
    );
    let u = searcher(&spec, &p, "red silk dress");
    let unseen = 999_999;
    let scores: Vec<f32> = [all, two, one, none]
        .iter()
        .map(|&l| score(&spec, &p, &u, unseen, &[], l))
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] > w[1]),
        "full, two, one, no words: {scores:?}"
    );
    assert!((scores[0] - scores[3] - 2.0).abs() < 1e-5, "{scores:?}");
    // A model without the table has no levels and no prior.
    let plain = ModelSpec {
        lexical: false,
        ..spec
    };
    assert_eq!(lexical_weight(&plain, &p, all), 0.0);
}

#[test]
fn one_scorer_for_many_candidates_equals_scoring_each_alone_bit_for_bit() {
    let spec = ModelSpec::new(5);
    let p = random_params(&spec);
    // Items with many, one and no features in turn, features shared between items, and
    // levels repeated: nothing a Scorer keeps between candidates may change a score.
    let items: [(u64, Vec<u64>, u8); 5] = [
        (
            1,
            vec![item_feature_id("brand=a"), item_feature_id("cat=b")],
            5,
        ),
        (2, vec![], 0),
        (3, vec![item_feature_id("brand=a")], 16),
        (
            4,
            vec![item_feature_id("cat=b"), item_feature_id("brand=c")],
            5,
        ),
        (
            1,
            vec![item_feature_id("brand=a"), item_feature_id("cat=b")],
            5,
        ),
    ];
    for query in ["", "red dress", "red"] {
        let input = UserInput::new([("age", "30"), ("device", "d1")], &[0.5], "u7")
            .unwrap()
            .with_query(query)
            .unwrap();
        let user = user_state(&spec, &p, &input);
        let mut scorer = Scorer::new(&spec, &p, &user);
        for (id, f, level) in &items {
            let level = if query.is_empty() { 0 } else { *level };
            let alone = score(&spec, &p, &user, *id, f, level);
            let shared = scorer.score(*id, f, level);
            assert_eq!(alone.to_bits(), shared.to_bits(), "{query:?} item {id}");
            // The parts training reads one by one add up to the same logit.
            let parts = dot(&user.u, &item_vector(&spec, &p, *id, f))
                + item_bias(&spec, &p, *id)
                + query_cross(&spec, &p, &user.query, *id, f)
                + lexical_weight(&spec, &p, level);
            assert_eq!(parts.to_bits(), shared.to_bits(), "{query:?} item {id}");
            // From a row and bias held elsewhere (the gateway's item index), by a fresh
            // scorer: the same bits.
            let mut row = vec![0.0; spec.dim];
            p.read(ITEM_TABLE, *id, &mut row);
            let from = Scorer::new(&spec, &p, &user).score_from(
                *id,
                &row,
                item_bias(&spec, &p, *id),
                f,
                level,
            );
            assert_eq!(from.to_bits(), shared.to_bits(), "{query:?} item {id}");
            if !query.is_empty() && !f.is_empty() {
                assert_ne!(query_cross(&spec, &p, &user.query, *id, f), 0.0);
            }
        }
    }
}
