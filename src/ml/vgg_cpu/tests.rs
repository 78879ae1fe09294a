//! The engine against a plain float64 convolution on random weights, at the
//! sizes where Winograd's tiles (4 and 6) overhang the image or fit it, on every instruction set
//! this CPU has. (tests/vgg_cpu.rs compares it with ONNX Runtime on photos.)

use super::onnx_read::PlainLayer;
use super::*;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn conv(c: usize, k: usize, seed: u64) -> PlainLayer {
    let scale = (2.0 / (9.0 * c as f32)).sqrt();
    PlainLayer::Conv3x3Relu {
        channels: c,
        filters: k,
        weight: values(k * c * 9, seed).iter().map(|v| v * scale).collect(),
        bias: values(k, seed + 1).iter().map(|v| v * 0.1).collect(),
    }
}

/// Float64 reference: `same` 3x3 conv + bias + ReLU, and 2x2 pools, NHWC.
fn reference(layers: &[PlainLayer], x: &[f32], n: usize, h: usize, w: usize) -> (Vec<usize>, Vec<f64>) {
    let mut x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let (mut h, mut w, mut c) = (h, w, 3);
    for l in layers {
        match l {
            PlainLayer::Conv3x3Relu { filters, weight, bias, .. } => {
                let k = *filters;
                let mut out = vec![0f64; n * h * w * k];
                for img in 0..n {
                    for y in 0..h {
                        for xx in 0..w {
                            for f in 0..k {
                                let mut s = f64::from(bias[f]);
                                for ky in 0..3 {
                                    for kx in 0..3 {
                                        let (sy, sx) = (y + ky, xx + kx);
                                        if sy < 1 || sx < 1 || sy > h || sx > w {
                                            continue;
                                        }
                                        let at = ((img * h + sy - 1) * w + sx - 1) * c;
                                        for ci in 0..c {
                                            s += x[at + ci] * f64::from(weight[((f * c + ci) * 3 + ky) * 3 + kx]);
                                        }
                                    }
                                }
                                out[((img * h + y) * w + xx) * k + f] = s.max(0.0);
                            }
                        }
                    }
                }
                x = out;
                c = k;
            }
            PlainLayer::MaxPool2x2 => {
                let (oh, ow) = (h / 2, w / 2);
                let mut out = vec![0f64; n * oh * ow * c];
                for img in 0..n {
                    for y in 0..oh {
                        for xx in 0..ow {
                            for ci in 0..c {
                                let at = |dy: usize, dx: usize| x[((img * h + 2 * y + dy) * w + 2 * xx + dx) * c + ci];
                                out[((img * oh + y) * ow + xx) * c + ci] =
                                    at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
                            }
                        }
                    }
                }
                x = out;
                (h, w) = (oh, ow);
            }
        }
    }
    (vec![n, h, w, c], x)
}

fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.available()).collect()
}

#[test]
fn winograd_and_im2col_layers_match_a_float64_convolution_at_odd_sizes() {
    // 3 -> 16 is im2col; the rest Winograd, with filter counts that leave
    // part of a panel (24, 40) and pools after both kinds.
    let layers = vec![
        conv(3, 16, 1),
        PlainLayer::MaxPool2x2,
        conv(16, 24, 2),
        conv(24, 40, 3),
        PlainLayer::MaxPool2x2,
        conv(40, 32, 4),
    ];
    for (n, h, w) in [(2, 37, 91), (1, 33, 33), (3, 14, 10), (1, 9, 22), (1, 24, 18), (2, 7, 13)] {
        let x = values(n * h * w * 3, (h * w) as u64);
        let (shape, want) = reference(&layers, &x, n, h, w);
        let top = want.iter().fold(0f64, |a, &b| a.max(b.abs()));
        for isa in isas() {
            for tile in [Tile::F4, Tile::F6] {
                for threads in [1, 3] {
                    let engine = VggCpu::from_layers(&layers, threads, isa, Some(tile)).unwrap();
                    let (got_shape, got) = engine.run(&x, n, h, w).unwrap();
                    assert_eq!(got_shape, shape, "{isa:?} {tile:?} {n}x{h}x{w}");
                    let worst = got.iter().zip(&want).map(|(&a, &b)| (f64::from(a) - b).abs()).fold(0f64, f64::max);
                    assert!(
                        worst / top < 1e-5,
                        "{isa:?} {tile:?} threads {threads} {n}x{h}x{w}: max diff {worst} of {top}"
                    );
                }
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_a_bit() {
    let layers = vec![conv(3, 16, 7), conv(16, 32, 8), PlainLayer::MaxPool2x2, conv(32, 32, 9)];
    let x = values(2 * 41 * 29 * 3, 5);
    for isa in isas() {
        for tile in [Tile::F4, Tile::F6] {
            let one = VggCpu::from_layers(&layers, 1, isa, Some(tile)).unwrap().run(&x, 2, 41, 29).unwrap();
            let four = VggCpu::from_layers(&layers, 4, isa, Some(tile)).unwrap().run(&x, 2, 41, 29).unwrap();
            assert!(one == four, "{isa:?} {tile:?}");
        }
    }
}

#[test]
fn too_small_an_image_is_an_error_not_an_empty_tensor() {
    let layers = vec![conv(3, 16, 1), PlainLayer::MaxPool2x2, conv(16, 16, 2), PlainLayer::MaxPool2x2];
    let engine = VggCpu::from_layers(&layers, 1, Isa::Portable, None).unwrap();
    let e = engine.run(&values(3 * 3 * 3, 1), 1, 3, 3).unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");
}
