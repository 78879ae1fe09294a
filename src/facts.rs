//! What flows on each edge of a pipeline, known before any item exists.
//!
//! The graph computes these once, in order: a source states what it emits,
//! and each stage kind's [`crate::stage::StageConfig::facts`] says how its
//! output follows from its input and refuses an input it cannot take. A
//! trained model's folder states what it was trained on ([`TrainedOn`]),
//! and the stages that use it compare that with the edge: a head trained on
//! `caffe` features at 150x150 is refused by `convflow validate` on
//! `rescale` features at 224x224, before any image is read.
//!
//! Facts are typed: stages never read each other's options.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::imaging::resize::Filter;
use crate::item::{ClassMode, ItemKind};
use crate::ml::Preprocess;

/// Everything known about the items on one edge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// The item kind (the upstream stage's `EMITS`).
    pub kind: Option<ItemKind>,
    /// The images' `[height, width]`, when a stage upstream fixes it (`resize`).
    pub image_size: Option<[u32; 2]>,
    /// The id of the stage that fixed it, for messages.
    pub image_size_by: Option<String>,
    /// 3 (RGB) or 1 (grey), when a stage upstream fixes it (`decode`).
    pub channels: Option<u32>,
    /// The resampling filter of the `resize` that made the images.
    pub resize_filter: Option<Filter>,
    /// Set by the stage that turned images into features or maps.
    pub features: Option<FeatureFacts>,
    /// The labels the source attaches.
    pub labels: Option<LabelFacts>,
    /// The splits the source emits (empty: none).
    pub splits: Vec<String>,
    /// Passes the source makes over its items.
    pub epochs: u32,
    /// The source emits its items in a shuffled order (not its listing's).
    pub shuffled: bool,
    /// Fixed augmented versions of each image (`file_reader`'s `variants`); 0: none.
    pub variants: u32,
    /// Views of each image (`views` stage); 1: the image as it is.
    pub views: u8,
    /// The folder the source lists, and the decode limit, for stages that
    /// read a photo again (`gradcam` draws on it).
    pub source_dir: Option<PathBuf>,
    pub max_pixels: Option<u64>,
    /// Every stage upstream, for the record a trainer writes beside its
    /// weights and the key its checkpoints are kept under. Only recorded,
    /// never read back for decisions: those go through the fields above.
    pub made_by: Vec<StageRecord>,
}

impl Facts {
    /// One item's shape, when known: the features', else the images'
    /// `[height, width, channels]` (3 channels unless a stage says).
    pub fn item_shape(&self) -> Option<Vec<usize>> {
        match &self.features {
            Some(f) => f.shape.clone(),
            None => self.image_size.map(|[h, w]| vec![h as usize, w as usize, self.channels.unwrap_or(3) as usize]),
        }
    }

    /// The outputs a classifier of these labels has (1 for `binary`, the
    /// class count for `categorical`), when known before the run.
    pub fn class_outputs(&self) -> Option<usize> {
        let labels = self.labels.as_ref()?;
        match labels.mode {
            ClassMode::Binary => Some(1),
            ClassMode::Categorical => labels.classes.as_ref().map(Vec::len),
            ClassMode::None => None,
        }
    }

    /// One line: the item kind and what is known of the items, as
    /// `convflow graph` prints it on each edge.
    pub fn summary(&self) -> String {
        let mut parts = vec![self.kind.map_or("nothing", |k| k.name()).to_string()];
        if let Some(f) = &self.features {
            parts.push(f.to_string());
        }
        match (self.image_size, self.channels) {
            (Some([h, w]), Some(c)) => parts.push(format!("images {h}x{w}x{c}")),
            (Some([h, w]), None) => parts.push(format!("images {h}x{w}")),
            (None, Some(c)) => parts.push(format!("images of any size, {c} channel(s)")),
            (None, None) => {}
        }
        if let Some(filter) = self.resize_filter {
            parts.push(format!("resized {filter:?}").to_lowercase());
        }
        if let Some(l) = &self.labels {
            let mode = format!("{:?}", l.mode).to_lowercase();
            match &l.classes {
                Some(c) => parts.push(format!("labels {mode} [{}]", c.join(", "))),
                None => parts.push(format!("labels {mode}")),
            }
        }
        if !self.splits.is_empty() {
            parts.push(format!("splits {}", self.splits.join(", ")));
        }
        if self.epochs > 1 {
            parts.push(format!("{} epochs", self.epochs));
        }
        if self.variants > 0 {
            parts.push(format!("{} variants", self.variants));
        }
        if self.views > 1 {
            parts.push(format!("{} views", self.views));
        }
        parts.join("; ")
    }
}

