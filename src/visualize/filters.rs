//! Section 5.4.2: the input pattern a filter responds to most. Gradient
//! ascent in input space, as the book's `generate_pattern`: start from
//! gray plus noise (`random((1, size, size, 3)) * 20 + 128`), then `steps`
//! times add `step` x the gradient of the filter's mean activation w.r.t.
//! the image, normalised by its root mean square (+1e-5). The gradient
//! runs back through the frozen layers below (`Convnet::input_gradient`).
//!
//! The filters of one layer ascend together, as one batch (image `b`
//! follows filter `b`'s gradient alone: the images do not interact).

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::picture;
use crate::ml::convnet::{Convnet, ConvnetError, Shape};

/// The book's values.
#[derive(Debug, Clone, Copy)]
pub struct Ascent {
    /// Image side (the book: 150).
    pub size: usize,
    /// Gradient-ascent steps (the book: 40) of `step` (the book: 1).
    pub steps: usize,
    pub step: f32,
    /// Seed of the starting noise.
    pub seed: u64,
    /// Filters ascended in one batch (bounds the memory: every layer's output is kept for the backward pass).
    pub batch: usize,
}

impl Default for Ascent {
    fn default() -> Ascent {
        Ascent { size: 150, steps: 40, step: 1.0, seed: 0, batch: 16 }
    }
}

/// One filter's pattern: the final image (model input, `[size, size, 3]`)
/// and its mean activation before each step and after the last.
#[derive(Debug, Clone)]
pub struct Pattern {
    pub filter: usize,
    pub image: Vec<f32>,
    pub trace: Vec<f32>,
}

/// The mean over the map of channel `filter_of[b]` of layer `layer`'s
/// output, for each image `b` of the last forward pass.
fn mean_activations(model: &Convnet, layer: usize, filter_of: &[usize]) -> Vec<f32> {
    let Shape::Map([h, w, c]) = model.layers()[layer].output else { return vec![0.0; filter_of.len()] };
    let out = model.output(layer);
    filter_of
        .iter()
        .enumerate()
        .map(|(b, &f)| {
            let img = &out[b * h * w * c..][..h * w * c];
            (img.iter().skip(f).step_by(c).map(|&v| f64::from(v)).sum::<f64>() / (h * w) as f64) as f32
        })
        .collect()
}

/// The gradient of each image's filter's mean activation w.r.t. the image
/// (forward pass included), and those means.
pub fn gradients(
    model: &mut Convnet,
    layer: usize,
    filter_of: &[usize],
    x: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), ConvnetError> {
    let Shape::Map([h, w, c]) = model.layers()[layer].output else {
        return Err(ConvnetError::Spec(format!("layer {} has no feature map", model.layers()[layer].name)));
    };
    if let Some(&f) = filter_of.iter().find(|&&f| f >= c) {
        return Err(ConvnetError::Spec(format!("layer {} has {c} filters, not {}", model.layers()[layer].name, f + 1)));
    }
    model.forward_kept(x, filter_of.len())?;
    let means = mean_activations(model, layer, filter_of);
    let mut d = vec![0.0f32; filter_of.len() * h * w * c];
    let share = 1.0 / (h * w) as f32;
    for (b, &f) in filter_of.iter().enumerate() {
        d[b * h * w * c..][..h * w * c].iter_mut().skip(f).step_by(c).for_each(|v| *v = share);
    }
    Ok((model.input_gradient(&d, layer, 0)?, means))
}

/// The patterns of `filters` of layer `layer` (the model's last layer is
/// enough: nothing above it is needed), by the book's ascent.
pub fn patterns(
    model: &mut Convnet,
    layer: usize,
    filters: &[usize],
    a: &Ascent,
) -> Result<Vec<Pattern>, ConvnetError> {
    let [h, w, ch] = model.input_shape();
    if h != a.size || w != a.size {
        return Err(ConvnetError::Shape(format!("the model takes {h}x{w} images, the ascent {0}x{0}", a.size)));
    }
    let per = h * w * ch;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let mut out = Vec::with_capacity(filters.len());
    for group in filters.chunks(a.batch.max(1)) {
        let mut x: Vec<f32> = (0..group.len() * per).map(|_| rng.random::<f32>() * 20.0 + 128.0).collect();
        let mut traces = vec![Vec::with_capacity(a.steps + 1); group.len()];
        for _ in 0..a.steps {
            let (g, means) = gradients(model, layer, group, &x)?;
            for (b, m) in means.into_iter().enumerate() {
                traces[b].push(m);
            }
            for (xb, gb) in x.chunks_exact_mut(per).zip(g.chunks_exact(per)) {
                let rms = (gb.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / per as f64).sqrt() as f32;
                let scale = a.step / (rms + 1e-5);
                xb.iter_mut().zip(gb).for_each(|(v, &g)| *v += scale * g);
            }
        }
        model.forward_kept(&x, group.len())?;
        for (b, m) in mean_activations(model, layer, group).into_iter().enumerate() {
            traces[b].push(m);
        }
        for ((b, &filter), trace) in group.iter().enumerate().zip(traces) {
            out.push(Pattern { filter, image: x[b * per..][..per].to_vec(), trace });
        }
    }
    Ok(out)
}

/// The book's `deprocess_image`: minus the mean, over the std (+1e-5),
/// x0.1, +0.5, clipped to [0, 1], x255. The model's input is VGG16's BGR
/// order; the picture is RGB, so the channels are reversed.
pub fn deprocess(image: &[f32], size: usize) -> RgbImage {
    let n = image.len().max(1) as f64;
    let mean = image.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let std = (image.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n).sqrt();
    let px = |v: f32| (((f64::from(v) - mean) / (std + 1e-5) * 0.1 + 0.5).clamp(0.0, 1.0) * 255.0) as u8;
    let mut img = RgbImage::new(size as u32, size as u32);
    for (p, bgr) in img.pixels_mut().zip(image.chunks_exact(3)) {
        *p = image::Rgb([px(bgr[2]), px(bgr[1]), px(bgr[0])]);
    }
    img
}

/// The book's grid: the patterns 8 to a row, 5 pixels apart, under `title`.
pub fn grid(patterns: &[Pattern], size: usize, title: &str) -> Result<RgbImage, String> {
    let tiles: Vec<RgbImage> = patterns.iter().map(|p| deprocess(&p.image, size)).collect();
    picture::grid(&tiles, 8, 5, title)
}
