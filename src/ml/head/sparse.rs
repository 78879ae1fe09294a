//! Sparse copies of a layer's input: VGG16's ReLU features are mostly zeros,
//! and every skipped zero is an exact `0 * w` not computed.

use super::K_BLOCK;
use super::kernels::avx2_fma;

/// Rows as (index, value) lists of their nonzeros, cut into blocks of
/// [`K_BLOCK`] columns: block after block, each row's nonzeros among that
/// block's columns, rows in order. The forward walks it in exactly this
/// order, and turning it into columns touches one block's worth at a time.
#[derive(Debug, Clone, Default)]
pub(super) struct SparseRows {
    pub(super) rows: usize,
    /// Where (block `b`, row `r`)'s entries start: `ptr[b * rows + r]`; one more at the end.
    pub(super) ptr: Vec<usize>,
    pub(super) idx: Vec<u32>,
    pub(super) val: Vec<f32>,
}

impl SparseRows {
    /// `foreign`: `x` was written by another thread, which will write it
    /// again before the next step (see [`compress_avx2`]).
    pub(super) fn fill(&mut self, x: &[f32], rows: usize, cols: usize, foreign: bool) {
        self.rows = rows;
        self.ptr.clear();
        self.ptr.push(0);
        let simd = avx2_fma();
        let mut p = 0;
        for k0 in (0..cols).step_by(K_BLOCK) {
            let width = K_BLOCK.min(cols - k0);
            for r in 0..rows {
                // Room for a whole segment after the nonzeros so far, kept from
                // call to call (no clearing): only the prefix up to `nnz` means anything.
                if self.idx.len() < p + width {
                    self.idx.resize(p + width, 0);
                    self.val.resize(p + width, 0.0);
                }
                let (idx, val) = (&mut self.idx[p..p + width], &mut self.val[p..p + width]);
                let x = &x[r * cols + k0..][..width];
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: AVX2 was detected on this CPU.
                    p += unsafe { compress_avx2(x, k0 as u32, idx, val, foreign) };
                    self.ptr.push(p);
                    continue;
                }
                let _ = simd;
                p += compress(x, k0 as u32, 0, idx, val, 0);
                self.ptr.push(p);
            }
        }
    }

    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    pub(super) fn blocks(&self) -> usize {
        (self.ptr.len() - 1).checked_div(self.rows).unwrap_or(0)
    }

    pub(super) fn nnz(&self) -> usize {
        self.ptr.last().copied().unwrap_or(0)
    }

    /// Every nonzero's column, block after block.
    pub(super) fn indices(&self) -> &[u32] {
        &self.idx[..self.nnz()]
    }

    /// Row `r`'s nonzeros in block `b`.
    pub(super) fn segment(&self, b: usize, r: usize) -> (&[u32], &[f32]) {
        let i = b * self.rows + r;
        let (a, e) = (self.ptr[i], self.ptr[i + 1]);
        (&self.idx[a..e], &self.val[a..e])
    }
}

/// Writes the nonzeros of `x[from..]` to `idx`/`val` from `q` on, as
/// (`base` + index in `x`, value); returns the new count. Branch-free: every
/// entry is written, and only a nonzero advances past it.
pub(super) fn compress(x: &[f32], base: u32, from: usize, idx: &mut [u32], val: &mut [f32], mut q: usize) -> usize {
    for (k, &v) in x.iter().enumerate().skip(from) {
        idx[q] = base + k as u32;
        val[q] = v;
        q += usize::from(v != 0.0);
    }
    q
}

/// For each 8-bit mask, the lanes whose bit is set, in order, then zeros.
#[cfg(target_arch = "x86_64")]
pub(super) static COMPRESS_LANES: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut lane, mut q) = (0, 0);
        while lane < 8 {
            if m & (1 << lane) != 0 {
                t[m][q] = lane as u32;
                q += 1;
            }
            lane += 1;
        }
        m += 1;
    }
    t
};

