//! Elementwise activations in Keras's names, forward and backward.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    Sigmoid,
    /// Only on the last layer, where it pairs with categorical cross-entropy.
    Softmax,
    Tanh,
    Linear,
}

pub fn activate(a: Activation, v: &mut [f32]) {
    match a {
        Activation::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        Activation::Sigmoid => v.iter_mut().for_each(|x| *x = sigmoid(*x)),
        Activation::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
        Activation::Linear | Activation::Softmax => {}
    }
}

/// Turns the gradient w.r.t. a layer's output into the gradient w.r.t. its
/// pre-activation, from the output `y` alone.
pub fn activation_backward(a: Activation, y: &[f32], d: &mut [f32]) {
    for (g, &y) in d.iter_mut().zip(y) {
        *g = match a {
            Activation::Relu => {
                if y > 0.0 {
                    *g
                } else {
                    0.0
                }
            }
            Activation::Sigmoid => *g * (y * (1.0 - y)),
            Activation::Tanh => *g * (1.0 - y * y),
            Activation::Linear | Activation::Softmax => *g,
        };
    }
}

pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}
