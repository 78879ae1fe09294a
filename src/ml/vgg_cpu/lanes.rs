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

    /// The first `lanes` lanes set (`lanes` 0..=8).
    #[inline(always)]
    fn mask(lanes: usize) -> __m256i {
        const IDX: [i32; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
        // SAFETY: AVX is there (see `Ymm`).
        unsafe {
            _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), _mm256_loadu_si256(IDX.as_ptr() as *const __m256i))
        }
    }

    impl Lanes for Ymm {
        const N: usize = 8;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: AVX is there (see `Ymm`).
            Ymm(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        fn load_full(s: &[f32]) -> Self {
            let s = &s[..8];
            // SAFETY: 8 values; AVX is there.
            Ymm(unsafe { _mm256_loadu_ps(s.as_ptr()) })
        }
        #[inline(always)]
        fn load_n(s: &[f32], lanes: usize) -> Self {
            if lanes == 8 {
                return Self::load_full(s);
            }
            let s = &s[..lanes];
            // SAFETY: the mask reads `lanes` values only; AVX is there.
            Ymm(unsafe { _mm256_maskload_ps(s.as_ptr(), mask(lanes)) })
        }
        #[inline(always)]
        fn store_n(self, d: &mut [f32], lanes: usize) {
            let d = &mut d[..lanes];
            // SAFETY: `lanes` values are writable; AVX is there.
            unsafe { self.store_ptr(d.as_mut_ptr(), lanes) }
        }
        #[inline(always)]
        unsafe fn store_ptr(self, d: *mut f32, lanes: usize) {
            // SAFETY: as the caller promised; AVX is there.
            unsafe {
                if lanes == 8 { _mm256_storeu_ps(d, self.0) } else { _mm256_maskstore_ps(d, mask(lanes), self.0) }
            }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            // SAFETY: AVX is there. (Neither operand is NaN: finite sums of finite products.)
            Ymm(unsafe { _mm256_max_ps(self.0, o.0) })
        }
    }

    impl Add for Ymm {
        type Output = Ymm;
        #[inline(always)]
        fn add(self, o: Ymm) -> Ymm {
            // SAFETY: AVX is there.
            Ymm(unsafe { _mm256_add_ps(self.0, o.0) })
        }
    }
    impl Sub for Ymm {
        type Output = Ymm;
        #[inline(always)]
        fn sub(self, o: Ymm) -> Ymm {
            // SAFETY: AVX is there.
            Ymm(unsafe { _mm256_sub_ps(self.0, o.0) })
        }
    }
    impl Mul<f32> for Ymm {
        type Output = Ymm;
        #[inline(always)]
        fn mul(self, k: f32) -> Ymm {
            // SAFETY: AVX is there.
            Ymm(unsafe { _mm256_mul_ps(self.0, _mm256_set1_ps(k)) })
        }
    }

    /// One AVX-512 register; as [`Ymm`], only inside the engine's AVX-512
    /// functions.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Zmm(__m512);

    /// The first `lanes` lanes set (`lanes` 0..=16).
    #[inline(always)]
    fn mask16(lanes: usize) -> __mmask16 {
        ((1u32 << lanes) - 1) as __mmask16
    }

    impl Lanes for Zmm {
        const N: usize = 16;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: AVX-512F is there (see `Zmm`).
            Zmm(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        fn load_full(s: &[f32]) -> Self {
            let s = &s[..16];
            // SAFETY: 16 values; AVX-512F is there.
            Zmm(unsafe { _mm512_loadu_ps(s.as_ptr()) })
        }
        #[inline(always)]
        fn load_n(s: &[f32], lanes: usize) -> Self {
            if lanes == 16 {
                return Self::load_full(s);
            }
            let s = &s[..lanes];
            // SAFETY: the mask reads `lanes` values only; AVX-512F is there.
            Zmm(unsafe { _mm512_maskz_loadu_ps(mask16(lanes), s.as_ptr()) })
        }
        #[inline(always)]
        fn store_n(self, d: &mut [f32], lanes: usize) {
            let d = &mut d[..lanes];
            // SAFETY: `lanes` values are writable; AVX-512F is there.
            unsafe { self.store_ptr(d.as_mut_ptr(), lanes) }
        }
        #[inline(always)]
        unsafe fn store_ptr(self, d: *mut f32, lanes: usize) {
            // SAFETY: as the caller promised; AVX-512F is there.
            unsafe {
                if lanes == 16 { _mm512_storeu_ps(d, self.0) } else { _mm512_mask_storeu_ps(d, mask16(lanes), self.0) }
            }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            // SAFETY: AVX-512F is there.
            Zmm(unsafe { _mm512_max_ps(self.0, o.0) })
        }
    }

    impl Add for Zmm {
        type Output = Zmm;
        #[inline(always)]
        fn add(self, o: Zmm) -> Zmm {
            // SAFETY: AVX-512F is there.
            Zmm(unsafe { _mm512_add_ps(self.0, o.0) })
        }
    }
    impl Sub for Zmm {
        type Output = Zmm;
        #[inline(always)]
        fn sub(self, o: Zmm) -> Zmm {
            // SAFETY: AVX-512F is there.
            Zmm(unsafe { _mm512_sub_ps(self.0, o.0) })
        }
    }
    impl Mul<f32> for Zmm {
        type Output = Zmm;
        #[inline(always)]
        fn mul(self, k: f32) -> Zmm {
            // SAFETY: AVX-512F is there.
            Zmm(unsafe { _mm512_mul_ps(self.0, _mm512_set1_ps(k)) })
        }
    }
}
