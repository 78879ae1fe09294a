//! The hot loops: the sparse forward product, the kernel gradient fused
//! with the optimizer update, each compiled a second time for AVX2 + FMA and
//! picked at run time.

use super::layers::Dense;
use super::optimizer::Slots;
use super::sparse::{Sparse, SparseCols, SparseRows};
use super::team::Team;
use super::{K_BLOCK, TILE};
use crate::ml::optimizer::{Rule, decay};

/// `out = x * kernel + bias` (`[rows, units]`). Threads take disjoint runs
/// of panels; each makes its own sparse copy of `x` in `sparse`.
/// `training`: `x` is a batch that the caller refills before the next step.
pub(super) fn dense_forward(
    x: &[f32],
    rows: usize,
    d: &Dense,
    team: &Team,
    sparse: &mut Vec<Sparse>,
    out: &mut Vec<f32>,
    training: bool,
) {
    let n = d.units;
    out.clear();
    out.resize(rows * n, 0.0);
    sparse.resize_with(team.threads(), Sparse::default);
    sparse.iter_mut().for_each(|s| s.filled = false);
    let np = n.div_ceil(TILE);
    // Typical inputs are about three quarters zeros.
    let work = rows * d.fan_in / 4 * n;
    let t = if work < (1 << 18) { 1 } else { team.threads().min(np) };
    if t == 1 {
        sparse[0].fill(x, rows, d.fan_in, false);
        forward_panels(&sparse[0].rows, d, 0, np, out);
        return;
    }
    let bounds: Vec<usize> = (0..=t).map(|i| np * i / t).collect();
    let cols: Vec<usize> = bounds.iter().map(|&p| (p * TILE).min(n)).collect();
    let mut parts: Vec<Vec<f32>> = cols.windows(2).map(|c| vec![0.0; rows * (c[1] - c[0])]).collect();
    let jobs: Vec<_> = parts.iter_mut().zip(bounds.windows(2)).zip(sparse.iter_mut()).collect();
    team.run(jobs, |((part, b), sp)| {
        // Part 0 runs on the calling thread, which wrote `x`.
        sp.fill(x, rows, d.fan_in, training && b[0] > 0);
        forward_panels(&sp.rows, d, b[0], b[1], part);
    });
    for (part, c) in parts.iter().zip(cols.windows(2)) {
        let w = c[1] - c[0];
        for r in 0..rows {
            out[r * n + c[0]..r * n + c[1]].copy_from_slice(&part[r * w..(r + 1) * w]);
        }
    }
}

/// Whether the hot loops may take their AVX2 + FMA build (checked once, then cached by std).
pub(super) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Asks for the cache lines of `v` ahead of their use; a hint, never a fault.
#[inline(always)]
pub(super) fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in v.chunks(16) {
        // SAFETY: a prefetch reads nothing architecturally and cannot fault;
        // the address is inside `v` anyway.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr().cast()) };
    }
}

