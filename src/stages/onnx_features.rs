//! `onnx_features`: runs a conv base (VGG16 without its top) on batches of
//! images through ONNX Runtime and emits one feature tensor per image,
//! reading and filling the feature cache.
//!
//! On the CPU a plain VGG conv base (VGG16, VGG19: recognised in the very
//! file, weights read from it) runs by default in convflow's own engine
//! ([`crate::ml::vgg_cpu`], `engine: winograd`), about twice ONNX
//! Runtime's speed with features within 1e-4 of its float32 ones; any
//! other model, or a GPU, runs in ONNX Runtime (`engine: auto`).

use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheHandle, CacheSpec};
use crate::facts::{Facts, FeatureFacts, Wants};
use crate::item::{Features, Item, ItemKind, Payload};
use crate::ml::bases::{BASES, Base};
use crate::ml::vgg_cpu::{self, VggCpu};
use crate::ml::{CudaOptions, Device, Layout, OnnxModel, Preprocess};
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, Stage, StageConfig, StageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxFeaturesConfig {
    /// A path, or a conv base's name (`vgg19`), read as that base's file.
    pub model: ModelRef,
    /// `auto` (`None`): what the stages after it were trained on, else
    /// the named base's default (its `defaults`), else `rescale` (the book's).
    #[serde(default, with = "auto_preprocess")]
    pub preprocess: Option<Preprocess>,
    #[serde(default)]
    pub device: Device,
    /// ONNX Runtime intra-op threads; 0 = one per core.
    #[serde(default)]
    pub intra_threads: usize,
    /// Let idle ORT threads spin; off leaves the cores to decode between batches.
    #[serde(default)]
    pub spinning: bool,
    /// CUDA only: TensorFloat-32 convolutions (faster, less exact).
    #[serde(default)]
    pub tf32: bool,
    /// CUDA only: stage batches in page-locked host memory.
    #[serde(default = "super::yes")]
    pub pinned_memory: bool,
    /// What computes the features (see [`Engine`]).
    #[serde(default)]
    pub engine: Engine,
    /// Feature cache folder; empty or absent = no cache.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// Shared tier behind `cache` (`s3://BUCKET/PREFIX` or a shared folder),
    /// for the workers of a sharded run; empty or absent = none.
    #[serde(default)]
    pub shared_cache: Option<String>,
}

/// What runs the model. Every engine here gives ONNX Runtime's float32
/// features to within 1e-4 of each image's largest value, so they share
/// the feature cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// The fastest exact engine that covers the model: `winograd` for a
    /// plain VGG conv base on the CPU, else ONNX Runtime.
    #[default]
    Auto,
    /// ONNX Runtime, whatever the model.
    Onnx,
    /// convflow's Winograd F(6x6, 3x3) CPU engine; refused for a model it
    /// does not cover, and with `device: cuda`. (`winograd4`, its name while
    /// it ran F(4x4, 3x3), is still read.)
    #[serde(alias = "winograd4")]
    Winograd,
}

/// `model:` as written: a path, or a base of [`crate::ml::bases`] by name
/// (read as its file under `models/`). Written back as the path, so the
/// options (and the cache keys made of them) are the same either way.
#[derive(Debug, Clone)]
pub struct ModelRef {
    pub path: PathBuf,
    /// The base it names, when given by name.
    pub base: Option<&'static Base>,
}

impl Serialize for ModelRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.path.serialize(s)
    }
}

/// A base convflow cannot run yet is refused here, so `validate` says so
/// with the field's position.
impl<'de> Deserialize<'de> for ModelRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let path = PathBuf::deserialize(d)?;
        match Base::named(&path) {
            Some(base) if base.setup.is_none() => Err(serde::de::Error::custom(base.resolve().unwrap_err())),
            Some(base) => Ok(ModelRef { path: base.path(), base: Some(base) }),
            None => match Base::unknown(&path) {
                Some(e) => Err(serde::de::Error::custom(e)),
                None => Ok(ModelRef { path, base: None }),
            },
        }
    }
}