/// [`compress`] eight entries at a time: the nonzero lanes are moved to the
/// front with a lane permutation and all eight stored; the next store starts
/// after the nonzeros, over the rest. The same entries, in the same order.
/// `foreign`: see [`SparseRows::fill`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) fn compress_avx2(x: &[f32], base: u32, idx: &mut [u32], val: &mut [f32], foreign: bool) -> usize {
    use std::arch::x86_64::*;
    let n = x.len().min(idx.len()).min(val.len());
    let (mut q, mut k) = (0, 0);
    let zero = _mm256_setzero_ps();
    let b = base as i32;
    let mut lanes = _mm256_setr_epi32(b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7);
    let eight = _mm256_set1_epi32(8);
    if foreign {
        // Read another core's freshly written lines as non-temporal, so that
        // they do not linger in this core's caches: when that core rewrites
        // them for the next batch, it then need not invalidate copies here
        // first (which cost the caller up to 0.3 ms a step).
        for line in x.chunks(16) {
            _mm_prefetch::<_MM_HINT_NTA>(line.as_ptr().cast());
        }
    }
    while k + 8 <= n {
        // SAFETY: `k + 8 <= n` floats of `x`; `q <= k`, so the 8-wide stores
        // at `q` stay inside `idx` and `val` (both at least `n` long).
        unsafe {
            let v = _mm256_loadu_ps(x.as_ptr().add(k));
            // Unordered-or-unequal: like `v != 0.0`, true for NaN, false for -0.0.
            let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(v, zero)) as usize;
            let perm = _mm256_loadu_si256(COMPRESS_LANES[m].as_ptr().cast());
            _mm256_storeu_ps(val.as_mut_ptr().add(q), _mm256_permutevar8x32_ps(v, perm));
            _mm256_storeu_si256(idx.as_mut_ptr().add(q).cast(), _mm256_permutevar8x32_epi32(lanes, perm));
            q += m.count_ones() as usize;
        }
        lanes = _mm256_add_epi32(lanes, eight);
        k += 8;
    }
    compress(&x[..n], base, k, idx, val, q)
}

/// The same nonzeros by column: each column's (row, value) list, rows ascending.
#[derive(Debug, Clone, Default)]
pub(super) struct SparseCols {
    pub(super) ptr: Vec<usize>,
    pub(super) row: Vec<u32>,
    pub(super) val: Vec<f32>,
    /// Each column's next free entry, while transposing.
    pub(super) next: Vec<usize>,
}

impl SparseCols {
    pub(super) fn transpose(&mut self, x: &SparseRows, cols: usize) {
        self.ptr.clear();
        self.ptr.resize(cols + 1, 0);
        for &k in x.indices() {
            self.ptr[k as usize + 1] += 1;
        }
        for k in 0..cols {
            self.ptr[k + 1] += self.ptr[k];
        }
        self.row.resize(x.nnz(), 0);
        self.val.resize(x.nnz(), 0.0);
        self.next.clear();
        self.next.extend_from_slice(&self.ptr[..cols]);
        // Block by block, so the writes stay within one block's columns.
        for b in 0..x.blocks() {
            for r in 0..x.rows() {
                let (idx, val) = x.segment(b, r);
                for (&k, &v) in idx.iter().zip(val) {
                    let p = &mut self.next[k as usize];
                    self.row[*p] = r as u32;
                    self.val[*p] = v;
                    *p += 1;
                }
            }
        }
    }

    pub(super) fn col(&self, k: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.ptr[k], self.ptr[k + 1]);
        (&self.row[a..b], &self.val[a..b])
    }
}

/// A Dense layer's input as one thread sees it: its nonzeros by row (for the
/// forward) and by column (for the kernel gradient). Each thread makes its own
/// from the dense input rather than share one: the two cores of this machine
/// do not share a cache, and rewriting lines the other core has read costs a
/// cross-core invalidation per line, ten times the work itself.
#[derive(Debug, Default)]
pub(super) struct Sparse {
    pub(super) rows: SparseRows,
    pub(super) cols: SparseCols,
    /// Whether `rows` holds the current input (the forward may have used fewer threads).
    pub(super) filled: bool,
}

impl Sparse {
    pub(super) fn fill(&mut self, x: &[f32], rows: usize, cols: usize, foreign: bool) {
        self.rows.fill(x, rows, cols, foreign);
        self.filled = true;
    }
}
