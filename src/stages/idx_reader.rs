//! `idx_reader`: the IDX files of MNIST and Fashion-MNIST (images + labels,
//! optionally gzipped) as a source, one split per image/label file pair,
//! with `shuffle`, `seed` and `epochs` as `file_reader` has them. Each
//! image leaves as a `[rows, cols, 1]` tensor of its raw pixel values
//! (0-255, as Keras's `mnist.load_data()` gives them: a trainer's
//! `rescale` divides), labelled by its digit (classes "0".."9").

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::facts::{Facts, LabelFacts};
use crate::item::{ClassMode, Features, Item, ItemKind, Label, Meta, Payload};
use crate::stage::{
    BuildContext, Built, Emit, EpochEnd, FieldError, OptionDoc, Source, SourceContext, StageConfig, StageError,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdxSplit {
    /// Split name (`train`, `validation`, `test`).
    pub name: String,
    /// `*-images-idx3-ubyte` (or `.gz`).
    pub images: PathBuf,
    /// `*-labels-idx1-ubyte` (or `.gz`).
    pub labels: PathBuf,
    /// Read only the first `limit` images (small CI runs); `null`: all.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Skip the first `skip` images (carve a validation split out of train).
    #[serde(default)]
    pub skip: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdxReaderConfig {
    pub splits: Vec<IdxSplit>,
    /// `categorical` (one-hot, the book's `to_categorical`) or `binary`
    /// (needs exactly two classes among the labels).
    #[serde(default = "default_mode")]
    pub class_mode: ClassMode,
    #[serde(default)]
    pub shuffle: bool,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_epochs")]
    pub epochs: u32,
}

fn default_mode() -> ClassMode {
    ClassMode::Categorical
}
fn default_epochs() -> u32 {
    1
}

impl StageConfig for IdxReaderConfig {
    const KIND: &'static str = "idx_reader";
    const SUMMARY: &'static str = "reads MNIST / Fashion-MNIST IDX files (images + labels) as [h, w, 1] pixel tensors";
    const ACCEPTS: &'static [ItemKind] = &[];
    const EMITS: Option<ItemKind> = Some(ItemKind::Features);
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "splits",
            ty: "[{name, images, labels, limit, skip}]",
            default: "(required)",
            help: "one IDX image/label file pair per split",
        },
        OptionDoc { name: "class_mode", ty: "categorical|binary", default: "categorical", help: "label encoding" },
        OptionDoc { name: "shuffle", ty: "bool", default: "false", help: "shuffle the order (every split)" },
        OptionDoc { name: "seed", ty: "int", default: "0", help: "shuffle seed" },
        OptionDoc { name: "epochs", ty: "int", default: "1", help: "passes over the images, reshuffled each" },
    ];

    /// Pixels as `[h, w, 1]` tensors: features no model made. The class
    /// names are the labels' digits, known once the files are read.
    fn facts(&self, _input: &Facts, _env: bool) -> Result<Facts, Vec<FieldError>> {
        Ok(Facts {
            channels: Some(1),
            labels: Some(LabelFacts { mode: self.class_mode, classes: None }),
            splits: self.splits.iter().map(|s| s.name.clone()).collect(),
            epochs: self.epochs,
            views: 1,
            ..Facts::default()
        })
    }

    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.epochs == 0 {
            errors.push(FieldError::new("epochs", "must be at least 1"));
        }
        if self.splits.is_empty() {
            errors.push(FieldError::new("splits", "name at least one split"));
        }
        if self.class_mode == ClassMode::None {
            errors.push(FieldError::new("class_mode", "categorical or binary: IDX files always have labels"));
        }
        errors
    }

    fn check_environment(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (i, s) in self.splits.iter().enumerate() {
            for (field, p) in [("images", &s.images), ("labels", &s.labels)] {
                if !p.is_file() {
                    errors.push(FieldError::new(
                        format!("splits[{i}].{field}"),
                        format!("{} is not a file (models/mnist.sh fetches MNIST)", p.display()),
                    ));
                }
            }
        }
        errors
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let mut entries = Vec::new();
        let mut all_labels = Vec::new();
        let mut shape = None;
        for s in &self.splits {
            let (dims, pixels) = read_idx(&s.images, 0x08, 3).map_err(StageError::fatal)?;
            let (ldims, labels) = read_idx(&s.labels, 0x08, 1).map_err(StageError::fatal)?;
            if dims[0] != ldims[0] {
                return Err(StageError::fatal(format!(
                    "{}: {} images but {} has {} labels",
                    s.images.display(),
                    dims[0],
                    s.labels.display(),
                    ldims[0]
                )));
            }
            let image_shape = [dims[1], dims[2]];
            if shape.is_some_and(|sh| sh != image_shape) {
                return Err(StageError::fatal(format!(
                    "{}: images of {image_shape:?}, the other splits' are {shape:?}",
                    s.images.display()
                )));
            }
            shape = Some(image_shape);
            let len = dims[1] * dims[2];
            let split: Arc<str> = Arc::from(s.name.as_str());
            let pixels: Arc<[u8]> = pixels.into();
            let end = s.limit.map_or(dims[0], |l| (s.skip + l).min(dims[0]));
            for (i, &label) in labels.iter().enumerate().take(end).skip(s.skip) {
                all_labels.push(label);
                entries.push(Entry {
                    pixels: pixels.clone(),
                    offset: i * len,
                    label,
                    split: split.clone(),
                    path: Arc::from(PathBuf::from(format!("{}#{i}", s.images.display())).as_path()),
                });
            }
        }
        let max = all_labels.iter().copied().max().unwrap_or(0) as usize;
        let classes: Arc<[String]> = (0..=max).map(|c| c.to_string()).collect::<Vec<_>>().into();
        if self.class_mode == ClassMode::Binary && classes.len() != 2 {
            return Err(StageError::fatal(format!(
                "class_mode: binary needs labels 0 and 1 only; these files have {} classes",
                classes.len()
            )));
        }
        let [h, w] = shape.unwrap_or([0, 0]);
        Ok(Built::Source(Box::new(IdxReader {
            entries,
            shape: [h, w, 1],
            classes,
            mode: self.class_mode,
            shuffle: self.shuffle,
            seed: self.seed,
            epochs: self.epochs,
            splits: self.splits.iter().map(|s| s.name.clone()).collect::<Vec<_>>().into(),
        })))
    }
}

