//! Section 5.4.1: what each layer of a convnet makes of one image. Every
//! channel of a layer's output is one tile, normalised as the book does
//! (minus its mean, over its standard deviation, x64, +128, clipped to
//! 0..255) and drawn in viridis (matplotlib's default, as the book's
//! figures), 16 tiles to a row, under the layer's name.

use image::RgbImage;

use super::picture;
use crate::ml::convnet::{Convnet, ConvnetError, Shape};

/// Tiles per row, as the book's `images_per_row`.
pub const PER_ROW: usize = 16;

/// One layer's output for one image: `[height, width, channels]`, NHWC.
#[derive(Debug, Clone)]
pub struct LayerMaps {
    pub name: String,
    pub shape: [usize; 3],
    pub values: Vec<f32>,
}

/// The feature maps of every conv and pooling layer of `model` for one
/// image `x` (as the model takes it: resized and preprocessed), in order;
/// `limit` keeps the first that many (the book shows 8).
pub fn layer_maps(model: &mut Convnet, x: &[f32], limit: Option<usize>) -> Result<Vec<LayerMaps>, ConvnetError> {
    model.forward_kept(x, 1)?;
    let maps = model
        .layers()
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match l.output {
            Shape::Map(shape) => Some(LayerMaps { name: l.name.clone(), shape, values: model.output(i).to_vec() }),
            Shape::Flat(_) => None,
        })
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    Ok(maps)
}

/// The book's display of one channel: `(v - mean) / std * 64 + 128`,
/// clipped to 0..255. A constant channel (a ReLU that never fired: std 0,
/// where the book's division gives NaN) is 128 throughout.
pub fn channel_display(maps: &LayerMaps, channel: usize) -> Vec<u8> {
    let [h, w, c] = maps.shape;
    let v: Vec<f64> = (0..h * w).map(|p| f64::from(maps.values[p * c + channel])).collect();
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    v.iter().map(|&x| if std > 0.0 { ((x - mean) / std * 64.0 + 128.0).clamp(0.0, 255.0) as u8 } else { 128 }).collect()
}

/// The layer's picture: every channel a tile (enlarged to about 48 pixels
/// when the maps are smaller), [`PER_ROW`] to a row, titled with its name and shape.
pub fn layer_picture(maps: &LayerMaps) -> Result<RgbImage, String> {
    let [h, w, c] = maps.shape;
    let factor = (48 / h.max(w).max(1)).max(1) as u32;
    let tiles: Vec<RgbImage> = (0..c)
        .map(|ch| {
            let gray = channel_display(maps, ch);
            let mut tile = RgbImage::new(w as u32, h as u32);
            for (p, px) in tile.pixels_mut().enumerate() {
                *px = image::Rgb(picture::viridis(f32::from(gray[p]) / 255.0));
            }
            picture::enlarge(&tile, factor)
        })
        .collect();
    picture::grid(&tiles, PER_ROW, 1, &format!("{}  {h}x{w}x{c}", maps.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_normalised_as_the_book_and_a_dead_one_is_gray() {
        // Two channels of a 2x2 map: channel 0 is 0, 1, 2, 3; channel 1 is all 5.
        let maps = LayerMaps { name: "x".into(), shape: [2, 2, 2], values: vec![0., 5., 1., 5., 2., 5., 3., 5.] };
        let std = 1.25f64.sqrt();
        let want: Vec<u8> = [0., 1., 2., 3.].iter().map(|v| ((v - 1.5) / std * 64.0 + 128.0) as u8).collect();
        assert_eq!(channel_display(&maps, 0), want);
        assert_eq!(channel_display(&maps, 1), vec![128; 4]);
        let pic = layer_picture(&maps).unwrap();
        // Two 48x48 tiles (2x2 enlarged 24 times) side by side.
        assert_eq!(pic.width(), 2 * 48 + 3);
    }
}
