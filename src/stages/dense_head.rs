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
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::item::{ClassMode, Item, ItemKind, Payload};
use crate::ml::head::{Head, LayerSpec, Optimizer, OptimizerSpec};
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, RunSignals, Stage, StageConfig, StageError};

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
    #[serde(default = "default_epochs")]
    pub epochs: usize,
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
fn default_epochs() -> usize {
    30
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
    const OPTIONS: &'static [OptionDoc] = &[
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
        OptionDoc { name: "epochs", ty: "int", default: "30", help: "passes over the training split" },
        OptionDoc { name: "batch_size", ty: "int", default: "20", help: "rows per step" },
        OptionDoc { name: "l2", ty: "float", default: "0", help: "L2 weight decay on every kernel" },
        OptionDoc { name: "seed", ty: "int", default: "0", help: "init, shuffle and dropout seed" },
        OptionDoc { name: "threads", ty: "int", default: "0 (one per core)", help: "math threads" },
        OptionDoc {
            name: "early_stopping",
            ty: "{monitor, patience}",
            default: "(off)",
            help: "stop when val_loss/val_acc stalls",
        },
        OptionDoc { name: "keep_best", ty: "bool", default: "false", help: "restore the best epoch's weights" },
        OptionDoc {
            name: "max_memory_mb",
            ty: "int",
            default: "2048",
            help: "features kept in RAM; beyond, spilled to disk",
        },
        OptionDoc { name: "train_split", ty: "string", default: "train", help: "items of this split train" },
        OptionDoc { name: "validation_split", ty: "string", default: "validation", help: "validated each epoch" },
        OptionDoc { name: "test_split", ty: "string", default: "test", help: "evaluated once at the end" },
    ];

    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.epochs == 0 {
            errors.push(FieldError::new("epochs", "must be at least 1"));
        }
        if self.batch_size == 0 {
            errors.push(FieldError::new("batch_size", "must be at least 1"));
        }
        if let Some(es) = &self.early_stopping
            && es.patience == 0
        {
            errors.push(FieldError::new("early_stopping", "patience must be at least 1"));
        }
        errors
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let provenance = ctx
            .upstream
            .iter()
            .map(|(kind, options)| serde_json::json!({ "kind": kind, "options": options }))
            .collect();
        Ok(Built::Stage(Box::new(DenseHead {
            cfg: self.clone(),
            data: Default::default(),
            summary: None,
            provenance,
            spilled: false,
        })))
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
}

impl Rows {
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
    /// identical numbers).
    fn evaluate(&self, head: &mut Head, dim: usize, outputs: usize) -> Result<(f32, f32), String> {
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
        Ok(((loss / self.n as f64) as f32, (acc / self.n as f64) as f32))
    }
}

/// Rows evaluated per call: bounds the memory of evaluation.
const EVAL_ROWS: usize = 500;

#[derive(Default)]
struct Data {
    dim: usize,
    feature_shape: Vec<usize>,
    classes: Vec<String>,
    mode: ClassMode,
    train: Rows,
    validation: Rows,
    test: Rows,
}

struct DenseHead {
    cfg: DenseHeadConfig,
    data: Data,
    summary: Option<serde_json::Value>,
    /// The stages that made the features, recorded in head.json so the head
    /// can be used (and exported) with the same model and preprocessing.
    provenance: Vec<serde_json::Value>,
    spilled: bool,
}

#[derive(Debug, Clone, Serialize)]
struct EpochRecord {
    epoch: usize,
    loss: f32,
    acc: f32,
    val_loss: Option<f32>,
    val_acc: Option<f32>,
    seconds: f64,
}

