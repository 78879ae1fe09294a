//! Fine-tuning with the `convnet` stage (the book's 5.3.3): what its
//! `base` and `head_from` options put in front of, and into, its layers.
//!
//! - `base: vgg16_block5`: VGG16's block5 with Keras's ImageNet weights
//!   (`base_weights`, default `models/vgg16_block5.safetensors`) before the
//!   layers; the items are then block4 maps `[h, w, 512]`, the output of
//!   `onnx_features` with `models/vgg16_block4.onnx` (cached by content,
//!   so blocks 1-4 run once per image, variant and view, ever).
//! - `head_from: DIR`: the head a `dense_head` trained on the frozen conv
//!   base's features (`DIR/head.safetensors`) becomes the layers after
//!   `flatten`, weights and all, so fine-tuning starts where frozen-base
//!   training ended, as the book does. dense_head's features are
//!   `block5_pool` flattened NHWC, which is what `flatten` gives here: the
//!   kernels are copied as they are.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::facts::{Facts, TrainedOn};
use crate::ml::convnet::spec::resolve;
use crate::ml::convnet::vgg16::{BLOCK4_CHANNELS, VGG16, VGG19, Vgg};
use crate::ml::convnet::{Convnet, LayerSpec, Shape};

/// A pretrained base a convnet can be built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Base {
    /// VGG16's block5 (three 3x3 `same` convs of 512, a 2x2 max pool) on block4 maps.
    Vgg16Block5,
    /// VGG19's block5 (four such convs, the pool) on its block4 maps.
    Vgg19Block5,
}

/// The file a `dense_head` writes its weights to.
pub const HEAD_FILE: &str = "head.safetensors";

/// As a pipeline file names it.
impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Base::Vgg16Block5 => "vgg16_block5",
            Base::Vgg19Block5 => "vgg19_block5",
        })
    }
}

impl Base {
    /// The VGG whose block5 it is.
    pub fn vgg(self) -> Vgg {
        match self {
            Base::Vgg16Block5 => VGG16,
            Base::Vgg19Block5 => VGG19,
        }
    }

    /// The base whose block5 a head trained on the features of `conv_base`
    /// (a conv base of [`crate::ml::bases`]) sits on, if convflow's own
    /// layers have it.
    pub fn under(conv_base: &str) -> Option<Base> {
        [Base::Vgg16Block5, Base::Vgg19Block5].into_iter().find(|b| b.vgg().name == conv_base)
    }

    pub fn specs(self) -> Vec<LayerSpec> {
        self.vgg().block5_specs()
    }

    /// Channels of the maps the base takes.
    pub fn channels(self) -> usize {
        BLOCK4_CHANNELS
    }

    /// The map blocks 1-4 make of an image of `[height, width]`: four 2x2
    /// pools, each flooring (150 -> 9, 224 -> 14).
    pub fn input_for_image(self, hw: [usize; 2]) -> [usize; 3] {
        [hw[0] / 16, hw[1] / 16, BLOCK4_CHANNELS]
    }

    /// Where set-up writes block5's weights (`base_weights` unless given).
    pub fn default_weights(self) -> PathBuf {
        self.vgg().block5_weights.into()
    }

    /// The ONNX model of blocks 1-4 whose maps the base takes.
    pub fn block4_model(self) -> &'static str {
        self.vgg().block4_model
    }

    /// VGG16's and VGG19's block4 maps have the same shape: only the model
    /// that made the maps on the edge says whose they are.
    pub fn check_maps(self, input: &Facts) -> Result<(), String> {
        let Some(model) = input.features.as_ref().map(|f| f.model.as_str()) else { return Ok(()) };
        match [Base::Vgg16Block5, Base::Vgg19Block5].into_iter().find(|b| b.block4_file() == model) {
            Some(other) if other != self => {
                Err(format!("{self}: it takes the maps of {}; this edge carries {model}'s", self.block4_file()))
            }
            _ => Ok(()),
        }
    }

    /// The file name of [`Base::block4_model`], as the features' facts name the model.
    fn block4_file(self) -> &'static str {
        Path::new(self.block4_model()).file_name().and_then(|f| f.to_str()).unwrap_or_default()
    }

    /// A model of the base then `layers` on maps of `input`, the base's
    /// weights read from `weights`, the rest initialised from `seed`.
    pub fn model(
        self,
        input: [usize; 3],
        layers: &[LayerSpec],
        weights: &Path,
        seed: u64,
        threads: usize,
    ) -> Result<Convnet, String> {
        self.vgg().with_block5([input[0], input[1]], layers, weights, seed, threads).map_err(|e| e.to_string())
    }
}

/// A dense head trained by `dense_head`, read from its `out_dir`.
#[derive(Debug, Clone)]
pub struct HeadFrom {
    pub file: PathBuf,
    /// Features per row it was trained on (8192 = 4 x 4 x 512 at 150x150).
    pub input_dim: usize,
    /// `flatten` then the head's layers, as a convnet names them.
    pub layers: Vec<LayerSpec>,
    /// Each dense layer's kernel (`[in, out]`, Keras's layout) and bias, in order.
    pub denses: Vec<(Vec<usize>, Vec<f32>, Vec<f32>)>,
    /// blake3 of the file: a checkpoint made from another head is not resumed.
    pub blake3: String,
    /// What `head.json` beside it records (absent: not checked): the
    /// classes in order, the features it was trained on.
    pub trained_on: Option<TrainedOn>,
    /// The block5 it sits on: that of the base it was trained on the
    /// features of (VGG16's where no record says).
    pub base: Base,
}

