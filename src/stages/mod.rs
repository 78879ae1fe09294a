//! The built-in stages, one file each, and [`builtin_registry`] naming them.

pub mod augment;
pub mod batch;
pub mod convnet;
pub mod convnet_predict;
pub mod decode;
pub mod dense_head;
pub mod exec;
pub mod feature_writer;
pub mod file_reader;
pub mod gradcam;
pub mod head_predict;
pub mod idx_reader;
pub mod onnx_features;
pub mod predictions;
pub mod resize;
pub mod views;

use crate::stage::Registry;

/// `#[serde(default = "super::yes")]`: an option that is on unless turned off.
pub(crate) fn yes() -> bool {
    true
}

/// A registry holding every built-in stage kind.
pub fn builtin_registry() -> Registry {
    let mut r = Registry::new();
    r.register::<file_reader::FileReaderConfig>()
        .register::<decode::DecodeConfig>()
        .register::<resize::ResizeConfig>()
        .register::<augment::AugmentConfig>()
        .register::<views::ViewsConfig>()
        .register::<batch::BatchConfig>()
        .register::<onnx_features::OnnxFeaturesConfig>()
        .register::<feature_writer::FeatureWriterConfig>()
        .register::<dense_head::DenseHeadConfig>()
        .register::<convnet::ConvnetConfig>()
        .register::<idx_reader::IdxReaderConfig>()
        .register::<head_predict::HeadPredictConfig>()
        .register::<convnet_predict::ConvnetPredictConfig>()
        .register::<gradcam::GradcamConfig>()
        .register::<exec::ExecConfig>();
    r
}
