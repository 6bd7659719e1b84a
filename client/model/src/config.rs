//! The model's part of a cluster config file, in its config form: the `model` section and
//! the `tables` (optimizers with their hyper-parameters). The PS stores them in the meta
//! group at bootstrap; `freshet up` and the tools write them from these same types, and
//! every default is the model's own.

use freshet_proto::ps::v1::{
    optimizer_config, AdagradConfig, AdamConfig, CountsConfig, FtrlConfig, ModelConfig,
    OptimizerConfig, SgdConfig, TableKind, TableSpec,
};
use freshet_proto::FieldError;
use serde::{Deserialize, Serialize};

/// Largest importance-weight cap and loss weight a model spec takes (larger is a typo, and
/// would turn one example's gradient into a step of its own).
pub const LOSS_WEIGHT_MAX: f32 = 10_000.0;

/// Checks a model spec's loss weights; the error names `model.<field>`.
pub fn check_loss_weights(m: &ModelConfig) -> Result<(), FieldError> {
    if !(m.clip.is_finite() && m.clip > 0.0 && m.clip <= LOSS_WEIGHT_MAX) {
        return Err(FieldError::new(
            "model.clip",
            format!("must be finite, > 0 and <= {LOSS_WEIGHT_MAX}"),
        ));
    }
    for (name, v) in [
        ("model.policy_weight", m.actor_weight()),
        ("model.entropy", m.entropy),
        ("model.value_weight", m.value_weight),
        ("model.reward_weight", m.reward_weight),
        ("model.choice_weight", m.choice_weight),
    ] {
        if !(v.is_finite() && (0.0..=LOSS_WEIGHT_MAX).contains(&v)) {
            return Err(FieldError::new(
                name,
                format!("must be finite, >= 0 and <= {LOSS_WEIGHT_MAX}"),
            ));
        }
    }
    Ok(())
}

/// An optimizer and its hyper-parameters, as written in config files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    Sgd {
        lr: f32,
    },
    Adagrad {
        lr: f32,
        #[serde(default)]
        initial_accumulator: f32,
        #[serde(default = "default_eps")]
        eps: f32,
    },
    Adam {
        lr: f32,
        #[serde(default = "default_beta1")]
        beta1: f32,
        #[serde(default = "default_beta2")]
        beta2: f32,
        #[serde(default = "default_eps")]
        eps: f32,
        /// After each update the row shrinks towards 0 by this fraction (AdamW's
        /// decoupled decay; 0: none).
        #[serde(default)]
        weight_decay: f32,
    },
    Ftrl {
        alpha: f32,
        #[serde(default = "default_one")]
        beta: f32,
        #[serde(default)]
        l1: f32,
        #[serde(default)]
        l2: f32,
    },
    /// Click counts over a long and a short window (`freshet.ps.v1.CountsConfig`).
    Counts {
        forget: f32,
    },
}

fn default_eps() -> f32 {
    1e-8
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_one() -> f32 {
    1.0
}

impl OptimizerSpec {
    pub fn to_proto(&self) -> OptimizerConfig {
        use optimizer_config::Kind;
        let kind = match *self {
            OptimizerSpec::Sgd { lr } => Kind::Sgd(SgdConfig { lr }),
            OptimizerSpec::Adagrad {
                lr,
                initial_accumulator,
                eps,
            } => Kind::Adagrad(AdagradConfig {
                lr,
                initial_accumulator,
                eps,
            }),
            OptimizerSpec::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => Kind::Adam(AdamConfig {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            }),
            OptimizerSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => Kind::Ftrl(FtrlConfig {
                alpha,
                beta,
                l1,
                l2,
            }),
            OptimizerSpec::Counts { forget } => Kind::Counts(CountsConfig { forget }),
        };
        OptimizerConfig { kind: Some(kind) }
    }
}

/// A table created when the cluster is bootstrapped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub name: String,
    #[serde(default)]
    pub dense: bool,
    pub dim: u32,
    pub optimizer: OptimizerSpec,
    #[serde(default = "default_init_scale")]
    pub init_scale: f32,
    #[serde(default)]
    pub seed: u64,
    /// Bounded memory for an unbounded id space (absent: rows are kept forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<RowLimitsConfig>,
}

/// When a table's rows are removed (`freshet.ps.v1.RowLimits`): 0 turns a bound off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowLimitsConfig {
    #[serde(default)]
    pub ttl_ms: u64,
    #[serde(default)]
    pub rows_max: u64,
    /// Admission: an id becomes a row at its admit_after-th gradient within
    /// admit_window_ms of sealed time (0: every id at its first).
    #[serde(default)]
    pub admit_after: u32,
    #[serde(default)]
    pub admit_window_ms: u64,
    /// In a change: turns the table's limits off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub off: bool,
}

fn default_init_scale() -> f32 {
    0.01
}