/// What made features (or the maps a fine-tuned base takes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureFacts {
    /// The model file's name (`vgg16_notop.onnx`), for messages.
    pub model: String,
    /// blake3 of the model file, when it was read (`validate --no-environment` does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_blake3: Option<String>,
    pub preprocess: Preprocess,
    /// One image's features, `[h, w, c]` (or what the model gives), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Vec<usize>>,
}

impl std::fmt::Display for FeatureFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} features of {}", self.preprocess.name(), self.model)?;
        if let Some(shape) = &self.shape {
            write!(f, " at {shape:?}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelFacts {
    pub mode: ClassMode,
    /// The class names in label order, when known before the run (folders listed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
}

/// One stage upstream: its id, kind and options (defaults filled in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRecord {
    pub id: String,
    pub kind: String,
    /// The options as canonical JSON text.
    pub options: String,
}

impl StageRecord {
    /// `{"kind": ..., "options": {...}}`, as trained models' descriptions list them.
    pub fn to_json(&self) -> serde_json::Value {
        let options: serde_json::Value = serde_json::from_str(&self.options).unwrap_or_default();
        serde_json::json!({ "kind": self.kind, "options": options })
    }
}

/// What a downstream stage needs of the items it will get, so that an
/// option left out upstream (`preprocess: auto`, `size: auto`) takes the
/// right value: a head's preprocessing and image size, a base's input size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wants {
    pub preprocess: Option<Preprocess>,
    pub image_size: Option<[u32; 2]>,
    /// Who wants them, for messages (`head_predict \`classify\``).
    pub by: String,
}

impl Wants {
    /// `self`, with what `other` wants where `self` says nothing.
    pub fn or(self, other: &Wants) -> Wants {
        let by = if self.by.is_empty() { other.by.clone() } else { self.by.clone() };
        Wants { preprocess: self.preprocess.or(other.preprocess), image_size: self.image_size.or(other.image_size), by }
    }
}

/// What a trained model was trained on, and so requires of the items it
/// is used on: written beside the weights (`head.json`'s and `model.json`'s
/// `trained_on`) and read back typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainedOn {
    /// The version of this record: [`TrainedOn::VERSION`].
    pub version: u32,
    pub classes: Vec<String>,
    pub class_mode: ClassMode,
    /// The training images' size and channels, when fixed upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<[u32; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize_filter: Option<Filter>,
    /// The features or maps it was trained on (absent: it took images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<FeatureFacts>,
}

impl TrainedOn {
    pub const VERSION: u32 = 1;

    /// The record for a model trained on the items of `edge`.
    pub fn from_edge(edge: &Facts, classes: Vec<String>, class_mode: ClassMode) -> TrainedOn {
        TrainedOn {
            version: Self::VERSION,
            classes,
            class_mode,
            image_size: edge.image_size,
            channels: edge.channels,
            resize_filter: edge.resize_filter,
            features: edge.features.clone(),
        }
    }

    /// Reads the description `file` (`head.json`, `model.json`).
    pub fn read(file: &std::path::Path) -> Result<TrainedOn, String> {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: unreadable: {e}", file.display()))?;
        let description: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", file.display()))?;
        TrainedOn::from_description(&description, file)
    }

    /// What it asks of the items arriving, for options left out upstream.
    pub fn wants(&self, by: String) -> Wants {
        Wants { preprocess: self.features.as_ref().map(|f| f.preprocess), image_size: self.image_size, by }
    }