/// `preprocess:` a mode, or `auto` (also when absent).
mod auto_preprocess {
    use super::Preprocess;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<Preprocess>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => p.serialize(s),
            None => s.serialize_str("auto"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Preprocess>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "rescale, caffe, tf, torch, none or auto")]
        enum Mode {
            Mode(Preprocess),
            Auto(String),
        }
        match Mode::deserialize(d)? {
            Mode::Mode(p) => Ok(Some(p)),
            Mode::Auto(w) if w == "auto" => Ok(None),
            Mode::Auto(w) => Err(serde::de::Error::custom(format!(
                "unknown preprocess `{w}`: rescale, caffe, tf, torch, none or auto"
            ))),
        }
    }
}

/// The book's image size (section 5.3.1), for a model that is no named base.
const BOOK_IMAGE_SIZE: u32 = 150;

impl OnnxFeaturesConfig {
    /// The mode the model's input is made with, once resolved.
    fn preprocess(&self) -> Preprocess {
        self.preprocess.or(self.base().map(|b| b.defaults.preprocess)).unwrap_or_default()
    }

    /// The base this model is, by name or by its file's path.
    fn base(&self) -> Option<&'static Base> {
        self.model.base.or_else(|| BASES.iter().find(|b| b.path() == self.model.path))
    }

    fn cuda(&self) -> CudaOptions {
        CudaOptions { tf32: self.tf32, pinned: self.pinned_memory }
    }

    fn threads(&self) -> usize {
        crate::config::threads(self.intra_threads, 1)
    }

    /// The CPU engine that will run the model, if any, and why not when
    /// `auto` chose ONNX Runtime (for the report).
    fn cpu_engine(&self) -> Result<(Option<VggCpu>, Option<String>), StageError> {
        match self.engine {
            Engine::Onnx => Ok((None, None)),
            Engine::Winograd => VggCpu::load(&self.model.path, self.threads(), None)
                .map(|e| (Some(e), None))
                .map_err(|e| StageError::fatal(format!("engine: winograd cannot serve this model: {e}"))),
            // A GPU, where there is one, is faster than either CPU engine.
            Engine::Auto if self.device == Device::Cuda => Ok((None, Some("device: cuda".into()))),
            Engine::Auto if self.device == Device::Auto && crate::ml::cuda::nvidia_driver_present() => {
                Ok((None, Some("an NVIDIA GPU is present (device: auto)".into())))
            }
            Engine::Auto => match VggCpu::load(&self.model.path, self.threads(), None) {
                Ok(e) => {
                    // What ONNX Runtime's session says in its place (onnx.rs).
                    if self.device == Device::Auto {
                        tracing::info!(
                            "device: auto runs on the CPU (no NVIDIA GPU on this machine), in the {} engine ({})",
                            vgg_cpu::NAME,
                            e.isa().name()
                        );
                    }
                    Ok((Some(e), None))
                }
                Err(e) => {
                    tracing::info!("engine auto: ONNX Runtime runs {} ({e})", self.model.path.display());
                    Ok((None, Some(e.to_string())))
                }
            },
        }
    }
}

/// The model as the stage runs it.
enum Model {
    Onnx(OnnxModel),
    /// `input`: the batch's tensor, kept between batches.
    Vgg {
        engine: VggCpu,
        input: Vec<f32>,
    },
}