/// Panels `pa..pb` of `x * kernel + bias` into `out`: `[rows, width]`, where
/// `width` is the number of columns of those panels.
pub(super) fn forward_panels(x: &SparseRows, d: &Dense, pa: usize, pb: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU just above.
        unsafe { forward_panels_avx2(x, d, pa, pb, out) };
        return;
    }
    forward_panels_impl(x, d, pa, pb, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn forward_panels_avx2(x: &SparseRows, d: &Dense, pa: usize, pb: usize, out: &mut [f32]) {
    forward_panels_impl(x, d, pa, pb, out);
}

#[inline(always)]
pub(super) fn forward_panels_impl(x: &SparseRows, d: &Dense, pa: usize, pb: usize, out: &mut [f32]) {
    let base = pa * TILE;
    let width = (pb * TILE).min(d.units) - base;
    let rows = x.rows();
    let mut used = vec![false; d.fan_in];
    for &k in x.indices() {
        used[k as usize] = true;
    }
    out.fill(0.0);
    for p in d.panels().skip(pa).take(pb - pa) {
        let (w, tw, oc) = (&d.kernel[p.range(d.fan_in)], p.width, p.c0 - base);
        // Blocks of panel rows small enough to stay in L1 while every row of
        // the batch uses them. Each output still sums its terms in index
        // order (the tile is stored and reloaded between blocks).
        for b in 0..x.blocks() {
            let next = ((b + 1) * K_BLOCK).min(d.fan_in)..((b + 2) * K_BLOCK).min(d.fan_in);
            for k in next.filter(|&k| used[k]) {
                prefetch(&w[k * tw..(k + 1) * tw]);
            }
            for r in 0..rows {
                let (idx, val) = x.segment(b, r);
                let o = &mut out[r * width + oc..][..tw];
                if tw == TILE {
                    let mut acc = [0.0f32; TILE];
                    acc.copy_from_slice(o);
                    for (&k, &v) in idx.iter().zip(val) {
                        let wr = &w[k as usize * TILE..][..TILE];
                        for j in 0..TILE {
                            acc[j] = v.mul_add(wr[j], acc[j]);
                        }
                    }
                    o.copy_from_slice(&acc);
                } else {
                    for (&k, &v) in idx.iter().zip(val) {
                        let wr = &w[k as usize * tw..][..tw];
                        for j in 0..tw {
                            o[j] = v.mul_add(wr[j], o[j]);
                        }
                    }
                }
            }
        }
        let bias = &d.bias[p.c0..p.c0 + tw];
        for r in 0..rows {
            out[r * width + oc..][..tw].iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
    }
}

/// `dz * kernel^T`: the gradient w.r.t. the layer's input, from the kernel
/// before its update.
pub(super) fn input_gradient(dz: &[f32], rows: usize, d: &Dense) -> Vec<f32> {
    let (k, n) = (d.fan_in, d.units);
    let mut out = vec![0.0; rows * k];
    let mut wr = vec![0.0; n];
    for i in 0..k {
        for p in d.panels() {
            wr[p.c0..p.c0 + p.width].copy_from_slice(&d.kernel[p.c0 * k + i * p.width..][..p.width]);
        }
        for r in 0..rows {
            let g = &dz[r * n..(r + 1) * n];
            out[r * k + i] = g.iter().zip(&wr).fold(0.0, |s, (&a, &b)| s + a * b);
        }
    }
    out
}

/// Gradient of the bias (rows summed in order) and its update.
pub(super) fn bias_update(dz: &[f32], rows: usize, d: &mut Dense, rule: &Rule, slots: &mut Slots) {
    let n = d.units;
    let mut g = vec![0.0f32; n];
    for r in 0..rows {
        for (a, &b) in g.iter_mut().zip(&dz[r * n..(r + 1) * n]) {
            *a += b;
        }
    }
    rule.apply(&mut d.bias, &g, &mut slots.s1, &mut slots.s2, 0.0);
}

/// One optimizer step, as every kernel row sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Step {
    pub(super) rule: Rule,
    /// This step's number (`Optimizer::iterations`, counting it).
    pub(super) t: u64,
    /// Whether rows with a zero gradient may be left for later (see [`Slots::stamps`]).
    pub(super) lazy: bool,
    /// Twice the L2 factor: the penalty's gradient is `l2x2 * w`.
    pub(super) l2x2: f32,
}

/// Computes each kernel row's gradient `x[:, k]^T dz` (skipping zeros) and
/// applies the update to it in the same pass, panel by panel, so the kernel
/// and its slots are read and written once, in order. Threads take disjoint
/// runs of panel rows. Returns `sum(kernel^2)` before the update when `l2 > 0`.
#[allow(clippy::too_many_arguments)]
pub(super) fn kernel_update(
    x: &[f32],
    rows: usize,
    dz: &[f32],
    d: &mut Dense,
    step: &Step,
    slots: &mut Slots,
    team: &Team,
    sparse: &mut [Sparse],
    row_sq: &mut Vec<f64>,
) -> f64 {
    let (k, n) = (d.fan_in, d.units);
    let items = n.div_ceil(TILE) * k;
    row_sq.clear();
    row_sq.resize(if step.l2x2 > 0.0 { items } else { 0 }, 0.0);
    let t = if k * n < (1 << 16) { 1 } else { team.threads().min(items) };
    // Where panel row `i` (panel `i / k`, row `i % k`) starts in the kernel.
    let offset = |i: usize| {
        if i == items {
            return k * n;
        }
        let c0 = i / k * TILE;
        c0 * k + i % k * TILE.min(n - c0)
    };
    let bounds: Vec<usize> = (0..=t).map(|i| items * i / t).collect();
    let job = KernelJob { dz, fan_in: k, n, step: *step };
    let mut w_rest = &mut d.kernel[..];
    let mut s1_rest = &mut slots.s1[..];
    let mut s2_rest = &mut slots.s2[..];
    let mut st_rest = &mut slots.stamps[..];
    let mut sq_rest = &mut row_sq[..];
    let mut parts = Vec::with_capacity(t);
    for (b, sp) in bounds.windows(2).zip(sparse.iter_mut()) {
        let len = offset(b[1]) - offset(b[0]);
        let (w, r) = std::mem::take(&mut w_rest).split_at_mut(len);
        w_rest = r;
        let (s1, r) = split_slot(std::mem::take(&mut s1_rest), len);
        s1_rest = r;
        let (s2, r) = split_slot(std::mem::take(&mut s2_rest), len);
        s2_rest = r;
        let (st, r) = std::mem::take(&mut st_rest).split_at_mut(b[1] - b[0]);
        st_rest = r;
        let (sq, r) = split_slot(std::mem::take(&mut sq_rest), b[1] - b[0]);
        sq_rest = r;
        parts.push((sp, KernelPart { i0: b[0], w, s1, s2, stamps: st, sq }));
    }
    team.run(parts, |(sp, part)| {
        if !sp.filled {
            sp.fill(x, rows, k, part.i0 > 0);
        }
        sp.cols.transpose(&sp.rows, k);
        job.run(&sp.cols, part);
    });
    row_sq.iter().sum()
}

/// Splits an optimizer slot that may be empty (unused by the rule).
pub(super) fn split_slot<T>(s: &mut [T], at: usize) -> (&mut [T], &mut [T]) {
    if s.is_empty() { (&mut [], &mut []) } else { s.split_at_mut(at) }
}

/// `sum over (r, v) of v * dz[r * n..][..TILE]`, rows in order, each term
/// with one rounding (`mul_add`): one kernel panel row's gradient.
#[inline(always)]
pub(super) fn gradient_tile(rows: &[u32], vals: &[f32], dz: &[f32], n: usize) -> [f32; TILE] {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU just above.
        return unsafe { gradient_tile_avx2(rows, vals, dz, n) };
    }
    gradient_tile_portable(rows, vals, dz, n)
}

