//! The layer stack: weights, forward and backward passes over a batch, one
//! training step. Data is NHWC float32, batch first; each layer's output
//! is kept during a training step for the backward pass.
//!
//! Everything runs on the model's own thread pool, so `threads` is the
//! whole of its parallelism, and the sums it makes are cut the same way on
//! every run: the same seed and thread count give the same weights, bit
//! for bit.

use std::sync::Arc;

use rand::Rng;

use super::conv2d::{self, ConvScratch};
use super::matmul::{Layout, matmul, matmul_tn_split};
use super::optimizer::ConvOptimizer;
use super::spec::{LayerSpec, Resolved, Shape, resolve, resolve_layers};
use super::{ConvnetError, dropout, init, pooling};
use crate::ml::activation::{Activation, activation_backward, sigmoid};
use crate::ml::loss::{LossKind, loss_and_grad};

/// What a training step saw before its update, as Keras reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the batch.
    pub loss: f32,
    /// Correct predictions (Keras's accuracy for the loss, summed over rows).
    pub correct: f64,
}

/// One layer's weights (`kernel`, `bias`), when it has any.
#[derive(Debug, Clone)]
struct Params {
    kernel: Vec<f32>,
    bias: Vec<f32>,
}

/// Per-layer state of a training step.
#[derive(Debug, Default, Clone)]
struct Work {
    conv_scratch: ConvScratch,
    argmax: Vec<u32>,
    mask: Vec<f32>,
    split: Vec<f32>,
}

pub struct Convnet {
    input: [usize; 3],
    layers: Vec<Resolved>,
    params: Vec<Option<Params>>,
    /// The loss the last layer implies; `None` for a conv base (see
    /// [`Convnet::conv_base`]), whose every layer applies its activation.
    loss: Option<LossKind>,
    /// Images in the last forward pass (what [`Convnet::input_gradient`] runs back through).
    rows: usize,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
    /// `acts[i]`: the input of layer i (`acts[0]`: the batch), `acts[n]`: the logits.
    acts: Vec<Vec<f32>>,
    work: Vec<Work>,
    /// The backward pass's two gradient buffers (a layer reads one, writes
    /// the other), and the parameter gradients of `train_batch`: kept from
    /// step to step, as fresh ones cost a page fault per 4 KB every step.
    grad_bufs: [Vec<f32>; 2],
    grads: Vec<Vec<f32>>,
}

/// A copy of the weights only: the per-step buffers (hundreds of MB for
/// 150x150 images) start empty, so an epoch's snapshot costs its weights.
impl Clone for Convnet {
    fn clone(&self) -> Convnet {
        let n = self.layers.len();
        Convnet {
            input: self.input,
            layers: self.layers.clone(),
            params: self.params.clone(),
            loss: self.loss,
            rows: 0,
            threads: self.threads,
            pool: self.pool.clone(),
            acts: vec![Vec::new(); n + 1],
            work: vec![Work::default(); n],
            grad_bufs: Default::default(),
            grads: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Convnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Convnet").field("input", &self.input).field("layers", &self.layers).finish_non_exhaustive()
    }
}

fn thread_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, ConvnetError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("convnet-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| ConvnetError::Spec(format!("cannot start {threads} math threads: {e}")))
}

impl Convnet {
    /// A model for images of `input` = [height, width, channels], with
    /// Keras's initialisation (glorot_uniform kernels, zero biases) from `seed`.
    pub fn new(input: [usize; 3], specs: &[LayerSpec], seed: u64, threads: usize) -> Result<Convnet, ConvnetError> {
        let (layers, loss) = resolve(input, specs)?;
        Convnet::from_layers(input, layers, Some(loss), seed, threads)
    }

    /// A stack with no loss (it may end in a conv or a pool, and every
    /// layer applies its activation, the last one's too): a frozen conv base
    /// whose outputs and input gradients the visualisations read. It cannot
    /// be trained, evaluated or asked for probabilities.
    pub fn conv_base(input: [usize; 3], specs: &[LayerSpec], threads: usize) -> Result<Convnet, ConvnetError> {
        if input.contains(&0) {
            return Err(ConvnetError::Spec(format!("input shape {input:?} has a zero dimension")));
        }
        let layers = resolve_layers(Shape::Map(input), specs)?;
        Convnet::from_layers(input, layers, None, 0, threads)
    }

