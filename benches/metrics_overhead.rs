//! What metric emission costs, metrics on vs. off side by side in one run
//! (alternating runs; the median of paired ratios):
//!   tiny model  - read, decode, resize, batch, tiny_vgg.onnx, write on
//!                 generated images (no cache): the requirement, < 1 %;
//!   bare runtime - a source and three pass-through stages moving small items
//!                 as fast as the channels allow: the worst case, where the
//!                 per-item metric updates are all the work there is.
//!
//!   cargo bench --bench metrics_overhead
//!
//! Env: CONVFLOW_BENCH_COPIES (generated image set copies, 160 images each;
//! default 8), CONVFLOW_BENCH_ROUNDS (default 15), CONVFLOW_BENCH_ITEMS
//! (bare runtime items, default 200000). "On" records into an installed
//! Prometheus recorder (as `convflow run` with a report or a listen
//! address); "off" is RunOptions { metrics: false }: no handle is touched.
//! Writes target/bench/metrics_overhead.json.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use convflow::config;
use convflow::graph::Graph;
use convflow::item::{Item, ItemKind, Meta, Payload};
use convflow::runtime::{self, RunOptions};
use convflow::stage::Registry;
use convflow::stage::*;
use convflow::stages::builtin_registry;
use serde::{Deserialize, Serialize};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Serialize, Deserialize)]
struct Count {
    count: u64,
}

struct CountSource(u64);

impl Source for CountSource {
    fn run(&mut self, out: &mut dyn Emit, ctx: &SourceContext<'_>) -> Result<(), StageError> {
        let path: Arc<Path> = Arc::from(Path::new("item"));
        let bytes: Arc<[u8]> = Arc::from(vec![0u8; 16]);
        for i in 0..self.0 {
            if ctx.signals.should_stop() {
                break;
            }
            let meta = Meta {
                path: path.clone(),
                content_hash: [0; 32],
                label: None,
                split: None,
                epoch: 0,
                variant: 0,
                view: 0,
                seq: i,
            };
            out.emit(Item { meta, payload: Payload::Bytes(bytes.clone()) })?;
        }
        Ok(())
    }
    fn total(&self) -> Option<u64> {
        Some(self.0)
    }
}

impl StageConfig for Count {
    const KIND: &'static str = "count";
    const SUMMARY: &'static str = "bench source";
    const ACCEPTS: &'static [ItemKind] = &[];
    const EMITS: Option<ItemKind> = Some(ItemKind::Bytes);
    const OPTIONS: &'static [OptionDoc] = &[];
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Source(Box::new(CountSource(self.count))))
    }
}

#[derive(Serialize, Deserialize)]
struct Pass {}

struct PassStage;

impl Stage for PassStage {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        out.emit(item)?;
        Ok(())
    }
}

impl StageConfig for Pass {
    const KIND: &'static str = "pass";
    const SUMMARY: &'static str = "bench pass-through";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Bytes];
    const EMITS: Option<ItemKind> = Some(ItemKind::Bytes);
    const OPTIONS: &'static [OptionDoc] = &[];
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(PassStage)))
    }
}

#[derive(Serialize, Deserialize)]
struct Drop_ {}

struct DropStage;

impl Stage for DropStage {
    fn process(&mut self, _: Item, _: &mut dyn Emit) -> Result<(), StageError> {
        Ok(())
    }
}

impl StageConfig for Drop_ {
    const KIND: &'static str = "drop";
    const SUMMARY: &'static str = "bench sink";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Bytes];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = &[];
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(DropStage)))
    }
}

fn graph(yaml: &str, registry: &Registry) -> Graph {
    let cfg = config::parse_str(yaml, Path::new("bench.yaml"), &[]).unwrap();
    Graph::build(cfg, registry).unwrap_or_else(|e| panic!("{e}"))
}

/// Generated images, `copies` times (distinct names).
fn dataset(dir: &Path, copies: usize) -> usize {
    let demo = dir.join("demo");
    convflow::demo::generate(&demo, 42).unwrap();
    let mut n = 0;
    for class in ["cats", "dogs"] {
        let to = dir.join("data").join(class);
        std::fs::create_dir_all(&to).unwrap();
        for split in ["train", "validation", "test"] {
            for e in std::fs::read_dir(demo.join(split).join(class)).unwrap() {
                let p = e.unwrap().path();
                for k in 0..copies {
                    std::fs::copy(&p, to.join(format!("c{k}_{}", p.file_name().unwrap().to_string_lossy()))).unwrap();
                    n += 1;
                }
            }
        }
    }
    n
}

