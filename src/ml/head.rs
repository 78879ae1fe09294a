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
//! # Determinism
//!
//! Work is split over threads by disjoint output columns (forward) and
//! kernel rows (backward); every output element is summed by one thread in a
//! fixed order, so results are bit-identical for a seed and any thread
//! count. The sums use `mul_add` (one rounding), which the AVX2+FMA path
//! does in hardware and the portable path in software: both agree bit for
//! bit, the portable one is just slow.

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The book's input: VGG16's 4x4x512 `block5_pool`, flattened NHWC.
pub const BOOK_INPUT_DIM: usize = 4 * 4 * 512;

/// Columns of one register tile in the hot loops: 8 AVX2 registers.
const TILE: usize = 64;

/// Kernel rows per forward block: 256 x 64 floats is 64 KiB, in L2.
const K_BLOCK: usize = 64;

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
    /// Per parameter tensor (kernel, bias of each Dense in order): the first
    /// and second slot (RMSprop: velocity; Adam: m, v; SGD: momentum).
    slots: Vec<(AlignedVec, AlignedVec)>,
}

impl Optimizer {
    pub fn new(spec: OptimizerSpec) -> Optimizer {
        Optimizer { spec, iterations: 0, slots: Vec::new() }
    }

    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// Steps taken so far (Keras's `optimizer.iterations`).
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    fn ensure_slots(&mut self, sizes: &[usize]) -> Result<(), HeadError> {
        if self.slots.is_empty() {
            let two = matches!(self.spec, OptimizerSpec::Adam { .. });
            self.slots =
                sizes.iter().map(|&n| (AlignedVec::zeros(n), AlignedVec::zeros(if two { n } else { 0 }))).collect();
            return Ok(());
        }
        if self.slots.len() != sizes.len() || self.slots.iter().zip(sizes).any(|(s, &n)| s.0.len() != n) {
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
                    let vj = rho * v[j] + one_minus_rho * (gj * gj);
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

    /// The update for a zero gradient when it leaves `w` as it is (RMSprop:
    /// `v = rho * v`, `w -= 0`), done without the square root and division.
    /// Bit-identical to `apply` with `g = 0`.
    #[inline(always)]
    fn apply_zero(&self, s1: &mut [f32]) -> bool {
        match *self {
            Rule::Rmsprop { rho, .. } => {
                for v in s1.iter_mut() {
                    *v *= rho;
                }
                true
            }
            _ => false,
        }
    }
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
    /// `[fan_in, units]` row-major as Keras stores it, but with rows `ld`
    /// floats apart (see [`row_stride`]); the padding stays 0.
    kernel: AlignedVec,
    ld: usize,
    bias: Vec<f32>,
}

impl Dense {
    /// The kernel without row padding: `[fan_in, units]`.
    fn kernel_compact(&self) -> Vec<f32> {
        self.kernel.chunks_exact(self.ld).flat_map(|r| &r[..self.units]).copied().collect()
    }
}

/// Kernel row stride: whole cache lines, and never a multiple of 512 bytes,
/// whose rows would all fall in a few cache sets (a 1 KiB stride leaves the
/// forward loop a quarter of L1).
fn row_stride(units: usize) -> usize {
    if units < 16 {
        return units;
    }
    let ld = units.next_multiple_of(16);
    if ld.is_multiple_of(128) { ld + 16 } else { ld }
}

#[derive(Debug, Clone)]
enum Layer {
    Dense(Dense),
    Dropout(f32),
}

/// Rows as (index, value) lists of their nonzeros.
#[derive(Debug, Clone, Default)]
struct SparseRows {
    ptr: Vec<usize>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

impl SparseRows {
    fn fill(&mut self, x: &[f32], rows: usize, cols: usize) {
        self.ptr.clear();
        self.ptr.push(0);
        self.idx.clear();
        self.val.clear();
        // Branch-free compaction: write every entry, advance past nonzeros only.
        let mut p = 0;
        for r in 0..rows {
            self.idx.resize(p + cols, 0);
            self.val.resize(p + cols, 0.0);
            let (idx, val) = (&mut self.idx[p..p + cols], &mut self.val[p..p + cols]);
            let mut q = 0;
            for (k, &v) in x[r * cols..(r + 1) * cols].iter().enumerate() {
                idx[q] = k as u32;
                val[q] = v;
                q += usize::from(v != 0.0);
            }
            p += q;
            self.idx.truncate(p);
            self.val.truncate(p);
            self.ptr.push(p);
        }
    }

    fn rows(&self) -> usize {
        self.ptr.len() - 1
    }

    fn nnz(&self) -> usize {
        self.val.len()
    }

    fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.ptr[r], self.ptr[r + 1]);
        (&self.idx[a..b], &self.val[a..b])
    }
}

/// The same nonzeros by column: each column's (row, value) list, rows ascending.
#[derive(Debug, Clone, Default)]
struct SparseCols {
    ptr: Vec<usize>,
    row: Vec<u32>,
    val: Vec<f32>,
}

impl SparseCols {
    fn transpose(&mut self, x: &SparseRows, cols: usize) {
        self.ptr.clear();
        self.ptr.resize(cols + 1, 0);
        for &k in &x.idx {
            self.ptr[k as usize + 1] += 1;
        }
        for k in 0..cols {
            self.ptr[k + 1] += self.ptr[k];
        }
        self.row.resize(x.nnz(), 0);
        self.val.resize(x.nnz(), 0.0);
        let mut next = self.ptr[..cols].to_vec();
        for r in 0..x.rows() {
            let (idx, val) = x.row(r);
            for (&k, &v) in idx.iter().zip(val) {
                let p = &mut next[k as usize];
                self.row[*p] = r as u32;
                self.val[*p] = v;
                *p += 1;
            }
        }
    }