    fn from_layers(
        input: [usize; 3],
        layers: Vec<Resolved>,
        loss: Option<LossKind>,
        seed: u64,
        threads: usize,
    ) -> Result<Convnet, ConvnetError> {
        let params = layers
            .iter()
            .enumerate()
            .map(|(i, l)| match (l.spec, l.conv) {
                (LayerSpec::Conv2d { filters, .. }, Some(g)) => {
                    let rf = g.kh * g.kw;
                    Some(Params {
                        kernel: init::glorot_uniform(g.patch() * filters, rf * g.in_c, rf * filters, seed, i),
                        bias: vec![0.0; filters],
                    })
                }
                (LayerSpec::Dense { units, .. }, _) => {
                    let d = l.input.len();
                    Some(Params { kernel: init::glorot_uniform(d * units, d, units, seed, i), bias: vec![0.0; units] })
                }
                _ => None,
            })
            .collect();
        let n = layers.len();
        Ok(Convnet {
            input,
            layers,
            params,
            loss,
            rows: 0,
            threads: threads.max(1),
            pool: thread_pool(threads)?,
            acts: vec![Vec::new(); n + 1],
            work: vec![Work::default(); n],
            grad_bufs: Default::default(),
            grads: Vec::new(),
        })
    }

    pub fn input_shape(&self) -> [usize; 3] {
        self.input
    }

    pub fn layers(&self) -> &[Resolved] {
        &self.layers
    }

    /// `None` for a [`Convnet::conv_base`].
    pub fn loss_kind(&self) -> Option<LossKind> {
        self.loss
    }

    /// Renames the layers (and so their tensors, `NAME/kernel`), in order:
    /// VGG16's `block1_conv1` .. where the default names are `conv2d` ...
    pub fn set_layer_names(&mut self, names: &[&str]) -> Result<(), ConvnetError> {
        if names.len() != self.layers.len() {
            return Err(ConvnetError::Spec(format!("{} names for {} layers", names.len(), self.layers.len())));
        }
        self.layers.iter_mut().zip(names).for_each(|(l, n)| l.name = n.to_string());
        Ok(())
    }

    fn head_loss(&self) -> Result<LossKind, ConvnetError> {
        self.loss.ok_or_else(|| ConvnetError::Spec("a conv base has no loss: it cannot be trained or scored".into()))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn output_dim(&self) -> usize {
        self.layers.last().map(|l| l.output.len()).unwrap_or(0)
    }

    pub fn param_count(&self) -> usize {
        self.layers.iter().map(|l| l.params).sum()
    }

    /// Every parameter tensor by Keras name (`conv2d/kernel`, `dense_1/bias`)
    /// with its Keras shape, in layer order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let mut out = Vec::new();
        for (l, p) in self.layers.iter().zip(&self.params) {
            let Some(p) = p else { continue };
            let kshape = match (l.conv, l.output) {
                (Some(g), _) => vec![g.kh, g.kw, g.in_c, g.filters],
                (None, Shape::Flat(u)) => vec![l.input.len(), u],
                _ => continue,
            };
            out.push((format!("{}/kernel", l.name), kshape, p.kernel.as_slice()));
            out.push((format!("{}/bias", l.name), vec![p.bias.len()], p.bias.as_slice()));
        }
        out
    }

    /// How many of [`Convnet::tensors`] belong to layers `..from`.
    pub fn tensors_below(&self, from: usize) -> usize {
        2 * self.params[..from].iter().flatten().count()
    }

