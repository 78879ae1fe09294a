//! The one resampling pass: every output pixel is read once, bilinearly
//! (Keras/scipy `order=1`), from wherever the composed affine map sends it.
//!
//! Along an output row the map moves the source position by a constant
//! step, so each row is a *run* of pixels whose position is carried in
//! 16.16 fixed point (`q0 + c * dq`, exact integer arithmetic) and clamped
//! to a box. Clamping is what `nearest` does, and it also keeps the 2x2
//! footprint inside the image (the top-left corner stops one pixel short of
//! the last row and column, with the weight moved onto the far neighbour),
//! so the inner loop has no bounds logic at all:
//! - `nearest`: the whole row is one run.
//! - `constant`: the pixels whose grid point lies outside the grid are
//!   `cval`; the rest (an interval, the grid being convex) are one run.
//! - `reflect`, `wrap`: inside the grid, one run; outside, each pixel is
//!   mapped by [`FillMode::map`] on its own (the slow path).
//!
//! Runs go through an AVX2 kernel (8 pixels per step, gathered loads) where
//! the CPU has it, else a scalar one; both do the same integer arithmetic,
//! so they give the same bytes. Weights have 7 bits per axis (1/128 pixel).
//! Nothing is allocated per pixel or per row.

use image::RgbImage;

use super::affine::{self, Affine};
use super::fill::{Fill, FillMode};

/// Which inner loop resamples the runs (the bytes are the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernel {
    /// SIMD where the CPU has it, else scalar.
    #[default]
    Auto,
    Scalar,
}

/// Fractional bits of run coordinates.
const FRAC: u32 = 16;
const WEIGHT_BITS: u32 = 7;
const ONE: i32 = 1 << WEIGHT_BITS;
/// From 16.16 to 1/128 pixel, rounding half up.
const TO_STEPS: u32 = FRAC - WEIGHT_BITS;
const STEP_HALF: i32 = 1 << (TO_STEPS - 1);
/// Rows whose fixed-point positions could leave +-2^30 take the slow path.
const FIXED_LIMIT: i64 = 1 << 30;

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
    if sw == 0 || sh == 0 || grid.0 == 0 || grid.1 == 0 || ow == 0 {
        let v = fill.cval_u8();
        img.iter_mut().for_each(|b| *b = v);
        return img;
    }
    let to_src = if grid == (sh, sw) { Affine::IDENTITY } else { affine::grid_to_source(grid.0, grid.1, sh, sw) };
    let src = Source::new(src, &to_src, grid);
    let full = to_src.mul(to_grid);
    let simd = kernel == Kernel::Auto && simd_available();
    let cval = [fill.cval_u8(); 3];
    let dst: &mut [u8] = &mut img;
    for (r, row) in dst.chunks_exact_mut(ow as usize * 3).enumerate() {
        let r = r as f64;
        // Pixels outside [lo, hi) read the fill; inside, one run.
        let (lo, hi) = match fill.mode {
            FillMode::Nearest => (0, ow as usize),
            _ => inside_grid(to_grid, grid, r, ow),
        };
        let run = (lo < hi && src.runs_allowed()).then(|| Run::new(&full, r, lo, hi, ow)).flatten();
        let slow_from = if run.is_some() { hi } else { lo };
        for c in (0..lo).chain(slow_from..hi).chain(hi..ow as usize) {
            let px = match fill.mode {
                FillMode::Constant if c < lo || c >= hi => cval,
                _ => slow_pixel(&src, to_grid, &to_src, grid, fill, r, c as f64),
            };
            row[c * 3..c * 3 + 3].copy_from_slice(&px);
        }
        if let Some(run) = run {
            run_pixels(&src, row, &run, simd);
        }
    }
    img
}

/// The source pixels, and the box (16.16, per axis) that positions are
/// clamped to: the grid's extent mapped to the source, within the image.
struct Source<'a> {
    s: &'a [u8],
    w: u32,
    h: u32,
    stride: usize,
    lo: [f64; 2],
    hi: [f64; 2],
    lo_fixed: [i32; 2],
    hi_fixed: [i32; 2],
}

