//! `head_predict`: labels images with a head trained by `dense_head`,
//! writing `predictions.csv` (path, probability per class, predicted class;
//! see [`super::predictions`]). The views of one image (the `views` stage)
//! make one line, with their mean probabilities.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::predictions::{PredictionsCsv, missing_files};
use crate::facts::{Facts, TrainedOn, Wants};
use crate::item::{Item, ItemKind, Payload};
use crate::ml::head::Head;
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, RunSignals, Stage, StageConfig, StageError};
use crate::trained::read_description;

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

    fn check_environment(&self) -> Vec<FieldError> {
        missing_files("head", &self.head, &["head.safetensors", "head.json"], "train a head with dense_head first")
    }

    /// The preprocessing and image size the head was trained on, for
    /// `preprocess: auto` and `size: auto` upstream.
    fn wants(&self, env: bool) -> Wants {
        match self.trained_on(env) {
            Some(Ok(t)) => t.wants(format!("the head in {}", self.head.display())),
            _ => Wants::default(),
        }
    }

    /// Features other than the head was trained on are refused here, both named.
    fn facts(&self, input: &Facts, env: bool) -> Result<Facts, Vec<FieldError>> {
        match self.trained_on(env) {
            Some(Ok(t)) => match t.mismatch(input) {
                Some(m) => Err(vec![FieldError::new(
                    "head",
                    format!(
                        "the head in {} was {m}: use the same model, preprocessing and image size (leave \
                         `preprocess` and `size` out, or `auto`, to get the head's)",
                        self.head.display()
                    ),
                )]),
                None => Ok(input.clone()),
            },
            Some(Err(e)) => Err(vec![FieldError::new("head", e)]),
            None => Ok(input.clone()),
        }
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let head = Head::load_safetensors(&self.head.join("head.safetensors")).map_err(StageError::fatal)?;
        let (_, classes) = read_description(&self.head.join("head.json"))?;
        let csv = PredictionsCsv::new(self.out.clone(), classes, head.output_dim(), CHUNK)
            .map_err(|e| StageError::fatal(format!("{}: {e}", self.head.display())))?;
        Ok(Built::Stage(Box::new(HeadPredict { head, csv })))
    }
}

impl HeadPredictConfig {
    /// What `head.json` records, when the files may be read and it is there
    /// (a missing one is `check_environment`'s error).
    fn trained_on(&self, env: bool) -> Option<Result<TrainedOn, String>> {
        let file = self.head.join("head.json");
        (env && file.is_file()).then(|| TrainedOn::read(&file))
    }
}

struct HeadPredict {
    head: Head,
    csv: PredictionsCsv,
}

/// Rows per matrix call.
const CHUNK: usize = 64;

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
        let head = &mut self.head;
        self.csv.push(&item.meta.path, f.data, |x, n| head.predict(x, n).map_err(StageError::fatal))
    }

    fn finish(&mut self, _out: &mut dyn Emit, signals: &RunSignals) -> Result<(), StageError> {
        let head = &mut self.head;
        self.csv.finish(signals, |x, n| head.predict(x, n).map_err(StageError::fatal))
    }

    fn summary(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "predictions": self.csv.lines(), "out": self.csv.out() }))
    }
}
