//! VGG16 extraction on a GPU, the figures of docs/gpu.md, in one process:
//!   bare   - the model alone on tensors already in memory, per image size,
//!            batch size and math (float32 / TF32; pinned or pageable input);
//!   decode - read + decode + resize alone (no model), per worker count: the
//!            ceiling the CPU side puts on any extraction;
//!   e2e    - the whole pipeline (read, decode, resize, batch, VGG16, write),
//!            no cache, per image size, batch size and inference sessions.
//!
//! Figures are steady-state rates. The bare model is warmed up on each shape
//! first (cuDNN picks its algorithms on a shape's first call). A pipeline run
//! pays that search and its set-up inside the run, so the end-to-end and
//! decode figures are marginal: the images of a long run minus those of a
//! short one over the difference of their times, every fixed cost cancelling.
//! The plain rate of the long run is printed beside.
//!
//! Run by benches/gpu/device_check.sh on the GPU machine; here (no GPU) it
//! runs the same code on the CPU with small counts as a dry run:
//!
//!   CONVFLOW_GPU_DEVICE=cpu CONVFLOW_GPU_PHOTOS=../shared/data/cats_and_dogs_small/test \
//!     CONVFLOW_GPU_SCALE=0.05 cargo bench --bench gpu
//!
//! Env: CONVFLOW_GPU_PHOTOS (class folders of photos), CONVFLOW_GPU_MODEL
//! (default models/vgg16_notop.onnx), CONVFLOW_GPU_DEVICE (cuda | cpu),
//! CONVFLOW_GPU_SECTIONS (default bare,decode,e2e), CONVFLOW_GPU_SIZES
//! (150,224), CONVFLOW_GPU_BATCHES (20,64,128,256), CONVFLOW_GPU_WORKERS
//! (1,2,4,8,16), CONVFLOW_GPU_E2E (size/batch/sessions/math, comma-separated),
//! CONVFLOW_GPU_SCALE (multiplies every image count; 1 on the GPU),
//! CONVFLOW_GPU_OUT (the JSON written after each section).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use convflow::imaging::decode::decode_image;
use convflow::imaging::resize::{Filter, Resize};
use convflow::item::{Item, ItemKind};
use convflow::ml::{CudaOptions, Device, OnnxModel, Preprocess};
use convflow::stage::{BuildContext, Built, Emit, OptionDoc, Stage, StageConfig, StageError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn list(name: &str, default: &str) -> Vec<usize> {
    env_or(name, default).split(',').filter(|s| !s.is_empty()).map(|s| s.trim().parse().expect(name)).collect()
}

/// The sink of the decode-only pipeline: counts images, keeps nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscardConfig {}

impl StageConfig for DiscardConfig {
    const KIND: &'static str = "discard";
    const SUMMARY: &'static str = "drops every item (benchmarks)";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = &[];

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(Discard)))
    }
}

struct Discard;

impl Stage for Discard {
    fn process(&mut self, _item: Item, _out: &mut dyn Emit) -> Result<(), StageError> {
        Ok(())
    }
}

struct Bench {
    root: PathBuf,
    tmp: tempfile::TempDir,
    model: PathBuf,
    device: Device,
    scale: f64,
    photos: Vec<(PathBuf, Vec<u8>)>,
    results: serde_json::Map<String, Value>,
    out: PathBuf,
}

impl Bench {
    fn count(&self, n: usize) -> usize {
        ((n as f64 * self.scale).round() as usize).max(1)
    }

    fn save(&self) {
        std::fs::write(&self.out, serde_json::to_string_pretty(&self.results).expect("json")).expect("write results");
    }

