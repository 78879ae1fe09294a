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
//! Writes to `out_dir`: `history.csv`, `curves.png`, `metrics.json`,
//! `model.safetensors` (Keras names and shapes) and `model.json` (layers,
//! input shape, classes, and the stages that made the images).

use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::trainer::checkpoint::ModelState;
use super::trainer::{Common, Data, EarlyStopping, Model, NewModel, TrainerKind, TrainerStage, check_training};
use crate::item::{ClassMode, Item, ItemKind, Payload};
use crate::ml::convnet::spec::{self, resolve};
use crate::ml::convnet::{ConvOptimizer, Convnet, ConvnetError, LayerSpec};
use crate::ml::loss::LossKind;
use crate::ml::optimizer::OptimizerSpec;
use crate::stage::{BuildContext, Built, FieldError, OptionDoc, StageConfig, StageError, Upstream};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvnetConfig {
    pub out_dir: PathBuf,
    /// Keras layers: conv2d, max_pooling2d, flatten, dropout, dense.
    pub layers: Vec<LayerSpec>,
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
        if self.threads > 0 { self.threads } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) }
    }

    /// Keras's `model.summary()` for `input` (default: `input_shape`).
    pub fn summary(&self, title: &str, input: Option<[usize; 3]>) -> Result<String, String> {
        let input = input
            .or(self.input_shape)
            .ok_or_else(|| "no input shape: declare `input_shape`, or put a `resize` upstream".to_string())?;
        let (layers, _) = resolve(input, &self.layers).map_err(|e| e.to_string())?;
        Ok(spec::summary(title, input, &layers))
    }
}

/// Where the layer list refers to in the options, for `file:line:col`.
fn field_of(e: &ConvnetError) -> String {
    match e {
        ConvnetError::Layer { index, .. } => format!("layers[{index}]"),
        _ => "layers".into(),
    }
}