    /// Reads `trained_on` from a description (`head.json`, `model.json`).
    /// A file written before the record existed is read compatibly from
    /// the stages it lists (`features_from` / `images_from`).
    pub fn from_description(description: &serde_json::Value, file: &std::path::Path) -> Result<TrainedOn, String> {
        let err = |m: String| format!("{}: {m}", file.display());
        if let Some(record) = description.get("trained_on") {
            let t: TrainedOn = serde_json::from_value(record.clone()).map_err(|e| err(format!("`trained_on`: {e}")))?;
            if t.version != Self::VERSION {
                return Err(err(format!(
                    "`trained_on` is version {}; this convflow reads version {} (train the model again, or use the \
                     convflow that wrote it)",
                    t.version,
                    Self::VERSION
                )));
            }
            return Ok(t);
        }
        legacy::read(description).map_err(err)
    }

    /// The first way `edge` differs from what the model was trained on, as
    /// "trained on X; this edge carries Y".
    pub fn mismatch(&self, edge: &Facts) -> Option<String> {
        match (&self.features, &edge.features) {
            (Some(want), Some(got)) => {
                let shape_differs = matches!((&want.shape, &got.shape), (Some(a), Some(b)) if a != b);
                let model_differs = match (&want.model_blake3, &got.model_blake3) {
                    (Some(a), Some(b)) => a != b,
                    _ => false,
                };
                if want.preprocess != got.preprocess || shape_differs {
                    let of =
                        |size: Option<[u32; 2]>| size.map(|[h, w]| format!(" of {h}x{w} images")).unwrap_or_default();
                    return Some(format!(
                        "trained on {want}{}; this edge carries {got}{}",
                        of(self.image_size),
                        of(edge.image_size)
                    ));
                }
                if model_differs {
                    let short = |f: &FeatureFacts| {
                        f.model_blake3.as_deref().map(|h| h.get(..12).unwrap_or(h)).unwrap_or_default().to_string()
                    };
                    return Some(format!(
                        "trained on features of {} (blake3 {}…); this edge carries features of {} (blake3 {}…), \
                         another model",
                        want.model,
                        short(want),
                        got.model,
                        short(got)
                    ));
                }
            }
            (Some(want), None) if edge.kind.is_some() => {
                return Some(format!("trained on {want}; this edge carries images, not features"));
            }
            (None, Some(got)) => {
                return Some(format!("trained on images; this edge carries {got}"));
            }
            _ => {}
        }
        self.pixels_mismatch(edge)
    }

    /// [`TrainedOn::mismatch`] for a model whose own first layers turn the
    /// arriving maps into what it was trained on (a head on VGG16's block5,
    /// fed block4 maps): only the pixels must be the same, their
    /// preprocessing, size and channels.
    pub fn pixels_mismatch(&self, edge: &Facts) -> Option<String> {
        if let (Some(want), Some(got)) = (&self.features, &edge.features)
            && want.preprocess != got.preprocess
        {
            return Some(format!(
                "trained on features of images with preprocess `{}` ({}); this edge carries maps of images with \
                 preprocess `{}` ({})",
                want.preprocess.name(),
                want.model,
                got.preprocess.name(),
                got.model
            ));
        }
        if let (Some(want), Some(got)) = (self.image_size, edge.image_size)
            && want != got
        {
            let what = if self.features.is_some() { "features of images" } else { "images" };
            return Some(format!(
                "trained on {what} of {}x{}; this edge carries {what} of {}x{}",
                want[0], want[1], got[0], got[1]
            ));
        }
        if let (Some(want), Some(got)) = (self.channels, edge.channels)
            && want != got
        {
            return Some(format!("trained on images of {want} channel(s); this edge carries {got}"));
        }
        None
    }
}

/// Descriptions written before `trained_on`: the stages that made the
/// training items, as `{kind, options}` (options by their documented names).
mod legacy {
    use super::*;

