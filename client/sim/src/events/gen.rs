//! `freshet replay gen-events`: a synthetic interaction log shaped like real e-commerce
//! traffic, for trying `freshet replay events` (and for CI) without a public data set.
//!
//! What it has that the drift simulator lacks: returning users with persistent
//! individual tastes and Zipf-like activity, sessions (several clicks by one user, with a
//! short-term pull towards the category just clicked), item popularity with a heavy tail,
//! new users and new items arriving throughout, a popularity reshuffle halfway, and only
//! positive events (as public click and purchase logs are). Items carry two categorical
//! features (`cat`, `brand`) that explain part of every taste; users only their id.
//!
//! Each event: the user picks one item they have not interacted with, among the items
//! that have arrived, with probability ∝ exp(pop_i + 3 ⟨taste_u, v_i⟩ + 1[cat_i = the
//! session's last category]), with pop_i = -0.8 ln(1 + popularity rank of i).

use rand::{Rng, SeedableRng};

use super::log::LogEvent;
use crate::world::gauss;

/// How big a log to make.
#[derive(Debug, Clone, Copy)]
pub struct GenOptions {
    pub events: usize,
    pub users: usize,
    pub items: usize,
    pub seed: u64,
}

const LATENT: usize = 8;
const CATEGORIES: usize = 24;
const BRANDS: usize = 80;
/// How strongly tastes decide (against popularity).
const SHARPNESS: f64 = 3.0;
/// Zipf exponent of item appeal over popularity ranks.
const POP_ALPHA: f64 = 0.8;
/// Zipf exponent of user activity.
const ACTIVITY_ALPHA: f64 = 0.5;
/// Pull towards the category of the session's last click (logit).
const SESSION_PULL: f64 = 1.0;
/// Mean events per session (geometric).
const SESSION_MEAN: f64 = 4.0;
/// Sessions open at once (interleaved as real logs are).
const OPEN_SESSIONS: usize = 64;

fn unit_vec(rng: &mut impl Rng) -> Vec<f64> {
    let mut v: Vec<f64> = (0..LATENT).map(|_| gauss(rng)).collect();
    normalise(&mut v);
    v
}

