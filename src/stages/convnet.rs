//! `convnet`: trains a convolutional network from scratch on images
//! (sections 5.1 and 5.2), with the shared trainer of `dense_head`:
//! items routed by split, validation after every epoch, the test split at
//! the end, `early_stopping`, `keep_best`, and, with `streaming: true`,
//! epochs streamed through the graph (an `augment` stage in front works
//! unchanged).
//!
//! Takes 8-bit images (RGB: 3 channels; after `decode: {color_mode:
//! grayscale}`, 1) or `[h, w, c]` tensors (the 1-channel digits of
//! `idx_reader`), each multiplied by `rescale`. The input shape is
//! that of the first image; `input_shape` (Keras's argument of the first
//! layer) declares it, so that `convflow validate` and `convflow summary`
//! know every layer's shape, and an image of another shape stops the run.
//!
//! Fine-tuning (the book's 5.3.3, [`super::fine_tune`]): `base:
//! vgg16_block5` puts VGG16's pretrained block5 before the layers (the
//! items are then block4 maps from `onnx_features`), and `head_from` starts
//! the layers from a `dense_head`'s trained head.
//!
//! Writes to `out_dir`: `history.csv`, `curves.png`, `metrics.json`,
//! `model.safetensors` (Keras names and shapes) and `model.json` (layers,
//! input shape, classes, and the stages that made the images).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::facts::{Facts, TrainedOn, Wants};
use crate::item::{ClassMode, Item, ItemKind, Payload};
use crate::ml::convnet::spec::{self, resolve};
use crate::ml::convnet::{ConvOptimizer, Convnet, ConvnetError, LayerSpec};
use crate::ml::loss::LossKind;
use crate::ml::optimizer::OptimizerSpec;
use crate::stage::{BuildContext, Built, FieldError, OptionDoc, StageConfig, StageError};
use crate::trained::fine_tune::{Base, HEAD_FILE, HeadFrom};
use crate::training::checkpoint::ModelState;
use crate::training::{
    Common, Data, EarlyStopping, Model, NewModel, TrainerKind, TrainerStage, check_training, trainer_options,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvnetConfig {
    pub out_dir: PathBuf,
    /// Keras layers: conv2d, max_pooling2d, flatten, dropout, dense (after
    /// `base` when there is one). Left out with `head_from`, whose head they are.
    #[serde(default)]
    pub layers: Vec<LayerSpec>,
    /// Pretrained layers before `layers`: `vgg16_block5` or `vgg19_block5`
    /// (fine-tuning; the items are that VGG's block4 maps `[h, w, 512]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Base>,
    /// The base's weights (default the set-up's: `models/vgg16_block5.safetensors`,
    /// `models/vgg19_convs.safetensors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_weights: Option<PathBuf>,
    /// A `dense_head`'s out_dir: its trained head (layers and weights) is the
    /// model's after `flatten`, so training starts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_from: Option<PathBuf>,
    /// Train only the layers after `base` for the first epochs, then the
    /// whole model with `optimizer` (the book's 5.3.3 in one run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_base: Option<FrozenBase>,
    /// Also draw `curves_smoothed.png`: each curve as the book smooths it
    /// (exponential moving average with this factor, e.g. 0.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smooth_curves: Option<f32>,
    /// [height, width, channels] of every image; default: the first image's.
    #[serde(default)]
    pub input_shape: Option<[usize; 3]>,
    /// Each pixel value is multiplied by this (the book: 1/255).
    #[serde(default = "default_rescale")]
    pub rescale: f32,
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerSpec,
    /// Passes over the collected rows (default 30). Not with `streaming`.
    #[serde(default)]
    pub epochs: Option<usize>,
    /// Train on batches as they arrive, one epoch per end-of-epoch marker of
    /// the training split (augmentation that differs every epoch).
    #[serde(default)]
    pub streaming: bool,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub seed: u64,
    /// Math threads; 0 = one per core. The same seed and thread count give
    /// the same history, bit for bit.
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    #[serde(default)]
    pub keep_best: bool,
    /// Images held in memory (as floats) before spilling to disk (MiB).
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u64,
    #[serde(default = "default_train")]
    pub train_split: String,
    #[serde(default = "default_validation")]
    pub validation_split: String,
    #[serde(default = "default_test")]
    pub test_split: String,
}

/// `frozen_base`: the book trains its head on the frozen conv base, then
/// unfreezes block5 and recompiles the model (a fresh RMSprop, its own
/// learning rate). Here both happen in one run, on the same block4 maps.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrozenBase {
    /// Epochs 1..=epochs train the layers after the base alone; they count
    /// among the run's epochs (the training source's, when streaming).
    pub epochs: usize,
    /// Their optimizer (default: the stage's `optimizer`); the epochs after
    /// start the stage's `optimizer` afresh, as Keras's `compile` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerSpec>,
}

