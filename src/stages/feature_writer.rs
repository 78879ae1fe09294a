//! `feature_writer`: `features.npy` (float32 [N, ...]), `labels.npy`,
//! `paths.txt` and `classes.txt`, row i of each describing the same image,
//! in `dir/<split>/` when the source read splits. Rows stream to disk as
//! they come (bounded memory) into a fresh version of `dir`
//! ([`crate::publish`]), which becomes the published one, every split at
//! once, only when the run completes.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::facts::Facts;
use crate::item::{ClassMode, Item, ItemKind, Label, Payload};
use crate::npy::NpyWriter;
use crate::publish::Output;
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, RunSignals, Stage, StageConfig, StageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureWriterConfig {
    pub dir: PathBuf,
}

impl StageConfig for FeatureWriterConfig {
    const KIND: &'static str = "feature_writer";
    const SUMMARY: &'static str = "writes features.npy, labels.npy, paths.txt (numpy.load-able), per split";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Features];
    const EMITS: Option<ItemKind> = None;
    const PLACE_OPTIONS: &'static [&'static str] = &["dir"];
    const WRITES_PARTS: bool = true;
    const OPTIONS: &'static [OptionDoc] =
        &[OptionDoc { name: "dir", ty: "path", default: "(required)", help: "output folder (a sub-folder per split)" }];

    /// A writer publishing inside the folder the source lists would put its
    /// output among the photos (and the next run would read it back).
    fn facts(&self, input: &Facts, _env: bool) -> Result<Facts, Vec<FieldError>> {
        match &input.source_dir {
            Some(data) if crate::publish::is_inside(&self.dir, data) => Err(vec![FieldError::new(
                "dir",
                format!(
                    "`{}` is inside `{}`, the folder stage `{}` reads: choose an output folder outside the data",
                    self.dir.display(),
                    data.display(),
                    input.made_by.first().map_or("", |r| r.id.as_str())
                ),
            )]),
            _ => Ok(input.clone()),
        }
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        // Claimed before any work: a folder that is not ours, or another
        // run writing here, stops the run now rather than after the compute.
        // A shard writes its part where the run says, not where the file does.
        let dir = ctx.shard.map_or(&self.dir, |s| &s.out_dir);
        let output = Output::claim(dir, &expected_entries(ctx.input)).map_err(StageError::fatal)?;
        Ok(Built::Stage(Box::new(FeatureWriter {
            output: Some(output),
            splits: BTreeMap::new(),
            written: BTreeMap::new(),
        })))
    }
}

/// The files a writer without splits publishes.
pub const FILES: [&str; 4] = ["features.npy", "labels.npy", "paths.txt", "classes.txt"];

/// What the run will publish: a folder per split, or the files themselves.
fn expected_entries(input: &Facts) -> Vec<OsString> {
    match input.splits.is_empty() {
        false => input.splits.iter().map(OsString::from).collect(),
        true => FILES.iter().map(OsString::from).collect(),
    }
}

struct SplitFiles {
    /// Where the files are written while the run goes on: the claimed
    /// output's version folder (or a split's folder in it).
    dir: PathBuf,
    features: NpyWriter,
    labels: Option<NpyWriter>,
    paths: BufWriter<File>,
    classes: Option<Arc<[String]>>,
}

impl SplitFiles {
    fn create(dir: &Path, row_shape: &[usize], label: Option<&Label>) -> std::io::Result<SplitFiles> {
        std::fs::create_dir_all(dir)?;
        let labels = match label {
            Some(l) if l.mode == ClassMode::Binary => Some(NpyWriter::create(&dir.join("labels.npy"), &[])?),
            Some(l) if l.mode == ClassMode::Categorical => {
                Some(NpyWriter::create(&dir.join("labels.npy"), &[l.classes.len()])?)
            }
            _ => None,
        };
        Ok(SplitFiles {
            dir: dir.to_path_buf(),
            features: NpyWriter::create(&dir.join("features.npy"), row_shape)?,
            labels,
            paths: BufWriter::new(File::create(dir.join("paths.txt.partial"))?),
            classes: label.map(|l| l.classes.clone()),
        })
    }

