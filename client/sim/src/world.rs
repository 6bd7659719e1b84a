//! The simulated world: items, users and their click probabilities, as a pure function
//! of the impression number `n` (so every policy can be evaluated on exactly the same
//! users in exactly the same world state, and clicks use common random numbers).
//!
//! Grounding in the Open Bandit Dataset sample (ZOZOTOWN, "all" campaign, random and
//! Bernoulli-TS logs pooled, 20,000 rows):
//! - the 80 items with their features (`item_feature_0` bucketed, `item_feature_1..3`
//!   categorical) and their click rates (smoothed towards the mean: 80 clicks in the
//!   sample cannot tell items apart much, so base attractiveness varies only a little);
//! - the users: every observed combination of `user_feature_0..3`, drawn with its
//!   observed frequency;
//! - new items: features drawn from the items' per-field value frequencies.
//!
//! What the sample cannot ground (it holds ~80 clicks) is invented and documented:
//! latent preferences are sums of per-feature-value vectors plus noise (so features
//! carry signal, and users or items sharing a value are alike); the click probability is
//! `min(1, scale · exp(base_i + sharpness · ⟨u(n), v_i⟩) · bias[pos])` with `scale` set so
//! a uniformly random slot-1 pick clicks at `mean_ctr` (the sample's 0.0038 is too sparse
//! for a run of minutes; `--mean-ctr` sets it); position bias is conventional (the
//! sample's per-position click counts, 13/14/11, cannot resolve it).
//!
//! Drift: an abrupt reshuffle at `shift_at` (every preference vector redrawn), a
//! gradual drift over `[gradual.0, gradual.1)` (linear blend towards fresh vectors), new
//! items at `new_items_at`.
//!
//! Two kinds of traffic on that schedule. *Kinds* (the default, the report's): every
//! impression draws a fresh user of one of the grounding's user kinds, 80 items, a
//! random item's slot-1 click rate 5%, slates of 3. *Returning* ([`Returning`]): what
//! a shop's traffic looks like and what the kinds world lacks: a catalog of a few
//! hundred items with heavy-tailed (Zipf) appeal, sparse clicks (a random item at slot
//! 1 clicks at 1%, lower further down), long slates with a logarithmic position
//! discount, and a population of individual users, each of a kind (their features) with
//! persistent preferences of their own, who come back in sessions of several
//! impressions with heavy-tailed activity, while new users keep arriving.
//!
//! *Search* ([`Search`], on top of either traffic): every impression is a search. The
//! user has an intent, an item drawn in proportion to what they would click without a
//! query, and types words for some of its attributes: each of `fields` of its feature
//! values becomes one word (a token per value, the item's "title" is its values'
//! words), replaced by a synonym (a word no title contains) with probability
//! `synonym`, and a stray word of another item's is added with probability `noise`.
//! Items sharing `m` of the intent's typed values with it are `exp(relevance · m)`
//! times as attractive (normalised over the catalog so the mean click rate stays), so
//! what matches the query matters, while the user's own tastes and the items' appeal
//! still rank the matching items.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use freshet_proto::ps::v1::Item;
use freshet_proto::{fnv1a64, splitmix64};
use rand::{Rng, SeedableRng};

/// The statistics the world is built from.
#[derive(Debug, Clone)]
pub struct Grounding {
    /// What the statistics come from (shown in the report).
    pub source: String,
    /// Per item: (features as `field=value`, smoothed click rate).
    pub items: Vec<(Vec<(String, String)>, f64)>,
    /// Users: (`field=value` pairs, probability).
    pub users: Vec<(Vec<(String, String)>, f64)>,
    /// Logged click rate per row.
    pub mean_ctr: f64,
}

fn read_csv(path: &Path) -> anyhow::Result<(Vec<String>, Vec<Vec<String>>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header = lines
        .next()
        .with_context(|| format!("{}: empty", path.display()))?
        .split(',')
        .map(str::to_string)
        .collect();
    let rows = lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    Ok((header, rows))
}

fn column(header: &[String], name: &str, path: &Path) -> anyhow::Result<usize> {
    header
        .iter()
        .position(|h| h == name)
        .with_context(|| format!("{}: no column {name}", path.display()))
}

impl Grounding {
    /// Reads the OBD sample under `obd` (the `obp/dataset/obd` folder): the logs of
    /// `random/<campaign>` and `bts/<campaign>` pooled, and the item features.
    ///
    /// # Errors
    /// A file is missing or malformed.
    pub fn from_obd(obd: &Path, campaign: &str) -> anyhow::Result<Self> {
        let items_path = obd.join("random").join(campaign).join("item_context.csv");
        let (h, rows) = read_csv(&items_path)?;
        let id_col = column(&h, "item_id", &items_path)?;
        let f0 = column(&h, "item_feature_0", &items_path)?;
        let mut features: Vec<(usize, Vec<(String, String)>)> = Vec::new();
        for r in &rows {
            let id: usize = r[id_col].parse().context("item_id")?;
            let x: f64 = r[f0].parse().context("item_feature_0")?;
            let mut f = vec![("f0".to_string(), format!("{}", (x * 4.0).round()))];
            for k in 1..=3 {
                let c = column(&h, &format!("item_feature_{k}"), &items_path)?;
                f.push((format!("f{k}"), r[c].clone()));
            }
            features.push((id, f));
        }
        features.sort_by_key(|(id, _)| *id);
        let n_items = features.len();
        let mut shows = vec![0u64; n_items];
        let mut clicks = vec![0u64; n_items];
        let mut users: HashMap<Vec<(String, String)>, u64> = HashMap::new();
        let mut total = 0u64;
        for policy in ["random", "bts"] {
            let path = obd
                .join(policy)
                .join(campaign)
                .join(format!("{campaign}.csv"));
            let (h, rows) = read_csv(&path)?;
            let (ci, cc) = (column(&h, "item_id", &path)?, column(&h, "click", &path)?);
            let uc: Vec<usize> = (0..4)
                .map(|k| column(&h, &format!("user_feature_{k}"), &path))
                .collect::<Result<_, _>>()?;
            for r in &rows {
                let item: usize = r[ci].parse().context("item_id")?;
                if item >= n_items {
                    anyhow::bail!("{}: item {item} has no features", path.display());
                }
                shows[item] += 1;
                clicks[item] += u64::from(r[cc] == "1");
                total += 1;
                let u: Vec<(String, String)> = uc
                    .iter()
                    .enumerate()
                    .map(|(k, &c)| (format!("uf{k}"), r[c].clone()))
                    .collect();
                *users.entry(u).or_default() += 1;
            }
        }
        let all_clicks: u64 = clicks.iter().sum();
        let mean = all_clicks as f64 / total.max(1) as f64;
        // Beta prior worth 2,000 rows: an item needs many clicks to move far.
        let prior = 2000.0;
        let items = features
            .into_iter()
            .map(|(id, f)| {
                let ctr = (clicks[id] as f64 + prior * mean) / (shows[id] as f64 + prior);
                (f, ctr)
            })
            .collect();
        let mut users: Vec<(Vec<(String, String)>, f64)> = users
            .into_iter()
            .map(|(u, c)| (u, c as f64 / total as f64))
            .collect();
        users.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(Grounding {
            source: format!(
                "Open Bandit Dataset sample, campaign {campaign}: {total} logged rows \
                 (random + bts), {all_clicks} clicks, {n_items} items, {} user feature \
                 combinations",
                users.len()
            ),
            items,
            users,
            mean_ctr: mean,
        })
    }

