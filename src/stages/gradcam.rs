//! `gradcam`: for every image, the Grad-CAM heatmap of a trained
//! classifier (the book's 5.4.3) for its predicted class or a chosen one,
//! w.r.t. a chosen conv layer (default: the last, VGG16's `block5_conv3`),
//! drawn over the original photo as the book's figure 5.35
//! ([`crate::visualize::heatmap`]).
//!
//! The classifier is any folder [`super::classifier`] reads: a
//! `dense_head`'s head on VGG16's frozen base, a fine-tuned VGG16, or a
//! convnet. It takes what the classifier takes: block4 maps from
//! `onnx_features` with `models/vgg16_block4.onnx` for the VGG16-based
//! ones (cached by content, so blocks 1-4 run once per image, ever), images
//! for a convnet trained on them (times its `rescale`).
//!
//! Writes to `out_dir`, as the images stream through: one PNG per image,
//! the heatmap over the photo re-read from the item's path at its own size
//! (at the path relative to the file_reader's `dir`, `.png`); and at the
//! end `heatmaps.csv` and `heatmaps.npy` ([`table`]). Each copy of
//! `workers: N` has its own model; a photo that cannot be re-read is
//! skipped and listed.

mod table;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::convnet::input_row;
use crate::facts::{Facts, Wants};
use crate::item::{Item, ItemKind};
use crate::ml::convnet::Convnet;
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, RunSignals, Stage, StageConfig, StageError};
use crate::trained::classifier::Classifier;
use crate::visualize::heatmap::{self, ClassChoice};
pub use table::{CSV, HEADER, NPY};

/// `class:` for the class each image is predicted to be.
pub const PREDICTED: &str = "predicted";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradcamConfig {
    /// A dense_head's or a convnet's out_dir.
    pub model: PathBuf,
    /// Pictures, heatmaps.csv, heatmaps.npy.
    pub out_dir: PathBuf,
    /// The conv layer (its name in the model, or for a VGG16-based one
    /// `block5_conv1..3`); default: the last conv layer.
    #[serde(default)]
    pub layer: Option<String>,
    /// `predicted`, or a class name of the model's.
    #[serde(default = "default_class")]
    pub class: String,
    /// The heatmap's colours are multiplied by this before they are added to the photo.
    #[serde(default = "default_intensity")]
    pub intensity: f32,
    /// block5's ImageNet weights, for a dense_head's head (a fine-tuned model has its own).
    #[serde(default)]
    pub base_weights: Option<PathBuf>,
    /// Math threads per copy; 0: the cores shared out among the copies.
    #[serde(default)]
    pub threads: usize,
}

fn default_class() -> String {
    PREDICTED.into()
}
/// The book's `heatmap * 0.4 + img`.
fn default_intensity() -> f32 {
    0.4
}

impl GradcamConfig {
    /// block5's weights for a head: given, or the set-up's file of the base it sits on.
    fn base_weights(&self, c: &Classifier) -> PathBuf {
        self.base_weights.clone().or_else(|| c.base.map(|b| b.default_weights())).unwrap_or_default()
    }

    fn choice(&self, c: &Classifier) -> Result<ClassChoice, String> {
        if self.class == PREDICTED {
            return Ok(ClassChoice::Predicted);
        }
        c.classes.iter().position(|n| *n == self.class).map(ClassChoice::Index).ok_or_else(|| {
            format!("the model in {} has classes {:?}; give one of them or `{PREDICTED}`", c.dir.display(), c.classes)
        })
    }
}

impl GradcamConfig {
    /// What reaches the model when a resize upstream fixes it: the images,
    /// or past onnx_features, the block4 maps of their size; an error when
    /// the classifier cannot take them.
    fn arriving(&self, classifier: &Classifier, input: &Facts) -> Result<Option<[usize; 3]>, String> {
        let maps = input.features.is_some();
        if let (Some(base), false) = (classifier.base, maps) {
            return Err(format!(
                "the classifier in {} sits on {base} and takes block4 maps: put an onnx_features stage with {} \
                 before it",
                self.model.display(),
                base.block4_model()
            ));
        }
        classifier.check_input(input)?;
        let arriving = match (input.image_size, classifier.base, maps) {
            (Some([h, w]), Some(b), true) => Some(b.input_for_image([h as usize, w as usize])),
            (Some([h, w]), None, false) => Some([h as usize, w as usize, input.channels.map_or(0, |c| c as usize)]),
            _ => None,
        };
        if let (Some(got), Some(want)) = (arriving, classifier.input) {
            // Channels are checked at the first image where no stage upstream fixes them.
            let got = if got[2] == 0 { [got[0], got[1], want[2]] } else { got };
            if got != want {
                let what = if maps { "block4 maps" } else { "images" };
                return Err(format!(
                    "{what} arrive as {got:?} (resized upstream) but the model in {} takes {want:?}",
                    self.model.display()
                ));
            }
        }
        Ok(arriving)
    }
}

