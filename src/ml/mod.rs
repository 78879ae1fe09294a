//! Model-side math with no pipeline in sight: input preprocessing and the
//! ONNX Runtime session. Testable alone.

pub mod activation;
pub mod convnet;
pub mod head;
pub mod loss;
pub mod optimizer;
pub mod onnx;
pub mod preprocess;

pub use onnx::{Device, OnnxModel, Provider};
pub use preprocess::Preprocess;
