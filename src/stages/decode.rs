//! `decode`: encoded bytes -> 8-bit RGB. JPEGs go through libjpeg-turbo
//! with PIL's settings, so their pixels are exactly PIL's (and so those of
//! Keras's `load_img`); other formats through the `image` crate
//! (docs/keras-pixels.md says where that differs). EXIF orientation is applied;
//! grayscale, CMYK, 16-bit and alpha images become plain RGB (alpha is
//! dropped, as PIL's `convert('RGB')` does for Keras).
//!
//! `color_mode: grayscale` (Keras's `load_img(color_mode='grayscale')`)
//! makes one-channel images instead, with PIL's `convert('L')` luma
//! (ITU-R 601-2, in PIL's fixed point), so a gray file keeps its exact
//! values and a colour one gets the numbers Keras would feed its model.
//!
//! With `min_size` (the size a later `resize` makes), JPEGs are decoded by
//! libjpeg-turbo at the smallest DCT scale (1/2, 1/4, 1/8) whose result still
//! covers it, as PIL's `Image.draft` does: on the book's photos for a 150x150
//! target, decode CPU falls from ~0.62 to ~0.37 ms per image (the 29% whose
//! short side is under 300 px cannot be halved and are decoded in full; see
//! `benches/decode.rs`, `benches/compare.sh`). The pixels then differ from a
//! full decode followed by `nearest`: the scaled decode averages each 2x2
//! (4x4, 8x8) block in the DCT domain where `nearest` picks one pixel, a
//! smoother result (mean absolute difference 3.8 of 255 on 300 of the book's
//! photos, about what choosing `box` over `nearest` in `resize` changes:
//! 4.0). Off by default, so the default stays the exact full decode the
//! book's code path sees.

use serde::{Deserialize, Serialize};

use crate::facts::Facts;
use crate::imaging::decode::{Decoder, default_max_pixels, to_gray};
use crate::item::{Item, ItemKind, Payload};
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, Stage, StageConfig, StageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// Images declaring more pixels than this are refused from their header
    /// (decompression bombs), before any pixel memory is allocated.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// [height, width] (or one number for both): decode JPEGs at the
    /// smallest DCT scale whose result is still at least this big. Absent
    /// from the canonical options when unset, so cache keys made before it
    /// existed stay valid.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "size_or_side")]
    pub min_size: Option<[u32; 2]>,
    /// PIL's `ImageFile.LOAD_TRUNCATED_IMAGES`: decode a JPEG cut short,
    /// its missing rows filled in, instead of skipping it. Off by default: a
    /// truncated file is a bad file. Absent from the canonical options when
    /// off, so existing cache keys stay valid.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub load_truncated_images: bool,
    /// Keras's `color_mode`: `rgb` (3 channels) or `grayscale` (1). Absent
    /// from the canonical options when `rgb`, so existing cache keys stay valid.
    #[serde(default, skip_serializing_if = "ColorMode::is_rgb")]
    pub color_mode: ColorMode,
    /// Not an option: names the pixel rules in the feature cache key, so
    /// features made under an earlier rule (zune-jpeg's pixels, before
    /// libjpeg-turbo's as in PIL) are never served for this one.
    #[serde(skip_deserializing, default = "pixel_rules")]
    pixel_rules: &'static str,
}

/// The rules `decode` follows; change it when the same bytes and options give other pixels.
fn pixel_rules() -> &'static str {
    "pil-13"
}

/// The channels a decoded image has, in Keras's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ColorMode {
    #[default]
    Rgb,
    Grayscale,
}

impl ColorMode {
    fn is_rgb(&self) -> bool {
        *self == ColorMode::Rgb
    }
}

/// `[h, w]`, or `n` for `[n, n]` (so a scalar `${param}` can set it, or `null` unset it).
fn size_or_side<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<[u32; 2]>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a size [height, width], or one number for both")]
    enum SizeOrSide {
        Side(u32),
        Size([u32; 2]),
    }
    Ok(Option::<SizeOrSide>::deserialize(d)?.map(|s| match s {
        SizeOrSide::Side(n) => [n, n],
        SizeOrSide::Size(size) => size,
    }))
}

impl StageConfig for DecodeConfig {
    const KIND: &'static str = "decode";
    const SUMMARY: &'static str =
        "decodes JPEG, PNG, GIF, BMP, WebP, TIFF to RGB (or grayscale); applies EXIF orientation";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Bytes];
    const EMITS: Option<ItemKind> = Some(ItemKind::Image);
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "max_pixels",
            ty: "int",
            default: "178956970",
            help: "refuse images declaring more pixels (decompression bombs)",
        },
        OptionDoc {
            name: "min_size",
            ty: "[height, width] | int",
            default: "null (full decode)",
            help: "decode JPEGs at the smallest 1/2, 1/4, 1/8 scale still this big (faster, smoother pixels)",
        },
        OptionDoc {
            name: "load_truncated_images",
            ty: "bool",
            default: "false",
            help: "PIL's LOAD_TRUNCATED_IMAGES: decode JPEGs cut short (missing rows filled) instead of skipping them",
        },
        OptionDoc {
            name: "color_mode",
            ty: "rgb|grayscale",
            default: "rgb",
            help: "Keras's color_mode: 3-channel images, or 1-channel with PIL's convert('L') luma",
        },
    ];
    const PARALLEL: bool = true;
    const AFFECTS_PIXELS: bool = true;
    const PASSES_PRECOMPUTED: bool = true;

    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.max_pixels == 0 {
            errors.push(FieldError::new("max_pixels", "must be at least 1"));
        }
        if self.min_size.is_some_and(|s| s.contains(&0)) {
            errors.push(FieldError::new("min_size", "height and width must be at least 1"));
        }
        errors
    }

    fn facts(&self, input: &Facts, _env: bool) -> Result<Facts, Vec<FieldError>> {
        Ok(Facts {
            channels: Some(match self.color_mode {
                ColorMode::Rgb => 3,
                ColorMode::Grayscale => 1,
            }),
            max_pixels: Some(self.max_pixels),
            ..input.clone()
        })
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let decoder = Decoder::new(self.max_pixels, self.min_size.map(|[h, w]| (h, w)))
            .map_err(StageError::fatal)?
            .load_truncated_images(self.load_truncated_images);
        Ok(Built::Stage(Box::new(Decode { decoder, color_mode: self.color_mode })))
    }
}

struct Decode {
    decoder: Decoder,
    color_mode: ColorMode,
}

impl Stage for Decode {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        let Payload::Bytes(bytes) = &item.payload else {
            return Err(StageError::fatal(format!("expected bytes, got {}", item.kind().name())));
        };
        let img = self.decoder.decode(bytes).map_err(|e| StageError::item(&item.meta.path, e))?;
        let payload = match self.color_mode {
            ColorMode::Rgb => Payload::Image(img),
            ColorMode::Grayscale => Payload::Gray(to_gray(&img)),
        };
        out.emit(Item { meta: item.meta, payload })?;
        Ok(())
    }
}