#[inline(always)]
pub(super) fn gradient_tile_portable(rows: &[u32], vals: &[f32], dz: &[f32], n: usize) -> [f32; TILE] {
    let mut g = [0.0f32; TILE];
    for (&r, &v) in rows.iter().zip(vals) {
        let dr = &dz[r as usize * n..][..TILE];
        for c in 0..TILE {
            g[c] = v.mul_add(dr[c], g[c]);
        }
    }
    g
}

/// [`gradient_tile`] with its eight sums held in named registers: written as
/// an array, they were kept partly in memory (an array passed on by slice),
/// and the store and reload lengthened every sum's chain, making the kernel
/// gradient three times slower than its arithmetic.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn gradient_tile_avx2(rows: &[u32], vals: &[f32], dz: &[f32], n: usize) -> [f32; TILE] {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 8];
    for (&r, &v) in rows.iter().zip(vals) {
        let d: &[f32; TILE] = match dz[r as usize * n..].first_chunk() {
            Some(d) => d,
            None => continue,
        };
        let v = _mm256_set1_ps(v);
        // SAFETY: `d` holds TILE = 64 floats, eight loads of eight.
        unsafe {
            a[0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(d.as_ptr()), a[0]);
            a[1] = _mm256_fmadd_ps(v, _mm256_loadu_ps(d.as_ptr().add(8)), a[1]);
            a[2] = _mm256_fmadd_ps(v, _mm256_loadu_ps(d.as_ptr().add(16)), a[2]);
            a[3] = _mm256_fmadd_ps(v, _mm256_loadu_ps(d.as_ptr().add(24)), a[3]);
            a[4] = _mm256_fmadd_ps(v, _mm256_loadu_ps(d.as_ptr().add(32)), a[4]);
            a[5] = _mm256_fmadd_ps(v, _mm256_loadu_ps(d.as_ptr().add(40)), a[5]);
            a[6] = _mm256_fmadd_ps(v, _mm256_loadu_ps(d.as_ptr().add(48)), a[6]);
            a[7] = _mm256_fmadd_ps(v, _mm256_loadu_ps(d.as_ptr().add(56)), a[7]);
        }
    }
    let mut g = [0.0f32; TILE];
    for (chunk, a) in g.chunks_exact_mut(8).zip(a) {
        // SAFETY: `chunk` holds 8 floats.
        unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), a) };
    }
    g
}