    /// Replaces one tensor by name (see [`Convnet::tensors`]).
    pub fn set_tensor(&mut self, name: &str, values: &[f32]) -> Result<(), ConvnetError> {
        for (l, p) in self.layers.iter().zip(&mut self.params) {
            let Some(p) = p else { continue };
            let target = if name == format!("{}/kernel", l.name) {
                &mut p.kernel
            } else if name == format!("{}/bias", l.name) {
                &mut p.bias
            } else {
                continue;
            };
            if target.len() != values.len() {
                return Err(ConvnetError::Shape(format!(
                    "{name}: {} values given, the layer has {}",
                    values.len(),
                    target.len()
                )));
            }
            target.copy_from_slice(values);
            return Ok(());
        }
        Err(ConvnetError::Shape(format!("no tensor named {name}")))
    }

    fn check(&self, x: &[f32], y: Option<&[f32]>, rows: usize) -> Result<(), ConvnetError> {
        self.check_above(0, x, y, rows)
    }

    /// `x` must be `rows` inputs of layer `from` (`from` = 0: images).
    fn check_above(&self, from: usize, x: &[f32], y: Option<&[f32]>, rows: usize) -> Result<(), ConvnetError> {
        if from >= self.layers.len() {
            return Err(ConvnetError::Spec(format!("layer {from}: the model has {} layers", self.layers.len())));
        }
        let per = if from == 0 { self.input.iter().product::<usize>() } else { self.layers[from].input.len() };
        if x.len() != rows * per {
            return Err(ConvnetError::Shape(if from == 0 {
                format!("{} input values for {rows} images of {:?}", x.len(), self.input)
            } else {
                format!("{} input values for {rows} rows of layer {from}'s {per}", x.len())
            }));
        }
        if let Some(y) = y
            && y.len() != rows * self.output_dim()
        {
            return Err(ConvnetError::Shape(format!(
                "{} labels for {rows} rows of {} outputs",
                y.len(),
                self.output_dim()
            )));
        }
        Ok(())
    }

    /// Forward pass of `rows` inputs of layer `from` (0: images) through
    /// the layers from it on; the logits end in `self.acts[n]`.
    /// `rng`: training (dropout on, the backward pass's state kept).
    fn forward<R: Rng>(&mut self, from: usize, x: &[f32], rows: usize, mut rng: Option<&mut R>) {
        let n = self.layers.len();
        let threads = self.threads;
        self.rows = rows;
        self.acts[from].clear();
        self.acts[from].extend_from_slice(x);
        for i in from..n {
            let (before, after) = self.acts.split_at_mut(i + 1);
            let (xin, y) = (&before[i], &mut after[0]);
            let l = &self.layers[i];
            let w = &mut self.work[i];
            // The head's last layer leaves its sigmoid or softmax to the loss.
            let last = i + 1 == n && self.loss.is_some();
            match l.spec {
                LayerSpec::Conv2d { activation, .. } => {
                    let (Some(g), Some(p)) = (l.conv.as_ref(), self.params[i].as_ref()) else { continue };
                    let activation = (!last).then_some(activation);
                    conv2d::forward(g, &p.kernel, &p.bias, xin, rows, activation, y, &mut w.conv_scratch, threads);
                }
                LayerSpec::MaxPooling2d { .. } => {
                    let Some(g) = l.pool.as_ref() else { continue };
                    pooling::forward(g, xin, rows, y, &mut w.argmax);
                }
                LayerSpec::Flatten => {
                    // NHWC is already Keras's flatten order: a copy, no permutation.
                    y.clear();
                    y.extend_from_slice(xin);
                }
                LayerSpec::Dropout { rate } => {
                    y.clear();
                    y.extend_from_slice(xin);
                    // No mask at inference: the backward pass is then the identity.
                    w.mask.clear();
                    if let Some(rng) = rng.as_deref_mut()
                        && rate > 0.0
                    {
                        dropout::forward(rate, y, &mut w.mask, rng);
                    }
                }
                LayerSpec::Dense { units, activation } => {
                    let Some(p) = self.params[i].as_ref() else { continue };
                    let d = l.input.len();
                    y.clear();
                    for _ in 0..rows {
                        y.extend_from_slice(&p.bias);
                    }
                    matmul(rows, units, d, xin, Layout::N, &p.kernel, Layout::N, y, true, threads);
                    activate(activation, y, last);
                }
            }
        }
    }

