//! Random image augmentation with Keras `ImageDataGenerator`'s transforms
//! and meanings, done in one resampling pass.
//!
//! Keras draws parameters (`get_random_transform`), warps with scipy
//! (`apply_affine_transform`: rotation, shift, shear, zoom composed into one
//! matrix, bilinear), then flips, shifts channels and changes brightness
//! (`apply_transform`). Here the draws ([`draw`]) derive from (seed, epoch,
//! variant, content hash); the matrix ([`affine`]) is Keras's, with the
//! flips folded in, and optionally the resize before it (fused mode); the
//! warp ([`warp`]) reads every output pixel once with scipy's boundary
//! rules ([`fill`]); the pointwise steps ([`color`]) are one table lookup.
//!
//! Pure: no stage, channel or thread in here. The `augment` stage
//! (`crate::stages::augment`) calls [`AugmentOptions::augment`],
//! `convflow augment-preview` calls [`preview_grid`], and tests call
//! [`apply_transform`] with fixed parameters to compare with Keras.

pub mod affine;
pub mod color;
pub mod draw;
pub mod fill;
pub mod options;
pub mod preview;
pub mod warp;

use image::{GrayImage, RgbImage};

pub use draw::DrawKey;
pub use fill::{Fill, FillMode};
pub use options::{AugmentOptions, ShiftRange, ZoomRange};
pub use preview::preview_grid;
pub use warp::Kernel;

/// One image's transform: Keras's `transform_parameters`, same names and
/// units (degrees, pixels; `tx` along rows, `ty` along columns, `zx` scales
/// rows, `zy` columns, as in Keras's code).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    pub theta: f64,
    pub tx: f64,
    pub ty: f64,
    pub shear: f64,
    pub zx: f64,
    pub zy: f64,
    pub flip_horizontal: bool,
    pub flip_vertical: bool,
    pub channel_shift_intensity: Option<f64>,
    pub brightness: Option<f64>,
}

impl Default for Transform {
    fn default() -> Self {
        Transform {
            theta: 0.0,
            tx: 0.0,
            ty: 0.0,
            shear: 0.0,
            zx: 1.0,
            zy: 1.0,
            flip_horizontal: false,
            flip_vertical: false,
            channel_shift_intensity: None,
            brightness: None,
        }
    }
}

/// Keras's `apply_transform(x, transform_parameters)` with `fill_mode` and
/// `cval`. With `size`, the image is first (virtually) resized to
/// `(height, width)` and the transform is defined on that grid, as when
/// Keras loads with `target_size`; the source is sampled directly.
pub fn apply_transform(img: &RgbImage, t: &Transform, fill: Fill, size: Option<(u32, u32)>) -> RgbImage {
    apply_transform_with(img, t, fill, size, Kernel::Auto)
}

/// [`apply_transform`] with a chosen inner loop (tests and benches).
pub fn apply_transform_with(
    img: &RgbImage,
    t: &Transform,
    fill: Fill,
    size: Option<(u32, u32)>,
    kernel: Kernel,
) -> RgbImage {
    let incoming = (img.height(), img.width());
    let (h, w) = size.unwrap_or(incoming);
    let keras = affine::keras_matrix(t, h, w).unwrap_or(affine::Affine::IDENTITY);
    let to_grid = keras.mul(&affine::flips(t.flip_horizontal, t.flip_vertical, h, w));
    let mut out = if to_grid.is_identity() && (h, w) == incoming {
        img.clone()
    } else {
        warp::warp(img, (h, w), &to_grid, (h, w), fill, kernel)
    };
    color::shift_and_brighten(&mut out, t.channel_shift_intensity, t.brightness);
    out
}

impl AugmentOptions {
    /// The transform drawn for this image (on the grid it is defined on:
    /// `size`, or the image's own size).
    pub fn transform_for(&self, img: &RgbImage, epoch: u32, variant: u32, content_hash: &[u8; 32]) -> Transform {
        let (h, w) = self.size().unwrap_or((img.height(), img.width()));
        let key = DrawKey { seed: self.seed, epoch, variant, content_hash };
        self.random_transform(&mut key.rng(), h, w)
    }

    /// Augments one image: the same (seed, epoch, variant, content hash)
    /// always gives the same pixels.
    pub fn augment(&self, img: &RgbImage, epoch: u32, variant: u32, content_hash: &[u8; 32]) -> RgbImage {
        let t = self.transform_for(img, epoch, variant, content_hash);
        apply_transform(img, &t, self.fill(), self.size())
    }

    /// [`AugmentOptions::augment`] for a one-channel image. It is warped as
    /// the RGB image of three equal channels and one channel kept: every
    /// step treats channels alike (one bilinear weight per pixel, one
    /// channel shift for all channels clipped to the image's own range, one
    /// brightness factor, one `cval`), so this is exactly the gray result,
    /// with the same draws as an RGB image of that content.
    pub fn augment_gray(&self, img: &GrayImage, epoch: u32, variant: u32, content_hash: &[u8; 32]) -> GrayImage {
        let rgb = RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let v = img.get_pixel(x, y)[0];
            image::Rgb([v, v, v])
        });
        let out = self.augment(&rgb, epoch, variant, content_hash);
        GrayImage::from_raw(out.width(), out.height(), out.as_raw().iter().step_by(3).copied().collect())
            .expect("one byte per pixel")
    }
}
