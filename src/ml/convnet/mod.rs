//! Trainable convolutional networks, written on `gemm` (see
//! `benches/convnet.rs` for why this and not a framework): the layers of
//! *Deep Learning with Python*'s chapter 5 in Keras's names, defaults and
//! NHWC order, so weights and flatten order line up with Keras's.
//!
//! - [`spec`]: the layer list of a pipeline file, its shapes and `summary`.
//! - [`conv2d`], [`pooling`], [`dropout`]: one layer each, forward and backward;
//!   [`winograd`]: the 3x3 convolutions with many channels, 2.25x fewer multiply-adds
//!   (flatten is a copy: NHWC is already Keras's order; dense is two GEMMs in [`model`]).
//! - [`matmul`]: the GEMM wrapper every layer uses, and its deterministic split.
//! - [`init`]: glorot_uniform kernels, zero biases.
//! - [`optimizer`]: per-tensor slots for the shared Keras update rules.
//! - [`model`]: the stack, one training step, evaluation and prediction.
//! - [`store`]: weights in safetensors, with the model description.
//! - [`vgg16`]: VGG16's block5 as these layers, with its pretrained weights
//!   (the part fine-tuning trains).

pub mod conv2d;
pub mod dropout;
pub mod init;
pub mod matmul;
pub mod model;
pub mod optimizer;
pub mod pooling;
pub mod spec;
pub mod store;
pub mod vgg16;
pub mod winograd;

#[cfg(test)]
mod tests;

pub use model::{Convnet, StepStats};
pub use optimizer::ConvOptimizer;
pub use spec::{LayerSpec, Shape};

#[derive(Debug, thiserror::Error)]
pub enum ConvnetError {
    #[error("invalid convnet: {0}")]
    Spec(String),
    /// A layer that cannot be built on what reaches it (by 0-based index).
    #[error("layers[{index}]: {message}")]
    Layer { index: usize, message: String },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
}