fn default_rescale() -> f32 {
    1.0
}
/// Keras's RMSprop default.
fn default_optimizer() -> OptimizerSpec {
    OptimizerSpec::rmsprop(1e-3)
}
/// Keras's `fit` default.
fn default_batch_size() -> usize {
    32
}
fn default_max_memory_mb() -> u64 {
    4096
}
fn default_train() -> String {
    "train".into()
}
fn default_validation() -> String {
    "validation".into()
}
fn default_test() -> String {
    "test".into()
}

impl ConvnetConfig {
    fn threads(&self) -> usize {
        crate::config::threads(self.threads, 1)
    }

    /// Keras's `model.summary()` of the whole stack (the base's layers
    /// first) on `input_shape`, else on `arriving`, the shape of the items
    /// that reach it (images, or a base's block4 maps).
    pub fn summary(&self, title: &str, arriving: Option<[usize; 3]>) -> Result<String, String> {
        let input = self
            .input_shape
            .or(arriving)
            .ok_or_else(|| "no input shape: declare `input_shape`, or put a `resize` upstream".to_string())?;
        if let Some(b) = self.base
            && input[2] != b.channels()
        {
            return Err(format!(
                "`base` takes block4 maps of {} channels but the items arriving are {input:?}: put an \
                 `onnx_features` stage with {} before it",
                b.channels(),
                b.block4_model()
            ));
        }
        let (layers, _) = resolve(input, &self.specs(&self.head_layers()?)).map_err(|e| e.to_string())?;
        let mut text = spec::summary(title, input, &layers);
        if let Some(f) = &self.frozen_base {
            // Keras's summary of the model as compiled for phase 1, in one line.
            let base: usize = layers[..self.base_len()].iter().map(|l| l.params).sum();
            let all: usize = layers.iter().map(|l| l.params).sum();
            text.push_str(&format!(
                "Epochs 1-{} (frozen_base): trainable params: {}, non-trainable params: {} (the base)\n",
                f.epochs,
                spec::thousands(all - base),
                spec::thousands(base)
            ));
        }
        Ok(text)
    }

    /// The layers after the base: `layers`, or the head of `head_from`.
    fn head_layers(&self) -> Result<Vec<LayerSpec>, String> {
        match &self.head_from {
            Some(dir) => Ok(HeadFrom::read(dir)?.layers),
            None => Ok(self.layers.clone()),
        }
    }

    /// The whole stack: the base's layers, then `head`.
    fn specs(&self, head: &[LayerSpec]) -> Vec<LayerSpec> {
        let mut specs = self.base.map(Base::specs).unwrap_or_default();
        specs.extend_from_slice(head);
        specs
    }

    fn base_weights(&self) -> PathBuf {
        self.base_weights.clone().or_else(|| self.base.map(Base::default_weights)).unwrap_or_default()
    }

    /// Layers the base puts before `layers`.
    fn base_len(&self) -> usize {
        self.base.map(|b| b.specs().len()).unwrap_or(0)
    }

    /// Where a layer-list error refers to in the options, for `file:line:col`:
    /// the base's own layers are `base`, the head's `head_from`.
    fn field_of(&self, e: &ConvnetError) -> String {
        let skip = self.base_len();
        match e {
            _ if self.head_from.is_some() => "head_from".into(),
            ConvnetError::Layer { index, .. } if *index < skip => "base".into(),
            ConvnetError::Layer { index, .. } => format!("layers[{}]", index - skip),
            _ => "layers".into(),
        }
    }

    /// Streaming, the training source's epochs are the run's: some must
    /// be left after the frozen ones.
    fn check_source_epochs(&self, f: &FrozenBase, input: &Facts) -> Result<(), String> {
        let total = input.epochs as usize;
        if total > 0 && total <= f.epochs {
            return Err(format!(
                "frozen_base.epochs is {} but the training source gives {total} epochs: none is left to train \
                 the base in (give the source frozen_base.epochs + the epochs of fine-tuning)",
                f.epochs
            ));
        }
        Ok(())
    }

