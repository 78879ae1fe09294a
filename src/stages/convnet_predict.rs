//! `convnet_predict`: labels images with a convnet trained by the `convnet`
//! stage (its `out_dir`), writing the CSV `head_predict` writes (path,
//! probability per class, predicted class; see [`super::predictions`]).
//!
//! It takes what `convnet` takes: 8-bit RGB images or `[h, w, c]` tensors
//! (the 1-channel digits of `idx_reader`), each multiplied by the `rescale`
//! the model was trained with (`model.json`), so the pixels reach the model
//! exactly as they did in training. Every image must have the model's
//! input shape: an image size fixed upstream (`resize`) that differs stops
//! the run when it is built, and any other image that differs stops it
//! when it arrives (the first, before anything is predicted), naming both shapes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::convnet::input_row;
use super::predictions::{PredictionsCsv, missing_files};
use crate::facts::{Facts, TrainedOn, Wants};
use crate::item::{Item, ItemKind};
use crate::ml::convnet::Convnet;
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, RunSignals, Stage, StageConfig, StageError};
use crate::trained::classifier::Classifier;
use crate::trained::read_description;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvnetPredictConfig {
    /// A folder written by `convnet` (model.safetensors + model.json).
    pub model: PathBuf,
    /// The CSV to write.
    pub out: PathBuf,
    /// Math threads; 0 = one per core.
    #[serde(default)]
    pub threads: usize,
}

impl StageConfig for ConvnetPredictConfig {
    const KIND: &'static str = "convnet_predict";
    const SUMMARY: &'static str = "labels images with a convnet trained by `convnet`; writes predictions.csv";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image, ItemKind::Features];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "model",
            ty: "path",
            default: "(required)",
            help: "the convnet's out_dir: model.safetensors and model.json",
        },
        OptionDoc { name: "out", ty: "path", default: "(required)", help: "predictions CSV" },
        OptionDoc { name: "threads", ty: "int", default: "0 (one per core)", help: "math threads" },
    ];

    fn check_environment(&self) -> Vec<FieldError> {
        missing_files(
            "model",
            &self.model,
            &["model.safetensors", "model.json"],
            "train a model with the convnet stage first",
        )
    }

    /// What arrives must be what the model was trained on: refused here,
    /// by `validate`, before any image is read.
    fn facts(&self, input: &Facts, env: bool) -> Result<Facts, Vec<FieldError>> {
        let complete = ["model.safetensors", "model.json"].iter().all(|f| self.model.join(f).is_file());
        if !env || !complete {
            return Ok(input.clone());
        }
        self.check_arriving(input).map(|_| input.clone()).map_err(|e| vec![FieldError::new("model", e)])
    }

    /// The preprocessing and image size the model was trained on, for
    /// `auto` options upstream.
    fn wants(&self, env: bool) -> Wants {
        let file = self.model.join("model.json");
        match TrainedOn::read(&file).ok().filter(|_| env) {
            Some(t) => t.wants(format!("the model in {}", self.model.display())),
            None => Wants::default(),
        }
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let threads = crate::config::threads(self.threads, 1);
        let model = Convnet::load_safetensors(&self.model.join("model.safetensors"), threads)
            .map_err(|e| StageError::fatal(format!("convnet_predict `{}`: {e}", ctx.stage_id)))?;
        self.check_arriving(ctx.input)
            .map_err(|e| StageError::fatal(format!("convnet_predict `{}`: {e}", ctx.stage_id)))?;
        let description = self.model.join("model.json");
        let (meta, classes) = read_description(&description)?;
        // Without the training rescale the pixels would not be what the model learnt on.
        let rescale =
            meta["rescale"].as_f64().map(|r| r as f32).filter(|r| r.is_finite() && *r > 0.0).ok_or_else(|| {
                StageError::fatal(format!(
                    "{}: no positive `rescale` (written by the convnet stage)",
                    description.display()
                ))
            })?;
        let csv = PredictionsCsv::new(self.out.clone(), classes, model.output_dim(), CHUNK)
            .map_err(|e| StageError::fatal(format!("{}: {e}", self.model.display())))?;
        Ok(Built::Stage(Box::new(ConvnetPredict {
            model,
            rescale,
            csv,
            stage: ctx.stage_id.to_string(),
            dir: self.model.clone(),
        })))
    }
}

impl ConvnetPredictConfig {
    /// Images resized upstream to another size would all fail, as would
    /// maps of other pixels: said before any work. (Past an onnx_features
    /// stage the items are its maps, such as the block4 maps a fine-tuned
    /// VGG16 takes: their size is checked as they arrive.)
    fn check_arriving(&self, input: &Facts) -> Result<(), String> {
        let c = Classifier::describe(&self.model)?;
        if let (Some([h, w]), Some(want), None) = (input.image_size, c.input, &input.features) {
            let got = [h as usize, w as usize, input.channels.map_or(want[2], |c| c as usize)];
            if got != want {
                return Err(format!(
                    "images arrive as {got:?} (resized upstream) but the model in {} takes {want:?}",
                    self.model.display()
                ));
            }
        }
        c.check_input(input)
    }
}

struct ConvnetPredict {
    model: Convnet,
    rescale: f32,
    csv: PredictionsCsv,
    stage: String,
    dir: PathBuf,
}

/// Images per forward pass: bounds its memory (the im2col columns of the
/// book's 150x150 model take 2.4 MB per image).
const CHUNK: usize = 32;

fn predict(model: &mut Convnet, x: &[f32], n: usize) -> Result<Vec<f32>, StageError> {
    model.predict(x, n).map_err(StageError::fatal)
}

impl Stage for ConvnetPredict {
    fn process(&mut self, item: Item, _out: &mut dyn Emit) -> Result<(), StageError> {
        let path = &item.meta.path;
        // The `convnet` stage's rows, so the model sees the very values it was trained on.
        let Some((row, shape)) = input_row(&item.payload, self.rescale) else {
            return Err(StageError::fatal(format!(
                "convnet_predict `{}`: expected images or [height, width, channels] tensors, got {}",
                self.stage,
                item.kind().name()
            )));
        };
        let want = self.model.input_shape();
        if shape != want {
            // Fatal, not skipped: every other image of this size would fail too,
            // and a CSV silently missing them would look complete.
            return Err(StageError::fatal(format!(
                "convnet_predict `{}`: {} has shape {shape:?} but the model in {} takes {want:?} (resize every image to the model's input size)",
                self.stage,
                path.display(),
                self.dir.display()
            )));
        }
        let model = &mut self.model;
        self.csv.push(path, row, |x, n| predict(model, x, n))
    }

    fn finish(&mut self, _out: &mut dyn Emit, signals: &RunSignals) -> Result<(), StageError> {
        let model = &mut self.model;
        self.csv.finish(signals, |x, n| predict(model, x, n))
    }

    fn summary(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "predictions": self.csv.lines(), "out": self.csv.out() }))
    }
}