/// Reads an IDX file of unsigned bytes (`kind` 0x08) with `ndims`
/// dimensions: its dimensions and data. `.gz` files are inflated.
fn read_idx(path: &Path, kind: u8, ndims: usize) -> Result<(Vec<usize>, Vec<u8>), String> {
    let err = |m: String| format!("{}: {m}", path.display());
    let raw = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(|e| err(format!("gzip: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(err("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != kind || bytes[3] as usize != ndims {
        return Err(err(format!(
            "IDX of type 0x{:02x} with {} dimensions; expected type 0x{kind:02x} (unsigned bytes) with {ndims}",
            bytes[2], bytes[3]
        )));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(err("truncated header".into()));
    }
    let dims: Vec<usize> =
        bytes[4..header].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let want = dims.iter().product::<usize>();
    if bytes.len() - header != want {
        return Err(err(format!("dimensions {dims:?} need {want} bytes of data, found {}", bytes.len() - header)));
    }
    Ok((dims, bytes[header..].to_vec()))
}

struct Entry {
    pixels: Arc<[u8]>,
    offset: usize,
    label: u8,
    split: Arc<str>,
    path: Arc<Path>,
}

struct IdxReader {
    entries: Vec<Entry>,
    shape: [usize; 3],
    classes: Arc<[String]>,
    mode: ClassMode,
    shuffle: bool,
    seed: u64,
    epochs: u32,
    splits: Arc<[String]>,
}

impl Source for IdxReader {
    fn total(&self) -> Option<u64> {
        Some(self.entries.len() as u64 * self.epochs as u64)
    }

    fn run(&mut self, out: &mut dyn Emit, ctx: &SourceContext<'_>) -> Result<(), StageError> {
        let n = self.entries.len() as u64;
        let len = self.shape.iter().product::<usize>();
        for epoch in 0..self.epochs {
            if epoch > 0 && ctx.signals.epochs_done.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            // As file_reader: the order of an epoch is drawn from (seed, epoch).
            let mut order: Vec<usize> = (0..self.entries.len()).collect();
            if self.shuffle {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
                rng.set_stream(epoch as u64);
                order.shuffle(&mut rng);
            }
            for (i, index) in order.into_iter().enumerate() {
                if ctx.signals.should_stop() {
                    return Ok(());
                }
                let e = &self.entries[index];
                let px = &e.pixels[e.offset..e.offset + len];
                let meta = Meta {
                    path: e.path.clone(),
                    content_hash: *blake3::hash(px).as_bytes(),
                    label: Some(Label { index: u32::from(e.label), classes: self.classes.clone(), mode: self.mode }),
                    split: Some(e.split.clone()),
                    epoch,
                    variant: epoch,
                    view: 0,
                    seq: epoch as u64 * n + i as u64,
                };
                let data = px.iter().map(|&p| f32::from(p)).collect();
                out.emit(Item { meta, payload: Payload::Features(Features { shape: self.shape.to_vec(), data }) })?;
            }
            out.end_epoch(EpochEnd { epoch, splits: self.splits.clone(), last: epoch + 1 == self.epochs })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn reads_idx_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, idx(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])).unwrap();
        let (dims, data) = read_idx(&p, 0x08, 3).unwrap();
        assert_eq!(dims, vec![2, 2, 3]);
        assert_eq!(data.len(), 12);
        std::fs::write(&p, idx(&[2, 2, 3], &[1, 2, 3])).unwrap();
        assert!(read_idx(&p, 0x08, 3).unwrap_err().contains("need 12 bytes"));
        std::fs::write(&p, idx(&[3], &[1, 2, 3])).unwrap();
        assert!(read_idx(&p, 0x08, 3).unwrap_err().contains("with 1 dimensions"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &idx(&[3], &[7, 8, 9])).unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        assert_eq!(read_idx(&p, 0x08, 1).unwrap().1, vec![7, 8, 9]);
    }
}
