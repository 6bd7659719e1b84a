//! The ranking model: one forward definition shared by the gateway (serving) and the
//! worker (training), so there is no train/serve skew.
//!
//! Parameters live on the PS cluster:
//! - sparse `item` (item id → d), `feature` (hashed categorical feature → d), `user`
//!   (hashed user id → d), `item_bias` (item id → 1; optional: a cluster created
//!   without it ranks with bias 0), `item_counts` (item id → 5: click counts, the item
//!   prior of a new cluster, below) or `item_prior` (item id → 1; the learned prior of a
//!   cluster created before the counts; optional, below),
//!   `history` (hashed user id → d: the user's recent
//!   clicks, below; optional), `query_cross` (query term × item feature or id → 1: see
//!   [`query`]; optional), `lexical_match` (a query's match level with a candidate's
//!   title → 1: see [`query`]; optional);
//! - dense `user_tower` (W: d × (d + NUMERIC_MAX), then b: d) and `critic`
//!   (w_v: d, b_v, w_q: d, b_q).
//!
//! Forward pass (the dense tower and heads are a candle-core graph, the rest plain f32;
//! every gateway runs the same code on the same shapes, so computes the same bits):
//! - x = [mean of the user's feature rows (+ user row) + h + q ; numeric features,
//!   zero-padded] with h the user's history row and q the mean of the query's rows
//!   (terms and pairs of terms, in the feature table; 0 without a query)
//! - u = x[..d] + tanh(W x + b)                       (user tower, residual)
//! - v_a = item row + mean of the item's feature rows (item vector)
//! - score(s, a) = u · v_a + β_a + ρ_a + c(q, a) + ℓ(q, a)   (policy logit, β_a the item
//!   bias, ρ_a the item prior, c the mean over query terms of the term's cross rows with
//!   a's id and features, ℓ the weight of the level at which a's title matches the query)
//! - V(s) = w_v · u + b_v ;
//!   Q(s, a) = b_q + β_a + ρ_a + c(q, a) + ℓ(q, a) + Σᵢ (1 + w_qᵢ) uᵢ v_aᵢ
//!   (critic, reward logit)
//!
//! The crosses learn from the reward model only (Q's cross-entropy on the shown slot, a
//! logistic click model on query term × item pairs); the policy-gradient and entropy
//! terms treat them as fixed, like the history: their gradient reaches every candidate
//! of every example, about a hundred rows per candidate, which would make a worker step
//! an order of magnitude dearer for a term the policy weight (0.1) keeps small anyway.
//! The lexical levels (sixteen shared rows) learn the same way, so that a level and the
//! crosses it sits beside are one logistic click model.
//!
//! The item bias and the item prior carry an item's popularity, before any embedding has
//! learned who likes it (on a replay of real traffic, online item popularity alone ranked
//! the true item in the top 10 for 0.55 of events, the model without a bias 0.42). The
//! bias β_a learns from the policy gradient and from the reward model's cross-entropy on
//! every shown slot, as the residual of everything else in Q: the fast part, which follows
//! what changed (a reshuffle of popularity). The prior ρ_a (`item_prior`, item id → 1;
//! optional) is the item's own click model beneath it: trained on every shown slot by its
//! own cross-entropy, BCE(σ(b_q + ρ_a), r) with the critic's b_q (the reward model's base
//! logit) held fixed, on Adagrad, whose steps shrink as the squared gradients the row has
//! taken (mostly its clicks) add up; the policy and the reward model read it as a fixed
//! input. Without the prior, β_a alone had to be both the long average and the fast
//! correction, and was neither: serving by it alone reached 0.25 of the oracle at steady
//! state in the returning-users world.
//!
//! A new cluster's prior is counted instead (`item_counts`, see [`counts_updates`]): per
//! item its clicks and shown slots over a long window and a short one, and the catalog
//! rate they are smoothed towards; ρ_a = ln(smoothed long-window rate / catalog rate).
//! The long window is restarted from the short one when the step's candidates' short
//! windows disagree with their long ones (a change of regime), and β_a then decays by 3%
//! per update on top of it. Offline, returning-users world, 8 seeds, against the learned
//! prior: steady state +0.038 ± 0.014, whole run +0.022 ± 0.022.
//!
//! Real-time behaviour: h is a moving average of the item vectors the user clicked,
//! h ← (1 - α) h + α · mean(v of this step's clicks), kept as the user's row of the
//! `history` table (plain SGD at rate α: the worker pushes h - mean(v)). It changes with
//! the same step and epoch as the weights trained on those clicks, so one click moves the
//! user's next ranking towards items like it before any weight has learned; it is an
//! input (no gradient flows into it), and the impression records the h it was ranked
//! with, so training sees what serving saw.
//!
//! Feature ids: `fnv1a64("u:<field>=<value>")` for user fields, `fnv1a64("i:<feature>")`
//! for item features, `fnv1a64("uid:<user id>")` for user ids. Fixed forever: they name
//! rows on the cluster.

use candle_core::{Device, Tensor};
use freshet_proto::ps::v1::{
    optimizer_config, AdagradConfig, AdamConfig, CountsConfig, ModelConfig, OptimizerConfig,
    SgdConfig, TableKind, TableSpec,
};
use freshet_proto::{fnv1a64, FieldError};

