//! The optimizer state of a convnet: one slot pair per parameter tensor,
//! updated by the shared Keras rules of [`crate::ml::optimizer`]. Unlike
//! the dense head's, no update is deferred: a convolution's gradient is
//! dense, so every weight moves every step.

use rayon::prelude::*;

use crate::ml::optimizer::{OptimizerSpec, Rule};

/// Elements per parallel update chunk; the rule is elementwise, so the
/// split changes nothing in the result.
const CHUNK: usize = 1 << 14;

#[derive(Debug, Clone)]
pub struct ConvOptimizer {
    spec: OptimizerSpec,
    iterations: u64,
    /// Per parameter tensor: (s1, s2), as `Rule::apply` takes them.
    slots: Vec<(Vec<f32>, Vec<f32>)>,
}

impl ConvOptimizer {
    pub fn new(spec: OptimizerSpec) -> ConvOptimizer {
        ConvOptimizer { spec, iterations: 0, slots: Vec::new() }
    }

    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// Steps taken (Keras's `optimizer.iterations`).
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// The slots per parameter tensor, in the model's tensor order (empty
    /// before the first step).
    pub fn slots(&self) -> &[(Vec<f32>, Vec<f32>)] {
        &self.slots
    }

    /// Puts back a state taken with [`ConvOptimizer::slots`] and
    /// [`ConvOptimizer::iterations`] (a checkpoint).
    pub fn restore(&mut self, iterations: u64, slots: Vec<(Vec<f32>, Vec<f32>)>) {
        self.iterations = iterations;
        self.slots = slots;
    }

    /// The rule of step `t` (1-based), as Keras resolves its scalars.
    pub fn rule(spec: &OptimizerSpec, t: u64) -> Rule {
        match *spec {
            OptimizerSpec::Rmsprop { learning_rate, rho, epsilon } => {
                Rule::Rmsprop { lr: learning_rate, rho, one_minus_rho: 1.0 - rho, eps: epsilon }
            }
            OptimizerSpec::Adam { learning_rate, beta_1, beta_2, epsilon } => {
                // Keras computes the bias correction in the variable's dtype.
                let t = t as i32;
                let alpha = learning_rate * (1.0 - beta_2.powi(t)).sqrt() / (1.0 - beta_1.powi(t));
                Rule::Adam { alpha, one_minus_b1: 1.0 - beta_1, one_minus_b2: 1.0 - beta_2, eps: epsilon }
            }
            OptimizerSpec::Sgd { learning_rate, momentum, nesterov } => {
                Rule::Sgd { lr: learning_rate, momentum, nesterov }
            }
        }
    }

    /// One step over every tensor: `params[i] -= update(grads[i])`.
    pub fn step(&mut self, params: &mut [&mut Vec<f32>], grads: &[Vec<f32>]) {
        if self.slots.len() != params.len() || self.slots.iter().zip(params.iter()).any(|(s, p)| s.0.len() != p.len()) {
            self.slots = params.iter().map(|p| (vec![0.0; p.len()], vec![0.0; p.len()])).collect();
        }
        self.iterations += 1;
        let rule = Self::rule(&self.spec, self.iterations);
        for ((w, g), (s1, s2)) in params.iter_mut().zip(grads).zip(&mut self.slots) {
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(s1.par_chunks_mut(CHUNK))
                .zip(s2.par_chunks_mut(CHUNK))
                .for_each(|(((w, g), s1), s2)| rule.apply(w, g, s1, s2, 0.0));
        }
    }
}
