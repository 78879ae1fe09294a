//! `resize`: to a fixed size. `nearest`, Keras's `load_img` default, picks
//! exactly the source pixels PIL's `Image.NEAREST` picks (see
//! [`pil_nearest_indices`]); the convolution filters run on
//! fast_image_resize (SIMD) and follow PIL's resize, which Keras uses for the
//! others, to within a level or two (docs/keras-pixels.md).

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::item::{Item, ItemKind, Payload};
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, Stage, StageConfig, StageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    #[default]
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos,
    Box,
    Hamming,
}

impl Filter {
    fn algorithm(self) -> ResizeAlg {
        match self {
            Filter::Nearest => unreachable!("nearest is PIL's rule, not fast_image_resize's"),
            Filter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            Filter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            Filter::Lanczos => ResizeAlg::Convolution(FilterType::Lanczos3),
            Filter::Box => ResizeAlg::Convolution(FilterType::Box),
            Filter::Hamming => ResizeAlg::Convolution(FilterType::Hamming),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeConfig {
    /// [height, width], Keras's `target_size` order.
    pub size: [u32; 2],
    #[serde(default)]
    pub filter: Filter,
    /// Not an option: names the pixel rules in the feature cache key, so
    /// features made under an earlier rule (fast_image_resize's nearest,
    /// before PIL's) are never served for this one.
    #[serde(skip_deserializing, default = "pixel_rules")]
    pixel_rules: &'static str,
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
        OptionDoc { name: "size", ty: "[height, width]", default: "(required)", help: "target size" },
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
        if self.size.contains(&0) {
            vec![FieldError::new("size", "height and width must be at least 1")]
        } else {
            Vec::new()
        }
    }

    fn image_size(&self) -> Option<(u32, u32)> {
        Some((self.size[0], self.size[1]))
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(Resize {
            height: self.size[0],
            width: self.size[1],
            filter: self.filter,
            resizer: Resizer::new(),
        })))
    }
}

pub struct Resize {
    height: u32,
    width: u32,
    filter: Filter,
    resizer: Resizer,
}

impl Resize {
    pub fn new(height: u32, width: u32, filter: Filter) -> Self {
        Resize { height, width, filter, resizer: Resizer::new() }
    }

    pub fn apply(&mut self, img: RgbImage) -> Result<RgbImage, String> {
        if img.dimensions() == (self.width, self.height) {
            return Ok(img);
        }
        let (w, h) = img.dimensions();
        let raw = self.resize_raw(w, h, img.into_raw(), PixelType::U8x3)?;
        RgbImage::from_raw(self.width, self.height, raw).ok_or_else(|| "resize produced a wrong buffer".into())
    }

    /// [`Resize::apply`] for a one-channel image: the same filter on its one channel.
    pub fn apply_gray(&mut self, img: GrayImage) -> Result<GrayImage, String> {
        if img.dimensions() == (self.width, self.height) {
            return Ok(img);
        }
        let (w, h) = img.dimensions();
        let raw = self.resize_raw(w, h, img.into_raw(), PixelType::U8)?;
        GrayImage::from_raw(self.width, self.height, raw).ok_or_else(|| "resize produced a wrong buffer".into())
    }

    fn resize_raw(&mut self, w: u32, h: u32, raw: Vec<u8>, pixel: PixelType) -> Result<Vec<u8>, String> {
        if self.filter == Filter::Nearest {
            let channels = if pixel == PixelType::U8x3 { 3 } else { 1 };
            return Ok(nearest(&raw, w, h, channels, self.width, self.height));
        }
        let src = FirImage::from_vec_u8(w, h, raw, pixel).map_err(|e| e.to_string())?;
        let mut dst = FirImage::new(self.width, self.height, pixel);
        self.resizer
            .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(self.filter.algorithm()))
            .map_err(|e| e.to_string())?;
        Ok(dst.into_vec())
    }
}

/// PIL's `Image.NEAREST` source index for each of `to` output indices
/// along a side of `from` pixels. PIL (`ImagingScaleAffine`) starts half a
/// step in and walks in float64 steps of `from / to`, truncating each
/// position. The summed rounding error makes it pick the neighbouring pixel
/// wherever the exact `(i + 0.5) * from / to` is a whole number (500 -> 150
/// does, at every third index), so this repeats PIL's walk rather than the
/// formula: 872 of 7,194 (from, to) pairs differ otherwise.
pub fn pil_nearest_indices(from: u32, to: u32) -> Vec<u32> {
    let step = f64::from(from) / f64::from(to);
    let mut position = step * 0.5;
    (0..to)
        .map(|_| {
            // Positions stay inside [0, from): the clamp only guards the last index.
            let index = (position as u32).min(from - 1);
            position += step;
            index
        })
        .collect()
}

/// Nearest-neighbour resize of packed 8-bit pixels, `channels` bytes each, with PIL's indices.
fn nearest(src: &[u8], w: u32, h: u32, channels: usize, out_w: u32, out_h: u32) -> Vec<u8> {
    match channels {
        3 => gather::<3>(src, w, h, out_w, out_h),
        _ => gather::<1>(src, w, h, out_w, out_h),
    }
}

/// [`nearest`] for `C`-byte pixels: whole pixels copied as arrays, one output row at a time.
fn gather<const C: usize>(src: &[u8], w: u32, h: u32, out_w: u32, out_h: u32) -> Vec<u8> {
    let columns: Vec<usize> = pil_nearest_indices(w, out_w).into_iter().map(|x| x as usize).collect();
    let (pixels, _) = src.as_chunks::<C>();
    let mut out = vec![0u8; out_w as usize * out_h as usize * C];
    let (out_pixels, _) = out.as_chunks_mut::<C>();
    for (dst_row, y) in out_pixels.chunks_exact_mut(out_w as usize).zip(pil_nearest_indices(h, out_h)) {
        let row = &pixels[y as usize * w as usize..][..w as usize];
        for (dst, &x) in dst_row.iter_mut().zip(&columns) {
            *dst = row[x];
        }
    }
    out
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
