//! convflow's winograd4 engine against ONNX Runtime on the same tensors
//! (random images, batch 20), interleaved, medians: a quick check of the
//! engine alone. The whole-pipeline rows are `cargo bench --bench extraction`.
//!
//!   cargo bench --bench winograd4 [-- SIZE...]        (default 150)
//!
//! Env: CONVFLOW_BENCH_MODEL (default models/vgg16_notop.onnx),
//! CONVFLOW_BENCH_REPEATS (default 5), CONVFLOW_VGG_ISA (avx2, avx512, portable).

use std::path::PathBuf;
use std::time::Instant;

use convflow::ml::vgg_cpu::VggCpu;
use convflow::ml::{Device, OnnxModel};

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
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
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
            "{size}x{size}, batch {n}, {threads} threads, median of {repeats}: onnxruntime {a:.2} images/s, winograd4 ({}) {b:.2} images/s: {:.2}x; max rel diff {worst:.2e}",
            engine.isa().name(),
            b / a
        );
    }
}
