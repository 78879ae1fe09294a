//! 8-bit RGB images -> the float NHWC tensor a Keras-trained model expects.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Keras's VGG16 was trained on `caffe` input; the book's chapter 5 feeds
/// it `rescale`d input (x / 255). Both are offered; `none` passes 0..255.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    #[default]
    Rescale,
    Caffe,
    None,
}

/// ImageNet channel means in BGR order, as keras.applications.imagenet_utils.
pub const CAFFE_MEAN_BGR: [f32; 3] = [103.939, 116.779, 123.68];

impl Preprocess {
    /// Appends one image to an NHWC float tensor.
    pub fn extend(self, img: &RgbImage, out: &mut Vec<f32>) {
        let px = img.as_raw().chunks_exact(3);
        match self {
            Preprocess::Rescale => out.extend(img.as_raw().iter().map(|&v| v as f32 * (1.0 / 255.0))),
            Preprocess::None => out.extend(img.as_raw().iter().map(|&v| v as f32)),
            Preprocess::Caffe => {
                for p in px {
                    out.push(p[2] as f32 - CAFFE_MEAN_BGR[0]);
                    out.push(p[1] as f32 - CAFFE_MEAN_BGR[1]);
                    out.push(p[0] as f32 - CAFFE_MEAN_BGR[2]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caffe_swaps_to_bgr_and_centres() {
        let img = RgbImage::from_raw(1, 1, vec![10, 20, 30]).unwrap();
        let mut out = Vec::new();
        Preprocess::Caffe.extend(&img, &mut out);
        assert_eq!(out, vec![30.0 - 103.939, 20.0 - 116.779, 10.0 - 123.68]);
        out.clear();
        Preprocess::Rescale.extend(&img, &mut out);
        assert!((out[2] - 30.0 / 255.0).abs() < 1e-7);
    }
}
