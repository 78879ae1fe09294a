//! Finite-difference gradient checks of every layer, the optimizer step
//! against Keras's formula, the book's parameter counts, determinism.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::conv2d::Padding;
use super::spec::{Pair, resolve};
use super::*;
use crate::ml::activation::Activation;
use crate::ml::optimizer::OptimizerSpec;

fn conv(filters: usize, k: usize, s: usize, padding: Padding, activation: Activation) -> LayerSpec {
    LayerSpec::Conv2d { filters, kernel_size: Pair::One(k), strides: Pair::One(s), padding, activation }
}
fn pool(p: usize) -> LayerSpec {
    LayerSpec::MaxPooling2d { pool_size: Pair::One(p), strides: None }
}
fn dense(units: usize, activation: Activation) -> LayerSpec {
    LayerSpec::Dense { units, activation }
}

fn data(input: [usize; 3], rows: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = (0..rows * input.iter().product::<usize>()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let y = if classes == 1 {
        (0..rows).map(|r| (r % 2) as f32).collect()
    } else {
        let mut y = vec![0.0; rows * classes];
        for r in 0..rows {
            y[r * classes + r % classes] = 1.0;
        }
        y
    };
    (x, y)
}

/// The batch-mean loss with dropout masks drawn from `seed` (the same
/// masks at every call).
fn loss(m: &mut Convnet, x: &[f32], y: &[f32], rows: usize, seed: u64) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (s, _) = m.gradients(x, y, rows, &mut rng).unwrap();
    f64::from(s.loss)
}

/// Central differences against the analytic gradient, for up to `per`
/// entries of every tensor.
/// `eps`: small enough that no ReLU or pooling argmax changes side within ±eps.
fn gradient_check(input: [usize; 3], specs: &[LayerSpec], classes: usize, rows: usize, eps: f32) {
    let mut m = Convnet::new(input, specs, 7, 2).unwrap();
    // Non-zero biases so that no ReLU sits exactly at its kink.
    let names: Vec<(String, usize)> = m.tensors().iter().map(|(n, _, v)| (n.clone(), v.len())).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (name, len) in &names {
        if name.ends_with("/bias") {
            let b: Vec<f32> = (0..*len).map(|_| rng.random_range(-0.1f32..0.1)).collect();
            m.set_tensor(name, &b).unwrap();
        }
    }
    let (x, y) = data(input, rows, classes, 11);
    let mut r = ChaCha8Rng::seed_from_u64(99);
    let (_, grads) = m.gradients(&x, &y, rows, &mut r).unwrap();
    assert_eq!(grads.len(), names.len());
    let mut checked = 0;
    for ((name, len), g) in names.iter().zip(&grads) {
        let values: Vec<f32> = m.tensors().into_iter().find(|(n, _, _)| n == name).unwrap().2.to_vec();
        let step = (len / 12).max(1);
        for j in (0..*len).step_by(step) {
            let mut v = values.clone();
            v[j] = values[j] + eps;
            m.set_tensor(name, &v).unwrap();
            let up = loss(&mut m, &x, &y, rows, 99);
            v[j] = values[j] - eps;
            m.set_tensor(name, &v).unwrap();
            let down = loss(&mut m, &x, &y, rows, 99);
            m.set_tensor(name, &values).unwrap();
            let numeric = (up - down) / (2.0 * f64::from(eps));
            let analytic = f64::from(g[j]);
            assert!(
                (numeric - analytic).abs() <= 2e-3 + 2e-2 * analytic.abs(),
                "{name}[{j}]: numeric {numeric:.6} vs analytic {analytic:.6}"
            );
            checked += 1;
        }
    }
    assert!(checked > 20);
}

#[test]
fn conv2d_valid_and_same_with_strides_on_odd_sizes_match_finite_differences() {
    let specs = [
        conv(3, 3, 1, Padding::Valid, Activation::Tanh), // 9x7 -> 7x5
        conv(4, 3, 2, Padding::Same, Activation::Tanh),  // 7x5 -> 4x3 (odd total padding)
        conv(2, 2, 1, Padding::Same, Activation::Tanh),  // even kernel: the extra pad goes bottom/right
        LayerSpec::Flatten,
        dense(3, Activation::Softmax),
    ];
    gradient_check([9, 7, 2], &specs, 3, 3, 1e-2);
}

