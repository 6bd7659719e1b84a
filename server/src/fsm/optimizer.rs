//! Per-row optimizers (SGD, Adagrad, Adam, FTRL, and click counts) with validated
//! hyper-parameters, and the checks on a table spec and on a change of a running table's
//! optimizer.

use freshet_proto::ps::v1::{optimizer_config, OptimizerConfig, TableKind, TableSpec};

use super::{DENSE_LEN_MAX, DIM_MAX, TABLE_NAME_BYTES_MAX};
use freshet_proto::FieldError;

/// An optimizer with validated hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    Sgd {
        lr: f32,
    },
    Adagrad {
        lr: f32,
        initial_accumulator: f32,
        eps: f32,
    },
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
    Ftrl {
        alpha: f32,
        beta: f32,
        l1: f32,
        l2: f32,
    },
    /// Rows of click counts over a long and a short window (`freshet.ps.v1.CountsConfig`).
    Counts {
        forget: f32,
    },
}

/// Width of a counts row: long clicks, long shown, short clicks, short shown, rate.
pub const COUNTS_DIM: usize = 5;

/// Shown slots past which a counts row's long window halves (2^20, far below the 2^24 at
/// which an f32 count stops taking +1).
pub const COUNTS_LONG_MAX: f32 = 1_048_576.0;

/// `base^n` by squaring, in f32 multiplications only (every replica computes the same
/// bits, which `powf` does not promise across platforms).
fn pow_f32(base: f32, mut n: u64) -> f32 {
    let (mut acc, mut b) = (1.0f32, base);
    while n > 0 {
        if n & 1 == 1 {
            acc *= b;
        }
        b *= b;
        n >>= 1;
    }
    acc
}