    /// What reaches the model: the images resized upstream, or, past an
    /// onnx_features stage, its maps (block4's, for a base, of a size the
    /// image size fixes). A size the model cannot take is an error here,
    /// before any image is read.
    fn arriving(&self, input: &Facts) -> Result<Option<[usize; 3]>, String> {
        let maps = input.features.is_some();
        let arriving = input.image_size.and_then(|[h, w]| {
            let hw = [h as usize, w as usize];
            match (self.base, maps) {
                (Some(b), true) => Some(b.input_for_image(hw)),
                (None, false) => Some([hw[0], hw[1], input.channels.map_or(0, |c| c as usize)]),
                _ => None,
            }
        });
        if let (Some(got), Some(want)) = (arriving, self.input_shape) {
            // Channels are checked here when a stage upstream fixes them (decode), else at the first image.
            let got = if got[2] == 0 { [got[0], got[1], want[2]] } else { got };
            if got != want {
                let what = if maps { "block4 maps" } else { "images" };
                return Err(format!("{what} arrive as {got:?} (resized upstream) but input_shape is {want:?}"));
            }
        }
        Ok(arriving)
    }

    /// The fine-tuning options' own checks (no contradictions); the head's
    /// layers when the file gives them (`head_from`'s are read by
    /// [`StageConfig::check_environment`]).
    fn check_fine_tuning(&self, errors: &mut Vec<FieldError>) -> Option<Vec<LayerSpec>> {
        if let Some(f) = self.smooth_curves
            && !(f > 0.0 && f < 1.0)
        {
            errors.push(FieldError::new("smooth_curves", format!("the smoothing factor must be in (0, 1), got {f}")));
        }
        match self.base {
            None if self.base_weights.is_some() => {
                errors.push(FieldError::new("base_weights", "only with `base` (e.g. base: vgg16_block5)"));
            }
            None if self.frozen_base.is_some() => {
                errors.push(FieldError::new("frozen_base", "only with `base` (e.g. base: vgg16_block5)"));
            }
            Some(b) => {
                if let Some(s) = self.input_shape
                    && s[2] != b.channels()
                {
                    errors.push(FieldError::new(
                        "input_shape",
                        format!("base {b} takes maps of {} channels, input_shape has {}", b.channels(), s[2]),
                    ));
                }
            }
            None => {}
        }
        match (&self.head_from, self.layers.is_empty()) {
            (None, true) => errors.push(FieldError::new("layers", "required (or `head_from`: a dense_head's out_dir)")),
            (None, false) => return Some(self.layers.clone()),
            (Some(_), false) => errors.push(FieldError::new(
                "layers",
                "give `layers` or `head_from`, not both: head_from's head is the layers",
            )),
            (Some(_), true) => {}
        }
        None
    }

    /// The base and the head resolve into a model of this input (a stand-in
    /// one when none is declared: it still catches the structural mistakes,
    /// dense on a map, conv2d on a vector; the sizes are checked on the
    /// first image).
    fn check_layers(&self, head: &[LayerSpec], errors: &mut Vec<FieldError>) {
        let probe = self.input_shape.unwrap_or([1024, 1024, self.base.map_or(1, Base::channels)]);
        if let Err(e) = resolve(probe, &self.specs(head)) {
            let size_only = self.input_shape.is_none()
                && matches!(&e, ConvnetError::Layer { message, .. } if message.contains("cannot"));
            if !size_only {
                errors.push(FieldError::new(self.field_of(&e), e.to_string()));
            }
        }
    }
}