    /// A stand-in with the same schema (80 items with three categorical fields and a
    /// numeric bucket; users with four fields), for tests that must not download.
    pub fn synthetic(seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED);
        let cards = [5usize, 12, 21, 7];
        let items = (0..80)
            .map(|_| {
                let f = cards
                    .iter()
                    .enumerate()
                    .map(|(k, &c)| (format!("f{k}"), format!("v{}", rng.random_range(0..c))))
                    .collect();
                (f, 0.0038 * (0.8 + 0.4 * rng.random::<f64>()))
            })
            .collect();
        let ucards = [3usize, 5, 8, 8];
        let mut users: HashMap<Vec<(String, String)>, f64> = HashMap::new();
        for _ in 0..40 {
            let u = ucards
                .iter()
                .enumerate()
                .map(|(k, &c)| (format!("uf{k}"), format!("v{}", rng.random_range(0..c))))
                .collect();
            *users.entry(u).or_default() += rng.random::<f64>() + 0.1;
        }
        let total: f64 = users.values().sum();
        let mut users: Vec<_> = users.into_iter().map(|(u, w)| (u, w / total)).collect();
        users.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Grounding {
            source: "synthetic stand-in with the OBD schema (80 items, 4 user fields)".into(),
            items,
            users,
            mean_ctr: 0.0038,
        }
    }
}

/// When the world changes, in impressions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Impressions per simulated hour (the hourly-refresh baseline's period).
    pub hour: u64,
    pub shift_at: Option<u64>,
    pub gradual: Option<(u64, u64)>,
    pub new_items_at: Option<u64>,
    pub end: u64,
}

impl Schedule {
    /// No drift and no new items: `end` impressions of one world.
    pub fn stationary(hour: u64, end: u64) -> Self {
        Schedule {
            hour,
            shift_at: None,
            gradual: None,
            new_items_at: None,
            end,
        }
    }

    /// Stationary for 2.5 hours (warm-up 1 h, steady 1.5 h), an abrupt reshuffle, 1.5 h
    /// to recover, a gradual drift over one hour, 20 new items half an hour later, one
    /// more hour.
    pub fn standard(hour: u64) -> Self {
        let h = |x: f64| (x * hour as f64) as u64;
        Schedule {
            hour,
            shift_at: Some(h(2.5)),
            gradual: Some((h(4.0), h(5.0))),
            new_items_at: Some(h(5.5)),
            end: h(6.5),
        }
    }
}

/// Returning users, a heavy-tailed catalog and sparse clicks (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Returning {
    /// Users at the start; `new_users_per_hour` more arrive every simulated hour.
    pub users: u64,
    pub new_users_per_hour: u64,
    /// Impressions per session: a session's impressions are consecutive and one user's.
    pub session: u64,
    /// Catalog size before the new items: the grounding's items, then items whose
    /// field values are drawn from the grounding's value frequencies.
    pub items: usize,
    /// Item appeal falls as rank^-zipf (a random order of the catalog).
    pub appeal_zipf: f64,
    /// Per-coordinate noise of a user's own preferences beyond their kind's.
    pub individual: f64,
    /// Activity: a session's user is `floor(P · x^activity)` of the P users so far, x
    /// uniform; 2 gives the first 1% of users 10% of the sessions.
    pub activity: f64,
}

impl Default for Returning {
    fn default() -> Self {
        Returning {
            users: 2_000,
            new_users_per_hour: 1_000,
            session: 5,
            items: 200,
            appeal_zipf: 0.7,
            individual: 0.5,
            activity: 2.0,
        }
    }
}

/// Search traffic (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Search {
    /// Feature values of the intended item the query names.
    pub fields: usize,
    /// Probability a value's word is typed as a synonym no title contains.
    pub synonym: f64,
    /// Probability of one stray word (another item's value).
    pub noise: f64,
    /// Log-attractiveness gained per typed value an item shares with the intent.
    pub relevance: f64,
}

impl Default for Search {
    fn default() -> Self {
        Search {
            fields: 2,
            synonym: 0.3,
            noise: 0.2,
            relevance: 2.0,
        }
    }
}

/// The longest slate the returning world discounts positions for.
pub const SLOTS_MAX: usize = 100;

