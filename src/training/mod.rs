//! What the trainers (`dense_head`, `convnet`) share: items routed by
//! split, rows held (or spilled) per split, collected or streamed epochs,
//! validation after each epoch, early stopping and keep_best, the test
//! split at the end, and the outputs (`history.csv`, `curves.png`,
//! `metrics.json`, the weights and their description). A trainer kind
//! says only how an item becomes a row of its model's input and how its
//! model is made and saved ([`TrainerKind`]). A model that can give its
//! training state ([`Model::state`]) is checkpointed after every epoch
//! and resumes from there ([`checkpoint`]).

pub mod checkpoint;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::facts::{Facts, StageRecord, TrainedOn};
use crate::item::{ClassMode, Item};
use crate::ml::loss::LossKind;
use crate::stage::{BuildContext, Emit, EpochEnd, RunSignals, Stage, StageError};
use checkpoint::{Checkpoint, ModelState};

/// A trainer stage's option docs: its own (`$own`), then the ones every
/// trainer shares, listed once here so the two trainers' pages cannot drift.
macro_rules! trainer_options {
    ($($own:expr),* $(,)?) => {
        &[
            $($own,)*
            $crate::stage::OptionDoc { name: "epochs", ty: "int", default: "30", help: "passes over the training split" },
            $crate::stage::OptionDoc {
                name: "streaming",
                ty: "bool",
                default: "false",
                help: "train as batches arrive; epochs come from the source",
            },
            $crate::stage::OptionDoc { name: "threads", ty: "int", default: "0 (one per core)", help: "math threads" },
            $crate::stage::OptionDoc {
                name: "early_stopping",
                ty: "{monitor, patience}",
                default: "(off)",
                help: "stop when val_loss/val_acc stalls",
            },
            $crate::stage::OptionDoc { name: "keep_best", ty: "bool", default: "false", help: "restore the best epoch's weights" },
            $crate::stage::OptionDoc {
                name: "smooth_curves",
                ty: "float",
                default: "(off)",
                help: "also curves_smoothed.png, EMA of this factor (the book: 0.8)",
            },
            $crate::stage::OptionDoc { name: "train_split", ty: "string", default: "train", help: "items of this split train" },
            $crate::stage::OptionDoc { name: "validation_split", ty: "string", default: "validation", help: "validated each epoch" },
            $crate::stage::OptionDoc { name: "test_split", ty: "string", default: "test", help: "evaluated once at the end" },
        ]
    };
}
pub(crate) use trainer_options;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    ValLoss,
    ValAcc,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    #[serde(default = "default_monitor")]
    pub monitor: Monitor,
    /// Epochs without improvement before stopping.
    pub patience: usize,
}

fn default_monitor() -> Monitor {
    Monitor::ValLoss
}

/// The option checks every trainer shares: epochs, streaming, batch size,
/// early stopping.
pub fn check_training(
    epochs: Option<usize>,
    streaming: bool,
    batch_size: usize,
    early_stopping: Option<&EarlyStopping>,
) -> Vec<crate::stage::FieldError> {
    use crate::stage::FieldError;
    let mut errors = Vec::new();
    if epochs == Some(0) {
        errors.push(FieldError::new("epochs", "must be at least 1"));
    }
    if streaming && epochs.is_some() {
        errors.push(FieldError::new(
            "epochs",
            "with streaming: true the training source's `epochs` sets the number of epochs; remove this",
        ));
    }
    if batch_size == 0 {
        errors.push(FieldError::new("batch_size", "must be at least 1"));
    }
    if early_stopping.is_some_and(|es| es.patience == 0) {
        errors.push(FieldError::new("early_stopping", "patience must be at least 1"));
    }
    errors
}

/// The options every trainer has, as its config gives them.
#[derive(Debug, Clone)]
pub struct Common {
    pub out_dir: PathBuf,
    /// Passes over the collected rows (collected mode only).
    pub epochs: usize,
    pub streaming: bool,
    pub batch_size: usize,
    pub l2: f32,
    pub seed: u64,
    pub early_stopping: Option<EarlyStopping>,
    pub keep_best: bool,
    /// Also draw `curves_smoothed.png` with this EMA factor (the book's 0.8).
    pub smooth_curves: Option<f32>,
    pub max_memory_mb: u64,
    pub train_split: String,
    pub validation_split: String,
    pub test_split: String,
}