/// Items per second of steady flow (wall time less set-up), metrics on and
/// off; the overhead is the median of the paired (adjacent) runs' ratios,
/// which cancels drift from whatever else the machine is doing.
fn compare(name: &str, g: &Graph, rounds: usize) -> serde_json::Value {
    let (mut on, mut off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let run = |metrics: bool| {
        let report = runtime::run(g, &RunOptions { metrics, ..RunOptions::default() }).unwrap();
        let items = report.stages[0].items_out as f64;
        items / (report.wall_seconds - report.setup_seconds)
    };
    run(true); // warm-up: file cache, ORT's first session
    for r in 0..rounds {
        // Alternate which goes first, so drift hits both alike.
        let (a, b) = if r % 2 == 0 {
            let a = run(true);
            (a, run(false))
        } else {
            let b = run(false);
            (run(true), b)
        };
        on.push(a);
        off.push(b);
        ratios.push(100.0 * (b - a) / b);
    }
    let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let overhead = median(ratios);
    let (on, off) = (median(on), median(off));
    let per_item_ns = 1e9 / on - 1e9 / off;
    println!(
        "{name:<14} {off:>12.1} {on:>12.1} {overhead:>+9.2}%  [{lo:+.1}% .. {hi:+.1}%]  {per_item_ns:>+8.0} ns/item"
    );
    serde_json::json!({"off_items_per_s": off, "on_items_per_s": on, "overhead_pct_median_of_pairs": overhead,
        "pair_overhead_pct_min": lo, "pair_overhead_pct_max": hi, "extra_ns_per_item": per_item_ns})
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let rounds = env_or("CONVFLOW_BENCH_ROUNDS", 15);
    let copies = env_or("CONVFLOW_BENCH_COPIES", 8);
    let items = env_or("CONVFLOW_BENCH_ITEMS", 200_000);
    let exporter = convflow::telemetry::install_prometheus(None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let images = dataset(tmp.path(), copies);

    let mut registry = builtin_registry();
    registry.register::<Count>().register::<Pass>().register::<Drop_>();
    let model = root.join("models/tiny_vgg.onnx");
    assert!(model.exists(), "{} missing: run models/setup.sh", model.display());
    let tiny = graph(
        &format!(
            "name: bench_tiny
stages:
  - {{id: files, kind: file_reader, dir: '{data}'}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [150, 150]}}
  - {{id: batch, kind: batch, input: resize, size: 20}}
  - {{id: model, kind: onnx_features, input: batch, model: '{model}'}}
  - {{id: write, kind: feature_writer, input: model, dir: '{out}'}}
",
            data = tmp.path().join("data").display(),
            model = model.display(),
            out = tmp.path().join("out").display()
        ),
        &registry,
    );
    let bare = graph(
        &format!(
            "name: bench_bare
stages:
  - {{id: src, kind: count, count: {items}}}
  - {{id: a, kind: pass, input: src}}
  - {{id: b, kind: pass, input: a}}
  - {{id: c, kind: pass, input: b}}
  - {{id: sink, kind: drop, input: c}}
"
        ),
        &registry,
    );

    println!("metrics overhead: {rounds} alternating on/off pairs each; {images} generated images; {items} bare items");
    println!(
        "{:<14} {:>12} {:>12} {:>10}  {:<18} {:>13}",
        "pipeline", "off items/s", "on items/s", "overhead", "[pairs min .. max]", "cost"
    );
    let tiny_result = compare("tiny model", &tiny, rounds);
    let bare_result = compare("bare runtime", &bare, rounds);
    // The metric work per item does not depend on what the stages do, so the
    // worst case's extra time per item over the real pipeline's time per
    // item bounds the real overhead far below the noise of timing it.
    let bound = 100.0 * bare_result["extra_ns_per_item"].as_f64().unwrap_or(0.0).max(0.0)
        / (1e9 / tiny_result["off_items_per_s"].as_f64().unwrap_or(1.0));
    println!("bound from the bare runtime's extra ns/item over the tiny model pipeline's ns/item: {bound:.3}%");
    let series = exporter.render().lines().filter(|l| l.contains("pipeline=\"bench_")).count();
    println!("(the recorder held {series} series of the bench pipelines)");

    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({
        "rounds": rounds,
        "images": images,
        "bare_items": items,
        "tiny_model": tiny_result,
        "bare_runtime": bare_result,
        "tiny_model_overhead_bound_pct": bound,
    });
    std::fs::write(out.join("metrics_overhead.json"), serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
}