impl StageConfig for GradcamConfig {
    const KIND: &'static str = "gradcam";
    const SUMMARY: &'static str =
        "draws a trained classifier's Grad-CAM heatmap over each photo (5.4.3); writes PNGs, heatmaps.csv/.npy";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image, ItemKind::Features];
    const EMITS: Option<ItemKind> = None;
    const PARALLEL: bool = true;
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "model",
            ty: "path",
            default: "(required)",
            help: "a dense_head's out_dir (VGG16 + head) or a convnet's (fine-tuned or not)",
        },
        OptionDoc {
            name: "out_dir",
            ty: "path",
            default: "(required)",
            help: "a PNG per image, heatmaps.csv, heatmaps.npy",
        },
        OptionDoc {
            name: "layer",
            ty: "string",
            default: "the last conv layer",
            help: "conv layer: the model's name, block5_conv1..3 on VGG16 (..4 on VGG19), or `last`",
        },
        OptionDoc { name: "class", ty: "predicted|CLASS", default: "predicted", help: "the class the heatmaps are of" },
        OptionDoc { name: "intensity", ty: "float", default: "0.4", help: "photo + intensity x jet(heatmap)" },
        OptionDoc {
            name: "base_weights",
            ty: "path",
            default: "the base's (models/vgg16_block5.safetensors, models/vgg19_convs.safetensors)",
            help: "block5's weights under a dense_head's head",
        },
        OptionDoc { name: "threads", ty: "int", default: "0 (cores / workers)", help: "math threads per copy" },
    ];

    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !(self.intensity.is_finite() && self.intensity >= 0.0) {
            errors.push(FieldError::new("intensity", format!("must be a number >= 0, got {}", self.intensity)));
        }
        errors
    }

    /// The layer and class are checked against the trained model, which
    /// must exist (with the block5 weights it may sit on).
    fn check_environment(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let c = match Classifier::describe(&self.model) {
            Ok(c) => c,
            Err(e) => {
                errors.push(FieldError::new("model", e));
                return errors;
            }
        };
        if let Err(e) = c.conv_layer(self.layer.as_deref()) {
            errors.push(FieldError::new("layer", e));
        }
        if let Err(e) = self.choice(&c) {
            errors.push(FieldError::new("class", e));
        }
        let weights = self.base_weights(&c);
        if let Some(base) = c.base.filter(|_| c.needs_base_weights() && !weights.is_file()) {
            let setup = base.vgg().maker;
            errors.push(FieldError::new(
                if self.base_weights.is_some() { "base_weights" } else { "model" },
                format!("{} not found: the head sits on {base} ({setup} makes it)", weights.display()),
            ));
        }
        errors
    }

    /// What arrives must be what the classifier was trained on, of the size
    /// it takes: refused here, by `validate`, before any image is read.
    fn facts(&self, input: &Facts, env: bool) -> Result<Facts, Vec<FieldError>> {
        if !env {
            return Ok(input.clone());
        }
        match Classifier::describe(&self.model) {
            Ok(c) => self.arriving(&c, input).map(|_| input.clone()).map_err(|e| vec![FieldError::new("model", e)]),
            // check_environment names what is missing.
            Err(_) => Ok(input.clone()),
        }
    }

    /// The preprocessing and image size the classifier was trained on, for
    /// `auto` options upstream.
    fn wants(&self, env: bool) -> Wants {
        match Classifier::describe(&self.model).ok().filter(|_| env).and_then(|c| c.trained_on) {
            Some(t) => t.wants(format!("the classifier in {}", self.model.display())),
            None => Wants::default(),
        }
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let stage = ctx.stage_id;
        let fatal = |e: String| StageError::fatal(format!("gradcam `{stage}`: {e}"));
        let classifier = Classifier::describe(&self.model).map_err(fatal)?;
        let layer = classifier.conv_layer(self.layer.as_deref()).map_err(fatal)?;
        let choice = self.choice(&classifier).map_err(fatal)?;
        let arriving = self.arriving(&classifier, ctx.input).map_err(fatal)?;
        let threads = crate::config::threads(self.threads, ctx.workers);
        let input = classifier.input.or(arriving);
        let base_weights = self.base_weights(&classifier);
        let model = input.map(|i| classifier.build(i, &base_weights, threads)).transpose().map_err(fatal)?;
        let table = ctx.shared.get_or_try_init(|| Ok(table::Table::new(&self.out_dir, ctx.workers)))?;
        Ok(Built::Stage(Box::new(Gradcam {
            stage: stage.to_string(),
            model,
            threads,
            base_weights,
            layer,
            choice,
            intensity: self.intensity,
            out_dir: self.out_dir.clone(),
            source_dir: ctx.input.source_dir.clone(),
            max_pixels: ctx.input.max_pixels.unwrap_or_else(crate::imaging::decode::default_max_pixels),
            classifier,
            table,
            done: 0,
            math: 0.0,
            pictures: 0.0,
        })))
    }
}

struct Gradcam {
    stage: String,
    classifier: Classifier,
    /// Built at the first item when nothing upstream fixes the map size.
    model: Option<Convnet>,
    threads: usize,
    base_weights: PathBuf,
    layer: usize,
    choice: ClassChoice,
    intensity: f32,
    out_dir: PathBuf,
    /// The file_reader's folder: pictures go to the same place below `out_dir`.
    source_dir: Option<PathBuf>,
    /// The decode stage's limit, for re-reading the photo.
    max_pixels: u64,
    table: Arc<table::Table>,
    done: u64,
    math: f64,
    pictures: f64,
}