/// A trainable model as the shared trainer drives it.
pub trait Model: Clone + Send + 'static {
    type Opt: Send;
    fn output_dim(&self) -> usize;
    fn loss_kind(&self) -> LossKind;
    /// One step; the batch's mean loss and its correct count, before the update.
    fn train_batch(
        &mut self,
        x: &[f32],
        y: &[f32],
        rows: usize,
        opt: &mut Self::Opt,
        l2: f32,
        rng: &mut ChaCha8Rng,
    ) -> Result<(f32, f64), String>;
    /// Mean loss and accuracy of `rows` (no dropout).
    fn evaluate(&mut self, x: &[f32], y: &[f32], rows: usize) -> Result<(f32, f32), String>;
    fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>, String>;
    /// The L2 penalty at `l2 = 1` (sum of squared kernel weights), added to the validation loss.
    fn l2_penalty(&self) -> f32;
    /// Called before epoch `epoch` (1-based) trains, and, on resuming, with
    /// the checkpoint's epoch before its state is put back: a model that
    /// trains in phases (`frozen_base`) changes phase here, optimizer and all.
    fn enter_epoch(&mut self, _epoch: usize, _opt: &mut Self::Opt) {}
    /// Whether training writes a checkpoint after every epoch and resumes
    /// from it. Not the default: the dense head trains in seconds.
    const CHECKPOINTS: bool = false;
    /// The weights and, with `opt`, the optimizer's state, for a
    /// checkpoint. `None`, the default: this model keeps no checkpoints.
    fn state(&self, _opt: Option<&Self::Opt>) -> Option<ModelState> {
        None
    }
    /// Puts back what [`Model::state`] gave (the optimizer's part when `opt` is given).
    fn set_state(&mut self, _opt: Option<&mut Self::Opt>, _state: &ModelState) -> Result<(), String> {
        Err("this model keeps no checkpoints".into())
    }
}

/// A fresh model for the data, with what its description records.
pub struct NewModel<M: Model> {
    pub model: M,
    pub opt: M::Opt,
    /// The layer list as the description (`head.json`, `model.json`) records it.
    pub layers: serde_json::Value,
    pub threads: usize,
}

/// What differs between trainers.
pub trait TrainerKind: Send + 'static {
    type M: Model;
    fn common(&self) -> Common;
    /// Every option of the stage, as configured: with the stages upstream,
    /// what a checkpoint must have been written under to be resumed.
    fn options(&self) -> serde_json::Value;
    /// The model for data whose rows have `d.feature_shape` (known from the first item).
    fn new_model(&self, d: &Data) -> Result<NewModel<Self::M>, String>;
    /// One item as a row of the model's input, with its shape.
    fn row(&self, item: &Item) -> Result<(Vec<f32>, Vec<usize>), StageError>;
    /// Called with the first row's shape, before it is used: a shape the
    /// model cannot take stops the run here.
    fn first_shape(&self, _shape: &[usize]) -> Result<(), StageError> {
        Ok(())
    }
    /// The error for a row whose shape is not the first one's.
    fn mismatch(&self, item: &Item, got: &[usize], first: &[usize]) -> StageError;
    /// Writes the weights and the description (`description` plus the
    /// stages upstream, `provenance`) into `out`.
    fn save_model(
        &self,
        model: &Self::M,
        out: &Path,
        description: serde_json::Value,
        provenance: &[serde_json::Value],
    ) -> Result<(), String>;
}

impl<K: TrainerKind> TrainerStage<K> {
    pub fn new(kind: K, ctx: &BuildContext<'_>) -> TrainerStage<K> {
        let cfg = kind.common();
        let provenance = records(ctx.input);
        let fingerprint = checkpoint::fingerprint(&kind.options(), &provenance);
        let stream = cfg.streaming.then(|| Stream {
            trainer: None,
            x: Vec::new(),
            y: Vec::new(),
            n: 0,
            epoch: 0,
            rng: epoch_rng(cfg.seed, 0),
            validation_complete: false,
            pending: Vec::new(),
            stopped: false,
            resumed_through: 0,
        });
        TrainerStage {
            kind,
            cfg,
            data: Default::default(),
            summary: None,
            input: ctx.input.clone(),
            spilled: false,
            stream,
            signals: ctx.signals.clone(),
            fingerprint,
        }
    }
}

/// Rows of one split, with their labels. Features stay in memory until the
/// stage's `max_memory_mb` is reached; then every split's rows go to a
/// spill file beside the outputs and each epoch reads its batches back, so
/// data larger than memory trains with memory bounded by a batch.
#[derive(Default)]
struct Rows {
    x: Vec<f32>,
    spill: Option<std::fs::File>,
    y: Vec<f32>,
    n: usize,
    /// Which image each row is a view of (`views` stage), and which view.
    image: Vec<u32>,
    view: Vec<u8>,
    images: HashMap<Arc<Path>, u32>,
}

/// Mean loss and accuracy of a split; when its images came as several
/// views, those of view 0 alone beside them.
struct Scores {
    loss: f32,
    acc: f32,
    one_view: Option<OneView>,
}

struct OneView {
    loss: f32,
    acc: f32,
    views_per_image: f64,
}

impl Rows {
    /// Records that the next row is view `view` of the image at `path`.
    fn push_view(&mut self, path: &Arc<Path>, view: u8) {
        let next = self.images.len() as u32;
        self.image.push(*self.images.entry(path.clone()).or_insert(next));
        self.view.push(view);
    }