    /// A folder of exactly `n` files cycling through the photos, classes kept.
    fn folder(&self, n: usize) -> PathBuf {
        let dir = self.tmp.path().join(format!("photos-{n}"));
        if dir.is_dir() {
            return dir;
        }
        for i in 0..n {
            let (path, _) = &self.photos[i % self.photos.len()];
            let class = path.parent().and_then(|p| p.file_name()).expect("class folder");
            let name = path.file_name().expect("file name").to_string_lossy();
            std::fs::create_dir_all(dir.join(class)).expect("class folder");
            let to = dir.join(class).join(format!("{i:06}-{name}"));
            std::fs::hard_link(path, &to).or_else(|_| std::fs::copy(path, &to).map(drop)).expect("link photo");
        }
        dir
    }

    /// One pipeline run over `n` images; (seconds after set-up, report).
    fn pipeline(&self, n: usize, tail: &str) -> (f64, convflow::runtime::RunReport) {
        let yaml = format!(
            "name: gpu_bench
stages:
  - {{id: files, kind: file_reader, dir: {data}}}
{tail}",
            data = self.folder(n).display(),
        );
        let path = self.tmp.path().join("bench.yaml");
        std::fs::write(&path, yaml).expect("write pipeline");
        let cfg = convflow::config::load(&path, &[]).expect("valid pipeline");
        let mut registry = convflow::stages::builtin_registry();
        registry.register::<DiscardConfig>();
        let graph = convflow::graph::Graph::build(cfg, &registry).expect("valid graph");
        let report = convflow::runtime::run(&graph, &Default::default()).expect("pipeline runs");
        let sink = report.stages.last().map_or(0, |s| s.items_in) as usize;
        assert_eq!(sink, n, "every image reaches the sink: {:?}", report.skipped);
        (report.wall_seconds - report.setup_seconds, report)
    }

    /// Marginal rate of a pipeline between a short and a long run.
    fn marginal(&self, short: usize, long: usize, tail: &str) -> Value {
        let (t_short, _) = self.pipeline(short, tail);
        let (t_long, report) = self.pipeline(long, tail);
        let marginal = (long - short) as f64 / (t_long - t_short).max(1e-9);
        json!({
            "images_per_second": marginal,
            "long_run_images_per_second": long as f64 / t_long,
            "short_images": short, "long_images": long,
            "short_seconds": t_short, "long_seconds": t_long,
            "setup_seconds": report.setup_seconds,
            "bottleneck": report.bottleneck,
            "stages": report.stages.iter().map(|s| json!({
                "id": s.id, "workers": s.workers, "busy_pct": s.busy_pct,
                "waiting_for_input_pct": s.waiting_for_input_pct,
                "blocked_on_output_pct": s.blocked_on_output_pct, "details": s.details,
            })).collect::<Vec<_>>(),
        })
    }

    fn bare(&mut self, sizes: &[usize], batches: &[usize]) {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let mut rows = Vec::new();
        for &size in sizes {
            // Real photos, decoded, resized and preprocessed once.
            let mut resize = Resize::new(size as u32, size as u32, Filter::Nearest);
            let pool: Vec<f32> = self
                .photos
                .iter()
                .take(256)
                .flat_map(|(_, bytes)| {
                    let mut t = Vec::new();
                    let img = decode_image(bytes, u64::MAX).expect("photo decodes");
                    Preprocess::Caffe.extend(&resize.apply(img).expect("resize"), &mut t);
                    t
                })
                .collect();
            let per_image = size * size * 3;
            let pool_images = pool.len() / per_image;
            let variants: &[(&str, CudaOptions)] = match self.device {
                Device::Cpu => &[("fp32", CudaOptions { tf32: false, pinned: false })],
                _ => &[
                    ("fp32", CudaOptions { tf32: false, pinned: true }),
                    ("fp32_pageable", CudaOptions { tf32: false, pinned: false }),
                    ("tf32", CudaOptions { tf32: true, pinned: true }),
                ],
            };
            for (name, cuda) in variants {
                let mut model =
                    OnnxModel::load_with(&self.model, self.device, threads, false, *cuda).expect("model loads");
                for &batch in batches {
                    let input: Vec<f32> = (0..batch)
                        .flat_map(|i| pool[(i % pool_images) * per_image..][..per_image].iter().copied())
                        .collect();
                    let t = Instant::now();
                    for _ in 0..2 {
                        model.run_slice(&input, batch, size, size).expect("warm-up");
                    }
                    let warmup = t.elapsed().as_secs_f64();
                    let want = self.count(2048);
                    let (mut done, mut calls) = (0usize, 0usize);
                    let t = Instant::now();
                    while done < want || calls < 3 {
                        model.run_slice(&input, batch, size, size).expect("model runs");
                        done += batch;
                        calls += 1;
                    }
                    let secs = t.elapsed().as_secs_f64();
                    let rate = done as f64 / secs;
                    eprintln!(
                        "bare  {size}x{size} batch {batch:3} {name:13} {rate:8.1} images/s ({calls} calls, warm-up {warmup:.2}s, pinned {})",
                        model.pinned()
                    );
                    rows.push(json!({
                        "size": size, "batch": batch, "variant": name, "images_per_second": rate,
                        "calls": calls, "seconds": secs, "warmup_seconds": warmup,
                        "provider": model.provider.to_string(), "pinned": model.pinned(),
                    }));
                }
            }
        }
        self.results.insert("bare".into(), Value::Array(rows));
        self.save();
    }