impl Optimizer {
    /// Validates an optimizer config; `field` prefixes the error's field name.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the bad hyper-parameter.
    pub fn from_proto(cfg: Option<&OptimizerConfig>, field: &str) -> Result<Self, FieldError> {
        let finite_pos = |v: f32, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(FieldError::new(
                    format!("{field}.{name}"),
                    "must be finite and > 0",
                ))
            }
        };
        let finite_nonneg = |v: f32, name: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(FieldError::new(
                    format!("{field}.{name}"),
                    "must be finite and >= 0",
                ))
            }
        };
        let unit = |v: f32, name: &str| {
            if v.is_finite() && (0.0..1.0).contains(&v) {
                Ok(v)
            } else {
                Err(FieldError::new(
                    format!("{field}.{name}"),
                    "must be in [0, 1)",
                ))
            }
        };
        let Some(kind) = cfg.and_then(|c| c.kind.as_ref()) else {
            return Err(FieldError::new(field, "an optimizer is required"));
        };
        Ok(match kind {
            optimizer_config::Kind::Sgd(c) => Optimizer::Sgd {
                lr: finite_pos(c.lr, "sgd.lr")?,
            },
            optimizer_config::Kind::Adagrad(c) => Optimizer::Adagrad {
                lr: finite_pos(c.lr, "adagrad.lr")?,
                initial_accumulator: finite_nonneg(
                    c.initial_accumulator,
                    "adagrad.initial_accumulator",
                )?,
                eps: finite_pos(if c.eps == 0.0 { 1e-8 } else { c.eps }, "adagrad.eps")?,
            },
            optimizer_config::Kind::Adam(c) => Optimizer::Adam {
                lr: finite_pos(c.lr, "adam.lr")?,
                beta1: unit(c.beta1, "adam.beta1")?,
                beta2: unit(c.beta2, "adam.beta2")?,
                eps: finite_pos(if c.eps == 0.0 { 1e-8 } else { c.eps }, "adam.eps")?,
                weight_decay: unit(c.weight_decay, "adam.weight_decay")?,
            },
            optimizer_config::Kind::Ftrl(c) => Optimizer::Ftrl {
                alpha: finite_pos(c.alpha, "ftrl.alpha")?,
                beta: finite_nonneg(c.beta, "ftrl.beta")?,
                l1: finite_nonneg(c.l1, "ftrl.l1")?,
                l2: finite_nonneg(c.l2, "ftrl.l2")?,
            },
            optimizer_config::Kind::Counts(c) => Optimizer::Counts {
                forget: unit(c.forget, "counts.forget")?,
            },
        })
    }

    /// Optimizer slots stored after the `dim` values of a row.
    pub fn state_len(&self, dim: usize) -> usize {
        match self {
            Optimizer::Sgd { .. } => 0,
            Optimizer::Adagrad { .. } => dim,
            // m, v, then beta1^t and beta2^t.
            Optimizer::Adam { .. } => 2 * dim + 2,
            // z, n.
            Optimizer::Ftrl { .. } => 2 * dim,
            Optimizer::Counts { .. } => 0,
        }
    }

    /// A new row's optimizer slots (`state_len` of them).
    pub fn init_state(&self, state: &mut [f32]) {
        match *self {
            Optimizer::Sgd { .. } => {}
            Optimizer::Adagrad {
                initial_accumulator,
                ..
            } => state.fill(initial_accumulator),
            Optimizer::Adam { .. } => {
                let n = state.len();
                state.fill(0.0);
                state[n - 2] = 1.0;
                state[n - 1] = 1.0;
            }
            Optimizer::Ftrl { .. } => state.fill(0.0),
            Optimizer::Counts { .. } => {}
        }
    }

    /// One optimizer step on one row. Coordinates are visited in index order with f32
    /// arithmetic only, so every replica computes the same bits.
    pub fn apply(&self, w: &mut [f32], state: &mut [f32], g: &[f32]) {
        let dim = w.len();
        match *self {
            Optimizer::Sgd { lr } => {
                for j in 0..dim {
                    w[j] -= lr * g[j];
                }
            }
            Optimizer::Adagrad { lr, eps, .. } => {
                for j in 0..dim {
                    state[j] += g[j] * g[j];
                    w[j] -= lr * g[j] / (state[j].sqrt() + eps);
                }
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let (mv, powers) = state.split_at_mut(2 * dim);
                let (m, v) = mv.split_at_mut(dim);
                powers[0] *= beta1;
                powers[1] *= beta2;
                let c1 = 1.0 - powers[0];
                let c2 = 1.0 - powers[1];
                for j in 0..dim {
                    m[j] = beta1 * m[j] + (1.0 - beta1) * g[j];
                    v[j] = beta2 * v[j] + (1.0 - beta2) * g[j] * g[j];
                    let m_hat = m[j] / c1;
                    let v_hat = v[j] / c2;
                    w[j] -= lr * m_hat / (v_hat.sqrt() + eps);
                    w[j] *= 1.0 - weight_decay;
                }
            }
            Optimizer::Counts { forget } => {
                // Validated on push: 5 values, all >= 0.
                let keep = pow_f32(1.0 - forget, g[2] as u64);
                w[2] = w[2] * keep + g[0];
                w[3] = w[3] * keep + g[1];
                if g[3] > 0.0 {
                    w[0] = w[2];
                    w[1] = w[3];
                } else {
                    w[0] += g[0];
                    w[1] += g[1];
                }
                // An f32 count stops taking +1 at 2^24: past 2^20 shown slots the long
                // window halves (its rate unchanged), so a steady catalog never freezes.
                if w[1] > COUNTS_LONG_MAX {
                    w[0] *= 0.5;
                    w[1] *= 0.5;
                }
                // The rate is set, not added: the passed-weighted mean of the rates in
                // this push (a sum of passed · rate over its parts), so steps that read
                // the same row and push at once cannot overshoot it.
                if g[2] > 0.0 {
                    w[4] = g[4] / g[2];
                }
            }
            Optimizer::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                // FTRL-Proximal (McMahan et al. 2013), per coordinate.
                let (z, n) = state.split_at_mut(dim);
                for j in 0..dim {
                    let n_new = n[j] + g[j] * g[j];
                    let sigma = (n_new.sqrt() - n[j].sqrt()) / alpha;
                    z[j] += g[j] - sigma * w[j];
                    n[j] = n_new;
                    w[j] = if z[j].abs() <= l1 {
                        0.0
                    } else {
                        -(z[j] - z[j].signum() * l1) / ((beta + n[j].sqrt()) / alpha + l2)
                    };
                }
            }
        }
    }
}

/// Validates a table spec once, at the edge and again on apply.
///
/// # Errors
/// INVALID_ARGUMENT naming the field.
pub fn validate_spec(spec: &TableSpec) -> Result<Optimizer, FieldError> {
    if spec.name.is_empty() || spec.name.len() > TABLE_NAME_BYTES_MAX {
        return Err(FieldError::new(
            "spec.name",
            format!("must be 1..={TABLE_NAME_BYTES_MAX} bytes"),
        ));
    }
    if !spec
        .name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(FieldError::new("spec.name", "use [A-Za-z0-9_.-] only"));
    }
    let kind = TableKind::try_from(spec.kind)
        .map_err(|_| FieldError::new("spec.kind", format!("unknown kind {}", spec.kind)))?;
    let max = match kind {
        TableKind::Sparse => DIM_MAX,
        TableKind::Dense => DENSE_LEN_MAX,
    };
    if spec.dim == 0 || spec.dim > max {
        return Err(FieldError::new("spec.dim", format!("must be 1..={max}")));
    }
    if !spec.init_scale.is_finite() || spec.init_scale < 0.0 {
        return Err(FieldError::new(
            "spec.init_scale",
            "must be finite and >= 0",
        ));
    }
    validate_limits(spec, "spec.limits")?;
    let opt = Optimizer::from_proto(spec.optimizer.as_ref(), "spec.optimizer")?;
    if matches!(opt, Optimizer::Counts { .. })
        && (kind != TableKind::Sparse || spec.dim as usize != COUNTS_DIM || spec.init_scale != 0.0)
    {
        return Err(FieldError::new(
            "spec.optimizer.counts",
            format!("a counts table is sparse with dim {COUNTS_DIM} and init_scale 0"),
        ));
    }
    Ok(opt)
}

