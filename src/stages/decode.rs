//! `decode`: encoded bytes -> 8-bit RGB. EXIF orientation is applied;
//! grayscale, CMYK, 16-bit and alpha images become plain RGB (alpha is
//! dropped, as PIL's `convert('RGB')` does for Keras).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::item::{Item, ItemKind, Payload};
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, Stage, StageConfig, StageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// Images declaring more pixels than this are refused from their header
    /// (decompression bombs), before any pixel memory is allocated.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

fn default_max_pixels() -> u64 {
    // PIL's MAX_IMAGE_PIXELS * 2, where PIL turns its warning into an error.
    178_956_970
}

impl StageConfig for DecodeConfig {
    const KIND: &'static str = "decode";
    const SUMMARY: &'static str = "decodes JPEG, PNG, GIF, BMP, WebP, TIFF to RGB; applies EXIF orientation";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Bytes];
    const EMITS: Option<ItemKind> = Some(ItemKind::Image);
    const OPTIONS: &'static [OptionDoc] = &[OptionDoc {
        name: "max_pixels",
        ty: "int",
        default: "178956970",
        help: "refuse images declaring more pixels (decompression bombs)",
    }];
    const PARALLEL: bool = true;
    const AFFECTS_PIXELS: bool = true;
    const PASSES_PRECOMPUTED: bool = true;

    fn check(&self) -> Vec<FieldError> {
        if self.max_pixels == 0 { vec![FieldError::new("max_pixels", "must be at least 1")] } else { Vec::new() }
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(Decode { max_pixels: self.max_pixels })))
    }
}

struct Decode {
    max_pixels: u64,
}

/// Decodes one file's bytes; the error says why, for the skipped list.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not a recognised image format".into());
    }
    let mut decoder = reader.into_decoder().map_err(|e| format!("cannot decode: {e}"))?;
    let (w, h) = decoder.dimensions();
    if (w as u64) * (h as u64) > max_pixels {
        return Err(format!("{w}x{h} is over max_pixels ({max_pixels})"));
    }
    if w == 0 || h == 0 {
        return Err("image has no pixels".into());
    }
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot decode: {e}"))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

impl Stage for Decode {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        let Payload::Bytes(bytes) = &item.payload else {
            return Err(StageError::fatal(format!("expected bytes, got {}", item.kind().name())));
        };
        let img = decode_image(bytes, self.max_pixels).map_err(|e| StageError::item(&item.meta.path, e))?;
        out.emit(Item { meta: item.meta, payload: Payload::Image(img) })?;
        Ok(())
    }
}