fn normalise(v: &mut [f64]) {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

fn mix(parts: &[(&[f64], f64)]) -> Vec<f64> {
    let mut v = vec![0.0; LATENT];
    for (p, w) in parts {
        for (a, b) in v.iter_mut().zip(*p) {
            *a += w * b;
        }
    }
    normalise(&mut v);
    v
}

/// When each of `n` ids arrives: the first `initial` share at event 0, the rest evenly
/// over the first 90% of the log.
fn arrivals(n: usize, initial: f64, events: usize) -> Vec<usize> {
    let first = ((n as f64 * initial) as usize).max(1).min(n);
    (0..n)
        .map(|k| {
            if k < first {
                0
            } else {
                (k - first + 1) * events * 9 / 10 / (n - first + 1)
            }
        })
        .collect()
}

/// Zipf-like appeal per id: `-alpha ln(1 + rank)`, ranks a random permutation.
fn zipf_logits(n: usize, alpha: f64, rng: &mut impl Rng) -> Vec<f64> {
    let mut ranks: Vec<usize> = (0..n).collect();
    for k in (1..n).rev() {
        ranks.swap(k, rng.random_range(0..=k));
    }
    ranks
        .iter()
        .map(|&r| -alpha * (1.0 + r as f64).ln())
        .collect()
}

struct Session {
    user: usize,
    left: usize,
    last_cat: Option<usize>,
}

/// Makes the log (deterministic in the options).
///
/// # Panics
/// `users` or `items` is 0.
pub fn generate(o: &GenOptions) -> Vec<LogEvent> {
    assert!(o.users > 0 && o.items > 0, "users and items must be > 0");
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed ^ 0x10_6E4E);
    let cats: Vec<Vec<f64>> = (0..CATEGORIES).map(|_| unit_vec(&mut rng)).collect();
    let brands: Vec<Vec<f64>> = (0..BRANDS).map(|_| unit_vec(&mut rng)).collect();
    // Items: a category (popular categories hold more items), a brand, a vector mostly
    // explained by both.
    let cat_weights: Vec<f64> = zipf_logits(CATEGORIES, 1.0, &mut rng)
        .iter()
        .map(|l| l.exp())
        .collect();
    let pick = |w: &[f64], rng: &mut rand::rngs::StdRng| {
        let total: f64 = w.iter().sum();
        let mut r = rng.random::<f64>() * total;
        for (k, x) in w.iter().enumerate() {
            r -= x;
            if r < 0.0 {
                return k;
            }
        }
        w.len() - 1
    };
    let mut item_cat = Vec::with_capacity(o.items);
    let mut item_brand = Vec::with_capacity(o.items);
    let mut item_vec = Vec::with_capacity(o.items);
    for _ in 0..o.items {
        let (c, b) = (pick(&cat_weights, &mut rng), rng.random_range(0..BRANDS));
        let noise = unit_vec(&mut rng);
        item_vec.push(mix(&[(&cats[c], 1.0), (&brands[b], 0.5), (&noise, 0.4)]));
        item_cat.push(c);
        item_brand.push(b);
    }
    // Two popularity eras: the reshuffle halfway.
    let pops = [
        zipf_logits(o.items, POP_ALPHA, &mut rng),
        zipf_logits(o.items, POP_ALPHA, &mut rng),
    ];
    // Users: two favourite categories and an individual part.
    let tastes: Vec<Vec<f64>> = (0..o.users)
        .map(|_| {
            let (a, b) = (
                pick(&cat_weights, &mut rng),
                rng.random_range(0..CATEGORIES),
            );
            let noise = unit_vec(&mut rng);
            mix(&[(&cats[a], 1.0), (&cats[b], 0.6), (&noise, 0.6)])
        })
        .collect();
    let activity: Vec<f64> = zipf_logits(o.users, ACTIVITY_ALPHA, &mut rng)
        .iter()
        .map(|l| l.exp())
        .collect();
    let user_arrival = arrivals(o.users, 0.3, o.events);
    let item_arrival = arrivals(o.items, 0.7, o.events);
    // Cumulative activity over users in arrival order (ids are in arrival order).
    let mut cum = Vec::with_capacity(o.users);
    let mut acc = 0.0;
    for a in &activity {
        acc += a;
        cum.push(acc);
    }
    let mut seen: Vec<std::collections::HashSet<usize>> = vec![Default::default(); o.users];
    let mut open: Vec<Session> = Vec::new();
    let mut out = Vec::with_capacity(o.events);
    let mut logits = vec![0.0f64; o.items];
    for n in 0..o.events {
        let users_in = user_arrival.partition_point(|&a| a <= n).max(1);
        let items_in = item_arrival.partition_point(|&a| a <= n).max(1);
        while open.len() < OPEN_SESSIONS {
            let r = rng.random::<f64>() * cum[users_in - 1];
            let user = cum[..users_in]
                .partition_point(|&c| c <= r)
                .min(users_in - 1);
            // Geometric length with the given mean.
            let mut left = 1;
            while rng.random::<f64>() > 1.0 / SESSION_MEAN {
                left += 1;
            }
            open.push(Session {
                user,
                left,
                last_cat: None,
            });
        }
        let s = rng.random_range(0..open.len());
        let (user, last_cat) = (open[s].user, open[s].last_cat);
        let pop = &pops[usize::from(n >= o.events / 2)];
        let mut max = f64::NEG_INFINITY;
        for i in 0..items_in {
            let l = if seen[user].contains(&i) {
                f64::NEG_INFINITY
            } else {
                let dot: f64 = tastes[user]
                    .iter()
                    .zip(&item_vec[i])
                    .map(|(a, b)| a * b)
                    .sum();
                let pull = if last_cat == Some(item_cat[i]) {
                    SESSION_PULL
                } else {
                    0.0
                };
                pop[i] + SHARPNESS * dot + pull
            };
            logits[i] = l;
            max = max.max(l);
        }
        if max == f64::NEG_INFINITY {
            // This user has seen every item there is: end the session.
            open.swap_remove(s);
            continue;
        }
        let weights: Vec<f64> = logits[..items_in].iter().map(|l| (l - max).exp()).collect();
        let item = pick(&weights, &mut rng);
        seen[user].insert(item);
        out.push(LogEvent {
            user: format!("u{user}"),
            item: format!("i{item}"),
            reward: 1.0,
            time: n as i64 * 1000,
            item_features: vec![
                format!("cat=c{}", item_cat[item]),
                format!("brand=b{}", item_brand[item]),
            ],
            user_features: Vec::new(),
        });
        open[s].last_cat = Some(item_cat[item]);
        open[s].left -= 1;
        if open[s].left == 0 {
            open.swap_remove(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_with_returning_users_and_new_items() {
        let o = GenOptions {
            events: 4000,
            users: 300,
            items: 200,
            seed: 7,
        };
        let a = generate(&o);
        assert_eq!(a, generate(&o));
        assert!(a.len() > 3900);
        let users: std::collections::HashSet<&str> = a.iter().map(|e| e.user.as_str()).collect();
        // Users return (far fewer users than events) and no user repeats an item.
        assert!(
            users.len() < 300 && users.len() > 100,
            "{} users",
            users.len()
        );
        let pairs: std::collections::HashSet<(&str, &str)> = a
            .iter()
            .map(|e| (e.user.as_str(), e.item.as_str()))
            .collect();
        assert_eq!(pairs.len(), a.len());
        // New items appear in the second half, and popularity is heavy-tailed.
        let first_half: std::collections::HashSet<&str> =
            a[..2000].iter().map(|e| e.item.as_str()).collect();
        assert!(a[2000..]
            .iter()
            .any(|e| !first_half.contains(e.item.as_str())));
        let mut counts: std::collections::HashMap<&str, usize> = Default::default();
        for e in &a {
            *counts.entry(&e.item).or_default() += 1;
        }
        let mut c: Vec<usize> = counts.into_values().collect();
        c.sort_unstable_by(|x, y| y.cmp(x));
        let top: usize = c[..c.len() / 10].iter().sum();
        assert!(
            top * 4 > a.len(),
            "top 10% of items hold {top} of {}",
            a.len()
        );
    }
}