#[test]
fn max_pooling_of_odd_sizes_and_relu_match_finite_differences() {
    let specs = [
        conv(3, 2, 1, Padding::Valid, Activation::Relu), // 10x12 -> 9x11
        pool(2),                                         // 9x11 -> 4x5: last row and column dropped
        conv(2, 1, 1, Padding::Valid, Activation::Tanh),
        pool(3), // 4x5 -> 1x1
        LayerSpec::Flatten,
        dense(1, Activation::Sigmoid),
    ];
    gradient_check([10, 12, 1], &specs, 1, 4, 1e-3);
}

#[test]
fn flatten_dropout_and_dense_match_finite_differences() {
    let specs = [
        conv(2, 3, 1, Padding::Same, Activation::Tanh),
        LayerSpec::Flatten,
        LayerSpec::Dropout { rate: 0.4 },
        dense(5, Activation::Relu),
        LayerSpec::Dropout { rate: 0.3 },
        dense(2, Activation::Softmax),
    ];
    gradient_check([5, 5, 3], &specs, 2, 5, 1e-3);
}

#[test]
fn pooling_drops_the_odd_edge_as_keras_valid() {
    for (size, want) in [(9, 4), (15, 7), (11, 5), (2, 1)] {
        let g = pooling::PoolGeometry::new([size, size, 1], [2, 2], [2, 2]).unwrap();
        assert_eq!((g.out_h, g.out_w), (want, want));
    }
    assert!(pooling::PoolGeometry::new([1, 1, 8], [2, 2], [2, 2]).is_none());
    // Ties: the first maximum in row-major order takes the gradient.
    let g = pooling::PoolGeometry::new([3, 3, 1], [2, 2], [2, 2]).unwrap();
    let x = [1.0, 5.0, 9.0, 5.0, 2.0, 9.0, 9.0, 9.0, 9.0];
    let (mut y, mut arg) = (Vec::new(), Vec::new());
    pooling::forward(&g, &x, 1, &mut y, &mut arg);
    assert_eq!((y, arg.clone()), (vec![5.0], vec![1]));
    let mut dx = Vec::new();
    pooling::backward(&g, &[2.5], &arg, 1, &mut dx);
    assert_eq!(dx, vec![0.0, 2.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    // A buffer reused from an earlier step is overwritten whole, the
    // edge no window covers included.
    let mut dx = vec![7.0; 9];
    pooling::backward(&g, &[2.5], &arg, 1, &mut dx);
    assert_eq!(dx, vec![0.0, 2.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn dropout_keeps_one_minus_rate_scaled_by_its_inverse() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut x = vec![1.0f32; 100_000];
    let mut mask = Vec::new();
    dropout::forward(0.5, &mut x, &mut mask, &mut rng);
    let kept = x.iter().filter(|&&v| v != 0.0).count() as f64 / x.len() as f64;
    assert!((kept - 0.5).abs() < 0.01, "kept {kept}");
    assert!(x.iter().all(|&v| v == 0.0 || v == 2.0));
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len() as f64;
    assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
}

#[test]
fn rmsprop_step_is_keras_formula() {
    // One dense unit, so the step can be written out by hand.
    let specs = [LayerSpec::Flatten, dense(1, Activation::Sigmoid)];
    let mut m = Convnet::new([1, 1, 2], &specs, 0, 1).unwrap();
    m.set_tensor("dense/kernel", &[0.5, -0.25]).unwrap();
    let (x, y) = (vec![1.0f32, 2.0], vec![1.0f32]);
    let (lr, rho, eps) = (1e-3f32, 0.9f32, 1e-7f32);
    let mut opt = ConvOptimizer::new(OptimizerSpec::Rmsprop { learning_rate: lr, rho, epsilon: eps });
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut w = [0.5f32, -0.25, 0.0];
    let mut v = [0.0f32; 3];
    for _ in 0..3 {
        // d loss / d z = sigmoid(z) - y for binary cross-entropy.
        let z = w[0] * x[0] + w[1] * x[1] + w[2];
        let dz = 1.0 / (1.0 + (-z).exp()) - y[0];
        let g = [dz * x[0], dz * x[1], dz];
        for j in 0..3 {
            // keras/optimizers/rmsprop.py: v = rho v + (1 - rho) g^2; w -= lr g / sqrt(v + eps)
            v[j] = rho * v[j] + (1.0 - rho) * g[j] * g[j];
            w[j] -= lr * g[j] / (v[j] + eps).sqrt();
        }
        m.train_batch(&x, &y, 1, &mut opt, &mut rng).unwrap();
    }
    let t = m.tensors();
    let got = [t[0].2[0], t[0].2[1], t[1].2[0]];
    for j in 0..3 {
        assert!((got[j] - w[j]).abs() <= 1e-6, "w[{j}]: {} vs {}", got[j], w[j]);
    }
    assert_eq!(opt.iterations(), 3);
}

fn mnist_book() -> Vec<LayerSpec> {
    vec![
        conv(32, 3, 1, Padding::Valid, Activation::Relu),
        pool(2),
        conv(64, 3, 1, Padding::Valid, Activation::Relu),
        pool(2),
        conv(64, 3, 1, Padding::Valid, Activation::Relu),
        LayerSpec::Flatten,
        dense(64, Activation::Relu),
        dense(10, Activation::Softmax),
    ]
}

#[test]
fn the_books_two_summaries_count_every_parameter() {
    let (layers, _) = resolve([28, 28, 1], &mnist_book()).unwrap();
    let p: Vec<usize> = layers.iter().map(|l| l.params).collect();
    assert_eq!(p, vec![320, 0, 18_496, 0, 36_928, 0, 36_928, 650]);
    assert_eq!(p.iter().sum::<usize>(), 93_322);
    let text = spec::summary("mnist", [28, 28, 1], &layers);
    assert!(text.contains("conv2d_2 (Conv2D)") && text.contains("(None, 3, 3, 64)"), "{text}");
    assert!(text.contains("Total params: 93,322"), "{text}");

    let cats = [
        conv(32, 3, 1, Padding::Valid, Activation::Relu),
        pool(2),
        conv(64, 3, 1, Padding::Valid, Activation::Relu),
        pool(2),
        conv(128, 3, 1, Padding::Valid, Activation::Relu),
        pool(2),
        conv(128, 3, 1, Padding::Valid, Activation::Relu),
        pool(2),
        LayerSpec::Flatten,
        dense(512, Activation::Relu),
        dense(1, Activation::Sigmoid),
    ];
    let (layers, _) = resolve([150, 150, 3], &cats).unwrap();
    let shapes: Vec<String> = layers.iter().map(|l| l.output.keras()).collect();
    assert_eq!(shapes[7], "(None, 7, 7, 128)");
    assert_eq!(shapes[8], "(None, 6272)");
    assert_eq!(layers.iter().map(|l| l.params).sum::<usize>(), 3_453_121);
}

#[test]
fn layer_lists_that_cannot_be_built_are_refused_by_index() {
    let e = resolve([1, 1, 4], &[pool(2), LayerSpec::Flatten, dense(1, Activation::Sigmoid)]).unwrap_err();
    assert!(matches!(e, ConvnetError::Layer { index: 0, .. }), "{e}");
    let e = resolve([8, 8, 1], &[conv(2, 3, 1, Padding::Valid, Activation::Relu), dense(1, Activation::Sigmoid)])
        .unwrap_err();
    assert!(matches!(&e, ConvnetError::Layer { index: 1, message } if message.contains("flatten")), "{e}");
    let e = resolve([8, 8, 1], &[LayerSpec::Flatten, dense(3, Activation::Relu)]).unwrap_err();
    assert!(matches!(e, ConvnetError::Spec(_)), "{e}");
}

#[test]
fn same_seed_and_threads_give_bit_identical_weights() {
    let run = || {
        let mut m = Convnet::new([28, 28, 1], &mnist_book(), 5, 2).unwrap();
        let mut opt = ConvOptimizer::new(OptimizerSpec::rmsprop(1e-3));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (x, y) = data([28, 28, 1], 16, 10, 2);
        for _ in 0..3 {
            m.train_batch(&x, &y, 16, &mut opt, &mut rng).unwrap();
        }
        m.tensors()
            .into_iter()
            .flat_map(|(_, _, v)| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn glorot_uniform_kernels_and_zero_biases() {
    let m = Convnet::new([28, 28, 1], &mnist_book(), 5, 1).unwrap();
    for (name, shape, v) in m.tensors() {
        if name.ends_with("/bias") {
            assert!(v.iter().all(|&b| b == 0.0), "{name}");
            continue;
        }
        let (fan_in, fan_out) = match shape.as_slice() {
            [kh, kw, i, o] => (kh * kw * i, kh * kw * o),
            [i, o] => (*i, *o),
            _ => unreachable!(),
        };
        let limit = (6.0 / (fan_in + fan_out) as f32).sqrt();
        let max = v.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
        assert!(max <= limit && max > 0.9 * limit, "{name}: max {max} limit {limit}");
    }
}

#[test]
fn safetensors_round_trip_rebuilds_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mut m = Convnet::new([28, 28, 1], &mnist_book(), 5, 1).unwrap();
    m.save_safetensors(&path).unwrap();
    let mut back = Convnet::load_safetensors(&path, 1).unwrap();
    let (x, _) = data([28, 28, 1], 3, 10, 4);
    assert_eq!(m.predict(&x, 3).unwrap(), back.predict(&x, 3).unwrap());
}

#[test]
fn matches_the_numpy_reference() {
    let text = include_str!("../../../tests/fixtures/convnet/reference.json");
    let r: serde_json::Value = serde_json::from_str(text).unwrap();
    let vec = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|f| f.as_f64().unwrap() as f32).collect()
    };
    let specs = [
        conv(3, 3, 1, Padding::Valid, Activation::Relu),
        pool(2),
        conv(4, 2, 1, Padding::Same, Activation::Tanh),
        LayerSpec::Flatten,
        dense(3, Activation::Softmax),
    ];
    let mut m = Convnet::new([7, 6, 2], &specs, 0, 2).unwrap();
    for (name, v) in r["tensors"].as_object().unwrap() {
        m.set_tensor(name, &vec(v)).unwrap();
    }
    let (x, y) = (vec(&r["x"]), vec(&r["y"]));
    let p = m.predict(&x, 2).unwrap();
    for (a, b) in p.iter().zip(vec(&r["probabilities"])) {
        assert!((a - b).abs() < 1e-5, "probability {a} vs {b}");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (stats, grads) = m.gradients(&x, &y, 2, &mut rng).unwrap();
    assert!((f64::from(stats.loss) - r["loss"].as_f64().unwrap()).abs() < 1e-5);
    let names: Vec<String> = m.tensors().into_iter().map(|(n, _, _)| n).collect();
    for (name, g) in names.iter().zip(&grads) {
        let want = vec(&r["gradients"][name]);
        assert_eq!(want.len(), g.len(), "{name}");
        for (j, (a, b)) in g.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-5, "{name}[{j}]: {a} vs {b}");
        }
    }
}

/// A direct convolution in f64 (no columns, no tiles): `y`, and for `dy`
/// the kernel, bias and input gradients.
fn direct_conv(
    g: &conv2d::ConvGeometry,
    kernel: &[f32],
    x: &[f32],
    dy: &[f32],
    rows: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let f = g.filters;
    let mut y = vec![0.0; rows * g.out_pixels() * f];
    let (mut dk, mut db, mut dx) = (vec![0.0; kernel.len()], vec![0.0; f], vec![0.0; x.len()]);
    for r in 0..rows {
        for oy in 0..g.out_h {
            for ox in 0..g.out_w {
                let o = ((r * g.out_h + oy) * g.out_w + ox) * f;
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let (Some(iy), Some(ix)) =
                            ((oy * g.sh + ky).checked_sub(g.pad_top), (ox * g.sw + kx).checked_sub(g.pad_left))
                        else {
                            continue;
                        };
                        if iy >= g.in_h || ix >= g.in_w {
                            continue;
                        }
                        for c in 0..g.in_c {
                            let xi = ((r * g.in_h + iy) * g.in_w + ix) * g.in_c + c;
                            let ki = ((ky * g.kw + kx) * g.in_c + c) * f;
                            for j in 0..f {
                                y[o + j] += f64::from(x[xi]) * f64::from(kernel[ki + j]);
                                dk[ki + j] += f64::from(x[xi]) * f64::from(dy[o + j]);
                                dx[xi] += f64::from(kernel[ki + j]) * f64::from(dy[o + j]);
                            }
                        }
                    }
                }
                for j in 0..f {
                    db[j] += f64::from(dy[o + j]);
                }
            }
        }
    }
    (y, dk, db, dx)
}

fn close(name: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}");
    let scale = want.iter().fold(1.0f64, |a, &b| a.max(b.abs()));
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        assert!((f64::from(a) - b).abs() <= 1e-5 * scale, "{name}[{i}]: {a} vs {b}");
    }
}