impl Model {
    /// The engine's name for the report: `onnxruntime` or `winograd`.
    fn engine(&self) -> &'static str {
        match self {
            Model::Onnx(_) => "onnxruntime",
            Model::Vgg { .. } => vgg_cpu::NAME,
        }
    }

    fn provider(&self) -> String {
        match self {
            Model::Onnx(m) => m.provider.to_string(),
            Model::Vgg { engine, .. } => format!("{} ({})", vgg_cpu::NAME, engine.isa().name()),
        }
    }

    fn layout(&self) -> Layout {
        match self {
            Model::Onnx(m) => m.layout,
            Model::Vgg { .. } => Layout::Nhwc,
        }
    }

    fn run_filled(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        fill: impl FnOnce(&mut [f32]),
    ) -> Result<(Vec<usize>, Vec<f32>), String> {
        match self {
            Model::Onnx(m) => m.run_filled(n, h, w, fill).map_err(|e| e.to_string()),
            Model::Vgg { engine, input } => {
                input.clear();
                input.resize(n * h * w * 3, 0.0);
                fill(input);
                engine.run(input, n, h, w).map_err(|e| e.to_string())
            }
        }
    }
}

impl StageConfig for OnnxFeaturesConfig {
    const KIND: &'static str = "onnx_features";
    const SUMMARY: &'static str = "runs an ONNX conv base (e.g. VGG16 without top) on image batches; cached";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Batch];
    const EMITS: Option<ItemKind> = Some(ItemKind::Features);
    const PLACE_OPTIONS: &'static [&'static str] = &["cache", "shared_cache", "device", "intra_threads", "spinning"];
    // Each copy holds its own session: on a GPU two copies overlap one
    // batch's preprocessing and copy with the other's compute.
    const PARALLEL: bool = true;
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "model",
            ty: "path | base name",
            default: "(required)",
            help: "ONNX model, float image input [N,H,W,3] or [N,3,H,W]; or a conv base: vgg16, vgg19, xception, inception_v3, resnet50, mobilenet (`convflow models`)",
        },
        OptionDoc {
            name: "preprocess",
            ty: "rescale|caffe|tf|torch|none|auto",
            default: "auto",
            help: "x/255 (the book); Keras's preprocess_input modes: caffe (VGG, ResNet), tf (Xception, Inception, MobileNet), torch (torchvision); none: 0..255; auto: what the trained model after it was trained on, else a named base's default (`convflow models`: rescale for vgg16, the book's; Keras's mode for the others), else rescale",
        },
        OptionDoc {
            name: "device",
            ty: "auto|cpu|cuda",
            default: "auto",
            help: "auto: CUDA if present, else CPU with a warning",
        },
        OptionDoc {
            name: "intra_threads",
            ty: "int",
            default: "0 (one per core)",
            help: "ONNX Runtime intra-op threads",
        },
        OptionDoc { name: "spinning", ty: "bool", default: "false", help: "let idle ORT threads spin-wait" },
        OptionDoc {
            name: "tf32",
            ty: "bool",
            default: "false",
            help: "CUDA: TensorFloat-32 convolutions, faster and less exact (docs/gpu.md)",
        },
        OptionDoc {
            name: "pinned_memory",
            ty: "bool",
            default: "true",
            help: "CUDA: stage batches in page-locked host memory",
        },
        OptionDoc {
            name: "engine",
            ty: "auto|onnx|winograd",
            default: "auto",
            help: "what computes the features: winograd, convflow's CPU engine for plain VGG conv bases (VGG16, VGG19; weights read from the model file), ~2x ONNX Runtime, within 1e-4 of its float32; onnx: ONNX Runtime; auto: winograd where it covers the model and the device is the CPU, else onnx (`winograd4`, its earlier name, is still read)",
        },
        OptionDoc { name: "cache", ty: "path", default: "(none)", help: "feature cache folder, shared by all runs" },
        OptionDoc {
            name: "shared_cache",
            ty: "url",
            default: "(none)",
            help: "shared tier behind cache: s3://BUCKET/PREFIX or a shared folder",
        },
    ];

    fn check(&self) -> Vec<FieldError> {
        let mut errors: Vec<FieldError> =
            crate::config::threads_error("intra_threads", self.intra_threads).into_iter().collect();
        // Said before any work, and by `validate`, rather than when the tier opens.
        let s3 = self.shared_cache.as_deref().is_some_and(|s| s.starts_with("s3://"));
        if s3 && !cfg!(feature = "s3") {
            errors.push(FieldError::new("shared_cache", crate::cache::shared::S3_NOT_BUILT));
        }
        if self.engine == Engine::Winograd && self.device == Device::Cuda {
            errors.push(FieldError::new(
                "engine",
                "winograd runs on the CPU; with `device: cuda` use `engine: onnx` (or auto)",
            ));
        }
        errors
    }

    fn check_environment(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !self.model.path.is_file() {
            let how = match self.base().and_then(|b| b.setup) {
                Some(setup) => format!("run {setup}"),
                None => "models/setup.sh produces the models".into(),
            };
            errors.push(FieldError::new("model", format!("{} not found ({how})", self.model.path.display())));
        } else if let Some(Err(e)) = Base::of_file(&self.model.path).map(|b| b.check_file(&self.model.path)) {
            errors.push(FieldError::new("model", e));
        } else if self.engine == Engine::Winograd
            && let Err(e) = VggCpu::covers(&self.model.path)
        {
            errors.push(FieldError::new("engine", format!("winograd cannot serve this model: {e}")));
        }
        if let Some(dir) = self.cache.as_deref().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = crate::cache::check_dir(dir)
        {
            errors.push(FieldError::new("cache", format!("cannot keep a feature cache in {}: {e}", dir.display())));
        }
        errors
    }

    fn cache(&self) -> Result<Option<CacheSpec>, FieldError> {
        let Some(dir) = self.cache.clone().filter(|d| !d.as_os_str().is_empty()) else {
            if self.shared_cache.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(FieldError::new("shared_cache", "needs a local `cache` folder in front of it"));
            }
            return Ok(None);
        };
        let bytes = std::fs::read(&self.model.path)
            .map_err(|e| FieldError::new("model", format!("cannot read {}: {e}", self.model.path.display())))?;
        let mut key = format!(
            "model blake3 {}, preprocess {:?}, input NHWC float32",
            blake3::hash(&bytes).to_hex(),
            self.preprocess()
        );
        // TF32 features differ from float32 ones by ~1e-3: never served for
        // each other. (Absent otherwise, so existing caches stay valid.)
        if self.tf32 && self.device != Device::Cpu {
            key.push_str(", tf32");
        }
        let shared = self.shared_cache.clone().filter(|s| !s.is_empty());
        Ok(Some(CacheSpec { dir, key, shared }))
    }

    /// A conv base sets the size of the images before it (`resize: {size: auto}`)
    /// to its default, and a model of the user's own to the book's 150x150
    /// (a model whose input is fixed at another size is then refused by
    /// [`StageConfig::facts`], naming its size), unless a trained model
    /// after it says otherwise.
    fn wants(&self, _env: bool) -> Wants {
        let (size, by) = match self.base() {
            Some(b) => (b.defaults.image_size, format!("the conv base `{}`", b.name)),
            None => (BOOK_IMAGE_SIZE, format!("the book's size for the model {}", self.model.path.display())),
        };
        Wants { image_size: Some([size, size]), by, ..Wants::default() }
    }

    fn resolve(&self, wants: &Wants) -> Option<Self> {
        let preprocess = self.preprocess.or(wants.preprocess).unwrap_or_else(|| self.preprocess());
        (self.preprocess != Some(preprocess))
            .then(|| OnnxFeaturesConfig { preprocess: Some(preprocess), ..self.clone() })
    }

    /// Features of this model and preprocessing; their shape where the
    /// images' size is fixed: worked out for a base, else one black image
    /// through the model (on the CPU, when the files may be read).
    fn facts(&self, input: &Facts, env: bool) -> Result<Facts, Vec<FieldError>> {
        let size = input.image_size;
        if let (Some(base), Some([h, w])) = (self.base(), size) {
            base.check_size(h, w).map_err(|e| {
                let by = input.image_size_by.as_deref().map(|id| format!(" (stage `{id}`)")).unwrap_or_default();
                vec![FieldError::new("model", format!("{e}{by}"))]
            })?;
        }
        let readable = env && self.model.path.is_file();
        let shape = match (self.base().and_then(|b| size.and_then(|[h, w]| b.features_shape(h, w))), size) {
            (Some(shape), _) => Some(shape.iter().map(|&d| d as usize).collect()),
            (None, Some([h, w])) if readable => Some(
                OnnxModel::load(&self.model.path, Device::Cpu, 1, false)
                    .map_err(|e| e.to_string())
                    .and_then(|mut m| {
                        m.check_size(h, w)?;
                        m.probe(h, w)
                    })
                    .map_err(|e| {
                        vec![FieldError::new(
                            "model",
                            format!("{}: cannot take the pipeline's {h}x{w} images: {e}", self.model.path.display()),
                        )]
                    })?,
            ),
            _ => None,
        };
        let model_blake3 = readable
            .then(|| std::fs::read(&self.model.path).ok().map(|b| blake3::hash(&b).to_hex().to_string()))
            .flatten();
        let model = self
            .model
            .path
            .file_name()
            .map_or_else(|| self.model.path.display().to_string(), |f| f.to_string_lossy().into_owned());
        Ok(Facts {
            features: Some(FeatureFacts { model, model_blake3, preprocess: self.preprocess(), shape }),
            ..input.clone()
        })
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let model_err = |e: String| StageError::fatal(format!("model {}: {e}", self.model.path.display()));
        let probe_err = |h, w, e: String| {
            model_err(format!(
                "cannot take the pipeline's {h}x{w} images: {e}; set the resize stage's `size` to a size it takes"
            ))
        };
        let (model, engine_note) = match self.cpu_engine()? {
            (Some(engine), note) => {
                if let Some([h, w]) = ctx.input.image_size {
                    let (h, w) = (h as usize, w as usize);
                    engine
                        .run(&vec![0.0; h * w * 3], 1, h, w)
                        .map_err(|e| probe_err(h as u32, w as u32, e.to_string()))?;
                }
                (Model::Vgg { engine, input: Vec::new() }, note)
            }
            (None, note) => {
                let mut model =
                    OnnxModel::load_with(&self.model.path, self.device, self.threads(), self.spinning, self.cuda())
                        .map_err(StageError::fatal)?;
                if let Some([h, w]) = ctx.input.image_size {
                    model.check_size(h, w).map_err(model_err)?;
                    model.probe(h, w).map(drop).map_err(|e| probe_err(h, w, e))?;
                }
                (Model::Onnx(model), note)
            }
        };
        let labels = ctx.metric_labels();
        labels.gauge_with(crate::telemetry::EXECUTION_PROVIDER, "provider", &model.provider()).set(1.0);
        Ok(Built::Stage(Box::new(OnnxFeatures {
            latency: labels.histogram(crate::telemetry::INFERENCE_BATCH_SECONDS),
            model,
            engine_note,
            preprocess: self.preprocess(),
            threads: self.threads(),
            cache: ctx.cache.clone(),
            lookup: !ctx.cache_probed_upstream,
            images: 0,
            batches: 0,
            seconds: 0.0,
            preprocess_seconds: 0.0,
        })))
    }
}

