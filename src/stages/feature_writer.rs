//! `feature_writer`: `features.npy` (float32 [N, ...]), `labels.npy`,
//! `paths.txt` and `classes.txt`, row i of each describing the same image,
//! in `dir/<split>/` when the source read splits. Rows stream to disk as
//! they come (bounded memory); files appear under their final names only
//! when the run completes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::item::{ClassMode, Item, ItemKind, Label, Payload};
use crate::npy::NpyWriter;
use crate::stage::{BuildContext, Built, Emit, OptionDoc, RunSignals, Stage, StageConfig, StageError};

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
    const OPTIONS: &'static [OptionDoc] =
        &[OptionDoc { name: "dir", ty: "path", default: "(required)", help: "output folder (a sub-folder per split)" }];

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(FeatureWriter {
            dir: self.dir.clone(),
            splits: BTreeMap::new(),
            written: BTreeMap::new(),
        })))
    }
}

struct SplitFiles {
    /// Where the files are written while the run goes on.
    dir: PathBuf,
    /// For a split folder: its final name. The files are staged in a hidden
    /// sibling and the folder renamed into place at the end, so a reader (or
    /// a kill at any moment) never sees one split's files from two runs.
    publish: Option<PathBuf>,
    features: NpyWriter,
    labels: Option<NpyWriter>,
    paths: BufWriter<File>,
    classes: Option<Arc<[String]>>,
}

impl SplitFiles {
    fn create(target: &Path, staged: bool, row_shape: &[usize], label: Option<&Label>) -> std::io::Result<SplitFiles> {
        let (dir, publish) = match (staged, target.file_name(), target.parent()) {
            (true, Some(name), Some(parent)) => {
                let staging = parent.join(format!(".{}.partial", name.to_string_lossy()));
                if staging.exists() {
                    std::fs::remove_dir_all(&staging)?;
                }
                (staging, Some(target.to_path_buf()))
            }
            _ => (target.to_path_buf(), None),
        };
        let dir = dir.as_path();
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
            publish,
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
        // One path per line, its own bytes (a non-UTF-8 name stays openable); a newline
        // in a name would break the row correspondence, so it is escaped.
        use std::os::unix::ffi::OsStrExt;
        let bytes = item.meta.path.as_os_str().as_bytes();
        let escaped: Vec<u8> =
            bytes.iter().flat_map(|&b| if b == b'\n' { vec![b'\\', b'n'] } else { vec![b] }).collect();
        self.paths.write_all(&escaped)?;
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
        if let Some(target) = &self.publish {
            if target.exists() {
                std::fs::remove_dir_all(target)?;
            }
            std::fs::rename(&self.dir, target)?;
        }
        Ok(rows)
    }

    /// The folder the files end up in.
    fn final_dir(&self) -> &Path {
        self.publish.as_deref().unwrap_or(&self.dir)
    }

    fn discard(self) {
        let _ = std::fs::remove_file(self.dir.join("paths.txt.partial"));
        self.features.discard();
        if let Some(l) = self.labels {
            l.discard();
        }
        if self.publish.is_some() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

struct FeatureWriter {
    dir: PathBuf,
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
    }
}

impl Stage for FeatureWriter {
    fn process(&mut self, item: Item, _out: &mut dyn Emit) -> Result<(), StageError> {
        let Payload::Features(f) = &item.payload else {
            return Err(StageError::fatal(format!("expected features, got {}", item.kind().name())));
        };
        let split = item.meta.split.clone();
        if !self.splits.contains_key(&split) {
            let dir = match &split {
                Some(s) => self.dir.join(&**s),
                None => self.dir.clone(),
            };
            let files = SplitFiles::create(&dir, split.is_some(), &f.shape, item.meta.label.as_ref())
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
        if signals.interrupted() || signals.aborted() {
            // Incomplete arrays would look like results: leave nothing behind.
            splits.into_values().for_each(|(f, _)| f.discard());
            return Ok(());
        }
        for (files, _) in splits.into_values() {
            let dir = files.final_dir().to_path_buf();
            let rows = files.finish().map_err(|e| StageError::fatal(format!("finishing {}: {e}", dir.display())))?;
            self.written.insert(dir.display().to_string(), rows);
        }
        Ok(())
    }

    fn summary(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "rows_written": self.written }))
    }
}