#[test]
fn tiled_convolution_matches_a_direct_one_across_tiles_parts_and_images() {
    // 64 channels: 576-value patches, so tiles of MIN_TILE rows that end
    // inside an image (`tiles`); `same` padding and strides take the tap-by-tap im2col path.
    for (input, k, s, padding, filters, rows, tiles) in [
        ([20, 20, 64], 3, 1, Padding::Same, 8, 3, true),
        ([30, 27, 64], 3, 2, Padding::Valid, 5, 2, true),
        ([9, 11, 3], 2, 1, Padding::Same, 4, 5, false),
    ] {
        let g = conv2d::ConvGeometry::new(input, [k, k], [s, s], padding, filters).unwrap();
        assert_eq!(rows * g.out_pixels() > g.tile_rows(), tiles, "{input:?}");
        assert!(!winograd::applies(&g), "{input:?}");
        conv_matches_direct(&g, rows);
    }
}

#[test]
fn winograd_convolution_matches_a_direct_one_for_any_size_and_padding() {
    // Odd outputs (9x9 as block5's, 6x5) leave tiles half outside the
    // image; 70 filters are no multiple of a vector.
    for (input, padding, filters, rows) in
        [([9, 9, 64], Padding::Same, 64, 3), ([8, 7, 64], Padding::Valid, 70, 2), ([4, 6, 80], Padding::Same, 64, 1)]
    {
        let g = conv2d::ConvGeometry::new(input, [3, 3], [1, 1], padding, filters).unwrap();
        assert!(winograd::applies(&g), "{input:?}");
        conv_matches_direct(&g, rows);
    }
}

