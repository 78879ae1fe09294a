//! Fill modes: what a sample that falls outside the image reads.
//!
//! Keras's `apply_affine_transform` resamples with
//! `scipy.ndimage.affine_transform(order=1, mode=fill_mode, cval=cval)`, so
//! these are scipy's boundary rules for linear interpolation, measured
//! against scipy 1.17 (see `tests/fixtures/augment/make_references.py`):
//!
//! - `nearest`: the coordinate is clamped to the first/last sample.
//! - `constant`: a coordinate outside `[0, len - 1]` on any axis reads `cval`
//!   (no blending with `cval` across the edge).
//! - `reflect`: half-sample symmetric (`d c b a | a b c d | d c b a`): the
//!   interpolated signal is mirrored about -0.5 and `len - 0.5`.
//! - `wrap`: scipy's own `wrap`, whose period is `len - 1` (the first and
//!   last samples overlap), not `len`; an odd rule, but it is what Keras gets.
//!
//! Each rule is written as a map of the continuous coordinate into
//! `[0, len - 1]`; bilinear interpolation there (neighbours clamped) then
//! gives exactly scipy's value. The map happens on the grid the transform
//! is defined on, which in fused mode is the virtual resized image.

use serde::{Deserialize, Serialize};

/// Keras's `fill_mode` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FillMode {
    #[default]
    Nearest,
    Constant,
    Reflect,
    Wrap,
}

/// A fill mode with the value `constant` writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fill {
    pub mode: FillMode,
    /// Keras's `cval`, on the 0..=255 scale of the pixels (rounded).
    pub cval: f64,
}

impl Fill {
    pub fn new(mode: FillMode, cval: f64) -> Self {
        Fill { mode, cval }
    }

    /// The byte `constant` writes.
    pub fn cval_u8(&self) -> u8 {
        self.cval.round().clamp(0.0, 255.0) as u8
    }
}

impl Default for Fill {
    fn default() -> Self {
        Fill { mode: FillMode::Nearest, cval: 0.0 }
    }
}

impl FillMode {
    /// Where coordinate `x` on an axis of `len` samples reads from: a
    /// coordinate in `[0, len - 1]`, or `None` where scipy writes `cval`.
    pub fn map(self, x: f64, len: u32) -> Option<f64> {
        let last = f64::from(len.max(1) - 1);
        if (0.0..=last).contains(&x) {
            return Some(x);
        }
        if !x.is_finite() {
            return None;
        }
        match self {
            FillMode::Nearest => Some(x.clamp(0.0, last)),
            FillMode::Constant => None,
            FillMode::Reflect => {
                let n = f64::from(len.max(1));
                let period = 2.0 * n;
                let y = x + 0.5;
                let mut y = y - period * floor(y / period) - 0.5;
                if y > n - 0.5 {
                    y = 2.0 * n - 1.0 - y;
                }
                Some(y.clamp(0.0, last))
            }
            FillMode::Wrap => {
                if len <= 1 {
                    return Some(0.0);
                }
                // scipy's integer truncation, so the overlap points land
                // where scipy puts them (-len+1 -> len-1, 2(len-1) -> 0).
                let y = if x < 0.0 { x + last * (trunc(-x / last) + 1.0) } else { x - last * trunc(x / last) };
                Some(y.clamp(0.0, last))
            }
        }
    }
}

/// `f64::trunc` without a libm call (x86-64's baseline has no rounding
/// instruction): the saturating cast is exact below 2^63, and coordinates
/// that large are clamped to the image afterwards anyway.
fn trunc(x: f64) -> f64 {
    x as i64 as f64
}

fn floor(x: f64) -> f64 {
    let t = trunc(x);
    if t > x { t - 1.0 } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scipy.ndimage.affine_transform(a, [[1]], offset=x, order=1, mode=...)
    /// for a = [0, 10, 20, 30, 40], printed by scipy 1.17.
    fn lerp(a: &[f64], x: f64) -> f64 {
        let i = x.floor() as usize;
        let f = x - x.floor();
        let j = (i + 1).min(a.len() - 1);
        a[i] * (1.0 - f) + a[j] * f
    }

    fn sample(mode: FillMode, x: f64) -> f64 {
        let a = [0.0, 10.0, 20.0, 30.0, 40.0];
        mode.map(x, 5).map_or(-1.0, |y| lerp(&a, y))
    }

    #[test]
    fn matches_scipy_order_1_on_a_ramp() {
        let xs = [-6.0, -4.5, -4.0, -3.5, -1.5, -1.0, -0.5, 0.0, 0.5, 4.0, 4.5, 5.5, 7.0, 8.0];
        let want: [(FillMode, [f64; 14]); 4] = [
            (FillMode::Nearest, [0., 0., 0., 0., 0., 0., 0., 0., 5., 40., 40., 40., 40., 40.]),
            (FillMode::Constant, [-1., -1., -1., -1., -1., -1., -1., 0., 5., 40., -1., -1., -1., -1.]),
            (FillMode::Reflect, [40., 35., 30., 25., 5., 0., 0., 0., 5., 40., 40., 35., 20., 10.]),
            (FillMode::Wrap, [20., 35., 40., 5., 25., 30., 35., 0., 5., 40., 5., 15., 30., 0.]),
        ];
        for (mode, values) in want {
            for (x, v) in xs.iter().zip(values) {
                assert_eq!(sample(mode, *x), v, "{mode:?} at {x}");
            }
        }
    }
}