    fn decode(&mut self, sizes: &[usize], workers: &[usize]) {
        let mut rows = Vec::new();
        for &size in sizes {
            for &w in workers {
                let tail = format!(
                    "  - {{id: decode, kind: decode, input: files, workers: {w}}}
  - {{id: resize, kind: resize, input: decode, workers: {w}, size: [{size}, {size}]}}
  - {{id: sink, kind: discard, input: resize}}
"
                );
                let long = self.count(2000 * w).min(self.count(12800)).max(40);
                let mut row = self.marginal(long / 4, long, &tail);
                let rate = row["images_per_second"].as_f64().unwrap_or(0.0);
                eprintln!(
                    "decode {size}x{size} workers {w:2} {rate:8.1} images/s (long run {:.1})",
                    row["long_run_images_per_second"].as_f64().unwrap_or(0.0)
                );
                row["size"] = json!(size);
                row["workers"] = json!(w);
                rows.push(row);
            }
        }
        self.results.insert("decode".into(), Value::Array(rows));
        self.save();
    }

    fn e2e(&mut self, configs: &str) {
        let device = match self.device {
            Device::Cpu => "cpu",
            _ => "cuda",
        };
        let mut rows = Vec::new();
        for config in configs.split(',').filter(|c| !c.is_empty()) {
            // size/batch/sessions/math, then optionally `pageable` and `dN` (N decoders).
            let parts: Vec<&str> = config.split('/').collect();
            let [size, batch, sessions, math, ..] = parts[..] else {
                panic!("E2E entry {config}: size/batch/sessions/math[/pageable][/dN]")
            };
            let (size, batch): (usize, usize) = (size.parse().expect("size"), batch.parse().expect("batch"));
            let tf32 = math == "tf32";
            let pinned = !parts[4..].contains(&"pageable");
            let decoders = parts[4..]
                .iter()
                .find_map(|p| p.strip_prefix('d'))
                .map_or("auto".to_string(), |n| n.parse::<usize>().expect("dN").to_string());
            let out = self.tmp.path().join("features");
            let tail = format!(
                "  - {{id: decode, kind: decode, input: files, workers: {decoders}}}
  - {{id: resize, kind: resize, input: decode, workers: {decoders}, size: [{size}, {size}]}}
  - {{id: batch, kind: batch, input: resize, size: {batch}}}
  - {{id: vgg16, kind: onnx_features, input: batch, workers: {sessions}, model: {model}, device: {device}, preprocess: caffe, tf32: {tf32}, pinned_memory: {pinned}}}
  - {{id: write, kind: feature_writer, input: vgg16, dir: {out}}}
",
                model = self.model.display(),
                out = out.display(),
            );
            // Both runs are whole batches, so neither ends on a new shape.
            let long = (self.count(3840) / (5 * batch)).max(1) * 5 * batch;
            let mut row = self.marginal(long / 5, long, &tail);
            let rate = row["images_per_second"].as_f64().unwrap_or(0.0);
            eprintln!(
                "e2e   {size}x{size} batch {batch:3} sessions {sessions} {math:4} pinned {pinned:5} decoders {decoders:4} {rate:8.1} images/s (long run {:.1}); {}",
                row["long_run_images_per_second"].as_f64().unwrap_or(0.0),
                row["bottleneck"].as_str().unwrap_or("-")
            );
            row["size"] = json!(size);
            row["batch"] = json!(batch);
            row["sessions"] = json!(sessions.parse::<usize>().expect("sessions"));
            row["math"] = json!(math);
            row["pinned"] = json!(pinned);
            row["decoders"] = json!(decoders);
            rows.push(row);
            let _ = std::fs::remove_dir_all(&out);
        }
        self.results.insert("e2e".into(), Value::Array(rows));
        self.save();
    }
}

