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

mod aligned;
mod kernels;
mod layers;
mod optimizer;
mod sparse;
mod team;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use team::Team;

use aligned::AlignedVec;
use kernels::{Step, bias_update, dense_forward, input_gradient, kernel_update};
use layers::{Dense, Layer};
use sparse::Sparse;

pub use crate::ml::activation::Activation;
use crate::ml::activation::{activate, activation_backward};
pub use crate::ml::loss::{LossKind, score_probabilities};
use crate::ml::loss::{loss_and_grad, probabilities};
pub use crate::ml::optimizer::OptimizerSpec;
use crate::ml::optimizer::Rule;
pub use optimizer::Optimizer;

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