pub const ITEM_TABLE: &str = "item";
pub const FEATURE_TABLE: &str = "feature";
pub const USER_TABLE: &str = "user";
pub const ITEM_BIAS_TABLE: &str = "item_bias";
pub const HISTORY_TABLE: &str = "history";
pub const CROSS_TABLE: &str = "query_cross";
pub const LEXICAL_TABLE: &str = "lexical_match";
pub const ITEM_PRIOR_TABLE: &str = "item_prior";
pub const ITEM_COUNTS_TABLE: &str = "item_counts";
/// A counts row: long clicks, long shown, short clicks, short shown, and the catalog's
/// click rate p̄ at the item's last step (`freshet.ps.v1.CountsConfig`).
pub const COUNTS_DIM: usize = 5;
/// The counts prior's smoothing: an item's rate is (clicks + K · p̄) / (shown + K), K this
/// many shown slots of the catalog's rate p̄ (as the popularity baseline smooths).
pub const COUNTS_WEIGHT: f32 = 20.0;
/// p₀: the catalog rate assumed for an item whose row no step has written yet.
pub const COUNTS_PRIOR_RATE: f32 = 0.01;
/// The short window's forgetting per shown slot of a step: (1 - f)^32 = 0.98, about the
/// catalog's last 1,600 shown slots (offline harness, returning-users world, seeds 1-4:
/// half that forgetting gave steady 0.845 and whole run 0.705, this 0.845 and 0.734).
pub const COUNTS_FORGET: f32 = 6.3e-4;
/// The change detector's threshold: a step restarts the long window of every candidate
/// when Σ over its distinct candidates of shown_short · KL(short rate ‖ long rate)
/// passes it. In the returning-users world (offline harness, seeds 1-4, `DIAG`) it
/// restarts once in the half hour after the reshuffle and once during the gradual
/// drift, never at steady state or when new items arrive; 15 restarted too often
/// (steady 0.812 against 0.845).
pub const COUNTS_RESTART_LLR: f32 = 25.0;
/// α of the history's moving average: the share of h the latest click takes.
pub const HISTORY_RATE: f32 = 0.5;
pub const TOWER: &str = "user_tower";
pub const CRITIC: &str = "critic";
/// Numeric user features the tower takes (more are rejected, fewer zero-padded).
pub const NUMERIC_MAX: usize = 8;
/// The user tower's layers as the cluster's model spec names them.
pub const TOWER_KIND: &str = "residual_tanh";
/// Categorical user fields per request.
pub const USER_FIELDS_MAX: usize = 64;

/// Row access the forward pass needs; the gateway implements it over a pinned model
/// version, the worker over pulled rows.
pub trait Params {
    /// Copies row `id` of sparse `table` into `out` (its initial value if never trained),
    /// writing every element (callers reuse `out` across rows).
    fn read(&self, table: &str, id: u64, out: &mut [f32]);
    /// Dense tensor `name`.
    fn dense(&self, name: &str) -> &[f32];
}

/// Model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    pub dim: usize,
    /// Whether the model has the per-item bias table [`ITEM_BIAS_TABLE`].
    pub item_bias: bool,
    /// Whether the model keeps each user's recent clicks in [`HISTORY_TABLE`].
    pub history: bool,
    /// Whether the model has the query × item crosses [`CROSS_TABLE`] (without it a
    /// query still moves u through its rows).
    pub query_cross: bool,
    /// Whether the model weighs how a candidate's title matches the query
    /// ([`LEXICAL_TABLE`]).
    pub lexical: bool,
    /// Whether the model has the learned per-item click prior [`ITEM_PRIOR_TABLE`].
    pub item_prior: bool,
    /// Whether the model's item prior comes from click counts ([`ITEM_COUNTS_TABLE`]),
    /// instead of the learned one.
    pub item_counts: bool,
}

impl Default for ModelSpec {
    fn default() -> Self {
        // 32, not the 8 latent dimensions the simulator draws: the wider model learns
        // faster from the same clicks (offline harness, 4 seeds, whole run normalised
        // 0.29 at 16 → 0.34 at 32; 8 was worse, 64 no better).
        ModelSpec::new(32)
    }
}

impl ModelSpec {
    /// The model of this width with every part (item bias included).
    pub fn new(dim: usize) -> Self {
        ModelSpec {
            dim,
            item_bias: true,
            history: true,
            query_cross: true,
            lexical: true,
            item_prior: false,
            item_counts: true,
        }
    }

    /// Row width of one of the model's sparse tables (the bias, prior, cross and level
    /// tables are 1 wide).
    pub fn sparse_dim(&self, table: &str) -> usize {
        if table == ITEM_BIAS_TABLE
            || table == CROSS_TABLE
            || table == LEXICAL_TABLE
            || table == ITEM_PRIOR_TABLE
        {
            1
        } else if table == ITEM_COUNTS_TABLE {
            COUNTS_DIM
        } else {
            self.dim
        }
    }

    pub fn tower_len(&self) -> usize {
        self.dim * (self.dim + NUMERIC_MAX) + self.dim
    }

    pub fn critic_len(&self) -> usize {
        2 * self.dim + 2
    }

