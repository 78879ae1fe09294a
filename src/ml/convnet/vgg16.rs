//! VGG16's block5 as trainable layers: the part the book's 5.3.3 fine-tunes.
//!
//! Blocks 1-4 stay frozen in ONNX Runtime (`models/vgg16_block4.onnx`, whose
//! output is Keras's `block4_pool`); block5 (three `same` 3x3 convs of 512
//! filters with ReLU, then a 2x2 max pool) is built here from this crate's
//! own layers, so it can learn, with Keras's ImageNet weights read from
//! `models/vgg16_block5.safetensors` (both made by
//! `models/make_vgg16_block4.py` from the same ONNX export).
//!
//! The weights file names its tensors as Keras does (`block5_conv1/kernel`
//! `[3, 3, 512, 512]`, `block5_conv1/bias` `[512]`) and holds no input
//! shape: block5 takes any block4 map (9x9 at 150x150 images, 14x14 at 224x224).

use std::path::Path;

use super::conv2d::Padding;
use super::spec::Pair;
use super::{Convnet, ConvnetError, LayerSpec};
use crate::ml::activation::Activation;

/// The `format` metadata `make_vgg16_block4.py` writes.
pub const BLOCK5_FORMAT: &str = "keras-vgg16-block5";

/// Channels of block4's output, block5's input.
pub const BLOCK4_CHANNELS: usize = 512;

/// Keras's names of block5's convolutions, in order.
pub const BLOCK5_CONVS: [&str; 3] = ["block5_conv1", "block5_conv2", "block5_conv3"];

/// block5's layers: conv2d 512 3x3 `same` relu three times, max_pooling2d 2.
pub fn block5_specs() -> Vec<LayerSpec> {
    let conv = LayerSpec::Conv2d {
        filters: 512,
        kernel_size: Pair::One(3),
        strides: Pair::One(1),
        padding: Padding::Same,
        activation: Activation::Relu,
    };
    vec![conv, conv, conv, LayerSpec::MaxPooling2d { pool_size: Pair::One(2), strides: None }]
}

/// A convnet of block5 then `head` (the trainer's layers: flatten, dense, ...;
/// a convnet must end in a sigmoid or softmax dense) on block4 maps of
/// `[height, width]`, block5 holding the pretrained weights of `weights`
/// and the head Keras's initialisation from `seed`.
///
/// Block5's layers are layers 0..4 of the result; their outputs are
/// [`Convnet::layer_output`]`(x, rows, 4)`.
pub fn with_block5(
    block4_hw: [usize; 2],
    head: &[LayerSpec],
    weights: &Path,
    seed: u64,
    threads: usize,
) -> Result<Convnet, ConvnetError> {
    let mut specs = block5_specs();
    specs.extend_from_slice(head);
    let mut model = Convnet::new([block4_hw[0], block4_hw[1], BLOCK4_CHANNELS], &specs, seed, threads)?;
    load_block5(&mut model, weights)?;
    Ok(model)
}

/// Sets the first three conv layers of `model` (named `conv2d`, `conv2d_1`,
/// ... by their position, whatever follows) from `block5_conv1..3` of `path`.
pub fn load_block5(model: &mut Convnet, path: &Path) -> Result<(), ConvnetError> {
    let file_err = |m: String| ConvnetError::File { path: path.display().to_string(), message: m };
    let bytes = std::fs::read(path)
        .map_err(|e| file_err(format!("{e} (models/setup.sh writes it with models/make_vgg16_block4.py)")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| file_err(e.to_string()))?;
    let format = meta.metadata().as_ref().and_then(|m| m.get("format"));
    if format.map(String::as_str) != Some(BLOCK5_FORMAT) {
        return Err(file_err(format!(
            "metadata `format` is {format:?}, expected \"{BLOCK5_FORMAT}\": not VGG16 block5 weights"
        )));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_err(e.to_string()))?;
    let convs: Vec<String> = model
        .layers()
        .iter()
        .filter(|l| matches!(l.spec, LayerSpec::Conv2d { .. }))
        .take(BLOCK5_CONVS.len())
        .map(|l| l.name.clone())
        .collect();
    if convs.len() < BLOCK5_CONVS.len() {
        return Err(ConvnetError::Spec(format!("block5 needs 3 conv2d layers, the model has {}", convs.len())));
    }
    let shapes: std::collections::HashMap<String, Vec<usize>> =
        model.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
    for (keras, ours) in BLOCK5_CONVS.iter().zip(&convs) {
        for part in ["kernel", "bias"] {
            let (from, to) = (format!("{keras}/{part}"), format!("{ours}/{part}"));
            let t = st.tensor(&from).map_err(|e| file_err(format!("{from}: {e}")))?;
            let want = &shapes[&to];
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != want.as_slice() {
                return Err(file_err(format!(
                    "{from}: F32 {want:?} wanted (for layer {ours}), found {:?} {:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            // Both sides are Keras's [kh, kw, in, out]: a straight copy.
            let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            model.set_tensor(&to, &v)?;
        }
    }
    Ok(())
}
