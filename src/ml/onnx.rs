//! ONNX Runtime through `ort` with a dynamically loaded library.
//!
//! `ort`'s default feature downloads binaries from a site these machines
//! cannot reach, so the library comes from the PyPI onnxruntime wheel
//! (`models/setup.sh` puts it at `models/lib/`), or from `ORT_DYLIB_PATH`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep::ExecutionProvider;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::session::builder::SessionBuilder;
use ort::value::{Tensor, TensorElementType, TensorRef};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("ONNX Runtime library not found (looked at {looked}); run models/setup.sh or set ORT_DYLIB_PATH")]
    LibraryMissing { looked: String },
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    Library { path: PathBuf, message: String },
    #[error("model {path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("inference failed: {0}")]
    Run(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// CUDA when this ONNX Runtime build and machine have it, else CPU with a warning.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// The execution provider a session actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Provider {
    #[serde(rename = "CPUExecutionProvider")]
    Cpu,
    #[serde(rename = "CUDAExecutionProvider")]
    Cuda,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
        })
    }
}

const LIBRARY_NAME: &str = "libonnxruntime.so";

/// 16384 x 16384: past this one image's float32 tensor alone is over 3 GB.
const MAX_INPUT_PIXELS: usize = 1 << 28;

/// Candidate library paths: `ORT_DYLIB_PATH`, then `models/lib/` under the
/// working directory or any folder above it or above the executable.
fn library_candidates() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return vec![PathBuf::from(p)];
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.into_iter().map(|r| r.join("models/lib").join(LIBRARY_NAME)).collect()
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The library [`environment`] loaded, for what sits beside it (the CUDA provider).
static LIBRARY_PATH: OnceLock<PathBuf> = OnceLock::new();

/// Loads the library once per process.
pub fn environment() -> Result<&'static Environment, OnnxError> {
    let result = ENVIRONMENT.get_or_init(|| {
        let candidates = library_candidates();
        let Some(path) = candidates.iter().find(|p| p.exists()) else {
            let looked = candidates.iter().take(3).map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(OnnxError::LibraryMissing { looked }.to_string());
        };
        let lib_err =
            |e: &dyn std::fmt::Display| OnnxError::Library { path: path.clone(), message: e.to_string() }.to_string();
        let _ = LIBRARY_PATH.set(path.clone());
        let builder = ort::init_from(path).map_err(|e| lib_err(&e))?;
        builder.with_name("convflow").build().map_err(|e| lib_err(&e))
    });
    result.as_ref().map_err(|message| OnnxError::Library { path: PathBuf::new(), message: message.clone() })
}

/// How the CUDA provider computes and is fed; ignored on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// TensorFloat-32 for convolutions and matrix products: tensor-core
    /// speed, a 10-bit mantissa in the products (docs/gpu.md gives its
    /// measured effect on the features). Off by default: float32 as on the CPU.
    pub tf32: bool,
    /// Stage each batch in page-locked host memory, so the copy to the GPU
    /// runs at full bus speed instead of through a bounce buffer.
    pub pinned: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { tf32: false, pinned: true }
    }
}

/// A reusable page-locked input tensor of the last batch shape.
struct PinnedInput {
    allocator: Allocator,
    tensor: Option<([usize; 4], Tensor<f32>)>,
}

/// Where a model wants the colour channels of its image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// [N, H, W, 3]: Keras, and tf2onnx exports of it.
    Nhwc,
    /// [N, 3, H, W]: PyTorch (torchvision) exports.
    Nchw,
}

impl Layout {
    /// The layout an input of these declared dims (-1 where symbolic) has;
    /// `None` when it is not a 3-channel image batch either way. Channels
    /// last wins a tie ([N, 3, W, 3] is not an image anyone exports).
    pub fn of(dims: &[i64]) -> Option<Layout> {
        match dims {
            [_, _, _, 3] => Some(Layout::Nhwc),
            [_, 3, _, _] => Some(Layout::Nchw),
            _ => None,
        }
    }

    /// The input tensor's shape for `n` images of `h` x `w`.
    pub fn shape(self, n: usize, h: usize, w: usize) -> [usize; 4] {
        match self {
            Layout::Nhwc => [n, h, w, 3],
            Layout::Nchw => [n, 3, h, w],
        }
    }

    /// (height, width) as declared, -1 where symbolic.
    fn size(self, dims: &[i64]) -> (i64, i64) {
        match self {
            Layout::Nhwc => (dims[1], dims[2]),
            Layout::Nchw => (dims[2], dims[3]),
        }
    }
}

pub struct OnnxModel {
    session: Session,
    pinned: Option<PinnedInput>,
    /// The input buffer of [`OnnxModel::run_filled`] when nothing is pinned.
    scratch: Vec<f32>,
    pub input_name: String,
    pub output_name: String,
    /// Input dims as declared; -1 where symbolic.
    pub input_dims: Vec<i64>,
    /// Channels last or first, from the input dims.
    pub layout: Layout,
    pub provider: Provider,
    /// TF32 math in effect (asked for, and the session is on CUDA).
    pub tf32: bool,
    /// Set when `auto` wanted CUDA and fell back to CPU: say so, never
    /// silently (logged as a warning where there is a GPU, as info where not).
    pub fallback_warning: Option<String>,
}

