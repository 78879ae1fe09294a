use super::kernels::{gradient_tile, gradient_tile_portable};
use super::sparse::{SparseCols, SparseRows, compress};
use super::*;
use crate::ml::loss::argmax;
use crate::ml::optimizer::decay;

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
        (LossKind::CategoricalCrossentropy, vec![2.0, -1.0, 0.5, 0.1, 0.2, -3.0], vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
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
    let bits =
        |idx: &[u32], val: &[f32]| -> Vec<(u32, u32)> { idx.iter().zip(val).map(|(&k, v)| (k, v.to_bits())).collect() };
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