impl StageConfig for ConvnetConfig {
    const KIND: &'static str = "convnet";
    const SUMMARY: &'static str = "trains a convnet on images (5.1, 5.2) or VGG16's block5 + a head on block4 maps (5.3.3); validates, tests, saves";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image, ItemKind::Features];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = trainer_options![
        OptionDoc {
            name: "out_dir",
            ty: "path",
            default: "(required)",
            help: "history.csv, curves.png, model.safetensors, metrics.json",
        },
        OptionDoc {
            name: "layers",
            ty: "[{kind: conv2d|max_pooling2d|flatten|dropout|dense, ...}]",
            default: "(required, unless head_from)",
            help: "Keras layers, names and defaults",
        },
        OptionDoc {
            name: "base",
            ty: "vgg16_block5 | vgg19_block5",
            default: "(none)",
            help: "pretrained layers before `layers`; items are that VGG's block4 maps",
        },
        OptionDoc {
            name: "base_weights",
            ty: "path",
            default: "the base's (models/vgg16_block5.safetensors, models/vgg19_convs.safetensors)",
            help: "the base's pretrained weights",
        },
        OptionDoc {
            name: "head_from",
            ty: "path",
            default: "(none)",
            help: "a dense_head's out_dir: its trained head is the layers",
        },
        OptionDoc {
            name: "frozen_base",
            ty: "{epochs, optimizer}",
            default: "(off)",
            help: "first `epochs` train only the layers after `base`; then all, `optimizer` afresh",
        },
        OptionDoc {
            name: "input_shape",
            ty: "[h, w, c]",
            default: "the first image's",
            help: "checked against every image",
        },
        OptionDoc { name: "rescale", ty: "float", default: "1", help: "pixel values are multiplied by it" },
        OptionDoc {
            name: "optimizer",
            ty: "{name: rmsprop|adam|sgd, ...}",
            default: "rmsprop lr 1e-3",
            help: "Keras semantics and defaults",
        },
        OptionDoc { name: "batch_size", ty: "int", default: "32", help: "images per step" },
        OptionDoc { name: "seed", ty: "int", default: "0", help: "init and dropout seed" },
        OptionDoc { name: "max_memory_mb", ty: "int", default: "4096", help: "images kept in RAM; beyond, spilled" },
    ];

    fn check(&self) -> Vec<FieldError> {
        let mut errors = check_training(self.epochs, self.streaming, self.batch_size, self.early_stopping.as_ref());
        if let Some(f) = &self.frozen_base {
            let total = self.epochs.unwrap_or(30);
            if f.epochs == 0 {
                errors.push(FieldError::new("frozen_base", "epochs must be at least 1"));
            } else if !self.streaming && total <= f.epochs {
                errors.push(FieldError::new(
                    "frozen_base",
                    format!("epochs {} leaves none of the run's {total} epochs to train the base in", f.epochs),
                ));
            }
        }
        if !(self.rescale.is_finite() && self.rescale > 0.0) {
            errors.push(FieldError::new("rescale", "must be a positive number"));
        }
        if let Some(head) = self.check_fine_tuning(&mut errors) {
            self.check_layers(&head, &mut errors);
        }
        errors
    }

    /// The base's weights exist, and `head_from`'s head is readable and fits.
    fn check_environment(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.base.is_some() {
            let weights = self.base_weights();
            if !weights.is_file() {
                errors.push(FieldError::new(
                    if self.base_weights.is_some() { "base_weights" } else { "base" },
                    format!("{} not found (models/setup.sh makes it)", weights.display()),
                ));
            }
        }
        // With `layers` as well, check() has said to give one of them.
        if let Some(dir) = self.head_from.as_ref().filter(|_| self.layers.is_empty()) {
            match HeadFrom::read(dir) {
                Ok(h) => self.check_layers(&h.layers, &mut errors),
                Err(e) => errors.push(FieldError::new("head_from", e)),
            }
        }
        errors
    }

    fn model_summary(&self, stage_id: &str, input: &Facts) -> Option<Result<String, String>> {
        // The items arriving from upstream, unless the shape is declared.
        if self.input_shape.is_some() {
            return Some(self.summary(stage_id, None));
        }
        let input = match input.item_shape() {
            Some(s) if s.len() == 3 => Some([s[0], s[1], s[2]]),
            Some(s) => {
                return Some(Err(format!("its input items are of shape {s:?}, not [height, width, channels]")));
            }
            None => None,
        };
        Some(self.summary(stage_id, input))
    }

    /// What arrives must fit the model, and, fine-tuning from a head, be
    /// made from the pixels the head was trained on: refused here, by
    /// `validate`, before any image is read.
    fn facts(&self, input: &Facts, env: bool) -> Result<Facts, Vec<FieldError>> {
        let mut errors = Vec::new();
        if let Err(e) = self.arriving(input) {
            errors.push(FieldError::new("input_shape", e));
        }
        if let Some(Err(e)) = self.base.map(|b| b.check_maps(input)) {
            errors.push(FieldError::new("base", e));
        }
        if let (Some(f), true) = (&self.frozen_base, self.streaming)
            && let Err(e) = self.check_source_epochs(f, input)
        {
            errors.push(FieldError::new("frozen_base", e));
        }
        if let Some(head) = self.head_from.as_deref().filter(|d| env && d.join(HEAD_FILE).is_file())
            && let Err(e) = HeadFrom::read(head).and_then(|h| h.check_input(input).and(h.check_base(self.base)))
        {
            errors.push(FieldError::new("head_from", e));
        }
        if errors.is_empty() { Ok(input.clone()) } else { Err(errors) }
    }

    /// Fine-tuning from a head: its preprocessing and image size, for
    /// `auto` options upstream.
    fn wants(&self, env: bool) -> Wants {
        // head.json alone: the weights are read (and checked) by `facts`.
        let Some(dir) = self.head_from.as_deref().filter(|_| env) else { return Wants::default() };
        match TrainedOn::read(&dir.join("head.json")) {
            Ok(t) => t.wants(format!("the head in {}", dir.display())),
            Err(_) => Wants::default(),
        }
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let stage = ctx.stage_id;
        let arriving = self.arriving(ctx.input).map_err(|e| StageError::fatal(format!("convnet `{stage}`: {e}")))?;
        let fatal = |e: String| StageError::fatal(format!("convnet `{stage}`: {e}"));
        if let (Some(f), true) = (&self.frozen_base, self.streaming) {
            self.check_source_epochs(f, ctx.input).map_err(fatal)?;
        }
        let head = self.head_from.as_deref().map(HeadFrom::read).transpose().map_err(fatal)?;
        let expect = if self.base.is_some() { arriving } else { None };
        if let Some(h) = &head {
            h.check_input(ctx.input).map_err(fatal)?;
            h.check_base(self.base).map_err(fatal)?;
            if let Some(input) = self.input_shape.or(expect) {
                h.check_fits(stage, self.base, input).map_err(StageError::fatal)?;
            }
        }
        let base_blake3 = match self.base {
            Some(_) => {
                let path = self.base_weights();
                let bytes = std::fs::read(&path).map_err(|e| fatal(format!("{}: {e}", path.display())))?;
                Some(blake3::hash(&bytes).to_hex().to_string())
            }
            None => None,
        };
        let kind = Kind { cfg: self.clone(), stage: stage.to_string(), head, expect, base_blake3 };
        Ok(Built::Stage(Box::new(TrainerStage::new(kind, ctx))))
    }
}