#[derive(Debug, Clone)]
pub struct WorldConfig {
    pub seed: u64,
    /// Click rate of a uniformly random item at slot 1.
    pub mean_ctr: f64,
    pub sharpness: f64,
    pub latent: usize,
    pub position_bias: Vec<f64>,
    pub new_items: usize,
    /// Per-coordinate noise of the latent vectors beyond what features explain (with
    /// the unit feature part in 8 dimensions, 0.35 makes the two about equal in norm).
    pub noise: f64,
    pub schedule: Schedule,
    /// Catalog ids are `first_item + index`.
    pub first_item: u64,
    /// None: the kinds traffic; Some: returning users (see the module docs).
    pub returning: Option<Returning>,
    /// Some: every impression is a search (see the module docs).
    pub search: Option<Search>,
}

impl WorldConfig {
    pub fn new(seed: u64, schedule: Schedule) -> Self {
        WorldConfig {
            seed,
            mean_ctr: 0.05,
            sharpness: 1.5,
            latent: 8,
            position_bias: vec![1.0, 0.8, 0.65],
            new_items: 20,
            noise: 0.35,
            schedule,
            first_item: 10_000_000 + (seed % 1000) * 1000,
            returning: None,
            search: None,
        }
    }

    /// The returning-users world: 1% slot-1 click rate of a random item, positions
    /// discounted as 1 / log2(position + 1) (1, 0.63, 0.5, 0.43, ... up to
    /// [`SLOTS_MAX`]), a fifth of the catalog again as new items.
    pub fn returning(seed: u64, schedule: Schedule, r: Returning) -> Self {
        WorldConfig {
            mean_ctr: 0.01,
            position_bias: (0..SLOTS_MAX)
                .map(|p| 1.0 / ((p + 2) as f64).log2())
                .collect(),
            new_items: r.items / 5,
            returning: Some(r),
            ..WorldConfig::new(seed, schedule)
        }
    }
}

/// The world's ground truth.
pub struct World {
    pub cfg: WorldConfig,
    pub grounding: Grounding,
    /// Per item (old then new): features, base log-attractiveness, latent vector.
    features: Vec<Vec<(String, String)>>,
    /// Per era (as `user_vec`): each item's log-appeal. The kinds world keeps the
    /// grounding's in every era; the returning world reorders its Zipf appeal.
    base: [Vec<f64>; 3],
    item_vec: Vec<Vec<f64>>,
    /// Preference vectors per user kind, per era (0: start, 1: after the shift, 2: after
    /// the gradual drift).
    user_vec: [Vec<Vec<f64>>; 3],
    /// The same without the per-item and per-user noise: what features alone explain.
    item_clean: Vec<Vec<f64>>,
    user_clean: [Vec<Vec<f64>>; 3],
    /// Cumulative user probabilities.
    user_cdf: Vec<f64>,
    scale: f64,
}

