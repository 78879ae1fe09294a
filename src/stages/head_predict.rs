//! `head_predict`: labels images with a head trained by `dense_head`,
//! writing `predictions.csv` (path, probability per class, predicted class).
//! The views of one image (the `views` stage) make one line, with their
//! mean probabilities.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::item::{Item, ItemKind, Payload};
use crate::ml::head::Head;
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, RunSignals, Stage, StageConfig, StageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadPredictConfig {
    /// A folder written by `dense_head` (head.safetensors + head.json).
    pub head: PathBuf,
    /// The CSV to write.
    pub out: PathBuf,
}

impl StageConfig for HeadPredictConfig {
    const KIND: &'static str = "head_predict";
    const SUMMARY: &'static str = "labels features with a trained dense head; writes predictions.csv";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Features];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "head",
            ty: "path",
            default: "(required)",
            help: "folder with head.safetensors and head.json",
        },
        OptionDoc { name: "out", ty: "path", default: "(required)", help: "predictions CSV" },
    ];

    fn check(&self) -> Vec<FieldError> {
        ["head.safetensors", "head.json"]
            .iter()
            .filter(|f| !self.head.join(f).is_file())
            .map(|f| {
                FieldError::new(
                    "head",
                    format!("{} not found (train a head with dense_head first)", self.head.join(f).display()),
                )
            })
            .collect()
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let head = Head::load_safetensors(&self.head.join("head.safetensors")).map_err(StageError::fatal)?;
        let meta: serde_json::Value = std::fs::read_to_string(self.head.join("head.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .ok_or_else(|| StageError::fatal(format!("{}: unreadable head.json", self.head.display())))?;
        let classes: Vec<String> =
            meta["classes"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_string)).collect();
        if classes.is_empty() {
            return Err(StageError::fatal("head.json lists no classes"));
        }
        Ok(Built::Stage(Box::new(HeadPredict {
            head,
            classes,
            out: self.out.clone(),
            writer: None,
            rows: 0,
            pending: Vec::new(),
        })))
    }
}

struct HeadPredict {
    head: Head,
    classes: Vec<String>,
    out: PathBuf,
    writer: Option<BufWriter<File>>,
    rows: usize,
    /// Rows waiting to be predicted together (one matrix call, not one per image).
    pending: Vec<(PathBuf, Vec<f32>)>,
}

const CHUNK: usize = 64;

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

fn partial(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

impl HeadPredict {
    fn flush(&mut self) -> Result<(), StageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let dim = self.head.input_dim();
        let x: Vec<f32> = self.pending.iter().flat_map(|(_, f)| f.iter().copied()).collect();
        let n = self.pending.len();
        let probs = self.head.predict(&x, n).map_err(StageError::fatal)?;
        debug_assert_eq!(x.len(), n * dim);
        let w = match &mut self.writer {
            Some(w) => w,
            None => {
                if let Some(dir) = self.out.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| StageError::fatal(format!("{}: {e}", dir.display())))?;
                }
                let f = File::create(partial(&self.out))
                    .map_err(|e| StageError::fatal(format!("{}: {e}", self.out.display())))?;
                let mut w = BufWriter::new(f);
                let header: Vec<String> = self.classes.iter().map(|c| format!("p_{c}")).collect();
                writeln!(w, "path,{},predicted", header.join(",")).map_err(StageError::fatal)?;
                self.writer.insert(w)
            }
        };
        let outputs = self.head.output_dim();
        let mut rows = self.pending.drain(..).map(|(path, _)| path).zip(probs.chunks(outputs)).peekable();
        while let Some((path, p)) = rows.next() {
            // Consecutive rows of one path are views of one image (the
            // `views` stage): one line, with their mean probabilities.
            let (mut sum, mut views): (Vec<f64>, usize) = (p.iter().map(|&v| f64::from(v)).collect(), 1);
            while let Some((_, q)) = rows.next_if(|(next, _)| *next == path) {
                sum.iter_mut().zip(q).for_each(|(s, &v)| *s += f64::from(v));
                views += 1;
            }
            let p: Vec<f32> = sum.iter().map(|s| (s / views as f64) as f32).collect();
            // A single sigmoid unit is P(class 1); spell out both columns.
            let per_class: Vec<f32> = if outputs == 1 { vec![1.0 - p[0], p[0]] } else { p };
            let best = per_class.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
            let cols: Vec<String> = per_class.iter().map(|v| format!("{v:.6}")).collect();
            let name = self.classes.get(best).cloned().unwrap_or_default();
            writeln!(w, "{},{},{}", csv_field(&path.display().to_string()), cols.join(","), csv_field(&name))
                .map_err(StageError::fatal)?;
            self.rows += 1;
        }
        Ok(())
    }
}

impl Stage for HeadPredict {
    fn process(&mut self, item: Item, _out: &mut dyn Emit) -> Result<(), StageError> {
        let Payload::Features(f) = item.payload else {
            return Err(StageError::fatal(format!("expected features, got {}", item.kind().name())));
        };
        if f.data.len() != self.head.input_dim() {
            // Every item would fail the same way: a wrong model or image size.
            return Err(StageError::fatal(format!(
                "features of shape {:?} ({} values) do not fit the head, which takes {} (trained with another model or image size?)",
                f.shape,
                f.data.len(),
                self.head.input_dim()
            )));
        }
        // A chunk never ends inside the views of one image: they arrive together.
        let same_image = self.pending.last().is_some_and(|(p, _)| **p == *item.meta.path);
        if self.pending.len() >= CHUNK && !same_image {
            self.flush()?;
        }
        self.pending.push((item.meta.path.to_path_buf(), f.data));
        Ok(())
    }

    fn finish(&mut self, _out: &mut dyn Emit, signals: &RunSignals) -> Result<(), StageError> {
        if signals.interrupted() || signals.aborted() {
            let _ = std::fs::remove_file(partial(&self.out));
            return Ok(());
        }
        self.flush()?;
        if let Some(w) = self.writer.take() {
            w.into_inner().map_err(|e| StageError::fatal(e.to_string()))?.sync_all().map_err(StageError::fatal)?;
            std::fs::rename(partial(&self.out), &self.out)
                .map_err(|e| StageError::fatal(format!("{}: {e}", self.out.display())))?;
        }
        Ok(())
    }

    fn summary(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "predictions": self.rows, "out": self.out }))
    }
}