    /// Backward pass through layers `hi - 1` down to `lo` from `d`, the
    /// gradient w.r.t. `acts[hi]` (layer `hi - 1`'s output), over the last
    /// forward pass; returns the gradient w.r.t. `acts[lo]` (layer `lo`'s
    /// input), or an empty vector where `input` is false (a training step
    /// needs no gradient of its inputs). With `grads` (`hi` = n only), the
    /// gradient of each parameter tensor of layers `lo..` goes into it, in
    /// [`Convnet::tensors`] order (those below `lo` are left as they are;
    /// its vectors are reused when they fit); without, no weight gradient
    /// is computed.
    fn backward(
        &mut self,
        d0: &[f32],
        hi: usize,
        lo: usize,
        input: bool,
        mut grads: Option<&mut Vec<Vec<f32>>>,
    ) -> Vec<f32> {
        let n = self.layers.len();
        let rows = self.rows;
        let threads = self.threads;
        debug_assert!(grads.is_none() || hi == n);
        if let Some(g) = grads.as_deref_mut() {
            g.resize_with(2 * self.params.iter().flatten().count(), Vec::new);
        }
        let mut next = 2 * self.params[..hi].iter().flatten().count();
        let [mut d, mut dx] = std::mem::take(&mut self.grad_bufs);
        d.clear();
        d.extend_from_slice(d0);
        for i in (lo..hi).rev() {
            let l = &self.layers[i];
            let w = &mut self.work[i];
            let (xin, yout) = (&self.acts[i], &self.acts[i + 1]);
            let want_dx = i > lo || input;
            let last = i + 1 == n && self.loss.is_some();
            match l.spec {
                LayerSpec::Conv2d { activation, .. } => {
                    let (Some(g), Some(p)) = (l.conv.as_ref(), self.params[i].as_ref()) else { continue };
                    next -= 2;
                    let weights = match grads.as_deref_mut() {
                        Some(grads) => {
                            let [dk, db] = &mut grads[next..next + 2] else { unreachable!() };
                            dk.resize(p.kernel.len(), 0.0);
                            db.resize(p.bias.len(), 0.0);
                            Some((dk.as_mut_slice(), db.as_mut_slice()))
                        }
                        None => None,
                    };
                    let activation = (!last).then_some(activation);
                    conv2d::backward(
                        g,
                        &p.kernel,
                        xin,
                        yout,
                        activation,
                        &mut d,
                        rows,
                        weights,
                        want_dx.then_some(&mut dx),
                        &mut w.conv_scratch,
                        threads,
                    );
                    std::mem::swap(&mut d, &mut dx);
                }
                LayerSpec::MaxPooling2d { .. } => {
                    let Some(g) = l.pool.as_ref() else { continue };
                    pooling::backward(g, &d, &w.argmax, rows, &mut dx);
                    std::mem::swap(&mut d, &mut dx);
                }
                LayerSpec::Flatten => {}
                LayerSpec::Dropout { .. } => {
                    if !w.mask.is_empty() {
                        dropout::backward(&w.mask, &mut d);
                    }
                }
                LayerSpec::Dense { units, activation } => {
                    let Some(p) = self.params[i].as_ref() else { continue };
                    if !last {
                        activation_backward(activation, yout, &mut d);
                    }
                    next -= 2;
                    let din = l.input.len();
                    if let Some(grads) = grads.as_deref_mut() {
                        let [dk, db] = &mut grads[next..next + 2] else { unreachable!() };
                        dk.resize(p.kernel.len(), 0.0);
                        matmul_tn_split(din, units, rows, xin, &d, dk, threads, &mut w.split);
                        db.resize(units, 0.0);
                        conv2d::bias_gradient(&d, units, db);
                    }
                    if want_dx {
                        // Overwritten whole by the product (`accumulate` false).
                        dx.resize(rows * din, 0.0);
                        matmul(rows, din, units, &d, Layout::N, &p.kernel, Layout::T, &mut dx, false, threads);
                        std::mem::swap(&mut d, &mut dx);
                    }
                }
            }
        }
        let out = if input { d.clone() } else { Vec::new() };
        self.grad_bufs = [d, dx];
        out
    }