/// A standard normal draw (Box-Muller).
pub(crate) fn gauss(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn normalise(v: &mut [f64]) {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

/// A deterministic uniform in [0, 1) from a key.
pub fn unit(key: u64) -> f64 {
    (splitmix64(key) >> 11) as f64 / (1u64 << 53) as f64
}

impl World {
    pub fn new(cfg: WorldConfig, grounding: Grounding) -> Self {
        let seed = cfg.seed;
        let latent = cfg.latent;
        // A Gaussian vector per (salt, field, value): items or users sharing a value
        // share that part of their latent vector.
        let value_vec = |salt: &str, field: &str, value: &str| {
            let key = fnv1a64(&format!("{seed}/{salt}/{field}={value}"));
            let mut rng = rand::rngs::StdRng::seed_from_u64(key);
            (0..latent).map(|_| gauss(&mut rng)).collect::<Vec<f64>>()
        };
        let compose = |salt: &str, fields: &[(String, String)], noise_key: u64, noise: f64| {
            let mut v = vec![0.0; latent];
            for (f, val) in fields {
                for (a, b) in v.iter_mut().zip(value_vec(salt, f, val)) {
                    *a += b;
                }
            }
            normalise(&mut v);
            let mut rng = rand::rngs::StdRng::seed_from_u64(noise_key);
            for a in v.iter_mut() {
                *a += noise * gauss(&mut rng);
            }
            normalise(&mut v);
            v
        };
        // New items: each field's value drawn from the catalog's value frequencies.
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x17E3);
        let mut features: Vec<Vec<(String, String)>> =
            grounding.items.iter().map(|(f, _)| f.clone()).collect();
        let base: Vec<f64> = grounding
            .items
            .iter()
            .map(|(_, ctr)| (ctr / grounding.mean_ctr.max(1e-12)).ln())
            .collect();
        let mut base = [base.clone(), base.clone(), base];
        let grounded = features.len();
        if let Some(r) = cfg.returning {
            // A catalog of `r.items`: the grounding's items and more like them, with a
            // heavy-tailed appeal in a random order (the grounding's 80 smoothed rates
            // are too flat to carry one).
            let mut extra = rand::rngs::StdRng::seed_from_u64(seed ^ 0xCA7A);
            features.truncate(r.items.max(1));
            while features.len() < r.items {
                let f = (0..features[0].len())
                    .map(|k| features[extra.random_range(0..grounded)][k].clone())
                    .collect();
                features.push(f);
            }
            // Popularity drifts with the preferences: each era orders the catalog anew.
            for (era, b) in base.iter_mut().enumerate() {
                let mut order: Vec<usize> = (0..features.len()).collect();
                order.sort_by_key(|&i| splitmix64(seed ^ 0xA99E ^ ((era as u64) << 32) ^ i as u64));
                *b = vec![0.0; features.len()];
                for (rank, &i) in order.iter().enumerate() {
                    b[i] = -r.appeal_zipf * ((rank + 1) as f64).ln();
                }
            }
        }
        let old = features.len();
        for _ in 0..cfg.new_items {
            let f = (0..features[0].len())
                .map(|k| features[rng.random_range(0..old)][k].clone())
                .collect();
            features.push(f);
            // A new item's appeal is an existing item's (the same one in every era).
            let like = rng.random_range(0..old);
            for b in &mut base {
                let v = b[like];
                b.push(v);
            }
        }
        let items = |noise: f64| {
            features
                .iter()
                .enumerate()
                .map(|(i, f)| compose("item", f, splitmix64(seed ^ (i as u64 + 1)), noise))
                .collect::<Vec<_>>()
        };
        let noise = cfg.noise;
        let (item_vec, item_clean) = (items(noise), items(0.0));
        let users = |era: u64, noise: f64| {
            grounding
                .users
                .iter()
                .enumerate()
                .map(|(u, (f, _))| {
                    compose(
                        &format!("user{era}"),
                        f,
                        splitmix64(seed ^ (era << 40) ^ (u as u64 + 7)),
                        noise,
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut acc = 0.0;
        let user_cdf = grounding
            .users
            .iter()
            .map(|(_, p)| {
                acc += p;
                acc
            })
            .collect();
        let mut w = World {
            user_vec: [users(0, noise), users(1, noise), users(2, noise)],
            user_clean: [users(0, 0.0), users(1, 0.0), users(2, 0.0)],
            item_clean,
            cfg,
            grounding,
            features,
            base,
            item_vec,
            user_cdf,
            scale: 1.0,
        };
        // Calibrate at n = 0: a random slot-1 pick clicks at mean_ctr on average.
        let old = w.old_items();
        let mut mean = 0.0;
        if w.cfg.returning.is_some() {
            // Over the users of the first 4,000 impressions (each with their own
            // preferences).
            let k = 4_000;
            for n in 0..k {
                let pref = w.pref(&w.user_vec, 0, w.user(n));
                let avg: f64 = (0..old).map(|i| w.raw(0, &pref, i)).sum::<f64>() / old as f64;
                mean += avg / k as f64;
            }
        } else {
            for (u, (_, p)) in w.grounding.users.iter().enumerate() {
                let pref = w.pref(&w.user_vec, 0, u);
                let avg: f64 = (0..old).map(|i| w.raw(0, &pref, i)).sum::<f64>() / old as f64;
                mean += p * avg;
            }
        }
        w.scale = w.cfg.mean_ctr / mean.max(1e-12);
        w
    }

    fn old_items(&self) -> usize {
        self.features.len() - self.cfg.new_items
    }

    pub fn total_items(&self) -> usize {
        self.features.len()
    }

    pub fn user_kinds(&self) -> usize {
        self.user_cdf.len()
    }

    /// Items that can be shown at impression `n`.
    pub fn active(&self, n: u64) -> usize {
        match self.cfg.schedule.new_items_at {
            Some(at) if n >= at => self.total_items(),
            _ => self.old_items(),
        }
    }

    /// The user of impression `n`: with the kinds traffic an index into the grounding's
    /// users (a kind), with returning users an individual (see [`World::kind_of`]).
    pub fn user(&self, n: u64) -> usize {
        let Some(r) = self.cfg.returning else {
            return self.draw_kind(unit(self.cfg.seed ^ 0xA11CE ^ n.wrapping_mul(0x9E37_79B9)));
        };
        let session = n / r.session.max(1);
        let x = unit(self.cfg.seed ^ 0xA11CE ^ session.wrapping_mul(0x9E37_79B9));
        let users = self.population(n);
        ((users as f64 * x.powf(r.activity)) as u64).min(users - 1) as usize
    }

    /// How many users exist at impression `n` (with the kinds traffic: the kinds).
    pub fn population(&self, n: u64) -> u64 {
        match self.cfg.returning {
            None => self.user_kinds() as u64,
            Some(r) => {
                let hour = self.cfg.schedule.hour.max(1);
                (r.users + r.new_users_per_hour * n / hour).max(1)
            }
        }
    }

    fn draw_kind(&self, r: f64) -> usize {
        self.user_cdf
            .partition_point(|c| *c <= r)
            .min(self.user_cdf.len() - 1)
    }

    /// The kind (the grounding's user-feature combination) of `user`: an individual's
    /// kind is drawn once, with the kinds' observed frequencies.
    pub fn kind_of(&self, user: usize) -> usize {
        match self.cfg.returning {
            None => user,
            Some(_) => self.draw_kind(unit(
                self.cfg.seed ^ 0x4B1D ^ (user as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )),
        }
    }

    /// The user id Rank carries: none with the kinds traffic (a kind is not a person),
    /// an individual's with returning users (namespaced by seed).
    pub fn user_id(&self, user: usize) -> String {
        match self.cfg.returning {
            None => String::new(),
            Some(_) => format!("s{}u{user}", self.cfg.seed),
        }
    }

    pub fn user_fields(&self, user: usize) -> &[(String, String)] {
        &self.grounding.users[self.kind_of(user)].0
    }

    pub fn item_fields(&self, item: usize) -> &[(String, String)] {
        &self.features[item]
    }

    /// One era's preference vector of `user` under `vecs` (the world's, or their
    /// feature parts): a kind's, or with returning users the kind's plus the
    /// individual's own part when `individual` (the world's vectors only: the feature
    /// parts are what features explain).
    fn era_pref<'a>(
        &self,
        vecs: &'a [Vec<Vec<f64>>; 3],
        era: usize,
        user: usize,
        individual: bool,
    ) -> std::borrow::Cow<'a, [f64]> {
        let Some(r) = self.cfg.returning else {
            return std::borrow::Cow::Borrowed(vecs[era][user].as_slice());
        };
        let kind = vecs[era][self.kind_of(user)].as_slice();
        if !individual || !std::ptr::eq(vecs, &self.user_vec) {
            return std::borrow::Cow::Borrowed(kind);
        }
        let key = self.cfg.seed
            ^ 0x0DD
            ^ ((era as u64) << 40)
            ^ (user as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(splitmix64(key));
        let mut v: Vec<f64> = kind
            .iter()
            .map(|a| a + r.individual * gauss(&mut rng))
            .collect();
        normalise(&mut v);
        std::borrow::Cow::Owned(v)
    }

    /// Impression `n`'s era blend: (era, weight) pairs summing to 1.
    fn eras(&self, n: u64) -> [(usize, f64); 2] {
        let s = &self.cfg.schedule;
        if s.shift_at.is_none_or(|at| n < at) {
            return [(0, 1.0), (0, 0.0)];
        }
        match s.gradual {
            Some((g0, g1)) if n >= g0 && n < g1 => {
                let t = (n - g0) as f64 / (g1 - g0) as f64;
                [(1, 1.0 - t), (2, t)]
            }
            Some((_, g1)) if n >= g1 => [(2, 1.0), (2, 0.0)],
            _ => [(1, 1.0), (1, 0.0)],
        }
    }

    /// Log-appeal of `item` at impression `n` (blended through the gradual drift).
    fn appeal(&self, n: u64, item: usize) -> f64 {
        if self.cfg.returning.is_none() {
            return self.base[0][item];
        }
        self.eras(n)
            .iter()
            .map(|&(e, w)| w * self.base[e][item])
            .sum()
    }

    fn pref<'a>(
        &self,
        vecs: &'a [Vec<Vec<f64>>; 3],
        n: u64,
        user: usize,
    ) -> std::borrow::Cow<'a, [f64]> {
        self.blended_pref(vecs, n, user, true)
    }

    /// [`World::pref`], with or without the individual's own part.
    fn blended_pref<'a>(
        &self,
        vecs: &'a [Vec<Vec<f64>>; 3],
        n: u64,
        user: usize,
        individual: bool,
    ) -> std::borrow::Cow<'a, [f64]> {
        let s = &self.cfg.schedule;
        if s.shift_at.is_none_or(|at| n < at) {
            return self.era_pref(vecs, 0, user, individual);
        }
        match s.gradual {
            Some((g0, g1)) if n >= g0 && n < g1 => {
                let t = (n - g0) as f64 / (g1 - g0) as f64;
                let mut v: Vec<f64> = self
                    .era_pref(vecs, 1, user, individual)
                    .iter()
                    .zip(self.era_pref(vecs, 2, user, individual).iter())
                    .map(|(a, b)| (1.0 - t) * a + t * b)
                    .collect();
                normalise(&mut v);
                std::borrow::Cow::Owned(v)
            }
            Some((_, g1)) if n >= g1 => self.era_pref(vecs, 2, user, individual),
            _ => self.era_pref(vecs, 1, user, individual),
        }
    }

    fn raw(&self, n: u64, pref: &[f64], item: usize) -> f64 {
        let dot: f64 = pref
            .iter()
            .zip(&self.item_vec[item])
            .map(|(a, b)| a * b)
            .sum();
        (self.appeal(n, item) + self.cfg.sharpness * dot).exp()
    }

    /// What the shared feature-value effects alone say of each active item for the user
    /// of impression `n` (the world without its per-item and per-user noise).
    pub fn feature_scores(&self, n: u64, user: usize) -> Vec<f64> {
        self.log_rates(&self.user_clean, &self.item_clean, n, user)
    }

    /// A diagnostic ceiling for a history row: the log click rates (up to the scale) of
    /// every active item by its true appeal plus `weight` times the taste term between
    /// the item's vector and the mean of the `clicked` items' vectors, the world's own
    /// (`clean`: their feature parts), as if a model had learned every item's vector.
    pub fn history_oracle_scores(
        &self,
        n: u64,
        clicked: &[usize],
        weight: f64,
        clean: bool,
    ) -> Vec<f64> {
        let vecs = if clean {
            &self.item_clean
        } else {
            &self.item_vec
        };
        let mut h = vec![0.0; self.cfg.latent];
        for &c in clicked {
            for (a, b) in h.iter_mut().zip(&vecs[c]) {
                *a += b / clicked.len() as f64;
            }
        }
        (0..self.active(n))
            .map(|i| {
                let dot: f64 = h.iter().zip(&vecs[i]).map(|(a, b)| a * b).sum();
                self.appeal(n, i) + weight * self.cfg.sharpness * dot
            })
            .collect()
    }

    /// Diagnostics for what a ranking can gain over popularity: the log click rates of
    /// every active item for the user of impression `n` by the items' appeal alone, and
    /// by appeal plus the taste of the user's kind (everything but the individual's own
    /// part).
    pub fn appeal_and_kind_scores(&self, n: u64, user: usize) -> [Vec<f64>; 2] {
        let appeal: Vec<f64> = (0..self.active(n)).map(|i| self.appeal(n, i)).collect();
        let kind = self.blended_pref(&self.user_vec, n, user, false);
        let with_kind = (0..self.active(n))
            .map(|i| {
                let dot: f64 = kind.iter().zip(&self.item_vec[i]).map(|(a, b)| a * b).sum();
                appeal[i] + self.cfg.sharpness * dot
            })
            .collect();
        [appeal, with_kind]
    }

    /// Log click rates (up to the scale) of every active item for the user of impression
    /// `n`, under the given user and item vectors (the world's, or their feature parts).
    fn log_rates(
        &self,
        users: &[Vec<Vec<f64>>; 3],
        items: &[Vec<f64>],
        n: u64,
        user: usize,
    ) -> Vec<f64> {
        let pref = self.pref(users, n, user);
        (0..self.active(n))
            .map(|i| {
                let dot: f64 = pref.iter().zip(&items[i]).map(|(a, b)| a * b).sum();
                self.appeal(n, i) + self.cfg.sharpness * dot
            })
            .collect()
    }

    /// Slot-1 click probabilities of every active item for the user of impression `n`
    /// (given the impression's query in a search world).
    pub fn attractiveness(&self, n: u64, user: usize) -> Vec<f64> {
        let mut a = self.unsearched(n, user);
        if let Some(s) = self.cfg.search {
            let (target, fields, _) = self.intent(n, &a);
            let gain: Vec<f64> = (0..a.len())
                .map(|i| {
                    let m = fields
                        .iter()
                        .filter(|&&f| self.features[i][f].1 == self.features[target][f].1)
                        .count();
                    (s.relevance * m as f64).exp()
                })
                .collect();
            let mean = gain.iter().sum::<f64>() / gain.len().max(1) as f64;
            a.iter_mut().zip(&gain).for_each(|(a, g)| *a *= g / mean);
        }
        a
    }

    fn unsearched(&self, n: u64, user: usize) -> Vec<f64> {
        let pref = self.pref(&self.user_vec, n, user);
        (0..self.active(n))
            .map(|i| self.scale * self.raw(n, &pref, i))
            .collect()
    }

    /// Impression `n`'s intent given the user's click rates without a query: the
    /// intended item, the feature fields the query names, and the query's words.
    fn intent(&self, n: u64, attr: &[f64]) -> (usize, Vec<usize>, Vec<String>) {
        let s = self.cfg.search.unwrap_or_default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(splitmix64(
            self.cfg.seed ^ 0x5EA2_C400_0000_0000 ^ n,
        ));
        let total: f64 = attr.iter().sum();
        let mut r = rng.random::<f64>() * total;
        let target = attr
            .iter()
            .position(|a| {
                r -= a;
                r < 0.0
            })
            .unwrap_or(attr.len() - 1);
        let width = self.features[target].len();
        let mut fields: Vec<usize> = (0..width).collect();
        for i in 0..width {
            fields.swap(i, rng.random_range(i..width));
        }
        fields.truncate(s.fields.min(width));
        let mut words: Vec<String> = fields
            .iter()
            .map(|&f| {
                let synonym = rng.random::<f64>() < s.synonym;
                self.word(target, f, synonym)
            })
            .collect();
        if rng.random::<f64>() < s.noise {
            let other = rng.random_range(0..attr.len());
            let f = rng.random_range(0..self.features[other].len());
            words.push(self.word(other, f, false));
        }
        (target, fields, words)
    }

    /// The word for field `f` of `item`'s value (its synonym: a word no title holds).
    /// Namespaced by seed like the catalog's features.
    fn word(&self, item: usize, f: usize, synonym: bool) -> String {
        let (field, value) = &self.features[item][f];
        let h = fnv1a64(&format!("{}:{field}={value}", self.cfg.seed)) & 0xff_ffff;
        format!("{}{h:06x}", if synonym { 'y' } else { 'w' })
    }

    /// An item's title: one word per feature value.
    pub fn title(&self, item: usize) -> Vec<String> {
        (0..self.features[item].len())
            .map(|f| self.word(item, f, false))
            .collect()
    }

    /// What the user of impression `n` types (empty outside a search world).
    pub fn query(&self, n: u64, user: usize) -> String {
        if self.cfg.search.is_none() {
            return String::new();
        }
        self.intent(n, &self.unsearched(n, user)).2.join(" ")
    }

    /// Expected clicks of showing the `slots` best-scored items in score order.
    pub fn greedy_clicks(&self, scores: &[f64], attr: &[f64], slots: usize) -> f64 {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
        (0..slots).map(|p| self.at_slot(attr[order[p]], p)).sum()
    }

    /// Click probability given slot-1 attractiveness `a` at slot `pos` (0-based).
    pub fn at_slot(&self, a: f64, pos: usize) -> f64 {
        (a * self.cfg.position_bias[pos]).min(1.0)
    }

    /// The common random number deciding whether item `item` is clicked if shown at
    /// impression `n` (every policy faces the same coin).
    pub fn coin(&self, n: u64, item: usize) -> f64 {
        unit(self.cfg.seed ^ 0xC0_1D ^ n.wrapping_mul(0x1000_0001) ^ ((item as u64) << 48))
    }

    /// Expected clicks of a uniformly random ranking and of the best one.
    pub fn random_and_oracle(&self, attr: &[f64], slots: usize) -> (f64, f64) {
        let mean = attr.iter().sum::<f64>() / attr.len() as f64;
        let random = (0..slots).map(|p| self.at_slot(mean, p)).sum();
        let mut sorted = attr.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let oracle = (0..slots).map(|p| self.at_slot(sorted[p], p)).sum();
        (random, oracle)
    }

    pub fn item_id(&self, item: usize) -> u64 {
        self.cfg.first_item + item as u64
    }

    /// Feature strings of an item as the catalog carries them (namespaced by seed, so
    /// runs sharing a cluster do not share learned rows).
    pub fn catalog_features(&self, item: usize) -> Vec<String> {
        self.features[item]
            .iter()
            .map(|(f, v)| format!("{f}=s{}:{v}", self.cfg.seed))
            .collect()
    }

    /// The user's categorical features as Rank carries them (namespaced likewise), plus
    /// their cross (`user_cross`: a hash of every field's value), the standard wide feature
    /// that lets a model (and Vowpal Wabbit, fed the same fields) learn what is particular
    /// to one combination rather than shared by its values.
    pub fn rank_fields(&self, user: usize) -> Vec<(String, String)> {
        self.kind_fields(self.kind_of(user))
    }

    /// [`World::rank_fields`] of every user of kind `kind`.
    pub fn kind_fields(&self, kind: usize) -> Vec<(String, String)> {
        let fields = &self.grounding.users[kind].0;
        let seed = self.cfg.seed;
        // Hashed: the OBD values are 32-character digests, four of them exceed a value's
        // 128 bytes.
        let cross = fnv1a64(
            &fields
                .iter()
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
                .join("|"),
        );
        let cross = format!("{cross:016x}");
        fields
            .iter()
            .map(|(f, v)| (f.clone(), format!("s{seed}:{v}")))
            .chain(std::iter::once((
                "user_cross".to_string(),
                format!("s{seed}:{cross}"),
            )))
            .collect()
    }

    /// Catalog entries for items `range`.
    pub fn catalog(&self, range: std::ops::Range<usize>) -> Vec<Item> {
        range
            .map(|i| Item {
                id: self.item_id(i),
                features: self.catalog_features(i),
                active: true,
                // A search world's items carry their titles (the gateway indexes them).
                title: if self.cfg.search.is_some() {
                    self.title(i).join(" ")
                } else {
                    String::new()
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        World::new(
            WorldConfig::new(3, Schedule::standard(1000)),
            Grounding::synthetic(3),
        )
    }

    #[test]
    fn calibrated_and_bounded() {
        let w = world();
        let mut mean = 0.0;
        let n = 4000;
        for k in 0..n {
            let a = w.attractiveness(0, w.user(k));
            mean += a.iter().sum::<f64>() / a.len() as f64;
        }
        mean /= n as f64;
        assert!((mean - 0.05).abs() < 0.01, "mean slot-1 CTR {mean}");
        let a = w.attractiveness(0, 0);
        let (random, oracle) = w.random_and_oracle(&a, 3);
        assert!(oracle > 1.5 * random, "oracle {oracle} random {random}");
        // Ranking by the features alone lands between random and the oracle.
        let (mut f, mut r, mut o) = (0.0, 0.0, 0.0);
        for k in 0..2000 {
            let u = w.user(k);
            let a = w.attractiveness(k, u);
            f += w.greedy_clicks(&w.feature_scores(k, u), &a, 3);
            let (ra, or) = w.random_and_oracle(&a, 3);
            r += ra;
            o += or;
        }
        assert!(r < f && f < o, "random {r} features {f} oracle {o}");
    }

    #[test]
    fn drift_follows_the_schedule() {
        let w = world();
        let s = w.cfg.schedule;
        let at = s.shift_at.unwrap();
        assert_eq!(w.attractiveness(0, 1), w.attractiveness(at - 1, 1));
        assert_ne!(w.attractiveness(at - 1, 1), w.attractiveness(at, 1));
        let (g0, g1) = s.gradual.unwrap();
        let (a, m, b) = (
            w.attractiveness(g0, 1),
            w.attractiveness((g0 + g1) / 2, 1),
            w.attractiveness(g1, 1),
        );
        assert_ne!(a, m);
        assert_ne!(m, b);
        assert_eq!(w.active(s.new_items_at.unwrap() - 1), 80);
        assert_eq!(w.active(s.new_items_at.unwrap()), 100);
        // Users follow the grounding's frequencies and coins are uniform.
        let first = (0..20_000).filter(|&n| w.user(n) == 0).count() as f64 / 20_000.0;
        assert!((first - w.grounding.users[0].1).abs() < 0.02);
        let mean: f64 = (0..20_000).map(|n| w.coin(n, 5)).sum::<f64>() / 20_000.0;
        assert!((mean - 0.5).abs() < 0.02);
    }

    /// The diagnostic scores leave out exactly what they say: without an individual part
    /// the kind's scores are the world's log rates, and without taste (sharpness 0) the
    /// appeal alone is; with both, neither is (before the reshuffle, during the gradual
    /// drift and after it).
    #[test]
    fn appeal_and_kind_scores_leave_out_what_they_say() {
        let build = |individual: f64, sharpness: f64| {
            let r = Returning {
                individual,
                ..Returning::default()
            };
            let mut cfg = WorldConfig::returning(3, Schedule::standard(10_000), r);
            cfg.sharpness = sharpness;
            World::new(cfg, Grounding::synthetic(3))
        };
        // Whether `scores` are ln(attractiveness) up to one constant for every item.
        let shifted = |scores: &[f64], attr: &[f64]| {
            let d: Vec<f64> = scores.iter().zip(attr).map(|(s, a)| a.ln() - s).collect();
            d.iter().all(|x| (x - d[0]).abs() < 1e-9)
        };
        let s = Schedule::standard(10_000);
        let (g0, g1) = s.gradual.unwrap();
        let points = [0, s.shift_at.unwrap() + 7, (g0 + g1) / 2, g1 + 3];
        let (no_individual, no_taste, both) = (build(0.0, 1.5), build(0.5, 0.0), build(0.5, 1.5));
        for n in points {
            let user = both.user(n);
            let a = no_individual.attractiveness(n, user);
            assert!(
                shifted(&no_individual.appeal_and_kind_scores(n, user)[1], &a),
                "{n}"
            );
            let a = no_taste.attractiveness(n, user);
            assert!(
                shifted(&no_taste.appeal_and_kind_scores(n, user)[0], &a),
                "{n}"
            );
            let a = both.attractiveness(n, user);
            let [appeal, kind] = both.appeal_and_kind_scores(n, user);
            assert!(!shifted(&appeal, &a) && !shifted(&kind, &a), "{n}");
        }
    }

    /// The returning world: calibrated sparse clicks, a heavy-tailed catalog, sessions of
    /// one user, users who come back, new users arriving, preferences of one's own.
    #[test]
    fn returning_traffic() {
        let r = Returning::default();
        let w = World::new(
            WorldConfig::returning(3, Schedule::standard(10_000), r),
            Grounding::synthetic(3),
        );
        assert_eq!(w.active(0), r.items);
        assert_eq!(w.total_items(), r.items + r.items / 5);
        // A random slot-1 pick clicks at 1%; a fifth of the catalog holds most appeal.
        let mut mean = 0.0;
        let mut mass = vec![0.0; r.items];
        for n in 0..4_000 {
            let a = w.attractiveness(n, w.user(n));
            mean += a.iter().sum::<f64>() / a.len() as f64 / 4_000.0;
            mass.iter_mut().zip(&a).for_each(|(m, x)| *m += x);
        }
        assert!((mean - 0.01).abs() < 0.001, "mean slot-1 CTR {mean}");
        mass.sort_by(|a, b| b.total_cmp(a));
        let top: f64 = mass[..r.items / 10].iter().sum::<f64>() / mass.iter().sum::<f64>();
        assert!(top > 0.3, "the top tenth of items hold {top} of the appeal");
        // Sessions: consecutive impressions of one user, with an id.
        for s in 0..200u64 {
            let first = w.user(s * r.session);
            assert!((1..r.session).all(|k| w.user(s * r.session + k) == first));
        }
        assert_eq!(w.user_id(7), "s3u7");
        // Users come back (2,000 sessions in the first hour, far fewer distinct users),
        // and only users that exist by then show up; new ones do after the first hour.
        let hour = w.cfg.schedule.hour;
        let mut seen = std::collections::HashMap::new();
        for n in (0..hour).step_by(r.session as usize) {
            let u = w.user(n);
            assert!((u as u64) < w.population(n));
            *seen.entry(u).or_insert(0u32) += 1;
        }
        let back = seen.values().filter(|c| **c >= 2).count();
        assert!(
            back * 5 > seen.len(),
            "{back} of {} users came back",
            seen.len()
        );
        assert!(
            seen.len() < 1_700,
            "{} distinct users in 2,000 sessions",
            seen.len()
        );
        assert_eq!(w.population(0), r.users);
        assert_eq!(w.population(hour), r.users + r.new_users_per_hour);
        let newcomers = (hour..2 * hour)
            .filter(|&n| w.user(n) as u64 >= r.users)
            .count();
        assert!(newcomers > 0, "no new user in the second hour");
        // Persistent preferences of one's own: the same user reads the same within an
        // era, another user of the same kind differently, and the reshuffle changes it.
        let u = w.user(0);
        let twin = (0..5_000)
            .find(|&v| v != u && w.kind_of(v) == w.kind_of(u))
            .expect("another user of the same kind");
        assert_eq!(w.attractiveness(0, u), w.attractiveness(hour, u));
        assert_ne!(w.attractiveness(0, u), w.attractiveness(0, twin));
        assert_eq!(w.rank_fields(u), w.rank_fields(twin));
        let at = w.cfg.schedule.shift_at.unwrap();
        assert_ne!(w.attractiveness(at - 1, u), w.attractiveness(at, u));
        // The kinds world has no ids.
        let kinds = World::new(
            WorldConfig::new(3, Schedule::standard(1000)),
            Grounding::synthetic(3),
        );
        assert_eq!(kinds.user_id(7), "");
        assert_eq!(kinds.kind_of(7), 7);
    }

    /// What knowing each half of the preferences is worth (greedy top 3, normalised, the
    /// first era): features only, items exact with users by their features, users exact
    /// with items by their features, both exact. A diagnostic of what a learner has to
    /// find out: `OBD=<dir with obd/> cargo test -p freshet-sim --release
    /// what_each_side -- --ignored --nocapture`.
    #[test]
    #[ignore = "diagnostic, needs the OBD sample"]
    fn what_each_side_is_worth() {
        let obd = std::env::var("OBD").expect("OBD: the obp/dataset/obd folder");
        for seed in 1..=4u64 {
            let schedule = Schedule::stationary(1000, 1);
            let w = World::new(
                WorldConfig::new(seed, schedule),
                Grounding::from_obd(Path::new(&obd), "all").unwrap(),
            );
            let sides = [
                (&w.user_clean, &w.item_clean),
                (&w.user_clean, &w.item_vec),
                (&w.user_vec, &w.item_clean),
                (&w.user_vec, &w.item_vec),
            ];
            let (mut got, mut random, mut oracle) = ([0.0f64; 4], 0.0, 0.0);
            for k in 0..20_000u64 {
                let u = w.user(k);
                let a = w.attractiveness(k, u);
                let (r, o) = w.random_and_oracle(&a, 3);
                random += r;
                oracle += o;
                for (g, (users, items)) in got.iter_mut().zip(sides) {
                    *g += w.greedy_clicks(&w.log_rates(users, items, k, u), &a, 3);
                }
            }
            let n: Vec<String> = got
                .iter()
                .map(|g| format!("{:.3}", (g - random) / (oracle - random)))
                .collect();
            eprintln!(
                "seed {seed}: features only {}, items exact {}, users exact {}, both {}",
                n[0], n[1], n[2], n[3]
            );
        }
    }

    /// Search traffic: queries name the intended item's values (titles hold their
    /// words, synonyms none), matching items gain attractiveness while the mean click
    /// rate stays, and BM25 on the words finds what the query names.
    #[test]
    fn search_traffic() {
        let schedule = Schedule::stationary(1000, 4000);
        let plain = World::new(
            WorldConfig::returning(5, schedule, Returning::default()),
            Grounding::synthetic(5),
        );
        let mut cfg = WorldConfig::returning(5, schedule, Returning::default());
        cfg.search = Some(Search::default());
        let w = World::new(cfg, Grounding::synthetic(5));
        assert!(plain.query(3, plain.user(3)).is_empty());
        let (mut synonyms, mut words, mut lifted, mut stray) = (0, 0, 0.0, 0);
        let (mut mean_plain, mut mean_search) = (0.0, 0.0);
        let n_max = 400;
        for n in 0..n_max {
            let user = w.user(n);
            let base = w.unsearched(n, user);
            let (target, fields, query) = w.intent(n, &base);
            assert_eq!(w.query(n, user), query.join(" "));
            assert_eq!(fields.len(), 2);
            assert!(query.len() == 2 || query.len() == 3, "{query:?}");
            stray += usize::from(query.len() == 3);
            let title = w.title(target);
            for q in &query[..2] {
                words += 1;
                if q.starts_with('y') {
                    synonyms += 1;
                    assert!((0..w.active(n)).all(|i| !w.title(i).contains(q)));
                } else {
                    assert!(title.contains(q), "{q} not in {title:?}");
                }
            }
            let a = w.attractiveness(n, user);
            // The intended item gains the most: it shares every typed value.
            lifted += a[target] / base[target];
            mean_plain += base.iter().sum::<f64>() / base.len() as f64;
            mean_search += a.iter().sum::<f64>() / a.len() as f64;
        }
        let share = f64::from(synonyms) / f64::from(words);
        assert!((0.2..0.4).contains(&share), "synonyms {share}");
        assert!(
            (40..120).contains(&stray),
            "stray words in {stray} of {n_max}"
        );
        assert!(
            lifted / n_max as f64 > 5.0,
            "intended item lifted {:.1}×",
            lifted / n_max as f64
        );
        let ratio = mean_search / mean_plain;
        assert!((0.8..1.6).contains(&ratio), "mean click rate ×{ratio:.2}");
    }
}