    fn col(&self, k: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.ptr[k], self.ptr[k + 1]);
        (&self.row[a..b], &self.val[a..b])
    }
}

/// Buffers reused from step to step.
#[derive(Debug, Clone, Default)]
struct Scratch {
    /// Each layer's input as sparse rows (Dense layers only).
    sparse: Vec<SparseRows>,
    cols: SparseCols,
    /// Output of each layer (for the last Dense: its logits).
    acts: Vec<Vec<f32>>,
    /// Multiplier of each dropout unit (0 or 1/(1-rate)), per layer.
    masks: Vec<Vec<f32>>,
    /// Sum of squares of each kernel row, for the L2 penalty.
    row_sq: Vec<f64>,
}

/// A dense head: the model, its weights, and the thread count its hot loops use.
#[derive(Debug, Clone)]
pub struct Head {
    input_dim: usize,
    spec: Vec<LayerSpec>,
    layers: Vec<Layer>,
    loss: LossKind,
    threads: usize,
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
                    let ld = row_stride(units);
                    let mut kernel = AlignedVec::zeros(fan_in * ld);
                    for row in kernel.chunks_exact_mut(ld) {
                        row[..units].iter_mut().for_each(|w| *w = rng.random_range(-limit..limit));
                    }
                    layers.push(Layer::Dense(Dense { fan_in, units, activation, kernel, ld, bias: vec![0.0; units] }));
                    fan_in = units;
                }
                LayerSpec::Dropout { rate } => layers.push(Layer::Dropout(rate)),
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Head { input_dim, spec: spec.to_vec(), layers, loss, threads, scratch: Scratch::default() })
    }

    /// Threads for the hot loops (default: the machine's). Results do not depend on it.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    pub fn threads(&self) -> usize {
        self.threads
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
        for (row, src) in d.kernel.chunks_exact_mut(d.ld).zip(kernel.chunks_exact(d.units)) {
            row[..d.units].copy_from_slice(src);
        }
        d.bias.copy_from_slice(bias);
        Ok(())
    }

    /// `l2 * sum(kernel^2)` over every Dense kernel: what Keras adds to the loss.
    pub fn l2_penalty(&self, l2: f32) -> f32 {
        if l2 == 0.0 {
            return 0.0;
        }
        let s: f64 = self.denses().map(|d| d.kernel.iter().map(|&w| f64::from(w) * f64::from(w)).sum::<f64>()).sum();
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
        let sizes: Vec<usize> = self.denses().flat_map(|d| [d.kernel.len(), d.bias.len()]).collect();
        opt.ensure_slots(&sizes)?;
        let rule = opt.next_rule();
        let mut scratch = std::mem::take(&mut self.scratch);
        self.forward(x, rows, &mut scratch, Some(rng));
        let last = scratch.acts.last().map(|v| &v[..]).unwrap_or(&[]);
        let (loss_sum, correct, dz) = loss_and_grad(self.loss, last, y, rows, true);
        let mut loss = loss_sum / rows as f64;
        let penalty = self.backward(rows, dz, &mut scratch, &rule, opt, l2);
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
        s.sparse.resize_with(self.layers.len(), SparseRows::default);
        let nlayers = self.layers.len();
        for (l, layer) in self.layers.iter().enumerate() {
            let (before, rest) = s.acts.split_at_mut(l);
            let input: &[f32] = if l == 0 { x } else { &before[l - 1] };
            let out = &mut rest[0];
            match layer {
                Layer::Dense(d) => {
                    s.sparse[l].fill(input, rows, d.fan_in);
                    dense_forward(&s.sparse[l], d, self.threads, out);
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
        let threads = self.threads;
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
                    s.cols.transpose(&s.sparse[l], dense.fan_in);
                    let d_in = if l > first_dense { input_gradient(&d, rows, dense) } else { Vec::new() };
                    let (ks, bs) = opt.slots.split_at_mut(slot + 1);
                    let kslots = &mut ks[slot];
                    let bslots = &mut bs[0];
                    penalty += kernel_update(&s.cols, &d, dense, rule, kslots, l2, threads, &mut s.row_sq);
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

/// `out = x * kernel + bias` (`[rows, units]`), x sparse. Threads take
/// disjoint column blocks.
fn dense_forward(x: &SparseRows, d: &Dense, threads: usize, out: &mut Vec<f32>) {
    let (rows, n) = (x.rows(), d.units);
    out.clear();
    out.resize(rows * n, 0.0);
    let work = x.nnz() * n;
    let t = if work < (1 << 18) { 1 } else { threads.min(n.div_ceil(TILE)).max(1) };
    if t == 1 {
        forward_cols(x, &d.kernel, d.ld, &d.bias, 0, n, out);
        return;
    }
    // Blocks of whole tiles, so every column goes through the same tile kernel.
    let tiles = n.div_ceil(TILE);
    let bounds: Vec<usize> = (0..=t).map(|i| (tiles * i / t * TILE).min(n)).collect();
    let mut parts: Vec<Vec<f32>> = bounds.windows(2).map(|w| vec![0.0; rows * (w[1] - w[0])]).collect();
    std::thread::scope(|scope| {
        let (first, rest) = parts.split_at_mut(1);
        for (i, part) in rest.iter_mut().enumerate() {
            let (c0, c1) = (bounds[i + 1], bounds[i + 2]);
            scope.spawn(move || forward_cols(x, &d.kernel, d.ld, &d.bias, c0, c1, part));
        }
        forward_cols(x, &d.kernel, d.ld, &d.bias, bounds[0], bounds[1], &mut first[0]);
    });
    for (i, part) in parts.iter().enumerate() {
        let (c0, c1) = (bounds[i], bounds[i + 1]);
        let w = c1 - c0;
        for r in 0..rows {
            out[r * n + c0..r * n + c1].copy_from_slice(&part[r * w..(r + 1) * w]);
        }
    }
}

/// Columns `[c0, c1)` of `x * w + bias` into `out` (`[rows, c1 - c0]`);
/// `n` is the row stride of `w`.
fn forward_cols(x: &SparseRows, w: &[f32], n: usize, bias: &[f32], c0: usize, c1: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected on this CPU just above.
        unsafe { forward_cols_avx2(x, w, n, bias, c0, c1, out) };
        return;
    }
    forward_cols_impl(x, w, n, bias, c0, c1, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_cols_avx2(x: &SparseRows, w: &[f32], n: usize, bias: &[f32], c0: usize, c1: usize, out: &mut [f32]) {
    forward_cols_impl(x, w, n, bias, c0, c1, out);
}

#[inline(always)]
fn forward_cols_impl(x: &SparseRows, w: &[f32], n: usize, bias: &[f32], c0: usize, c1: usize, out: &mut [f32]) {
    let width = c1 - c0;
    let rows = x.rows();
    let k_end = x.idx.iter().copied().max().map_or(0, |k| k as usize + 1);
    let mut cursor = vec![0usize; rows];
    out.fill(0.0);
    let mut c = c0;
    while c < c1 {
        let tw = TILE.min(c1 - c);
        cursor.copy_from_slice(&x.ptr[..rows]);
        // Blocks of kernel rows small enough to stay in cache while every
        // row of the batch uses them. Each output still sums its terms in
        // index order (the tile is stored and reloaded between blocks).
        for kb in (0..k_end).step_by(K_BLOCK) {
            let kend = (kb + K_BLOCK) as u32;
            for r in 0..rows {
                let (mut p, end) = (cursor[r], x.ptr[r + 1]);
                let o = &mut out[r * width + (c - c0)..][..tw];
                if tw == TILE {
                    let mut acc = [0.0f32; TILE];
                    acc.copy_from_slice(&o[..TILE]);
                    while p < end && x.idx[p] < kend {
                        let v = x.val[p];
                        let wr = &w[x.idx[p] as usize * n + c..][..TILE];
                        for j in 0..TILE {
                            acc[j] = v.mul_add(wr[j], acc[j]);
                        }
                        p += 1;
                    }
                    o[..TILE].copy_from_slice(&acc);
                } else {
                    while p < end && x.idx[p] < kend {
                        let v = x.val[p];
                        let wr = &w[x.idx[p] as usize * n + c..][..tw];
                        for j in 0..tw {
                            o[j] = v.mul_add(wr[j], o[j]);
                        }
                        p += 1;
                    }
                }
                cursor[r] = p;
            }
        }
        for r in 0..rows {
            let o = &mut out[r * width + (c - c0)..][..tw];
            for j in 0..tw {
                o[j] += bias[c + j];
            }
        }
        c += tw;
    }
}

/// `dz * kernel^T`: the gradient w.r.t. the layer's input, from the kernel
/// before its update.
fn input_gradient(dz: &[f32], rows: usize, d: &Dense) -> Vec<f32> {
    let (k, n) = (d.fan_in, d.units);
    let mut out = vec![0.0; rows * k];
    for r in 0..rows {
        let g = &dz[r * n..(r + 1) * n];
        for (i, o) in out[r * k..(r + 1) * k].iter_mut().enumerate() {
            let wr = &d.kernel[i * d.ld..][..n];
            *o = g.iter().zip(wr).fold(0.0, |s, (&a, &b)| s + a * b);
        }
    }
    out
}

/// Gradient of the bias (rows summed in order) and its update.
fn bias_update(dz: &[f32], rows: usize, d: &mut Dense, rule: &Rule, slots: &mut (AlignedVec, AlignedVec)) {
    let n = d.units;
    let mut g = vec![0.0f32; n];
    for r in 0..rows {
        for (a, &b) in g.iter_mut().zip(&dz[r * n..(r + 1) * n]) {
            *a += b;
        }
    }
    rule.apply(&mut d.bias, &g, &mut slots.0, &mut slots.1, 0.0);
}

/// Computes each kernel row's gradient `x[:, k]^T dz` (skipping zeros) and
/// applies the update to it in the same pass. Threads take disjoint row
/// blocks. Returns `sum(kernel^2)` before the update when `l2 > 0`.
#[allow(clippy::too_many_arguments)]
fn kernel_update(
    x: &SparseCols,
    dz: &[f32],
    d: &mut Dense,
    rule: &Rule,
    slots: &mut (AlignedVec, AlignedVec),
    l2: f32,
    threads: usize,
    row_sq: &mut Vec<f64>,
) -> f64 {
    let (k, n) = (d.fan_in, d.units);
    row_sq.clear();
    row_sq.resize(if l2 > 0.0 { k } else { 0 }, 0.0);
    let t = if k * n < (1 << 16) { 1 } else { threads.min(k).max(1) };
    let ld = d.ld;
    let job = KernelJob { x, n, ld, dz, rule: *rule, l2x2: 2.0 * l2 };
    if t == 1 {
        job.run(0, &mut d.kernel, &mut slots.0, &mut slots.1, row_sq);
    } else {
        let bounds: Vec<usize> = (0..=t).map(|i| k * i / t).collect();
        let mut w_rest = &mut d.kernel[..];
        let mut s1_rest = &mut slots.0[..];
        let mut s2_rest = &mut slots.1[..];
        let mut sq_rest = &mut row_sq[..];
        let job = &job;
        std::thread::scope(|scope| {
            for i in 0..t {
                let len = bounds[i + 1] - bounds[i];
                let (w, wr) = std::mem::take(&mut w_rest).split_at_mut(len * ld);
                w_rest = wr;
                let (s1, r1) = split_slot(std::mem::take(&mut s1_rest), len * ld);
                s1_rest = r1;
                let (s2, r2) = split_slot(std::mem::take(&mut s2_rest), len * ld);
                s2_rest = r2;
                let (sq, rq) = split_slot_f64(std::mem::take(&mut sq_rest), len);
                sq_rest = rq;
                let k0 = bounds[i];
                if i + 1 == t {
                    job.run(k0, w, s1, s2, sq);
                } else {
                    scope.spawn(move || job.run(k0, w, s1, s2, sq));
                }
            }
        });
    }
    row_sq.iter().sum()
}

/// Splits an optimizer slot that may be empty (unused by the rule).
fn split_slot(s: &mut [f32], at: usize) -> (&mut [f32], &mut [f32]) {
    if s.is_empty() { (&mut [], &mut []) } else { s.split_at_mut(at) }
}

fn split_slot_f64(s: &mut [f64], at: usize) -> (&mut [f64], &mut [f64]) {
    if s.is_empty() { (&mut [], &mut []) } else { s.split_at_mut(at) }
}

/// What every thread of [`kernel_update`] shares.
struct KernelJob<'a> {
    x: &'a SparseCols,
    n: usize,
    /// Row stride of the kernel and of its optimizer slots.
    ld: usize,
    dz: &'a [f32],
    rule: Rule,
    l2x2: f32,
}

impl KernelJob<'_> {
    /// Kernel rows `k0..k0 + w.len() / ld`.
    fn run(&self, k0: usize, w: &mut [f32], s1: &mut [f32], s2: &mut [f32], sq: &mut [f64]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected on this CPU just above.
            unsafe { self.run_avx2(k0, w, s1, s2, sq) };
            return;
        }
        self.run_impl(k0, w, s1, s2, sq);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_avx2(&self, k0: usize, w: &mut [f32], s1: &mut [f32], s2: &mut [f32], sq: &mut [f64]) {
        self.run_impl(k0, w, s1, s2, sq);
    }

    #[inline(always)]
    fn run_impl(&self, k0: usize, w: &mut [f32], s1: &mut [f32], s2: &mut [f32], sq: &mut [f64]) {
        let (n, ld) = (self.n, self.ld);
        let empty =
            |s: &mut [f32], a: usize, b: usize| -> std::ops::Range<usize> { if s.is_empty() { 0..0 } else { a..b } };
        for (i, wrow) in w.chunks_exact_mut(ld).enumerate() {
            let wrow = &mut wrow[..n];
            let (nz_rows, nz_vals) = self.x.col(k0 + i);
            let r1 = empty(s1, i * ld, i * ld + n);
            let r2 = empty(s2, i * ld, i * ld + n);
            let (s1row, s2row) = (&mut s1[r1], &mut s2[r2]);
            if !sq.is_empty() {
                sq[i] = wrow.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            }
            if nz_rows.is_empty() && self.l2x2 == 0.0 && self.rule.apply_zero(s1row) {
                continue;
            }
            let mut c = 0;
            while c < n {
                let tw = TILE.min(n - c);
                let mut acc = [0.0f32; TILE];
                if tw == TILE {
                    for (&r, &v) in nz_rows.iter().zip(nz_vals) {
                        let dr = &self.dz[r as usize * n + c..][..TILE];
                        for j in 0..TILE {
                            acc[j] = v.mul_add(dr[j], acc[j]);
                        }
                    }
                } else {
                    for (&r, &v) in nz_rows.iter().zip(nz_vals) {
                        let dr = &self.dz[r as usize * n + c..][..tw];
                        for j in 0..tw {
                            acc[j] = v.mul_add(dr[j], acc[j]);
                        }
                    }
                }
                let part = |s: &mut [f32]| -> std::ops::Range<usize> { if s.is_empty() { 0..0 } else { c..c + tw } };
                let (p1, p2) = (part(s1row), part(s2row));
                self.rule.apply(&mut wrow[c..c + tw], &acc[..tw], &mut s1row[p1], &mut s2row[p2], self.l2x2);
                c += tw;
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

    fn one_param_steps(spec: OptimizerSpec, grads: &[f32]) -> Vec<f32> {
        let mut opt = Optimizer::new(spec);
        opt.ensure_slots(&[1]).unwrap();
        let mut w = [1.0f32];
        let mut out = Vec::new();
        for &g in grads {
            let rule = opt.next_rule();
            let (s1, s2) = &mut opt.slots[0];
            rule.apply(&mut w, &[g], s1, s2, 0.0);
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
    fn rmsprop_zero_gradient_shortcut_is_exact() {
        let rule = Rule::Rmsprop { lr: 0.01, rho: 0.9, one_minus_rho: 1.0 - 0.9, eps: 1e-7 };
        let mut w = [0.3f32, -0.7, 0.0];
        let mut v = [0.2f32, 1e-9, 0.0];
        let (w2, mut v2) = (w, v);
        rule.apply(&mut w, &[0.0; 3], &mut v, &mut [], 0.0);
        assert!(rule.apply_zero(&mut v2));
        assert_eq!((w, v), (w2, v2));
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