    /// The cluster tables this model needs (what `freshet up` and tests create).
    pub fn tables(&self) -> Vec<TableSpec> {
        // Adagrad (but for the rows that must follow drift, below) with a small initial
        // accumulator: early steps move each coordinate by about `lr` whatever the
        // gradient's scale, so a fresh model starts learning from the first few hundred
        // clicks.
        let adagrad = |lr: f32| OptimizerConfig {
            kind: Some(optimizer_config::Kind::Adagrad(AdagradConfig {
                lr,
                initial_accumulator: 0.01,
                eps: 1e-8,
            })),
        };
        let sgd = |lr: f32| OptimizerConfig {
            kind: Some(optimizer_config::Kind::Sgd(SgdConfig { lr })),
        };
        let adam = |lr: f32, beta1: f32, weight_decay: f32| OptimizerConfig {
            kind: Some(optimizer_config::Kind::Adam(AdamConfig {
                lr,
                beta1,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay,
            })),
        };
        let table =
            |name: &str, kind: TableKind, dim: usize, lr: f32, scale: f32, seed: u64| TableSpec {
                name: name.into(),
                kind: kind as i32,
                dim: dim as u32,
                optimizer: Some(adagrad(lr)),
                init_scale: scale,
                seed,
                limits: None,
            };
        let d = self.dim;
        let mut tables = vec![
            // Rates tuned on the drift simulator (offline harness in sim::tests): the
            // critic's biases must reach the click log-odds (about -2.5) within a few
            // hundred steps, or its cross-entropy drags every score down meanwhile.
            //
            // Id rows (item, user) start at zero: a new id adds nothing to its vector
            // until it has learned something, instead of random noise of the same size as
            // its features' (the features' random start breaks the symmetry, so the id
            // rows still get gradients). Rate 0.1 rather than 0.3: at 0.3 the embeddings
            // follow the click noise (recovery after a shift was slower).
            table(ITEM_TABLE, TableKind::Sparse, d, 0.1, 0.0, 1),
            table(FEATURE_TABLE, TableKind::Sparse, d, 0.1, 0.3, 2),
            // A user's own row: plain SGD at 0.1, not Adagrad. A returning user's
            // tastes drift, and Adagrad's accumulator only grows, so the users the
            // model knows best would be the slowest to follow (offline harness,
            // returning-users world, 4 seeds, with the item bias below on SGD: whole
            // run about 0.70 → 0.718).
            TableSpec {
                optimizer: Some(sgd(0.1)),
                ..table(USER_TABLE, TableKind::Sparse, d, 0.1, 0.0, 3)
            },
            table(TOWER, TableKind::Dense, self.tower_len(), 0.05, 0.3, 4),
            table(CRITIC, TableKind::Dense, self.critic_len(), 0.3, 0.05, 5),
        ];
        if self.item_bias {
            // Starts at 0 (the critic's own bias carries the average click rate). Adam
            // with a slow first moment (β1 0.99), not a constant rate: popularity moves
            // (trends, a reshuffle) and an item's clicks are sparse. At a constant rate
            // a bias follows every click (SGD 0.1: each click moves it by ~0.1) or
            // follows a reshuffle slowly (0.03); Adam steps by the averaged gradient
            // over its spread, so a steady item's bias barely moves (its averaged
            // gradient is near zero) while one whose popularity changed gets steady
            // steps of about the rate. Adagrad was the slowest of all to follow a change
            // (its accumulator only grows). Offline harness, returning-users world
            // (popularity reordered at the reshuffle), 12 seeds, against SGD 0.1: whole
            // run 0.648 → 0.689, after the reshuffle 0.537 → 0.639, steady 0.825 →
            // 0.816; β1 0.9 followed faster still and cost more of the steady state
            // (0.800).
            //
            // With the counts prior, β_a also decays by 3% at each update (AdamW's
            // decoupled decay): the counts carry the long average, so β_a is only the
            // correction of the last few hundred steps, and a correction that the data
            // stops supporting fades instead of adding noise to the steady state
            // (offline harness, returning-users world, seeds 1-4, a diagnostic version of
            // the counts and their restarts: with this decay steady 0.866 and whole run
            // 0.736, at 1% 0.851 and 0.730, without decay 0.825 and 0.704; the learned
            // prior without decay 0.815 and 0.723).
            let decay = if self.item_counts { 0.03 } else { 0.0 };
            tables.push(TableSpec {
                optimizer: Some(adam(0.05, 0.99, decay)),
                ..table(ITEM_BIAS_TABLE, TableKind::Sparse, 1, 0.05, 0.0, 6)
            });
        }
        if self.history {
            // Plain SGD: a push of h - mean(v) at rate α is the moving average's step.
            tables.push(TableSpec {
                optimizer: Some(sgd(HISTORY_RATE)),
                ..table(HISTORY_TABLE, TableKind::Sparse, d, 0.0, 0.0, 7)
            });
        }
        if self.query_cross {
            // Starts at 0 (an unseen pair adds nothing); plain SGD: what a query term's
            // users buy moves with trends too (not tuned on Adam like the item bias: the
            // search world has no measure of it yet).
            tables.push(TableSpec {
                optimizer: Some(sgd(0.1)),
                ..table(CROSS_TABLE, TableKind::Sparse, 1, 0.1, 0.0, 8)
            });
        }
        if self.lexical {
            // Sixteen rows that every search's candidates share, so a step's gradient
            // on one is a sum over its examples: Adam steps by about its rate whatever
            // that sum's size (plain SGD would step by the batch's size). Starts at 0,
            // beside the fixed cold-start prior (`query::lexical_prior`), which alone
            // orders a fresh model's candidates by the query's share a title holds.
            // Rate 0.2 rather than
            // 0.05: the levels are learned from every search, so they can move fast;
            // search simulator, seeds 1-3: expected clicks per impression over the
            // first 1,000 +0.077 ± 0.053, whole run +0.005 ± 0.023 (no cost).
            tables.push(TableSpec {
                optimizer: Some(adam(0.2, 0.9, 0.0)),
                ..table(LEXICAL_TABLE, TableKind::Sparse, 1, 0.2, 0.0, 9)
            });
        }
        if self.item_prior {
            // The item's own click model beneath the bias (crate docs): Adagrad, whose
            // steps shrink as the row's squared gradients (mostly its clicks) add up, so
            // the prior settles on a long average while β_a follows what changed. Starts
            // at 0 (an unseen item is at the reward model's base logit). Offline harness,
            // returning-users world, seeds 1-8, against the model without it: steady state +0.016 ± 0.012 (95% t), whole run +0.019
            // ± 0.043; Adagrad 0.3 did better at steady state (seeds 1-4: 0.823 against
            // 0.813) and worse over the run (0.697 against 0.724), 0.05 about the same as
            // 0.1, plain SGD 0.01 worse at steady state (0.805).
            tables.push(table(ITEM_PRIOR_TABLE, TableKind::Sparse, 1, 0.1, 0.0, 10));
        }
        if self.item_counts {
            // The items' click counts (crate docs): rows of [long clicks, long shown,
            // short clicks, short shown, catalog rate] that the shards add up
            // (`CountsConfig`).
            tables.push(TableSpec {
                optimizer: Some(OptimizerConfig {
                    kind: Some(optimizer_config::Kind::Counts(CountsConfig {
                        forget: COUNTS_FORGET,
                    })),
                }),
                ..table(
                    ITEM_COUNTS_TABLE,
                    TableKind::Sparse,
                    COUNTS_DIM,
                    0.0,
                    0.0,
                    11,
                )
            });
        }
        tables
    }

    /// The cluster's model record for this shape and update rule (what the meta group
    /// stores at bootstrap).
    pub fn config(&self, h: &Hyper) -> ModelConfig {
        let mut c = config::ModelSection::new(self, h).to_proto(&[]);
        c.tables = self.tables();
        c
    }

