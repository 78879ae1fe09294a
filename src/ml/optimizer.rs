//! Keras's optimizers as a config names them (`OptimizerSpec`) and their
//! update rules with one step's scalars resolved (`Rule`). Shared by every
//! trainer: the dense head keeps its slots in its own panel layout, a convnet
//! in plain tensors; both call [`Rule::apply`] on slices.

use serde::{Deserialize, Serialize};

/// An optimizer as a stage config writes it, with Keras's defaults:
/// `{name: rmsprop, learning_rate: 2e-5}` (`lr` is accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    Rmsprop {
        #[serde(default = "default_lr", alias = "lr")]
        learning_rate: f32,
        #[serde(default = "default_rho")]
        rho: f32,
        #[serde(default = "default_epsilon")]
        epsilon: f32,
    },
    Adam {
        #[serde(default = "default_lr", alias = "lr")]
        learning_rate: f32,
        #[serde(default = "default_beta_1")]
        beta_1: f32,
        #[serde(default = "default_beta_2")]
        beta_2: f32,
        #[serde(default = "default_epsilon")]
        epsilon: f32,
    },
    Sgd {
        #[serde(default = "default_sgd_lr", alias = "lr")]
        learning_rate: f32,
        #[serde(default)]
        momentum: f32,
        #[serde(default)]
        nesterov: bool,
    },
}

fn default_lr() -> f32 {
    1e-3
}
fn default_sgd_lr() -> f32 {
    1e-2
}
fn default_rho() -> f32 {
    0.9
}
fn default_beta_1() -> f32 {
    0.9
}
fn default_beta_2() -> f32 {
    0.999
}
fn default_epsilon() -> f32 {
    1e-7
}

impl OptimizerSpec {
    pub fn rmsprop(learning_rate: f32) -> OptimizerSpec {
        OptimizerSpec::Rmsprop { learning_rate, rho: default_rho(), epsilon: default_epsilon() }
    }

    pub fn adam(learning_rate: f32) -> OptimizerSpec {
        OptimizerSpec::Adam {
            learning_rate,
            beta_1: default_beta_1(),
            beta_2: default_beta_2(),
            epsilon: default_epsilon(),
        }
    }

    pub fn sgd(learning_rate: f32, momentum: f32, nesterov: bool) -> OptimizerSpec {
        OptimizerSpec::Sgd { learning_rate, momentum, nesterov }
    }
}

/// One step's update rule with its scalars resolved.
#[derive(Debug, Clone, Copy)]
pub enum Rule {
    Rmsprop { lr: f32, rho: f32, one_minus_rho: f32, eps: f32 },
    Adam { alpha: f32, one_minus_b1: f32, one_minus_b2: f32, eps: f32 },
    Sgd { lr: f32, momentum: f32, nesterov: bool },
}

impl Rule {
    /// Applies the rule elementwise to `w` with gradient `g + l2x2 * w`.
    /// Same formulas and operation order as Keras 3 (`keras/optimizers/*.py`).
    #[inline(always)]
    pub fn apply(&self, w: &mut [f32], g: &[f32], s1: &mut [f32], s2: &mut [f32], l2x2: f32) {
        if l2x2 != 0.0 {
            self.apply_impl::<true>(w, g, s1, s2, l2x2)
        } else {
            self.apply_impl::<false>(w, g, s1, s2, 0.0)
        }
    }

    #[inline(always)]
    fn apply_impl<const L2: bool>(&self, w: &mut [f32], g: &[f32], s1: &mut [f32], s2: &mut [f32], l2x2: f32) {
        let n = w.len();
        let g = &g[..n];
        match *self {
            Rule::Rmsprop { lr, rho, one_minus_rho, eps } => {
                let v = &mut s1[..n];
                for j in 0..n {
                    let gj = if L2 { g[j] + l2x2 * w[j] } else { g[j] };
                    let vj = flush_velocity(rho * v[j] + one_minus_rho * (gj * gj));
                    v[j] = vj;
                    w[j] -= lr * gj / (vj + eps).sqrt();
                }
            }
            Rule::Adam { alpha, one_minus_b1, one_minus_b2, eps } => {
                let m = &mut s1[..n];
                let v = &mut s2[..n];
                for j in 0..n {
                    let gj = if L2 { g[j] + l2x2 * w[j] } else { g[j] };
                    let mj = m[j] + (gj - m[j]) * one_minus_b1;
                    let vj = v[j] + (gj * gj - v[j]) * one_minus_b2;
                    m[j] = mj;
                    v[j] = vj;
                    w[j] -= mj * alpha / (vj.sqrt() + eps);
                }
            }
            Rule::Sgd { lr, momentum, nesterov } => {
                if momentum == 0.0 {
                    for j in 0..n {
                        let gj = if L2 { g[j] + l2x2 * w[j] } else { g[j] };
                        w[j] -= gj * lr;
                    }
                    return;
                }
                let m = &mut s1[..n];
                for j in 0..n {
                    let gj = if L2 { g[j] + l2x2 * w[j] } else { g[j] };
                    let mj = m[j] * momentum - gj * lr;
                    m[j] = mj;
                    w[j] += if nesterov { mj * momentum - gj * lr } else { mj };
                }
            }
        }
    }

    /// RMSprop's `rho`: with a zero gradient (and no L2 term) its update
    /// leaves `w` as it is (`w -= lr * 0 / ...`) and only does `v *= rho`,
    /// which can be deferred.
    pub fn deferrable_decay(&self) -> Option<f32> {
        match *self {
            Rule::Rmsprop { rho, .. } => Some(rho),
            _ => None,
        }
    }
}

/// Applies `steps` deferred zero-gradient RMSprop updates to a velocity row:
/// `v *= rho` once per step, flushed as [`flush_velocity`] says, as the
/// plain update would have done it (a single `v * rho.powi(steps)` would
/// round differently).
#[inline(always)]
pub fn decay(v: &mut [f32], rho: f32, steps: u64) {
    for i in 0..steps {
        if i % 8 == 0 && v.iter().all(|&x| x == 0.0) {
            return;
        }
        for x in v.iter_mut() {
            *x = flush_velocity(*x * rho);
        }
    }
}

/// A velocity below the smallest normal float is stored as 0, as TensorFlow's
/// CPU kernels (which run with subnormals flushed) leave it. Arithmetic on
/// subnormals is slow here (a quarter of the update's time, from the rows that
/// go idle and decay), and it never reaches the weights: the update divides
/// by `sqrt(v + eps)`, and `v + eps` rounds to `eps` for any `v` that small.
#[inline(always)]
pub fn flush_velocity(v: f32) -> f32 {
    if v < f32::MIN_POSITIVE { 0.0 } else { v }
}