/// An item as a row of a convnet's input, each value times `rescale` (an
/// f32 product, the same in training and prediction), with its `[height,
/// width, channels]`: an RGB or gray image, or a 3-D tensor. `None` for
/// anything else.
pub fn input_row(payload: &Payload, rescale: f32) -> Option<(Vec<f32>, Vec<usize>)> {
    let pixels = |raw: &[u8]| raw.iter().map(|&p| f32::from(p) * rescale).collect();
    match payload {
        Payload::Image(img) => Some((pixels(img.as_raw()), vec![img.height() as usize, img.width() as usize, 3])),
        Payload::Gray(img) => Some((pixels(img.as_raw()), vec![img.height() as usize, img.width() as usize, 1])),
        Payload::Features(f) if f.shape.len() == 3 => {
            Some((f.data.iter().map(|&v| v * rescale).collect(), f.shape.clone()))
        }
        _ => None,
    }
}

/// The config with the stage's id, for messages, and what fine-tuning read.
struct Kind {
    cfg: ConvnetConfig,
    stage: String,
    /// The head of `head_from`.
    head: Option<HeadFrom>,
    /// The block4 maps the image size upstream gives, for a `base`.
    expect: Option<[usize; 3]>,
    /// blake3 of the base's weights.
    base_blake3: Option<String>,
}

impl TrainerKind for Kind {
    type M = ConvModel;

