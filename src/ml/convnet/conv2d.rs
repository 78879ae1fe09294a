//! `Conv2D` as Keras defines it, NHWC: kernel `[kh, kw, in, filters]`
//! (Keras's HWIO, so its weights load as they are), `valid` or `same`
//! padding (Keras's split: the extra row/column of an odd total goes to the
//! bottom/right), strides.
//!
//! Forward is im2col + one GEMM per batch (`cols[rows, kh*kw*in] x
//! kernel[kh*kw*in, filters]`, the rows being every output pixel of every
//! image, so the output is NHWC as it comes). Backward: the kernel
//! gradient is `cols^T x dY` (one GEMM), the input gradient `dY x
//! kernel^T` scattered back by col2im. The columns of the forward pass are
//! kept for the backward one.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::matmul::{Layout, matmul, matmul_tn_split};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    #[default]
    Valid,
    Same,
}

/// The geometry of one convolution: everything but the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub in_h: usize,
    pub in_w: usize,
    pub in_c: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub filters: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Rows/columns of zeros above and left of the image (`same`).
    pub pad_top: usize,
    pub pad_left: usize,
}

impl ConvGeometry {
    /// `None` when the kernel does not fit (`valid` on a smaller map).
    pub fn new(
        input: [usize; 3],
        kernel: [usize; 2],
        strides: [usize; 2],
        padding: Padding,
        filters: usize,
    ) -> Option<ConvGeometry> {
        let [in_h, in_w, in_c] = input;
        let [kh, kw] = kernel;
        let [sh, sw] = strides;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 || filters == 0 || in_c == 0 {
            return None;
        }
        let (out_h, out_w, pad_top, pad_left) = match padding {
            Padding::Valid => {
                if in_h < kh || in_w < kw {
                    return None;
                }
                ((in_h - kh) / sh + 1, (in_w - kw) / sw + 1, 0, 0)
            }
            Padding::Same => {
                let (oh, ow) = (in_h.div_ceil(sh), in_w.div_ceil(sw));
                let pad_h = ((oh - 1) * sh + kh).saturating_sub(in_h);
                let pad_w = ((ow - 1) * sw + kw).saturating_sub(in_w);
                (oh, ow, pad_h / 2, pad_w / 2)
            }
        };
        if out_h == 0 || out_w == 0 {
            return None;
        }
        Some(ConvGeometry { in_h, in_w, in_c, kh, kw, sh, sw, filters, out_h, out_w, pad_top, pad_left })
    }

    /// Length of one im2col row: the kernel's fan-in.
    pub fn patch(&self) -> usize {
        self.kh * self.kw * self.in_c
    }

    pub fn in_len(&self) -> usize {
        self.in_h * self.in_w * self.in_c
    }

    pub fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Multiply-adds of one image's forward pass.
    pub fn macs(&self) -> usize {
        self.out_pixels() * self.patch() * self.filters
    }

    /// The input pixel a kernel tap reads for an output pixel, or `None` in the padding.
    #[inline(always)]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<usize> {
        let y = (oy * self.sh + ky).checked_sub(self.pad_top)?;
        let x = (ox * self.sw + kx).checked_sub(self.pad_left)?;
        (y < self.in_h && x < self.in_w).then_some((y * self.in_w + x) * self.in_c)
    }

    /// Fills `cols` (`out_pixels x patch`) with one image's patches.
    pub fn im2col(&self, image: &[f32], cols: &mut [f32]) {
        let (c, patch) = (self.in_c, self.patch());
        for oy in 0..self.out_h {
            for ox in 0..self.out_w {
                let row = &mut cols[(oy * self.out_w + ox) * patch..][..patch];
                for ky in 0..self.kh {
                    for kx in 0..self.kw {
                        let dst = &mut row[(ky * self.kw + kx) * c..][..c];
                        match self.source(oy, ox, ky, kx) {
                            Some(s) => dst.copy_from_slice(&image[s..s + c]),
                            None => dst.fill(0.0),
                        }
                    }
                }
            }
        }
    }

    /// Adds one image's column gradients back onto its pixels (`dx` is zeroed first).
    pub fn col2im(&self, dcols: &[f32], dx: &mut [f32]) {
        dx.fill(0.0);
        let (c, patch) = (self.in_c, self.patch());
        for oy in 0..self.out_h {
            for ox in 0..self.out_w {
                let row = &dcols[(oy * self.out_w + ox) * patch..][..patch];
                for ky in 0..self.kh {
                    for kx in 0..self.kw {
                        if let Some(s) = self.source(oy, ox, ky, kx) {
                            let src = &row[(ky * self.kw + kx) * c..][..c];
                            dx[s..s + c].iter_mut().zip(src).for_each(|(d, &g)| *d += g);
                        }
                    }
                }
            }
        }
    }
}

