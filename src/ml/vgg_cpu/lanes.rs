//! Channels side by side: the Winograd transforms are written on a
//! [`Lanes`] value, so that each line of them is one vector operation.
//!
//! Three kinds: [`Zmm`], one AVX-512 register (16 channels), for the
//! AVX-512 path; [`Ymm`], one AVX register (8), for the AVX2 path; and
//! [`Portable`], an array of 8 the compiler may vectorize, for the rest.
//! The registers exist because the array did not stay in registers: the
//! compiler passed the transforms' arrays of arrays through the stack and
//! used 128-bit halves, and the transforms took a third of the engine's
//! time at 150x150 (the products the other two thirds).

use std::ops::{Add, Mul, Sub};

/// `N` `f32` lanes.
pub(super) trait Lanes: Copy + Add<Output = Self> + Sub<Output = Self> + Mul<f32, Output = Self> {
    const N: usize;
    fn zero() -> Self;
    /// `s[..N]`.
    fn load_full(s: &[f32]) -> Self;
    /// `s[..lanes]`, zeros past it (`lanes` is 1..=N).
    fn load_n(s: &[f32], lanes: usize) -> Self;
    /// Into `d[..lanes]`.
    fn store_n(self, d: &mut [f32], lanes: usize);
    /// # Safety
    /// `d` is valid for `lanes` writes.
    unsafe fn store_ptr(self, d: *mut f32, lanes: usize);
    fn max(self, o: Self) -> Self;
}

/// Lanes as a plain array, for CPUs with neither AVX2 nor AVX-512.
#[derive(Clone, Copy)]
pub(super) struct Portable([f32; 8]);

impl Lanes for Portable {
    const N: usize = 8;
    #[inline(always)]
    fn zero() -> Self {
        Portable([0.0; 8])
    }
    #[inline(always)]
    fn load_full(s: &[f32]) -> Self {
        Portable(*<&[f32; 8]>::try_from(&s[..8]).unwrap_or(&[0.0; 8]))
    }
    #[inline(always)]
    fn load_n(s: &[f32], lanes: usize) -> Self {
        let mut a = [0f32; 8];
        a[..lanes].copy_from_slice(&s[..lanes]);
        Portable(a)
    }
    #[inline(always)]
    fn store_n(self, d: &mut [f32], lanes: usize) {
        d[..lanes].copy_from_slice(&self.0[..lanes]);
    }
    #[inline(always)]
    unsafe fn store_ptr(self, d: *mut f32, lanes: usize) {
        // SAFETY: as the caller promised.
        unsafe { std::ptr::copy_nonoverlapping(self.0.as_ptr(), d, lanes) }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i].max(o.0[i])))
    }
}

impl Add for Portable {
    type Output = Portable;
    #[inline(always)]
    fn add(self, o: Portable) -> Portable {
        Portable(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }
}
impl Sub for Portable {
    type Output = Portable;
    #[inline(always)]
    fn sub(self, o: Portable) -> Portable {
        Portable(std::array::from_fn(|i| self.0[i] - o.0[i]))
    }
}
impl Mul<f32> for Portable {
    type Output = Portable;
    #[inline(always)]
    fn mul(self, k: f32) -> Portable {
        Portable(self.0.map(|a| a * k))
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use avx::{Ymm, Zmm};

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::Lanes;
    use std::arch::x86_64::*;
    use std::ops::{Add, Mul, Sub};

    /// One AVX register. Only used inside the engine's `#[target_feature]`
    /// functions for AVX2 or AVX-512, which are only called on a CPU that
    /// has them ([`super::super::Isa::available`]): the intrinsics below
    /// are inlined there.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Ymm(__m256);

    /// One AVX-512 register; as [`Ymm`], only inside the engine's AVX-512
    /// functions.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Zmm(__m512);

    /// The first `lanes` of 8 lanes set (`lanes` 0..=8).
    #[inline(always)]
    fn mask8(lanes: usize) -> __m256i {
        const IDX: [i32; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
        // SAFETY: AVX is there (see `Ymm`).
        unsafe {
            _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), _mm256_loadu_si256(IDX.as_ptr() as *const __m256i))
        }
    }

    /// The first `lanes` of 16 lanes set (`lanes` 0..=16).
    #[inline(always)]
    fn mask16(lanes: usize) -> __mmask16 {
        ((1u32 << lanes) - 1) as __mmask16
    }