impl<'a> Source<'a> {
    fn new(img: &'a RgbImage, to_src: &Affine, grid: (u32, u32)) -> Self {
        let (w, h) = img.dimensions();
        let (a0, b0) = to_src.apply(0.0, 0.0);
        let (a1, b1) = to_src.apply(f64::from(grid.0 - 1), f64::from(grid.1 - 1));
        let lo = [a0.clamp(0.0, f64::from(h - 1)), b0.clamp(0.0, f64::from(w - 1))];
        let hi = [a1.clamp(lo[0], f64::from(h - 1)), b1.clamp(lo[1], f64::from(w - 1))];
        let fixed = |v: f64| (v * f64::from(1 << FRAC)).round() as i32;
        Source {
            s: img.as_raw(),
            w,
            h,
            stride: w as usize * 3,
            lo,
            hi,
            lo_fixed: lo.map(fixed),
            hi_fixed: hi.map(fixed),
        }
    }

    /// Runs need a 2x2 footprint; a one-pixel-wide or -high source only
    /// takes the slow path.
    fn runs_allowed(&self) -> bool {
        self.w >= 2 && self.h >= 2
    }
}

/// Output pixels `start..end` of a row, at source positions `q0 + c * dq`
/// (16.16 fixed point, `c` counted from the row's start).
struct Run {
    start: usize,
    end: usize,
    q0: [i32; 2],
    dq: [i32; 2],
}

impl Run {
    fn new(full: &Affine, r: f64, start: usize, end: usize, ow: u32) -> Option<Run> {
        let (q0r, q0c) = full.apply(r, 0.0);
        let fixed = |v: f64| {
            let v = (v * f64::from(1 << FRAC)).round();
            (v.abs() < FIXED_LIMIT as f64).then_some(v as i64)
        };
        let q0 = [fixed(q0r)?, fixed(q0c)?];
        let dq = [fixed(full.m[0][1])?, fixed(full.m[1][1])?];
        // Linear in c: both ends within the limit means every pixel is.
        let far = |i: usize| q0[i] + i64::from(ow) * dq[i];
        if far(0).abs() >= FIXED_LIMIT || far(1).abs() >= FIXED_LIMIT {
            return None;
        }
        Some(Run { start, end, q0: q0.map(|v| v as i32), dq: dq.map(|v| v as i32) })
    }

    fn at(&self, c: usize) -> [i32; 2] {
        let c = c as i32;
        [self.q0[0].wrapping_add(c.wrapping_mul(self.dq[0])), self.q0[1].wrapping_add(c.wrapping_mul(self.dq[1]))]
    }
}

/// The pixels `[lo, hi)` of row `r` whose grid point lies inside the grid:
/// an estimate from the real-valued map, then the exact test at the ends.
fn inside_grid(to_grid: &Affine, grid: (u32, u32), r: f64, ow: u32) -> (usize, usize) {
    let (last_r, last_c) = (f64::from(grid.0 - 1), f64::from(grid.1 - 1));
    let inside = |c: i64| {
        let (gr, gc) = to_grid.apply(r, c as f64);
        (0.0..=last_r).contains(&gr) && (0.0..=last_c).contains(&gc)
    };
    let (g0r, g0c) = to_grid.apply(r, 0.0);
    let mut range = (0.0f64, f64::from(ow) - 1.0);
    for (a, b, last) in [(g0r, to_grid.m[0][1], last_r), (g0c, to_grid.m[1][1], last_c)] {
        if b == 0.0 {
            if !(0.0..=last).contains(&a) {
                return (0, 0);
            }
        } else {
            let (x, y) = (-a / b, (last - a) / b);
            range = (range.0.max(x.min(y)), range.1.min(x.max(y)));
        }
    }
    if range.0.is_nan() || range.1.is_nan() || range.0 > range.1 {
        return (0, 0);
    }
    let (mut lo, mut hi) = (range.0.ceil() as i64, range.1.floor() as i64);
    while lo <= hi && !inside(lo) {
        lo += 1;
    }
    while hi >= lo && !inside(hi) {
        hi -= 1;
    }
    if lo > hi {
        return (0, 0);
    }
    while lo > 0 && inside(lo - 1) {
        lo -= 1;
    }
    while hi + 1 < i64::from(ow) && inside(hi + 1) {
        hi += 1;
    }
    (lo as usize, hi as usize + 1)
}