struct OnnxFeatures {
    model: Model,
    /// Why `engine: auto` chose ONNX Runtime, when it did.
    engine_note: Option<String>,
    preprocess: Preprocess,
    threads: usize,
    cache: Option<CacheHandle>,
    /// Look items up here (no source did it already).
    lookup: bool,
    images: u64,
    batches: u64,
    seconds: f64,
    preprocess_seconds: f64,
    /// `convflow_inference_batch_seconds`, one observation per model call.
    latency: metrics::Histogram,
}

impl Stage for OnnxFeatures {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        let Payload::Batch(members) = item.payload else {
            return Err(StageError::fatal(format!("expected a batch, got {}", item.kind().name())));
        };
        // Resolve cache hits first; the rest go to the model in one call.
        let mut slots: Vec<(crate::item::Meta, Option<Features>)> = Vec::with_capacity(members.len());
        let mut images = Vec::new();
        let mut todo = Vec::new();
        let mut size = None;
        for m in members {
            match m.payload {
                Payload::Features(f) => slots.push((m.meta, Some(f))),
                Payload::Image(img) => {
                    let hit = match (&self.cache, self.lookup) {
                        (Some(c), true) => c.get_counted(&m.meta).map_err(StageError::fatal)?,
                        (Some(c), false) if m.meta.epoch > 0 => c.recheck(&m.meta).map_err(StageError::fatal)?,
                        _ => None,
                    };
                    if hit.is_none() {
                        let dims = img.dimensions();
                        if *size.get_or_insert(dims) != dims {
                            return Err(StageError::item(
                                &m.meta.path,
                                format!(
                                    "image is {}x{} but the batch is {}x{}; add a resize stage",
                                    dims.0,
                                    dims.1,
                                    size.unwrap_or_default().0,
                                    size.unwrap_or_default().1
                                ),
                            ));
                        }
                        images.push(img);
                        todo.push(slots.len());
                    }
                    slots.push((m.meta, hit));
                }
                Payload::Gray(_) => {
                    return Err(StageError::fatal(format!(
                        "{}: a one-channel image (decode `color_mode: grayscale`); the model takes RGB: decode with `color_mode: rgb`",
                        m.meta.path.display()
                    )));
                }
                _ => {
                    return Err(StageError::fatal(format!(
                        "a batch may hold images or features, not {}",
                        m.kind().name()
                    )));
                }
            }
        }
        if let Some((w, h)) = size {
            let started = Instant::now();
            let n = todo.len();
            let per_image = (h * w * 3) as usize;
            let (preprocess, mut preprocess_seconds) = (self.preprocess, 0.0);
            let layout = self.model.layout();
            // Each image is written into the input buffer by its own rayon
            // task: on a GPU this runs serially with the model call, so it
            // must take the machine's cores, not one.
            let fill = |buf: &mut [f32]| {
                let t = Instant::now();
                buf.par_chunks_mut(per_image).zip(images.par_iter()).for_each(|(dst, img)| match layout {
                    Layout::Nhwc => preprocess.write(img, dst),
                    Layout::Nchw => preprocess.write_planar(img, dst),
                });
                preprocess_seconds = t.elapsed().as_secs_f64();
            };
            let (shape, data) = self.model.run_filled(n, h as usize, w as usize, fill).map_err(StageError::fatal)?;
            let took = started.elapsed().as_secs_f64() - preprocess_seconds;
            self.preprocess_seconds += preprocess_seconds;
            self.seconds += took;
            self.latency.record(took);
            self.images += n as u64;
            self.batches += 1;
            if shape.first() != Some(&n) {
                return Err(StageError::fatal(format!("model returned shape {shape:?} for a batch of {n}")));
            }
            let row_shape = shape[1..].to_vec();
            let row = row_shape.iter().product::<usize>();
            for (k, &slot) in todo.iter().enumerate() {
                slots[slot].1 =
                    Some(Features { shape: row_shape.clone(), data: data[k * row..(k + 1) * row].to_vec() });
            }
            if let Some(cache) = &self.cache {
                let entries: Vec<_> =
                    todo.iter().filter_map(|&s| slots[s].1.as_ref().map(|f| (&slots[s].0, f))).collect();
                cache.put_many(&entries).map_err(StageError::fatal)?;
            }
        }
        for (meta, features) in slots {
            let features = features.ok_or_else(|| StageError::fatal("internal: a batch member got no features"))?;
            out.emit(Item { meta, payload: Payload::Features(features) })?;
        }
        Ok(())
    }

    fn summary(&self) -> Option<serde_json::Value> {
        let ort = match &self.model {
            Model::Onnx(m) => Some(m),
            Model::Vgg { .. } => None,
        };
        Some(serde_json::json!({
            "engine": self.model.engine(),
            "engine_note": self.engine_note,
            "provider": self.model.provider(),
            "fallback_warning": ort.and_then(|m| m.fallback_warning.clone()),
            "intra_threads": self.threads,
            "tf32": ort.is_some_and(|m| m.tf32),
            "pinned_memory": ort.is_some_and(|m| m.pinned()),
            "images_inferred": self.images,
            "inference_batches": self.batches,
            "inference_seconds": (self.seconds * 1000.0).round() / 1000.0,
            "preprocess_seconds": (self.preprocess_seconds * 1000.0).round() / 1000.0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(model: &std::path::Path, device: Device, tf32: bool) -> OnnxFeaturesConfig {
        serde_json::from_value(serde_json::json!({
            "model": model, "device": device, "tf32": tf32, "cache": model.parent().unwrap().join("cache"),
        }))
        .unwrap()
    }

    #[test]
    fn tf32_features_are_cached_apart_from_float32_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m.onnx");
        std::fs::write(&model, b"model bytes").unwrap();
        let key = |device, tf32| config(&model, device, tf32).cache().unwrap().unwrap().key;
        let plain = key(Device::Auto, false);
        assert_ne!(key(Device::Cuda, true), plain);
        assert_ne!(key(Device::Auto, true), plain);
        // On the CPU the option changes nothing, and neither may the key;
        // float32 keys are as before the option existed.
        assert_eq!(key(Device::Cpu, true), plain);
        assert_eq!(key(Device::Cuda, false), plain);
        assert!(plain.ends_with("input NHWC float32"), "{plain}");
    }

    /// `engine: winograd` is refused before any work where it cannot run:
    /// with `device: cuda`, and for a file that is not a plain VGG.
    #[test]
    fn winograd_is_refused_for_cuda_and_for_a_model_it_does_not_cover() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m.onnx");
        std::fs::write(&model, b"not a VGG").unwrap();
        let mut c = config(&model, Device::Cuda, false);
        c.engine = Engine::Winograd;
        assert!(c.check().iter().any(|e| e.field == "engine" && e.message.contains("device: cuda")));
        c.device = Device::Cpu;
        assert!(c.check().is_empty());
        let errors = c.check_environment();
        assert!(
            errors.iter().any(|e| e.field == "engine" && e.message.contains("winograd cannot serve")),
            "{:?}",
            errors.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
        // auto and onnx never refuse a model for the engine's sake.
        c.engine = Engine::Auto;
        assert!(c.check_environment().iter().all(|e| e.field != "engine"));
    }

    /// A pipeline written while the engine was `winograd4` (F(4x4) tiles)
    /// still runs it under its new name.
    #[test]
    fn the_engines_earlier_name_is_still_read() {
        for name in ["winograd", "winograd4"] {
            let c: OnnxFeaturesConfig = serde_json::from_value(serde_json::json!({"model": "m.onnx", "engine": name}))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.engine, Engine::Winograd, "{name}");
        }
    }

    /// The S3 tier is a cargo feature: a build without it says how to get it.
    #[test]
    fn an_s3_tier_without_the_s3_feature_says_how_to_build_it() {
        let mut c = config(std::path::Path::new("/m.onnx"), Device::Cpu, false);
        c.shared_cache = Some("s3://bucket/prefix".into());
        let errors = c.check();
        if cfg!(feature = "s3") {
            assert!(errors.is_empty(), "{:?}", errors.iter().map(|e| &e.message).collect::<Vec<_>>());
        } else {
            assert_eq!(errors.len(), 1);
            assert!(errors[0].message.contains("--features s3"), "{}", errors[0].message);
        }
        c.shared_cache = Some("/shared/folder".into());
        assert!(c.check().is_empty());
    }
}
