//! VGG16's and VGG19's block5 as trainable layers: the part the book's
//! 5.3.3 fine-tunes, and what Grad-CAM takes gradients through; and their
//! whole conv base, frozen, whose gradients the visualisations of 5.4 take
//! ([`Vgg::conv_base`], weights from `models/vgg16_convs.safetensors` or
//! `models/vgg19_convs.safetensors`).
//!
//! Blocks 1-4 stay frozen in ONNX Runtime (`models/vgg16_block4.onnx`, whose
//! output is Keras's `block4_pool`; `vgg19_block4.onnx`); block5 (three
//! `same` 3x3 convs of 512 filters with ReLU, VGG19's four, then a 2x2 max
//! pool) is built here from this crate's own layers, so it can learn, with
//! Keras's ImageNet weights read from `models/vgg16_block5.safetensors`
//! (both made by `models/make_vgg16_block4.py` from the same ONNX export;
//! VGG19's by `models/bases.sh vgg19`).
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

/// Channels of block4's output, block5's input (VGG16's and VGG19's).
pub const BLOCK4_CHANNELS: usize = 512;

/// A VGG conv base in this crate's own layers, frozen, with Keras's
/// ImageNet weights: what the visualisations of 5.4 take gradients of.
/// VGG16 and VGG19 differ only in how many convs each block has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vgg {
    /// The base's name (`convflow visualize --model vgg19`).
    pub name: &'static str,
    /// Convs in blocks 1..5.
    convs: [usize; 5],
    /// The weights file's `format` metadata.
    format: &'static str,
    /// Where set-up writes the weights.
    pub weights: &'static str,
    /// The set-up command that writes them.
    pub maker: &'static str,
    /// Blocks 1-4 in ONNX Runtime, whose output (`block4_pool`) block5 takes
    /// when it is fine-tuned or gives Grad-CAM its gradients.
    pub block4_model: &'static str,
    /// Block5's weights alone (VGG16's are a file of their own; VGG19's are
    /// read from its whole base's file) and that file's `format`.
    pub block5_weights: &'static str,
    block5_format: &'static str,
}

/// VGG16: `models/vgg16_convs.safetensors`, from `make_vgg16_convs.py`.
pub const VGG16: Vgg = Vgg {
    name: "vgg16",
    convs: [2, 2, 3, 3, 3],
    format: "keras-vgg16-convs",
    weights: "models/vgg16_convs.safetensors",
    maker: "models/setup.sh",
    block4_model: "models/vgg16_block4.onnx",
    block5_weights: "models/vgg16_block5.safetensors",
    block5_format: BLOCK5_FORMAT,
};

/// VGG19: `models/vgg19_convs.safetensors`, from Keras's own weight file
/// (`make_keras_vgg.py`, the same run that writes `vgg19_notop.onnx`).
pub const VGG19: Vgg = Vgg {
    name: "vgg19",
    convs: [2, 2, 4, 4, 4],
    format: "keras-vgg19-convs",
    weights: "models/vgg19_convs.safetensors",
    maker: "models/bases.sh vgg19",
    block4_model: "models/vgg19_block4.onnx",
    block5_weights: "models/vgg19_convs.safetensors",
    block5_format: "keras-vgg19-convs",
};

/// Filters of each block's convs.
const BLOCK_FILTERS: [usize; 5] = [64, 128, 256, 512, 512];

impl Vgg {
    pub fn named(name: &str) -> Option<Vgg> {
        [VGG16, VGG19].into_iter().find(|v| v.name == name)
    }