    /// Some image came as more than one view.
    fn has_views(&self) -> bool {
        self.images.len() < self.n
    }

    fn push(&mut self, row: &[f32]) -> std::io::Result<()> {
        match &mut self.spill {
            Some(f) => {
                use std::io::Write;
                let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
                f.write_all(&bytes)
            }
            None => {
                self.x.extend_from_slice(row);
                Ok(())
            }
        }
    }

    /// Moves the rows held so far to an (already unlinked) file in `dir`.
    fn spill_to(&mut self, dir: &Path, name: &str) -> std::io::Result<()> {
        if self.spill.is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!(".spill-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        // Unlinked at once: the space is returned however the run ends.
        std::fs::remove_file(&path)?;
        self.spill = Some(file);
        let held = std::mem::take(&mut self.x);
        self.push(&held)
    }

    /// Appends rows `idx` (features) to `out`.
    fn gather(&self, idx: impl Iterator<Item = usize>, dim: usize, out: &mut Vec<f32>) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; dim * 4];
        for i in idx {
            match &self.spill {
                None => out.extend_from_slice(&self.x[i * dim..(i + 1) * dim]),
                Some(f) => {
                    f.read_exact_at(&mut buf, (i * dim * 4) as u64)?;
                    out.extend(buf.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                }
            }
        }
        Ok(())
    }

    /// Mean loss and accuracy over all rows, a chunk at a time (the same
    /// chunks whether the rows are in memory or spilled, so both give
    /// identical numbers). With several views of an image, each image
    /// counts once, scored by its views' mean probabilities (test-time
    /// augmentation).
    fn evaluate<M: Model>(&self, head: &mut M, dim: usize, outputs: usize) -> Result<Scores, String> {
        if self.has_views() {
            return self.evaluate_views(head, dim, outputs);
        }
        let (mut loss, mut acc) = (0.0f64, 0.0f64);
        let mut x = Vec::new();
        for start in (0..self.n).step_by(EVAL_ROWS) {
            let n = EVAL_ROWS.min(self.n - start);
            x.clear();
            self.gather(start..start + n, dim, &mut x).map_err(|e| format!("reading spilled features: {e}"))?;
            let (l, a) =
                head.evaluate(&x, &self.y[start * outputs..(start + n) * outputs], n).map_err(|e| e.to_string())?;
            loss += l as f64 * n as f64;
            acc += a as f64 * n as f64;
        }
        Ok(Scores { loss: (loss / self.n as f64) as f32, acc: (acc / self.n as f64) as f32, one_view: None })
    }

    /// Loss and accuracy of each image's mean probability over its views,
    /// and of view 0 alone.
    fn evaluate_views<M: Model>(&self, head: &mut M, dim: usize, outputs: usize) -> Result<Scores, String> {
        let images = self.images.len();
        let mut sum = vec![0.0f64; images * outputs];
        let mut count = vec![0u32; images];
        let mut y = vec![0.0f32; images * outputs];
        let (mut first, mut first_y) = (Vec::new(), Vec::new());
        let mut x = Vec::new();
        for start in (0..self.n).step_by(EVAL_ROWS) {
            let n = EVAL_ROWS.min(self.n - start);
            x.clear();
            self.gather(start..start + n, dim, &mut x).map_err(|e| format!("reading spilled features: {e}"))?;
            let p = head.predict(&x, n).map_err(|e| e.to_string())?;
            for (r, p) in (start..start + n).zip(p.chunks_exact(outputs)) {
                let g = self.image[r] as usize;
                sum[g * outputs..(g + 1) * outputs].iter_mut().zip(p).for_each(|(s, &p)| *s += f64::from(p));
                count[g] += 1;
                let label = &self.y[r * outputs..(r + 1) * outputs];
                y[g * outputs..(g + 1) * outputs].copy_from_slice(label);
                if self.view[r] == 0 {
                    first.extend_from_slice(p);
                    first_y.extend_from_slice(label);
                }
            }
        }
        let mean: Vec<f32> = sum.iter().enumerate().map(|(i, &s)| (s / f64::from(count[i / outputs])) as f32).collect();
        let score = |p: &[f32], y: &[f32]| {
            let rows = p.len() / outputs;
            let (l, c) = crate::ml::loss::score_probabilities(head.loss_kind(), p, y, rows);
            ((l / rows.max(1) as f64) as f32, (c / rows.max(1) as f64) as f32)
        };
        let ((loss, acc), one) = (score(&mean, &y), score(&first, &first_y));
        let views_per_image = self.n as f64 / images as f64;
        Ok(Scores { loss, acc, one_view: Some(OneView { loss: one.0, acc: one.1, views_per_image }) })
    }
}

