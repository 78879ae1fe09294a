//! The engine's one inner loop: a register-blocked product of `ROWS` rows of
//! `a` (row-major, `lda` apart) and one packed panel of `b` (`[k][nr]`,
//! `nr` filters side by side), written over `nr` columns of `ROWS` rows of
//! `out`. Everything the engine multiplies (Winograd's 36 products, the
//! first layer's im2col product) goes through it.
//!
//! Chosen at run time ([`Isa::detect`]): AVX-512F (`nr` 32: two zmm per
//! row), AVX2 + FMA (`nr` 16: two ymm per row), else portable Rust. Each row
//! of the output is summed over `k` in one fixed order on every path, so
//! the result does not depend on the thread count; the paths differ from
//! each other only by FMA rounding.

/// Output rows per kernel call.
pub const ROWS: usize = 6;

/// The instruction set the engine's loops run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    /// Neither: portable Rust (slow; kept so the engine never assumes).
    Portable,
}

impl Isa {
    /// The best this CPU has.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            // The AVX-512 path's transforms are compiled for AVX2 + FMA too.
            if Isa::Avx512.available() {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Does this CPU have it?
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// `avx512`, `avx2`, `portable`.
    pub fn parse(s: &str) -> Option<Isa> {
        match s {
            "avx512" => Some(Isa::Avx512),
            "avx2" => Some(Isa::Avx2),
            "portable" => Some(Isa::Portable),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Filters per packed panel.
    pub fn nr(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 | Isa::Portable => 16,
        }
    }
}

/// `out[r][0..nr] = sum_c a[r][c] * b[c][0..nr]` for `r < ROWS`.
///
/// # Safety
/// `isa` must be available; `a` holds `ROWS` rows of `k` values `lda`
/// apart, `b` `k * isa.nr()` values, `out` `ROWS` rows of `isa.nr()` values
/// `ldo` apart.
#[inline(always)]
pub unsafe fn panel(isa: Isa, k: usize, a: *const f32, lda: usize, b: *const f32, out: *mut f32, ldo: usize) {
    // SAFETY: as the caller promised.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::panel_avx512(k, a, lda, b, out, ldo),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::panel_avx2(k, a, lda, b, out, ldo),
            _ => panel_portable(k, a, lda, b, out, ldo),
        }
    }
}

/// # Safety
/// As [`panel`], with `nr` 16.
unsafe fn panel_portable(k: usize, a: *const f32, lda: usize, b: *const f32, out: *mut f32, ldo: usize) {
    let mut acc = [[0f32; 16]; ROWS];
    for c in 0..k {
        // SAFETY: within the extents the caller promised.
        let bc: &[f32; 16] = unsafe { &*(b.add(c * 16) as *const [f32; 16]) };
        for (r, row) in acc.iter_mut().enumerate() {
            let x = unsafe { *a.add(r * lda + c) };
            // Not `mul_add`: without FMA hardware that is a library call per element.
            for (o, &w) in row.iter_mut().zip(bc) {
                *o += x * w;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * ldo), 16) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ROWS;
    use std::arch::x86_64::*;

    /// 6 rows x 16 filters: 12 ymm accumulators, two panel loads and six
    /// broadcasts per step of `k`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel_avx2(k: usize, a: *const f32, lda: usize, b: *const f32, out: *mut f32, ldo: usize) {
        // SAFETY: the caller's extents (see `super::panel`).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
            let rows: [*const f32; ROWS] = std::array::from_fn(|r| a.add(r * lda));
            for c in 0..k {
                let b0 = _mm256_loadu_ps(b.add(c * 16));
                let b1 = _mm256_loadu_ps(b.add(c * 16 + 8));
                for r in 0..ROWS {
                    let x = _mm256_broadcast_ss(&*rows[r].add(c));
                    acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
                }
            }
            for (r, v) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * ldo), v[0]);
                _mm256_storeu_ps(out.add(r * ldo + 8), v[1]);
            }
        }
    }

    /// 6 rows x 32 filters: 12 zmm accumulators.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel_avx512(k: usize, a: *const f32, lda: usize, b: *const f32, out: *mut f32, ldo: usize) {
        // SAFETY: the caller's extents (see `super::panel`).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            let rows: [*const f32; ROWS] = std::array::from_fn(|r| a.add(r * lda));
            for c in 0..k {
                let b0 = _mm512_loadu_ps(b.add(c * 32));
                let b1 = _mm512_loadu_ps(b.add(c * 32 + 16));
                for r in 0..ROWS {
                    let x = _mm512_set1_ps(*rows[r].add(c));
                    acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
                }
            }
            for (r, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(r * ldo), v[0]);
                _mm512_storeu_ps(out.add(r * ldo + 16), v[1]);
            }
        }
    }
}

/// Packs `w[k][n]` (row-major, `n` filters) into panels of `nr` filters:
/// `[n_pad / nr][k][nr]`, zeros past `n`.
pub fn pack(w: &[f32], k: usize, n: usize, nr: usize) -> Vec<f32> {
    let n_pad = n.div_ceil(nr) * nr;
    let mut out = vec![0f32; n_pad * k];
    for (p, panel) in out.chunks_mut(k * nr).enumerate() {
        for c in 0..k {
            for j in 0..nr {
                let col = p * nr + j;
                if col < n {
                    panel[c * nr + j] = w[c * n + col];
                }
            }
        }
    }
    out
}