    /// The shape and update rule of the cluster's model record, checked against what this
    /// build runs.
    ///
    /// # Errors
    /// A field this build cannot run, named `model.<field>`.
    pub fn from_config(c: &ModelConfig) -> Result<(Self, Hyper), FieldError> {
        if c.tower != TOWER_KIND {
            return Err(FieldError::new(
                "model.tower",
                format!(
                    "the cluster's model has tower {:?}, this build runs {TOWER_KIND:?}",
                    c.tower
                ),
            ));
        }
        if c.numeric_max as usize != NUMERIC_MAX {
            return Err(FieldError::new(
                "model.numeric_max",
                format!(
                    "the cluster's model takes {}, this build {NUMERIC_MAX}",
                    c.numeric_max
                ),
            ));
        }
        let spec = Self::from_tables(&c.tables).map_err(|e| e.in_field("model"))?;
        if spec.dim != c.dim as usize {
            return Err(FieldError::new(
                "model.dim",
                format!("{} but the model's tables have dim {}", c.dim, spec.dim),
            ));
        }
        if !(c.clip.is_finite() && c.clip > 0.0) {
            return Err(FieldError::new("model.clip", "must be finite and > 0"));
        }
        let policy_weight = c.actor_weight();
        for (name, v) in [
            ("policy_weight", policy_weight),
            ("entropy", c.entropy),
            ("value_weight", c.value_weight),
            ("reward_weight", c.reward_weight),
            ("choice_weight", c.choice_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(FieldError::new(
                    format!("model.{name}"),
                    "must be finite and >= 0",
                ));
            }
        }
        Ok((
            spec,
            Hyper {
                policy_weight,
                clip: c.clip,
                entropy: c.entropy,
                value_weight: c.value_weight,
                reward_weight: c.reward_weight,
                choice_weight: c.choice_weight,
            },
        ))
    }

    /// Reads the model shape back from the cluster's table specs.
    ///
    /// # Errors
    /// A table is missing or has the wrong kind or size (the field is `tables`).
    pub fn from_tables(tables: &[TableSpec]) -> Result<Self, FieldError> {
        let bad = |reason: String| FieldError::new("tables", reason);
        let find = |name: &str| {
            tables
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| bad(format!("the cluster has no table {name:?}")))
        };
        let dim = find(ITEM_TABLE)?.dim as usize;
        // An optional table: absent, or sparse with `width` values a row and, where
        // named, the optimizer kind `opt` accepts.
        type KindIs = fn(&optimizer_config::Kind) -> bool;
        let optional = |name: &str, width: usize, opt: Option<(&str, KindIs)>, why: &str| {
            let t = tables.iter().find(|t| t.name == name);
            let kind_ok = |t: &TableSpec| {
                opt.is_none_or(|(_, is)| {
                    t.optimizer
                        .as_ref()
                        .and_then(|o| o.kind.as_ref())
                        .is_some_and(is)
                })
            };
            match t {
                Some(t)
                    if t.dim as usize != width
                        || t.kind != TableKind::Sparse as i32
                        || !kind_ok(t) =>
                {
                    let with =
                        opt.map_or(String::new(), |(n, _)| format!(" and the {n} optimizer"));
                    Err(bad(format!(
                        "table {name:?} must be sparse with dim {width}{with}{why}"
                    )))
                }
                _ => Ok(t),
            }
        };
        let bias = optional(ITEM_BIAS_TABLE, 1, None, "")?;
        let cross = optional(CROSS_TABLE, 1, None, "")?;
        let lexical = optional(LEXICAL_TABLE, 1, None, "")?;
        let prior = optional(ITEM_PRIOR_TABLE, 1, None, "")?;
        let counts = optional(
            ITEM_COUNTS_TABLE,
            COUNTS_DIM,
            Some(("counts", |k| matches!(k, optimizer_config::Kind::Counts(_)))),
            "",
        )?;
        if prior.is_some() && counts.is_some() {
            return Err(bad(format!(
                "a model has one item prior: {ITEM_PRIOR_TABLE:?} (learned) or \
                 {ITEM_COUNTS_TABLE:?} (counts), not both"
            )));
        }
        let history = optional(
            HISTORY_TABLE,
            dim,
            Some(("sgd", |k| matches!(k, optimizer_config::Kind::Sgd(_)))),
            " (its rate is the moving average's α)",
        )?;
        let spec = ModelSpec {
            dim,
            item_bias: bias.is_some(),
            history: history.is_some(),
            query_cross: cross.is_some(),
            lexical: lexical.is_some(),
            item_prior: prior.is_some(),
            item_counts: counts.is_some(),
        };
        for t in [FEATURE_TABLE, USER_TABLE] {
            if find(t)?.dim as usize != dim || find(t)?.kind != TableKind::Sparse as i32 {
                return Err(bad(format!("table {t:?} must be sparse with dim {dim}")));
            }
        }
        if find(TOWER)?.dim as usize != spec.tower_len() {
            return Err(bad(format!(
                "{TOWER:?} must have {} values",
                spec.tower_len()
            )));
        }
        if find(CRITIC)?.dim as usize != spec.critic_len() {
            return Err(bad(format!(
                "{CRITIC:?} must have {} values",
                spec.critic_len()
            )));
        }
        Ok(spec)
    }
}

/// What the model sees of a user: hashed feature ids and numeric features.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserInput {
    /// Feature rows (sorted, deduplicated), user-id row included.
    pub feature_ids: Vec<u64>,
    /// Whether the last of `feature_ids` is the user-id row (from the `user` table).
    pub user_id: Option<u64>,
    pub numeric: Vec<f32>,
    /// The user's history row h as served (empty: none, for a model without it or a
    /// request without a user id).
    pub history: Vec<f32>,
    /// The query's term ids in the order typed (empty: no query; see [`query`]).
    pub query: Vec<u64>,
}

pub fn user_feature_id(field: &str, value: &str) -> u64 {
    fnv1a64(&format!("u:{field}={value}"))
}

