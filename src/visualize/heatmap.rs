//! Section 5.4.3: Grad-CAM, where in a photo a classifier saw its class
//! (the book's listings 5.40-5.43, after Selvaraju et al.).
//!
//! For a class c with probability p_c (the book's `model.output[:, c]`:
//! for one sigmoid unit, P(class 1) = p and P(class 0) = 1 - p; for a
//! softmax, p_c) and a conv layer whose output A is `[h, w, K]` (after its
//! ReLU), the weight of channel k is the mean over the map of dp_c/dA:
//! `alpha_k = mean_{y,x} dp_c/dA[y, x, k]`, and the heatmap is
//! `max(sum_k alpha_k A[:, :, k], 0)`, divided by its maximum (all zeros
//! when that is 0, where the book's division gives NaN).
//!
//! Drawn as the book draws it: the heatmap resized to the photo's size
//! (bilinear, OpenCV's `INTER_LINEAR`), made 8-bit (`np.uint8(255 * h)`),
//! coloured with jet, and *added* to the photo, `jet * intensity + photo`
//! (intensity 0.4), then clipped to 0..255: not an alpha blend, so the
//! photo keeps its full brightness under the colours.
//!
//! The probability saturates (a confident sigmoid has dp/dz = 4e-44 at
//! z = 100), so its gradient is scaled per image before the f32 backward
//! pass; the normalised heatmap does not change with a positive factor.

use image::RgbImage;

use super::picture::jet;
use crate::ml::activation::sigmoid;
use crate::ml::convnet::{Convnet, ConvnetError, Shape};
use crate::ml::loss::LossKind;

/// Which class each heatmap is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassChoice {
    /// The class the model predicts for the image.
    Predicted,
    /// This class (an index into the model's classes).
    Index(usize),
}

/// One image's Grad-CAM.
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    /// The class it is of, and the model's probability of that class.
    pub class: usize,
    pub probability: f32,
    /// The class the model predicts.
    pub predicted: usize,
    /// `[height, width]` of the conv layer's map.
    pub shape: [usize; 2],
    /// Row-major, in 0..1 (max 1 unless all zero).
    pub values: Vec<f32>,
}

