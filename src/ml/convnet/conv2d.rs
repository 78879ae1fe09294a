//! `Conv2D` as Keras defines it, NHWC: kernel `[kh, kw, in, filters]`
//! (Keras's HWIO, so its weights load as they are), `valid` or `same`
//! padding (Keras's split: the extra row/column of an odd total goes to the
//! bottom/right), strides.
//!
//! im2col + GEMM, one tile of output rows at a time: the rows are every
//! output pixel of every image (so the output is NHWC as it comes), and a
//! tile's columns (`cols[tile, kh*kw*in]`, about [`TILE_BYTES`]) stay in
//! the core's L2 between their im2col and their GEMM with
//! `kernel[kh*kw*in, filters]`, where the whole batch's columns (120 MB for
//! the 150x150 network's second layer) went through memory twice. Bias and
//! activation are applied to the tile while it is in cache. Backward
//! rebuilds each tile's columns from the input (cheaper than keeping them):
//! the kernel gradient is `cols^T x dY`, the input gradient `dY x kernel^T`
//! scattered back by col2im, tile by tile.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::matmul::{Layout, matmul};
use super::winograd::{self, WinogradScratch};
use crate::ml::activation::{Activation, activate, activation_backward};

/// Bytes of columns per tile: well inside a core's L2 (1-2 MB on the
/// machines this runs on), leaving room for the GEMM's packed operands.
pub const TILE_BYTES: usize = 512 << 10;
/// Fewest rows per tile: the GEMM packs the kernel once per call, so a big
/// kernel (VGG16's block5: 4608 x 512) needs tall tiles to pay for it.
pub const MIN_TILE: usize = 256;

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

    /// Output rows (pixels of the batch) per tile: about [`TILE_BYTES`] of
    /// columns, and at least [`MIN_TILE`] rows so that the GEMM's packing
    /// of the kernel is shared by enough rows.
    pub fn tile_rows(&self) -> usize {
        (TILE_BYTES / (4 * self.patch())).max(MIN_TILE)
    }

    /// Fills `cols` (`(r1 - r0) x patch`) with the patches of the batch's
    /// output rows `r0..r1` (row `r`: pixel `r % out_pixels` of image `r / out_pixels`).
    pub fn im2col_rows(&self, x: &[f32], r0: usize, r1: usize, cols: &mut [f32]) {
        let (c, patch, pixels, len) = (self.in_c, self.patch(), self.out_pixels(), self.in_len());
        // One kernel row's taps: contiguous in NHWC when the row is inside the image.
        let run = self.kw * c;
        for (r, row) in (r0..r1).zip(cols.chunks_exact_mut(patch)) {
            let image = &x[(r / pixels) * len..][..len];
            let (oy, ox) = ((r % pixels) / self.out_w, (r % pixels) % self.out_w);
            let x0 = (ox * self.sw).checked_sub(self.pad_left).filter(|&x0| x0 + self.kw <= self.in_w);
            for ky in 0..self.kh {
                let dst = &mut row[ky * run..][..run];
                match ((oy * self.sh + ky).checked_sub(self.pad_top).filter(|&y| y < self.in_h), x0) {
                    (None, _) => dst.fill(0.0),
                    (Some(y), Some(x0)) => dst.copy_from_slice(&image[(y * self.in_w + x0) * c..][..run]),
                    (Some(_), None) => {
                        for kx in 0..self.kw {
                            let dst = &mut dst[kx * c..][..c];
                            match self.source(oy, ox, ky, kx) {
                                Some(s) => dst.copy_from_slice(&image[s..s + c]),
                                None => dst.fill(0.0),
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds the column gradients of output rows `r0..r1` onto the pixels
    /// they came from; `dx` holds the images those rows belong to, row 0
    /// being pixel 0 of its first image.
    pub fn col2im_rows(&self, dcols: &[f32], r0: usize, r1: usize, dx: &mut [f32]) {
        let (c, patch, pixels, len) = (self.in_c, self.patch(), self.out_pixels(), self.in_len());
        let run = self.kw * c;
        for (r, row) in (r0..r1).zip(dcols.chunks_exact(patch)) {
            let image = &mut dx[(r / pixels) * len..][..len];
            let (oy, ox) = ((r % pixels) / self.out_w, (r % pixels) % self.out_w);
            let x0 = (ox * self.sw).checked_sub(self.pad_left).filter(|&x0| x0 + self.kw <= self.in_w);
            for ky in 0..self.kh {
                let src = &row[ky * run..][..run];
                let Some(y) = (oy * self.sh + ky).checked_sub(self.pad_top).filter(|&y| y < self.in_h) else {
                    continue;
                };
                match x0 {
                    Some(x0) => add(&mut image[(y * self.in_w + x0) * c..][..run], src),
                    None => {
                        for kx in 0..self.kw {
                            if let Some(s) = self.source(oy, ox, ky, kx) {
                                add(&mut image[s..s + c], &src[kx * c..][..c]);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn add(d: &mut [f32], s: &[f32]) {
    d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
}

/// What a training step keeps from step to step: per-part tiles and sums,
/// sized on first use and reused (a fresh buffer per step costs page faults).
#[derive(Debug, Default, Clone)]
pub struct ConvScratch {
    parts: Vec<PartScratch>,
    winograd: WinogradScratch,
}

/// One part's own buffers: a tile of columns, its gradient, and the part's
/// kernel and bias gradient sums.
#[derive(Debug, Default, Clone)]
struct PartScratch {
    cols: Vec<f32>,
    dcols: Vec<f32>,
    dkernel: Vec<f32>,
    dbias: Vec<f32>,
}

impl ConvScratch {
    /// A scratch whose Winograd convolutions take `bytes` a group (tests of several groups).
    #[cfg(test)]
    pub(crate) fn with_winograd_group_bytes(bytes: usize) -> ConvScratch {
        let mut s = ConvScratch::default();
        s.winograd.group_bytes = bytes;
        s
    }

    fn parts(&mut self, n: usize) -> &mut [PartScratch] {
        if self.parts.len() < n {
            self.parts.resize_with(n, PartScratch::default);
        }
        &mut self.parts[..n]
    }
}

/// `y[rows*out_pixels, filters] = activation(im2col(x) * kernel + bias)`,
/// tile by tile (see the module doc). `activation`: `None` leaves the
/// pre-activation (a last layer, whose sigmoid or softmax the loss applies).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    g: &ConvGeometry,
    kernel: &[f32],
    bias: &[f32],
    x: &[f32],
    rows: usize,
    activation: Option<Activation>,
    y: &mut Vec<f32>,
    scratch: &mut ConvScratch,
    threads: usize,
) {
    if winograd::applies(g) {
        return winograd::forward(g, kernel, bias, x, rows, activation, y, &mut scratch.winograd);
    }
    let (patch, f) = (g.patch(), g.filters);
    let total = rows * g.out_pixels();
    let tile = g.tile_rows();
    let tiles = total.div_ceil(tile);
    if total == 0 {
        y.clear();
        return;
    }
    // Every value is written below: no zeroing, only a resize when the batch changes.
    y.resize(total * f, 0.0);
    // One equal share of the rows per thread, cut into equal tiles of at
    // most `tile` rows. Each output is one GEMM sum over the patch, whose
    // order (gemm blocks `k` by `k` and the caches alone) does not depend
    // on the tile's height, so neither does the result on the threads.
    let parts = threads.min(tiles).max(1);
    let per = total.div_ceil(parts);
    let gemm_threads = (threads / parts).max(1);
    scratch.parts(parts).par_iter_mut().zip(y.par_chunks_mut(per * f)).enumerate().for_each(|(p, (s, y))| {
        let n = y.len() / f;
        let tile = n.div_ceil(n.div_ceil(tile));
        for (t, y) in y.chunks_mut(tile * f).enumerate() {
            let r0 = p * per + t * tile;
            let n = y.len() / f;
            s.cols.resize(n * patch, 0.0);
            g.im2col_rows(x, r0, r0 + n, &mut s.cols);
            // Start from the bias so the GEMM adds onto it.
            y.chunks_exact_mut(f).for_each(|r| r.copy_from_slice(bias));
            matmul(n, f, patch, &s.cols, Layout::N, kernel, Layout::N, y, true, gemm_threads);
            if let Some(a) = activation {
                activate(a, y);
            }
        }
    });
}

/// From `dy` (the gradient of the layer's output `y`; with `activation`,
/// it is first turned into the pre-activation's, in place): the kernel
/// and bias gradients (when `weights` = `(dkernel, dbias)` is given), and
/// the input gradient (when `dx` is given). The columns are rebuilt from
/// `x` tile by tile, as in [`forward`]; a pass for the input gradient alone
/// (the visualisations' gradients through frozen layers) builds none.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &ConvGeometry,
    kernel: &[f32],
    x: &[f32],
    y: &[f32],
    activation: Option<Activation>,
    dy: &mut [f32],
    rows: usize,
    mut weights: Option<(&mut [f32], &mut [f32])>,
    dx: Option<&mut Vec<f32>>,
    scratch: &mut ConvScratch,
    threads: usize,
) {
    let (patch, pixels, f) = (g.patch(), g.out_pixels(), g.filters);
    let tile = g.tile_rows();
    if rows == 0 {
        if let Some((dkernel, dbias)) = weights {
            dkernel.fill(0.0);
            dbias.fill(0.0);
        }
        return;
    }
    if winograd::applies(g) {
        return winograd::backward(g, kernel, x, y, activation, dy, rows, weights, dx, &mut scratch.winograd);
    }
    let want_weights = weights.is_some();
    // Whole images per part, so that each part owns its images' input
    // gradient; the parts' kernel and bias gradients are added in part
    // order, so the sums depend on the thread count alone.
    let images = rows.div_ceil(threads.clamp(1, rows.max(1))).max(1);
    let parts = rows.div_ceil(images).max(1);
    let gemm_threads = (threads / parts).max(1);
    let mut dx_parts: Vec<Option<&mut [f32]>> = match dx {
        Some(dx) => {
            dx.resize(rows * g.in_len(), 0.0);
            dx.chunks_mut(images * g.in_len()).map(Some).collect()
        }
        None => (0..parts).map(|_| None).collect(),
    };
    let mut y_parts: Vec<&[f32]> = y.chunks(images * pixels * f).collect();
    y_parts.resize(parts, &[]);
    let mut states = std::mem::take(&mut scratch.parts);
    if states.len() < parts {
        states.resize_with(parts, PartScratch::default);
    }
    states[..parts]
        .par_iter_mut()
        .zip(dy.par_chunks_mut(images * pixels * f))
        .zip(y_parts.into_par_iter())
        .zip(dx_parts.par_iter_mut())
        .enumerate()
        .for_each(|(p, (((s, dy), y), dx))| {
            if want_weights {
                s.dkernel.resize(patch * f, 0.0);
                s.dbias.clear();
                s.dbias.resize(f, 0.0);
            }
            if let Some(dx) = dx.as_deref_mut() {
                dx.fill(0.0);
            }
            let first_row = p * images * pixels;
            for (t, dy) in dy.chunks_mut(tile * f).enumerate() {
                let n = dy.len() / f;
                let r0 = first_row + t * tile;
                if let Some(a) = activation {
                    activation_backward(a, &y[t * tile * f..][..n * f], dy);
                }
                if want_weights {
                    s.cols.resize(n * patch, 0.0);
                    g.im2col_rows(x, r0, r0 + n, &mut s.cols);
                    matmul(patch, f, n, &s.cols, Layout::T, dy, Layout::N, &mut s.dkernel, t > 0, gemm_threads);
                    for r in dy.chunks_exact(f) {
                        s.dbias.iter_mut().zip(r).for_each(|(d, &g)| *d += g);
                    }
                }
                if let Some(dx) = dx.as_deref_mut() {
                    s.dcols.resize(n * patch, 0.0);
                    matmul(n, patch, f, dy, Layout::N, kernel, Layout::T, &mut s.dcols, false, gemm_threads);
                    g.col2im_rows(&s.dcols, r0 - first_row, r0 - first_row + n, dx);
                }
            }
        });
    if let Some((dkernel, dbias)) = weights.as_mut() {
        dkernel.copy_from_slice(&states[0].dkernel);
        dbias.copy_from_slice(&states[0].dbias);
        for s in &states[1..parts] {
            dkernel.iter_mut().zip(&s.dkernel).for_each(|(d, &v)| *d += v);
            dbias.iter_mut().zip(&s.dbias).for_each(|(d, &v)| *d += v);
        }
    }
    scratch.parts = states;
}

/// Column sums of `dy` (`[rows, f]`), in row order: the same whatever the threads.
pub fn bias_gradient(dy: &[f32], f: usize, dbias: &mut [f32]) {
    dbias.fill(0.0);
    for r in dy.chunks_exact(f) {
        dbias.iter_mut().zip(r).for_each(|(d, &g)| *d += g);
    }
}