    /// With what the base's and the head's files held, so a checkpoint made
    /// from other starting weights is not resumed.
    fn options(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.cfg).unwrap_or_default();
        if let Some(b) = &self.base_blake3 {
            v["base_weights_blake3"] = b.clone().into();
        }
        if let Some(h) = &self.head {
            v["head_from_blake3"] = h.blake3.clone().into();
        }
        v
    }

    fn common(&self) -> Common {
        let c = &self.cfg;
        Common {
            out_dir: c.out_dir.clone(),
            epochs: c.epochs.unwrap_or(30),
            streaming: c.streaming,
            batch_size: c.batch_size,
            l2: 0.0,
            seed: c.seed,
            early_stopping: c.early_stopping.clone(),
            keep_best: c.keep_best,
            smooth_curves: c.smooth_curves,
            max_memory_mb: c.max_memory_mb,
            train_split: c.train_split.clone(),
            validation_split: c.validation_split.clone(),
            test_split: c.test_split.clone(),
        }
    }

    fn new_model(&self, d: &Data) -> Result<NewModel<ConvModel>, String> {
        let input = shape3(&d.feature_shape).ok_or_else(|| format!("inputs of shape {:?}", d.feature_shape))?;
        let threads = self.cfg.threads();
        let (cfg, stage) = (&self.cfg, &self.stage);
        let layers = self.head.as_ref().map_or_else(|| cfg.layers.clone(), |h| h.layers.clone());
        let mut model = match cfg.base {
            Some(b) => b.model(input, &layers, &cfg.base_weights(), cfg.seed, threads)?,
            None => Convnet::new(input, &layers, cfg.seed, threads).map_err(|e| e.to_string())?,
        };
        if let Some(h) = &self.head {
            h.check_fits(stage, cfg.base, input)?;
            h.check_classes(stage, &d.classes)?;
            h.load_into(&mut model, cfg.base_len())?;
        }
        let classes = if d.mode == ClassMode::Categorical { d.classes.len() } else { 1 };
        if model.output_dim() != classes {
            return Err(format!(
                "convnet `{}`: the last layer has {} units but the data has {} label columns ({:?} labels of {} classes)",
                self.stage,
                model.output_dim(),
                classes,
                d.mode,
                d.classes.len()
            ));
        }
        tracing::info!("convnet `{}`:\n{}", self.stage, spec::summary(&self.stage, input, model.layers()));
        let frozen = cfg.frozen_base.map(|f| Frozen {
            layers: cfg.base_len(),
            epochs: f.epochs,
            then: cfg.optimizer,
            memo: Default::default(),
            memo_rows: (cfg.max_memory_mb << 20) as usize / (4 * model.layers()[cfg.base_len()].input.len()).max(1),
        });
        let first = cfg.frozen_base.and_then(|f| f.optimizer).unwrap_or(cfg.optimizer);
        Ok(NewModel {
            model: ConvModel { net: model, frozen },
            opt: ConvOptimizer::new(first),
            layers: serde_json::to_value(self.cfg.specs(&layers)).map_err(|e| e.to_string())?,
            threads,
        })
    }

    fn row(&self, item: &Item) -> Result<(Vec<f32>, Vec<usize>), StageError> {
        if let Some(row) = input_row(&item.payload, self.cfg.rescale) {
            return Ok(row);
        }
        match &item.payload {
            Payload::Features(f) => Err(StageError::fatal(format!(
                "convnet `{}`: takes [height, width, channels] tensors, got one of shape {:?} ({})",
                self.stage,
                f.shape,
                item.meta.path.display()
            ))),
            _ => {
                Err(StageError::fatal(format!("convnet `{}`: expected images, got {}", self.stage, item.kind().name())))
            }
        }
    }

    fn first_shape(&self, shape: &[usize]) -> Result<(), StageError> {
        let input = shape3(shape).ok_or_else(|| StageError::fatal(format!("inputs of shape {shape:?}")))?;
        if let Some(b) = self.cfg.base
            && input[2] != b.channels()
        {
            return Err(StageError::fatal(format!(
                "convnet `{}`: base {b} takes block4 maps [h, w, {}] (onnx_features with {}), but the items \
                 have shape {input:?}",
                self.stage,
                b.channels(),
                b.block4_model()
            )));
        }
        if let Some(want) = self.expect
            && want != input
        {
            let block4 = self.cfg.base.map_or("", Base::block4_model);
            return Err(StageError::fatal(format!(
                "convnet `{}`: maps of shape {input:?} arrive, but block4 gives {want:?} on the images resized \
                 upstream: is the onnx_features model {block4} (not the whole base's)?",
                self.stage
            )));
        }
        if let Some(h) = &self.head {
            h.check_fits(&self.stage, self.cfg.base, input).map_err(StageError::fatal)?;
        }
        if let Some(want) = self.cfg.input_shape
            && want != input
        {
            return Err(StageError::fatal(format!(
                "convnet `{}`: images of shape {input:?} do not fit the first layer: input_shape is {want:?}",
                self.stage
            )));
        }
        let layers = self.head.as_ref().map_or_else(|| self.cfg.layers.clone(), |h| h.layers.clone());
        resolve(input, &self.cfg.specs(&layers)).map(|_| ()).map_err(|e| {
            StageError::fatal(format!(
                "convnet `{}`: the layers cannot take images of shape {input:?}: {e}",
                self.stage
            ))
        })
    }

    fn mismatch(&self, item: &Item, got: &[usize], first: &[usize]) -> StageError {
        StageError::fatal(format!(
            "convnet `{}`: {} has shape {got:?} but the model's input is {first:?} (resize every image to one size)",
            self.stage,
            item.meta.path.display()
        ))
    }

    fn save_model(
        &self,
        model: &ConvModel,
        out: &Path,
        mut description: serde_json::Value,
        provenance: &[serde_json::Value],
    ) -> Result<(), String> {
        model.net.save_safetensors(&out.join("model.safetensors")).map_err(|e| e.to_string())?;
        description["rescale"] = self.cfg.rescale.into();
        if let Some(b) = self.cfg.base {
            description["base"] = serde_json::to_value(b).unwrap_or_default();
            description["base_weights"] = self.cfg.base_weights().display().to_string().into();
        }
        if let Some(h) = &self.head {
            description["head_from"] = h.file.display().to_string().into();
        }
        if let Some(f) = &self.cfg.frozen_base {
            description["frozen_base"] = serde_json::to_value(f).unwrap_or_default();
        }
        description["params"] = model.net.param_count().into();
        description["images_from"] = provenance.to_vec().into();
        std::fs::write(out.join("model.json"), serde_json::to_string_pretty(&description).unwrap_or_default())
            .map_err(|e| format!("model.json: {e}"))
    }
}