pub fn item_feature_id(feature: &str) -> u64 {
    fnv1a64(&format!("i:{feature}"))
}

pub fn user_id_row(user_id: &str) -> u64 {
    fnv1a64(&format!("uid:{user_id}"))
}

impl UserInput {
    /// Builds the input from request fields.
    ///
    /// # Errors
    /// Too many fields or numeric features, empty names, non-finite numbers (the message
    /// names the field).
    pub fn new<'a>(
        categorical: impl IntoIterator<Item = (&'a str, &'a str)>,
        numeric: &[f32],
        user_id: &str,
    ) -> Result<Self, FieldError> {
        let mut ids = Vec::new();
        for (field, value) in categorical {
            if field.is_empty() || field.len() > 128 || value.len() > 128 {
                return Err(FieldError::new(
                    format!("user.categorical[{field:?}]"),
                    "names and values must be 1..=128 bytes",
                ));
            }
            ids.push(user_feature_id(field, value));
        }
        if ids.len() > USER_FIELDS_MAX {
            return Err(FieldError::new(
                "user.categorical",
                format!("at most {USER_FIELDS_MAX} fields"),
            ));
        }
        ids.sort_unstable();
        ids.dedup();
        if numeric.len() > NUMERIC_MAX {
            return Err(FieldError::new(
                "user.numeric",
                format!("at most {NUMERIC_MAX} values"),
            ));
        }
        if let Some(i) = numeric.iter().position(|v| !v.is_finite()) {
            return Err(FieldError::new(
                format!("user.numeric[{i}]"),
                "must be finite",
            ));
        }
        if user_id.len() > 256 {
            return Err(FieldError::new("user.user_id", "at most 256 bytes"));
        }
        Ok(UserInput {
            feature_ids: ids,
            user_id: (!user_id.is_empty()).then(|| user_id_row(user_id)),
            numeric: numeric.to_vec(),
            history: Vec::new(),
            query: Vec::new(),
        })
    }

    /// The same input with a search query (`text` empty: none).
    ///
    /// # Errors
    /// The query is too long or has no words (field `user.query`).
    pub fn with_query(mut self, text: &str) -> Result<Self, FieldError> {
        self.query = query::parse_query(text, "user.query")?;
        Ok(self)
    }

    /// Reads the user's history row from `p` into `history` (what Rank does before the
    /// forward pass; the impression keeps it for training).
    pub fn read_history(&mut self, spec: &ModelSpec, p: &impl Params) {
        self.history.clear();
        if let (true, Some(uid)) = (spec.history, self.user_id) {
            self.history = vec![0.0; spec.dim];
            p.read(HISTORY_TABLE, uid, &mut self.history);
        }
    }
}

/// The tower's input and output for one user (kept for the backward pass).
#[derive(Debug, Clone, PartialEq)]
pub struct UserState {
    pub x: Vec<f32>,
    pub u: Vec<f32>,
    /// The query's term ids (for the crosses; empty: no query).
    pub query: Vec<u64>,
}

/// Mean of rows `ids` of `table` into `out` (zeros when `ids` is empty).
fn mean_rows(p: &impl Params, table: &str, ids: &[u64], dim: usize, out: &mut [f32]) {
    out.fill(0.0);
    if ids.is_empty() {
        return;
    }
    let mut row = vec![0.0f32; dim];
    for id in ids {
        p.read(table, *id, &mut row);
        for (o, r) in out.iter_mut().zip(&row) {
            *o += *r;
        }
    }
    let n = ids.len() as f32;
    for o in out.iter_mut() {
        *o /= n;
    }
}

/// The tower's input for one user: x = [mean of the user's feature rows (+ user row) ;
/// numeric features, zero-padded].
fn tower_input(spec: &ModelSpec, p: &impl Params, input: &UserInput, x: &mut [f32]) {
    let d = spec.dim;
    x.fill(0.0);
    // Feature rows and the user-id row are averaged together.
    let (pooled, numeric) = x.split_at_mut(d);
    mean_rows(p, FEATURE_TABLE, &input.feature_ids, d, pooled);
    if let Some(uid) = input.user_id {
        let mut row = vec![0.0f32; d];
        p.read(USER_TABLE, uid, &mut row);
        let n = input.feature_ids.len() as f32;
        for (o, r) in pooled.iter_mut().zip(&row) {
            *o = (*o * n + *r) / (n + 1.0);
        }
    }
    // The history is added, not averaged in: its weight must not shrink with the number
    // of feature rows.
    if input.history.len() == d {
        for (o, h) in pooled.iter_mut().zip(&input.history) {
            *o += *h;
        }
    }
    // So is the query: typed words must count whatever else is known of the user.
    if !input.query.is_empty() {
        let mut q = vec![0.0f32; d];
        mean_rows(
            p,
            FEATURE_TABLE,
            &query::query_rows(&input.query),
            d,
            &mut q,
        );
        for (o, v) in pooled.iter_mut().zip(&q) {
            *o += *v;
        }
    }
    numeric[..input.numeric.len()].copy_from_slice(&input.numeric);
}

/// The dense half of the model is a candle-core graph (the sparse half, row pooling and
/// the ragged softmax over candidates, stays plain Rust: it is gathers and dot products).
/// Its shapes are fixed by the spec, which `ModelSpec::from_tables` checked against the
/// cluster, so a candle error here is a broken invariant, not bad input.
fn dense_ok<T>(r: candle_core::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("model shapes are fixed by the spec: {e}"),
    }
}