/// Per class, the probability a model's last layer gives from one row of
/// its logits: `[1 - p, p]` for one sigmoid unit, the softmax otherwise.
/// In f64, each term computed without cancellation (1 - p as sigmoid(-z),
/// 1 - p_c as the sum of the others), so a confident prediction keeps a
/// gradient instead of rounding to p = 1, dp = 0.
fn probabilities(loss: LossKind, z: &[f32]) -> Vec<f64> {
    let s = |v: f64| 1.0 / (1.0 + (-v).exp());
    match loss {
        LossKind::BinaryCrossentropy => vec![s(-f64::from(z[0])), s(f64::from(z[0]))],
        LossKind::CategoricalCrossentropy => {
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = z.iter().map(|&v| f64::from(v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.iter().map(|v| v / sum).collect()
        }
    }
}

/// The predicted class as the predictions CSV names it (`head_predict`,
/// `convnet_predict`): the largest of the f32 probabilities that
/// [`Convnet::predict`] gives, the later class on a tie.
fn predicted(loss: LossKind, z: &[f32]) -> usize {
    let p: Vec<f32> = match loss {
        LossKind::BinaryCrossentropy => {
            let p = sigmoid(z[0]);
            vec![1.0 - p, p]
        }
        LossKind::CategoricalCrossentropy => probabilities(loss, z).iter().map(|&v| v as f32).collect(),
    };
    p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
}

/// dp_c/dz for one row of logits `z`, given `p` = [`probabilities`],
/// scaled so that its largest entry is 1 in size. The heatmap is
/// normalised by its maximum, so a positive factor leaves it as it is; but
/// a confident sigmoid (z = 100: dp/dz = 4e-44) would underflow to zero in
/// the f32 backward pass, and the heatmap with it.
fn score_gradient(loss: LossKind, p: &[f64], c: usize) -> Vec<f32> {
    let d: Vec<f64> = match loss {
        // p_1 = sigmoid(z): dp_1/dz = p_1 p_0, and p_0 = 1 - p_1 falls as fast.
        LossKind::BinaryCrossentropy => vec![if c == 1 { p[0] * p[1] } else { -p[0] * p[1] }],
        // dp_c/dz_j = p_c (delta_cj - p_j), with 1 - p_c as the others' sum.
        LossKind::CategoricalCrossentropy => {
            let rest: f64 = p.iter().enumerate().filter(|&(j, _)| j != c).map(|(_, v)| v).sum();
            (0..p.len()).map(|j| p[c] * if j == c { rest } else { -p[j] }).collect()
        }
    };
    let top = d.iter().fold(0f64, |m, v| m.max(v.abs()));
    d.iter().map(|&v| if top > 0.0 { (v / top) as f32 } else { 0.0 }).collect()
}

/// `max(sum_k alpha_k A[:, :, k], 0) / max`, alpha_k the mean of `grad`'s
/// channel k; `maps` and `grad` are one image's `[h, w, k]`, NHWC.
pub fn grad_cam(maps: &[f32], grad: &[f32], shape: [usize; 3]) -> Vec<f32> {
    let [h, w, k] = shape;
    let cells = h * w;
    let mut alpha = vec![0f64; k];
    for g in grad.chunks_exact(k) {
        alpha.iter_mut().zip(g).for_each(|(a, &v)| *a += f64::from(v));
    }
    alpha.iter_mut().for_each(|a| *a /= cells.max(1) as f64);
    let cam: Vec<f64> = maps
        .chunks_exact(k)
        .map(|a| a.iter().zip(&alpha).map(|(&v, &al)| f64::from(v) * al).sum::<f64>().max(0.0))
        .collect();
    let max = cam.iter().copied().fold(0.0, f64::max);
    cam.iter().map(|&v| if max > 0.0 { (v / max) as f32 } else { 0.0 }).collect()
}

/// The Grad-CAM of each of `rows` inputs `x` (as the model takes them)
/// w.r.t. the output of conv layer `layer`, for the class `choice` picks.
pub fn heatmaps(
    model: &mut Convnet,
    x: &[f32],
    rows: usize,
    layer: usize,
    choice: ClassChoice,
) -> Result<Vec<Heatmap>, ConvnetError> {
    let loss = model
        .loss_kind()
        .ok_or_else(|| ConvnetError::Spec("Grad-CAM needs a classifier: this model has no output layer".into()))?;
    let n = model.layers().len();
    let Some(Shape::Map(shape)) = model.layers().get(layer).map(|l| l.output) else {
        return Err(ConvnetError::Spec(format!("layer {layer} does not make a feature map")));
    };
    if layer + 1 >= n {
        return Err(ConvnetError::Spec(format!("layer {layer} is the model's last: nothing to take a class from")));
    }
    model.forward_kept(x, rows)?;
    let outputs = model.output_dim();
    let logits = model.output(n - 1).to_vec();
    let mut d = Vec::with_capacity(logits.len());
    let mut picked = Vec::with_capacity(rows);
    for z in logits.chunks_exact(outputs) {
        let p = probabilities(loss, z);
        let predicted = predicted(loss, z);
        let class = match choice {
            ClassChoice::Predicted => predicted,
            ClassChoice::Index(c) if c < p.len() => c,
            ClassChoice::Index(c) => {
                return Err(ConvnetError::Spec(format!("class {c}: the model has {} classes", p.len())));
            }
        };
        d.extend(score_gradient(loss, &p, class));
        picked.push((class, p[class] as f32, predicted));
    }
    // The scores of different images do not mix, so one backward pass of
    // their sum gives every image's own gradient.
    let grad = model.input_gradient(&d, n - 1, layer + 1)?;
    let maps = model.output(layer);
    let per = shape.iter().product::<usize>();
    Ok(picked
        .into_iter()
        .enumerate()
        .map(|(i, (class, probability, predicted))| Heatmap {
            class,
            probability,
            predicted,
            shape: [shape[0], shape[1]],
            values: grad_cam(&maps[i * per..(i + 1) * per], &grad[i * per..(i + 1) * per], shape),
        })
        .collect())
}

/// The cell where the heatmap is largest (the first, row-major, as
/// `np.argmax`), as (row, column); `None` when it is all zero.
pub fn peak(h: &Heatmap) -> Option<(usize, usize)> {
    let (i, &v) = h.values.iter().enumerate().fold((0, &0f32), |best, cur| if cur.1 > best.1 { cur } else { best });
    (v > 0.0).then_some((i / h.shape[1], i % h.shape[1]))
}

/// Where a cell's centre falls in a photo of `[height, width]`, as (y, x) pixels.
pub fn cell_centre(h: &Heatmap, cell: (usize, usize), photo: [u32; 2]) -> (u32, u32) {
    let at = |i: usize, cells: usize, px: u32| ((i as f64 + 0.5) * f64::from(px) / cells as f64) as u32;
    (at(cell.0, h.shape[0], photo[0]), at(cell.1, h.shape[1], photo[1]))
}

/// OpenCV's `cv2.resize(src, (width, height))` (`INTER_LINEAR`) of a
/// row-major `[rows, cols]` float image: pixel centres aligned, source
/// coordinate `(d + 0.5) * scale - 0.5`, clamped to the edge pixels.
pub fn resize_bilinear(src: &[f32], rows: usize, cols: usize, height: usize, width: usize) -> Vec<f32> {
    // (first source index, weight of the next) per destination index.
    let taps = |n: usize, m: usize| -> Vec<(usize, f32)> {
        let scale = n as f64 / m as f64;
        (0..m)
            .map(|d| {
                let f = (d as f64 + 0.5) * scale - 0.5;
                let i = f.floor();
                match i {
                    i if i < 0.0 => (0, 0.0),
                    i if i as usize >= n - 1 => (n - 1, 0.0),
                    i => (i as usize, (f - i) as f32),
                }
            })
            .collect()
    };
    if rows == 0 || cols == 0 {
        return vec![0.0; height * width];
    }
    let (ys, xs) = (taps(rows, height), taps(cols, width));
    let at = |r: usize, c: usize| src[r * cols + c];
    let mut out = Vec::with_capacity(height * width);
    for &(r, fy) in &ys {
        let r1 = (r + 1).min(rows - 1);
        for &(c, fx) in &xs {
            let c1 = (c + 1).min(cols - 1);
            let top = at(r, c) * (1.0 - fx) + at(r, c1) * fx;
            let bottom = at(r1, c) * (1.0 - fx) + at(r1, c1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// The book's figure 5.35: the heatmap resized to the photo, made 8-bit,
/// in jet, times `intensity`, added to the photo and clipped.
pub fn superimpose(photo: &RgbImage, h: &Heatmap, intensity: f32) -> RgbImage {
    let (width, height) = photo.dimensions();
    let big = resize_bilinear(&h.values, h.shape[0], h.shape[1], height as usize, width as usize);
    // jet of each 8-bit level, once.
    let colours: Vec<[u8; 3]> = (0..=255u8).map(|q| jet(f32::from(q) / 255.0)).collect();
    let mut out = photo.clone();
    for (px, &v) in out.pixels_mut().zip(&big) {
        // np.uint8(255 * heatmap): truncation, as the book's cast.
        let colour = colours[(255.0 * v.clamp(0.0, 1.0)) as usize];
        for (p, &c) in px.0.iter_mut().zip(&colour) {
            *p = (f32::from(c) * intensity + f32::from(*p)).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::convnet::LayerSpec;
    use crate::ml::convnet::spec::Pair;

    #[test]
    fn weights_are_the_mean_gradient_and_the_map_is_relu_then_normalised() {
        // 1x2 map, 2 channels: A = [[1, 2], [3, 0]]; grad channel 0 = 1, 3
        // (mean 2), channel 1 = -1, -1 (mean -1): cam = [2 - 2, 6 - 0] = [0, 6].
        let maps = [1.0, 2.0, 3.0, 0.0];
        let grad = [1.0, -1.0, 3.0, -1.0];
        assert_eq!(grad_cam(&maps, &grad, [1, 2, 2]), vec![0.0, 1.0]);
        // Everything negative: all zeros, not NaN.
        assert_eq!(grad_cam(&maps, &[-1.0; 4], [1, 2, 2]), vec![0.0, 0.0]);
    }

    #[test]
    fn a_sigmoid_unit_scores_both_classes_and_keeps_a_gradient_when_confident() {
        let loss = LossKind::BinaryCrossentropy;
        let p = probabilities(loss, &[40.0]);
        assert!(p[0] > 0.0 && p[0] < 1e-17, "{p:?}");
        // p = 1 - 4e-18 still has a slope, its sign the class's (scaled to 1).
        assert_eq!(score_gradient(loss, &p, 1), vec![1.0]);
        assert_eq!(score_gradient(loss, &p, 0), vec![-1.0]);
        assert_eq!(score_gradient(loss, &probabilities(loss, &[100.0]), 1), vec![1.0], "not 4e-44 -> 0 in f32");
        assert_eq!(predicted(loss, &[0.0]), 1, "a tie is the later class, as the predictions CSV");
        assert_eq!(predicted(loss, &[-0.1]), 0);
    }

    #[test]
    fn the_softmax_gradient_is_the_finite_difference() {
        let loss = LossKind::CategoricalCrossentropy;
        let z = [0.3f32, -1.2, 2.0];
        let g = score_gradient(loss, &probabilities(loss, &z), 2);
        // Scaled by a positive factor: the direction of the finite difference.
        // A power of two: z + h is exact in f32.
        let h = 1.0 / 1024.0;
        let fds: Vec<f64> = (0..3)
            .map(|j| {
                let mut a = z;
                a[j] += h;
                let mut b = z;
                b[j] -= h;
                (probabilities(loss, &a)[2] - probabilities(loss, &b)[2]) / (2.0 * f64::from(h))
            })
            .collect();
        let top = fds.iter().fold(0f64, |m, v| m.max(v.abs()));
        for j in 0..3 {
            let fd = fds[j] / top;
            assert!((f64::from(g[j]) - fd).abs() < 1e-5, "dp2/dz{j}: {} vs {fd}", g[j]);
        }
    }

    /// The whole: a small convnet's heatmap against one made from
    /// finite differences of its probability w.r.t. the conv layer's output.
    #[test]
    fn heatmaps_take_the_gradient_of_the_class_probability() {
        use crate::ml::activation::Activation;
        let conv = |filters, activation| LayerSpec::Conv2d {
            filters,
            kernel_size: Pair::One(3),
            strides: Pair::One(1),
            padding: crate::ml::convnet::conv2d::Padding::Same,
            activation,
        };
        // The layer taken is linear: a ReLU's zeros would tie in the max
        // pool, where a finite difference and a gradient disagree.
        let specs = [
            conv(4, Activation::Relu),
            conv(3, Activation::Linear),
            LayerSpec::MaxPooling2d { pool_size: Pair::One(2), strides: None },
            LayerSpec::Flatten,
            LayerSpec::Dense { units: 5, activation: Activation::Relu },
            LayerSpec::Dense { units: 3, activation: Activation::Softmax },
        ];
        let mut model = Convnet::new([6, 6, 2], &specs, 7, 1).unwrap();
        let x: Vec<f32> = (0..2 * 72).map(|i| ((i * 37 % 17) as f32 / 17.0) - 0.3).collect();
        // p_c of a layer-1 output A pushed through the layers after it (a
        // model of those layers alone, with the same weights).
        let mut tail = Convnet::new([6, 6, 3], &specs[2..], 0, 1).unwrap();
        for (name, _, v) in model.tensors() {
            if name.starts_with("dense") {
                tail.set_tensor(&name, v).unwrap();
            }
        }
        model.forward_kept(&x, 2).unwrap();
        let maps = model.output(1).to_vec();
        // A power of two: A + h is exact in f32.
        let h = 1.0 / 1024.0;
        let mut shaped = 0;
        for c in 0..3 {
            let got = heatmaps(&mut model, &x, 2, 1, ClassChoice::Index(c)).unwrap();
            assert_eq!(got.len(), 2);
            for (image, got) in got.iter().enumerate() {
                let a = &maps[image * 108..(image + 1) * 108];
                let mut p = |a: &[f32]| f64::from(tail.predict(a, 1).unwrap()[c]);
                let fd: Vec<f32> = (0..a.len())
                    .map(|i| {
                        let (mut up, mut down) = (a.to_vec(), a.to_vec());
                        up[i] += h;
                        down[i] -= h;
                        ((p(&up) - p(&down)) / (2.0 * f64::from(h))) as f32
                    })
                    .collect();
                let want = grad_cam(a, &fd, [6, 6, 3]);
                let worst = got.values.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-3, "image {image}, class {c}: {worst}: {:?} vs {want:?}", got.values);
                assert_eq!((got.class, got.shape), (c, [6, 6]));
                shaped += usize::from(want.iter().any(|&v| v > 0.0 && v < 1.0));
            }
        }
        // Some are all zero (every channel weighs against the class); enough are not.
        assert!(shaped >= 2, "only {shaped} of 6 heatmaps have a shape to compare");
    }

    #[test]
    fn bilinear_resize_is_opencvs() {
        // cv2.resize(np.float32([[0, 1], [2, 3]]), (4, 4)) (INTER_LINEAR).
        let got = resize_bilinear(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4);
        let want = [0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0f32];
        assert_eq!(got, want);
    }

    #[test]
    fn superimposing_adds_the_colours_and_clips() {
        let photo = RgbImage::from_pixel(2, 1, image::Rgb([100, 200, 250]));
        let h = Heatmap { class: 0, probability: 1.0, predicted: 0, shape: [1, 2], values: vec![0.0, 1.0] };
        let out = superimpose(&photo, &h, 0.4);
        // Left: resized value 0 -> jet(0) = dark blue (0, 0, 128); right: 1 -> (128, 0, 0).
        assert_eq!(out.get_pixel(0, 0).0, [100, 200, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [151, 200, 250]);
        assert_eq!(peak(&h), Some((0, 1)));
        assert_eq!(cell_centre(&h, (0, 1), [1, 2]), (0, 1));
    }
}