fn shape3(s: &[usize]) -> Option<[usize; 3]> {
    <[usize; 3]>::try_from(s).ok()
}

/// The convnet as the shared trainer drives it; with `frozen_base`, the
/// phase it is in.
#[derive(Clone)]
pub struct ConvModel {
    net: Convnet,
    /// Set while the base is frozen (epochs 1..=`epochs`).
    frozen: Option<Frozen>,
}

/// The frozen phase of `frozen_base`.
#[derive(Clone)]
struct Frozen {
    /// Layers of the base: layer `layers` is the first that trains.
    layers: usize,
    epochs: usize,
    /// The optimizer of the epochs after.
    then: OptimizerSpec,
    /// The base's output for each input row it has seen, by the row's
    /// blake3: frozen, the base is a function of its input alone, so each
    /// map (a fixed augmented variant, a view) goes through block5 once,
    /// however many epochs see it. Shared by the epochs' copies (the
    /// validation of an epoch may run after the next began: the base is the
    /// same in both).
    memo: Arc<Mutex<HashMap<blake3::Hash, Box<[f32]>>>>,
    /// At most this many outputs are kept (`max_memory_mb`); past that the
    /// base runs again for the rows not kept.
    memo_rows: usize,
}

impl ConvModel {
    /// What the layers that train now take of `rows` rows of `x`: `x`
    /// itself, or, while the base is frozen, its output (kept rows from the
    /// memo, the others computed together in one pass).
    fn trained_input<'a>(&mut self, x: &'a [f32], rows: usize) -> Result<Cow<'a, [f32]>, String> {
        let Some(f) = &self.frozen else { return Ok(Cow::Borrowed(x)) };
        let per = x.len() / rows.max(1);
        let out_per = self.net.layers()[f.layers].input.len();
        let keys: Vec<blake3::Hash> = x.chunks_exact(per.max(1)).map(|r| blake3::hash(f32_bytes(r))).collect();
        let mut out = vec![0.0f32; rows * out_per];
        let mut memo = f.memo.lock().map_err(|_| "the frozen base's memo was poisoned".to_string())?;
        let missing: Vec<usize> = (0..rows)
            .filter(|&r| match memo.get(&keys[r]) {
                Some(v) => {
                    out[r * out_per..(r + 1) * out_per].copy_from_slice(v);
                    false
                }
                None => true,
            })
            .collect();
        if !missing.is_empty() {
            let mut xs = Vec::with_capacity(missing.len() * per);
            missing.iter().for_each(|&r| xs.extend_from_slice(&x[r * per..(r + 1) * per]));
            let made = self.net.layer_output(&xs, missing.len(), f.layers).map_err(|e| e.to_string())?;
            for (&r, v) in missing.iter().zip(made.chunks_exact(out_per)) {
                out[r * out_per..(r + 1) * out_per].copy_from_slice(v);
                if memo.len() < f.memo_rows {
                    memo.insert(keys[r], v.into());
                }
            }
        }
        Ok(Cow::Owned(out))
    }

    /// The first layer that trains now (0: all).
    fn trains_from(&self) -> usize {
        self.frozen.as_ref().map_or(0, |f| f.layers)
    }

    /// How many of [`Convnet::tensors`] are frozen now: the optimizer has
    /// slots for the ones after.
    fn frozen_tensors(&self) -> usize {
        self.net.tensors_below(self.trains_from())
    }
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialised bytes, and u8 has no alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Rows per forward pass in evaluation: bounds its memory.
const EVAL_CHUNK: usize = 100;