    /// Inference forward of `rows` images (no dropout) that keeps every
    /// layer's output for [`Convnet::input_gradient`]; `outputs(i)` then reads them.
    pub fn forward_kept(&mut self, x: &[f32], rows: usize) -> Result<(), ConvnetError> {
        self.check(x, None, rows)?;
        let pool = self.pool.clone();
        pool.install(|| self.forward::<rand_chacha::ChaCha8Rng>(0, x, rows, None));
        Ok(())
    }

    /// Layer `i`'s output in the last forward pass, `[rows, ...]` of its
    /// output shape (after its activation; the head's last layer: logits).
    pub fn output(&self, i: usize) -> &[f32] {
        &self.acts[i + 1]
    }

    /// After [`Convnet::forward_kept`]: given `d`, the gradient of some score
    /// w.r.t. layer `from`'s output, the score's gradient w.r.t. the input
    /// of layer `to` (`to` = 0: the images), through the layers between.
    /// What a filter pattern ascends (to the images) and what Grad-CAM pools
    /// (from the logits to a conv layer's output: `to` = that layer + 1).
    pub fn input_gradient(&mut self, d: &[f32], from: usize, to: usize) -> Result<Vec<f32>, ConvnetError> {
        if from >= self.layers.len() || to > from + 1 {
            return Err(ConvnetError::Spec(format!(
                "input_gradient from layer {from} to {to}: the model has {} layers",
                self.layers.len()
            )));
        }
        if d.len() != self.acts[from + 1].len() || self.acts[from + 1].is_empty() {
            return Err(ConvnetError::Shape(format!(
                "{} gradient values for layer {from}'s output of {} (run forward_kept first)",
                d.len(),
                self.acts[from + 1].len()
            )));
        }
        let pool = self.pool.clone();
        Ok(pool.install(|| self.backward(d, from + 1, to, true, None)))
    }

    /// The gradient of the batch-mean loss w.r.t. every parameter tensor, and
    /// what the batch scored (before any update).
    pub fn gradients<R: Rng + Send>(
        &mut self,
        x: &[f32],
        y: &[f32],
        rows: usize,
        rng: &mut R,
    ) -> Result<(StepStats, Vec<Vec<f32>>), ConvnetError> {
        let kind = self.head_loss()?;
        self.check(x, Some(y), rows)?;
        let n = self.layers.len();
        let pool = self.pool.clone();
        Ok(pool.install(|| {
            self.forward(0, x, rows, Some(rng));
            let logits = &self.acts[self.layers.len()];
            let (loss, correct, dz) = loss_and_grad(kind, logits, y, rows, true);
            let mut grads = Vec::new();
            self.backward(&dz, n, 0, false, Some(&mut grads));
            (StepStats { loss: (loss / rows.max(1) as f64) as f32, correct }, grads)
        }))
    }

    /// One training step: forward, backward, optimizer update.
    pub fn train_batch<R: Rng + Send>(
        &mut self,
        x: &[f32],
        y: &[f32],
        rows: usize,
        opt: &mut ConvOptimizer,
        rng: &mut R,
    ) -> Result<StepStats, ConvnetError> {
        self.train_batch_above(0, x, y, rows, opt, rng)
    }

