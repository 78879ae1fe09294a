//! The dense head trained on cached conv-base features (*Deep Learning with
//! Python* 5.3.1): a stack of `Dense` and `Dropout` layers, binary or
//! categorical cross-entropy, and RMSprop / Adam / SGD with Keras's update
//! rules. Pure math: no pipeline, no runtime; the caller owns the data, the
//! batching, the shuffling and the rng.
//!
//! # Why it is fast
//!
//! VGG16 features are ReLU outputs, ~71% exact zeros. Every `Dense` layer
//! stores its input rows as (index, value) lists and skips the zeros, in the
//! forward product and in the kernel gradient alike: exact, not an
//! approximation (a skipped term is `0 * w`). The gradient of each kernel row
//! is computed and immediately applied by the optimizer in the same pass
//! (the kernel and the optimizer slots are touched once a step), and the hot
//! loops are compiled a second time for AVX2 and picked at run time.
//!
//! The book's first kernel and its RMSprop velocity are 16.8 MB, walked twice
//! a step, so the rest is about memory: the kernel is stored in column panels
//! that each pass reads front to back ([`Panel`]); RMSprop skips the rows
//! whose input column is zero in the whole batch ([`Slots::stamps`]); each
//! thread keeps to its own panels in every pass and makes its own sparse copy
//! of the input ([`Sparse`]), so no cache line moves between cores; and the
//! threads live as long as the head ([`team`]).
//!
//! # Determinism
//!
//! Work is split over threads by disjoint output columns (forward) and
//! kernel panel rows (backward); every output element is summed by one
//! thread in a fixed order, so results are bit-identical for a seed and any
//! thread count. The sums use `mul_add` (one rounding), which the AVX2+FMA path
//! does in hardware and the portable path in software: both agree bit for
//! bit, the portable one is just slow.

mod team;

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use team::Team;

/// The book's input: VGG16's 4x4x512 `block5_pool`, flattened NHWC.
pub const BOOK_INPUT_DIM: usize = 4 * 4 * 512;

/// Columns of one register tile in the hot loops (8 AVX2 registers), and of
/// a kernel panel.
const TILE: usize = 64;

/// Panel rows per forward block: 128 x 64 floats is 32 KiB, used by every
/// row of the batch while it is in L1 / L2.
const K_BLOCK: usize = 128;

/// Rows per forward chunk in `evaluate` / `predict`, to bound memory.
const EVAL_CHUNK: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("invalid head spec: {0}")]
    Spec(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    Sigmoid,
    /// Only on the last layer, where it pairs with categorical cross-entropy.
    Softmax,
    Tanh,
    Linear,
}

/// One layer of the head, as a YAML stage config writes it:
/// `{kind: dense, units: 256, activation: relu}` or `{kind: dropout, rate: 0.5}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    Dense { units: usize, activation: Activation },
    Dropout { rate: f32 },
}

impl LayerSpec {
    /// The book's binary head: Dense(256, relu), Dropout(0.5), Dense(1, sigmoid).
    pub fn book() -> Vec<LayerSpec> {
        LayerSpec::book_categorical(1)
    }

    /// The book's head with `classes` outputs: softmax when there are more than one.
    pub fn book_categorical(classes: usize) -> Vec<LayerSpec> {
        let last = if classes == 1 { Activation::Sigmoid } else { Activation::Softmax };
        vec![
            LayerSpec::Dense { units: 256, activation: Activation::Relu },
            LayerSpec::Dropout { rate: 0.5 },
            LayerSpec::Dense { units: classes, activation: last },
        ]
    }
}

/// Which loss the last layer implies: sigmoid -> binary, softmax -> categorical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    BinaryCrossentropy,
    CategoricalCrossentropy,
}