impl Model for ConvModel {
    type Opt = ConvOptimizer;

    fn output_dim(&self) -> usize {
        self.net.output_dim()
    }

    fn loss_kind(&self) -> LossKind {
        // Built by Convnet::new, which refuses a stack without its loss layer.
        self.net.loss_kind().expect("a trainer's convnet ends in its loss layer")
    }

    /// Past `frozen_base`'s epochs the base unfreezes and the stage's
    /// optimizer starts afresh (Keras's recompile after `trainable = True`).
    fn enter_epoch(&mut self, epoch: usize, opt: &mut ConvOptimizer) {
        if let Some(f) = self.frozen.take_if(|f| epoch > f.epochs) {
            tracing::info!("epoch {epoch}: the base unfreezes; {:?} from its first step", f.then);
            *opt = ConvOptimizer::new(f.then);
        }
    }

    fn train_batch(
        &mut self,
        x: &[f32],
        y: &[f32],
        rows: usize,
        opt: &mut ConvOptimizer,
        _l2: f32,
        rng: &mut ChaCha8Rng,
    ) -> Result<(f32, f64), String> {
        let from = self.trains_from();
        let x = self.trained_input(x, rows)?;
        let s = self.net.train_batch_above(from, &x, y, rows, opt, rng).map_err(|e| e.to_string())?;
        Ok((s.loss, s.correct))
    }

    fn evaluate(&mut self, x: &[f32], y: &[f32], rows: usize) -> Result<(f32, f32), String> {
        let per = x.len() / rows.max(1);
        let c = self.net.output_dim();
        let from = self.trains_from();
        let (mut loss, mut correct) = (0.0f64, 0.0f64);
        for start in (0..rows).step_by(EVAL_CHUNK) {
            let n = EVAL_CHUNK.min(rows - start);
            let xs = self.trained_input(&x[start * per..(start + n) * per], n)?;
            let (l, k) =
                self.net.evaluate_above(from, &xs, &y[start * c..(start + n) * c], n).map_err(|e| e.to_string())?;
            loss += l;
            correct += k;
        }
        let rows = rows.max(1) as f64;
        Ok(((loss / rows) as f32, (correct / rows) as f32))
    }

    fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        let per = x.len() / rows.max(1);
        let from = self.trains_from();
        let mut out = Vec::new();
        for start in (0..rows).step_by(EVAL_CHUNK) {
            let n = EVAL_CHUNK.min(rows - start);
            let xs = self.trained_input(&x[start * per..(start + n) * per], n)?;
            out.extend(self.net.predict_above(from, &xs, n).map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    fn l2_penalty(&self) -> f32 {
        0.0
    }

    const CHECKPOINTS: bool = true;

    /// Each weight tensor by its Keras name; with the optimizer, the two
    /// slots of each tensor that trains now as `<name>/slot1`, `<name>/slot2`.
    fn state(&self, opt: Option<&ConvOptimizer>) -> Option<ModelState> {
        let weights = self.net.tensors();
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
            weights.iter().map(|(n, shape, v)| (n.clone(), shape.clone(), v.to_vec())).collect();
        if let Some(opt) = opt {
            for ((name, shape, _), (s1, s2)) in weights.iter().skip(self.frozen_tensors()).zip(opt.slots()) {
                tensors.push((format!("{name}/slot1"), shape.clone(), s1.clone()));
                tensors.push((format!("{name}/slot2"), shape.clone(), s2.clone()));
            }
        }
        Some(ModelState { iterations: opt.map(|o| o.iterations()).unwrap_or(0), tensors })
    }

    /// The trainer has put the model in the checkpointed epoch's phase
    /// ([`Model::enter_epoch`]) first, so the slots are those of its tensors.
    fn set_state(&mut self, opt: Option<&mut ConvOptimizer>, state: &ModelState) -> Result<(), String> {
        let names: Vec<String> = self.net.tensors().into_iter().map(|(n, _, _)| n).collect();
        for name in &names {
            self.net.set_tensor(name, state.get(name)?).map_err(|e| e.to_string())?;
        }
        // Before its first step an optimizer has no slots (they start at zero then).
        if let Some(opt) = opt
            && state.iterations > 0
        {
            let mut slots = Vec::new();
            for name in names.iter().skip(self.frozen_tensors()) {
                slots.push((
                    state.get(&format!("{name}/slot1"))?.to_vec(),
                    state.get(&format!("{name}/slot2"))?.to_vec(),
                ));
            }
            opt.restore(state.iterations, slots);
        }
        Ok(())
    }
}