    /// A training step of layers `from..` alone, on `x`, the inputs of layer
    /// `from` (what the frozen layers below made): those below neither run
    /// nor move, and `opt` holds slots for the tensors of `from..` only.
    pub fn train_batch_above<R: Rng + Send>(
        &mut self,
        from: usize,
        x: &[f32],
        y: &[f32],
        rows: usize,
        opt: &mut ConvOptimizer,
        rng: &mut R,
    ) -> Result<StepStats, ConvnetError> {
        let kind = self.head_loss()?;
        self.check_above(from, x, Some(y), rows)?;
        let n = self.layers.len();
        let pool = self.pool.clone();
        let mut grads = std::mem::take(&mut self.grads);
        let frozen = self.tensors_below(from);
        let stats = pool.install(|| {
            self.forward(from, x, rows, Some(rng));
            let logits = &self.acts[self.layers.len()];
            let (loss, correct, dz) = loss_and_grad(kind, logits, y, rows, true);
            self.backward(&dz, n, from, false, Some(&mut grads));
            let mut params: Vec<&mut Vec<f32>> =
                self.params[from..].iter_mut().flatten().flat_map(|p| [&mut p.kernel, &mut p.bias]).collect();
            opt.step(&mut params, &grads[frozen..]);
            StepStats { loss: (loss / rows.max(1) as f64) as f32, correct }
        });
        self.grads = grads;
        Ok(stats)
    }

    /// Summed loss and correct count over `rows` (inference: no dropout).
    pub fn evaluate(&mut self, x: &[f32], y: &[f32], rows: usize) -> Result<(f64, f64), ConvnetError> {
        self.evaluate_above(0, x, y, rows)
    }

    /// [`Convnet::evaluate`] of `x`, inputs of layer `from`.
    pub fn evaluate_above(
        &mut self,
        from: usize,
        x: &[f32],
        y: &[f32],
        rows: usize,
    ) -> Result<(f64, f64), ConvnetError> {
        let kind = self.head_loss()?;
        self.check_above(from, x, Some(y), rows)?;
        let pool = self.pool.clone();
        Ok(pool.install(|| {
            self.forward::<rand_chacha::ChaCha8Rng>(from, x, rows, None);
            let (loss, correct, _) = loss_and_grad(kind, &self.acts[self.layers.len()], y, rows, false);
            (loss, correct)
        }))
    }

    /// What layers `0..upto` make of `rows` images (inference: no dropout),
    /// `[rows, ...]` of layer `upto - 1`'s output shape: a pretrained part's
    /// own output, e.g. VGG16's block5 before its head (see [`super::vgg16`]).
    /// `upto` = the layer count gives the logits (no sigmoid or softmax).
    pub fn layer_output(&mut self, x: &[f32], rows: usize, upto: usize) -> Result<Vec<f32>, ConvnetError> {
        self.check(x, None, rows)?;
        if upto > self.layers.len() {
            return Err(ConvnetError::Spec(format!(
                "layer_output({upto}): the model has {} layers",
                self.layers.len()
            )));
        }
        let pool = self.pool.clone();
        Ok(pool.install(|| {
            self.forward::<rand_chacha::ChaCha8Rng>(0, x, rows, None);
            self.acts[upto].clone()
        }))
    }

    /// Probabilities (sigmoid or softmax of the last layer), `[rows, outputs]`.
    pub fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>, ConvnetError> {
        self.predict_above(0, x, rows)
    }

    /// [`Convnet::predict`] of `x`, inputs of layer `from`.
    pub fn predict_above(&mut self, from: usize, x: &[f32], rows: usize) -> Result<Vec<f32>, ConvnetError> {
        self.check_above(from, x, None, rows)?;
        let pool = self.pool.clone();
        let loss = self.head_loss()?;
        let c = self.output_dim();
        Ok(pool.install(|| {
            self.forward::<rand_chacha::ChaCha8Rng>(from, x, rows, None);
            let z = &self.acts[self.layers.len()];
            match loss {
                LossKind::BinaryCrossentropy => z.iter().map(|&v| sigmoid(v)).collect(),
                LossKind::CategoricalCrossentropy => z.chunks_exact(c).flat_map(softmax).collect(),
            }
        }))
    }
}

fn softmax(z: &[f32]) -> Vec<f32> {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// A hidden layer's activation, in place. The last layer's sigmoid or
/// softmax is left to the loss, which works from the logits.
fn activate(a: Activation, v: &mut [f32], last: bool) {
    if last {
        return;
    }
    match a {
        Activation::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        Activation::Sigmoid => v.iter_mut().for_each(|x| *x = sigmoid(*x)),
        Activation::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
        Activation::Linear | Activation::Softmax => {}
    }
}