/// Rows evaluated per call: bounds the memory of evaluation.
const EVAL_ROWS: usize = 500;

#[derive(Default)]
pub struct Data {
    pub dim: usize,
    pub feature_shape: Vec<usize>,
    pub classes: Vec<String>,
    pub mode: ClassMode,
    train: Rows,
    validation: Rows,
    test: Rows,
}

pub struct TrainerStage<K: TrainerKind> {
    kind: K,
    cfg: Common,
    data: Data,
    summary: Option<serde_json::Value>,
    /// What arrives: recorded beside the weights (`trained_on`, and the
    /// stages that made the items), so the model is used on the same.
    input: Facts,
    spilled: bool,
    /// `streaming: true`: the training state between items.
    stream: Option<Stream<K::M>>,
    signals: Arc<RunSignals>,
    /// Of this stage's options and those upstream (see [`checkpoint`]).
    fingerprint: String,
}

/// One line of `history.csv`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub loss: f32,
    pub acc: f32,
    pub val_loss: Option<f32>,
    pub val_acc: Option<f32>,
    pub seconds: f64,
}

/// Shuffle (collected mode) and dropout both derive from (seed, epoch): reruns repeat.
fn epoch_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The model, its optimizer and the history: what both modes share.
struct Trainer<M: Model> {
    head: M,
    opt: M::Opt,
    layers: serde_json::Value,
    outputs: usize,
    threads: usize,
    history: Vec<EpochRecord>,
    /// Best monitored score and its epoch; its weights only with keep_best.
    best: Option<(f32, usize)>,
    best_head: Option<M>,
    started: Instant,
    /// The epoch being trained: summed loss, correct predictions, rows, start.
    loss_sum: f64,
    correct: f64,
    rows: usize,
    epoch_started: Instant,
    /// Rows the last finished epoch trained on.
    last_epoch_rows: usize,
    /// Resumed from a checkpoint of this epoch; the training seconds before.
    resumed_from: Option<usize>,
    seconds_before: f64,
}

/// One epoch's training figures, before validation.
#[derive(Clone)]
struct EpochTrain {
    epoch: usize,
    loss: f32,
    acc: f32,
    seconds: f64,
}

impl<M: Model> Trainer<M> {
    fn new<K: TrainerKind<M = M>>(kind: &K, d: &Data) -> Result<Trainer<M>, String> {
        let outputs = if d.mode == ClassMode::Categorical { d.classes.len() } else { 1 };
        let NewModel { model: head, opt, layers, threads } = kind.new_model(d)?;
        if head.output_dim() != outputs {
            return Err(format!(
                "the last layer has {} units but the data has {} label columns",
                head.output_dim(),
                outputs
            ));
        }
        Ok(Trainer {
            head,
            opt,
            layers,
            outputs,
            threads,
            history: Vec::new(),
            best: None,
            best_head: None,
            started: Instant::now(),
            loss_sum: 0.0,
            correct: 0.0,
            rows: 0,
            epoch_started: Instant::now(),
            last_epoch_rows: 0,
            resumed_from: None,
            seconds_before: 0.0,
        })
    }

    /// Continues from `cfg.out_dir`'s checkpoint when there is one of these
    /// options (`fingerprint`); returns the epochs it had finished (0: none)
    /// and whether early stopping had ended the training.
    fn resume(&mut self, cfg: &Common, fingerprint: &str) -> Result<(usize, bool), String> {
        if !M::CHECKPOINTS {
            return Ok((0, false));
        }
        let path = cfg.out_dir.join(checkpoint::FILE);
        let Some(c) = Checkpoint::load(&path)? else { return Ok((0, false)) };
        if c.fingerprint != fingerprint {
            tracing::warn!(
                "{}: written by a pipeline with other options; training from epoch 1 (it will be replaced)",
                path.display()
            );
            return Ok((0, false));
        }
        self.head.enter_epoch(c.epoch, &mut self.opt);
        self.head.set_state(Some(&mut self.opt), &c.model).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(best) = &c.best_model {
            let mut h = self.head.clone();
            h.set_state(None, best).map_err(|e| format!("{}: {e}", path.display()))?;
            self.best_head = Some(h);
        }
        (self.history, self.best, self.seconds_before) = (c.history, c.best, c.train_seconds);
        self.resumed_from = Some(c.epoch);
        tracing::info!("{}: resuming after epoch {}", path.display(), c.epoch);
        Ok((c.epoch, c.stopped))
    }

    /// Writes the state at the end of `epoch` (no-op for models without checkpoints).
    fn checkpoint(&self, cfg: &Common, fingerprint: &str, epoch: usize, stopped: bool) -> Result<(), String> {
        let Some(model) = self.head.state(Some(&self.opt)) else { return Ok(()) };
        std::fs::create_dir_all(&cfg.out_dir).map_err(|e| format!("{}: {e}", cfg.out_dir.display()))?;
        Checkpoint {
            fingerprint: fingerprint.to_string(),
            epoch,
            history: self.history.clone(),
            best: self.best,
            stopped,
            train_seconds: self.seconds_before + self.started.elapsed().as_secs_f64(),
            model,
            best_model: self.best_head.as_ref().and_then(|h| h.state(None)),
        }
        .save(&cfg.out_dir.join(checkpoint::FILE))
    }