/// `conv2d::forward` and `backward` on `rows` random images against
/// [`direct_conv`], on 1, 2 and 3 threads (and one image a Winograd group):
/// every gradient, with and without the weight gradients.
fn conv_matches_direct(g: &conv2d::ConvGeometry, rows: usize) {
    let filters = g.filters;
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let (x, kernel, bias) = (draw(rows * g.in_len()), draw(g.patch() * filters), draw(filters));
    let dy = draw(rows * g.out_pixels() * filters);
    let (y0, dk0, db0, dx0) = direct_conv(g, &kernel, &x, &dy, rows);
    let y0: Vec<f64> = y0.iter().enumerate().map(|(i, &v)| v + f64::from(bias[i % filters])).collect();
    // Winograd's groups: as many images as fit, or one image each.
    for (threads, group_bytes) in [(1, None), (2, None), (3, None), (2, Some(1))] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut scratch = match group_bytes {
                Some(b) => conv2d::ConvScratch::with_winograd_group_bytes(b),
                None => conv2d::ConvScratch::default(),
            };
            let mut y = vec![f32::NAN; 7];
            conv2d::forward(g, &kernel, &bias, &x, rows, None, &mut y, &mut scratch, threads);
            close("y", &y, &y0);
            let (mut dk, mut db, mut dx) = (vec![f32::NAN; dk0.len()], vec![f32::NAN; filters], vec![f32::NAN; 3]);
            let mut d = dy.clone();
            conv2d::backward(
                g,
                &kernel,
                &x,
                &y,
                None,
                &mut d,
                rows,
                Some((&mut dk, &mut db)),
                Some(&mut dx),
                &mut scratch,
                threads,
            );
            close("dkernel", &dk, &dk0);
            close("dbias", &db, &db0);
            close("dx", &dx, &dx0);
            // The input gradient alone (no weight gradients) is the same.
            let (mut d, mut dx_only) = (dy.clone(), vec![f32::NAN; 3]);
            conv2d::backward(g, &kernel, &x, &y, None, &mut d, rows, None, Some(&mut dx_only), &mut scratch, threads);
            assert_eq!(dx_only, dx, "{g:?}: input gradient without the weight gradients");
        });
    }
}