/// What a forward pass keeps for the backward one.
#[derive(Debug, Default, Clone)]
pub struct ConvCache {
    pub cols: Vec<f32>,
}

/// Scratch buffers reused from step to step.
#[derive(Debug, Default, Clone)]
pub struct ConvScratch {
    dcols: Vec<f32>,
    partial: Vec<f32>,
}

/// `y[rows*out_pixels, filters] = im2col(x) * kernel + bias`. `keep`: the
/// columns stay in `cache` for [`backward`].
#[allow(clippy::too_many_arguments)]
pub fn forward(
    g: &ConvGeometry,
    kernel: &[f32],
    bias: &[f32],
    x: &[f32],
    rows: usize,
    y: &mut Vec<f32>,
    cache: &mut ConvCache,
    threads: usize,
) {
    let (patch, pixels) = (g.patch(), g.out_pixels());
    let cols = &mut cache.cols;
    cols.resize(rows * pixels * patch, 0.0);
    cols.par_chunks_mut(pixels * patch).zip(x.par_chunks(g.in_len())).for_each(|(cols, image)| g.im2col(image, cols));
    y.clear();
    y.resize(rows * pixels * g.filters, 0.0);
    // Start from the bias so the GEMM adds onto it.
    y.par_chunks_mut(g.filters).for_each(|r| r.copy_from_slice(bias));
    matmul(rows * pixels, g.filters, patch, cols, Layout::N, kernel, Layout::N, y, true, threads);
}

/// From `dy` (gradient of the pre-activation output): the kernel and bias
/// gradients, and (when `dx` is given) the input gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &ConvGeometry,
    kernel: &[f32],
    dy: &[f32],
    rows: usize,
    cache: &ConvCache,
    dkernel: &mut [f32],
    dbias: &mut [f32],
    dx: Option<&mut Vec<f32>>,
    scratch: &mut ConvScratch,
    threads: usize,
) {
    let (patch, pixels, f) = (g.patch(), g.out_pixels(), g.filters);
    let m = rows * pixels;
    matmul_tn_split(patch, f, m, &cache.cols, dy, dkernel, threads, &mut scratch.partial);
    bias_gradient(dy, f, dbias);
    if let Some(dx) = dx {
        scratch.dcols.resize(m * patch, 0.0);
        matmul(m, patch, f, dy, Layout::N, kernel, Layout::T, &mut scratch.dcols, false, threads);
        dx.resize(rows * g.in_len(), 0.0);
        dx.par_chunks_mut(g.in_len())
            .zip(scratch.dcols.par_chunks(pixels * patch))
            .for_each(|(dx, dcols)| g.col2im(dcols, dx));
    }
}

/// Column sums of `dy` (`[rows, f]`), in row order: the same whatever the threads.
pub fn bias_gradient(dy: &[f32], f: usize, dbias: &mut [f32]) {
    dbias.fill(0.0);
    for r in dy.chunks_exact(f) {
        dbias.iter_mut().zip(r).for_each(|(d, &g)| *d += g);
    }
}