/// u = x[.., ..d] + tanh(x Wᵀ + b) for a batch `x` of shape (B, d + NUMERIC_MAX).
/// Residual: the pooled embedding reaches u directly, so the feature rows learn from the
/// first clicks instead of waiting for the (small) tower weights to grow (measured on the
/// simulator: warm-up several times faster).
fn tower(spec: &ModelSpec, x: &Tensor, tower: &Tensor) -> candle_core::Result<Tensor> {
    let d = spec.dim;
    let width = d + NUMERIC_MAX;
    let w = tower.narrow(0, 0, d * width)?.reshape((d, width))?;
    let b = tower.narrow(0, d * width, d)?;
    // One user (Rank): W x as a broadcast product and sum. Measured at these sizes,
    // candle's CPU matmul costs ~29 µs of dispatch per call, the broadcast form 1 µs; for
    // a training batch it is the other way round (400 examples: matmul's backward 0.5 ms,
    // the broadcast's 3.5 ms). Same arithmetic, up to the order of the sums.
    let wx = if x.dim(0)? == 1 {
        x.broadcast_mul(&w)?.sum(1)?.unsqueeze(0)?
    } else {
        x.matmul(&w.t()?)?
    };
    let z = wx.broadcast_add(&b)?;
    x.narrow(1, 0, d)?.add(&z.tanh()?)
}

/// The critic heads for a batch of user states `u` (B, d) and shown item vectors `va`
/// (B, d): V(s) = w_v · u + b_v and Q(s, a) = b_q + Σᵢ (1 + w_qᵢ) uᵢ vaᵢ, each (B,).
fn heads(
    spec: &ModelSpec,
    u: &Tensor,
    va: &Tensor,
    critic: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let d = spec.dim;
    let w_v = critic.narrow(0, 0, d)?;
    let b_v = critic.narrow(0, d, 1)?;
    let w_q = critic.narrow(0, d + 1, d)?;
    let b_q = critic.narrow(0, 2 * d + 1, 1)?;
    let value = u.broadcast_mul(&w_v)?.sum(1)?.broadcast_add(&b_v)?;
    // 1 + w_q: Q contains the policy's score u·v, so the reward model's cross-entropy on
    // every shown slot (clicked or not) trains the shared embeddings and tower directly,
    // a dense, low-variance signal beside the sparse policy-gradient one.
    let q = u
        .mul(va)?
        .broadcast_mul(&w_q.affine(1.0, 1.0)?)?
        .sum(1)?
        .broadcast_add(&b_q)?;
    Ok((value, q))
}

fn tensor(data: &[f32], shape: impl Into<candle_core::Shape>) -> Tensor {
    dense_ok(Tensor::from_slice(data, shape, &Device::Cpu))
}

/// The user tower for one user (what Rank computes once per call).
pub fn user_state(spec: &ModelSpec, p: &impl Params, input: &UserInput) -> UserState {
    let width = spec.dim + NUMERIC_MAX;
    let mut x = vec![0.0f32; width];
    tower_input(spec, p, input, &mut x);
    let tw = p.dense(TOWER);
    let u = tower(spec, &tensor(&x, (1, width)), &tensor(tw, tw.len()));
    let u = dense_ok(u.and_then(|u| u.squeeze(0)?.to_vec1::<f32>()));
    UserState {
        x,
        u,
        query: input.query.clone(),
    }
}

/// An item's vector: its id row plus the mean of its feature rows.
pub fn item_vector(spec: &ModelSpec, p: &impl Params, item: u64, feature_ids: &[u64]) -> Vec<f32> {
    let mut v = vec![0.0; spec.dim];
    p.read(ITEM_TABLE, item, &mut v);
    let mut features = vec![0.0; spec.dim];
    mean_rows(p, FEATURE_TABLE, feature_ids, spec.dim, &mut features);
    for (a, b) in v.iter_mut().zip(&features) {
        *a += *b;
    }
    v
}

/// An item's bias as the policy and the reward model add it: β_a + ρ_a, the item bias and
/// the item prior (each 0 for a model without its table).
pub fn item_bias(spec: &ModelSpec, p: &impl Params, item: u64) -> f32 {
    let mut sum = 0.0f32;
    let mut b = [0.0f32];
    if spec.item_bias {
        p.read(ITEM_BIAS_TABLE, item, &mut b);
        sum += b[0];
    }
    if spec.item_prior || spec.item_counts {
        sum += item_prior(spec, p, item);
    }
    sum
}

/// An item's click prior ρ_a: from its click counts with [`ITEM_COUNTS_TABLE`], else the
/// learned one (0 for a model with neither table).
pub fn item_prior(spec: &ModelSpec, p: &impl Params, item: u64) -> f32 {
    if spec.item_counts {
        let mut r = [0.0f32; COUNTS_DIM];
        p.read(ITEM_COUNTS_TABLE, item, &mut r);
        return counts_prior(&r);
    }
    if !spec.item_prior {
        return 0.0;
    }
    let mut b = [0.0f32];
    p.read(ITEM_PRIOR_TABLE, item, &mut b);
    b[0]
}

/// The smoothed click rate of `clicks` in `shown` slots: [`COUNTS_WEIGHT`] slots of the
/// catalog rate `rate` added.
pub fn smoothed_rate(clicks: f32, shown: f32, rate: f32) -> f32 {
    (clicks.max(0.0) + COUNTS_WEIGHT * rate) / (shown.max(0.0) + COUNTS_WEIGHT)
}

/// The catalog rate a counts row was last smoothed with ([`COUNTS_PRIOR_RATE`] for a row
/// no step has written), within [10⁻⁴, 1] whatever a client pushed (a tiny rate would
/// make ρ overflow to infinity).
pub fn counts_rate(row: &[f32]) -> f32 {
    if row[4] > 0.0 {
        row[4].clamp(1e-4, 1.0)
    } else {
        COUNTS_PRIOR_RATE
    }
}

/// ρ_a from an item's counts row: ln of its long window's smoothed click rate over the
/// catalog rate (0 for an item never shown). Centred on the catalog rate, as the reward
/// model's base logit b_q is: a ρ of ln(rate / p₀) would add the same constant to every
/// item's reward logit until b_q had learned it away (the offline harness lost 0.07 of
/// the first window that way).
pub fn counts_prior(row: &[f32]) -> f32 {
    let rate = counts_rate(row);
    (smoothed_rate(row[0], row[1], rate) / rate).ln()
}

/// Σ over the query's terms of one cross row's weight each (`row` names the row of a term).
fn cross_sum(p: &impl Params, terms: &[u64], row: impl Fn(u64) -> u64) -> f32 {
    let mut w = [0.0f32];
    let mut sum = 0.0f32;
    for t in terms {
        p.read(CROSS_TABLE, row(*t), &mut w);
        sum += w[0];
    }
    sum
}

