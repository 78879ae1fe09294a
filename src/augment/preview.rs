//! A picture of the augmentation, like the book's figure 5.11: the image
//! and some of its augmented versions side by side, exactly as the stage
//! would produce them in successive epochs.

use image::{Rgb, RgbImage};

use super::{AugmentOptions, Transform, apply_transform};

/// White space between tiles, in pixels.
const GAP: u32 = 4;

/// `count` tiles, `columns` to a row: `img` itself first (at the output
/// size), then the draws of epochs 0, 1, ... for an image whose content
/// hash is `content_hash` (the blake3 of its file, as `file_reader` gives).
pub fn preview_grid(
    img: &RgbImage,
    opts: &AugmentOptions,
    content_hash: &[u8; 32],
    count: u32,
    columns: u32,
) -> RgbImage {
    let count = count.max(1);
    let columns = columns.clamp(1, count);
    let rows = count.div_ceil(columns);
    let (th, tw) = opts.size().unwrap_or((img.height(), img.width()));
    let mut grid =
        RgbImage::from_pixel(columns * tw + (columns - 1) * GAP, rows * th + (rows - 1) * GAP, Rgb([255, 255, 255]));
    for i in 0..count {
        let tile = match i {
            0 => apply_transform(img, &Transform::default(), opts.fill(), opts.size()),
            _ => opts.augment(img, i - 1, 0, content_hash),
        };
        let (x, y) = ((i % columns) * (tw + GAP), (i / columns) * (th + GAP));
        image::imageops::replace(&mut grid, &tile, i64::from(x), i64::from(y));
    }
    grid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_laid_out_with_the_original_first() {
        let img = RgbImage::from_fn(30, 20, |x, y| Rgb([(x * 8) as u8, (y * 12) as u8, 90]));
        let opts = AugmentOptions { size: Some([10, 12]), ..AugmentOptions::book() };
        let grid = preview_grid(&img, &opts, &[3; 32], 8, 4);
        assert_eq!(grid.dimensions(), (4 * 12 + 3 * GAP, 2 * 10 + GAP));
        let first = apply_transform(&img, &Transform::default(), opts.fill(), opts.size());
        assert_eq!(grid.get_pixel(5, 5), first.get_pixel(5, 5));
        let last = opts.augment(&img, 6, 0, &[3; 32]);
        assert_eq!(grid.get_pixel(3 * (12 + GAP) + 7, 10 + GAP + 3), last.get_pixel(7, 3));
        assert_eq!(grid.get_pixel(12, 0), &Rgb([255, 255, 255]));
    }
}