/// Bilinear blend of the 2x2 block whose top-left byte is `o`; `fr`, `fc`
/// in 1/128, up to 128 (all the weight on the far neighbour).
#[inline(always)]
fn blend(s: &[u8], o: usize, right: usize, down: usize, fr: u32, fc: u32) -> [u8; 3] {
    let one = ONE as u32;
    let w = [(one - fc) * (one - fr), fc * (one - fr), (one - fc) * fr, fc * fr];
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

/// One run pixel, the scalar way; the AVX2 kernel computes the same.
#[inline(always)]
fn run_pixel(src: &Source<'_>, q: [i32; 2]) -> [u8; 3] {
    let vr = (q[0].max(src.lo_fixed[0]).min(src.hi_fixed[0]) + STEP_HALF) >> TO_STEPS;
    let vc = (q[1].max(src.lo_fixed[1]).min(src.hi_fixed[1]) + STEP_HALF) >> TO_STEPS;
    let y = (vr >> WEIGHT_BITS).min(src.h as i32 - 2).max(0);
    let x = (vc >> WEIGHT_BITS).min(src.w as i32 - 2).max(0);
    let o = y as usize * src.stride + x as usize * 3;
    blend(src.s, o, 3, src.stride, (vr - (y << WEIGHT_BITS)) as u32, (vc - (x << WEIGHT_BITS)) as u32)
}

fn run_pixels(src: &Source<'_>, row: &mut [u8], run: &Run, simd: bool) {
    let mut c = run.start;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when AVX2 was detected on this CPU.
        c = unsafe { x86::run_avx2(src, row, run) };
    }
    let _ = simd;
    for c in c..run.end {
        row[c * 3..c * 3 + 3].copy_from_slice(&run_pixel(src, run.at(c)));
    }
}