/// c(q, a): the mean over the query's terms of each term's cross rows with the item's id
/// and features (0 without a query or for a model without the cross table). Summed per
/// item id, then per feature (each over the terms), so that [`Scorer`] can read a
/// feature's sum once for every candidate that has it and still add the same numbers in
/// the same order.
pub fn query_cross(
    spec: &ModelSpec,
    p: &impl Params,
    terms: &[u64],
    item: u64,
    feature_ids: &[u64],
) -> f32 {
    if !spec.query_cross || terms.is_empty() {
        return 0.0;
    }
    let mut sum = cross_sum(p, terms, |t| query::item_cross_row(t, item));
    for f in feature_ids {
        sum += cross_sum(p, terms, |t| query::feature_cross_row(t, *f));
    }
    sum / terms.len() as f32
}

/// ℓ(q, a): the weight of a candidate's lexical match `level` ([`query::lexical_level`]):
/// its row plus the level's cold-start prior ([`query::lexical_prior`]); 0 for level 0 or
/// a model without the table.
pub fn lexical_weight(spec: &ModelSpec, p: &impl Params, level: u8) -> f32 {
    match query::lexical_row(level) {
        Some(row) if spec.lexical => {
            let mut w = [0.0f32];
            p.read(LEXICAL_TABLE, row, &mut w);
            w[0] + query::lexical_prior(level)
        }
        _ => 0.0,
    }
}

/// The policy logit of one candidate: u · v_a + β_a + c(q, a) + ℓ(q, a) (what Rank
/// samples from); `lexical` is the candidate's title match level under the user's query.
pub fn score(
    spec: &ModelSpec,
    p: &impl Params,
    user: &UserState,
    item: u64,
    feature_ids: &[u64],
    lexical: u8,
) -> f32 {
    Scorer::new(spec, p, user).score(item, feature_ids, lexical)
}

/// [`score`] for many candidates of one user at one version: what Rank, Recommend and
/// Search do once per call. Candidates share features (a brand, a category), so each
/// feature's row and its crosses with the query are read from the tables once per
/// Scorer, not once per candidate, and each level's weight once: with a two-word query
/// and two features, a candidate read 10 rows, now 4 (its row, its bias, its two
/// crosses; 5 with the item prior) plus its share of the features'. Equal to [`score`]
/// bit for bit (the same rows added in the same order). It keeps one row per distinct
/// feature it has seen: bounded by the call's candidates times their features, both
/// bounded by validation.
pub struct Scorer<'a, P> {
    spec: &'a ModelSpec,
    p: &'a P,
    user: &'a UserState,
    /// Feature id → its slot in `rows` (dim values each) and `crosses`.
    features: hashbrown::HashMap<u64, usize>,
    rows: Vec<f32>,
    /// Per feature slot: Σ over the query's terms of the (term, feature) cross weight.
    crosses: Vec<f32>,
    levels: [Option<f32>; query::LEXICAL_LEVELS as usize + 1],
    v: Vec<f32>,
    mean: Vec<f32>,
}

impl<'a, P: Params> Scorer<'a, P> {
    pub fn new(spec: &'a ModelSpec, p: &'a P, user: &'a UserState) -> Self {
        Scorer {
            spec,
            p,
            user,
            features: hashbrown::HashMap::new(),
            rows: Vec::new(),
            crosses: Vec::new(),
            levels: [None; query::LEXICAL_LEVELS as usize + 1],
            v: vec![0.0; spec.dim],
            mean: vec![0.0; spec.dim],
        }
    }

    pub fn user(&self) -> &'a UserState {
        self.user
    }

    fn crossed(&self) -> bool {
        self.spec.query_cross && !self.user.query.is_empty()
    }

    /// The slot of feature `f`, reading its row (and cross sum) on first sight.
    fn feature(&mut self, f: u64) -> usize {
        if let Some(&slot) = self.features.get(&f) {
            return slot;
        }
        let slot = self.crosses.len();
        let d = self.spec.dim;
        self.rows.resize((slot + 1) * d, 0.0);
        self.p
            .read(FEATURE_TABLE, f, &mut self.rows[slot * d..(slot + 1) * d]);
        let cross = if self.crossed() {
            cross_sum(self.p, &self.user.query, |t| query::feature_cross_row(t, f))
        } else {
            0.0
        };
        self.crosses.push(cross);
        self.features.insert(f, slot);
        slot
    }

    /// ℓ of `level`, read on first use.
    fn level_weight(&mut self, level: u8) -> f32 {
        let Some(cached) = self.levels.get_mut(usize::from(level)) else {
            return lexical_weight(self.spec, self.p, level);
        };
        *cached.get_or_insert_with(|| lexical_weight(self.spec, self.p, level))
    }

    /// The policy logit of (item, its feature ids, its title match `level`).
    pub fn score(&mut self, item: u64, feature_ids: &[u64], level: u8) -> f32 {
        self.p.read(ITEM_TABLE, item, &mut self.v);
        let bias = item_bias(self.spec, self.p, item);
        self.logit(item, bias, feature_ids, level)
    }

    /// [`Scorer::score`] from the item's own row r_a and its β_a + ρ_a (as [`item_bias`]
    /// adds them) where the caller already holds them (the gateway's item index keeps
    /// them side by side): the same bits, without reading the item's tables.
    ///
    /// # Panics
    /// If `row` is not the model's width.
    pub fn score_from(
        &mut self,
        item: u64,
        row: &[f32],
        bias: f32,
        feature_ids: &[u64],
        level: u8,
    ) -> f32 {
        assert_eq!(
            row.len(),
            self.spec.dim,
            "item {item}'s row is not the model's width"
        );
        self.v.copy_from_slice(row);
        self.logit(item, bias, feature_ids, level)
    }

    /// u · (r_a + mean_f F_f) + `bias` + c(q, a) + ℓ(q, a), with r_a already in `v`
    /// ([`item_vector`]'s arithmetic, then the terms added in this order).
    fn logit(&mut self, item: u64, bias: f32, feature_ids: &[u64], level: u8) -> f32 {
        let d = self.spec.dim;
        self.mean.fill(0.0);
        let crossed = self.crossed();
        let mut cross = 0.0f32;
        if crossed {
            cross = cross_sum(self.p, &self.user.query, |t| query::item_cross_row(t, item));
        }
        for f in feature_ids {
            let slot = self.feature(*f);
            for (o, r) in self
                .mean
                .iter_mut()
                .zip(&self.rows[slot * d..(slot + 1) * d])
            {
                *o += *r;
            }
            cross += self.crosses[slot];
        }
        if !feature_ids.is_empty() {
            let n = feature_ids.len() as f32;
            for o in self.mean.iter_mut() {
                *o /= n;
            }
        }
        for (a, b) in self.v.iter_mut().zip(&self.mean) {
            *a += *b;
        }
        let cross = if crossed {
            cross / self.user.query.len() as f32
        } else {
            0.0
        };
        dot(&self.user.u, &self.v) + bias + cross + self.level_weight(level)
    }
}

