//! The one resampling pass: every output pixel is read once, bilinearly
//! (Keras/scipy `order=1`), from wherever the composed affine map sends it.
//!
//! Speed comes from splitting each output row in two:
//! - the *interior*, the run of pixels whose 2x2 source footprint lies
//!   inside the image (and, in fused mode, inside the virtual grid). The map
//!   is affine, so along a row the source position moves by a constant step:
//!   it is carried in 32.32 fixed point, each pixel is four loads and a
//!   weighted sum, with no fill-mode logic. On x86_64 with SSSE3 the sum is
//!   two `pmaddwd`s per pixel.
//! - the *border*: the few pixels at either end of the row whose footprint
//!   leaves the image; they go through [`FillMode::map`] one by one.
//!
//! The interpolation weights have 7 bits per axis (1/128 pixel), so the
//! four products fit the 16-bit lanes of `pmaddwd` and the scalar and SIMD
//! paths give the same bytes. Nothing is allocated per pixel or per row.

use image::RgbImage;

use super::affine::{self, Affine};
use super::fill::Fill;

/// Which inner loop resamples the interior (the bytes are the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernel {
    /// SIMD where the CPU has it, else scalar.
    #[default]
    Auto,
    Scalar,
}

const WEIGHT_BITS: u32 = 7;
const ONE: i64 = 1 << WEIGHT_BITS;
/// Fractional bits of the fixed-point source coordinates.
const FRAC: u32 = 32;
const TO_WEIGHT: u32 = FRAC - WEIGHT_BITS;
/// Beyond this a coordinate (or a row's travel) could overflow 32.32 fixed
/// point; such rows take the border path throughout.
const FIXED_LIMIT: f64 = (1u64 << 29) as f64;

/// Resamples `src` into an `out_h x out_w` image. Output pixel `(r, c)`
/// reads point `to_grid(r, c)` of a `grid_h x grid_w` grid, where the fill
/// mode applies. The grid is the source itself, or (fused mode) the source
/// as if resized to the grid's size first: grid pixel centres are mapped
/// onto source pixel centres and the source is sampled directly.
pub fn warp(
    src: &RgbImage,
    out: (u32, u32),
    to_grid: &Affine,
    grid: (u32, u32),
    fill: Fill,
    kernel: Kernel,
) -> RgbImage {
    let (sw, sh) = src.dimensions();
    let (oh, ow) = out;
    let mut img = RgbImage::new(ow, oh);
    if sw == 0 || sh == 0 || grid.0 == 0 || grid.1 == 0 {
        let v = fill.cval_u8();
        img.iter_mut().for_each(|b| *b = v);
        return img;
    }
    let to_src = if grid == (sh, sw) { Affine::IDENTITY } else { affine::grid_to_source(grid.0, grid.1, sh, sw) };
    let sampler = Sampler { s: src.as_raw(), sw, sh, stride: sw as usize * 3 };
    let full = to_src.mul(to_grid);
    let simd = kernel == Kernel::Auto && simd_available();
    let row_len = ow as usize * 3;
    let dst: &mut [u8] = &mut img;
    for (r, row) in dst.chunks_exact_mut(row_len.max(1)).enumerate().take(oh as usize) {
        let rf = r as f64;
        let span = interior(&sampler, &full, to_grid, grid, rf, ow);
        let (lo, hi) = span.as_ref().map_or((ow as usize, ow as usize), |s| (s.lo, s.hi + 1));
        for c in (0..lo).chain(hi..ow as usize) {
            let px = border_pixel(&sampler, to_grid, &to_src, grid, fill, rf, c as f64);
            row[c * 3..c * 3 + 3].copy_from_slice(&px);
        }
        if let Some(span) = span {
            run_interior(&sampler, row, &span, simd);
        }
    }
    img
}

/// Read-only view of the source pixels.
struct Sampler<'a> {
    s: &'a [u8],
    sw: u32,
    sh: u32,
    stride: usize,
}

/// The run `lo..=hi` of a row that reads only inside pixels, with the
/// fixed-point source position of pixel `lo` and its step per pixel.
struct Span {
    lo: usize,
    hi: usize,
    q: (i64, i64),
    dq: (i64, i64),
}

fn fixed(v: f64) -> i64 {
    (v * (1u64 << FRAC) as f64).round() as i64
}

/// Position in 1/128 pixel: `(q + half) >> 25`, which is `round(q * 128)`.
fn to_steps(q: i64) -> i64 {
    (q + (1 << (TO_WEIGHT - 1))) >> TO_WEIGHT
}

