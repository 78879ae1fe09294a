//! The augmentation options: Keras `ImageDataGenerator`'s names, meanings
//! and defaults (everything off, `fill_mode: nearest`), plus the seed and
//! the optional fused output size.

use serde::{Deserialize, Serialize};

use super::fill::{Fill, FillMode};
use crate::stage::FieldError;

/// `width_shift_range` / `height_shift_range`, read as Keras reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a number (a fraction of the size when < 1, else pixels), or a list of choices")]
pub enum ShiftRange {
    /// An integer `n`: a whole number of pixels in `(-n, n)` (Keras draws
    /// `choice(n) * choice([-1, 1])`).
    Pixels(u64),
    /// A float: uniform in `[-a, a)`, times the size when `a < 1`.
    Amount(f64),
    /// One of the values with a random sign; times the size when all are < 1.
    Choices(Vec<f64>),
}

impl Default for ShiftRange {
    fn default() -> Self {
        ShiftRange::Amount(0.0)
    }
}

/// `zoom_range`: `z` means `[1 - z, 1 + z]`; zx and zy are drawn from it
/// independently (below 1 zooms in, above 1 zooms out).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a number z (zoom in [1-z, 1+z]) or [lo, hi]")]
pub enum ZoomRange {
    Amount(f64),
    Range([f64; 2]),
}

impl Default for ZoomRange {
    fn default() -> Self {
        ZoomRange::Amount(0.0)
    }
}

impl ZoomRange {
    pub fn bounds(&self) -> (f64, f64) {
        match *self {
            ZoomRange::Amount(z) => (1.0 - z, 1.0 + z),
            ZoomRange::Range([lo, hi]) => (lo, hi),
        }
    }
}

/// The options of the `augment` stage (and of `convflow augment-preview`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AugmentOptions {
    /// Degrees; the angle is uniform in `[-r, r)`.
    #[serde(default)]
    pub rotation_range: f64,
    #[serde(default)]
    pub width_shift_range: ShiftRange,
    #[serde(default)]
    pub height_shift_range: ShiftRange,
    /// Degrees (keras_preprocessing >= 1.0.6), uniform in `[-s, s)`.
    #[serde(default)]
    pub shear_range: f64,
    #[serde(default)]
    pub zoom_range: ZoomRange,
    /// One uniform intensity in `[-c, c)` added to every channel.
    #[serde(default)]
    pub channel_shift_range: f64,
    #[serde(default)]
    pub fill_mode: FillMode,
    /// The value `fill_mode: constant` writes, on the 0..=255 pixel scale.
    #[serde(default)]
    pub cval: f64,
    #[serde(default)]
    pub horizontal_flip: bool,
    #[serde(default)]
    pub vertical_flip: bool,
    /// `[lo, hi]`: a brightness factor uniform in it (1 = unchanged).
    #[serde(default)]
    pub brightness_range: Option<[f64; 2]>,
    /// Draws derive from (seed, epoch, variant, content hash).
    #[serde(default)]
    pub seed: u64,
    /// `[height, width]`: take the full-size image and fold "resize to this
    /// size, then augment" into one warp. Without it, the image is
    /// augmented at its incoming size (after a `resize` stage, Keras's path).
    #[serde(default)]
    pub size: Option<[u32; 2]>,
}

impl AugmentOptions {
    /// The book's augmentation (Deep Learning with Python, listing 5.11),
    /// fused at 150x150.
    pub fn book() -> Self {
        AugmentOptions {
            rotation_range: 40.0,
            width_shift_range: ShiftRange::Amount(0.2),
            height_shift_range: ShiftRange::Amount(0.2),
            shear_range: 0.2,
            zoom_range: ZoomRange::Amount(0.2),
            horizontal_flip: true,
            size: Some([150, 150]),
            ..AugmentOptions::default()
        }
    }

    pub fn fill(&self) -> Fill {
        Fill::new(self.fill_mode, self.cval)
    }

    /// `(height, width)` of the fused output, when set.
    pub fn size(&self) -> Option<(u32, u32)> {
        self.size.map(|[h, w]| (h, w))
    }

    /// Everything wrong with the values, each naming its field.
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let non_negative = |errors: &mut Vec<FieldError>, field: &str, v: f64| {
            if !(v.is_finite() && v >= 0.0) {
                errors.push(FieldError::new(field, format!("must be a number >= 0, got {v}")));
            }
        };
        non_negative(&mut errors, "rotation_range", self.rotation_range);
        non_negative(&mut errors, "shear_range", self.shear_range);
        non_negative(&mut errors, "channel_shift_range", self.channel_shift_range);
        for (field, range) in
            [("width_shift_range", &self.width_shift_range), ("height_shift_range", &self.height_shift_range)]
        {
            match range {
                ShiftRange::Pixels(_) => {}
                ShiftRange::Amount(a) => non_negative(&mut errors, field, *a),
                ShiftRange::Choices(values) => {
                    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                        errors.push(FieldError::new(field, format!("choices must be finite numbers, got {v}")));
                    }
                }
            }
        }
        match self.zoom_range {
            ZoomRange::Amount(z) if !(z.is_finite() && (0.0..1.0).contains(&z)) => errors.push(FieldError::new(
                "zoom_range",
                format!("must be in [0, 1) (zoom factors 1-z..1+z stay above 0), got {z}"),
            )),
            ZoomRange::Range([lo, hi]) if !(lo.is_finite() && hi.is_finite() && lo > 0.0) => errors
                .push(FieldError::new("zoom_range", format!("[lo, hi] must be finite and above 0, got [{lo}, {hi}]"))),
            ZoomRange::Range([lo, hi]) if lo > hi => {
                errors.push(FieldError::new("zoom_range", format!("lo ({lo}) is above hi ({hi})")))
            }
            _ => {}
        }
        if !(self.cval.is_finite() && (0.0..=255.0).contains(&self.cval)) {
            errors.push(FieldError::new("cval", format!("must be in [0, 255] (the pixel scale), got {}", self.cval)));
        }
        if let Some([lo, hi]) = self.brightness_range {
            if !(lo.is_finite() && hi.is_finite() && lo >= 0.0) {
                errors.push(FieldError::new("brightness_range", format!("[lo, hi] must be >= 0, got [{lo}, {hi}]")));
            } else if lo > hi {
                errors.push(FieldError::new("brightness_range", format!("lo ({lo}) is above hi ({hi})")));
            }
        }
        if self.size.is_some_and(|s| s.contains(&0)) {
            errors.push(FieldError::new("size", "height and width must be at least 1"));
        }
        errors
    }
}