    /// Keras's names of its conv base's layers (`include_top=False`), in
    /// order: `blockB_convC`, each block ending in `blockB_pool`.
    pub fn layers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (b, &n) in self.convs.iter().enumerate() {
            out.extend((1..=n).map(|c| format!("block{}_conv{c}", b + 1)));
            out.push(format!("block{}_pool", b + 1));
        }
        out
    }

    /// Its layers, as [`Vgg::layers`] names them: 3x3 `same` ReLU convs of
    /// 64, 128, 256, 512, 512 filters by block, each block ending in a 2x2
    /// max pool.
    pub fn specs(&self) -> Vec<LayerSpec> {
        let mut out = Vec::new();
        for (b, &n) in self.convs.iter().enumerate() {
            let conv = LayerSpec::Conv2d {
                filters: BLOCK_FILTERS[b],
                kernel_size: Pair::One(3),
                strides: Pair::One(1),
                padding: Padding::Same,
                activation: Activation::Relu,
            };
            out.extend(std::iter::repeat_n(conv, n));
            out.push(LayerSpec::MaxPooling2d { pool_size: Pair::One(2), strides: None });
        }
        out
    }

    /// Keras's names of block5's convs, in order (`block5_conv1` ..).
    pub fn block5_convs(&self) -> Vec<String> {
        (1..=self.convs[4]).map(|c| format!("block5_conv{c}")).collect()
    }

    /// block5's layers: its 3x3 `same` ReLU convs of 512, then a 2x2 max pool.
    pub fn block5_specs(&self) -> Vec<LayerSpec> {
        let specs = self.specs();
        specs[specs.len() - self.convs[4] - 1..].to_vec()
    }

    /// A convnet of block5 then `head` (the trainer's layers: flatten,
    /// dense, ...; a convnet must end in a sigmoid or softmax dense) on
    /// block4 maps of `[height, width]`, block5 holding the pretrained
    /// weights of `weights` ([`Vgg::block5_weights`]) and the head Keras's
    /// initialisation from `seed`. Block5's layers come first; their
    /// outputs are [`Convnet::layer_output`]`(x, rows, k)`.
    pub fn with_block5(
        &self,
        block4_hw: [usize; 2],
        head: &[LayerSpec],
        weights: &Path,
        seed: u64,
        threads: usize,
    ) -> Result<Convnet, ConvnetError> {
        let mut specs = self.block5_specs();
        specs.extend_from_slice(head);
        let mut model = Convnet::new([block4_hw[0], block4_hw[1], BLOCK4_CHANNELS], &specs, seed, threads)?;
        // Block5's convs are the model's first (named `conv2d`, `conv2d_1`, ... by position).
        let convs: Vec<String> = model
            .layers()
            .iter()
            .filter(|l| matches!(l.spec, LayerSpec::Conv2d { .. }))
            .take(self.convs[4])
            .map(|l| l.name.clone())
            .collect();
        let keras = self.block5_convs();
        let pairs: Vec<(&str, &str)> = keras.iter().map(String::as_str).zip(convs.iter().map(String::as_str)).collect();
        load_convs(&mut model, weights, self.block5_format, self.maker, &pairs)?;
        Ok(model)
    }

    /// The conv base from its input (preprocessed as Keras's VGGs want:
    /// `caffe`) up to and including the layer named `last`, on images of
    /// `[height, width]`, with Keras's ImageNet weights from `weights`
    /// ([`Vgg::weights`] unless given). Frozen: a [`Convnet::conv_base`],
    /// whose layers carry Keras's names.
    pub fn conv_base(
        &self,
        image_hw: [usize; 2],
        last: &str,
        weights: &Path,
        threads: usize,
    ) -> Result<Convnet, ConvnetError> {
        let names = self.layers();
        let upto = names.iter().position(|n| n == last).ok_or_else(|| {
            ConvnetError::Spec(format!("{} has no layer {last:?}; its layers are {}", self.name, names.join(", ")))
        })?;
        let specs = self.specs();
        let mut model = Convnet::conv_base([image_hw[0], image_hw[1], 3], &specs[..=upto], threads)?;
        let names: Vec<&str> = names[..=upto].iter().map(String::as_str).collect();
        model.set_layer_names(&names)?;
        let convs: Vec<(&str, &str)> = names.iter().filter(|n| n.contains("_conv")).map(|&n| (n, n)).collect();
        load_convs(&mut model, weights, self.format, self.maker, &convs)?;
        Ok(model)
    }
}

/// Sets each `(file name, model name)` pair's kernel and bias from the
/// safetensors file `path`, which must carry metadata `format`.
fn load_convs(
    model: &mut Convnet,
    path: &Path,
    format: &str,
    maker: &str,
    pairs: &[(&str, &str)],
) -> Result<(), ConvnetError> {
    let file_err = |m: String| ConvnetError::File { path: path.display().to_string(), message: m };
    let bytes = std::fs::read(path).map_err(|e| file_err(format!("{e} ({maker} writes it)")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| file_err(e.to_string()))?;
    let found = meta.metadata().as_ref().and_then(|m| m.get("format"));
    if found.map(String::as_str) != Some(format) {
        return Err(file_err(format!("metadata `format` is {found:?}, expected \"{format}\": not the weights wanted")));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_err(e.to_string()))?;
    let shapes: std::collections::HashMap<String, Vec<usize>> =
        model.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
    for (keras, ours) in pairs {
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