    fn push(&mut self, item: &Item, row: &[f32]) -> std::io::Result<()> {
        self.features.push(row)?;
        if let Some(labels) = &mut self.labels {
            let label = item.meta.label.as_ref().ok_or_else(|| std::io::Error::other("item has no label"))?;
            match label.mode {
                ClassMode::Categorical => {
                    let mut one_hot = vec![0.0; label.classes.len()];
                    one_hot[label.index as usize] = 1.0;
                    labels.push(&one_hot)?;
                }
                _ => labels.push(&[label.index as f32])?,
            }
        }
        // One path per line in convflow's one escaping (crate::names): any
        // name, newlines and non-UTF-8 bytes included, reads back exactly.
        self.paths.write_all(crate::names::escape_path(&item.meta.path).as_bytes())?;
        self.paths.write_all(b"\n")
    }

    fn finish(self) -> std::io::Result<usize> {
        let rows = self.features.finish()?;
        if let Some(labels) = self.labels {
            labels.finish()?;
        }
        let file = self.paths.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(self.dir.join("paths.txt.partial"), self.dir.join("paths.txt"))?;
        if let Some(classes) = self.classes {
            std::fs::write(self.dir.join("classes.txt"), classes.join("\n") + "\n")?;
        }
        Ok(rows)
    }

    fn discard(self) {
        let _ = std::fs::remove_file(self.dir.join("paths.txt.partial"));
        self.features.discard();
        if let Some(l) = self.labels {
            l.discard();
        }
    }
}

struct FeatureWriter {
    /// The claimed folder (its lock held); taken when published.
    output: Option<Output>,
    splits: BTreeMap<Option<Arc<str>>, (SplitFiles, usize)>,
    /// Rows per finished output folder, for the run report.
    written: BTreeMap<String, usize>,
}

impl Drop for FeatureWriter {
    /// A failed run (a full disk, another stage's error) never calls
    /// `finish`: its staged files go here, so they neither litter the output
    /// folder nor keep holding the space that ran out.
    fn drop(&mut self) {
        std::mem::take(&mut self.splits).into_values().for_each(|(f, _)| f.discard());
        self.output.take();
    }
}

impl Stage for FeatureWriter {
    fn process(&mut self, item: Item, _out: &mut dyn Emit) -> Result<(), StageError> {
        let Payload::Features(f) = &item.payload else {
            return Err(StageError::fatal(format!("expected features, got {}", item.kind().name())));
        };
        let split = item.meta.split.clone();
        if !self.splits.contains_key(&split) {
            let output = self.output.as_ref().ok_or_else(|| StageError::fatal("output already published"))?;
            let dir = match &split {
                Some(s) => {
                    // A split no file_reader announced is checked here, before its first row.
                    crate::publish::check_entry(output.dir(), OsStr::new(&**s)).map_err(StageError::fatal)?;
                    output.staging().join(&**s)
                }
                None => output.staging().to_path_buf(),
            };
            let files = SplitFiles::create(&dir, &f.shape, item.meta.label.as_ref())
                .map_err(|e| StageError::fatal(format!("cannot create outputs in {}: {e}", dir.display())))?;
            self.splits.insert(split.clone(), (files, 0));
        }
        let (files, rows) = self.splits.get_mut(&split).expect("inserted above");
        if files.features.row_shape() != f.shape.as_slice() {
            return Err(StageError::item(
                &item.meta.path,
                format!("features of shape {:?}, but earlier rows are {:?}", f.shape, files.features.row_shape()),
            ));
        }
        files.push(&item, &f.data).map_err(|e| StageError::fatal(format!("writing {}: {e}", files.dir.display())))?;
        *rows += 1;
        Ok(())
    }

    fn finish(&mut self, _out: &mut dyn Emit, signals: &RunSignals) -> Result<(), StageError> {
        let splits = std::mem::take(&mut self.splits);
        let output = self.output.take().ok_or_else(|| StageError::fatal("output already published"))?;
        if signals.interrupted() || signals.aborted() || splits.is_empty() {
            // Incomplete arrays would look like results: leave nothing behind
            // (dropping the claim removes its version folder).
            splits.into_values().for_each(|(f, _)| f.discard());
            return Ok(());
        }
        let mut written = BTreeMap::new();
        for (split, (files, _)) in splits {
            let dir = files.dir.clone();
            let rows = files.finish().map_err(|e| StageError::fatal(format!("finishing {}: {e}", dir.display())))?;
            let shown = match split {
                Some(s) => output.dir().join(&*s),
                None => output.dir().to_path_buf(),
            };
            written.insert(shown.display().to_string(), rows);
        }
        // Every split at once: a reader sees the old output or this one.
        output.publish().map_err(StageError::fatal)?;
        self.written = written;
        Ok(())
    }

    fn summary(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "rows_written": self.written }))
    }
}
