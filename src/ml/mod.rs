//! Model-side math with no pipeline in sight, testable alone.
//!
//! - Frozen inference: [`onnx`] (the ONNX Runtime session) and
//!   [`preprocess`] (its input conventions).
//! - What trainers share: [`activation`], [`loss`] and [`optimizer`] (Keras's
//!   names, defaults and formulas).
//! - Trainers: [`head`], the dense head on cached features; [`convnet`],
//!   convolutional networks trained from scratch (layers written on `gemm`).

pub mod activation;
pub mod convnet;
pub mod head;
pub mod loss;
pub mod onnx;
pub mod optimizer;
pub mod preprocess;

pub use onnx::{Device, OnnxModel, Provider};
pub use preprocess::Preprocess;
