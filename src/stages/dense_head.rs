//! `dense_head`: trains the book's classifier on extracted features
//! (section 5.3.1), validating each epoch and evaluating the test split at
//! the end. Items are routed by their split (`train`, `validation`, `test`),
//! so one source reading all three splits feeds training, validation and
//! evaluation in one run.
//!
//! Writes to `out_dir`: `history.csv`, `curves.png` (the book's two plots),
//! `head.safetensors` + `head.json` (weights and what they need), and
//! `metrics.json`.

use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::facts::Facts;
use crate::item::{ClassMode, Item, ItemKind, Payload};
use crate::ml::convnet::LayerSpec as ConvLayerSpec;
use crate::ml::convnet::spec::{self, Shape};
use crate::ml::head::{Head, LayerSpec, Optimizer, OptimizerSpec};
use crate::ml::loss::LossKind;
use crate::stage::{BuildContext, Built, FieldError, OptionDoc, StageConfig, StageError};
use crate::training::{Common, Data, Model, NewModel, TrainerKind, TrainerStage, check_training, trainer_options};

/// The early-stopping options live with the shared trainer; named here too, where they were first.
pub use crate::training::{EarlyStopping, Monitor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseHeadConfig {
    pub out_dir: PathBuf,
    /// Default: the book's Dense(256, relu), Dropout(0.5), Dense(1, sigmoid)
    /// (Dense(C, softmax) for C > 2 categorical classes).
    #[serde(default)]
    pub layers: Option<Vec<LayerSpec>>,
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerSpec,
    /// Passes over the collected rows (default 30). Not with `streaming`,
    /// where the training source's `epochs` decides.
    #[serde(default)]
    pub epochs: Option<usize>,
    /// Train on batches as they arrive, one epoch per end-of-epoch marker of
    /// the training split, without keeping training rows: for augmentation
    /// that differs every epoch. Validation/test rows are kept from epoch 0.
    #[serde(default)]
    pub streaming: bool,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub l2: f32,
    #[serde(default)]
    pub seed: u64,
    /// Math threads; 0 = one per core. Results are identical for the same
    /// seed and thread count.
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    /// Restore the weights of the best epoch (by the early-stopping monitor,
    /// else val_loss) before evaluating and saving.
    #[serde(default)]
    pub keep_best: bool,
    /// Also draw `curves_smoothed.png`: each curve as the book smooths it
    /// (exponential moving average with this factor, e.g. 0.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smooth_curves: Option<f32>,
    /// Features held in memory before spilling to disk (MiB).
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u64,
    #[serde(default = "default_train")]
    pub train_split: String,
    #[serde(default = "default_validation")]
    pub validation_split: String,
    #[serde(default = "default_test")]
    pub test_split: String,
}

fn default_optimizer() -> OptimizerSpec {
    OptimizerSpec::rmsprop(2e-5)
}
impl DenseHeadConfig {
    pub fn epochs(&self) -> usize {
        self.epochs.unwrap_or(30)
    }
}

fn default_batch_size() -> usize {
    20
}
fn default_max_memory_mb() -> u64 {
    2048
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

impl StageConfig for DenseHeadConfig {
    const KIND: &'static str = "dense_head";
    const SUMMARY: &'static str = "trains a dense classifier on features (the book's 5.3.1), validates, tests, saves";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Features];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = trainer_options![
        OptionDoc {
            name: "out_dir",
            ty: "path",
            default: "(required)",
            help: "history.csv, curves.png, head.safetensors, metrics.json",
        },
        OptionDoc {
            name: "layers",
            ty: "[{kind: dense|dropout, ...}]",
            default: "the book's",
            help: "dense: units, activation; dropout: rate",
        },
        OptionDoc {
            name: "optimizer",
            ty: "{name: rmsprop|adam|sgd, ...}",
            default: "rmsprop lr 2e-5",
            help: "Keras semantics and defaults",
        },
        OptionDoc { name: "batch_size", ty: "int", default: "20", help: "rows per step" },
        OptionDoc { name: "l2", ty: "float", default: "0", help: "L2 weight decay on every kernel" },
        OptionDoc { name: "seed", ty: "int", default: "0", help: "init, shuffle and dropout seed" },
        OptionDoc {
            name: "max_memory_mb",
            ty: "int",
            default: "2048",
            help: "features kept in RAM; beyond, spilled to disk",
        },
    ];

    fn check(&self) -> Vec<FieldError> {
        let mut errors = check_training(self.epochs, self.streaming, self.batch_size, self.early_stopping.as_ref());
        if let Some(f) = self.smooth_curves
            && !(f > 0.0 && f < 1.0)
        {
            errors.push(FieldError::new("smooth_curves", format!("the smoothing factor must be in (0, 1), got {f}")));
        }
        errors
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(TrainerStage::new(self.clone(), ctx))))
    }

    fn model_summary(&self, stage_id: &str, input: &Facts) -> Option<Result<String, String>> {
        Some(self.summary(stage_id, input))
    }
}