impl Stage for DenseHead {
    fn process(&mut self, item: Item, _out: &mut dyn Emit) -> Result<(), StageError> {
        let Payload::Features(f) = &item.payload else {
            return Err(StageError::fatal(format!("expected features, got {}", item.kind().name())));
        };
        let Some(label) = &item.meta.label else {
            return Err(StageError::item(&item.meta.path, "no label (class_mode: none?): cannot train on it"));
        };
        let d = &mut self.data;
        if d.dim == 0 {
            d.dim = f.data.len();
            d.feature_shape = f.shape.clone();
            d.classes = label.classes.to_vec();
            d.mode = label.mode;
        } else if f.data.len() != d.dim {
            return Err(StageError::item(
                &item.meta.path,
                format!("features of shape {:?}, earlier ones {:?}", f.shape, d.feature_shape),
            ));
        }
        let split = item.meta.split.as_deref().unwrap_or(&self.cfg.train_split);
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
        rows.push(&f.data).map_err(|e| StageError::fatal(format!("spilling features: {e}")))?;
        match label.mode {
            ClassMode::Categorical => {
                let mut one_hot = vec![0.0; label.classes.len()];
                one_hot[label.index as usize] = 1.0;
                rows.y.extend(one_hot);
            }
            _ => rows.y.push(label.index as f32),
        }
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

    fn finish(&mut self, _out: &mut dyn Emit, signals: &RunSignals) -> Result<(), StageError> {
        if signals.interrupted() || signals.aborted() {
            return Ok(());
        }
        let summary = train(&self.cfg, &self.data, &self.provenance, signals).map_err(StageError::fatal)?;
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

fn train(
    cfg: &DenseHeadConfig,
    d: &Data,
    provenance: &[serde_json::Value],
    signals: &RunSignals,
) -> Result<serde_json::Value, String> {
    if d.train.n == 0 {
        return Err(format!("no items of split `{}` to train on", cfg.train_split));
    }
    let outputs = if d.mode == ClassMode::Categorical { d.classes.len() } else { 1 };
    let layers = cfg.layers.clone().unwrap_or_else(|| LayerSpec::book_categorical(outputs));
    let mut head = Head::new(d.dim, &layers, cfg.seed).map_err(|e| e.to_string())?;
    if head.output_dim() != outputs {
        return Err(format!(
            "the last layer has {} units but the data has {} label columns",
            head.output_dim(),
            outputs
        ));
    }
    let threads =
        if cfg.threads > 0 { cfg.threads } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) };
    head.set_threads(threads);
    let mut opt = Optimizer::new(cfg.optimizer);
    let dim = d.dim;
    let started = Instant::now();
    let mut history: Vec<EpochRecord> = Vec::new();
    // Best monitored score and its epoch; its weights only with keep_best.
    let mut best: Option<(f32, usize)> = None;
    let mut best_head: Option<Head> = None;
    let monitor = cfg.early_stopping.as_ref().map(|e| e.monitor).unwrap_or(Monitor::ValLoss);
    let mut order: Vec<usize> = (0..d.train.n).collect();
    let (mut xb, mut yb) = (Vec::new(), Vec::new());
    for epoch in 1..=cfg.epochs {
        if signals.interrupted() {
            break;
        }
        let t = Instant::now();
        // Shuffle and dropout both derive from (seed, epoch): reruns repeat.
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0.0f64, 0.0f64);
        for chunk in order.chunks(cfg.batch_size) {
            xb.clear();
            yb.clear();
            d.train
                .gather(chunk.iter().copied(), dim, &mut xb)
                .map_err(|e| format!("reading spilled features: {e}"))?;
            for &i in chunk {
                yb.extend_from_slice(&d.train.y[i * outputs..(i + 1) * outputs]);
            }
            let stats =
                head.train_batch(&xb, &yb, chunk.len(), &mut opt, cfg.l2, &mut rng).map_err(|e| e.to_string())?;
            loss_sum += stats.loss as f64 * chunk.len() as f64;
            correct += stats.correct;
        }
        let (val_loss, val_acc) = if d.validation.n > 0 {
            let (l, a) = d.validation.evaluate(&mut head, dim, outputs)?;
            (Some(l + cfg.l2 * head.l2_penalty(1.0)), Some(a))
        } else {
            (None, None)
        };
        let record = EpochRecord {
            epoch,
            loss: (loss_sum / d.train.n as f64) as f32,
            acc: (correct / d.train.n as f64) as f32,
            val_loss,
            val_acc,
            seconds: t.elapsed().as_secs_f64(),
        };
        tracing::info!(
            "epoch {epoch}/{}: loss {:.4} acc {:.4} val_loss {} val_acc {}",
            cfg.epochs,
            record.loss,
            record.acc,
            val_loss.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
            val_acc.map(|v| format!("{v:.4}")).unwrap_or("-".into())
        );
        metrics::gauge!(crate::telemetry::TRAIN_LOSS).set(record.loss as f64);
        metrics::gauge!(crate::telemetry::TRAIN_VAL_ACC).set(val_acc.unwrap_or(0.0) as f64);
        let score = monitor_value(&record, monitor);
        history.push(record);
        if let Some(score) = score {
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, epoch));
                if cfg.keep_best {
                    best_head = Some(head.clone());
                }
            }
            if let (Some(es), Some((_, best_epoch))) = (&cfg.early_stopping, &best)
                && epoch - best_epoch >= es.patience
            {
                tracing::info!(
                    "early stopping after epoch {epoch}: no better {:?} since epoch {best_epoch}",
                    es.monitor
                );
                break;
            }
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let best_epoch = best.map(|(_, e)| e);
    if let Some(h) = best_head {
        head = h;
    }

    let out = &cfg.out_dir;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    write_history(&out.join("history.csv"), &history).map_err(|e| format!("history.csv: {e}"))?;
    crate::plot::curves(
        &out.join("curves.png"),
        &history.iter().map(|r| (r.epoch, r.loss, r.acc, r.val_loss, r.val_acc)).collect::<Vec<_>>(),
    )
    .map_err(|e| format!("curves.png: {e}"))?;
    head.save_safetensors(&out.join("head.safetensors")).map_err(|e| e.to_string())?;
    let head_json = serde_json::json!({
        "layers": layers, "input_shape": d.feature_shape, "classes": d.classes,
        "class_mode": d.mode, "threads": threads, "seed": cfg.seed, "features_from": provenance,
    });
    std::fs::write(out.join("head.json"), serde_json::to_string_pretty(&head_json).unwrap_or_default())
        .map_err(|e| format!("head.json: {e}"))?;

    let last = history.last();
    let (test_loss, test_acc) = if d.test.n > 0 {
        let (l, a) = d.test.evaluate(&mut head, dim, outputs)?;
        (Some(l), Some(a))
    } else {
        (None, None)
    };
    let (val_loss, val_acc) = if cfg.keep_best {
        let b = best_epoch.and_then(|e| history.get(e - 1));
        (b.and_then(|r| r.val_loss), b.and_then(|r| r.val_acc))
    } else {
        (last.and_then(|r| r.val_loss), last.and_then(|r| r.val_acc))
    };
    let metrics = serde_json::json!({
        "epochs_run": history.len(), "best_epoch": best_epoch,
        "loss": last.map(|r| r.loss), "acc": last.map(|r| r.acc),
        "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
        "spilled_to_disk": d.train.spill.is_some(), "train_rows": d.train.n, "validation_rows": d.validation.n, "test_rows": d.test.n,
        "train_seconds": (train_seconds * 1000.0).round() / 1000.0,
    });
    std::fs::write(out.join("metrics.json"), serde_json::to_string_pretty(&metrics).unwrap_or_default() + "\n")
        .map_err(|e| format!("metrics.json: {e}"))?;
    Ok(metrics)
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
