//! A trained classifier's folder, whichever stage trained it, as the one
//! [`Convnet`] whose gradients the `gradcam` stage takes:
//!
//! - a `dense_head`'s `out_dir` (`head.safetensors`, `head.json`) trained on
//!   VGG16's frozen conv base: VGG16's block5 with its ImageNet weights
//!   (`models/vgg16_block5.safetensors`), then `flatten` and the head, on
//!   block4 maps. dense_head's features are `block5_pool` flattened NHWC,
//!   which is what `flatten` gives here, so this is the very classifier the
//!   head was trained as ([`super::fine_tune::HeadFrom`] joins them the
//!   same way for fine-tuning);
//! - a `convnet`'s `out_dir` (`model.safetensors`, `model.json`): trained
//!   from scratch on images, or fine-tuned (`base: vgg16_block5`) on block4 maps.
//!
//! [`Classifier::describe`] reads only the descriptions (and the weights'
//! header), for `convflow validate`; [`Classifier::build`] the weights.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::fine_tune::{Base, HEAD_FILE, HeadFrom};
use super::read_description;
use crate::facts::{Facts, TrainedOn};
use crate::imaging::resize::Filter;
use crate::ml::convnet::spec::{Resolved, resolve};
use crate::ml::convnet::{Convnet, LayerSpec};

/// The layer name that means the last conv layer, whatever the model
/// (VGG16's `block5_conv3`, VGG19's `block5_conv4`, a convnet's own).
pub const LAST_CONV: &str = "last";

/// The file a `convnet` writes its weights to.
pub const MODEL_FILE: &str = "model.safetensors";

#[derive(Debug, Clone)]
enum Trained {
    /// A dense_head's head, on VGG16's or VGG19's block5.
    Head(Box<HeadFrom>),
    /// A convnet's whole stack, as saved.
    Convnet,
}

#[derive(Debug, Clone)]
pub struct Classifier {
    pub dir: PathBuf,
    trained: Trained,
    /// VGG16's or VGG19's block5 comes first: the items are block4 maps, and
    /// its convolutions may be named as Keras does (`block5_conv1..3`, `..4`).
    pub base: Option<Base>,
    /// Every layer, the base's first.
    pub specs: Vec<LayerSpec>,
    /// The input the weights fix (a convnet's); a head takes the block4
    /// maps of whatever image size gives its features.
    pub input: Option<[usize; 3]>,
    /// In label order.
    pub classes: Vec<String>,
    /// What each input value is multiplied by (a convnet's training `rescale`).
    pub rescale: f32,
    /// What it was trained on (a head's without a `head.json`: unknown):
    /// the maps arriving must be made the same way.
    pub trained_on: Option<TrainedOn>,
    /// The filter of the `resize` stage that made a convnet's training images
    /// (the default where none is recorded), to resize a new image the same way.
    pub resize_filter: Filter,
}