impl Gradcam {
    fn model_for(&mut self, shape: &[usize], path: &Path) -> Result<&mut Convnet, StageError> {
        let fatal = |e: String| StageError::fatal(format!("gradcam `{}`: {e}", self.stage));
        let shape: [usize; 3] = shape.try_into().map_err(|_| fatal(format!("inputs of shape {shape:?}")))?;
        if self.model.is_none() {
            if let Some(base) = self.classifier.base
                && shape[2] != base.channels()
            {
                return Err(fatal(format!(
                    "{}: items of shape {shape:?}, not block4 maps [h, w, {}] (onnx_features with {})",
                    path.display(),
                    base.channels(),
                    base.block4_model()
                )));
            }
            let model = self.classifier.build(shape, &self.base_weights, self.threads).map_err(fatal)?;
            self.model = Some(model);
        }
        let model = self.model.as_mut().ok_or_else(|| fatal("no model".into()))?;
        let want = model.input_shape();
        if shape != want {
            // Fatal, not skipped: every other image of this size would fail too.
            let hint = match self.classifier.base {
                Some(b) => format!("block4 maps: is the onnx_features model {}, not the whole base?", b.block4_model()),
                None => "resize every image to the model's input".to_string(),
            };
            return Err(fatal(format!(
                "{} reaches the model as {shape:?} but it takes {want:?} ({hint})",
                path.display()
            )));
        }
        Ok(model)
    }

    /// Where the picture of the photo at `path` goes.
    fn picture_path(&self, path: &Path) -> PathBuf {
        let relative = self
            .source_dir
            .as_deref()
            .and_then(|d| path.strip_prefix(d).ok())
            .filter(|r| !r.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new(path.file_name().unwrap_or(path.as_os_str())));
        self.out_dir.join(relative).with_extension("png")
    }
}

impl Stage for Gradcam {
    fn process(&mut self, item: Item, _out: &mut dyn Emit) -> Result<(), StageError> {
        let path = item.meta.path.to_path_buf();
        let Some((row, shape)) = input_row(&item.payload, self.classifier.rescale) else {
            return Err(StageError::fatal(format!(
                "gradcam `{}`: expected images or [height, width, channels] maps, got {}",
                self.stage,
                item.kind().name()
            )));
        };
        let t = Instant::now();
        let (layer, choice) = (self.layer, self.choice);
        let model = self.model_for(&shape, &path)?;
        let h = heatmap::heatmaps(model, &row, 1, layer, choice)
            .map_err(|e| StageError::fatal(format!("gradcam `{}`: {e}", self.stage)))?
            .pop()
            .ok_or_else(|| StageError::fatal("gradcam: no heatmap"))?;
        self.math += t.elapsed().as_secs_f64();

        let t = Instant::now();
        // The book draws on the photo as it is on disk, not the model's 150x150.
        let bytes =
            std::fs::read(&path).map_err(|e| StageError::item(&path, format!("cannot re-read the photo: {e}")))?;
        let photo = crate::imaging::decode::decode_image(&bytes, self.max_pixels)
            .map_err(|e| StageError::item(&path, format!("cannot re-read the photo: {e}")))?;
        let picture = heatmap::superimpose(&photo, &h, self.intensity);
        let to = self.picture_path(&path);
        crate::visualize::picture::save(&picture, &to)
            .map_err(|e| StageError::fatal(format!("gradcam `{}`: {e}", self.stage)))?;
        self.pictures += t.elapsed().as_secs_f64();

        let name = |i: usize| self.classifier.classes.get(i).cloned().unwrap_or_else(|| i.to_string());
        let peak =
            heatmap::peak(&h).map(|cell| (cell, heatmap::cell_centre(&h, cell, [photo.height(), photo.width()])));
        self.table.push(table::Row {
            seq: item.meta.seq,
            path,
            label: item.meta.label.as_ref().and_then(|l| l.classes.get(l.index as usize).cloned()),
            class: name(h.class),
            probability: h.probability,
            predicted: name(h.predicted),
            peak,
            picture: to,
            shape: h.shape,
            values: h.values,
        })?;
        self.done += 1;
        Ok(())
    }

    fn finish(&mut self, _out: &mut dyn Emit, signals: &RunSignals) -> Result<(), StageError> {
        if let Some(lines) = self.table.finish_copy(signals)? {
            tracing::info!(stage = %self.stage, "{lines} heatmaps: {}", self.out_dir.join(CSV).display());
        }
        Ok(())
    }

    /// Summed over the copies by the report.
    fn summary(&self) -> Option<serde_json::Value> {
        let ms = |s: f64| (s * 1e6).round() / 1e3;
        Some(serde_json::json!({
            "heatmaps": self.done,
            "gradcam_ms": ms(self.math),
            "picture_ms": ms(self.pictures),
            "out_dir": self.out_dir,
        }))
    }
}
