//! The random draws: Keras's `get_random_transform`, fed by a generator
//! derived from (seed, epoch, variant, content hash) alone, so an image gets
//! the same transform whichever worker handles it and whenever it runs.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Transform;
use super::options::{AugmentOptions, ShiftRange};

/// What one image's draws derive from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrawKey<'a> {
    pub seed: u64,
    pub epoch: u32,
    pub variant: u32,
    pub content_hash: &'a [u8; 32],
}

impl DrawKey<'_> {
    pub fn rng(&self) -> ChaCha8Rng {
        let mut h = blake3::Hasher::new_derive_key("convflow augment draws v1");
        h.update(&self.seed.to_le_bytes())
            .update(&self.epoch.to_le_bytes())
            .update(&self.variant.to_le_bytes())
            .update(self.content_hash);
        ChaCha8Rng::from_seed(*h.finalize().as_bytes())
    }
}

/// numpy's `uniform(lo, hi)`: `lo + (hi - lo) * U[0, 1)`, fine when lo == hi.
fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

fn sign(rng: &mut impl Rng) -> f64 {
    if rng.random::<bool>() { 1.0 } else { -1.0 }
}

/// A shift in pixels for an axis of `size` pixels, as Keras draws it.
fn shift(range: &ShiftRange, size: u32, rng: &mut impl Rng) -> f64 {
    let size = f64::from(size);
    match range {
        ShiftRange::Amount(a) if *a == 0.0 => 0.0,
        ShiftRange::Amount(a) => uniform(rng, -a, *a) * if *a < 1.0 { size } else { 1.0 },
        ShiftRange::Pixels(0) => 0.0,
        ShiftRange::Pixels(n) => rng.random_range(0..*n) as f64 * sign(rng),
        ShiftRange::Choices(values) if values.is_empty() => 0.0,
        ShiftRange::Choices(values) => {
            let v = values[rng.random_range(0..values.len())] * sign(rng);
            if values.iter().all(|v| *v < 1.0) { v * size } else { v }
        }
    }
}

impl AugmentOptions {
    /// Keras's `get_random_transform` for an `h x w` image, in its order.
    pub fn random_transform(&self, rng: &mut impl Rng, h: u32, w: u32) -> Transform {
        let r = self.rotation_range;
        let theta = if r != 0.0 { uniform(rng, -r, r) } else { 0.0 };
        let tx = shift(&self.height_shift_range, h, rng);
        let ty = shift(&self.width_shift_range, w, rng);
        let s = self.shear_range;
        let shear = if s != 0.0 { uniform(rng, -s, s) } else { 0.0 };
        let (lo, hi) = self.zoom_range.bounds();
        let (zx, zy) = if lo == 1.0 && hi == 1.0 { (1.0, 1.0) } else { (uniform(rng, lo, hi), uniform(rng, lo, hi)) };
        let flip_horizontal = rng.random::<f64>() < 0.5 && self.horizontal_flip;
        let flip_vertical = rng.random::<f64>() < 0.5 && self.vertical_flip;
        let c = self.channel_shift_range;
        let channel_shift_intensity = (c != 0.0).then(|| uniform(rng, -c, c));
        let brightness = self.brightness_range.map(|[lo, hi]| uniform(rng, lo, hi));
        Transform { theta, tx, ty, shear, zx, zy, flip_horizontal, flip_vertical, channel_shift_intensity, brightness }
    }
}
