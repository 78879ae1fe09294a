//! convflow's winograd engine against ONNX Runtime on the same tensors
//! (random images, batch 20), interleaved, medians: a quick check of the
//! engine alone. The whole-pipeline rows are `cargo bench --bench extraction`.
//!
//!   cargo bench --bench winograd [-- SIZE...]        (default 150)
//!   cargo bench --bench winograd -- photos DIR MODE SIZE
//!
//! `photos`: every image under DIR (class folders: the book's test split),
//! decoded and resized as the pipelines do (nearest) and preprocessed with
//! MODE (rescale, caffe), in batches of 20 through both: prints the largest
//! and the median over images of max |diff| / max |ORT| (the engine's
//! contract: at most 1e-4), and writes each image's to target/bench/winograd_photos.json.
//!
//! Env: CONVFLOW_BENCH_MODEL (default models/vgg16_notop.onnx),
//! CONVFLOW_BENCH_REPEATS (default 5), CONVFLOW_VGG_ISA (avx2, avx512, portable).

use std::path::PathBuf;
use std::time::Instant;

use convflow::imaging::decode::decode_image;
use convflow::imaging::resize::{Filter, Resize};
use convflow::ml::vgg_cpu::VggCpu;
use convflow::ml::{Device, OnnxModel, Preprocess};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model_path = std::env::var("CONVFLOW_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("models/vgg16_notop.onnx"));
    let repeats: usize = std::env::var("CONVFLOW_BENCH_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.first().map(String::as_str) == Some("photos") {
        return photos(&root, &model_path, &args[1..]);
    }
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![150] } else { sizes };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut ort = OnnxModel::load(&model_path, Device::Cpu, threads, false).unwrap();
    let engine = VggCpu::load(&model_path, threads, None).unwrap();
    let n = 20;
    for size in sizes {
        let mut s = 12345u64;
        let x: Vec<f32> = (0..n * size * size * 3)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 255.0 - 120.0
            })
            .collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut worst = 0f32;
        for _ in 0..repeats {
            let t = Instant::now();
            let (_, want) = ort.run_slice(&x, n, size, size).unwrap();
            a.push(n as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            let (_, got) = engine.run(&x, n, size, size).unwrap();
            b.push(n as f64 / t.elapsed().as_secs_f64());
            let per = want.len() / n;
            for (g, w) in got.chunks(per).zip(want.chunks(per)) {
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                worst = worst.max(g.iter().zip(w).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale);
            }
        }
        let (a, b) = (median(a), median(b));
        println!(
            "{size}x{size}, batch {n}, {threads} threads, median of {repeats}: onnxruntime {a:.2} images/s, winograd ({}) {b:.2} images/s: {:.2}x; max rel diff {worst:.2e}",
            engine.isa().name(),
            b / a
        );
    }
}

fn photos(root: &std::path::Path, model_path: &std::path::Path, args: &[String]) {
    let dir = PathBuf::from(&args[0]);
    let mode = match args.get(1).map(String::as_str).unwrap_or("rescale") {
        "caffe" => Preprocess::Caffe,
        _ => Preprocess::Rescale,
    };
    let size: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(150);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flat_map(|c| std::fs::read_dir(c.unwrap().path()).unwrap().map(|f| f.unwrap().path()))
        .collect();
    files.sort();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut ort = OnnxModel::load(model_path, Device::Cpu, threads, false).unwrap();
    let engine = VggCpu::load(model_path, threads, None).unwrap();
    let mut resize = Resize::new(size, size, Filter::Nearest);
    let s = size as usize;
    let mut worst: Vec<(String, f32)> = Vec::new();
    for chunk in files.chunks(20) {
        let mut x = Vec::new();
        for f in chunk {
            let img = decode_image(&std::fs::read(f).unwrap(), u64::MAX).unwrap();
            mode.extend(&resize.apply(img).unwrap(), &mut x);
        }
        let (_, want) = ort.run_slice(&x, chunk.len(), s, s).unwrap();
        let (_, got) = engine.run(&x, chunk.len(), s, s).unwrap();
        let per = want.len() / chunk.len();
        for ((g, w), f) in got.chunks(per).zip(want.chunks(per)).zip(chunk) {
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = g.iter().zip(w).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            worst.push((f.display().to_string(), d / scale));
        }
    }
    let mut r: Vec<f32> = worst.iter().map(|w| w.1).collect();
    r.sort_by(f32::total_cmp);
    println!(
        "{} photos of {}, {size}x{size}, {mode:?}, winograd ({}) vs ONNX Runtime: max |diff| / max |ORT| per image: largest {:.2e}, median {:.2e}",
        r.len(),
        dir.display(),
        engine.isa().name(),
        r[r.len() - 1],
        r[r.len() / 2]
    );
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({"dir": dir, "mode": format!("{mode:?}"), "size": size, "isa": engine.isa().name(),
        "largest": r[r.len() - 1], "median": r[r.len() / 2], "per_image": worst});
    std::fs::write(out.join("winograd_photos.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
}