#[test]
fn max_pooling_of_many_channels_matches_a_naive_one_ties_included() {
    // 19 channels: one vector group of 16 and 3 more one by one; values
    // from a few levels, so that ties are common.
    for (input, p, s) in [([5, 7, 19], 2, 2), ([6, 6, 32], 3, 2), ([4, 5, 16], 2, 1)] {
        let g = pooling::PoolGeometry::new(input, [p, p], [s, s]).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let rows = 2;
        let x: Vec<f32> = (0..rows * g.in_len()).map(|_| f32::from(rng.random_range(0u8..4))).collect();
        let (mut y, mut arg) = (Vec::new(), Vec::new());
        pooling::forward(&g, &x, rows, &mut y, &mut arg);
        for r in 0..rows {
            let image = &x[r * g.in_len()..][..g.in_len()];
            for oy in 0..g.out_h {
                for ox in 0..g.out_w {
                    for c in 0..g.c {
                        let mut best = (f32::NEG_INFINITY, 0);
                        for dy in 0..p {
                            for dx in 0..p {
                                let i = ((oy * s + dy) * g.in_w + ox * s + dx) * g.c + c;
                                if image[i] > best.0 {
                                    best = (image[i], i);
                                }
                            }
                        }
                        let o = r * g.out_len() + (oy * g.out_w + ox) * g.c + c;
                        assert_eq!((y[o], arg[o] as usize), best, "{input:?} image {r} ({oy}, {ox}) channel {c}");
                    }
                }
            }
        }
    }
}

