//! The data that flows along edges: one closed enum of payload kinds plus
//! the metadata every item carries from its source to the sink.

use std::path::Path;
use std::sync::Arc;

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

/// What an edge carries. Each stage kind declares which kinds it takes and
/// emits, so a wrong edge is a validation error, not a runtime panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// Encoded file contents (JPEG, PNG, ...), already hashed.
    Bytes,
    /// A decoded 8-bit image: RGB (height x width x 3) or, after
    /// `decode: {color_mode: grayscale}`, one channel (height x width x 1).
    Image,
    /// Several items grouped for one model call, in source order.
    Batch,
    /// A float32 feature tensor for one image (e.g. 4x4x512, NHWC).
    Features,
}

impl ItemKind {
    pub fn name(self) -> &'static str {
        match self {
            ItemKind::Bytes => "bytes",
            ItemKind::Image => "image",
            ItemKind::Batch => "batch",
            ItemKind::Features => "features",
        }
    }
}

/// One item a listing source will emit: its path, label and split.
pub type Listed = (std::path::PathBuf, Option<Label>, Option<Arc<str>>);

/// How labels are encoded, as in Keras's `flow_from_directory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClassMode {
    /// One float 0/1 per item; needs exactly two classes.
    #[default]
    Binary,
    /// A one-hot float vector per item.
    Categorical,
    /// No labels at all.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// Index into `classes`, which are the sorted class folder names.
    pub index: u32,
    pub classes: Arc<[String]>,
    pub mode: ClassMode,
}

#[derive(Debug, Clone)]
pub struct Meta {
    pub path: Arc<Path>,
    /// blake3 of the encoded file: the identity of an image wherever it lives.
    pub content_hash: [u8; 32],
    pub label: Option<Label>,
    /// `train`, `validation`, ... when the source reads several splits.
    pub split: Option<Arc<str>>,
    pub epoch: u32,
    /// Which augmented version of the image this is, when a source emits K
    /// fixed variants of each image (the augmentation-aware cache); 0
    /// otherwise. Random draws derive from (seed, epoch, variant, content hash).
    pub variant: u32,
    /// Which fixed view of the image this is (the `views` stage): 0 as it
    /// is, 1 mirrored left-right, 2 upside down, 3 both. Validation and test
    /// predictions are averaged over the views of one image.
    pub view: u8,
    /// Position in the source's output order.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone)]
pub enum Payload {
    Bytes(Arc<[u8]>),
    Image(RgbImage),
    /// An 8-bit one-channel image (`color_mode: grayscale`); of kind `image`.
    Gray(GrayImage),
    Batch(Vec<Item>),
    Features(Features),
}

#[derive(Debug, Clone)]
pub struct Item {
    pub meta: Meta,
    pub payload: Payload,
}

impl Item {
    pub fn kind(&self) -> ItemKind {
        match self.payload {
            Payload::Bytes(_) => ItemKind::Bytes,
            Payload::Image(_) | Payload::Gray(_) => ItemKind::Image,
            Payload::Batch(_) => ItemKind::Batch,
            Payload::Features(_) => ItemKind::Features,
        }
    }

    /// Number of images this item stands for (a batch counts its members).
    pub fn image_count(&self) -> u64 {
        match &self.payload {
            Payload::Batch(items) => items.len() as u64,
            _ => 1,
        }
    }
}
