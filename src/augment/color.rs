//! The pointwise steps Keras's `apply_transform` runs after the warp:
//! channel shift (`apply_channel_shift`) and brightness
//! (`apply_brightness_shift`, i.e. PIL `ImageEnhance.Brightness`). Both map
//! each byte through one 256-entry table, so they cost one pass together.

use image::RgbImage;

/// Adds `intensity` to every channel and clips to the image's own minimum
/// and maximum (over all channels), as Keras does; then, with `brightness`,
/// multiplies by it the way PIL's `Image.blend` with black does (truncating,
/// clipped to 255). Keras rounds nothing here, but the output is bytes: the
/// channel shift rounds to nearest.
///
/// Keras 1.1.2 also stretches the image to 0..255 before the brightness
/// step (`array_to_img(scale=True)`); that side effect is not reproduced.
pub fn shift_and_brighten(img: &mut RgbImage, intensity: Option<f64>, brightness: Option<f64>) {
    if intensity.is_none() && brightness.is_none() {
        return;
    }
    let (lo, hi) = match intensity {
        Some(_) => img.iter().fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v))),
        None => (0, 255),
    };
    let mut table = [0u8; 256];
    for (v, t) in table.iter_mut().enumerate() {
        let mut x = v as f64;
        if let Some(i) = intensity {
            x = (x + i).clamp(f64::from(lo), f64::from(hi));
        }
        *t = match brightness {
            // PIL multiplies in single precision and casts to a byte
            // (truncation); Keras handed it the truncated array first.
            Some(b) => (x.trunc() as f32 * b as f32).clamp(0.0, 255.0) as u8,
            None => x.round() as u8,
        };
    }
    img.iter_mut().for_each(|v| *v = table[*v as usize]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_shift_clips_to_the_images_own_range() {
        let mut img = RgbImage::from_raw(2, 1, vec![10, 20, 30, 40, 50, 60]).unwrap();
        shift_and_brighten(&mut img, Some(25.4), None);
        assert_eq!(img.as_raw(), &[35, 45, 55, 60, 60, 60]);
        shift_and_brighten(&mut img, Some(-100.0), None);
        assert_eq!(img.as_raw(), &[35, 35, 35, 35, 35, 35]);
    }

    #[test]
    fn brightness_truncates_like_pil() {
        // Values printed by Pillow's ImageEnhance.Brightness.
        for (b, want) in [(1.55, [15, 155, 255]), (0.7, [7, 70, 140]), (0.33, [3, 33, 66])] {
            let mut img = RgbImage::from_raw(1, 1, vec![10, 100, 200]).unwrap();
            shift_and_brighten(&mut img, None, Some(b));
            assert_eq!(img.as_raw(), &want, "brightness {b}");
        }
    }
}
