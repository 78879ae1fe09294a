//! 8-bit RGB images -> the float tensor a model expects: Keras's
//! `preprocess_input` modes (`caffe`, `tf`, `torch`), the book's `rescale`,
//! or raw 0..255, in NHWC (Keras) or NCHW (PyTorch exports) order.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// How pixels become model input. Keras's VGG16, VGG19 and ResNet50 were
/// trained on `caffe` input; Xception, Inception V3 and MobileNet on `tf`;
/// torchvision's models on `torch`. The book's chapter 5 feeds VGG16
/// `rescale`d input (x / 255). `none` passes 0..255.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    #[default]
    Rescale,
    /// RGB -> BGR, minus the ImageNet means (keras.applications mode `caffe`).
    Caffe,
    /// x / 127.5 - 1, to [-1, 1] (mode `tf`).
    Tf,
    /// x / 255, minus the ImageNet mean, over its standard deviation, RGB (mode `torch`).
    Torch,
    None,
}

/// ImageNet channel means in BGR order, as keras.applications.imagenet_utils.
pub const CAFFE_MEAN_BGR: [f32; 3] = [103.939, 116.779, 123.68];
/// ImageNet means and standard deviations of x / 255, RGB, as imagenet_utils' `torch` mode.
pub const TORCH_MEAN_RGB: [f32; 3] = [0.485, 0.456, 0.406];
pub const TORCH_STD_RGB: [f32; 3] = [0.229, 0.224, 0.225];

impl Preprocess {
    /// Its name in pipeline files.
    pub fn name(self) -> &'static str {
        match self {
            Preprocess::Rescale => "rescale",
            Preprocess::Caffe => "caffe",
            Preprocess::Tf => "tf",
            Preprocess::Torch => "torch",
            Preprocess::None => "none",
        }
    }

    /// Appends one image to an NHWC float tensor.
    pub fn extend(self, img: &RgbImage, out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + img.as_raw().len(), 0.0);
        self.write(img, &mut out[start..]);
    }

    /// Writes one image into its slot of an NHWC float tensor (as many values
    /// as the image has bytes): straight-line loops the compiler vectorises.
    /// Each mode does Keras's float32 operations in Keras's order, so the
    /// values are Keras's to the last bit.
    pub fn write(self, img: &RgbImage, out: &mut [f32]) {
        let raw = img.as_raw();
        match self {
            Preprocess::Rescale => out.iter_mut().zip(raw).for_each(|(o, &v)| *o = v as f32 * (1.0 / 255.0)),
            Preprocess::None => out.iter_mut().zip(raw).for_each(|(o, &v)| *o = v as f32),
            Preprocess::Tf => out.iter_mut().zip(raw).for_each(|(o, &v)| *o = v as f32 / 127.5 - 1.0),
            Preprocess::Caffe | Preprocess::Torch => {
                for (o, p) in out.chunks_exact_mut(3).zip(raw.chunks_exact(3)) {
                    o.copy_from_slice(&self.pixel([p[0], p[1], p[2]]));
                }
            }
        }
    }

    /// [`Preprocess::write`] for an NCHW model: three planes of height x
    /// width values, in the channel order the mode gives (BGR for `caffe`).
    pub fn write_planar(self, img: &RgbImage, out: &mut [f32]) {
        let plane = (img.width() * img.height()) as usize;
        let (c0, rest) = out.split_at_mut(plane);
        let (c1, c2) = rest.split_at_mut(plane);
        for (i, p) in img.as_raw().chunks_exact(3).enumerate() {
            let [a, b, c] = self.pixel([p[0], p[1], p[2]]);
            c0[i] = a;
            c1[i] = b;
            c2[i] = c;
        }
    }

    /// One RGB pixel's input values, in the model's channel order.
    fn pixel(self, [r, g, b]: [u8; 3]) -> [f32; 3] {
        let torch = |v: u8, c: usize| (v as f32 / 255.0 - TORCH_MEAN_RGB[c]) / TORCH_STD_RGB[c];
        match self {
            Preprocess::Rescale => [r, g, b].map(|v| v as f32 * (1.0 / 255.0)),
            Preprocess::None => [r, g, b].map(f32::from),
            Preprocess::Tf => [r, g, b].map(|v| v as f32 / 127.5 - 1.0),
            Preprocess::Caffe => {
                [b as f32 - CAFFE_MEAN_BGR[0], g as f32 - CAFFE_MEAN_BGR[1], r as f32 - CAFFE_MEAN_BGR[2]]
            }
            Preprocess::Torch => [torch(r, 0), torch(g, 1), torch(b, 2)],
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

    #[test]
    fn tf_and_torch_are_kerass_float32_arithmetic() {
        let img = RgbImage::from_raw(1, 1, vec![0, 128, 255]).unwrap();
        let mut out = Vec::new();
        Preprocess::Tf.extend(&img, &mut out);
        assert_eq!(out, vec![-1.0, 128f32 / 127.5 - 1.0, 1.0]);
        out.clear();
        Preprocess::Torch.extend(&img, &mut out);
        let want = [(0f32 / 255.0 - 0.485) / 0.229, (128f32 / 255.0 - 0.456) / 0.224, (255f32 / 255.0 - 0.406) / 0.225];
        assert_eq!(out, want);
    }

    #[test]
    fn planar_output_is_the_nhwc_values_channel_by_channel() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([(x * 40) as u8, (y * 90) as u8, (x + y * 7) as u8]));
        for mode in [Preprocess::Rescale, Preprocess::Caffe, Preprocess::Tf, Preprocess::Torch, Preprocess::None] {
            let mut nhwc = Vec::new();
            mode.extend(&img, &mut nhwc);
            let mut nchw = vec![0.0; nhwc.len()];
            mode.write_planar(&img, &mut nchw);
            for i in 0..6 {
                for c in 0..3 {
                    assert_eq!(nchw[c * 6 + i], nhwc[i * 3 + c], "{mode:?} pixel {i} channel {c}");
                }
            }
        }
    }
}