impl OnnxModel {
    pub fn load(path: &Path, device: Device, intra_threads: usize, spinning: bool) -> Result<OnnxModel, OnnxError> {
        Self::load_with(path, device, intra_threads, spinning, CudaOptions::default())
    }

    pub fn load_with(
        path: &Path,
        device: Device,
        intra_threads: usize,
        spinning: bool,
        cuda: CudaOptions,
    ) -> Result<OnnxModel, OnnxError> {
        let env = environment()?;
        let model_err =
            |e: &dyn std::fmt::Display| OnnxError::Model { path: path.to_path_buf(), message: e.to_string() };
        if !path.exists() {
            return Err(model_err(&"file not found (run models/setup.sh to produce the models)"));
        }
        let base = || -> Result<SessionBuilder, OnnxError> {
            Session::builder(env)
                .and_then(|b| Ok(b.with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)?))
                .and_then(|b| Ok(b.with_intra_threads(intra_threads)?))
                .and_then(|b| Ok(b.with_inter_threads(1)?))
                .and_then(|b| Ok(b.with_intra_op_spinning(spinning)?))
                .map_err(|e| model_err(&e))
        };
        let (session, provider, fallback_warning) = match device {
            Device::Cpu => (base()?.commit_from_file(path).map_err(|e| model_err(&e))?, Provider::Cpu, None),
            Device::Cuda | Device::Auto => {
                // What is missing is named before ONNX Runtime tries (and,
                // for some missing libraries, only logs why it fell back).
                let ready = LIBRARY_PATH.get().map_or(Ok(()), |lib| super::cuda::prepare(lib)).and_then(|()| {
                    match ort::ep::CUDA::is_available() {
                        Ok(true) => Ok(()),
                        _ => Err("ONNX Runtime does not list the CUDA execution provider as available".to_string()),
                    }
                });
                let attempt = ready.and_then(|()| {
                    base()
                        .map_err(|e| e.to_string())?
                        .with_execution_providers([ort::ep::CUDA::default()
                            .with_tf32(cuda.tf32)
                            .build()
                            .error_on_failure()])
                        .map_err(|e| e.to_string())
                        .and_then(|mut b| b.commit_from_file(path).map_err(|e| e.to_string()))
                });
                match (attempt, device) {
                    (Ok(s), _) => (s, Provider::Cuda, None),
                    (Err(e), Device::Cuda) => return Err(model_err(&format!("device: cuda requested but {e}"))),
                    (Err(e), _) => {
                        let warning = format!("device: auto fell back to CPU: {e}");
                        // With no NVIDIA GPU at all the CPU is the expected
                        // device; a GPU that cannot be used is worth a warning.
                        if super::cuda::nvidia_driver_present() {
                            tracing::warn!("{warning}");
                        } else {
                            tracing::info!("device: auto runs on the CPU (no NVIDIA GPU on this machine)");
                        }
                        (base()?.commit_from_file(path).map_err(|e| model_err(&e))?, Provider::Cpu, Some(warning))
                    }
                }
            }
        };
        let input = session.inputs().first().ok_or_else(|| model_err(&"model has no input"))?;
        let output = session.outputs().first().ok_or_else(|| model_err(&"model has no output"))?;
        let input_dims: Vec<i64> =
            input.dtype().tensor_shape().map(|s| s.iter().copied().collect()).unwrap_or_default();
        let Some(layout) = Layout::of(&input_dims) else {
            return Err(model_err(&format!(
                "expected an image input, [N,H,W,3] (NHWC) or [N,3,H,W] (NCHW), found {:?} (`{}`)",
                input_dims,
                input.name()
            )));
        };
        // The images go in as float32 and the features come out as float32.
        for (what, name, ty) in [
            ("input", input.name(), input.dtype().tensor_type()),
            ("output", output.name(), output.dtype().tensor_type()),
        ] {
            if ty != Some(TensorElementType::Float32) {
                let found = ty.map(|t| t.to_string()).unwrap_or_else(|| "not a tensor".into());
                return Err(model_err(&format!("{what} `{name}` is {found}; convflow needs a float32 tensor")));
            }
        }
        // Pinned memory is an optimisation: where ORT offers no such
        // allocator the batch goes from ordinary memory, as on the CPU.
        let pinned = (provider == Provider::Cuda && cuda.pinned)
            .then(|| {
                MemoryInfo::new(AllocationDevice::CUDA_PINNED, 0, AllocatorType::Device, MemoryType::CPUInput)
                    .and_then(|info| Allocator::new(&session, info))
                    .map_err(|e| tracing::warn!("no pinned host memory for CUDA batches ({e}); using pageable memory"))
                    .ok()
            })
            .flatten()
            .map(|allocator| PinnedInput { allocator, tensor: None });
        Ok(OnnxModel {
            tf32: provider == Provider::Cuda && cuda.tf32,
            pinned,
            scratch: Vec::new(),
            input_name: input.name().to_string(),
            output_name: output.name().to_string(),
            input_dims,
            layout,
            provider,
            fallback_warning,
            session,
        })
    }

    /// Refuses an image size the model's fixed input dims cannot take.
    pub fn check_size(&self, height: u32, width: u32) -> Result<(), String> {
        let (h, w) = self.layout.size(&self.input_dims);
        if (h > 0 && h != height as i64) || (w > 0 && w != width as i64) {
            return Err(format!(
                "the model takes {h}x{w} (HxW) images but the pipeline makes {height}x{width}; \
                 set the resize stage's `size` to [{h}, {w}]"
            ));
        }
        Ok(())
    }

    /// One black image of the pipeline's size through the model, before any
    /// work: a size the model cannot take (a fixed reshape, a crop larger
    /// than the image) or an empty output is an error here rather than at
    /// the first batch, after decoding has begun.
    /// Returns the shape of one image's output.
    pub fn probe(&mut self, height: u32, width: u32) -> Result<Vec<usize>, String> {
        let (h, w) = (height as usize, width as usize);
        if h * w > MAX_INPUT_PIXELS {
            return Err(format!("{height}x{width} is over {MAX_INPUT_PIXELS} pixels an image"));
        }
        let (shape, data) = self.run(vec![0.0; h * w * 3], 1, h, w).map_err(|e| e.to_string())?;
        if shape.first() != Some(&1) || data.is_empty() {
            return Err(format!("one {height}x{width} image gives an output of shape {shape:?}"));
        }
        Ok(shape[1..].to_vec())
    }

    /// Does a CUDA session stage its batches in pinned memory?
    pub fn pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// Runs a batch in the model's [`Layout`]; returns the output shape and data.
    pub fn run(&mut self, input: Vec<f32>, n: usize, h: usize, w: usize) -> Result<(Vec<usize>, Vec<f32>), OnnxError> {
        self.run_slice(&input, n, h, w)
    }

    /// [`OnnxModel::run`] on borrowed values: nothing is copied on the way
    /// in except into the pinned buffer of a CUDA session.
    pub fn run_slice(
        &mut self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(Vec<usize>, Vec<f32>), OnnxError> {
        let shape = self.layout.shape(n, h, w);
        if input.len() != n * h * w * 3 {
            return Err(OnnxError::Run(format!("{} values for a batch of {shape:?}", input.len())));
        }
        if self.pinned.is_some() {
            return self.run_filled(n, h, w, |buf| buf.copy_from_slice(input));
        }
        let run_err = |e: ort::Error| OnnxError::Run(e.to_string());
        let tensor = TensorRef::from_array_view((shape, input)).map_err(run_err)?;
        let outputs = self.session.run(ort::inputs![self.input_name.as_str() => tensor]).map_err(run_err)?;
        first_output(&outputs)
    }

    /// Runs a batch (in the model's [`Layout`]) that `fill` writes straight
    /// into the input buffer (the pinned one on a GPU), so no copy of it is ever made.
    pub fn run_filled(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        fill: impl FnOnce(&mut [f32]),
    ) -> Result<(Vec<usize>, Vec<f32>), OnnxError> {
        let run_err = |e: ort::Error| OnnxError::Run(e.to_string());
        let (shape, len) = (self.layout.shape(n, h, w), n * h * w * 3);
        let outputs = match &mut self.pinned {
            Some(pinned) => {
                if pinned.tensor.as_ref().is_none_or(|(s, _)| *s != shape) {
                    pinned.tensor = Some((shape, Tensor::<f32>::new(&pinned.allocator, shape).map_err(run_err)?));
                }
                let Some((_, tensor)) = pinned.tensor.as_mut() else { unreachable!("set just above") };
                // SAFETY: the tensor holds exactly `len` float32 values of
                // page-locked host memory, which the CPU may write; the slice
                // ends before the tensor is read.
                fill(unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr_mut().cast::<f32>(), len) });
                self.session.run(ort::inputs![self.input_name.as_str() => tensor.view()]).map_err(run_err)?
            }
            None => {
                self.scratch.clear();
                self.scratch.resize(len, 0.0);
                fill(&mut self.scratch);
                let tensor = TensorRef::from_array_view((shape, &self.scratch[..])).map_err(run_err)?;
                self.session.run(ort::inputs![self.input_name.as_str() => tensor]).map_err(run_err)?
            }
        };
        first_output(&outputs)
    }
}

/// The first output's shape and values.
fn first_output(outputs: &ort::session::SessionOutputs<'_>) -> Result<(Vec<usize>, Vec<f32>), OnnxError> {
    let (shape, data) = outputs[0].try_extract_tensor::<f32>().map_err(|e| OnnxError::Run(e.to_string()))?;
    Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
}
