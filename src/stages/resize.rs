//! `resize`: to a fixed size. `nearest`, Keras's `load_img` default, picks
//! exactly the source pixels PIL's `Image.NEAREST` picks (see
//! [`crate::imaging::resize::pil_nearest_indices`]); the convolution filters run on
//! fast_image_resize (SIMD) and follow PIL's resize, which Keras uses for the
//! others, to within a level or two (docs/keras-pixels.md).

use serde::{Deserialize, Serialize};

use crate::facts::{Facts, Wants};
use crate::imaging::resize::{Filter, Resize};
use crate::item::{Item, ItemKind, Payload};
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, Stage, StageConfig, StageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeConfig {
    /// [height, width], Keras's `target_size` order; `auto` (`None`): the
    /// size the stages after it need (a conv base's, a trained model's).
    #[serde(deserialize_with = "size_or_auto", serialize_with = "auto_or_size")]
    pub size: Option<[u32; 2]>,
    #[serde(default)]
    pub filter: Filter,
    /// Not an option: names the pixel rules in the feature cache key, so
    /// features made under an earlier rule (fast_image_resize's nearest,
    /// before PIL's) are never served for this one.
    #[serde(skip_deserializing, default = "pixel_rules")]
    pixel_rules: &'static str,
}

/// `[h, w]`, `n` for `[n, n]` (so one `${image_size}` param sets it), or `auto`.
fn size_or_auto<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<[u32; 2]>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "expected a size [height, width], one number for both, or `auto`")]
    enum Size {
        Side(u32),
        Size([u32; 2]),
        Word(String),
    }
    match Size::deserialize(d)? {
        Size::Side(n) => Ok(Some([n, n])),
        Size::Size(size) => Ok(Some(size)),
        Size::Word(w) if w == "auto" => Ok(None),
        Size::Word(w) => Err(serde::de::Error::custom(format!(
            "`{w}` is not a size: give [height, width], one number for both, or `auto`"
        ))),
    }
}

fn auto_or_size<S: serde::Serializer>(size: &Option<[u32; 2]>, s: S) -> Result<S::Ok, S::Error> {
    match size {
        Some(size) => size.serialize(s),
        None => s.serialize_str("auto"),
    }
}

/// The rules `resize` follows; change it when the same image and options give other pixels.
fn pixel_rules() -> &'static str {
    "pil-13"
}

impl StageConfig for ResizeConfig {
    const KIND: &'static str = "resize";
    const SUMMARY: &'static str = "resizes to [height, width] (nearest like Keras load_img, or PIL-style filters)";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image];
    const EMITS: Option<ItemKind> = Some(ItemKind::Image);
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "size",
            ty: "[height, width] | n | auto",
            default: "(required)",
            help: "target size; auto: what the model after it needs (a base's size, a trained model's)",
        },
        OptionDoc {
            name: "filter",
            ty: "nearest|bilinear|bicubic|lanczos|box|hamming",
            default: "nearest",
            help: "interpolation",
        },
    ];
    const PARALLEL: bool = true;
    const AFFECTS_PIXELS: bool = true;
    const PASSES_PRECOMPUTED: bool = true;

    fn check(&self) -> Vec<FieldError> {
        if self.size.is_some_and(|s| s.contains(&0)) {
            vec![FieldError::new("size", "height and width must be at least 1")]
        } else {
            Vec::new()
        }
    }

    fn resolve(&self, wants: &Wants) -> Option<Self> {
        match (self.size, wants.image_size) {
            (None, Some(size)) => Some(ResizeConfig { size: Some(size), ..self.clone() }),
            _ => None,
        }
    }

    fn facts(&self, input: &Facts, env: bool) -> Result<Facts, Vec<FieldError>> {
        match (self.size, env) {
            (None, true) => Err(vec![FieldError::new(
                "size",
                "is `auto`, but no stage after it needs a size (a conv base, or a trained model): give \
                 [height, width]",
            )]),
            // Without the environment, the trained model that would say is not read.
            (size, _) => Ok(Facts { image_size: size, resize_filter: Some(self.filter), ..input.clone() }),
        }
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let [h, w] = self.size.ok_or_else(|| StageError::fatal("resize: size `auto` was not resolved"))?;
        Ok(Built::Stage(Box::new(Resize::new(h, w, self.filter))))
    }
}

impl Stage for Resize {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        let resized = match item.payload {
            Payload::Image(img) => self.apply(img).map(Payload::Image),
            Payload::Gray(img) => self.apply_gray(img).map(Payload::Gray),
            _ => return Err(StageError::fatal(format!("expected an image, got {}", item.kind().name()))),
        };
        let payload = resized.map_err(|e| StageError::item(&item.meta.path, e))?;
        out.emit(Item { meta: item.meta, payload })?;
        Ok(())
    }
}
