//! Resizing 8-bit images: `nearest` exactly as PIL's `Image.NEAREST` (so
//! Keras's `load_img`), the convolution filters on fast_image_resize (SIMD),
//! following PIL's resize to within a level or two (docs/keras-pixels.md).
//! The `resize` stage, `visualize` and the benches share it.

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

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