/// What every thread of [`kernel_update`] shares.
pub(super) struct KernelJob<'a> {
    pub(super) dz: &'a [f32],
    pub(super) fan_in: usize,
    pub(super) n: usize,
    pub(super) step: Step,
}

/// One thread's share of the kernel update: panel rows `i0..i0 + stamps.len()`
/// and the slices of the kernel, the optimizer slots, the rows' update stamps
/// and (with L2) their squared norms, each starting at row `i0`.
pub(super) struct KernelPart<'a> {
    pub(super) i0: usize,
    pub(super) w: &'a mut [f32],
    pub(super) s1: &'a mut [f32],
    pub(super) s2: &'a mut [f32],
    pub(super) stamps: &'a mut [u64],
    pub(super) sq: &'a mut [f64],
}

impl KernelJob<'_> {
    /// Updates `part`, whose inputs are the columns of `x`.
    pub(super) fn run(&self, x: &SparseCols, part: KernelPart<'_>) {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: AVX2 and FMA were detected on this CPU just above.
            unsafe { self.run_avx2(x, part) };
            return;
        }
        self.run_impl(x, part);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn run_avx2(&self, x: &SparseCols, part: KernelPart<'_>) {
        self.run_impl(x, part);
    }

    #[inline(always)]
    pub(super) fn run_impl(&self, x: &SparseCols, part: KernelPart<'_>) {
        let KernelPart { i0, w, s1, s2, stamps, sq } = part;
        let (k, n, step) = (self.fan_in, self.n, &self.step);
        let decay_rho = step.rule.deferrable_decay();
        let lazy = step.lazy && decay_rho.is_some();
        let part = |s: &mut [f32], r: std::ops::Range<usize>| -> std::ops::Range<usize> {
            if s.is_empty() { 0..0 } else { r }
        };
        let mut off = 0;
        for (j, stamp) in stamps.iter_mut().enumerate() {
            let i = i0 + j;
            let c0 = i / k * TILE;
            let tw = TILE.min(n - c0);
            let range = off..off + tw;
            off += tw;
            let wrow = &mut w[range.clone()];
            let (r1, r2) = (part(s1, range.clone()), part(s2, range));
            let (s1row, s2row) = (&mut s1[r1], &mut s2[r2]);
            if !sq.is_empty() {
                sq[j] = wrow.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            }
            let (nz_rows, nz_vals) = x.col(i % k);
            if nz_rows.is_empty() && lazy {
                continue;
            }
            if let Some(rho) = decay_rho {
                decay(s1row, rho, step.t - 1 - *stamp);
            }
            *stamp = step.t;
            if tw == TILE {
                let g = gradient_tile(nz_rows, nz_vals, &self.dz[c0..], n);
                step.rule.apply(wrow, &g, s1row, s2row, step.l2x2);
            } else {
                let mut g = [0.0f32; TILE];
                for (&r, &v) in nz_rows.iter().zip(nz_vals) {
                    let dr = &self.dz[r as usize * n + c0..][..tw];
                    for c in 0..tw {
                        g[c] = v.mul_add(dr[c], g[c]);
                    }
                }
                step.rule.apply(wrow, &g[..tw], s1row, s2row, step.l2x2);
            }
        }
    }
}