    /// [`Lanes`] and its operators for a register type, from its
    /// intrinsics: the two types differ in nothing else. Each intrinsic
    /// needs the register's instruction set, which every caller has (see
    /// `Ymm`); neither operand of `max` is ever NaN (finite sums of finite
    /// products), where the intrinsics and `f32::max` would differ.
    macro_rules! register_lanes {
        ($ty:ident, $n:literal, zero: $zero:ident, load: $load:ident, store: $store:ident, max: $max:ident,
         add: $add:ident, sub: $sub:ident, mul: $mul:ident, splat: $splat:ident,
         masked_load: |$lp:ident, $ll:ident| $mload:expr,
         masked_store: |$sp:ident, $sl:ident, $sv:ident| $mstore:expr) => {
            impl Lanes for $ty {
                const N: usize = $n;
                #[inline(always)]
                fn zero() -> Self {
                    // SAFETY: the instruction set is there (see `Ymm`).
                    $ty(unsafe { $zero() })
                }
                #[inline(always)]
                fn load_full(s: &[f32]) -> Self {
                    let s = &s[..$n];
                    // SAFETY: `N` values; the instruction set is there.
                    $ty(unsafe { $load(s.as_ptr()) })
                }
                #[inline(always)]
                fn load_n(s: &[f32], lanes: usize) -> Self {
                    if lanes == $n {
                        return Self::load_full(s);
                    }
                    let ($lp, $ll) = (s[..lanes].as_ptr(), lanes);
                    // SAFETY: the mask reads `lanes` values only; the instruction set is there.
                    $ty(unsafe { $mload })
                }
                #[inline(always)]
                fn store_n(self, d: &mut [f32], lanes: usize) {
                    let d = &mut d[..lanes];
                    // SAFETY: `lanes` values are writable.
                    unsafe { self.store_ptr(d.as_mut_ptr(), lanes) }
                }
                #[inline(always)]
                unsafe fn store_ptr(self, d: *mut f32, lanes: usize) {
                    let ($sp, $sl, $sv) = (d, lanes, self.0);
                    // SAFETY: as the caller promised; the instruction set is there.
                    unsafe { if lanes == $n { $store(d, self.0) } else { $mstore } }
                }
                #[inline(always)]
                fn max(self, o: Self) -> Self {
                    // SAFETY: the instruction set is there.
                    $ty(unsafe { $max(self.0, o.0) })
                }
            }

            impl Add for $ty {
                type Output = $ty;
                #[inline(always)]
                fn add(self, o: $ty) -> $ty {
                    // SAFETY: the instruction set is there.
                    $ty(unsafe { $add(self.0, o.0) })
                }
            }
            impl Sub for $ty {
                type Output = $ty;
                #[inline(always)]
                fn sub(self, o: $ty) -> $ty {
                    // SAFETY: the instruction set is there.
                    $ty(unsafe { $sub(self.0, o.0) })
                }
            }
            impl Mul<f32> for $ty {
                type Output = $ty;
                #[inline(always)]
                fn mul(self, k: f32) -> $ty {
                    // SAFETY: the instruction set is there.
                    $ty(unsafe { $mul(self.0, $splat(k)) })
                }
            }
        };
    }

    register_lanes!(Ymm, 8, zero: _mm256_setzero_ps, load: _mm256_loadu_ps, store: _mm256_storeu_ps,
        max: _mm256_max_ps, add: _mm256_add_ps, sub: _mm256_sub_ps, mul: _mm256_mul_ps, splat: _mm256_set1_ps,
        masked_load: |p, lanes| _mm256_maskload_ps(p, mask8(lanes)),
        masked_store: |p, lanes, v| _mm256_maskstore_ps(p, mask8(lanes), v));

    register_lanes!(Zmm, 16, zero: _mm512_setzero_ps, load: _mm512_loadu_ps, store: _mm512_storeu_ps,
        max: _mm512_max_ps, add: _mm512_add_ps, sub: _mm512_sub_ps, mul: _mm512_mul_ps, splat: _mm512_set1_ps,
        masked_load: |p, lanes| _mm512_maskz_loadu_ps(mask16(lanes), p),
        masked_store: |p, lanes, v| _mm512_mask_storeu_ps(p, mask16(lanes), v));
}