    fn train_batch(&mut self, x: &[f32], y: &[f32], n: usize, l2: f32, rng: &mut ChaCha8Rng) -> Result<(), String> {
        if self.rows == 0 {
            self.epoch_started = Instant::now();
        }
        let (loss, correct) = self.head.train_batch(x, y, n, &mut self.opt, l2, rng)?;
        self.loss_sum += loss as f64 * n as f64;
        self.correct += correct;
        self.rows += n;
        Ok(())
    }

    /// Ends the epoch being trained and starts counting the next.
    fn close_epoch(&mut self, epoch: usize) -> EpochTrain {
        let n = self.rows.max(1) as f64;
        let done = EpochTrain {
            epoch,
            loss: (self.loss_sum / n) as f32,
            acc: (self.correct / n) as f32,
            seconds: self.epoch_started.elapsed().as_secs_f64(),
        };
        self.last_epoch_rows = self.rows;
        (self.loss_sum, self.correct, self.rows) = (0.0, 0.0, 0);
        done
    }

    /// Validation loss (with the L2 penalty, as Keras reports it) and accuracy of `head`.
    fn validate(cfg: &Common, d: &Data, head: &mut M) -> Result<(Option<f32>, Option<f32>), String> {
        if d.validation.n == 0 {
            return Ok((None, None));
        }
        let outputs = head.output_dim();
        let s = d.validation.evaluate(head, d.dim, outputs)?;
        Ok((Some(s.loss + cfg.l2 * head.l2_penalty()), Some(s.acc)))
    }

    /// Records an epoch validated with `snapshot` (the weights at its end;
    /// `None`: the current weights). True when early stopping ends training here.
    fn record(&mut self, cfg: &Common, t: EpochTrain, val: (Option<f32>, Option<f32>), snapshot: Option<&M>) -> bool {
        let record = EpochRecord {
            epoch: t.epoch,
            loss: t.loss,
            acc: t.acc,
            val_loss: val.0,
            val_acc: val.1,
            seconds: t.seconds,
        };
        tracing::info!(
            "epoch {}: loss {:.4} acc {:.4} val_loss {} val_acc {}",
            t.epoch,
            record.loss,
            record.acc,
            val.0.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
            val.1.map(|v| format!("{v:.4}")).unwrap_or("-".into())
        );
        metrics::gauge!(crate::telemetry::TRAIN_LOSS).set(record.loss as f64);
        metrics::gauge!(crate::telemetry::TRAIN_VAL_ACC).set(val.1.unwrap_or(0.0) as f64);
        let monitor = cfg.early_stopping.as_ref().map(|e| e.monitor).unwrap_or(Monitor::ValLoss);
        let score = monitor_value(&record, monitor);
        self.history.push(record);
        let Some(score) = score else { return false };
        if self.best.is_none_or(|(b, _)| score < b) {
            self.best = Some((score, t.epoch));
            if cfg.keep_best {
                self.best_head = Some(snapshot.unwrap_or(&self.head).clone());
            }
        }
        if let (Some(es), Some((_, best_epoch))) = (&cfg.early_stopping, &self.best)
            && t.epoch - best_epoch >= es.patience
        {
            tracing::info!(
                "early stopping after epoch {}: no better {:?} since epoch {best_epoch}",
                t.epoch,
                es.monitor
            );
            return true;
        }
        false
    }