/// A cache line of floats: the unit of [`AlignedVec`].
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Floats starting on a cache line. The hot loops read 32-byte vectors;
/// from a plain `Vec` every other one would straddle two lines.
#[derive(Debug, Clone, Default)]
struct AlignedVec {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedVec {
    fn zeros(len: usize) -> AlignedVec {
        AlignedVec { lines: vec![Line([0.0; 16]); len.div_ceil(16)], len }
    }
}

impl std::ops::Deref for AlignedVec {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` over `[f32; 16]` with no padding, and
        // `lines` holds at least `len` floats, all initialized.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedVec {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

/// An optimizer as a stage config writes it, with Keras's defaults:
/// `{name: rmsprop, learning_rate: 2e-5}` (`lr` is accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    Rmsprop {
        #[serde(default = "default_lr", alias = "lr")]
        learning_rate: f32,
        #[serde(default = "default_rho")]
        rho: f32,
        #[serde(default = "default_epsilon")]
        epsilon: f32,
    },
    Adam {
        #[serde(default = "default_lr", alias = "lr")]
        learning_rate: f32,
        #[serde(default = "default_beta_1")]
        beta_1: f32,
        #[serde(default = "default_beta_2")]
        beta_2: f32,
        #[serde(default = "default_epsilon")]
        epsilon: f32,
    },
    Sgd {
        #[serde(default = "default_sgd_lr", alias = "lr")]
        learning_rate: f32,
        #[serde(default)]
        momentum: f32,
        #[serde(default)]
        nesterov: bool,
    },
}

fn default_lr() -> f32 {
    1e-3
}
fn default_sgd_lr() -> f32 {
    1e-2
}
fn default_rho() -> f32 {
    0.9
}
fn default_beta_1() -> f32 {
    0.9
}
fn default_beta_2() -> f32 {
    0.999
}
fn default_epsilon() -> f32 {
    1e-7
}

impl OptimizerSpec {
    pub fn rmsprop(learning_rate: f32) -> OptimizerSpec {
        OptimizerSpec::Rmsprop { learning_rate, rho: default_rho(), epsilon: default_epsilon() }
    }

    pub fn adam(learning_rate: f32) -> OptimizerSpec {
        OptimizerSpec::Adam {
            learning_rate,
            beta_1: default_beta_1(),
            beta_2: default_beta_2(),
            epsilon: default_epsilon(),
        }
    }

    pub fn sgd(learning_rate: f32, momentum: f32, nesterov: bool) -> OptimizerSpec {
        OptimizerSpec::Sgd { learning_rate, momentum, nesterov }
    }
}

/// An optimizer and its slots. The slots are shaped on the first step to the
/// head it is used with; using it with another head is an error.
#[derive(Debug, Clone)]
pub struct Optimizer {
    spec: OptimizerSpec,
    iterations: u64,
    /// Per parameter tensor (kernel, bias of each Dense in order).
    slots: Vec<Slots>,
    /// Whether RMSprop may defer the decay of kernel rows with no gradient
    /// (see [`Slots::stamps`]); off only in tests, to check it against the
    /// plain update.
    lazy: bool,
}

/// One parameter tensor's optimizer state, laid out like the tensor.
#[derive(Debug, Clone, Default)]
struct Slots {
    /// RMSprop: velocity; Adam: m; SGD: momentum.
    s1: AlignedVec,
    /// Adam: v; empty otherwise.
    s2: AlignedVec,
    /// Kernels only, one per panel row (see [`Panel`]): the step up to which
    /// that row of `s1` is current. RMSprop with a zero gradient leaves the
    /// weights as they are and only multiplies the velocity by `rho`, so a
    /// row whose input column is all zeros in a batch is skipped (no memory
    /// traffic) and its owed `rho` factors are applied when a gradient next
    /// reaches it. The velocity is read nowhere else, and the weights are
    /// exact at every step.
    stamps: Vec<u64>,
}

impl Optimizer {
    pub fn new(spec: OptimizerSpec) -> Optimizer {
        Optimizer { spec, iterations: 0, slots: Vec::new(), lazy: true }
    }

    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// Steps taken so far (Keras's `optimizer.iterations`).
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// `sizes`: each parameter tensor's length and how many stamped rows it has.
    fn ensure_slots(&mut self, sizes: &[(usize, usize)]) -> Result<(), HeadError> {
        if self.slots.is_empty() {
            let two = matches!(self.spec, OptimizerSpec::Adam { .. });
            self.slots = sizes
                .iter()
                .map(|&(n, rows)| Slots {
                    s1: AlignedVec::zeros(n),
                    s2: AlignedVec::zeros(if two { n } else { 0 }),
                    stamps: vec![0; rows],
                })
                .collect();
            return Ok(());
        }
        if self.slots.len() != sizes.len()
            || self.slots.iter().zip(sizes).any(|(s, &(n, rows))| s.s1.len() != n || s.stamps.len() != rows)
        {
            return Err(HeadError::Shape("this optimizer's slots belong to a head of another shape".into()));
        }
        Ok(())
    }

    /// The scalars of the coming step (`iterations` counts it).
    fn next_rule(&mut self) -> Rule {
        self.iterations += 1;
        match self.spec {
            OptimizerSpec::Rmsprop { learning_rate, rho, epsilon } => {
                Rule::Rmsprop { lr: learning_rate, rho, one_minus_rho: 1.0 - rho, eps: epsilon }
            }
            OptimizerSpec::Adam { learning_rate, beta_1, beta_2, epsilon } => {
                // Keras computes the bias correction in the variable's dtype.
                let t = self.iterations as i32;
                let alpha = learning_rate * (1.0 - beta_2.powi(t)).sqrt() / (1.0 - beta_1.powi(t));
                Rule::Adam { alpha, one_minus_b1: 1.0 - beta_1, one_minus_b2: 1.0 - beta_2, eps: epsilon }
            }
            OptimizerSpec::Sgd { learning_rate, momentum, nesterov } => {
                Rule::Sgd { lr: learning_rate, momentum, nesterov }
            }
        }
    }
}

/// One step's update rule with its scalars resolved.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Rmsprop { lr: f32, rho: f32, one_minus_rho: f32, eps: f32 },
    Adam { alpha: f32, one_minus_b1: f32, one_minus_b2: f32, eps: f32 },
    Sgd { lr: f32, momentum: f32, nesterov: bool },
}

impl Rule {
    /// Applies the rule elementwise to `w` with gradient `g + l2x2 * w`.
    /// Same formulas and operation order as Keras 3 (`keras/optimizers/*.py`).
    #[inline(always)]
    fn apply(&self, w: &mut [f32], g: &[f32], s1: &mut [f32], s2: &mut [f32], l2x2: f32) {
        if l2x2 != 0.0 {
            self.apply_impl::<true>(w, g, s1, s2, l2x2)
        } else {
            self.apply_impl::<false>(w, g, s1, s2, 0.0)
        }
    }

    #[inline(always)]
    fn apply_impl<const L2: bool>(&self, w: &mut [f32], g: &[f32], s1: &mut [f32], s2: &mut [f32], l2x2: f32) {
        let n = w.len();
        let g = &g[..n];
        match *self {
            Rule::Rmsprop { lr, rho, one_minus_rho, eps } => {
                let v = &mut s1[..n];
                for j in 0..n {
                    let gj = if L2 { g[j] + l2x2 * w[j] } else { g[j] };
                    let vj = flush_velocity(rho * v[j] + one_minus_rho * (gj * gj));
                    v[j] = vj;
                    w[j] -= lr * gj / (vj + eps).sqrt();
                }
            }
            Rule::Adam { alpha, one_minus_b1, one_minus_b2, eps } => {
                let m = &mut s1[..n];
                let v = &mut s2[..n];
                for j in 0..n {
                    let gj = if L2 { g[j] + l2x2 * w[j] } else { g[j] };
                    let mj = m[j] + (gj - m[j]) * one_minus_b1;
                    let vj = v[j] + (gj * gj - v[j]) * one_minus_b2;
                    m[j] = mj;
                    v[j] = vj;
                    w[j] -= mj * alpha / (vj.sqrt() + eps);
                }
            }
            Rule::Sgd { lr, momentum, nesterov } => {
                if momentum == 0.0 {
                    for j in 0..n {
                        let gj = if L2 { g[j] + l2x2 * w[j] } else { g[j] };
                        w[j] -= gj * lr;
                    }
                    return;
                }
                let m = &mut s1[..n];
                for j in 0..n {
                    let gj = if L2 { g[j] + l2x2 * w[j] } else { g[j] };
                    let mj = m[j] * momentum - gj * lr;
                    m[j] = mj;
                    w[j] += if nesterov { mj * momentum - gj * lr } else { mj };
                }
            }
        }
    }

    /// RMSprop's `rho`: with a zero gradient (and no L2 term) its update
    /// leaves `w` as it is (`w -= lr * 0 / ...`) and only does `v *= rho`,
    /// which can be deferred.
    fn deferrable_decay(&self) -> Option<f32> {
        match *self {
            Rule::Rmsprop { rho, .. } => Some(rho),
            _ => None,
        }
    }
}

/// Applies `steps` deferred zero-gradient RMSprop updates to a velocity row:
/// `v *= rho` once per step, flushed as [`flush_velocity`] says, as the
/// plain update would have done it (a single `v * rho.powi(steps)` would
/// round differently).
#[inline(always)]
fn decay(v: &mut [f32], rho: f32, steps: u64) {
    for i in 0..steps {
        if i % 8 == 0 && v.iter().all(|&x| x == 0.0) {
            return;
        }
        for x in v.iter_mut() {
            *x = flush_velocity(*x * rho);
        }
    }
}

/// A velocity below the smallest normal float is stored as 0, as TensorFlow's
/// CPU kernels (which run with subnormals flushed) leave it. Arithmetic on
/// subnormals is slow here (a quarter of the update's time, from the rows that
/// go idle and decay), and it never reaches the weights: the update divides
/// by `sqrt(v + eps)`, and `v + eps` rounds to `eps` for any `v` that small.
#[inline(always)]
fn flush_velocity(v: f32) -> f32 {
    if v < f32::MIN_POSITIVE { 0.0 } else { v }
}

/// What one training step saw, before its update (as Keras reports it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchStats {
    /// Mean loss over the batch plus the L2 penalty.
    pub loss: f32,
    /// Correct predictions: a count for softmax and single-unit sigmoid
    /// heads; for multi-unit sigmoid, the sum over rows of the per-row
    /// fraction of correct units (Keras's `binary_accuracy`).
    pub correct: f64,
}

#[derive(Debug, Clone)]
struct Dense {
    fan_in: usize,
    units: usize,
    activation: Activation,
    /// `[fan_in, units]` stored as column panels (see [`Panel`]).
    kernel: AlignedVec,
    bias: Vec<f32>,
}

impl Dense {
    fn panels(&self) -> impl Iterator<Item = Panel> + use<> {
        panels(self.units)
    }

    /// The kernel as Keras stores it: `[fan_in, units]` row-major.
    fn kernel_compact(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.fan_in * self.units];
        for p in self.panels() {
            for (k, row) in self.kernel[p.range(self.fan_in)].chunks_exact(p.width).enumerate() {
                out[k * self.units + p.c0..][..p.width].copy_from_slice(row);
            }
        }
        out
    }

    /// Sets the kernel from `[fan_in, units]` row-major.
    fn set_kernel(&mut self, kernel: &[f32]) {
        for p in self.panels() {
            for (k, row) in self.kernel[p.range(self.fan_in)].chunks_exact_mut(p.width).enumerate() {
                row.copy_from_slice(&kernel[k * self.units + p.c0..][..p.width]);
            }
        }
    }
}

/// Columns `c0..c0 + width` of a kernel, stored together as `[fan_in, width]`
/// row-major from float `c0 * fan_in` on. Panels are [`TILE`] columns wide
/// (the last one may be narrower): a forward or update pass over one panel
/// reads it front to back, which the hardware prefetchers follow, where the
/// rows of a plain `[fan_in, units]` kernel would be visited a tile at a time
/// with a stride. A panel of a 256-unit layer is 64 floats a row, 256 bytes:
/// whole cache lines.
#[derive(Debug, Clone, Copy)]
struct Panel {
    c0: usize,
    width: usize,
}

impl Panel {
    fn range(&self, fan_in: usize) -> std::ops::Range<usize> {
        self.c0 * fan_in..(self.c0 + self.width) * fan_in
    }
}

fn panels(units: usize) -> impl Iterator<Item = Panel> {
    (0..units).step_by(TILE).map(move |c0| Panel { c0, width: TILE.min(units - c0) })
}

#[derive(Debug, Clone)]
enum Layer {
    Dense(Dense),
    Dropout(f32),
}

/// Rows as (index, value) lists of their nonzeros, cut into blocks of
/// [`K_BLOCK`] columns: block after block, each row's nonzeros among that
/// block's columns, rows in order. The forward walks it in exactly this
/// order, and turning it into columns touches one block's worth at a time.
#[derive(Debug, Clone, Default)]
struct SparseRows {
    rows: usize,
    /// Where (block `b`, row `r`)'s entries start: `ptr[b * rows + r]`; one more at the end.
    ptr: Vec<usize>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

impl SparseRows {
    /// `foreign`: `x` was written by another thread, which will write it
    /// again before the next step (see [`compress_avx2`]).
    fn fill(&mut self, x: &[f32], rows: usize, cols: usize, foreign: bool) {
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

    fn rows(&self) -> usize {
        self.rows
    }

    fn blocks(&self) -> usize {
        (self.ptr.len() - 1).checked_div(self.rows).unwrap_or(0)
    }

    fn nnz(&self) -> usize {
        self.ptr.last().copied().unwrap_or(0)
    }

    /// Every nonzero's column, block after block.
    fn indices(&self) -> &[u32] {
        &self.idx[..self.nnz()]
    }

    /// Row `r`'s nonzeros in block `b`.
    fn segment(&self, b: usize, r: usize) -> (&[u32], &[f32]) {
        let i = b * self.rows + r;
        let (a, e) = (self.ptr[i], self.ptr[i + 1]);
        (&self.idx[a..e], &self.val[a..e])
    }
}

/// Writes the nonzeros of `x[from..]` to `idx`/`val` from `q` on, as
/// (`base` + index in `x`, value); returns the new count. Branch-free: every
/// entry is written, and only a nonzero advances past it.
fn compress(x: &[f32], base: u32, from: usize, idx: &mut [u32], val: &mut [f32], mut q: usize) -> usize {
    for (k, &v) in x.iter().enumerate().skip(from) {
        idx[q] = base + k as u32;
        val[q] = v;
        q += usize::from(v != 0.0);
    }
    q
}

/// For each 8-bit mask, the lanes whose bit is set, in order, then zeros.
#[cfg(target_arch = "x86_64")]
static COMPRESS_LANES: [[u32; 8]; 256] = {
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
fn compress_avx2(x: &[f32], base: u32, idx: &mut [u32], val: &mut [f32], foreign: bool) -> usize {
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
struct SparseCols {
    ptr: Vec<usize>,
    row: Vec<u32>,
    val: Vec<f32>,
    /// Each column's next free entry, while transposing.
    next: Vec<usize>,
}

impl SparseCols {
    fn transpose(&mut self, x: &SparseRows, cols: usize) {
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

    fn col(&self, k: usize) -> (&[u32], &[f32]) {
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
struct Sparse {
    rows: SparseRows,
    cols: SparseCols,
    /// Whether `rows` holds the current input (the forward may have used fewer threads).
    filled: bool,
}

impl Sparse {
    fn fill(&mut self, x: &[f32], rows: usize, cols: usize, foreign: bool) {
        self.rows.fill(x, rows, cols, foreign);
        self.filled = true;
    }
}

/// Buffers reused from step to step. Nothing in them outlives a call, so a
/// clone starts empty rather than copying megabytes.
#[derive(Debug, Default)]
struct Scratch {
    /// Each Dense layer's input, sparse, one copy per thread (see [`Sparse`]).
    sparse: Vec<Vec<Sparse>>,
    /// Output of each layer (for the last Dense: its logits).
    acts: Vec<Vec<f32>>,
    /// Multiplier of each dropout unit (0 or 1/(1-rate)), per layer.
    masks: Vec<Vec<f32>>,
    /// Sum of squares of each kernel panel row, for the L2 penalty.
    row_sq: Vec<f64>,
}

impl Clone for Scratch {
    fn clone(&self) -> Scratch {
        Scratch::default()
    }
}

/// A dense head: the model, its weights, and the thread count its hot loops use.
#[derive(Debug, Clone)]
pub struct Head {
    input_dim: usize,
    spec: Vec<LayerSpec>,
    layers: Vec<Layer>,
    loss: LossKind,
    team: Team,
    scratch: Scratch,
}

impl Head {
    /// Builds the layers with Glorot-uniform kernels and zero biases, drawn
    /// in layer order from a ChaCha8 rng seeded with `seed`.
    pub fn new(input_dim: usize, spec: &[LayerSpec], seed: u64) -> Result<Head, HeadError> {
        let loss = validate(input_dim, spec)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(spec.len());
        let mut fan_in = input_dim;
        for s in spec {
            match *s {
                LayerSpec::Dense { units, activation } => {
                    let limit = (6.0 / (fan_in + units) as f64).sqrt() as f32;
                    let init: Vec<f32> = (0..fan_in * units).map(|_| rng.random_range(-limit..limit)).collect();
                    let kernel = AlignedVec::zeros(fan_in * units);
                    let mut d = Dense { fan_in, units, activation, kernel, bias: vec![0.0; units] };
                    d.set_kernel(&init);
                    layers.push(Layer::Dense(d));
                    fan_in = units;
                }
                LayerSpec::Dropout { rate } => layers.push(Layer::Dropout(rate)),
            }
        }
        let team = Team::new(std::thread::available_parallelism().map_or(1, |n| n.get()));
        Ok(Head { input_dim, spec: spec.to_vec(), layers, loss, team, scratch: Scratch::default() })
    }

    /// Threads for the hot loops (default: the machine's). Results do not depend on it.
    pub fn set_threads(&mut self, threads: usize) {
        if threads.max(1) != self.team.threads() {
            self.team = Team::new(threads);
        }
    }

    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    pub fn output_dim(&self) -> usize {
        self.denses().last().map_or(0, |d| d.units)
    }

    pub fn spec(&self) -> &[LayerSpec] {
        &self.spec
    }

    pub fn loss_kind(&self) -> LossKind {
        self.loss
    }

    /// Trainable parameters (Keras's `count_params`).
    pub fn param_count(&self) -> usize {
        self.denses().map(|d| d.fan_in * d.units + d.bias.len()).sum()
    }

    /// A copy of `(kernel [in, out], bias [out])` of the `i`-th Dense layer.
    pub fn dense_weights(&self, i: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        self.denses().nth(i).map(|d| (d.kernel_compact(), d.bias.clone()))
    }

    /// Sets the `i`-th Dense layer's kernel (`[in, out]` row-major) and
    /// bias, e.g. to start from Keras weights.
    pub fn set_dense_weights(&mut self, i: usize, kernel: &[f32], bias: &[f32]) -> Result<(), HeadError> {
        let d = self.denses_mut().nth(i).ok_or_else(|| HeadError::Shape(format!("no Dense layer {i}")))?;
        if kernel.len() != d.fan_in * d.units || bias.len() != d.units {
            return Err(HeadError::Shape(format!("Dense {i} takes a [{}, {}] kernel", d.fan_in, d.units)));
        }
        d.set_kernel(kernel);
        d.bias.copy_from_slice(bias);
        Ok(())
    }

    /// `l2 * sum(kernel^2)` over every Dense kernel: what Keras adds to the loss.
    pub fn l2_penalty(&self, l2: f32) -> f32 {
        if l2 == 0.0 {
            return 0.0;
        }
        // In Keras's order, `[in, out]` row-major: the f64 sum is the same to the bit.
        let s: f64 =
            self.denses().map(|d| d.kernel_compact().iter().map(|&w| f64::from(w) * f64::from(w)).sum::<f64>()).sum();
        (f64::from(l2) * s) as f32
    }

    fn denses(&self) -> impl Iterator<Item = &Dense> {
        self.layers.iter().filter_map(|l| if let Layer::Dense(d) = l { Some(d) } else { None })
    }

    fn denses_mut(&mut self) -> impl Iterator<Item = &mut Dense> {
        self.layers.iter_mut().filter_map(|l| if let Layer::Dense(d) = l { Some(d) } else { None })
    }

    fn check_shapes(&self, x: &[f32], y: Option<&[f32]>, rows: usize) -> Result<(), HeadError> {
        if x.len() != rows * self.input_dim {
            return Err(HeadError::Shape(format!(
                "x has {} values, expected rows {rows} x input {}",
                x.len(),
                self.input_dim
            )));
        }
        if let Some(y) = y
            && y.len() != rows * self.output_dim()
        {
            return Err(HeadError::Shape(format!(
                "y has {} values, expected rows {rows} x outputs {}",
                y.len(),
                self.output_dim()
            )));
        }
        Ok(())
    }

    /// One optimizer step on a batch: forward with dropout (masks drawn from
    /// `rng`, in layer order, row-major), loss, backward, update. `l2` is
    /// Keras's `kernel_regularizer=l2(l2)` on every Dense kernel.
    pub fn train_batch(
        &mut self,
        x: &[f32],
        y: &[f32],
        rows: usize,
        opt: &mut Optimizer,
        l2: f32,
        rng: &mut impl Rng,
    ) -> Result<BatchStats, HeadError> {
        self.check_shapes(x, Some(y), rows)?;
        if rows == 0 {
            return Err(HeadError::Shape("empty batch".into()));
        }
        let sizes: Vec<(usize, usize)> =
            self.denses().flat_map(|d| [(d.kernel.len(), d.panels().count() * d.fan_in), (d.bias.len(), 0)]).collect();
        opt.ensure_slots(&sizes)?;
        let rule = opt.next_rule();
        let mut scratch = std::mem::take(&mut self.scratch);
        self.forward(x, rows, &mut scratch, Some(rng));
        let last = scratch.acts.last().map(|v| &v[..]).unwrap_or(&[]);
        let (loss_sum, correct, dz) = loss_and_grad(self.loss, last, y, rows, true);
        let mut loss = loss_sum / rows as f64;
        let penalty = self.backward(x, rows, dz, &mut scratch, &rule, opt, l2);
        loss += f64::from(l2) * penalty;
        self.scratch = scratch;
        Ok(BatchStats { loss: loss as f32, correct })
    }

    /// Mean loss (without the L2 penalty: add [`Head::l2_penalty`] for
    /// Keras's `val_loss` of a regularized model) and accuracy, no dropout.
    pub fn evaluate(&mut self, x: &[f32], y: &[f32], rows: usize) -> Result<(f32, f32), HeadError> {
        self.check_shapes(x, Some(y), rows)?;
        if rows == 0 {
            return Ok((0.0, 0.0));
        }
        let (din, dout) = (self.input_dim, self.output_dim());
        let mut scratch = std::mem::take(&mut self.scratch);
        let (mut loss, mut correct) = (0.0, 0.0);
        for r0 in (0..rows).step_by(EVAL_CHUNK) {
            let n = EVAL_CHUNK.min(rows - r0);
            self.forward(&x[r0 * din..(r0 + n) * din], n, &mut scratch, None::<&mut ChaCha8Rng>);
            let last = scratch.acts.last().map(|v| &v[..]).unwrap_or(&[]);
            let (l, c, _) = loss_and_grad(self.loss, last, &y[r0 * dout..(r0 + n) * dout], n, false);
            loss += l;
            correct += c;
        }
        self.scratch = scratch;
        Ok(((loss / rows as f64) as f32, (correct / rows as f64) as f32))
    }

    /// Probabilities, `[rows, outputs]` row-major, no dropout.
    pub fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>, HeadError> {
        self.check_shapes(x, None, rows)?;
        let din = self.input_dim;
        let mut out = Vec::with_capacity(rows * self.output_dim());
        let mut scratch = std::mem::take(&mut self.scratch);
        for r0 in (0..rows).step_by(EVAL_CHUNK) {
            let n = EVAL_CHUNK.min(rows - r0);
            self.forward(&x[r0 * din..(r0 + n) * din], n, &mut scratch, None::<&mut ChaCha8Rng>);
            let last = scratch.acts.last().map(|v| &v[..]).unwrap_or(&[]);
            probabilities(self.loss, last, self.output_dim(), &mut out);
        }
        self.scratch = scratch;
        Ok(out)
    }

    /// Fills `scratch.acts` (and, when training, `scratch.masks`).
    fn forward<R: Rng>(&self, x: &[f32], rows: usize, s: &mut Scratch, mut rng: Option<&mut R>) {
        s.acts.resize_with(self.layers.len(), Vec::new);
        s.masks.resize_with(self.layers.len(), Vec::new);
        s.sparse.resize_with(self.layers.len(), Vec::new);
        let nlayers = self.layers.len();
        for (l, layer) in self.layers.iter().enumerate() {
            let (before, rest) = s.acts.split_at_mut(l);
            let input: &[f32] = if l == 0 { x } else { &before[l - 1] };
            let out = &mut rest[0];
            match layer {
                Layer::Dense(d) => {
                    let training = rng.is_some();
                    dense_forward(input, rows, d, &self.team, &mut s.sparse[l], out, training);
                    if l + 1 != nlayers {
                        activate(d.activation, out);
                    }
                }
                Layer::Dropout(rate) => {
                    out.clear();
                    out.extend_from_slice(input);
                    let Some(rng) = rng.as_deref_mut() else { continue };
                    let mask = &mut s.masks[l];
                    mask.clear();
                    let scale = 1.0 / (1.0 - rate);
                    // Keras keeps a unit when its uniform draw is >= rate.
                    mask.extend((0..input.len()).map(|_| if rng.random::<f32>() >= *rate { scale } else { 0.0 }));
                    for (o, &m) in out.iter_mut().zip(mask.iter()) {
                        *o *= m;
                    }
                }
            }
        }
    }

    /// Backpropagates `dz` (gradient w.r.t. the last logits) and applies
    /// the update layer by layer. Returns `sum(kernel^2)` before the update
    /// (0 when `l2 == 0`).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        x: &[f32],
        rows: usize,
        mut d: Vec<f32>,
        s: &mut Scratch,
        rule: &Rule,
        opt: &mut Optimizer,
        l2: f32,
    ) -> f64 {
        let first_dense = self.layers.iter().position(|l| matches!(l, Layer::Dense(_))).unwrap_or(0);
        let nlayers = self.layers.len();
        let mut slot = 2 * self.denses().count();
        let mut penalty = 0.0;
        for l in (0..nlayers).rev() {
            match &mut self.layers[l] {
                Layer::Dropout(_) => {
                    for (g, &m) in d.iter_mut().zip(&s.masks[l]) {
                        *g *= m;
                    }
                }
                Layer::Dense(dense) => {
                    if l + 1 != nlayers {
                        activation_backward(dense.activation, &s.acts[l], &mut d);
                    }
                    slot -= 2;
                    let d_in = if l > first_dense { input_gradient(&d, rows, dense) } else { Vec::new() };
                    let (ks, bs) = opt.slots.split_at_mut(slot + 1);
                    let kslots = &mut ks[slot];
                    let bslots = &mut bs[0];
                    let step = Step { rule: *rule, t: opt.iterations, lazy: opt.lazy && l2 == 0.0, l2x2: 2.0 * l2 };
                    let input = if l == 0 { x } else { &s.acts[l - 1] };
                    let (team, sparse) = (&self.team, &mut s.sparse[l]);
                    penalty += kernel_update(input, rows, &d, dense, &step, kslots, team, sparse, &mut s.row_sq);
                    bias_update(&d, rows, dense, rule, bslots);
                    d = d_in;
                }
            }
        }
        penalty
    }

    /// Writes the weights as safetensors (`dense_{i}.kernel` `[in, out]`,
    /// `dense_{i}.bias`), with the spec in the metadata so the file alone
    /// rebuilds the head.
    pub fn save_safetensors(&self, path: &Path) -> Result<(), HeadError> {
        let file_err = |m: String| HeadError::File { path: path.display().to_string(), message: m };
        let mut bufs = Vec::new();
        for (i, d) in self.denses().enumerate() {
            bufs.push((format!("dense_{i}.kernel"), vec![d.fan_in, d.units], le_bytes(&d.kernel_compact())));
            bufs.push((format!("dense_{i}.bias"), vec![d.units], le_bytes(&d.bias)));
        }
        let mut views = Vec::new();
        for (name, shape, bytes) in &bufs {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|e| file_err(e.to_string()))?;
            views.push((name.clone(), view));
        }
        let layers = serde_json::to_string(&self.spec).map_err(|e| file_err(e.to_string()))?;
        let meta = HashMap::from([
            ("format".to_string(), "convflow-head".to_string()),
            ("input_dim".to_string(), self.input_dim.to_string()),
            ("layers".to_string(), layers),
        ]);
        safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| file_err(e.to_string()))
    }

    /// Reads a head written by [`Head::save_safetensors`].
    pub fn load_safetensors(path: &Path) -> Result<Head, HeadError> {
        let file_err = |m: String| HeadError::File { path: path.display().to_string(), message: m };
        let bytes = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_err(e.to_string()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| file_err(e.to_string()))?;
        let info = meta.metadata().as_ref().ok_or_else(|| file_err("no metadata: not a convflow head".into()))?;
        let get = |k: &str| info.get(k).ok_or_else(|| file_err(format!("metadata lacks `{k}`")));
        let input_dim: usize = get("input_dim")?.parse().map_err(|_| file_err("bad `input_dim`".into()))?;
        let spec: Vec<LayerSpec> =
            serde_json::from_str(get("layers")?).map_err(|e| file_err(format!("bad `layers`: {e}")))?;
        let mut head = Head::new(input_dim, &spec, 0)?;
        let shapes: Vec<(usize, usize)> = head.denses().map(|d| (d.fan_in, d.units)).collect();
        for (i, &(fan_in, units)) in shapes.iter().enumerate() {
            let read = |name: String, shape: Vec<usize>| -> Result<Vec<f32>, HeadError> {
                let t = st.tensor(&name).map_err(|e| file_err(e.to_string()))?;
                if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
                    return Err(file_err(format!(
                        "{name}: expected F32 {shape:?}, found {:?} {:?}",
                        t.dtype(),
                        t.shape()
                    )));
                }
                Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            };
            let kernel = read(format!("dense_{i}.kernel"), vec![fan_in, units])?;
            let bias = read(format!("dense_{i}.bias"), vec![units])?;
            head.set_dense_weights(i, &kernel, &bias)?;
        }
        Ok(head)
    }
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn validate(input_dim: usize, spec: &[LayerSpec]) -> Result<LossKind, HeadError> {
    let bad = |m: String| Err(HeadError::Spec(m));
    if input_dim == 0 {
        return bad("input_dim must be > 0".into());
    }
    for (i, s) in spec.iter().enumerate() {
        match *s {
            LayerSpec::Dense { units: 0, .. } => return bad(format!("layer {i}: units must be > 0")),
            LayerSpec::Dense { activation: Activation::Softmax, .. } if i + 1 != spec.len() => {
                return bad(format!("layer {i}: softmax is only supported on the last layer"));
            }
            LayerSpec::Dropout { rate } if !(0.0..1.0).contains(&rate) => {
                return bad(format!("layer {i}: dropout rate {rate} is not in [0, 1)"));
            }
            _ => {}
        }
    }
    match spec.last() {
        Some(LayerSpec::Dense { activation: Activation::Sigmoid, .. }) => Ok(LossKind::BinaryCrossentropy),
        Some(LayerSpec::Dense { activation: Activation::Softmax, .. }) => Ok(LossKind::CategoricalCrossentropy),
        _ => bad("the last layer must be Dense with a sigmoid (binary) or softmax (categorical) activation".into()),
    }
}

fn activate(a: Activation, v: &mut [f32]) {
    match a {
        Activation::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        Activation::Sigmoid => v.iter_mut().for_each(|x| *x = sigmoid(*x)),
        Activation::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
        Activation::Linear | Activation::Softmax => {}
    }
}

/// Turns the gradient w.r.t. a layer's output into the gradient w.r.t. its
/// pre-activation, from the output `y` alone.
fn activation_backward(a: Activation, y: &[f32], d: &mut [f32]) {
    for (g, &y) in d.iter_mut().zip(y) {
        *g = match a {
            Activation::Relu => {
                if y > 0.0 {
                    *g
                } else {
                    0.0
                }
            }
            Activation::Sigmoid => *g * (y * (1.0 - y)),
            Activation::Tanh => *g * (1.0 - y * y),
            Activation::Linear | Activation::Softmax => *g,
        };
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

fn probabilities(loss: LossKind, logits: &[f32], c: usize, out: &mut Vec<f32>) {
    match loss {
        LossKind::BinaryCrossentropy => out.extend(logits.iter().map(|&z| sigmoid(z))),
        LossKind::CategoricalCrossentropy => {
            for z in logits.chunks_exact(c) {
                let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let start = out.len();
                out.extend(z.iter().map(|&z| (z - m).exp()));
                let sum: f32 = out[start..].iter().sum();
                out[start..].iter_mut().for_each(|p| *p /= sum);
            }
        }
    }
}

/// Loss summed over rows, correct count, and (when `grad`) the gradient of
/// the batch-mean loss w.r.t. the logits. Both losses are computed from the
/// logits, as TF Keras does when the output layer is a sigmoid or softmax.
fn loss_and_grad(loss: LossKind, logits: &[f32], y: &[f32], rows: usize, grad: bool) -> (f64, f64, Vec<f32>) {
    let c = logits.len() / rows.max(1);
    let mut dz = if grad { vec![0.0; logits.len()] } else { Vec::new() };
    let (mut total, mut correct) = (0.0f64, 0.0f64);
    match loss {
        LossKind::BinaryCrossentropy => {
            let scale = 1.0 / (rows * c) as f32;
            for r in 0..rows {
                let (mut row_loss, mut row_ok) = (0.0f64, 0usize);
                for j in r * c..(r + 1) * c {
                    let (z, t) = (logits[j], y[j]);
                    // max(z, 0) - z*t + log(1 + exp(-|z|)): tf.nn.sigmoid_cross_entropy_with_logits
                    row_loss += f64::from(z.max(0.0) - z * t + (-z.abs()).exp().ln_1p());
                    let p = sigmoid(z);
                    row_ok += usize::from(f32::from(u8::from(p > 0.5)) == t);
                    if grad {
                        dz[j] = (p - t) * scale;
                    }
                }
                total += row_loss / c as f64;
                correct += row_ok as f64 / c as f64;
            }
        }
        LossKind::CategoricalCrossentropy => {
            let scale = 1.0 / rows as f32;
            let mut p = Vec::with_capacity(c);
            for r in 0..rows {
                let (z, t) = (&logits[r * c..(r + 1) * c], &y[r * c..(r + 1) * c]);
                p.clear();
                probabilities(loss, z, c, &mut p);
                let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = m + z.iter().map(|&z| (z - m).exp()).sum::<f32>().ln();
                let tsum: f32 = t.iter().sum();
                total += z.iter().zip(t).map(|(&z, &t)| f64::from(t * (lse - z))).sum::<f64>();
                correct += f64::from(u8::from(argmax(&p) == argmax(t)));
                if grad {
                    for j in 0..c {
                        dz[r * c + j] = (p[j] * tsum - t[j]) * scale;
                    }
                }
            }
        }
    }
    (total, correct, dz)
}

/// Loss summed over rows and correct count of probabilities (not logits),
/// such as the mean of several predictions for one image. As Keras does for
/// probabilities, they are clipped to [1e-7, 1 - 1e-7] before the log.
pub fn score_probabilities(loss: LossKind, p: &[f32], y: &[f32], rows: usize) -> (f64, f64) {
    const EPS: f64 = 1e-7;
    let c = p.len() / rows.max(1);
    let (mut total, mut correct) = (0.0f64, 0.0f64);
    for (p, t) in p.chunks_exact(c).zip(y.chunks_exact(c)) {
        match loss {
            LossKind::BinaryCrossentropy => {
                let (mut row_loss, mut row_ok) = (0.0f64, 0usize);
                for (&p, &t) in p.iter().zip(t) {
                    let (q, t64) = (f64::from(p).clamp(EPS, 1.0 - EPS), f64::from(t));
                    row_loss -= t64 * q.ln() + (1.0 - t64) * (1.0 - q).ln();
                    row_ok += usize::from(f32::from(u8::from(p > 0.5)) == t);
                }
                total += row_loss / c as f64;
                correct += row_ok as f64 / c as f64;
            }
            LossKind::CategoricalCrossentropy => {
                total -= p.iter().zip(t).map(|(&p, &t)| f64::from(t) * f64::from(p).clamp(EPS, 1.0).ln()).sum::<f64>();
                correct += f64::from(u8::from(argmax(p) == argmax(t)));
            }
        }
    }
    (total, correct)
}

/// First index of the maximum, as `argmax` in Keras's `categorical_accuracy`.
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// `out = x * kernel + bias` (`[rows, units]`). Threads take disjoint runs
/// of panels; each makes its own sparse copy of `x` in `sparse`.
/// `training`: `x` is a batch that the caller refills before the next step.
fn dense_forward(
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
fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Asks for the cache lines of `v` ahead of their use; a hint, never a fault.
#[inline(always)]
fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in v.chunks(16) {
        // SAFETY: a prefetch reads nothing architecturally and cannot fault;
        // the address is inside `v` anyway.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr().cast()) };
    }
}

/// Panels `pa..pb` of `x * kernel + bias` into `out`: `[rows, width]`, where
/// `width` is the number of columns of those panels.
fn forward_panels(x: &SparseRows, d: &Dense, pa: usize, pb: usize, out: &mut [f32]) {
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
fn forward_panels_avx2(x: &SparseRows, d: &Dense, pa: usize, pb: usize, out: &mut [f32]) {
    forward_panels_impl(x, d, pa, pb, out);
}

#[inline(always)]
fn forward_panels_impl(x: &SparseRows, d: &Dense, pa: usize, pb: usize, out: &mut [f32]) {
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
fn input_gradient(dz: &[f32], rows: usize, d: &Dense) -> Vec<f32> {
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
fn bias_update(dz: &[f32], rows: usize, d: &mut Dense, rule: &Rule, slots: &mut Slots) {
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
struct Step {
    rule: Rule,
    /// This step's number (`Optimizer::iterations`, counting it).
    t: u64,
    /// Whether rows with a zero gradient may be left for later (see [`Slots::stamps`]).
    lazy: bool,
    /// Twice the L2 factor: the penalty's gradient is `l2x2 * w`.
    l2x2: f32,
}

/// Computes each kernel row's gradient `x[:, k]^T dz` (skipping zeros) and
/// applies the update to it in the same pass, panel by panel, so the kernel
/// and its slots are read and written once, in order. Threads take disjoint
/// runs of panel rows. Returns `sum(kernel^2)` before the update when `l2 > 0`.
#[allow(clippy::too_many_arguments)]
fn kernel_update(
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
fn split_slot<T>(s: &mut [T], at: usize) -> (&mut [T], &mut [T]) {
    if s.is_empty() { (&mut [], &mut []) } else { s.split_at_mut(at) }
}

/// `sum over (r, v) of v * dz[r * n..][..TILE]`, rows in order, each term
/// with one rounding (`mul_add`): one kernel panel row's gradient.
#[inline(always)]
fn gradient_tile(rows: &[u32], vals: &[f32], dz: &[f32], n: usize) -> [f32; TILE] {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU just above.
        return unsafe { gradient_tile_avx2(rows, vals, dz, n) };
    }
    gradient_tile_portable(rows, vals, dz, n)
}

#[inline(always)]
fn gradient_tile_portable(rows: &[u32], vals: &[f32], dz: &[f32], n: usize) -> [f32; TILE] {
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
fn gradient_tile_avx2(rows: &[u32], vals: &[f32], dz: &[f32], n: usize) -> [f32; TILE] {
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
struct KernelJob<'a> {
    dz: &'a [f32],
    fan_in: usize,
    n: usize,
    step: Step,
}

/// One thread's share of the kernel update: panel rows `i0..i0 + stamps.len()`
/// and the slices of the kernel, the optimizer slots, the rows' update stamps
/// and (with L2) their squared norms, each starting at row `i0`.
struct KernelPart<'a> {
    i0: usize,
    w: &'a mut [f32],
    s1: &'a mut [f32],
    s2: &'a mut [f32],
    stamps: &'a mut [u64],
    sq: &'a mut [f64],
}

impl KernelJob<'_> {
    /// Updates `part`, whose inputs are the columns of `x`.
    fn run(&self, x: &SparseCols, part: KernelPart<'_>) {
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
    fn run_avx2(&self, x: &SparseCols, part: KernelPart<'_>) {
        self.run_impl(x, part);
    }

    #[inline(always)]
    fn run_impl(&self, x: &SparseCols, part: KernelPart<'_>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// ReLU-like data: about `zeros` of the entries exactly 0.
    fn sparse_data(rows: usize, cols: usize, zeros: f32, seed: u64) -> Vec<f32> {
        let mut r = rng(seed);
        (0..rows * cols).map(|_| if r.random::<f32>() < zeros { 0.0 } else { r.random_range(0.0..2.0) }).collect()
    }

    fn dense(units: usize, activation: Activation) -> LayerSpec {
        LayerSpec::Dense { units, activation }
    }

    fn params(h: &Head) -> Vec<Vec<f32>> {
        h.denses().flat_map(|d| [d.kernel_compact(), d.bias.clone()]).collect()
    }

    /// The loss in f64 from plain loops: the reference for the gradient checks.
    fn reference_loss(h: &Head, p: &[Vec<f64>], x: &[f32], y: &[f32], rows: usize, l2: f64, masks: &[Vec<f32>]) -> f64 {
        let mut a: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let mut width = h.input_dim;
        let mut di = 0;
        let nl = h.layers.len();
        let mut penalty = 0.0;
        for (l, layer) in h.layers.iter().enumerate() {
            match layer {
                Layer::Dense(d) => {
                    let (w, b) = (&p[2 * di], &p[2 * di + 1]);
                    di += 1;
                    penalty += w.iter().map(|v| v * v).sum::<f64>();
                    let mut z = vec![0.0; rows * d.units];
                    for r in 0..rows {
                        for j in 0..d.units {
                            let mut s = b[j];
                            for k in 0..width {
                                s += a[r * width + k] * w[k * d.units + j];
                            }
                            z[r * d.units + j] = if l + 1 == nl {
                                s
                            } else {
                                match d.activation {
                                    Activation::Relu => s.max(0.0),
                                    Activation::Sigmoid => 1.0 / (1.0 + (-s).exp()),
                                    Activation::Tanh => s.tanh(),
                                    Activation::Linear | Activation::Softmax => s,
                                }
                            };
                        }
                    }
                    a = z;
                    width = d.units;
                }
                Layer::Dropout(_) => {
                    for (v, &m) in a.iter_mut().zip(&masks[l]) {
                        *v *= f64::from(m);
                    }
                }
            }
        }
        let c = width;
        let mut total = 0.0;
        for r in 0..rows {
            let z = &a[r * c..(r + 1) * c];
            let t: Vec<f64> = y[r * c..(r + 1) * c].iter().map(|&v| f64::from(v)).collect();
            total += match h.loss {
                LossKind::BinaryCrossentropy => {
                    z.iter()
                        .zip(&t)
                        .map(|(&z, &t)| {
                            let p = 1.0 / (1.0 + (-z).exp());
                            -(t * p.ln() + (1.0 - t) * (1.0 - p).ln())
                        })
                        .sum::<f64>()
                        / c as f64
                }
                LossKind::CategoricalCrossentropy => {
                    let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
                    z.iter().zip(&t).map(|(&z, &t)| t * (lse - z)).sum::<f64>()
                }
            };
        }
        total / rows as f64 + l2 * penalty
    }

    /// One SGD(lr=1) step gives the analytic gradient as `w_before - w_after`;
    /// compares it with central differences of the f64 reference loss.
    fn gradient_check(spec: &[LayerSpec], l2: f32) {
        let (din, rows) = (7, 5);
        let mut head = Head::new(din, spec, 3).unwrap();
        head.set_threads(1);
        let before = head.clone();
        let x = sparse_data(rows, din, 0.4, 11);
        let c = head.output_dim();
        let mut y = vec![0.0f32; rows * c];
        for r in 0..rows {
            if head.loss == LossKind::CategoricalCrossentropy {
                y[r * c + r % c] = 1.0;
            } else {
                for j in 0..c {
                    y[r * c + j] = ((r + j) % 2) as f32;
                }
            }
        }
        let mut opt = Optimizer::new(OptimizerSpec::sgd(1.0, 0.0, false));
        let stats = head.train_batch(&x, &y, rows, &mut opt, l2, &mut rng(5)).unwrap();
        let masks = head.scratch.masks.clone();
        let p0: Vec<Vec<f64>> = params(&before).iter().map(|v| v.iter().map(|&w| f64::from(w)).collect()).collect();
        let l0 = reference_loss(&before, &p0, &x, &y, rows, f64::from(l2), &masks);
        assert!((f64::from(stats.loss) - l0).abs() < 1e-5 * l0.max(1.0), "loss {} vs reference {l0}", stats.loss);
        let after = params(&head);
        let eps = 1e-6;
        for (t, tensor) in p0.iter().enumerate() {
            for i in 0..tensor.len() {
                let mut p = p0.clone();
                p[t][i] += eps;
                let up = reference_loss(&before, &p, &x, &y, rows, f64::from(l2), &masks);
                p[t][i] -= 2.0 * eps;
                let down = reference_loss(&before, &p, &x, &y, rows, f64::from(l2), &masks);
                let numeric = (up - down) / (2.0 * eps);
                let analytic = f64::from(params(&before)[t][i] - after[t][i]);
                assert!(
                    (analytic - numeric).abs() <= 2e-6 + 1e-3 * numeric.abs(),
                    "{spec:?} tensor {t} index {i}: analytic {analytic}, numeric {numeric}"
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences_for_each_activation() {
        for act in [Activation::Relu, Activation::Sigmoid, Activation::Tanh, Activation::Linear] {
            gradient_check(&[dense(6, act), dense(1, Activation::Sigmoid)], 0.0);
            gradient_check(&[dense(6, act), dense(4, act), dense(3, Activation::Softmax)], 0.0);
        }
    }

    #[test]
    fn gradients_match_with_dropout_l2_and_multi_unit_sigmoid() {
        let spec = [dense(6, Activation::Relu), LayerSpec::Dropout { rate: 0.5 }, dense(1, Activation::Sigmoid)];
        gradient_check(&spec, 0.0);
        gradient_check(&spec, 0.01);
        let spec = [LayerSpec::Dropout { rate: 0.3 }, dense(8, Activation::Tanh), dense(2, Activation::Sigmoid)];
        gradient_check(&spec, 0.05);
        gradient_check(&[dense(3, Activation::Softmax)], 0.02);
    }

    #[test]
    fn dropout_keeps_one_minus_rate_scaled_and_is_identity_at_inference() {
        let mut head = Head::new(4, &[LayerSpec::Dropout { rate: 0.25 }, dense(1, Activation::Sigmoid)], 0).unwrap();
        let x = vec![1.0f32; 1000 * 4];
        let mut s = Scratch::default();
        head.forward(&x, 1000, &mut s, Some(&mut rng(1)));
        let kept = s.acts[0].iter().filter(|&&v| v != 0.0).count() as f64 / 4000.0;
        assert!((kept - 0.75).abs() < 0.03, "kept {kept}");
        assert!(s.acts[0].iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        head.forward(&x, 1000, &mut s, None::<&mut ChaCha8Rng>);
        assert!(s.acts[0].iter().all(|&v| v == 1.0));
        assert_eq!(head.predict(&x[..8], 2).unwrap().len(), 2);
    }

    #[test]
    fn losses_are_stable_for_large_logits() {
        let (l, c, dz) = loss_and_grad(LossKind::BinaryCrossentropy, &[100.0, -100.0, 0.0], &[0.0, 0.0, 1.0], 3, true);
        assert!((l - (100.0 + 0.0 + std::f64::consts::LN_2)).abs() < 1e-4, "{l}");
        assert_eq!(c, 1.0, "rows 0 and 2 are wrong: p = 0.5 is not > 0.5");
        assert!(dz.iter().all(|g| g.is_finite()));
        let (l, c, _) =
            loss_and_grad(LossKind::CategoricalCrossentropy, &[1000.0, 0.0, -1000.0], &[0.0, 1.0, 0.0], 1, true);
        assert!((l - 1000.0).abs() < 1e-3, "{l}");
        assert_eq!(c, 0.0);
    }

    #[test]
    fn scores_of_probabilities_agree_with_those_of_logits() {
        for (kind, logits, y) in [
            (LossKind::BinaryCrossentropy, vec![2.0, -1.0, 0.3, -0.2], vec![1.0, 1.0, 0.0, 0.0]),
            (
                LossKind::CategoricalCrossentropy,
                vec![2.0, -1.0, 0.5, 0.1, 0.2, -3.0],
                vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            ),
        ] {
            let rows = if kind == LossKind::BinaryCrossentropy { 4 } else { 2 };
            let mut p = Vec::new();
            probabilities(kind, &logits, logits.len() / rows, &mut p);
            let (l, c, _) = loss_and_grad(kind, &logits, &y, rows, false);
            let (lp, cp) = score_probabilities(kind, &p, &y, rows);
            assert!((l - lp).abs() < 1e-5, "{kind:?}: {l} vs {lp}");
            assert_eq!(c, cp, "{kind:?}");
        }
        let (l, c) = score_probabilities(LossKind::BinaryCrossentropy, &[1.0, 0.5], &[0.0, 1.0], 2);
        assert!((l - (-(1e-7f64).ln() + std::f64::consts::LN_2)).abs() < 1e-6, "clipped, not infinite: {l}");
        assert_eq!(c, 0.0, "p = 0.5 is not > 0.5");
    }

    fn one_param_steps(spec: OptimizerSpec, grads: &[f32]) -> Vec<f32> {
        let mut opt = Optimizer::new(spec);
        opt.ensure_slots(&[(1, 0)]).unwrap();
        let mut w = [1.0f32];
        let mut out = Vec::new();
        for &g in grads {
            let rule = opt.next_rule();
            let s = &mut opt.slots[0];
            rule.apply(&mut w, &[g], &mut s.s1, &mut s.s2, 0.0);
            out.push(w[0]);
        }
        out
    }

    #[test]
    fn optimizer_steps_match_hand_computed_keras_updates() {
        let close = |a: f32, b: f64| assert!((f64::from(a) - b).abs() < 1e-6, "{a} vs {b}");
        // v = 0.1 * 0.25; w = 1 - 0.1 * 0.5 / sqrt(v + 1e-7)
        close(one_param_steps(OptimizerSpec::rmsprop(0.1), &[0.5])[0], 0.683_772_866_436_796_7);
        // Bias-corrected: alpha = lr * sqrt(1 - 0.999^t) / (1 - 0.9^t).
        let w = one_param_steps(OptimizerSpec::adam(0.1), &[0.5, -0.25]);
        close(w[0], 0.900_000_632_451_532);
        close(w[1], 0.873_367_079_207_921_8);
        // m = 0.9 m - 0.1 g; w += m
        let w = one_param_steps(OptimizerSpec::sgd(0.1, 0.9, false), &[0.5, 0.5]);
        close(w[0], 0.95);
        close(w[1], 0.855);
        // w += 0.9 m - 0.1 g with the new m
        let w = one_param_steps(OptimizerSpec::sgd(0.1, 0.9, true), &[0.5, 0.5]);
        close(w[0], 0.905);
        close(w[1], 0.7695);
        close(one_param_steps(OptimizerSpec::sgd(0.1, 0.0, false), &[0.5])[0], 0.95);
    }

    #[test]
    fn sparse_rows_keep_every_nonzero_in_order_on_each_code_path() {
        let cols = 2 * K_BLOCK + 19;
        let mut x = sparse_data(3, cols, 0.7, 4);
        x[5] = -0.0;
        x[6] = f32::NAN;
        x[cols + 17] = f32::NEG_INFINITY;
        let bits = |idx: &[u32], val: &[f32]| -> Vec<(u32, u32)> {
            idx.iter().zip(val).map(|(&k, v)| (k, v.to_bits())).collect()
        };
        let mut s = SparseRows::default();
        s.fill(&x, 3, cols, true);
        assert_eq!((s.rows(), s.blocks()), (3, 3));
        let mut t = SparseCols::default();
        t.transpose(&s, cols);
        for r in 0..3 {
            let row = &x[r * cols..(r + 1) * cols];
            let want: Vec<(u32, u32)> =
                (0..cols).filter(|&k| row[k] != 0.0).map(|k| (k as u32, row[k].to_bits())).collect();
            let got: Vec<(u32, u32)> = (0..3).flat_map(|b| bits(s.segment(b, r).0, s.segment(b, r).1)).collect();
            assert_eq!(got, want, "row {r}, fill");
            let (mut idx, mut val) = (vec![0; cols], vec![0.0; cols]);
            let n = compress(row, 0, 0, &mut idx, &mut val, 0);
            assert_eq!(bits(&idx[..n], &val[..n]), want, "row {r}, portable");
        }
        for k in 0..cols {
            let want: Vec<(u32, u32)> =
                (0..3).filter(|&r| x[r * cols + k] != 0.0).map(|r| (r as u32, x[r * cols + k].to_bits())).collect();
            let (rows, vals) = t.col(k);
            assert_eq!(bits(rows, vals), want, "column {k}");
        }
    }

    #[test]
    fn gradient_tile_is_the_same_on_each_code_path() {
        let (rows, n) = (9, 3 * TILE);
        let dz = sparse_data(rows, n, 0.3, 8).iter().map(|v| v - 1.0).collect::<Vec<f32>>();
        let r: Vec<u32> = vec![0, 2, 3, 7, 8];
        let v: Vec<f32> = vec![0.5, 1e-3, 3.0, -2.0, 7.5];
        let bits = |g: [f32; TILE]| g.map(f32::to_bits);
        for c0 in [0, TILE, 2 * TILE] {
            let want = gradient_tile_portable(&r, &v, &dz[c0..], n);
            assert_eq!(bits(gradient_tile(&r, &v, &dz[c0..], n)), bits(want));
            let manual: Vec<f32> = (0..TILE)
                .map(|j| r.iter().zip(&v).fold(0.0f32, |a, (&r, &v)| v.mul_add(dz[r as usize * n + c0 + j], a)))
                .collect();
            assert_eq!(want.to_vec(), manual);
        }
    }

    #[test]
    fn rmsprop_zero_gradient_only_decays_the_velocity() {
        let rule = Rule::Rmsprop { lr: 0.01, rho: 0.9, one_minus_rho: 1.0 - 0.9, eps: 1e-7 };
        let mut w = [0.3f32, -0.7, 0.0];
        let mut v = [0.2f32, 1e-9, 0.0];
        let (w2, mut v2) = (w, v);
        for _ in 0..3 {
            rule.apply(&mut w, &[0.0; 3], &mut v, &mut [], 0.0);
        }
        decay(&mut v2, 0.9, 3);
        assert_eq!((w, v), (w2, v2));
        // Below the smallest normal float a velocity is 0, however it got there.
        let mut v = [1.5e-38f32, 1.2e-38, 3.0];
        rule.apply(&mut [0.0; 3], &[0.0, 1e-30, 0.0], &mut v, &mut [], 0.0);
        assert_eq!(v, [1.5e-38f32 * 0.9, 0.0, 3.0f32 * 0.9]);
        decay(&mut v, 0.9, 2);
        assert_eq!(v, [0.0, 0.0, 3.0f32 * 0.9 * 0.9 * 0.9]);
    }

    /// Applies every deferred decay, so the slots read as the plain update leaves them.
    fn settle(head: &Head, opt: &mut Optimizer) {
        let OptimizerSpec::Rmsprop { rho, .. } = opt.spec else { return };
        let t = opt.iterations;
        for (d, slots) in head.denses().zip(opt.slots.iter_mut().step_by(2)) {
            let mut off = 0;
            for (i, stamp) in slots.stamps.iter_mut().enumerate() {
                let tw = TILE.min(d.units - i / d.fan_in * TILE);
                decay(&mut slots.s1[off..off + tw], rho, t - *stamp);
                *stamp = t;
                off += tw;
            }
        }
    }

    #[test]
    fn deferred_rmsprop_decay_matches_the_plain_update() {
        let (din, rows) = (1000, 4);
        let layers = [dense(70, Activation::Relu), LayerSpec::Dropout { rate: 0.5 }, dense(1, Activation::Sigmoid)];
        let run = |lazy: bool, threads: usize| {
            let mut head = Head::new(din, &layers, 5).unwrap();
            head.set_threads(threads);
            let mut opt = Optimizer::new(OptimizerSpec::rmsprop(1e-2));
            opt.lazy = lazy;
            for step in 0..12 {
                let x = sparse_data(rows, din, 0.7, 200 + step);
                let y: Vec<f32> = (0..rows).map(|r| ((r + step as usize) % 2) as f32).collect();
                // A step with an L2 term has a gradient everywhere: it settles every row.
                let l2 = if step == 7 { 1e-3 } else { 0.0 };
                head.train_batch(&x, &y, rows, &mut opt, l2, &mut rng(step)).unwrap();
            }
            let behind = opt.slots[0].stamps.iter().filter(|&&s| s < opt.iterations).count();
            settle(&head, &mut opt);
            (params(&head), opt.slots.iter().map(|s| s.s1.to_vec()).collect::<Vec<_>>(), behind)
        };
        let (p, v, behind) = run(false, 1);
        assert_eq!(behind, 0);
        for threads in [1, 3] {
            let (lp, lv, behind) = run(true, threads);
            assert!(behind > 100, "rows with all-zero input columns were deferred: {behind}");
            assert!(lp == p && lv == v, "{threads} threads: deferred decay differs from the plain update");
        }
    }

    fn train_steps(threads: usize, spec: OptimizerSpec, l2: f32) -> Head {
        let (din, rows) = (2000, 24);
        let layers = [dense(130, Activation::Relu), LayerSpec::Dropout { rate: 0.5 }, dense(3, Activation::Softmax)];
        let mut head = Head::new(din, &layers, 42).unwrap();
        head.set_threads(threads);
        let mut opt = Optimizer::new(spec);
        let mut y = vec![0.0f32; rows * 3];
        for r in 0..rows {
            y[r * 3 + r % 3] = 1.0;
        }
        for step in 0..3 {
            let x = sparse_data(rows, din, 0.7, 100 + step);
            head.train_batch(&x, &y, rows, &mut opt, l2, &mut rng(step)).unwrap();
        }
        head
    }

    #[test]
    fn results_are_bit_identical_for_any_thread_count() {
        for (spec, l2) in [
            (OptimizerSpec::rmsprop(1e-3), 0.0),
            (OptimizerSpec::adam(1e-3), 1e-3),
            (OptimizerSpec::sgd(0.01, 0.9, true), 0.0),
        ] {
            let one = params(&train_steps(1, spec, l2));
            assert_eq!(one, params(&train_steps(1, spec, l2)), "same seed, same threads");
            for t in [2, 3, 5] {
                assert!(one == params(&train_steps(t, spec, l2)), "{spec:?}: {t} threads differ from 1");
            }
        }
        let x = sparse_data(250, 2000, 0.7, 9);
        let (mut a, mut b) =
            (train_steps(1, OptimizerSpec::rmsprop(1e-3), 0.0), train_steps(4, OptimizerSpec::rmsprop(1e-3), 0.0));
        a.set_threads(1);
        b.set_threads(4);
        assert_eq!(a.predict(&x, 250).unwrap(), b.predict(&x, 250).unwrap());
    }

    #[test]
    fn learns_a_separable_problem() {
        let (din, rows) = (40, 400);
        let x = sparse_data(rows, din, 0.6, 1);
        let dir: Vec<f32> = (0..din).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let score = |r: usize| x[r * din..(r + 1) * din].iter().zip(&dir).map(|(a, b)| a * b).sum::<f32>();
        let y: Vec<f32> = (0..rows).map(|r| f32::from(u8::from(score(r) > 0.0))).collect();
        let mut head = Head::new(
            din,
            &[dense(16, Activation::Relu), LayerSpec::Dropout { rate: 0.2 }, dense(1, Activation::Sigmoid)],
            7,
        )
        .unwrap();
        let mut opt = Optimizer::new(OptimizerSpec::adam(1e-2));
        let mut r = rng(3);
        for _ in 0..40 {
            for b in 0..rows / 20 {
                let (xs, ys) = (&x[b * 20 * din..(b + 1) * 20 * din], &y[b * 20..(b + 1) * 20]);
                head.train_batch(xs, ys, 20, &mut opt, 0.0, &mut r).unwrap();
            }
        }
        let (loss, acc) = head.evaluate(&x, &y, rows).unwrap();
        assert!(acc > 0.95, "accuracy {acc}, loss {loss}");

        // Three classes by which third of the features carries the most mass.
        let y3: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let row = &x[r * din..(r + 1) * din];
                let sums: Vec<f32> = (0..3).map(|c| row[c * 13..(c + 1) * 13].iter().sum()).collect();
                let best = argmax(&sums);
                (0..3).map(move |c| f32::from(u8::from(c == best)))
            })
            .collect();
        let mut head = Head::new(din, &[dense(32, Activation::Relu), dense(3, Activation::Softmax)], 8).unwrap();
        let mut opt = Optimizer::new(OptimizerSpec::rmsprop(3e-3));
        for _ in 0..60 {
            for b in 0..rows / 20 {
                let (xs, ys) = (&x[b * 20 * din..(b + 1) * 20 * din], &y3[b * 60..(b + 1) * 60]);
                head.train_batch(xs, ys, 20, &mut opt, 0.0, &mut r).unwrap();
            }
        }
        let (_, acc) = head.evaluate(&x, &y3, rows).unwrap();
        assert!(acc > 0.95, "categorical accuracy {acc}");
        let p = head.predict(&x, rows).unwrap();
        assert!(p.chunks(3).all(|p| (p.iter().sum::<f32>() - 1.0).abs() < 1e-5));
    }

    #[test]
    fn book_head_shape_and_glorot_init() {
        let head = Head::new(BOOK_INPUT_DIM, &LayerSpec::book(), 0).unwrap();
        assert_eq!(head.param_count(), 8192 * 256 + 256 + 256 + 1, "Keras's summary: 2,097,665");
        assert_eq!(head.loss_kind(), LossKind::BinaryCrossentropy);
        let (k, b) = head.dense_weights(0).unwrap();
        let limit = (6.0f32 / (8192.0 + 256.0)).sqrt();
        assert!(k.iter().all(|w| w.abs() <= limit) && b.iter().all(|&b| b == 0.0));
        let mean = k.iter().map(|&w| f64::from(w)).sum::<f64>() / k.len() as f64;
        let var = k.iter().map(|&w| f64::from(w) * f64::from(w)).sum::<f64>() / k.len() as f64;
        assert!(mean.abs() < 1e-4 && (var - f64::from(limit * limit) / 3.0).abs() < 1e-6, "{mean} {var}");
        assert_eq!(
            Head::new(BOOK_INPUT_DIM, &LayerSpec::book_categorical(5), 0).unwrap().loss_kind(),
            LossKind::CategoricalCrossentropy
        );
    }

    #[test]
    fn bad_specs_and_shapes_are_refused() {
        let relu = dense(4, Activation::Relu);
        assert!(Head::new(3, &[dense(3, Activation::Softmax), dense(1, Activation::Sigmoid)], 0).is_err());
        assert!(Head::new(3, &[relu, LayerSpec::Dropout { rate: 1.0 }, dense(1, Activation::Sigmoid)], 0).is_err());
        assert!(Head::new(3, &[relu], 0).is_err());
        assert!(Head::new(3, &[dense(1, Activation::Sigmoid), LayerSpec::Dropout { rate: 0.1 }], 0).is_err());
        assert!(Head::new(0, &LayerSpec::book(), 0).is_err());
        let mut head = Head::new(3, &[relu, dense(1, Activation::Sigmoid)], 0).unwrap();
        let mut opt = Optimizer::new(OptimizerSpec::adam(1e-3));
        assert!(head.train_batch(&[0.0; 5], &[0.0], 1, &mut opt, 0.0, &mut rng(0)).is_err());
        assert!(head.train_batch(&[0.0; 3], &[0.0, 1.0], 1, &mut opt, 0.0, &mut rng(0)).is_err());
        head.train_batch(&[1.0; 3], &[1.0], 1, &mut opt, 0.0, &mut rng(0)).unwrap();
        let mut other = Head::new(5, &[relu, dense(1, Activation::Sigmoid)], 0).unwrap();
        assert!(other.train_batch(&[1.0; 5], &[1.0], 1, &mut opt, 0.0, &mut rng(0)).is_err(), "slots of another shape");
    }

    #[test]
    fn specs_deserialize_with_keras_defaults() {
        let o: OptimizerSpec = serde_json::from_str(r#"{"name": "rmsprop", "lr": 2e-5}"#).unwrap();
        assert_eq!(o, OptimizerSpec::Rmsprop { learning_rate: 2e-5, rho: 0.9, epsilon: 1e-7 });
        let o: OptimizerSpec = serde_json::from_str(r#"{"name": "adam"}"#).unwrap();
        assert_eq!(o, OptimizerSpec::adam(1e-3));
        let o: OptimizerSpec = serde_json::from_str(r#"{"name": "sgd", "momentum": 0.9, "nesterov": true}"#).unwrap();
        assert_eq!(o, OptimizerSpec::sgd(0.01, 0.9, true));
        assert!(serde_json::from_str::<OptimizerSpec>(r#"{"name": "adam", "beta1": 0.5}"#).is_err());
        let l: Vec<LayerSpec> = serde_json::from_str(
            r#"[{"kind": "dense", "units": 256, "activation": "relu"}, {"kind": "dropout", "rate": 0.5},
                {"kind": "dense", "units": 1, "activation": "sigmoid"}]"#,
        )
        .unwrap();
        assert_eq!(l, LayerSpec::book());
        assert!(serde_json::from_str::<LayerSpec>(r#"{"kind": "dropout", "rate": 0.5, "seed": 1}"#).is_err());
    }

    #[test]
    fn safetensors_round_trip_rebuilds_the_head_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.safetensors");
        let mut head = train_steps(2, OptimizerSpec::adam(1e-3), 0.0);
        head.save_safetensors(&path).unwrap();
        let mut back = Head::load_safetensors(&path).unwrap();
        assert_eq!(back.spec(), head.spec());
        assert_eq!(params(&back), params(&head));
        let x = sparse_data(3, 2000, 0.7, 1);
        assert_eq!(back.predict(&x, 3).unwrap(), head.predict(&x, 3).unwrap());
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("dense_0.kernel").unwrap().shape(), &[2000, 130]);
        assert_eq!(st.tensor("dense_1.bias").unwrap().shape(), &[3]);
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(Head::load_safetensors(&path).is_err());
    }
}
