//! The pictures the visualisations write: tiles in a grid under a title,
//! the colour maps the book uses (viridis for feature maps, as matplotlib's
//! `imshow` default; jet for heatmaps, as OpenCV's `COLORMAP_JET`).

use std::path::Path;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

/// Height of the strip a title is written in.
const TITLE_PX: u32 = 28;

/// Viridis of `v` in [0, 1] (clamped).
pub fn viridis(v: f32) -> [u8; 3] {
    let c: RGBColor = ViridisRGB::get_color(v.clamp(0.0, 1.0));
    [c.0, c.1, c.2]
}

/// Jet of `v` in [0, 1] (clamped): dark blue, cyan, yellow, dark red.
pub fn jet(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let ch = |centre: f32| ((1.5 - (4.0 * v - centre).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [ch(3.0), ch(2.0), ch(1.0)]
}

/// `tiles` (all of one size) `per_row` to a row, `gap` pixels between them
/// on a dark ground, under `title`.
pub fn grid(tiles: &[RgbImage], per_row: usize, gap: u32, title: &str) -> Result<RgbImage, String> {
    let Some(first) = tiles.first() else { return Err("no tiles to draw".into()) };
    let (tw, th) = first.dimensions();
    let cols = per_row.min(tiles.len()).max(1) as u32;
    let rows = tiles.len().div_ceil(cols as usize) as u32;
    let width = cols * tw + (cols + 1) * gap;
    let height = TITLE_PX + rows * th + (rows + 1) * gap;
    let mut out = RgbImage::from_pixel(width, height, image::Rgb([24, 24, 24]));
    for (i, tile) in tiles.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        let (x, y) = (gap + c * (tw + gap), TITLE_PX + gap + r * (th + gap));
        image::imageops::replace(&mut out, tile, x.into(), y.into());
    }
    write_title(&mut out, title)?;
    Ok(out)
}

/// Writes `title` in white, top left, over whatever is there.
pub fn write_title(img: &mut RgbImage, title: &str) -> Result<(), String> {
    crate::plot::register_font()?;
    let (w, h) = img.dimensions();
    {
        let root = BitMapBackend::with_buffer(img.as_mut(), (w, h)).into_drawing_area();
        let style = ("sans-serif", 18).into_font().color(&WHITE);
        root.draw_text(title, &style, (6, 5)).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `img` scaled by a whole factor (nearest), so a 7x7 map is seen as blocks.
pub fn enlarge(img: &RgbImage, factor: u32) -> RgbImage {
    if factor <= 1 {
        return img.clone();
    }
    let (w, h) = img.dimensions();
    image::imageops::resize(img, w * factor, h * factor, image::imageops::FilterType::Nearest)
}

pub fn save(img: &RgbImage, path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    img.save(path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jet_runs_blue_to_red_and_viridis_purple_to_yellow() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(0.5), [128, 255, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        let (lo, hi) = (viridis(0.0), viridis(1.0));
        assert!(lo[2] > lo[1] && lo[0] > lo[1], "viridis(0) is dark purple: {lo:?}");
        assert!(hi[0] > 200 && hi[1] > 200 && hi[2] < 100, "viridis(1) is yellow: {hi:?}");
    }

    #[test]
    fn grid_places_every_tile_under_the_title() {
        let tiles: Vec<RgbImage> = (0..5).map(|i| RgbImage::from_pixel(3, 2, image::Rgb([i * 40, 0, 0]))).collect();
        let g = grid(&tiles, 2, 1, "t").unwrap();
        assert_eq!(g.dimensions(), (2 * 3 + 3, TITLE_PX + 3 * 2 + 4));
        for (i, _) in tiles.iter().enumerate() {
            let (c, r) = (i as u32 % 2, i as u32 / 2);
            let p = g.get_pixel(1 + c * 4, TITLE_PX + 1 + r * 3);
            assert_eq!(p.0, [i as u8 * 40, 0, 0], "tile {i}");
        }
    }
}