/// `input_gradient` of a score `sum(d * output(layer))` w.r.t. the images,
/// against central differences on the images: through a conv base (no
/// loss: every activation applied, the last conv's ReLU too) and through a
/// head from its logits; and the gradient to an inner layer, carried on
/// down, is the gradient to the images (what Grad-CAM stops at).
#[test]
fn input_gradients_match_finite_differences_through_any_layers() {
    let base = [
        conv(3, 3, 1, Padding::Same, Activation::Tanh),  // 7x8x2 -> 7x8x3
        pool(2),                                         // -> 3x4 (odd edge dropped)
        conv(4, 2, 1, Padding::Valid, Activation::Relu), // -> 2x3x4
    ];
    let mut head = base.to_vec();
    head.extend([LayerSpec::Flatten, dense(2, Activation::Softmax)]);
    let input = [7, 8, 2];
    let rows = 2;
    let (x, _) = data(input, rows, 2, 5);
    let bases = [Convnet::conv_base(input, &base, 2).unwrap(), Convnet::new(input, &head, 3, 2).unwrap()];
    for mut m in bases {
        // Non-zero biases so that no ReLU sits exactly at its kink.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (name, len) in m.tensors().iter().map(|(n, _, v)| (n.clone(), v.len())).collect::<Vec<_>>() {
            if name.ends_with("/bias") {
                let b: Vec<f32> = (0..len).map(|_| rng.random_range(-0.1f32..0.1)).collect();
                m.set_tensor(&name, &b).unwrap();
            }
        }
        let top = m.layers().len() - 1;
        m.forward_kept(&x, rows).unwrap();
        let d: Vec<f32> = (0..m.output(top).len()).map(|_| rng.random_range(-1f32..1.0)).collect();
        let score = |m: &mut Convnet, x: &[f32]| -> f64 {
            m.forward_kept(x, rows).unwrap();
            m.output(top).iter().zip(&d).map(|(&o, &w)| f64::from(o) * f64::from(w)).sum()
        };
        m.forward_kept(&x, rows).unwrap();
        let g = m.input_gradient(&d, top, 0).unwrap();
        // Down to layer 2's input (layer 1's output), then on down to the images.
        let inner = m.input_gradient(&d, top, 2).unwrap();
        assert_eq!(inner.len(), m.output(1).len());
        let chained = m.input_gradient(&inner, 1, 0).unwrap();
        assert_eq!(chained, g, "the gradient carried through layer 2's input");
        let eps = 1e-3f32;
        for j in (0..x.len()).step_by(7) {
            let mut v = x.clone();
            v[j] = x[j] + eps;
            let up = score(&mut m, &v);
            v[j] = x[j] - eps;
            let down = score(&mut m, &v);
            let numeric = (up - down) / (2.0 * f64::from(eps));
            let analytic = f64::from(g[j]);
            assert!(
                (numeric - analytic).abs() <= 2e-3 + 2e-2 * analytic.abs(),
                "pixel {j}: numeric {numeric:.6} vs analytic {analytic:.6} (loss: {:?})",
                m.loss_kind()
            );
        }
    }
}

