//! Keras's default initialisers: `glorot_uniform` kernels (limit
//! `sqrt(6 / (fan_in + fan_out))`, where a convolution's fans are
//! `kh * kw * in` and `kh * kw * filters`), zero biases. Each layer draws
//! from its own stream of the model seed, so changing one layer leaves the
//! others' weights as they were.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn glorot_uniform(len: usize, fan_in: usize, fan_out: usize, seed: u64, layer: usize) -> Vec<f32> {
    let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(layer as u64 + 1);
    (0..len).map(|_| rng.random_range(-limit..limit)).collect()
}