    pub fn read(description: &serde_json::Value) -> Result<TrainedOn, String> {
        let classes: Vec<String> = description["classes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_string))
            .collect();
        if classes.is_empty() {
            return Err("lists no classes".into());
        }
        let stages: Vec<&serde_json::Value> =
            ["features_from", "images_from"].iter().filter_map(|k| description[*k].as_array()).flatten().collect();
        let last = |kind: &str| stages.iter().rev().find(|s| s["kind"] == kind).map(|s| &s["options"]);
        let class_mode = match last("file_reader").map(|o| o["class_mode"].clone()) {
            Some(v) if !v.is_null() => serde_json::from_value(v).map_err(|e| format!("`class_mode`: {e}"))?,
            _ if classes.len() == 2 => ClassMode::Binary,
            _ => ClassMode::Categorical,
        };
        let image_size = last("resize").and_then(|o| serde_json::from_value::<[u32; 2]>(o["size"].clone()).ok());
        let resize_filter = last("resize").map(|o| serde_json::from_value(o["filter"].clone()).unwrap_or_default());
        let channels = last("decode").map(|o| if o["color_mode"] == "grayscale" { 1 } else { 3 });
        let features = match last("onnx_features") {
            None => None,
            Some(o) => Some(FeatureFacts {
                model: o["model"]
                    .as_str()
                    .map(|m| std::path::Path::new(m).file_name().map_or(m.into(), |f| f.to_string_lossy().into()))
                    .unwrap_or_default(),
                model_blake3: None,
                preprocess: match o.get("preprocess") {
                    Some(p) if !p.is_null() => {
                        serde_json::from_value(p.clone()).map_err(|e| format!("`preprocess`: {e}"))?
                    }
                    _ => Preprocess::default(),
                },
                shape: None,
            }),
        };
        Ok(TrainedOn {
            version: TrainedOn::VERSION,
            classes,
            class_mode,
            image_size,
            channels,
            resize_filter,
            features,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(preprocess: Preprocess, shape: &[usize]) -> FeatureFacts {
        FeatureFacts {
            model: "vgg16_notop.onnx".into(),
            model_blake3: Some("ab".into()),
            preprocess,
            shape: Some(shape.to_vec()),
        }
    }

    #[test]
    fn a_head_names_both_sides() {
        let trained = TrainedOn {
            version: 1,
            classes: vec!["cats".into(), "dogs".into()],
            class_mode: ClassMode::Binary,
            image_size: Some([150, 150]),
            channels: Some(3),
            resize_filter: None,
            features: Some(features(Preprocess::Caffe, &[4, 4, 512])),
        };
        let edge = Facts {
            kind: Some(ItemKind::Features),
            image_size: Some([224, 224]),
            features: Some(features(Preprocess::Rescale, &[7, 7, 512])),
            ..Facts::default()
        };
        assert_eq!(
            trained.mismatch(&edge).unwrap(),
            "trained on caffe features of vgg16_notop.onnx at [4, 4, 512] of 150x150 images; this edge carries \
             rescale features of vgg16_notop.onnx at [7, 7, 512] of 224x224 images"
        );
        let same = Facts { image_size: Some([150, 150]), features: trained.features.clone(), ..edge };
        assert_eq!(trained.mismatch(&same), None);
    }

    #[test]
    fn old_descriptions_are_read_from_their_stage_list() {
        let old = serde_json::json!({
            "classes": ["cats", "dogs"],
            "features_from": [
                {"kind": "file_reader", "options": {"class_mode": "binary"}},
                {"kind": "resize", "options": {"size": [150, 150], "filter": "nearest"}},
                {"kind": "onnx_features", "options": {"model": "models/vgg16_notop.onnx", "preprocess": "caffe"}}
            ]
        });
        let t = TrainedOn::from_description(&old, std::path::Path::new("head.json")).unwrap();
        assert_eq!(t.image_size, Some([150, 150]));
        assert_eq!(t.features.as_ref().unwrap().preprocess, Preprocess::Caffe);
        assert_eq!(t.features.unwrap().model, "vgg16_notop.onnx");
        let future = serde_json::json!({ "trained_on": { "version": 9, "classes": ["a"], "class_mode": "binary" } });
        let e = TrainedOn::from_description(&future, std::path::Path::new("head.json")).unwrap_err();
        assert!(e.contains("version 9"), "{e}");
    }
}