#[test]
fn a_conv_base_cannot_be_trained_and_gradients_need_a_forward_pass() {
    let mut m = Convnet::conv_base([5, 5, 1], &[conv(2, 3, 1, Padding::Same, Activation::Relu)], 1).unwrap();
    let err = m.input_gradient(&[0.0; 50], 0, 0).unwrap_err().to_string();
    assert!(err.contains("forward_kept"), "{err}");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let err = m.gradients(&[0.0; 25], &[], 1, &mut rng).unwrap_err().to_string();
    assert!(err.contains("no loss"), "{err}");
}

#[test]
fn training_above_a_frozen_base_moves_the_head_as_a_whole_step_would_and_leaves_the_base() {
    let input = [9, 9, 3];
    let specs = [
        conv(4, 3, 1, Padding::Same, Activation::Relu),
        pool(2),
        LayerSpec::Flatten,
        LayerSpec::Dropout { rate: 0.5 },
        dense(5, Activation::Relu),
        dense(1, Activation::Sigmoid),
    ];
    let (x, y) = data(input, 6, 1, 5);
    let (mut whole, mut above) =
        (Convnet::new(input, &specs, 3, 2).unwrap(), Convnet::new(input, &specs, 3, 2).unwrap());
    let before: Vec<Vec<f32>> = above.tensors().iter().map(|(_, _, v)| v.to_vec()).collect();
    // Layers 0-1 frozen: the head (layers 2..) trains on what they make.
    let maps = above.layer_output(&x, 6, 2).unwrap();
    let spec = OptimizerSpec::rmsprop(1e-2);
    let (mut opt_whole, mut opt_above) = (ConvOptimizer::new(spec), ConvOptimizer::new(spec));
    let s_whole = whole.train_batch(&x, &y, 6, &mut opt_whole, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
    let s_above = above.train_batch_above(2, &maps, &y, 6, &mut opt_above, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
    assert_eq!(s_whole, s_above, "the same batch, the same dropout: the same loss and accuracy");
    assert_eq!(opt_above.slots().len(), 4, "slots for the two dense layers' kernels and biases only");
    let (tw, ta) = (whole.tensors(), above.tensors());
    for (i, ((name, _, w), (_, _, a))) in tw.iter().zip(&ta).enumerate() {
        if name.starts_with("conv2d") {
            assert_eq!(*a, before[i].as_slice(), "{name}: frozen, unchanged");
            assert_ne!(*w, before[i].as_slice(), "{name}: the whole step moves it");
        } else {
            assert_eq!(w, a, "{name}: a head's gradient does not depend on whether the base moves");
            assert_ne!(*a, before[i].as_slice(), "{name}: trained");
        }
    }
    // Scoring from layer 2 is scoring from the images.
    let p = above.predict(&x, 6).unwrap();
    let maps = above.layer_output(&x, 6, 2).unwrap();
    assert_eq!(above.predict_above(2, &maps, 6).unwrap(), p);
    assert!(above.predict_above(2, &x, 6).is_err(), "images are not layer 2's input");
}