impl HeadFrom {
    pub fn read(dir: &Path) -> Result<HeadFrom, String> {
        let file = dir.join(HEAD_FILE);
        let err = |m: String| format!("{}: {m}", file.display());
        let bytes = std::fs::read(&file).map_err(|e| {
            err(format!("{e} (train a head on the frozen conv base first, e.g. pipelines/augmented_end_to_end.yaml)"))
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
        let info = meta.metadata().as_ref().ok_or_else(|| err("no metadata: not a dense_head's head".into()))?;
        if info.get("format").map(String::as_str) != Some("convflow-head") {
            return Err(err(format!("metadata `format` is {:?}, expected \"convflow-head\"", info.get("format"))));
        }
        // The weights as dense_head's own loader reads them.
        let head = crate::ml::head::Head::load_safetensors(&file).map_err(|e| e.to_string())?;
        let mut layers = vec![LayerSpec::Flatten];
        layers.extend(head.spec().iter().map(|&l| LayerSpec::from(l)));
        let denses: Vec<_> = (0..)
            .map_while(|i| head.dense_weights(i))
            .map(|(kernel, bias)| (vec![kernel.len() / bias.len(), bias.len()], kernel, bias))
            .collect();
        let input_dim = head.input_dim();
        if denses.is_empty() {
            return Err(err("the head has no dense layer".into()));
        }
        let description = dir.join("head.json");
        let trained_on = description.is_file().then(|| TrainedOn::read(&description)).transpose()?;
        let conv_base = trained_on
            .as_ref()
            .and_then(|t| t.features.as_ref())
            .and_then(|f| crate::ml::bases::Base::of_file(Path::new(&f.model)));
        let base = match conv_base {
            None => Base::Vgg16Block5,
            Some(b) => Base::under(b.name).ok_or_else(|| {
                err(format!(
                    "this head was trained on {} features; Grad-CAM and fine-tuning need the base's layers in \
                     convflow's own backend, which has VGG16's and VGG19's only: use a head trained on vgg16 or \
                     vgg19 features for them (prediction and export work with any base)",
                    b.name
                ))
            })?,
        };
        let blake3 = blake3::hash(&bytes).to_hex().to_string();
        Ok(HeadFrom { file, input_dim, layers, denses, blake3, trained_on, base })
    }

    /// The head's features and these maps must start from the same pixels:
    /// a head trained on `rescale` features fine-tuned on `caffe` maps would
    /// start from weights that mean nothing there.
    pub fn check_input(&self, input: &Facts) -> Result<(), String> {
        if let Some(m) = self.trained_on.as_ref().and_then(|t| t.pixels_mismatch(input)) {
            return Err(format!(
                "the head in {} was {m}: train the head with the same preprocessing and image size",
                self.file.display()
            ));
        }
        self.base.check_maps(input).map_err(|e| format!("the head in {} sits on {e}", self.file.display()))
    }

    /// A convnet's `base` must be the block5 the head sits on.
    pub fn check_base(&self, base: Option<Base>) -> Result<(), String> {
        match base {
            Some(b) if b != self.base => Err(format!(
                "the head in {} sits on {} (it was trained on that base's features); `base` is {b}",
                self.file.display(),
                self.base
            )),
            _ => Ok(()),
        }
    }

    /// The data's classes must be the head's, in the same order.
    pub fn check_classes(&self, stage: &str, classes: &[String]) -> Result<(), String> {
        match self.trained_on.as_ref().map(|t| &t.classes) {
            Some(head) if head.as_slice() != classes => Err(format!(
                "convnet `{stage}`: the head in {} was trained on classes {head:?}, the data has {classes:?}",
                self.file.display()
            )),
            _ => Ok(()),
        }
    }

    /// The error when `base` on maps of `input` does not give the head's
    /// `input_dim` features: `stage` and both shapes named.
    pub fn check_fits(&self, stage: &str, base: Option<Base>, input: [usize; 3]) -> Result<(), String> {
        let mut specs = base.map(Base::specs).unwrap_or_default();
        let before = specs.len();
        specs.extend_from_slice(&self.layers);
        let (resolved, _) = resolve(input, &specs).map_err(|e| format!("convnet `{stage}`: {e}"))?;
        let Shape::Map([h, w, c]) = resolved[before].input else {
            return Err(format!("convnet `{stage}`: the head's flatten gets a vector"));
        };
        let got = h * w * c;
        if got != self.input_dim {
            return Err(format!(
                "convnet `{stage}`: the head in {} takes {} features per image, but {} on maps of {input:?} gives \
                 [{h}, {w}, {c}] = {got} (was the head trained at another image size, or on other features?)",
                self.file.display(),
                self.input_dim,
                if base.is_some() { "block5" } else { "the input" },
            ));
        }
        Ok(())
    }

    /// Sets the dense layers of `model` after its first `skip` layers
    /// (the base's) to the head's weights, in order.
    pub fn load_into(&self, model: &mut Convnet, skip: usize) -> Result<(), String> {
        let names: Vec<String> = model.layers()[skip..]
            .iter()
            .filter(|l| matches!(l.spec, LayerSpec::Dense { .. }))
            .map(|l| l.name.clone())
            .collect();
        if names.len() != self.denses.len() {
            return Err(format!(
                "{}: {} dense layers, the model has {} after its base",
                self.file.display(),
                self.denses.len(),
                names.len()
            ));
        }
        for (name, (_, kernel, bias)) in names.iter().zip(&self.denses) {
            model.set_tensor(&format!("{name}/kernel"), kernel).map_err(|e| format!("{}: {e}", self.file.display()))?;
            model.set_tensor(&format!("{name}/bias"), bias).map_err(|e| format!("{}: {e}", self.file.display()))?;
        }
        Ok(())
    }
}
