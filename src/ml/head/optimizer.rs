//! The head's optimizer: a Keras optimizer spec and its slots, laid out like
//! the head's kernel panels so that RMSprop can defer the decay of idle rows.

use super::HeadError;
use super::aligned::AlignedVec;
use crate::ml::optimizer::{OptimizerSpec, Rule};

/// An optimizer and its slots. The slots are shaped on the first step to the
/// head it is used with; using it with another head is an error.
#[derive(Debug, Clone)]
pub struct Optimizer {
    pub(super) spec: OptimizerSpec,
    pub(super) iterations: u64,
    /// Per parameter tensor (kernel, bias of each Dense in order).
    pub(super) slots: Vec<Slots>,
    /// Whether RMSprop may defer the decay of kernel rows with no gradient
    /// (see [`Slots::stamps`]); off only in tests, to check it against the
    /// plain update.
    pub(super) lazy: bool,
}

/// One parameter tensor's optimizer state, laid out like the tensor.
#[derive(Debug, Clone, Default)]
pub(super) struct Slots {
    /// RMSprop: velocity; Adam: m; SGD: momentum.
    pub(super) s1: AlignedVec,
    /// Adam: v; empty otherwise.
    pub(super) s2: AlignedVec,
    /// Kernels only, one per panel row (see [`Panel`]): the step up to which
    /// that row of `s1` is current. RMSprop with a zero gradient leaves the
    /// weights as they are and only multiplies the velocity by `rho`, so a
    /// row whose input column is all zeros in a batch is skipped (no memory
    /// traffic) and its owed `rho` factors are applied when a gradient next
    /// reaches it. The velocity is read nowhere else, and the weights are
    /// exact at every step.
    pub(super) stamps: Vec<u64>,
}

impl Optimizer {
    pub fn new(spec: OptimizerSpec) -> Optimizer {
        Optimizer { spec, iterations: 0, slots: Vec::new(), lazy: true }
    }

    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// Steps taken so far (Keras's `optimizer.iterations`).
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// `sizes`: each parameter tensor's length and how many stamped rows it has.
    pub(super) fn ensure_slots(&mut self, sizes: &[(usize, usize)]) -> Result<(), HeadError> {
        if self.slots.is_empty() {
            let two = matches!(self.spec, OptimizerSpec::Adam { .. });
            self.slots = sizes
                .iter()
                .map(|&(n, rows)| Slots {
                    s1: AlignedVec::zeros(n),
                    s2: AlignedVec::zeros(if two { n } else { 0 }),
                    stamps: vec![0; rows],
                })
                .collect();
            return Ok(());
        }
        if self.slots.len() != sizes.len()
            || self.slots.iter().zip(sizes).any(|(s, &(n, rows))| s.s1.len() != n || s.stamps.len() != rows)
        {
            return Err(HeadError::Shape("this optimizer's slots belong to a head of another shape".into()));
        }
        Ok(())
    }

    /// The scalars of the coming step (`iterations` counts it).
    pub(super) fn next_rule(&mut self) -> Rule {
        self.iterations += 1;
        match self.spec {
            OptimizerSpec::Rmsprop { learning_rate, rho, epsilon } => {
                Rule::Rmsprop { lr: learning_rate, rho, one_minus_rho: 1.0 - rho, eps: epsilon }
            }
            OptimizerSpec::Adam { learning_rate, beta_1, beta_2, epsilon } => {
                // Keras computes the bias correction in the variable's dtype.
                let t = self.iterations as i32;
                let alpha = learning_rate * (1.0 - beta_2.powi(t)).sqrt() / (1.0 - beta_1.powi(t));
                Rule::Adam { alpha, one_minus_b1: 1.0 - beta_1, one_minus_b2: 1.0 - beta_2, eps: epsilon }
            }
            OptimizerSpec::Sgd { learning_rate, momentum, nesterov } => {
                Rule::Sgd { lr: learning_rate, momentum, nesterov }
            }
        }
    }
}
