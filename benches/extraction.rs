//! Extraction throughput, side by side in one run:
//!   bare model  - the same ONNX session settings on tensors already in memory;
//!   convflow    - the whole pipeline (read, decode, resize, batch, VGG16, write), no cache;
//!   python loop - PIL + onnxruntime, batch 20 (benches/python_loop.py).
//!
//!   cargo bench --bench extraction
//!
//! Env: CONVFLOW_BENCH_DATA (a folder of class folders; default the book's
//! train split beside the checkout), CONVFLOW_BENCH_IMAGES (default 200),
//! CONVFLOW_BENCH_REPEATS (default 3), CONVFLOW_BENCH_MODEL.
//! Prints medians and the ratio and writes target/bench/extraction.json.

use std::path::{Path, PathBuf};
use std::time::Instant;

use convflow::imaging::decode::decode_image;
use convflow::imaging::resize::{Filter, Resize};
use convflow::ml::{Device, OnnxModel, Preprocess};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Copies the first `n` images (sorted, classes interleaved evenly) into `dir`.
fn sample(from: &Path, n: usize, dir: &Path) -> Vec<PathBuf> {
    let mut classes: Vec<PathBuf> =
        std::fs::read_dir(from).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    classes.sort();
    let mut picked = Vec::new();
    for c in &classes {
        let mut files: Vec<PathBuf> = std::fs::read_dir(c).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let target = dir.join(c.file_name().unwrap());
        std::fs::create_dir_all(&target).unwrap();
        for f in files.into_iter().take(n / classes.len()) {
            let to = target.join(f.file_name().unwrap());
            std::fs::copy(&f, &to).unwrap();
            picked.push(to);
        }
    }
    picked.sort();
    picked
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = PathBuf::from(env_or(
        "CONVFLOW_BENCH_DATA",
        &root.join("../shared/data/cats_and_dogs_small/train").to_string_lossy(),
    ));
    let n: usize = env_or("CONVFLOW_BENCH_IMAGES", "200").parse().unwrap();
    let repeats: usize = env_or("CONVFLOW_BENCH_REPEATS", "3").parse().unwrap();
    let model_path =
        PathBuf::from(env_or("CONVFLOW_BENCH_MODEL", &root.join("models/vgg16_notop.onnx").to_string_lossy()));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let tmp = tempfile::tempdir().unwrap();
    let files = sample(&data, n, &tmp.path().join("data"));
    let n = files.len();

    // Bare model: tensors prepared up front, batches of 20.
    let mut resize = Resize::new(150, 150, Filter::Nearest);
    let batches: Vec<Vec<f32>> = files
        .chunks(20)
        .map(|chunk| {
            let mut t = Vec::new();
            for f in chunk {
                let img = decode_image(&std::fs::read(f).unwrap(), u64::MAX).unwrap();
                Preprocess::Rescale.extend(&resize.apply(img).unwrap(), &mut t);
            }
            t
        })
        .collect();
    let spinning = env_or("CONVFLOW_BENCH_SPINNING", "false") == "true";
    let mut model = OnnxModel::load(&model_path, Device::Cpu, threads, spinning).unwrap();

    let yaml = format!(
        "name: bench
stages:
  - {{id: files, kind: file_reader, dir: {data}}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [150, 150]}}
  - {{id: batch, kind: batch, input: resize, size: 20}}
  - {{id: vgg16, kind: onnx_features, input: batch, model: {model}, device: cpu, preprocess: rescale, spinning: {spinning}}}
  - {{id: write, kind: feature_writer, input: vgg16, dir: {out}}}
",
        data = tmp.path().join("data").display(),
        model = model_path.display(),
        out = tmp.path().join("out").display(),
    );
    let yaml_path = tmp.path().join("bench.yaml");
    std::fs::write(&yaml_path, yaml).unwrap();
    let cfg = convflow::config::load(&yaml_path, &[]).unwrap();
    let graph = convflow::graph::Graph::build(cfg, &convflow::stages::builtin_registry()).unwrap();

    // convflow's figure is steady-state streaming: the wall time minus the
    // set-up (model load), which the bare loop does not pay either; the
    // figure with set-up is printed beside it.
    let (mut bare, mut e2e, mut e2e_setup) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..repeats {
        let t = Instant::now();
        for b in &batches {
            let rows = b.len() / (150 * 150 * 3);
            model.run(b.clone(), rows, 150, 150).unwrap();
        }
        bare.push(n as f64 / t.elapsed().as_secs_f64());

        let t = Instant::now();
        let report = convflow::runtime::run(&graph, &Default::default()).unwrap();
        let wall = t.elapsed().as_secs_f64();
        e2e.push(n as f64 / (wall - report.setup_seconds));
        e2e_setup.push(n as f64 / wall);
        eprintln!("repeat {}: bare {:.2} img/s, convflow {:.2} img/s", r + 1, bare[r], e2e[r]);
    }

    let python = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("benches/python_loop.py"))
        .arg(&model_path)
        .arg(tmp.path().join("data"))
        .arg(n.to_string())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines().last().and_then(|l| l.strip_prefix("images_per_second=")).and_then(|v| v.parse::<f64>().ok())
        });

    let (bare_m, e2e_m) = (median(bare.clone()), median(e2e.clone()));
    println!("VGG16 feature extraction, {n} images, 150x150, batch 20, {threads} threads, median of {repeats}:");
    println!("  bare model (tensors in memory)  {bare_m:8.2} images/s");
    println!("  convflow end to end             {e2e_m:8.2} images/s   ({:.1}% of bare)", 100.0 * e2e_m / bare_m);
    println!("  convflow incl. model load       {:8.2} images/s", median(e2e_setup.clone()));
    match python {
        Some(p) => println!("  python loop (PIL + onnxruntime) {p:8.2} images/s   (convflow {:.2}x)", e2e_m / p),
        None => println!("  python loop: did not run (models/setup.sh makes .venv)"),
    }
    let json = serde_json::json!({
        "images": n, "threads": threads, "repeats": repeats,
        "bare_images_per_second": bare, "convflow_images_per_second": e2e,
        "convflow_with_setup_images_per_second": e2e_setup, "spinning": spinning,
        "bare_median": bare_m, "convflow_median": e2e_m, "ratio": e2e_m / bare_m,
        "python_loop_images_per_second": python,
    });
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("extraction.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
}
