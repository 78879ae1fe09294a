//! `augment`: Keras `ImageDataGenerator`'s random transforms (see
//! [`crate::augment`]) as one warp per image. Draws derive from (seed,
//! variant, content hash), the variant being the epoch unless the source
//! draws one of K fixed variants, so the pixels do not depend on worker
//! count or scheduling. With `size`, it takes full-size decoded images and
//! replaces the `resize` stage (resize and augmentation in one warp).

use serde::{Deserialize, Serialize};

use crate::augment::AugmentOptions;
use crate::facts::Facts;
use crate::item::{Item, ItemKind, Payload};
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, Stage, StageConfig, StageError};

/// The stage's options are [`AugmentOptions`] as they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AugmentConfig(pub AugmentOptions);

impl StageConfig for AugmentConfig {
    const KIND: &'static str = "augment";
    const SUMMARY: &'static str =
        "Keras ImageDataGenerator random transforms in one bilinear warp (optionally fused with the resize)";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image];
    const EMITS: Option<ItemKind> = Some(ItemKind::Image);
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc { name: "rotation_range", ty: "degrees", default: "0", help: "rotation uniform in [-r, r)" },
        OptionDoc {
            name: "width_shift_range",
            ty: "float|int|[float]",
            default: "0",
            help: "fraction of the width (< 1) or pixels; a list: choices",
        },
        OptionDoc { name: "height_shift_range", ty: "float|int|[float]", default: "0", help: "as width_shift_range" },
        OptionDoc { name: "shear_range", ty: "degrees", default: "0", help: "shear angle uniform in [-s, s)" },
        OptionDoc { name: "zoom_range", ty: "float|[lo, hi]", default: "0", help: "z: zx, zy each in [1-z, 1+z]" },
        OptionDoc { name: "horizontal_flip", ty: "bool", default: "false", help: "flip left-right half the time" },
        OptionDoc { name: "vertical_flip", ty: "bool", default: "false", help: "flip upside down half the time" },
        OptionDoc {
            name: "fill_mode",
            ty: "nearest|constant|reflect|wrap",
            default: "nearest",
            help: "outside the image (scipy's rules)",
        },
        OptionDoc { name: "cval", ty: "0..255", default: "0", help: "value written by fill_mode: constant" },
        OptionDoc { name: "brightness_range", ty: "[lo, hi]", default: "(none)", help: "PIL brightness factor" },
        OptionDoc { name: "channel_shift_range", ty: "float", default: "0", help: "one shift for all channels" },
        OptionDoc { name: "seed", ty: "int", default: "0", help: "with epoch, variant, content hash: the draws" },
        OptionDoc {
            name: "size",
            ty: "[height, width]",
            default: "(input size)",
            help: "fused: resize to this and augment in one warp",
        },
    ];
    const PARALLEL: bool = true;
    const AFFECTS_PIXELS: bool = true;
    const PASSES_PRECOMPUTED: bool = true;
    const RANDOM: bool = true;

    fn check(&self) -> Vec<FieldError> {
        self.0.check()
    }

    fn facts(&self, input: &Facts, _env: bool) -> Result<Facts, Vec<FieldError>> {
        let mut out = input.clone();
        if let Some((h, w)) = self.0.size() {
            out.image_size = Some([h, w]);
        }
        Ok(out)
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(Augment { options: self.0.clone() })))
    }
}

struct Augment {
    options: AugmentOptions,
}

impl Stage for Augment {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        let m = &item.meta;
        // The source folds the epoch into the variant (variant = epoch when
        // every epoch draws fresh, one of K fixed variants otherwise), so the
        // draw depends on the variant alone and a cached variant's features
        // are right in whichever epoch it is drawn again.
        let payload = match &item.payload {
            Payload::Image(img) => Payload::Image(self.options.augment(img, 0, m.variant, &m.content_hash)),
            Payload::Gray(img) => Payload::Gray(self.options.augment_gray(img, 0, m.variant, &m.content_hash)),
            _ => return Err(StageError::fatal(format!("expected an image, got {}", item.kind().name()))),
        };
        out.emit(Item { meta: item.meta, payload })?;
        Ok(())
    }
}
