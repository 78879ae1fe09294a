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
        let start = out.len();
        out.resize(start + img.as_raw().len(), 0.0);
        self.write(img, &mut out[start..]);
    }

    /// Writes one image into its slot of an NHWC float tensor (as many values
    /// as the image has bytes): straight-line loops the compiler vectorises.
    pub fn write(self, img: &RgbImage, out: &mut [f32]) {
        let raw = img.as_raw();
        match self {
            Preprocess::Rescale => out.iter_mut().zip(raw).for_each(|(o, &v)| *o = v as f32 * (1.0 / 255.0)),
            Preprocess::None => out.iter_mut().zip(raw).for_each(|(o, &v)| *o = v as f32),
            Preprocess::Caffe => {
                for (o, p) in out.chunks_exact_mut(3).zip(raw.chunks_exact(3)) {
                    o[0] = p[2] as f32 - CAFFE_MEAN_BGR[0];
                    o[1] = p[1] as f32 - CAFFE_MEAN_BGR[1];
                    o[2] = p[0] as f32 - CAFFE_MEAN_BGR[2];
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
