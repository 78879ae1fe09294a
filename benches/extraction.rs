//! Extraction throughput, side by side in one run, at each size:
//!   bare model  - ONNX Runtime, and convflow's winograd engine, on tensors already in memory;
//!   convflow    - the whole pipeline (read, decode, resize, batch, VGG16, write), no cache,
//!                 with `engine: onnx` and with `engine: winograd`;
//!   python loop - PIL + onnxruntime, batch 20 (benches/python_loop.py), 150x150.
//!
//!   cargo bench --bench extraction
//!
//! Env: CONVFLOW_BENCH_DATA (a folder of class folders; default the book's
//! train split beside the checkout), CONVFLOW_BENCH_IMAGES (default 200),
//! CONVFLOW_BENCH_REPEATS (default 3), CONVFLOW_BENCH_MODEL, CONVFLOW_BENCH_SIZES
//! (default 150,224). The top-level figures (`bare_*`, `convflow_*`) are
//! 150x150's ONNX Runtime bare model and the default engine end to end;
//! `sizes` holds every row.
//! Prints medians and the ratio and writes target/bench/extraction.json.

use std::path::{Path, PathBuf};
use std::time::Instant;

use convflow::imaging::decode::decode_image;
use convflow::imaging::resize::{Filter, Resize};
use convflow::ml::vgg_cpu::VggCpu;
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

    // Per size: the bare models (ONNX Runtime and convflow's winograd
    // engine, tensors prepared up front, batches of 20) and the whole
    // pipeline with each engine, interleaved in every repeat.
    let sizes: Vec<u32> =
        env_or("CONVFLOW_BENCH_SIZES", "150,224").split(',').map(|s| s.trim().parse().unwrap()).collect();
    let spinning = env_or("CONVFLOW_BENCH_SPINNING", "false") == "true";
    let mut model = OnnxModel::load(&model_path, Device::Cpu, threads, spinning).unwrap();
    // None where the file is not a plain VGG (CONVFLOW_BENCH_MODEL): its rows say so.
    let engine = VggCpu::load(&model_path, threads, None).map_err(|e| eprintln!("winograd: {e}")).ok();
    let isa = engine.as_ref().map(|e| e.isa().name());
    let mut per_size = serde_json::Map::new();
    let (mut bare150, mut e2e150, mut setup150) = (Vec::new(), Vec::new(), Vec::new());
    for &size in &sizes {
        let sz = size as usize;
        let mut resize = Resize::new(size, size, Filter::Nearest);
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
        let graph = |engine: &str| {
            let yaml = format!(
                "name: bench
stages:
  - {{id: files, kind: file_reader, dir: {data}}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [{size}, {size}]}}
  - {{id: batch, kind: batch, input: resize, size: 20}}
  - {{id: vgg16, kind: onnx_features, input: batch, model: {model}, device: cpu, preprocess: rescale, spinning: {spinning}, engine: {engine}}}
  - {{id: write, kind: feature_writer, input: vgg16, dir: {out}}}
",
                data = tmp.path().join("data").display(),
                model = model_path.display(),
                out = tmp.path().join("out").display(),
            );
            let yaml_path = tmp.path().join(format!("bench_{engine}.yaml"));
            std::fs::write(&yaml_path, yaml).unwrap();
            let cfg = convflow::config::load(&yaml_path, &[]).unwrap();
            convflow::graph::Graph::build(cfg, &convflow::stages::builtin_registry()).unwrap()
        };
        let engines: Vec<&str> = if engine.is_some() { vec!["onnx", "winograd"] } else { vec!["onnx"] };
        let graphs: Vec<_> = engines.iter().map(|e| graph(e)).collect();
        let mut bare: Vec<Vec<f64>> = vec![Vec::new(); engines.len()];
        let mut e2e: Vec<Vec<f64>> = vec![Vec::new(); engines.len()];
        let mut e2e_setup: Vec<Vec<f64>> = vec![Vec::new(); engines.len()];
        // convflow's figure is steady-state streaming: the wall time minus
        // the set-up (model load), which the bare loops do not pay either;
        // the figure with set-up is kept beside it.
        for r in 0..repeats {
            for (i, name) in engines.iter().enumerate() {
                let t = Instant::now();
                for b in &batches {
                    let rows = b.len() / (sz * sz * 3);
                    match (*name, &engine) {
                        ("winograd", Some(e)) => drop(e.run(b, rows, sz, sz).unwrap()),
                        _ => drop(model.run(b.clone(), rows, sz, sz).unwrap()),
                    }
                }
                bare[i].push(n as f64 / t.elapsed().as_secs_f64());
                let t = Instant::now();
                let report = convflow::runtime::run(&graphs[i], &Default::default()).unwrap();
                let wall = t.elapsed().as_secs_f64();
                e2e[i].push(n as f64 / (wall - report.setup_seconds));
                e2e_setup[i].push(n as f64 / wall);
                eprintln!(
                    "{size}x{size} repeat {}: {name}: bare {:.2} img/s, convflow end to end {:.2} img/s",
                    r + 1,
                    bare[i][r],
                    e2e[i][r]
                );
            }
        }
        let ort_bare = median(bare[0].clone());
        let mut rows = serde_json::Map::new();
        println!(
            "VGG16 feature extraction, {n} images, {size}x{size}, batch 20, {threads} threads, median of {repeats}:"
        );
        for (i, name) in engines.iter().enumerate() {
            let (b, e) = (median(bare[i].clone()), median(e2e[i].clone()));
            println!(
                "  {name:9} bare model (tensors in memory)  {b:8.2} images/s   ({:.2}x bare ONNX Runtime)",
                b / ort_bare
            );
            println!(
                "  {name:9} convflow end to end             {e:8.2} images/s   ({:.2}x bare ONNX Runtime)",
                e / ort_bare
            );
            rows.insert(
                name.to_string(),
                serde_json::json!({
                    "bare_images_per_second": bare[i], "convflow_images_per_second": e2e[i],
                    "convflow_with_setup_images_per_second": e2e_setup[i],
                    "bare_median": b, "convflow_median": e, "convflow_vs_bare_onnx": e / ort_bare,
                }),
            );
        }
        if size == 150 {
            // The default engine (auto: the last, winograd where it covers the model).
            bare150 = bare[0].clone();
            e2e150 = e2e[engines.len() - 1].clone();
            setup150 = e2e_setup[engines.len() - 1].clone();
        }
        per_size.insert(size.to_string(), serde_json::Value::Object(rows));
    }
    let (bare, e2e, e2e_setup) = (bare150, e2e150, setup150);

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

    let (bare_m, e2e_m) =
        if bare.is_empty() { (f64::NAN, f64::NAN) } else { (median(bare.clone()), median(e2e.clone())) };
    match python {
        Some(p) => println!("python loop (PIL + onnxruntime, 150x150) {p:8.2} images/s   (convflow {:.2}x)", e2e_m / p),
        None => println!("python loop: did not run (models/setup.sh makes .venv)"),
    }
    let json = serde_json::json!({
        "images": n, "threads": threads, "repeats": repeats,
        "bare_images_per_second": bare, "convflow_images_per_second": e2e,
        "convflow_with_setup_images_per_second": e2e_setup, "spinning": spinning,
        "bare_median": bare_m, "convflow_median": e2e_m, "ratio": e2e_m / bare_m,
        "python_loop_images_per_second": python,
        "engine_isa": isa, "sizes": per_size,
    });
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("extraction.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
}