/// Finds the interior of output row `r`. A guess from the real-valued map
/// is corrected with the exact fixed-point test at both ends; the test is
/// monotone along the row, so both ends passing means every pixel between
/// passes. A guess that is off only sends pixels to the border path.
fn interior(smp: &Sampler<'_>, full: &Affine, to_grid: &Affine, grid: (u32, u32), r: f64, ow: u32) -> Option<Span> {
    if smp.sw < 2 || smp.sh < 2 || ow == 0 {
        return None;
    }
    let (q0r, q0c) = full.apply(r, 0.0);
    let (dqr, dqc) = (full.m[0][1], full.m[1][1]);
    let travel = f64::from(ow);
    if [q0r, q0c, q0r + dqr * travel, q0c + dqc * travel].iter().any(|v| !v.is_finite() || v.abs() >= FIXED_LIMIT) {
        return None;
    }
    let q = (fixed(q0r), fixed(q0c));
    let dq = (fixed(dqr), fixed(dqc));
    let max_r = (i64::from(smp.sh) - 2) * ONE + ONE - 1;
    let max_c = (i64::from(smp.sw) - 2) * ONE + ONE - 1;
    let (g0r, g0c) = to_grid.apply(r, 0.0);
    let (dgr, dgc) = (to_grid.m[0][1], to_grid.m[1][1]);
    let (glr, glc) = (f64::from(grid.0 - 1), f64::from(grid.1 - 1));
    let valid = |c: i64| {
        let vr = to_steps(q.0 + c * dq.0);
        let vc = to_steps(q.1 + c * dq.1);
        let (gr, gc) = (g0r + c as f64 * dgr, g0c + c as f64 * dgc);
        (0..=max_r).contains(&vr) && (0..=max_c).contains(&vc) && (0.0..=glr).contains(&gr) && (0.0..=glc).contains(&gc)
    };
    // Where a + b c stays within [lo, hi], intersected over the four tests.
    let mut range = (0.0f64, travel - 1.0);
    let mut clip = |a: f64, b: f64, lo: f64, hi: f64| {
        if b == 0.0 {
            if a < lo || a > hi {
                range = (1.0, 0.0);
            }
        } else {
            let (x, y) = ((lo - a) / b, (hi - a) / b);
            range = (range.0.max(x.min(y)), range.1.min(x.max(y)));
        }
    };
    clip(q0r, dqr, 0.0, f64::from(smp.sh) - 1.0);
    clip(q0c, dqc, 0.0, f64::from(smp.sw) - 1.0);
    clip(g0r, dgr, 0.0, glr);
    clip(g0c, dgc, 0.0, glc);
    // Finite here: every input passed the limit test above.
    if range.0 > range.1 {
        return None;
    }
    let (mut lo, mut hi) = (range.0.ceil() as i64, range.1.floor() as i64);
    while lo <= hi && !valid(lo) {
        lo += 1;
    }
    while hi >= lo && !valid(hi) {
        hi -= 1;
    }
    (lo <= hi).then(|| Span { lo: lo as usize, hi: hi as usize, q: (q.0 + lo * dq.0, q.1 + lo * dq.1), dq })
}

/// Bilinear blend of the 2x2 block at byte offset `o` (top-left) and
/// `o + down` (bottom-left), right neighbour `right` bytes further;
/// `fr`, `fc` in 1/128.
#[inline(always)]
fn blend(s: &[u8], o: usize, right: usize, down: usize, fr: u32, fc: u32) -> [u8; 3] {
    let w = weights(fr, fc);
    let mut px = [0u8; 3];
    for (ch, p) in px.iter_mut().enumerate() {
        let (t, b) = (o + ch, o + down + ch);
        let sum = w[0] * u32::from(s[t])
            + w[1] * u32::from(s[t + right])
            + w[2] * u32::from(s[b])
            + w[3] * u32::from(s[b + right]);
        *p = ((sum + (1 << (2 * WEIGHT_BITS - 1))) >> (2 * WEIGHT_BITS)) as u8;
    }
    px
}

/// Top-left, top-right, bottom-left, bottom-right weights; they sum to 2^14.
#[inline(always)]
fn weights(fr: u32, fc: u32) -> [u32; 4] {
    let one = ONE as u32;
    [(one - fc) * (one - fr), fc * (one - fr), (one - fc) * fr, fc * fr]
}