/// A pixel outside every run: the fill mode maps its grid point, then the
/// source is read there (any source size, any coordinate).
fn slow_pixel(
    src: &Source<'_>,
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
    // Clamped to the box, so non-negative: the cast rounds half up.
    let vr = (qr.max(src.lo[0]).min(src.hi[0]) * f64::from(ONE) + 0.5) as i64;
    let vc = (qc.max(src.lo[1]).min(src.hi[1]) * f64::from(ONE) + 0.5) as i64;
    let y = (vr >> WEIGHT_BITS).min((i64::from(src.h) - 2).max(0));
    let x = (vc >> WEIGHT_BITS).min((i64::from(src.w) - 2).max(0));
    let (fr, fc) = ((vr - (y << WEIGHT_BITS)).min(ONE.into()), (vc - (x << WEIGHT_BITS)).min(ONE.into()));
    let right = if src.w >= 2 { 3 } else { 0 };
    let down = if src.h >= 2 { src.stride } else { 0 };
    blend(src.s, y as usize * src.stride + x as usize * 3, right, down, fr as u32, fc as u32)
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{ONE, Run, STEP_HALF, Source, TO_STEPS, WEIGHT_BITS};

    /// Eight run pixels per step, planar: each 32-bit lane is one pixel.
    /// Four 64-bit gathers read the 2x2 blocks: the top pixel pair as the
    /// 8 bytes at the top-left pixel (`r0 g0 b0 r1 g1 b1 . .`), the bottom
    /// pair as the 8 bytes ending with the bottom-right pixel
    /// (`. . r0 g0 b0 r1 g1 b1`), which keeps every read inside the image.
    /// Gathers take the pixels in the order 0 1 4 5 | 2 3 6 7 so that byte
    /// shuffles and 64-bit unpacks give each channel's (left, right) pairs
    /// back in pixel order, as 16-bit halves for `pmaddwd` against the
    /// (left, right) weights. Returns the first pixel it left to the scalar
    /// loop: the run's end, or its start when it is shorter than 8.
    #[target_feature(enable = "avx2")]
    pub(super) fn run_avx2(src: &Source<'_>, row: &mut [u8], run: &Run) -> usize {
        if !src.runs_allowed() {
            return run.start;
        }
        const Z: i8 = -128; // vpshufb: zero this byte
        // Per 128-bit lane (two gathered pixels, bytes 0..8 and 8..16):
        // [R lower, R upper, G lower, G upper] and [B lower, B upper, 0, 0].
        let rg_top = _mm256_setr_epi8(
            0, Z, 3, Z, 8, Z, 11, Z, 1, Z, 4, Z, 9, Z, 12, Z, 0, Z, 3, Z, 8, Z, 11, Z, 1, Z, 4, Z, 9, Z, 12, Z,
        );
        let b_top = _mm256_setr_epi8(
            2, Z, 5, Z, 10, Z, 13, Z, Z, Z, Z, Z, Z, Z, Z, Z, 2, Z, 5, Z, 10, Z, 13, Z, Z, Z, Z, Z, Z, Z, Z, Z,
        );
        let rg_bottom = _mm256_setr_epi8(
            2, Z, 5, Z, 10, Z, 13, Z, 3, Z, 6, Z, 11, Z, 14, Z, 2, Z, 5, Z, 10, Z, 13, Z, 3, Z, 6, Z, 11, Z, 14, Z,
        );
        let b_bottom = _mm256_setr_epi8(
            4, Z, 7, Z, 12, Z, 15, Z, Z, Z, Z, Z, Z, Z, Z, Z, 4, Z, 7, Z, 12, Z, 15, Z, Z, Z, Z, Z, Z, Z, Z, Z,
        );
        let compact = _mm256_setr_epi8(
            0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, Z, Z, Z, Z, 0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, Z, Z, Z, Z,
        );
        let gather_order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let (lo_r, hi_r) = (_mm256_set1_epi32(src.lo_fixed[0]), _mm256_set1_epi32(src.hi_fixed[0]));
        let (lo_c, hi_c) = (_mm256_set1_epi32(src.lo_fixed[1]), _mm256_set1_epi32(src.hi_fixed[1]));
        let (last_r, last_c) = (_mm256_set1_epi32(src.h as i32 - 2), _mm256_set1_epi32(src.w as i32 - 2));
        let zero = _mm256_setzero_si256();
        let stride = _mm256_set1_epi32(src.stride as i32);
        let below = _mm256_set1_epi32(src.stride as i32 - 2);
        let one = _mm256_set1_epi32(ONE);
        let step_half = _mm256_set1_epi32(STEP_HALF);
        let round = _mm256_set1_epi32(1 << (2 * WEIGHT_BITS - 1));
        let lanes_r = _mm256_mullo_epi32(lanes, _mm256_set1_epi32(run.dq[0]));
        let lanes_c = _mm256_mullo_epi32(lanes, _mm256_set1_epi32(run.dq[1]));
        let base = src.s.as_ptr().cast::<i64>();
        let mut buf = [0u8; 32];
        if run.end - run.start < 8 {
            return run.start;
        }
        // Steps of 8; the last step overlaps the one before when the run is
        // not a multiple of 8 (rewriting a few pixels with the same bytes).
        let mut next = run.start;
        while next < run.end {
            let c = next.min(run.end - 8);
            next = c + 8;
            let q = run.at(c);
            let qr = _mm256_add_epi32(_mm256_set1_epi32(q[0]), lanes_r);
            let qc = _mm256_add_epi32(_mm256_set1_epi32(q[1]), lanes_c);
            let steps = |q: __m256i, lo: __m256i, hi: __m256i| {
                _mm256_srai_epi32::<{ TO_STEPS as i32 }>(_mm256_add_epi32(
                    _mm256_min_epi32(_mm256_max_epi32(q, lo), hi),
                    step_half,
                ))
            };
            let (vr, vc) = (steps(qr, lo_r, hi_r), steps(qc, lo_c, hi_c));
            let y = _mm256_max_epi32(_mm256_min_epi32(_mm256_srai_epi32::<{ WEIGHT_BITS as i32 }>(vr), last_r), zero);
            let x = _mm256_max_epi32(_mm256_min_epi32(_mm256_srai_epi32::<{ WEIGHT_BITS as i32 }>(vc), last_c), zero);
            let fr = _mm256_sub_epi32(vr, _mm256_slli_epi32::<{ WEIGHT_BITS as i32 }>(y));
            let fc = _mm256_sub_epi32(vc, _mm256_slli_epi32::<{ WEIGHT_BITS as i32 }>(x));
            let off = _mm256_add_epi32(_mm256_mullo_epi32(y, stride), _mm256_add_epi32(x, _mm256_slli_epi32::<1>(x)));
            // Products are at most 2^14: 16-bit multiplies, in 32-bit lanes.
            let (ar, ac) = (_mm256_sub_epi32(one, fr), _mm256_sub_epi32(one, fc));
            let wt = _mm256_or_si256(_mm256_mullo_epi16(ac, ar), _mm256_slli_epi32::<16>(_mm256_mullo_epi16(fc, ar)));
            let wb = _mm256_or_si256(_mm256_mullo_epi16(ac, fr), _mm256_slli_epi32::<16>(_mm256_mullo_epi16(fc, fr)));
            let top = _mm256_permutevar8x32_epi32(off, gather_order);
            let bottom = _mm256_add_epi32(top, below);
            // SAFETY: 0 <= y <= h - 2 and 0 <= x <= w - 2 (clamped just
            // above), so the top reads, bytes y * stride + 3 x + 0..8, and
            // the bottom ones, (y + 1) * stride + 3 x - 2..6, lie within
            // 0..h * stride, the length of `src.s` (stride >= 6).
            let (t_a, t_b, b_a, b_b) = unsafe {
                (
                    _mm256_i32gather_epi64::<1>(base, _mm256_castsi256_si128(top)),
                    _mm256_i32gather_epi64::<1>(base, _mm256_extracti128_si256::<1>(top)),
                    _mm256_i32gather_epi64::<1>(base, _mm256_castsi256_si128(bottom)),
                    _mm256_i32gather_epi64::<1>(base, _mm256_extracti128_si256::<1>(bottom)),
                )
            };
            let channels = |a: __m256i, b: __m256i, rg: __m256i, bl: __m256i, w: __m256i| {
                let (a_rg, b_rg) = (_mm256_shuffle_epi8(a, rg), _mm256_shuffle_epi8(b, rg));
                let blue = _mm256_unpacklo_epi64(_mm256_shuffle_epi8(a, bl), _mm256_shuffle_epi8(b, bl));
                (
                    _mm256_madd_epi16(_mm256_unpacklo_epi64(a_rg, b_rg), w),
                    _mm256_madd_epi16(_mm256_unpackhi_epi64(a_rg, b_rg), w),
                    _mm256_madd_epi16(blue, w),
                )
            };
            let (rt, gt, bt) = channels(t_a, t_b, rg_top, b_top, wt);
            let (rb, gb, bb) = channels(b_a, b_b, rg_bottom, b_bottom, wb);
            let finish = |t: __m256i, b: __m256i| {
                _mm256_srai_epi32::<{ 2 * WEIGHT_BITS as i32 }>(_mm256_add_epi32(_mm256_add_epi32(t, b), round))
            };
            let px = _mm256_or_si256(
                finish(rt, rb),
                _mm256_or_si256(_mm256_slli_epi32::<8>(finish(gt, gb)), _mm256_slli_epi32::<16>(finish(bt, bb))),
            );
            // SAFETY: `buf` is 32 bytes, the size of the store.
            unsafe { _mm256_storeu_si256(buf.as_mut_ptr().cast(), _mm256_shuffle_epi8(px, compact)) };
            let out = &mut row[c * 3..c * 3 + 24];
            out[..12].copy_from_slice(&buf[..12]);
            out[12..].copy_from_slice(&buf[16..28]);
        }
        run.end
    }
}