impl TableConfig {
    /// The config form of a table spec (None when it has no valid optimizer).
    pub fn from_spec(spec: &TableSpec) -> Option<Self> {
        use optimizer_config::Kind;
        let optimizer = match spec.optimizer.as_ref()?.kind.as_ref()? {
            Kind::Sgd(c) => OptimizerSpec::Sgd { lr: c.lr },
            Kind::Adagrad(c) => OptimizerSpec::Adagrad {
                lr: c.lr,
                initial_accumulator: c.initial_accumulator,
                eps: c.eps,
            },
            Kind::Adam(c) => OptimizerSpec::Adam {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
            },
            Kind::Ftrl(c) => OptimizerSpec::Ftrl {
                alpha: c.alpha,
                beta: c.beta,
                l1: c.l1,
                l2: c.l2,
            },
            Kind::Counts(c) => OptimizerSpec::Counts { forget: c.forget },
        };
        Some(TableConfig {
            name: spec.name.clone(),
            dense: spec.kind == TableKind::Dense as i32,
            dim: spec.dim,
            optimizer,
            init_scale: spec.init_scale,
            seed: spec.seed,
            limits: spec.limits.map(|l| RowLimitsConfig {
                ttl_ms: l.ttl_ms,
                rows_max: l.rows_max,
                admit_after: l.admit_after,
                admit_window_ms: l.admit_window_ms,
                off: l.off,
            }),
        })
    }

    pub fn to_spec(&self) -> TableSpec {
        TableSpec {
            name: self.name.clone(),
            kind: if self.dense {
                TableKind::Dense as i32
            } else {
                TableKind::Sparse as i32
            },
            dim: self.dim,
            optimizer: Some(self.optimizer.to_proto()),
            init_scale: self.init_scale,
            seed: self.seed,
            limits: self.limits.map(|l| freshet_proto::ps::v1::RowLimits {
                ttl_ms: l.ttl_ms,
                rows_max: l.rows_max,
                admit_after: l.admit_after,
                admit_window_ms: l.admit_window_ms,
                off: l.off,
            }),
        }
    }
}

/// The model section of a cluster config: stored in the meta group at bootstrap, with the
/// config's `tables`, as the cluster's [`ModelConfig`]. Which shapes a model accepts is
/// the model's business (`ModelSpec::from_config` checks them); this checks that values are sane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub dim: u32,
    #[serde(default = "default_tower")]
    pub tower: String,
    #[serde(default = "default_numeric_max")]
    pub numeric_max: u32,
    /// The actor's loss weight (`crate::Hyper::policy_weight` says why 0.1).
    #[serde(default = "default_policy_weight")]
    pub policy_weight: f32,
    #[serde(default = "default_clip")]
    pub clip: f32,
    #[serde(default = "default_entropy")]
    pub entropy: f32,
    #[serde(default = "default_value_weight")]
    pub value_weight: f32,
    #[serde(default = "default_reward_weight")]
    pub reward_weight: f32,
    #[serde(default = "default_choice_weight")]
    pub choice_weight: f32,
}

// The model's defaults live in freshet-model, once; a config section that leaves a field
// out gets the value the model itself would pick.
fn default_tower() -> String {
    crate::TOWER_KIND.into()
}
fn default_numeric_max() -> u32 {
    crate::NUMERIC_MAX as u32
}
fn default_policy_weight() -> f32 {
    crate::Hyper::default().policy_weight
}
fn default_clip() -> f32 {
    crate::Hyper::default().clip
}
fn default_entropy() -> f32 {
    crate::Hyper::default().entropy
}
fn default_value_weight() -> f32 {
    crate::Hyper::default().value_weight
}
fn default_reward_weight() -> f32 {
    crate::Hyper::default().reward_weight
}
fn default_choice_weight() -> f32 {
    crate::Hyper::default().choice_weight
}

impl ModelSection {
    /// The section for a model spec and its loss weights (what `freshet up` writes).
    pub fn new(spec: &crate::ModelSpec, h: &crate::Hyper) -> Self {
        ModelSection {
            dim: spec.dim as u32,
            tower: crate::TOWER_KIND.into(),
            numeric_max: crate::NUMERIC_MAX as u32,
            policy_weight: h.policy_weight,
            clip: h.clip,
            entropy: h.entropy,
            value_weight: h.value_weight,
            reward_weight: h.reward_weight,
            choice_weight: h.choice_weight,
        }
    }

    /// # Errors
    /// The bad field, named `model.<field>`.
    pub fn validate(&self) -> Result<(), FieldError> {
        if !(1..=4096).contains(&self.dim) {
            return Err(FieldError::new("model.dim", "must be 1..=4096"));
        }
        if self.tower.is_empty() || self.tower.len() > 64 {
            return Err(FieldError::new("model.tower", "must be 1..=64 bytes"));
        }
        if self.numeric_max > 1024 {
            return Err(FieldError::new("model.numeric_max", "at most 1024"));
        }
        check_loss_weights(&self.to_proto(&[]))
    }

    /// The meta group's record: this section plus the cluster's tables.
    pub fn to_proto(&self, tables: &[TableConfig]) -> ModelConfig {
        ModelConfig {
            dim: self.dim,
            tower: self.tower.clone(),
            numeric_max: self.numeric_max,
            clip: self.clip,
            entropy: self.entropy,
            value_weight: self.value_weight,
            reward_weight: self.reward_weight,
            tables: tables.iter().map(TableConfig::to_spec).collect(),
            revision: 0,
            policy_weight: Some(self.policy_weight),
            choice_weight: self.choice_weight,
        }
    }
}
