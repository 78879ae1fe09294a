//! The predictions CSV that `head_predict` and `convnet_predict` write:
//! `path,p_<class>...,predicted`, one line per image. The views of one
//! image (the `views` stage) arrive one after another and make one line,
//! with their mean probabilities.
//!
//! Rows are queued and predicted together (one model call per chunk, not
//! one per image). The file is written as `<out>.partial` and renamed when
//! the input has ended, so an interrupted or failed run never leaves a CSV
//! that looks complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::stage::{FieldError, RunSignals, StageError};

/// One error on `field` for each of `files` missing from the trainer's
/// folder `dir`, saying what makes them (`hint`).
pub fn missing_files(field: &str, dir: &Path, files: &[&str], hint: &str) -> Vec<FieldError> {
    files
        .iter()
        .filter(|f| !dir.join(f).is_file())
        .map(|f| FieldError::new(field, format!("{} not found ({hint})", dir.join(f).display())))
        .collect()
}

pub struct PredictionsCsv {
    out: PathBuf,
    classes: Vec<String>,
    /// The model's output units per row.
    outputs: usize,
    /// Rows per model call.
    chunk: usize,
    writer: Option<BufWriter<File>>,
    lines: usize,
    /// Rows waiting to be predicted together: (path, model input).
    pending: Vec<(PathBuf, Vec<f32>)>,
}

impl PredictionsCsv {
    /// `outputs`: the model's output units. One sigmoid unit stands for two
    /// classes; otherwise there is one unit per class. A model whose
    /// description disagrees would label rows with the wrong names, so it is
    /// refused here, before any image is read.
    pub fn new(out: PathBuf, classes: Vec<String>, outputs: usize, chunk: usize) -> Result<Self, String> {
        let columns = if outputs == 1 { 2 } else { outputs };
        if classes.len() != columns {
            return Err(format!(
                "the model has {outputs} output unit(s), for {columns} classes, but its description lists {:?}",
                classes
            ));
        }
        Ok(PredictionsCsv { out, classes, outputs, chunk: chunk.max(1), writer: None, lines: 0, pending: Vec::new() })
    }

    /// Lines written so far (one per image, its views counted once).
    pub fn lines(&self) -> usize {
        self.lines
    }

    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Queues one row; `predict(x, n)` gives the probabilities of `n` rows,
    /// `[n, outputs]`. A chunk never ends inside the views of one image.
    pub fn push(
        &mut self,
        path: &Path,
        row: Vec<f32>,
        predict: impl FnMut(&[f32], usize) -> Result<Vec<f32>, StageError>,
    ) -> Result<(), StageError> {
        let same_image = self.pending.last().is_some_and(|(p, _)| p == path);
        if self.pending.len() >= self.chunk && !same_image {
            self.flush(predict)?;
        }
        self.pending.push((path.to_path_buf(), row));
        Ok(())
    }

    /// Predicts what is queued and publishes the CSV; after an interrupt or
    /// a failure elsewhere, removes the partial file instead.
    pub fn finish(
        &mut self,
        signals: &RunSignals,
        predict: impl FnMut(&[f32], usize) -> Result<Vec<f32>, StageError>,
    ) -> Result<(), StageError> {
        if signals.interrupted() || signals.aborted() {
            let _ = std::fs::remove_file(partial(&self.out));
            return Ok(());
        }
        self.flush(predict)?;
        if let Some(w) = self.writer.take() {
            w.into_inner().map_err(|e| StageError::fatal(e.to_string()))?.sync_all().map_err(StageError::fatal)?;
            std::fs::rename(partial(&self.out), &self.out)
                .map_err(|e| StageError::fatal(format!("{}: {e}", self.out.display())))?;
        }
        Ok(())
    }

    fn flush(
        &mut self,
        mut predict: impl FnMut(&[f32], usize) -> Result<Vec<f32>, StageError>,
    ) -> Result<(), StageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let x: Vec<f32> = self.pending.iter().flat_map(|(_, f)| f.iter().copied()).collect();
        let n = self.pending.len();
        let probs = predict(&x, n)?;
        let outputs = self.outputs;
        if probs.len() != n * outputs {
            return Err(StageError::fatal(format!(
                "the model gave {} probabilities for {n} images of {outputs} outputs",
                probs.len()
            )));
        }
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
        let mut rows = self.pending.drain(..).map(|(path, _)| path).zip(probs.chunks(outputs)).peekable();
        while let Some((path, p)) = rows.next() {
            // Consecutive rows of one path are views of one image: one line,
            // with their mean probabilities.
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
            self.lines += 1;
        }
        Ok(())
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

fn partial(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}
