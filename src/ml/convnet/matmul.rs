//! Row-major matrix products on the `gemm` crate (runtime CPU dispatch: no
//! `target-cpu` needed), the one kernel every trainable layer is built on.
//!
//! Determinism: `gemm` splits the output among threads and sums each
//! element over `k` in one fixed order, so a product is the same whatever
//! the timing. Products whose output is small but whose `k` is long (the
//! weight gradient of an early convolution: 27 x 32 outputs summed over
//! 400k rows) would leave all but one thread idle; [`matmul_tn_split`]
//! cuts `k` into as many fixed parts as there are threads and adds the
//! partial products in part order, so it too depends only on the thread
//! count.

use gemm::Parallelism;
use rayon::prelude::*;

/// How a factor is stored: as the `[rows, cols]` it is used as, or as its
/// transpose (`[cols, rows]` in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    N,
    T,
}

fn parallelism(threads: usize) -> Parallelism {
    if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None }
}

/// `c[m, n] (+)= op(a)[m, k] * op(b)[k, n]`; `accumulate` adds to what `c`
/// holds. Lengths are checked: a wrong one is a bug in a layer, so it panics
/// (the layers compute every shape from the model's spec, never from input).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "matmul: operand too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // (column stride, row stride) of each operand as used.
    let (a_cs, a_rs) = match la {
        Layout::N => (1, k as isize),
        Layout::T => (m as isize, 1),
    };
    let (b_cs, b_rs) = match lb {
        Layout::N => (1, n as isize),
        Layout::T => (k as isize, 1),
    };
    // SAFETY: the lengths are checked above against the strides given, and
    // `c` does not alias `a` or `b` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(threads),
        );
    }
}

/// `c[m, n] = a^T * b` where `a` is `[k, m]` and `b` is `[k, n]` in memory
/// (a weight gradient: inputs^T x output gradients, summed over `k` rows).
/// `k` is cut into `threads` fixed parts summed in order (see the module
/// doc); `scratch` holds the partial products between calls.
#[allow(clippy::too_many_arguments)]
pub fn matmul_tn_split(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    threads: usize,
    scratch: &mut Vec<f32>,
) {
    let parts = threads.clamp(1, k.max(1));
    // A wide output already keeps every thread busy inside one product.
    if parts == 1 || m * n >= 256 * 256 {
        matmul(m, n, k, a, Layout::T, b, Layout::N, c, false, threads);
        return;
    }
    let per = k.div_ceil(parts);
    scratch.clear();
    scratch.resize(parts * m * n, 0.0);
    scratch.par_chunks_mut(m * n).enumerate().for_each(|(p, out)| {
        let (lo, hi) = (p * per, ((p + 1) * per).min(k));
        if lo < hi {
            matmul(m, n, hi - lo, &a[lo * m..hi * m], Layout::T, &b[lo * n..hi * n], Layout::N, out, false, 1);
        } else {
            out.fill(0.0);
        }
    });
    c[..m * n].copy_from_slice(&scratch[..m * n]);
    for part in scratch.chunks_exact(m * n).skip(1) {
        c.iter_mut().zip(part).for_each(|(c, &p)| *c += p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], la: Layout, b: &[f32], lb: Layout) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if la == Layout::N { a[i * k + p] } else { a[p * m + i] };
                    let bv = if lb == Layout::N { b[p * n + j] } else { b[j * k + p] };
                    s += f64::from(av) * f64::from(bv);
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn every_layout_matches_a_naive_product() {
        let (m, n, k) = (7, 5, 11);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 17) as f32 - 8.0) / 7.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 19) as f32 - 9.0) / 5.0).collect();
        for la in [Layout::N, Layout::T] {
            for lb in [Layout::N, Layout::T] {
                let want = naive(m, n, k, &a, la, &b, lb);
                for threads in [1, 3] {
                    let mut c = vec![1.0; m * n];
                    matmul(m, n, k, &a, la, &b, lb, &mut c, false, threads);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-4, "{la:?}{lb:?}: {x} vs {y}");
                    }
                }
            }
        }
        let want = naive(m, n, k, &a, Layout::T, &b, Layout::N);
        for threads in [1, 2, 4, 64] {
            let mut c = vec![0.0; m * n];
            matmul_tn_split(m, n, k, &a[..k * m], &b[..k * n], &mut c, threads, &mut Vec::new());
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "split {threads}: {x} vs {y}");
            }
        }
    }
}