    /// Writes history.csv, curves.png, the head, and metrics.json (with the test split's figures).
    fn save<K: TrainerKind<M = M>>(
        mut self,
        kind: &K,
        cfg: &Common,
        d: &Data,
        input: &Facts,
    ) -> Result<serde_json::Value, String> {
        let train_seconds = self.seconds_before + self.started.elapsed().as_secs_f64();
        let best_epoch = self.best.map(|(_, e)| e);
        if let Some(h) = self.best_head.take() {
            self.head = h;
        }
        let history = &self.history;
        let out = &cfg.out_dir;
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
        write_history(&out.join("history.csv"), history).map_err(|e| format!("history.csv: {e}"))?;
        let epochs: Vec<crate::plot::Epoch> =
            history.iter().map(|r| (r.epoch, r.loss, r.acc, r.val_loss, r.val_acc)).collect();
        crate::plot::curves(&out.join("curves.png"), &epochs).map_err(|e| format!("curves.png: {e}"))?;
        if let Some(factor) = cfg.smooth_curves {
            crate::plot::smoothed_curves(&out.join("curves_smoothed.png"), &epochs, factor)
                .map_err(|e| format!("curves_smoothed.png: {e}"))?;
        }
        let trained_on = TrainedOn::from_edge(input, d.classes.to_vec(), d.mode);
        let description = serde_json::json!({
            "layers": self.layers, "input_shape": d.feature_shape, "classes": d.classes,
            "class_mode": d.mode, "threads": self.threads, "seed": cfg.seed, "trained_on": trained_on,
        });
        kind.save_model(&self.head, out, description, &records(input))?;

        let last = history.last();
        let test = if d.test.n > 0 { Some(d.test.evaluate(&mut self.head, d.dim, self.outputs)?) } else { None };
        let (test_loss, test_acc) = (test.as_ref().map(|s| s.loss), test.as_ref().map(|s| s.acc));
        let (val_loss, val_acc) = if cfg.keep_best {
            let b = best_epoch.and_then(|e| history.iter().find(|r| r.epoch == e));
            (b.and_then(|r| r.val_loss), b.and_then(|r| r.val_acc))
        } else {
            (last.and_then(|r| r.val_loss), last.and_then(|r| r.val_acc))
        };
        let mut metrics = serde_json::json!({
            "epochs_run": history.len(), "best_epoch": best_epoch,
            "loss": last.map(|r| r.loss), "acc": last.map(|r| r.acc),
            "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
            "spilled_to_disk": d.train.spill.is_some(), "train_rows": self.last_epoch_rows, "validation_rows": d.validation.n, "test_rows": d.test.n,
            "train_seconds": (train_seconds * 1000.0).round() / 1000.0,
            "resumed_from_epoch": self.resumed_from,
        });
        // Test-time augmentation: the figures above average each image's
        // views; these are view 0 (the image as it is) alone, for comparison.
        // Validation's come from the history, so its one-view figures need a pass of their own.
        let val_one = if d.validation.has_views() {
            d.validation.evaluate(&mut self.head, d.dim, self.outputs)?.one_view
        } else {
            None
        };
        for (name, one) in [("val", val_one), ("test", test.and_then(|s| s.one_view))] {
            if let Some(one) = one {
                metrics[format!("{name}_loss_one_view")] = one.loss.into();
                metrics[format!("{name}_acc_one_view")] = one.acc.into();
                metrics[format!("{name}_views_per_image")] = one.views_per_image.into();
            }
        }
        std::fs::write(out.join("metrics.json"), serde_json::to_string_pretty(&metrics).unwrap_or_default() + "\n")
            .map_err(|e| format!("metrics.json: {e}"))?;
        // Finished: nothing is left to resume.
        match std::fs::remove_file(out.join(checkpoint::FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("{}: {e}", checkpoint::FILE)),
            _ => {}
        }
        Ok(metrics)
    }
}

/// Streaming mode: training rows are used as they arrive and never kept;
/// validation and test rows are collected once (from epoch 0).
struct Stream<M: Model> {
    trainer: Option<Trainer<M>>,
    x: Vec<f32>,
    y: Vec<f32>,
    n: usize,
    /// 1-based epoch being trained, and its dropout stream.
    epoch: usize,
    rng: ChaCha8Rng,
    /// Every validation row has arrived (its source's first epoch ended).
    validation_complete: bool,
    /// Epochs trained before validation was complete, with the weights at
    /// their end: validated, in order, once it is.
    pending: Vec<(EpochTrain, M)>,
    /// Early stopping ended training; later training items are ignored.
    stopped: bool,
    /// Epochs a checkpoint had finished: their training items are skipped.
    resumed_through: usize,
}

