//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_convflow"));
    c.current_dir(root());
    c
}

pub fn tiny_model() -> PathBuf {
    let p = root().join("models/tiny_vgg.onnx");
    assert!(p.exists(), "{} missing: run models/setup.sh (the README's test command does)", p.display());
    p
}

pub fn vgg16() -> PathBuf {
    let p = root().join("models/vgg16_notop.onnx");
    assert!(p.exists(), "{} missing: run models/setup.sh (the README's test command does)", p.display());
    p
}

/// The book's data beside the checkout. CI always has it; elsewhere the
/// tests that need it say so and pass only when CI is unset.
pub fn shared_data() -> Option<PathBuf> {
    let p = root().join("../shared/data/cats_and_dogs_small");
    if p.is_dir() {
        return Some(p);
    }
    assert!(std::env::var_os("CI").is_none(), "{} is missing on CI", p.display());
    eprintln!("skipping: {} not present", p.display());
    None
}

/// The MNIST files `models/mnist.sh` fetches (tests/setup.sh runs it). CI has them; elsewhere the
/// tests that need them skip with a note.
pub fn mnist() -> Option<PathBuf> {
    let p = root().join("models/mnist");
    if p.join("train-images-idx3-ubyte").is_file() && p.join("t10k-labels-idx1-ubyte").is_file() {
        return Some(p);
    }
    assert!(std::env::var_os("CI").is_none(), "{} is missing on CI: run tests/setup.sh", p.display());
    eprintln!("skipping: {} not present (models/mnist.sh fetches it)", p.display());
    None
}

pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(p.exists(), "{} missing: run models/setup.sh", p.display());
    p
}

/// Runs a script of this repository with the set-up's Python; its stdout.
/// A failure shows the script's stderr.
pub fn run_python<S: AsRef<std::ffi::OsStr>>(script: &str, args: impl IntoIterator<Item = S>) -> Vec<u8> {
    let o = Command::new(python()).arg(root().join(script)).args(args).output().unwrap();
    assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// Each image's largest difference (rows of `per_image` values) within
/// `rel` of that image's largest value in `want`; `name(i)` names image i.
pub fn assert_close_per_image(got: &[f32], want: &[f32], per_image: usize, rel: f32, name: impl Fn(usize) -> String) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    for (i, (g, w)) in got.chunks(per_image).zip(want.chunks(per_image)).enumerate() {
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = g.iter().zip(w).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= rel * scale, "{}: max difference {worst} of {scale}", name(i));
    }
}

/// Runs Python onnxruntime on an NHWC float32 tensor and returns its output.
pub fn python_reference(model: &Path, shape: &[usize], input: &[f32], dir: &Path) -> (Vec<usize>, Vec<f32>) {
    let inp = dir.join("ref_input.npy");
    let out = dir.join("ref_output.npy");
    let mut w = convflow::npy::NpyWriter::create(&inp, &shape[1..]).unwrap();
    let row: usize = shape[1..].iter().product();
    for r in input.chunks(row) {
        w.push(r).unwrap();
    }
    w.finish().unwrap();
    let status = Command::new(python())
        .arg(root().join("models/ort_reference.py"))
        .arg(model)
        .arg(&inp)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "ort_reference.py failed");
    convflow::npy::read_f32(&out).unwrap()
}

/// Asserts |a-b| <= rel * max(|b|, floor) elementwise; the floor keeps
/// near-zero activations from demanding absurd precision.
pub fn assert_close(a: &[f32], b: &[f32], rel: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        let err = (x - y).abs() / y.abs().max(scale * 1e-3).max(1e-6);
        worst = worst.max(err);
    }
    assert!(worst <= rel, "{what}: worst relative difference {worst} > {rel}");
}

/// Writes a pipeline file into `dir` and returns its path.
pub fn write_pipeline(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The standard extraction chain as YAML, on `data` with `model`.
pub fn extraction_yaml(
    data: &Path,
    model: &Path,
    out: &Path,
    cache: Option<&Path>,
    extra_decode: &str,
    size: u32,
    preprocess: &str,
) -> String {
    let cache = cache.map(|c| format!("    cache: {}\n", c.display())).unwrap_or_default();
    format!(
        "stages:
  - id: files
    kind: file_reader
    dir: {data}
  - id: decode
    kind: decode
    input: files
{extra_decode}
  - id: resize
    kind: resize
    input: decode
    size: [{size}, {size}]
  - id: batch
    kind: batch
    input: resize
    size: 4
  - id: features
    kind: onnx_features
    input: batch
    model: {model}
    preprocess: {preprocess}
    device: cpu
{cache}  - id: write
    kind: feature_writer
    input: features
    dir: {out}
",
        data = data.display(),
        model = model.display(),
        out = out.display(),
    )
}

pub fn run_yaml(path: &Path) -> Result<convflow::runtime::RunReport, convflow::runtime::RunError> {
    let cfg = convflow::config::load(path, &[]).expect("pipeline parses");
    let graph = convflow::graph::Graph::build(cfg, &convflow::stages::builtin_registry()).expect("pipeline is valid");
    convflow::runtime::run(&graph, &Default::default())
}

pub fn detail(report: &convflow::runtime::RunReport, stage: &str, key: &str) -> serde_json::Value {
    report
        .stages
        .iter()
        .find(|s| s.id == stage)
        .and_then(|s| s.details.clone())
        .map(|d| d[key].clone())
        .unwrap_or_default()
}

/// history.csv's lines without the seconds column (the only one that may differ between identical runs).
pub fn history_without_seconds(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("history.csv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect()
}

/// The epoch recorded in a checkpoint's safetensors header, if one is there.
/// Reads the header alone: a fine-tuned VGG16's checkpoint is tens of MB, and
/// [`kill_at_checkpoint`] polls it every few milliseconds (reading it whole
/// took long enough under load for the run to finish between two polls).
pub fn checkpoint_epoch(out: &Path) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(out.join("checkpoint.safetensors")).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let mut header = vec![0u8; usize::try_from(u64::from_le_bytes(len)).ok()?.min(100 << 20)];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    header["__metadata__"]["epoch"].as_str()?.parse().ok()
}

/// Runs `command` until a checkpoint of epoch `at_least` or later is down
/// in `out`, then SIGKILLs it; the checkpoint's epoch.
pub fn kill_at_checkpoint(mut command: std::process::Command, out: &Path, at_least: u64) -> u64 {
    let mut child = command.stderr(std::process::Stdio::null()).spawn().unwrap();
    let started = std::time::Instant::now();
    let killed_at = loop {
        if let Some(e) = checkpoint_epoch(out).filter(|&e| e >= at_least) {
            child.kill().unwrap();
            break e;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(started.elapsed().as_secs() < 600, "no checkpoint of epoch {at_least} within 10 minutes");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    child.wait().unwrap();
    assert!(!out.join("metrics.json").exists(), "killed before the end");
    killed_at
}