/// Longest row time to live (ten years).
pub const ROW_TTL_MS_MAX: u64 = 10 * 365 * 24 * 3_600_000;

/// Most sightings admission may ask for (sketch counters are u16; far below that, an
/// id this rare is better never stored).
pub const ADMIT_AFTER_MAX: u32 = 1000;

/// Checks a table's [`RowLimits`](freshet_proto::ps::v1::RowLimits); `field` names them.
///
/// # Errors
/// The field that breaks a rule.
pub fn validate_limits(spec: &TableSpec, field: &str) -> Result<(), FieldError> {
    let Some(l) = &spec.limits else {
        return Ok(());
    };
    if spec.kind == TableKind::Dense as i32 {
        return Err(FieldError::new(
            field,
            "a dense tensor is one row: it takes no row limits",
        ));
    }
    if l.off {
        if l.ttl_ms != 0 || l.rows_max != 0 || l.admit_after != 0 || l.admit_window_ms != 0 {
            return Err(FieldError::new(
                format!("{field}.off"),
                "turns every limit off: give no other limit with it",
            ));
        }
        return Ok(());
    }
    if l.admit_after > ADMIT_AFTER_MAX {
        return Err(FieldError::new(
            format!("{field}.admit_after"),
            format!("must be 0..={ADMIT_AFTER_MAX} (0 or 1: every id at its first gradient)"),
        ));
    }
    if l.admit_after >= 2 && !(1000..=ROW_TTL_MS_MAX).contains(&l.admit_window_ms) {
        return Err(FieldError::new(
            format!("{field}.admit_window_ms"),
            format!("must be 1000..={ROW_TTL_MS_MAX} when admit_after is 2 or more"),
        ));
    }
    if l.admit_after < 2 && l.admit_window_ms != 0 {
        return Err(FieldError::new(
            format!("{field}.admit_window_ms"),
            "a window needs admit_after 2 or more",
        ));
    }
    if l.ttl_ms == 0 && l.rows_max == 0 && l.admit_after < 2 {
        return Err(FieldError::new(
            field,
            "set ttl_ms, rows_max or admit_after (or leave limits out for an unbounded table)",
        ));
    }
    if l.ttl_ms != 0 && !(1000..=ROW_TTL_MS_MAX).contains(&l.ttl_ms) {
        return Err(FieldError::new(
            format!("{field}.ttl_ms"),
            format!("must be 0 (no expiry) or 1000..={ROW_TTL_MS_MAX}"),
        ));
    }
    let max = super::ROWS_PER_TABLE_MAX as u64;
    if l.rows_max != 0 && !(8..=max).contains(&l.rows_max) {
        return Err(FieldError::new(
            format!("{field}.rows_max"),
            format!("must be 0 (no cap) or 8..={max}"),
        ));
    }
    Ok(())
}

/// Checks that `new` only changes `cur`'s optimizer hyper-parameters (what a running
/// table can take: its rows' layout, their initialiser and the optimizer's slots stay as
/// they are) and validates them. The error names the field under `spec`.
pub fn check_optimizer_update(cur: &TableSpec, new: &TableSpec) -> Result<Optimizer, FieldError> {
    let fixed = |field: &str| {
        Err(FieldError::new(
            field,
            format!(
                "fixed when table {:?} was created; only the optimizer's hyper-parameters \
                 change on a running table",
                cur.name
            ),
        ))
    };
    if new.name != cur.name {
        return fixed("name");
    }
    if new.kind != cur.kind {
        return fixed("kind");
    }
    if new.dim != cur.dim {
        return fixed("dim");
    }
    if new.init_scale.to_bits() != cur.init_scale.to_bits() {
        return fixed("init_scale");
    }
    if new.seed != cur.seed {
        return fixed("seed");
    }
    let kind = |t: &TableSpec| {
        t.optimizer
            .as_ref()
            .and_then(|o| o.kind.as_ref())
            .map(std::mem::discriminant)
    };
    validate_limits(new, "limits")?;
    if kind(new) != kind(cur) {
        return Err(FieldError::new(
            "optimizer",
            "the optimizer kind is fixed when the table is created (its slots are stored \
             with every row); change its hyper-parameters only",
        ));
    }
    Optimizer::from_proto(new.optimizer.as_ref(), "optimizer")
}
