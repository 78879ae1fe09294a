//! A small synthetic two-class JPEG data set, so a fresh clone can run the
//! main job without the Kaggle photos: `cats` are warm blobs on a light
//! ground, `dogs` cool stripes on a dark one, in varied sizes and framings.

use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};

/// Images per class in each split.
pub const SPLITS: &[(&str, usize)] = &[("train", 40), ("validation", 20), ("test", 20)];
const CLASSES: &[&str] = &["cats", "dogs"];

/// Writes `dir/<split>/<class>/<class>.<n>.jpg`; skips when already complete.
pub fn generate(dir: &Path, seed: u64) -> std::io::Result<usize> {
    let stamp = dir.join(".complete");
    let expected: usize = SPLITS.iter().map(|(_, n)| n * CLASSES.len()).sum();
    if stamp.exists() {
        return Ok(expected);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut index = 0;
    for (split, per_class) in SPLITS {
        for (c, class) in CLASSES.iter().enumerate() {
            let folder = dir.join(split).join(class);
            std::fs::create_dir_all(&folder)?;
            for _ in 0..*per_class {
                let img = draw(c, &mut rng);
                let file = std::fs::File::create(folder.join(format!("{}.{index}.jpg", &class[..3])))?;
                let mut w = std::io::BufWriter::new(file);
                JpegEncoder::new_with_quality(&mut w, 85).encode_image(&img).map_err(std::io::Error::other)?;
                index += 1;
            }
        }
    }
    std::fs::write(stamp, format!("{expected} images, seed {seed}\n"))?;
    Ok(expected)
}

fn draw(class: usize, rng: &mut impl Rng) -> RgbImage {
    let (w, h) = (rng.random_range(160..400u32), rng.random_range(120..360u32));
    let ground = if class == 0 { [230, 220, 200] } else { [40, 45, 60] };
    let mut img = RgbImage::from_pixel(w, h, Rgb(ground));
    let shapes = rng.random_range(3..8);
    for _ in 0..shapes {
        let colour = if class == 0 {
            [rng.random_range(180..255), rng.random_range(60..140), rng.random_range(0..60)]
        } else {
            [rng.random_range(0..60), rng.random_range(90..180), rng.random_range(170..255)]
        };
        let (cx, cy) = (rng.random_range(0..w) as i64, rng.random_range(0..h) as i64);
        let r = rng.random_range(10..(w.min(h) / 3).max(11)) as i64;
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let inside = if class == 0 {
                    (x - cx).pow(2) + (y - cy).pow(2) < r * r
                } else {
                    (x - cx).abs() < r && ((x + y - cy) / 6) % 2 == 0
                };
                if inside {
                    img.put_pixel(x as u32, y as u32, Rgb(colour));
                }
            }
        }
    }
    img
}