impl<K: TrainerKind> TrainerStage<K> {
    fn stream_train_row(&mut self, meta_epoch: u32, x: &[f32], y: &[f32]) -> Result<(), String> {
        let Some(st) = self.stream.as_mut() else { return Ok(()) };
        if st.stopped {
            return Ok(());
        }
        if st.trainer.is_none() {
            let mut t = Trainer::new(&self.kind, &self.data)?;
            let stopped;
            (st.resumed_through, stopped) = t.resume(&self.cfg, &self.fingerprint)?;
            st.trainer = Some(t);
            if stopped {
                st.stopped = true;
                self.signals.epochs_done.store(true, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
        }
        let epoch = meta_epoch as usize + 1;
        if epoch <= st.resumed_through {
            return Ok(());
        }
        if st.n == 0 && st.epoch != epoch {
            st.epoch = epoch;
            st.rng = epoch_rng(self.cfg.seed, epoch);
            if let Some(t) = st.trainer.as_mut() {
                t.head.enter_epoch(epoch, &mut t.opt);
            }
        }
        st.x.extend_from_slice(x);
        st.y.extend_from_slice(y);
        st.n += 1;
        if st.n == self.cfg.batch_size {
            self.stream_step()?;
        }
        Ok(())
    }

    fn stream_step(&mut self) -> Result<(), String> {
        let Some(st) = self.stream.as_mut() else { return Ok(()) };
        if let (Some(t), true) = (st.trainer.as_mut(), st.n > 0) {
            t.train_batch(&st.x, &st.y, st.n, self.cfg.l2, &mut st.rng)?;
        }
        st.x.clear();
        st.y.clear();
        st.n = 0;
        Ok(())
    }

    /// The training split's epoch ended: validate now, or later when the
    /// validation rows are all in.
    fn stream_close_epoch(&mut self) -> Result<(), String> {
        self.stream_step()?;
        let Some(st) = self.stream.as_mut() else { return Ok(()) };
        let Some(t) = st.trainer.as_mut() else { return Ok(()) };
        if st.stopped || t.rows == 0 {
            return Ok(());
        }
        let done = t.close_epoch(st.epoch);
        st.pending.push((done, t.head.clone()));
        if st.validation_complete { self.stream_validate_pending() } else { Ok(()) }
    }

    fn stream_validate_pending(&mut self) -> Result<(), String> {
        let Some(st) = self.stream.as_mut() else { return Ok(()) };
        let Some(t) = st.trainer.as_mut() else { return Ok(()) };
        let mut last = None;
        for (done, mut head) in std::mem::take(&mut st.pending) {
            let epoch = done.epoch;
            let val = Trainer::validate(&self.cfg, &self.data, &mut head)?;
            last = Some(epoch);
            if t.record(&self.cfg, done, val, Some(&head)) {
                // Whatever trained past this epoch is discarded: the result
                // is the same however late validation came.
                t.head = head;
                st.stopped = true;
                self.signals.epochs_done.store(true, std::sync::atomic::Ordering::Relaxed);
                break;
            }
        }
        // The weights and optimizer are those at the end of the last
        // validated epoch only while the next epoch has not begun.
        if let Some(epoch) = last
            && (st.stopped || (t.rows == 0 && epoch == st.epoch))
        {
            t.checkpoint(&self.cfg, &self.fingerprint, epoch, st.stopped)?;
        }
        Ok(())
    }
}

impl<K: TrainerKind> Stage for TrainerStage<K> {
    fn process(&mut self, item: Item, _out: &mut dyn Emit) -> Result<(), StageError> {
        let (row, shape) = self.kind.row(&item)?;
        let Some(label) = &item.meta.label else {
            return Err(StageError::item(&item.meta.path, "no label (class_mode: none?): cannot train on it"));
        };
        let d = &mut self.data;
        if d.dim == 0 {
            self.kind.first_shape(&shape)?;
            d.dim = row.len();
            d.feature_shape = shape;
            d.classes = label.classes.to_vec();
            d.mode = label.mode;
        } else if shape != d.feature_shape {
            return Err(self.kind.mismatch(&item, &shape, &d.feature_shape));
        }
        let y = match label.mode {
            ClassMode::Categorical => {
                let mut one_hot = vec![0.0; label.classes.len()];
                one_hot[label.index as usize] = 1.0;
                one_hot
            }
            _ => vec![label.index as f32],
        };
        let split = item.meta.split.as_deref().unwrap_or(&self.cfg.train_split);
        let streaming = self.stream.is_some();
        if streaming && split == self.cfg.train_split {
            return self.stream_train_row(item.meta.epoch, &row, &y).map_err(StageError::fatal);
        }
        if streaming && item.meta.epoch > 0 {
            // Validation and test rows do not change between epochs.
            return Ok(());
        }
        let rows = if split == self.cfg.train_split {
            &mut d.train
        } else if split == self.cfg.validation_split {
            &mut d.validation
        } else if split == self.cfg.test_split {
            &mut d.test
        } else {
            return Err(StageError::item(
                &item.meta.path,
                format!("split `{split}` is none of train/validation/test splits configured"),
            ));
        };
        rows.push(&row).map_err(|e| StageError::fatal(format!("spilling features: {e}")))?;
        rows.push_view(&item.meta.path, item.meta.view);
        rows.y.extend(y);
        rows.n += 1;
        let held = (d.train.x.len() + d.validation.x.len() + d.test.x.len()) as u64 * 4;
        if held > self.cfg.max_memory_mb << 20 {
            let dir = &self.cfg.out_dir;
            for (name, r) in [("train", &mut d.train), ("validation", &mut d.validation), ("test", &mut d.test)] {
                r.spill_to(dir, name)
                    .map_err(|e| StageError::fatal(format!("spilling features to {}: {e}", dir.display())))?;
            }
            if !self.spilled {
                tracing::info!(
                    "features exceed max_memory_mb ({}): spilled to disk, read back each epoch",
                    self.cfg.max_memory_mb
                );
                self.spilled = true;
            }
        }
        Ok(())
    }

    fn end_epoch(&mut self, marker: &EpochEnd, _out: &mut dyn Emit) -> Result<(), StageError> {
        let Some(st) = self.stream.as_mut() else { return Ok(()) };
        let has = |split: &str| marker.splits.iter().any(|s| s == split);
        if marker.epoch == 0 && has(&self.cfg.validation_split) {
            st.validation_complete = true;
        }
        let result = if marker.splits.is_empty() || has(&self.cfg.train_split) {
            self.stream_close_epoch()
        } else if st.validation_complete {
            self.stream_validate_pending()
        } else {
            Ok(())
        };
        result.map_err(StageError::fatal)
    }

    fn finish(&mut self, _out: &mut dyn Emit, signals: &RunSignals) -> Result<(), StageError> {
        if signals.interrupted() || signals.aborted() {
            return Ok(());
        }
        let summary = if self.stream.is_some() {
            // A source that sent no markers: its items were one epoch.
            self.stream_close_epoch().map_err(StageError::fatal)?;
            if let Some(st) = self.stream.as_mut() {
                st.validation_complete = true;
            }
            self.stream_validate_pending().map_err(StageError::fatal)?;
            let trainer = self.stream.as_mut().and_then(|st| st.trainer.take()).ok_or_else(|| {
                StageError::fatal(format!("no items of split `{}` to train on", self.cfg.train_split))
            })?;
            trainer.save(&self.kind, &self.cfg, &self.data, &self.input).map_err(StageError::fatal)?
        } else {
            let run = Collected { cfg: &self.cfg, d: &self.data, input: &self.input, fingerprint: &self.fingerprint };
            run.train(&self.kind, signals).map_err(StageError::fatal)?
        };
        self.summary = Some(summary);
        Ok(())
    }

    fn summary(&self) -> Option<serde_json::Value> {
        self.summary.clone()
    }
}

fn monitor_value(r: &EpochRecord, m: Monitor) -> Option<f32> {
    match m {
        Monitor::ValLoss => r.val_loss,
        Monitor::ValAcc => r.val_acc.map(|a| -a),
    }
}

/// Collected mode: every row is in `d`; `epochs` shuffled passes over it.
struct Collected<'a> {
    cfg: &'a Common,
    d: &'a Data,
    input: &'a Facts,
    fingerprint: &'a str,
}

impl Collected<'_> {
    fn train<K: TrainerKind>(&self, kind: &K, signals: &RunSignals) -> Result<serde_json::Value, String> {
        let (cfg, d) = (self.cfg, self.d);
        if d.train.n == 0 {
            return Err(format!("no items of split `{}` to train on", cfg.train_split));
        }
        let mut t = Trainer::new(kind, d)?;
        let (done, stopped) = t.resume(cfg, self.fingerprint)?;
        let outputs = t.outputs;
        let mut order: Vec<usize> = (0..d.train.n).collect();
        let (mut xb, mut yb) = (Vec::new(), Vec::new());
        for epoch in 1..=cfg.epochs {
            if stopped || signals.interrupted() {
                break;
            }
            let mut rng = epoch_rng(cfg.seed, epoch);
            // Each epoch shuffles the order the one before left, so a
            // resumed run replays the shuffles of the epochs it skips.
            order.shuffle(&mut rng);
            if epoch <= done {
                continue;
            }
            t.head.enter_epoch(epoch, &mut t.opt);
            for chunk in order.chunks(cfg.batch_size) {
                xb.clear();
                yb.clear();
                d.train
                    .gather(chunk.iter().copied(), d.dim, &mut xb)
                    .map_err(|e| format!("reading spilled features: {e}"))?;
                for &i in chunk {
                    yb.extend_from_slice(&d.train.y[i * outputs..(i + 1) * outputs]);
                }
                t.train_batch(&xb, &yb, chunk.len(), cfg.l2, &mut rng)?;
            }
            let epoch_done = t.close_epoch(epoch);
            let val = Trainer::validate(cfg, d, &mut t.head)?;
            let stop = t.record(cfg, epoch_done, val, None);
            t.checkpoint(cfg, self.fingerprint, epoch, stop)?;
            if stop {
                break;
            }
        }
        t.save(kind, cfg, d, self.input)
    }
}

/// The stages that made the items, as a trained model's description lists them.
fn records(input: &Facts) -> Vec<serde_json::Value> {
    input.made_by.iter().map(StageRecord::to_json).collect()
}

fn write_history(path: &Path, history: &[EpochRecord]) -> std::io::Result<()> {
    let opt = |v: Option<f32>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    let mut text = String::from("epoch,loss,acc,val_loss,val_acc,seconds\n");
    for r in history {
        text.push_str(&format!(
            "{},{:.6},{:.6},{},{},{:.3}\n",
            r.epoch,
            r.loss,
            r.acc,
            opt(r.val_loss),
            opt(r.val_acc),
            r.seconds
        ));
    }
    std::fs::write(path, text)
}