/// One pixel whose footprint may leave the image: the fill mode decides.
fn border_pixel(
    smp: &Sampler<'_>,
    to_grid: &Affine,
    to_src: &Affine,
    grid: (u32, u32),
    fill: Fill,
    r: f64,
    c: f64,
) -> [u8; 3] {
    let (gr, gc) = to_grid.apply(r, c);
    let (Some(gr), Some(gc)) = (fill.mode.map(gr, grid.0), fill.mode.map(gc, grid.1)) else {
        return [fill.cval_u8(); 3];
    };
    let (qr, qc) = to_src.apply(gr, gc);
    let (last_r, last_c) = (i64::from(smp.sh) - 1, i64::from(smp.sw) - 1);
    let vr = (qr.clamp(0.0, last_r as f64) * ONE as f64).round() as i64;
    let vc = (qc.clamp(0.0, last_c as f64) * ONE as f64).round() as i64;
    let (y, x) = ((vr >> WEIGHT_BITS).min(last_r), (vc >> WEIGHT_BITS).min(last_c));
    let o = y as usize * smp.stride + x as usize * 3;
    let right = if x < last_c { 3 } else { 0 };
    let down = if y < last_r { smp.stride } else { 0 };
    blend(smp.s, o, right, down, (vr & (ONE - 1)) as u32, (vc & (ONE - 1)) as u32)
}

fn run_interior(smp: &Sampler<'_>, row: &mut [u8], span: &Span, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when SSSE3 was detected on this CPU.
        unsafe { x86::interior_ssse3(smp.s, smp.stride, row, span) };
        return;
    }
    let _ = simd;
    interior_scalar(smp.s, smp.stride, row, span);
}

fn interior_scalar(s: &[u8], stride: usize, row: &mut [u8], span: &Span) {
    let (mut qr, mut qc) = span.q;
    for px in row[span.lo * 3..(span.hi + 1) * 3].chunks_exact_mut(3) {
        let (vr, vc) = (to_steps(qr), to_steps(qc));
        let o = (vr >> WEIGHT_BITS) as usize * stride + (vc >> WEIGHT_BITS) as usize * 3;
        px.copy_from_slice(&blend(s, o, 3, stride, (vr & (ONE - 1)) as u32, (vc & (ONE - 1)) as u32));
        qr += span.dq.0;
        qc += span.dq.1;
    }
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("ssse3")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{ONE, Span, WEIGHT_BITS, blend, to_steps, weights};

    /// The interior of one row, one pixel per iteration: the 2x2 block is
    /// two 8-byte loads (each a pixel pair plus two spare bytes), shuffled
    /// into 16-bit (left, right) pairs per channel, and `pmaddwd` against
    /// the (left, right) weights of the top and of the bottom row sums it.
    #[target_feature(enable = "ssse3")]
    pub(super) fn interior_ssse3(s: &[u8], stride: usize, row: &mut [u8], span: &Span) {
        const Z: i8 = -128; // pshufb: zero this byte
        let top = _mm_setr_epi8(0, Z, 3, Z, 1, Z, 4, Z, 2, Z, 5, Z, Z, Z, Z, Z);
        let bottom = _mm_setr_epi8(8, Z, 11, Z, 9, Z, 12, Z, 10, Z, 13, Z, Z, Z, Z, Z);
        let round = _mm_set1_epi32(1 << (2 * WEIGHT_BITS - 1));
        let (mut qr, mut qc) = span.q;
        for px in row[span.lo * 3..(span.hi + 1) * 3].chunks_exact_mut(3) {
            let (vr, vc) = (to_steps(qr), to_steps(qc));
            qr += span.dq.0;
            qc += span.dq.1;
            let (fr, fc) = ((vr & (ONE - 1)) as u32, (vc & (ONE - 1)) as u32);
            let o = (vr >> WEIGHT_BITS) as usize * stride + (vc >> WEIGHT_BITS) as usize * 3;
            // The spare bytes can run past the last pixel: that block takes the scalar path.
            let (Some(a), Some(b)) =
                (s.get(o..).and_then(<[u8]>::first_chunk::<8>), s.get(o + stride..).and_then(<[u8]>::first_chunk::<8>))
            else {
                px.copy_from_slice(&blend(s, o, 3, stride, fr, fc));
                continue;
            };
            let w = weights(fr, fc);
            let ab = _mm_set_epi64x(i64::from_le_bytes(*b), i64::from_le_bytes(*a));
            let wt = _mm_set1_epi32((w[0] | (w[1] << 16)) as i32);
            let wb = _mm_set1_epi32((w[2] | (w[3] << 16)) as i32);
            let sum = _mm_add_epi32(
                _mm_madd_epi16(_mm_shuffle_epi8(ab, top), wt),
                _mm_madd_epi16(_mm_shuffle_epi8(ab, bottom), wb),
            );
            let v = _mm_srli_epi32::<{ 2 * WEIGHT_BITS as i32 }>(_mm_add_epi32(sum, round));
            let packed = _mm_packus_epi16(_mm_packs_epi32(v, v), v);
            px.copy_from_slice(&_mm_cvtsi128_si32(packed).to_le_bytes()[..3]);
        }
    }
}
