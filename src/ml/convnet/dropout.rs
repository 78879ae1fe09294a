//! `Dropout` as Keras: during training each value is kept with probability
//! `1 - rate` and scaled by `1 / (1 - rate)` (inverted dropout), so
//! inference is the identity. The mask is drawn from the trainer's
//! per-epoch stream, in row order, so a rerun repeats it.

use rand::Rng;

/// Draws the mask (0 or the keep scale per value) and applies it to `x`.
pub fn forward<R: Rng>(rate: f32, x: &mut [f32], mask: &mut Vec<f32>, rng: &mut R) {
    let scale = 1.0 / (1.0 - rate);
    mask.clear();
    mask.extend((0..x.len()).map(|_| if rng.random::<f32>() < rate { 0.0 } else { scale }));
    x.iter_mut().zip(mask.iter()).for_each(|(v, &m)| *v *= m);
}

/// The gradient passes where the value was kept, with the same scale.
pub fn backward(mask: &[f32], d: &mut [f32]) {
    d.iter_mut().zip(mask).for_each(|(g, &m)| *g *= m);
}