/// The `__metadata__` of a safetensors file, from its header alone (a
/// fine-tuned VGG16 is 37 MB of weights that validation does not need).
fn safetensors_metadata(path: &Path) -> Result<serde_json::Value, String> {
    let err = |m: String| format!("{}: {m}", path.display());
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| err(format!("not a safetensors file: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(err(format!("not a safetensors file (a header of {len} bytes)")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| err(format!("not a safetensors file: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| err(format!("not a safetensors file: {e}")))?;
    Ok(v["__metadata__"].clone())
}

impl Classifier {
    /// What `dir` holds; the error says what is missing and what makes it.
    pub fn describe(dir: &Path) -> Result<Classifier, String> {
        if dir.join(MODEL_FILE).is_file() {
            return Classifier::convnet(dir);
        }
        if dir.join(HEAD_FILE).is_file() {
            let head = HeadFrom::read(dir)?;
            let classes = head.trained_on.as_ref().map(|t| t.classes.clone()).ok_or_else(|| {
                format!("{}: lists no classes (written by dense_head)", dir.join("head.json").display())
            })?;
            let base = head.base;
            let mut specs = base.specs();
            specs.extend_from_slice(&head.layers);
            return Ok(Classifier {
                dir: dir.to_path_buf(),
                trained_on: head.trained_on.clone(),
                trained: Trained::Head(Box::new(head)),
                base: Some(base),
                specs,
                input: None,
                classes,
                rescale: 1.0,
                resize_filter: Filter::default(),
            });
        }
        Err(format!(
            "{} holds neither {MODEL_FILE} (a convnet's out_dir) nor {HEAD_FILE} (a dense_head's): train a \
             classifier first (e.g. pipelines/feature_extraction.yaml or fine_tune.yaml)",
            dir.display()
        ))
    }

    fn convnet(dir: &Path) -> Result<Classifier, String> {
        let weights = dir.join(MODEL_FILE);
        let meta = safetensors_metadata(&weights)?;
        let field = |k: &str| {
            meta[k].as_str().ok_or_else(|| format!("{}: metadata lacks `{k}` (not a convnet's)", weights.display()))
        };
        let input: [usize; 3] = serde_json::from_str(field("input_shape")?)
            .map_err(|e| format!("{}: bad `input_shape`: {e}", weights.display()))?;
        let specs: Vec<LayerSpec> =
            serde_json::from_str(field("layers")?).map_err(|e| format!("{}: bad `layers`: {e}", weights.display()))?;
        let (info, classes) = read_description(&dir.join("model.json")).map_err(|e| e.to_string())?;
        let trained_on = TrainedOn::from_description(&info, &dir.join("model.json"))?;
        let base = match info["base"].as_str() {
            None => None,
            Some("vgg16_block5") => Some(Base::Vgg16Block5),
            Some("vgg19_block5") => Some(Base::Vgg19Block5),
            Some(other) => return Err(format!("{}: unknown base `{other}`", dir.join("model.json").display())),
        };
        // Without the training rescale the pixels would not be what the model learnt on.
        let rescale =
            info["rescale"].as_f64().map(|r| r as f32).filter(|r| r.is_finite() && *r > 0.0).ok_or_else(|| {
                format!("{}: no positive `rescale` (written by the convnet stage)", dir.join("model.json").display())
            })?;
        Ok(Classifier {
            dir: dir.to_path_buf(),
            trained: Trained::Convnet,
            base,
            specs,
            input: Some(input),
            classes,
            rescale,
            resize_filter: trained_on.resize_filter.unwrap_or_default(),
            trained_on: Some(trained_on),
        })
    }

    /// The layers with their Keras names (on a stand-in input where the
    /// weights fix none: names and kinds do not depend on it).
    pub fn layers(&self) -> Result<Vec<Resolved>, String> {
        let input = self.input.unwrap_or([9, 9, self.base.map_or(3, Base::channels)]);
        resolve(input, &self.specs).map(|(l, _)| l).map_err(|e| format!("{}: {e}", self.dir.display()))
    }

    /// The index of the conv layer `name` (the model's own name, or for a
    /// VGG-based one `block5_conv1..3` (VGG19: `..4`)); `None` or
    /// [`LAST_CONV`]: the last conv layer.
    pub fn conv_layer(&self, name: Option<&str>) -> Result<usize, String> {
        let layers = self.layers()?;
        let convs: Vec<usize> =
            (0..layers.len()).filter(|&i| matches!(layers[i].spec, LayerSpec::Conv2d { .. })).collect();
        let Some(name) = name.filter(|&n| n != LAST_CONV) else {
            return convs
                .last()
                .copied()
                .ok_or_else(|| format!("the model in {} has no conv layer", self.dir.display()));
        };
        let block5 = self.base.map(|b| b.vgg().block5_convs()).unwrap_or_default();
        let alias = block5.iter().position(|b| b == name).and_then(|k| convs.get(k));
        if let Some(&i) = alias {
            return Ok(i);
        }
        match layers.iter().position(|l| l.name == name) {
            Some(i) if convs.contains(&i) => Ok(i),
            found => {
                let mut names: Vec<String> = convs.iter().map(|&i| layers[i].name.clone()).collect();
                names.extend(block5);
                let what = match found {
                    Some(i) => format!("`{name}` is a {} layer, not a conv layer", layers[i].spec.keras_name()),
                    None => format!("the model has no layer `{name}`"),
                };
                Err(format!("{what}; its conv layers are {}", names.join(", ")))
            }
        }
    }

    /// The model on inputs of `input` (`[h, w, c]`: a head's block4 maps, or
    /// what a convnet's weights fix), block5's weights read from
    /// `base_weights` for a head.
    pub fn build(&self, input: [usize; 3], base_weights: &Path, threads: usize) -> Result<Convnet, String> {
        let fail = |e: String| format!("{}: {e}", self.dir.display());
        match &self.trained {
            Trained::Head(head) => {
                // The features block5 makes of these maps must be the ones the head was trained on.
                let (layers, _) = resolve(input, &self.specs).map_err(|e| fail(e.to_string()))?;
                let skip = head.base.specs().len();
                let got = layers[skip].input.len();
                if got != head.input_dim {
                    return Err(fail(format!(
                        "the head takes {} features per image, but block5 on maps of {input:?} gives {} = {got} \
                         (was it trained at another image size?)",
                        head.input_dim,
                        layers[skip].input.keras()
                    )));
                }
                let mut model = head.base.model(input, &head.layers, base_weights, 0, threads)?;
                head.load_into(&mut model, skip)?;
                Ok(model)
            }
            Trained::Convnet => {
                let model =
                    Convnet::load_safetensors(&self.dir.join(MODEL_FILE), threads).map_err(|e| fail(e.to_string()))?;
                if model.input_shape() != input {
                    return Err(fail(format!("the model takes {:?}, not {input:?}", model.input_shape())));
                }
                Ok(model)
            }
        }
    }

    /// Whether its block5 weights come from a separate file (a head's), not its own.
    pub fn needs_base_weights(&self) -> bool {
        matches!(self.trained, Trained::Head(_))
    }

    /// What arrives must be what it was trained on: a head trained on
    /// `rescale` features means nothing on `caffe` maps, nor a convnet
    /// trained at 150x150 on 224x224 images. A head on VGG16's block5 takes
    /// block4 maps where it was trained on block5's features: only their
    /// pixels are compared.
    pub fn check_input(&self, input: &Facts) -> Result<(), String> {
        let Some(t) = &self.trained_on else { return Ok(()) };
        let differs = if self.base.is_some() { t.pixels_mismatch(input) } else { t.mismatch(input) };
        if let Some(m) = differs {
            return Err(format!("the classifier in {} was {m}", self.dir.display()));
        }
        match self.base {
            Some(base) => {
                base.check_maps(input).map_err(|e| format!("the classifier in {} sits on {e}", self.dir.display()))
            }
            None => Ok(()),
        }
    }
}