impl DenseHeadConfig {
    /// Keras's `model.summary()` of the head on the features upstream: each
    /// image's features, flattened, are its input vector (the book's
    /// `input_dim=4 * 4 * 512`).
    fn summary(&self, title: &str, input: &Facts) -> Result<String, String> {
        let from = input.made_by.last().map_or("", |r| r.id.as_str());
        let shape = input.item_shape().ok_or_else(|| {
            format!(
                "the features' shape is not known before the run: they come from `{from}`, whose images are of no \
                 fixed size: put a `resize` before it"
            )
        })?;
        let layers = match (&self.layers, input.class_outputs()) {
            (Some(layers), _) => layers.clone(),
            (None, Some(outputs)) => LayerSpec::book_categorical(outputs),
            (None, None) => {
                return Err("the default head ends in one unit per class, and the source's class count is not \
                            known before the run: name the `layers`"
                    .into());
            }
        };
        let specs: Vec<ConvLayerSpec> = layers.iter().map(|&l| ConvLayerSpec::from(l)).collect();
        let input = Shape::Flat(shape.iter().product());
        let (resolved, _) = spec::resolve_from(input, &specs).map_err(|e| e.to_string())?;
        Ok(spec::summary_from(title, input, &resolved))
    }
}

impl TrainerKind for DenseHeadConfig {
    type M = HeadModel;

    fn options(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn common(&self) -> Common {
        Common {
            out_dir: self.out_dir.clone(),
            epochs: self.epochs(),
            streaming: self.streaming,
            batch_size: self.batch_size,
            l2: self.l2,
            seed: self.seed,
            early_stopping: self.early_stopping.clone(),
            keep_best: self.keep_best,
            smooth_curves: self.smooth_curves,
            max_memory_mb: self.max_memory_mb,
            train_split: self.train_split.clone(),
            validation_split: self.validation_split.clone(),
            test_split: self.test_split.clone(),
        }
    }

    fn new_model(&self, d: &Data) -> Result<NewModel<HeadModel>, String> {
        let outputs = if d.mode == ClassMode::Categorical { d.classes.len() } else { 1 };
        let layers = self.layers.clone().unwrap_or_else(|| LayerSpec::book_categorical(outputs));
        let mut head = Head::new(d.dim, &layers, self.seed).map_err(|e| e.to_string())?;
        let threads = crate::config::threads(self.threads, 1);
        head.set_threads(threads);
        Ok(NewModel {
            model: HeadModel(head),
            opt: Optimizer::new(self.optimizer),
            layers: serde_json::to_value(&layers).map_err(|e| e.to_string())?,
            threads,
        })
    }

    fn row(&self, item: &Item) -> Result<(Vec<f32>, Vec<usize>), StageError> {
        let Payload::Features(f) = &item.payload else {
            return Err(StageError::fatal(format!("expected features, got {}", item.kind().name())));
        };
        Ok((f.data.clone(), f.shape.clone()))
    }

    fn mismatch(&self, item: &Item, got: &[usize], first: &[usize]) -> StageError {
        StageError::item(&item.meta.path, format!("features of shape {got:?}, earlier ones {first:?}"))
    }

    fn save_model(
        &self,
        model: &HeadModel,
        out: &Path,
        mut description: serde_json::Value,
        provenance: &[serde_json::Value],
    ) -> Result<(), String> {
        model.0.save_safetensors(&out.join("head.safetensors")).map_err(|e| e.to_string())?;
        description["features_from"] = provenance.to_vec().into();
        std::fs::write(out.join("head.json"), serde_json::to_string_pretty(&description).unwrap_or_default())
            .map_err(|e| format!("head.json: {e}"))
    }
}

/// The dense head as the shared trainer drives it.
#[derive(Clone)]
pub struct HeadModel(Head);

impl Model for HeadModel {
    type Opt = Optimizer;

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
        opt: &mut Optimizer,
        l2: f32,
        rng: &mut ChaCha8Rng,
    ) -> Result<(f32, f64), String> {
        let s = self.0.train_batch(x, y, rows, opt, l2, rng).map_err(|e| e.to_string())?;
        Ok((s.loss, s.correct))
    }

    fn evaluate(&mut self, x: &[f32], y: &[f32], rows: usize) -> Result<(f32, f32), String> {
        self.0.evaluate(x, y, rows).map_err(|e| e.to_string())
    }

    fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        self.0.predict(x, rows).map_err(|e| e.to_string())
    }

    fn l2_penalty(&self) -> f32 {
        self.0.l2_penalty(1.0)
    }
}