/// u · r with eight partial sums, which the compiler turns into SIMD ([`dot`] sums in
/// order, which it cannot). Retrieval and the approximate index only: the retrieved set
/// is then scored by Rank's own [`score`], so what a user is shown and its propensities
/// do not depend on this reassociation; only a near-tie at the retrieval boundary might.
pub fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let split = n - n % 8;
    let mut acc = [0.0f32; 8];
    for (x, y) in a[..split].chunks_exact(8).zip(b[..split].chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for k in split..n {
        sum += a[k] * b[k];
    }
    sum
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}

/// V(s) and Q(s, a) for one user state and item vector `v` (the critic heads, batch of 1).
fn heads_one(spec: &ModelSpec, p: &impl Params, user: &UserState, v: &[f32]) -> (f32, f32) {
    let d = spec.dim;
    let c = p.dense(CRITIC);
    let out = heads(
        spec,
        &tensor(&user.u, (1, d)),
        &tensor(v, (1, d)),
        &tensor(c, c.len()),
    );
    dense_ok(out.and_then(|(value, q)| Ok((value.to_vec1::<f32>()?[0], q.to_vec1::<f32>()?[0]))))
}

/// V(s): the critic's estimate of the expected reward of a user state.
pub fn value(spec: &ModelSpec, p: &impl Params, user: &UserState) -> f32 {
    heads_one(spec, p, user, &vec![0.0; spec.dim]).0
}

/// Q(s, a): the critic's reward logit for showing item vector `v` to `user`.
pub fn reward_logit(spec: &ModelSpec, p: &impl Params, user: &UserState, v: &[f32]) -> f32 {
    heads_one(spec, p, user, v).1
}

/// Below this spread of scores the candidates are treated as tied (sampled uniformly
/// apart from float noise) instead of dividing by a vanishing spread.
pub const SPREAD_MIN: f64 = 1e-6;

/// The softmax temperature in score units for one Rank: `relative` times the standard
/// deviation of the candidates' scores.
///
/// Exploration is set relative to the spread, not in score units, because the spread
/// drifts with training: on a replay of real traffic it fell from 0.33 to 0.03 as the
/// model saw one click per ~100 shown items, and a fixed temperature of 0.1 then served
/// nearly at random. In these units `relative` 0.2 puts the top-scored of 80–100
/// normally spread candidates in slot 1 about 65% of the time (ε 0.02), whatever the
/// model's scale; 0.1 about 80%, 0.5 about 27%. The spread is taken once over all
/// candidates, so every slot of the Rank samples at the same temperature and the
/// propensities stay exact.
pub fn relative_temperature(scores: &[f32], relative: f32) -> f32 {
    let n = scores.len().max(1) as f64;
    let mean = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / n;
    let var = scores
        .iter()
        .map(|&s| (f64::from(s) - mean).powi(2))
        .sum::<f64>()
        / n;
    (f64::from(relative) * var.sqrt().max(SPREAD_MIN)) as f32
}

/// One shown slot: the candidate index and its exact propensity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    pub index: usize,
    pub propensity: f64,
}

/// Samples `k` distinct candidates for slots 1..=k: at each slot, probability
/// (1 - epsilon) * softmax(score / temperature) + epsilon / remaining over the candidates
/// not shown yet (Plackett-Luce with an epsilon mix). Each slot's propensity is the
/// probability of its item given the earlier slots, under exactly this sampling.
/// `temperature` is in score units (Rank passes [`relative_temperature`]'s).
/// `uniform` yields numbers in [0, 1), one per slot.
pub fn sample_slots(
    scores: &[f32],
    k: usize,
    temperature: f32,
    epsilon: f32,
    mut uniform: impl FnMut() -> f64,
) -> Vec<Slot> {
    let mut remaining: Vec<usize> = (0..scores.len()).collect();
    let mut out = Vec::with_capacity(k);
    let t = f64::from(temperature);
    let eps = f64::from(epsilon);
    for _ in 0..k.min(scores.len()) {
        let max = remaining
            .iter()
            .map(|&i| f64::from(scores[i]))
            .fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = remaining
            .iter()
            .map(|&i| ((f64::from(scores[i]) - max) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let n = remaining.len() as f64;
        let probs: Vec<f64> = weights
            .iter()
            .map(|w| (1.0 - eps) * w / total + eps / n)
            .collect();
        let r = uniform();
        let mut acc = 0.0;
        let mut pick = remaining.len() - 1;
        for (j, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                pick = j;
                break;
            }
        }
        out.push(Slot {
            index: remaining[pick],
            propensity: probs[pick],
        });
        remaining.remove(pick);
    }
    out
}

pub mod ann;
pub mod config;
pub mod query;
mod retrieve;
mod train;

pub use retrieve::{top_by_score, Scored, TopN};

pub use train::{
    backward, backward_batch, counts_updates, history_updates, loss_fixed, prior_loss, Grads,
    Hyper, StepStats, TrainExample,
};

#[cfg(test)]
mod tests;