fn main() {
    let root = common::root();
    let photos_dir = PathBuf::from(env_or(
        "CONVFLOW_GPU_PHOTOS",
        &root.join("../shared/data/cats_and_dogs_small/test").to_string_lossy(),
    ));
    let device = match env_or("CONVFLOW_GPU_DEVICE", "cuda").as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda,
        other => panic!("CONVFLOW_GPU_DEVICE is cuda or cpu, not {other}"),
    };
    let mut bench = Bench {
        model: PathBuf::from(env_or("CONVFLOW_GPU_MODEL", &root.join("models/vgg16_notop.onnx").to_string_lossy())),
        device,
        scale: env_or("CONVFLOW_GPU_SCALE", "1").parse().expect("CONVFLOW_GPU_SCALE"),
        photos: common::photos(&photos_dir, usize::MAX),
        out: PathBuf::from(env_or("CONVFLOW_GPU_OUT", &root.join("target/bench/gpu.json").to_string_lossy())),
        results: serde_json::Map::new(),
        tmp: tempfile::tempdir().expect("temp dir"),
        root,
    };
    assert!(!bench.photos.is_empty(), "no photos under {}", photos_dir.display());
    // Plain files the pipelines can hard-link to.
    let stored = bench.tmp.path().join("source");
    common::copy_to(&bench.photos, &stored);
    bench.photos = common::photos(&stored, usize::MAX);
    if let Some(dir) = bench.out.parent() {
        std::fs::create_dir_all(dir).expect("output folder");
    }
    let machine = json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "device": format!("{device:?}"), "photos": bench.photos.len(), "scale": bench.scale,
        "model": bench.model.display().to_string(), "root": bench.root.display().to_string(),
    });
    bench.results.insert("machine".into(), machine);
    let sections = env_or("CONVFLOW_GPU_SECTIONS", "bare,decode,e2e");
    let sizes = list("CONVFLOW_GPU_SIZES", "150,224");
    for section in sections.split(',') {
        let t = Instant::now();
        match section {
            "bare" => bench.bare(&sizes, &list("CONVFLOW_GPU_BATCHES", "20,64,128,256")),
            "decode" => bench.decode(&sizes, &list("CONVFLOW_GPU_WORKERS", "1,2,4,8,16")),
            "e2e" => bench.e2e(&env_or(
                "CONVFLOW_GPU_E2E",
                "150/20/1/fp32,150/64/1/fp32,150/256/1/fp32,150/256/2/fp32,150/256/2/tf32,\
                 224/20/1/fp32,224/256/1/fp32,224/256/2/fp32,224/256/2/tf32",
            )),
            other => panic!("unknown section {other}"),
        }
        eprintln!("section {section}: {:.1}s", t.elapsed().as_secs_f64());
    }
    println!("{}", bench.out.display());
}
