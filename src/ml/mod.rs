//! Model-side math with no pipeline in sight, testable alone.
//!
//! - Frozen inference: [`onnx`] (the ONNX Runtime session),
//!   [`preprocess`] (its input conventions), [`cuda`] (what its CUDA
//!   provider needs) and [`bases`] (the book's ImageNet conv bases by name);
//!   [`vgg_cpu`], a faster CPU engine (Winograd F(4x4, 3x3)) for plain VGG conv bases.
//! - What trainers share: [`activation`], [`loss`] and [`optimizer`] (Keras's
//!   names, defaults and formulas).
//! - Trainers: [`head`], the dense head on cached features; [`convnet`], the
//!   trainable layers of a convnet.

pub mod activation;
pub mod bases;
pub mod convnet;
pub mod cuda;
pub mod head;
pub mod loss;
pub mod onnx;
pub mod optimizer;
pub mod preprocess;
pub mod vgg_cpu;

pub use onnx::{CudaOptions, Device, Layout, OnnxModel, Provider};
pub use preprocess::Preprocess;
