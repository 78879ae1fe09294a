//! The framework's cost per item: a whole extraction pipeline (read, decode,
//! resize to 150x150, batch 20, the tiny model `models/tiny_vgg.onnx`, write
//! .npy) on ~50 real photos, against the same work done in one plain loop.
//!   pipeline/convflow          - `runtime::run` of the pipeline (model load excluded)
//!   pipeline/convflow_min_size - the same with `decode: {min_size: 150}`
//!   pipeline/plain_loop        - decode, resize, preprocess and model calls in one thread
//!
//!   cargo bench --bench pipeline
//!
//! Throughput is images/s (one iteration is the whole set). The pipeline
//! overlaps stages on threads, so it may beat the single-threaded loop; what
//! it costs beyond the work shows where it does not. Env as benches/decode.rs.
//! A head-epoch bench lives in benches/head.rs (owned with the trainer).

mod common;

use std::time::{Duration, Instant};

use convflow::imaging::decode::decode_image;
use convflow::imaging::resize::{Filter, Resize};
use convflow::ml::{Device, OnnxModel, Preprocess};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn benches(c: &mut Criterion) {
    let n = std::env::var("CONVFLOW_BENCH_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let photos = common::photos(&common::data_dir(), n);
    let model = common::root().join("models/tiny_vgg.onnx");
    assert!(model.exists(), "{} missing: run models/setup.sh", model.display());
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    common::copy_to(&photos, &data);

    let graph = |decode_opts: &str, name: &str| {
        let yaml = format!(
            "name: {name}
stages:
  - {{id: files, kind: file_reader, dir: {data}}}
  - {{id: decode, kind: decode, input: files{decode_opts}}}
  - {{id: resize, kind: resize, input: decode, size: [150, 150]}}
  - {{id: batch, kind: batch, input: resize, size: 20}}
  - {{id: tiny, kind: onnx_features, input: batch, model: {model}, device: cpu, preprocess: rescale}}
  - {{id: write, kind: feature_writer, input: tiny, dir: {out}}}
",
            data = data.display(),
            model = model.display(),
            out = tmp.path().join(format!("out-{name}")).display(),
        );
        let path = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).expect("write pipeline");
        let cfg = convflow::config::load(&path, &[]).expect("valid pipeline");
        convflow::graph::Graph::build(cfg, &convflow::stages::builtin_registry()).expect("valid graph")
    };
    let full = graph("", "full");
    let scaled = graph(", min_size: 150", "min_size");

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(photos.len() as u64));
    for (name, graph) in [("convflow", &full), ("convflow_min_size", &scaled)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let report = convflow::runtime::run(graph, &Default::default()).expect("pipeline runs");
                    total += t.elapsed().saturating_sub(Duration::from_secs_f64(report.setup_seconds));
                }
                total
            })
        });
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut session = OnnxModel::load(&model, Device::Cpu, threads, false).expect("model loads");
    let mut resize = Resize::new(150, 150, Filter::Nearest);
    g.bench_function("plain_loop", |b| {
        b.iter(|| {
            for chunk in photos.chunks(20) {
                let mut tensor = Vec::with_capacity(chunk.len() * 150 * 150 * 3);
                for (_, bytes) in chunk {
                    let img = resize.apply(decode_image(bytes, u64::MAX).expect("decodes")).expect("resizes");
                    Preprocess::Rescale.extend(&img, &mut tensor);
                }
                std::hint::black_box(session.run(tensor, chunk.len(), 150, 150).expect("model runs"));
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = pipeline;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(pipeline);