impl StageConfig for ConvnetConfig {
    const KIND: &'static str = "convnet";
    const SUMMARY: &'static str =
        "trains a convnet from scratch on images (the book's 5.1, 5.2), validates, tests, saves";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image, ItemKind::Features];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "out_dir",
            ty: "path",
            default: "(required)",
            help: "history.csv, curves.png, model.safetensors, metrics.json",
        },
        OptionDoc {
            name: "layers",
            ty: "[{kind: conv2d|max_pooling2d|flatten|dropout|dense, ...}]",
            default: "(required)",
            help: "Keras layers, names and defaults",
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
        OptionDoc { name: "epochs", ty: "int", default: "30", help: "passes over the training split" },
        OptionDoc {
            name: "streaming",
            ty: "bool",
            default: "false",
            help: "train as batches arrive; epochs come from the source",
        },
        OptionDoc { name: "batch_size", ty: "int", default: "32", help: "images per step" },
        OptionDoc { name: "seed", ty: "int", default: "0", help: "init and dropout seed" },
        OptionDoc { name: "threads", ty: "int", default: "0 (one per core)", help: "math threads" },
        OptionDoc {
            name: "early_stopping",
            ty: "{monitor, patience}",
            default: "(off)",
            help: "stop when val_loss/val_acc stalls",
        },
        OptionDoc { name: "keep_best", ty: "bool", default: "false", help: "restore the best epoch's weights" },
        OptionDoc { name: "max_memory_mb", ty: "int", default: "4096", help: "images kept in RAM; beyond, spilled" },
        OptionDoc { name: "train_split", ty: "string", default: "train", help: "items of this split train" },
        OptionDoc { name: "validation_split", ty: "string", default: "validation", help: "validated each epoch" },
        OptionDoc { name: "test_split", ty: "string", default: "test", help: "evaluated once at the end" },
    ];

    fn check(&self) -> Vec<FieldError> {
        let mut errors = check_training(self.epochs, self.streaming, self.batch_size, self.early_stopping.as_ref());
        if !(self.rescale.is_finite() && self.rescale > 0.0) {
            errors.push(FieldError::new("rescale", "must be a positive number"));
        }
        // Without a declared shape, a stand-in one still catches the
        // structural mistakes (dense on a map, conv2d on a vector); the sizes
        // are checked on the first image.
        let probe = self.input_shape.unwrap_or([1024, 1024, 1]);
        if let Err(e) = resolve(probe, &self.layers) {
            let size_only = self.input_shape.is_none()
                && matches!(&e, ConvnetError::Layer { message, .. } if message.contains("cannot"));
            if !size_only {
                errors.push(FieldError::new(field_of(&e), e.to_string()));
            }
        }
        errors
    }

    fn model_summary(&self, stage_id: &str, upstream: Upstream<'_>) -> Option<Result<String, String>> {
        // The items arriving from upstream, unless the shape is declared.
        if self.input_shape.is_some() {
            return Some(self.summary(stage_id, None));
        }
        let input = match upstream().map(|u| u.shape) {
            Ok(Some(s)) if s.len() == 3 => Some([s[0], s[1], s[2]]),
            Ok(Some(s)) => {
                return Some(Err(format!("its input items are of shape {s:?}, not [height, width, channels]")));
            }
            Ok(None) => None,
            Err(e) => return Some(Err(e)),
        };
        Some(self.summary(stage_id, input))
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        // An image size fixed upstream (resize) that the declared shape
        // contradicts stops the run here, before any image is read.
        if let (Some((h, w)), Some(want)) = (ctx.image_size, self.input_shape) {
            // Channels are checked here when a stage upstream fixes them (decode), else at the first image.
            let got = [h as usize, w as usize, ctx.image_channels.map_or(want[2], |c| c as usize)];
            if got != want {
                return Err(StageError::fatal(format!(
                    "convnet `{}`: images arrive as {got:?} (resized upstream) but input_shape is {want:?}",
                    ctx.stage_id
                )));
            }
        }
        Ok(Built::Stage(Box::new(TrainerStage::new(Kind { cfg: self.clone(), stage: ctx.stage_id.to_string() }, ctx))))
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

/// The config with the stage's id, for messages.
struct Kind {
    cfg: ConvnetConfig,
    stage: String,
}

impl TrainerKind for Kind {
    type M = ConvModel;

    fn options(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or_default()
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
            max_memory_mb: c.max_memory_mb,
            train_split: c.train_split.clone(),
            validation_split: c.validation_split.clone(),
            test_split: c.test_split.clone(),
        }
    }

    fn new_model(&self, d: &Data) -> Result<NewModel<ConvModel>, String> {
        let input = shape3(&d.feature_shape).ok_or_else(|| format!("inputs of shape {:?}", d.feature_shape))?;
        let threads = self.cfg.threads();
        let model = Convnet::new(input, &self.cfg.layers, self.cfg.seed, threads).map_err(|e| e.to_string())?;
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
        Ok(NewModel {
            model: ConvModel(model),
            opt: ConvOptimizer::new(self.cfg.optimizer),
            layers: serde_json::to_value(&self.cfg.layers).map_err(|e| e.to_string())?,
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
        if let Some(want) = self.cfg.input_shape
            && want != input
        {
            return Err(StageError::fatal(format!(
                "convnet `{}`: images of shape {input:?} do not fit the first layer: input_shape is {want:?}",
                self.stage
            )));
        }
        resolve(input, &self.cfg.layers).map(|_| ()).map_err(|e| {
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
        model.0.save_safetensors(&out.join("model.safetensors")).map_err(|e| e.to_string())?;
        description["rescale"] = self.cfg.rescale.into();
        description["params"] = model.0.param_count().into();
        description["images_from"] = provenance.to_vec().into();
        std::fs::write(out.join("model.json"), serde_json::to_string_pretty(&description).unwrap_or_default())
            .map_err(|e| format!("model.json: {e}"))
    }
}

fn shape3(s: &[usize]) -> Option<[usize; 3]> {
    <[usize; 3]>::try_from(s).ok()
}

/// The convnet as the shared trainer drives it.
#[derive(Clone)]
pub struct ConvModel(Convnet);

/// Rows per forward pass in evaluation: bounds its memory.
const EVAL_CHUNK: usize = 100;

impl Model for ConvModel {
    type Opt = ConvOptimizer;

    fn output_dim(&self) -> usize {
        self.0.output_dim()
    }

    fn loss_kind(&self) -> LossKind {
        self.0.loss_kind()
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
        let s = self.0.train_batch(x, y, rows, opt, rng).map_err(|e| e.to_string())?;
        Ok((s.loss, s.correct))
    }

    fn evaluate(&mut self, x: &[f32], y: &[f32], rows: usize) -> Result<(f32, f32), String> {
        let per = x.len() / rows.max(1);
        let c = self.0.output_dim();
        let (mut loss, mut correct) = (0.0f64, 0.0f64);
        for start in (0..rows).step_by(EVAL_CHUNK) {
            let n = EVAL_CHUNK.min(rows - start);
            let (l, k) = self
                .0
                .evaluate(&x[start * per..(start + n) * per], &y[start * c..(start + n) * c], n)
                .map_err(|e| e.to_string())?;
            loss += l;
            correct += k;
        }
        let rows = rows.max(1) as f64;
        Ok(((loss / rows) as f32, (correct / rows) as f32))
    }

    fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        let per = x.len() / rows.max(1);
        let mut out = Vec::new();
        for start in (0..rows).step_by(EVAL_CHUNK) {
            let n = EVAL_CHUNK.min(rows - start);
            out.extend(self.0.predict(&x[start * per..(start + n) * per], n).map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    fn l2_penalty(&self) -> f32 {
        0.0
    }

    /// Each weight tensor by its Keras name; with the optimizer, its two
    /// slots as `<name>/slot1`, `<name>/slot2`.
    fn state(&self, opt: Option<&ConvOptimizer>) -> Option<ModelState> {
        let weights = self.0.tensors();
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
            weights.iter().map(|(n, shape, v)| (n.clone(), shape.clone(), v.to_vec())).collect();
        if let Some(opt) = opt {
            for ((name, shape, _), (s1, s2)) in weights.iter().zip(opt.slots()) {
                tensors.push((format!("{name}/slot1"), shape.clone(), s1.clone()));
                tensors.push((format!("{name}/slot2"), shape.clone(), s2.clone()));
            }
        }
        Some(ModelState { iterations: opt.map(|o| o.iterations()).unwrap_or(0), tensors })
    }

    fn set_state(&mut self, opt: Option<&mut ConvOptimizer>, state: &ModelState) -> Result<(), String> {
        let names: Vec<String> = self.0.tensors().into_iter().map(|(n, _, _)| n).collect();
        for name in &names {
            self.0.set_tensor(name, state.get(name)?).map_err(|e| e.to_string())?;
        }
        // Before its first step an optimizer has no slots (they start at zero then).
        if let Some(opt) = opt
            && state.iterations > 0
        {
            let mut slots = Vec::new();
            for name in &names {
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
