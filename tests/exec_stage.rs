//! The `exec` stage: Python workers over stdin/stdout give the same pixels
//! as the same transform in Rust, on the book's images; a worker that
//! exits, answers garbage, raises, answers the wrong shape or hangs costs
//! only its item (listed with the stage and path) and is restarted; restarts
//! are bounded; `on_error: fail` names the stage. An ignored test measures
//! throughput against the in-process Rust stage.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use convflow::item::{Item, ItemKind, Meta, Payload};
use convflow::runtime::{RunError, RunOptions, RunReport};
use convflow::stage::Registry;
use convflow::stage::{BuildContext, Built, Emit, OptionDoc, Source, SourceContext, Stage, StageConfig, StageError};
use serde::{Deserialize, Serialize};

// ---- test-only stages -------------------------------------------------------

/// `invert_rust`: the same transform as tests/fixtures/exec/invert.py, in process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvertConfig {}

impl StageConfig for InvertConfig {
    const KIND: &'static str = "invert_rust";
    const SUMMARY: &'static str = "255 - v";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image];
    const EMITS: Option<ItemKind> = Some(ItemKind::Image);
    const OPTIONS: &'static [OptionDoc] = &[];
    const PARALLEL: bool = true;
    const AFFECTS_PIXELS: bool = true;
    const PASSES_PRECOMPUTED: bool = true;
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(Invert)))
    }
}

struct Invert;

impl Stage for Invert {
    fn process(&mut self, mut item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        if let Payload::Image(img) = &mut item.payload {
            img.iter_mut().for_each(|v| *v = 255 - *v);
        }
        out.emit(item)?;
        Ok(())
    }
}

type Records = Vec<(PathBuf, u64, image::RgbImage)>;

fn records() -> &'static Mutex<HashMap<String, Records>> {
    static R: OnceLock<Mutex<HashMap<String, Records>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// `record`: a sink keeping (path, seq, pixels) in arrival order under `tag`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordConfig {
    tag: String,
}

impl StageConfig for RecordConfig {
    const KIND: &'static str = "record";
    const SUMMARY: &'static str = "test sink";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = &[];
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        records().lock().unwrap().insert(self.tag.clone(), Vec::new());
        Ok(Built::Stage(Box::new(Record { tag: self.tag.clone() })))
    }
}

struct Record {
    tag: String,
}

impl Stage for Record {
    fn process(&mut self, item: Item, _: &mut dyn Emit) -> Result<(), StageError> {
        if let Payload::Image(img) = item.payload {
            records().lock().unwrap().get_mut(&self.tag).unwrap().push((
                item.meta.path.to_path_buf(),
                item.meta.seq,
                img,
            ));
        }
        Ok(())
    }
}

fn take(tag: &str) -> Records {
    records().lock().unwrap().remove(tag).unwrap_or_default()
}

fn image_store() -> &'static Mutex<HashMap<String, Arc<Vec<Item>>>> {
    static S: OnceLock<Mutex<HashMap<String, Arc<Vec<Item>>>>> = OnceLock::new();
    S.get_or_init(Default::default)
}

/// `memory_images`: a source replaying decoded images kept in memory (so a
/// benchmark times the stage under test, not JPEG decoding).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryConfig {
    tag: String,
    /// Replays the images this many times.
    repeat: u64,
}

impl StageConfig for MemoryConfig {
    const KIND: &'static str = "memory_images";
    const SUMMARY: &'static str = "test source";
    const ACCEPTS: &'static [ItemKind] = &[];
    const EMITS: Option<ItemKind> = Some(ItemKind::Image);
    const OPTIONS: &'static [OptionDoc] = &[];
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Source(Box::new(Memory(image_store().lock().unwrap()[&self.tag].clone(), self.repeat))))
    }
}

struct Memory(Arc<Vec<Item>>, u64);

impl Source for Memory {
    fn run(&mut self, out: &mut dyn Emit, _: &SourceContext<'_>) -> Result<(), StageError> {
        let n = self.0.len() as u64;
        for round in 0..self.1 {
            for item in self.0.iter() {
                let mut item = item.clone();
                item.meta.seq += round * n;
                out.emit(item)?;
            }
        }
        Ok(())
    }
}

// ---- helpers ----------------------------------------------------------------

fn registry() -> Registry {
    let mut r = convflow::stages::builtin_registry();
    r.register::<InvertConfig>().register::<RecordConfig>().register::<MemoryConfig>();
    r
}

fn run(yaml: &str) -> Result<RunReport, RunError> {
    let cfg = convflow::config::parse_str(yaml, Path::new("exec_test.yaml"), &[]).expect("pipeline parses");
    let graph = convflow::graph::Graph::build(cfg, &registry()).unwrap_or_else(|e| panic!("invalid pipeline: {e}"));
    convflow::runtime::run(&graph, &RunOptions { metrics: false, ..Default::default() })
}

fn fixture(name: &str) -> String {
    common::root().join("tests/fixtures/exec").join(name).display().to_string()
}

fn python() -> String {
    common::python().display().to_string()
}

/// A class-folder copy of the first `per_class` cats and dogs of the book's train split.
fn real_subset(per_class: usize) -> Option<tempfile::TempDir> {
    let data = common::shared_data()?;
    let tmp = tempfile::tempdir().unwrap();
    for class in ["cats", "dogs"] {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(data.join("train").join(class)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let dst = tmp.path().join(class);
        std::fs::create_dir_all(&dst).unwrap();
        for f in files.iter().take(per_class) {
            std::fs::copy(f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    Some(tmp)
}

/// The demo data's train split (80 small JPEGs), generated once per test.
fn demo() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 7).unwrap();
    let train = data.join("train");
    (tmp, train)
}

/// files -> decode -> `middle` (YAML of zero or more stages ending in stage `last`) -> record under `tag`.
fn chain(dir: &Path, middle: &str, last: &str, tag: &str) -> String {
    format!(
        "name: exec_test
stages:
  - {{id: files, kind: file_reader, dir: {dir}}}
  - {{id: decode, kind: decode, input: files}}
{middle}
  - {{id: sink, kind: record, input: {last}, tag: {tag}}}
",
        dir = dir.display()
    )
}

fn exec_stage(input: &str, extra: &str, script: &str) -> String {
    format!(
        "  - {{id: px, kind: exec, input: {input}, command: [{py}, {script}]{extra}}}",
        py = python(),
        script = fixture(script)
    )
}

fn misbehaving(mode: &str, at: i64, extra: &str) -> String {
    format!(
        "  - {{id: px, kind: exec, input: decode, command: [{py}, {script}], env: {{MODE: {mode}, AT: '{at}'}}{extra}}}",
        py = python(),
        script = fixture("misbehave.py")
    )
}

fn stage<'a>(report: &'a RunReport, id: &str) -> &'a convflow::runtime::report::StageReport {
    report.stages.iter().find(|s| s.id == id).unwrap()
}

fn inverted(img: &image::RgbImage) -> image::RgbImage {
    let mut v = img.clone();
    v.iter_mut().for_each(|p| *p = 255 - *p);
    v
}

/// The decoded pixels of `dir`, in source order.
fn plain(dir: &Path, tag: &str) -> Records {
    run(&chain(dir, "", "decode", tag)).unwrap();
    take(tag)
}

// ---- tests ------------------------------------------------------------------

#[test]
fn python_inversion_gives_the_rust_inversion_pixels_on_real_images() {
    let Some(data) = real_subset(20) else { return };
    let dir = data.path();
    // Full-size images of every size through two Python workers, then a resize...
    let resize = "\n  - {id: small, kind: resize, input: px, size: [150, 150]}";
    let py =
        run(&chain(dir, &(exec_stage("decode", ", workers: 2", "invert.py") + resize), "small", "real_py")).unwrap();
    // ...and the very same graph with the inversion in Rust.
    let rs = run(&chain(
        dir,
        &("  - {id: px, kind: invert_rust, input: decode, workers: 2}".to_string() + resize),
        "small",
        "real_rs",
    ))
    .unwrap();
    let (py_out, rs_out) = (take("real_py"), take("real_rs"));
    assert!(py.skipped.is_empty(), "{:?}", py.skipped);
    assert_eq!(py_out.len(), 40);
    assert_eq!(rs_out.len(), 40);
    for ((pp, ps, pi), (rp, rs_, ri)) in py_out.iter().zip(&rs_out) {
        assert_eq!((pp, ps), (rp, rs_), "order differs");
        assert_eq!(pi.dimensions(), (150, 150));
        assert!(pi == ri, "{}: pixels differ", pp.display());
    }
    let px = stage(&py, "px");
    assert_eq!((px.kind.as_str(), px.workers, px.items_in, px.items_out), ("exec", 2, 40, 40));
    let details = px.details.clone().unwrap();
    assert_eq!((details["items"].as_u64(), details["restarts"].as_u64()), (Some(40), Some(0)), "{details}");
    assert!(rs.skipped.is_empty());

    // And it really is 255 - v of the decoded image, at full size.
    let original = plain(dir, "real_plain");
    let full = run(&chain(dir, &exec_stage("decode", "", "invert.py"), "px", "real_full")).unwrap();
    assert!(full.skipped.is_empty());
    let full = take("real_full");
    assert_eq!(full.len(), original.len());
    for ((p, _, a), (q, _, b)) in full.iter().zip(&original) {
        assert_eq!(p, q);
        assert!(a == &inverted(b), "{}", p.display());
    }
}

#[test]
fn a_worker_that_exits_mid_run_costs_its_item_only_and_is_restarted() {
    let (_tmp, train) = demo();
    let original = plain(&train, "exit_plain");
    let report = run(&chain(&train, &misbehaving("exit", 4, ", workers: 2"), "px", "exit")).unwrap();
    let got = take("exit");
    // The 5th item (seq 4) is listed with the stage and its path...
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    let s = &report.skipped[0];
    assert_eq!(s.stage, "px");
    assert_eq!(s.path, original[4].0);
    assert!(s.reason.contains("worker exited") && s.reason.contains("exit status: 3"), "{}", s.reason);
    assert!(s.reason.contains("exiting on seq 4"), "the worker's last stderr line is quoted: {}", s.reason);
    // ...every other item arrives, in order, inverted.
    assert_eq!(got.len(), original.len() - 1);
    let expected: Vec<_> = original.iter().enumerate().filter(|(i, _)| *i != 4).map(|(_, r)| r).collect();
    for ((p, _, img), (q, _, o)) in got.iter().zip(expected) {
        assert_eq!(p, q);
        assert!(img == &inverted(o), "{}", p.display());
    }
    // ...and the worker was restarted once.
    let d = stage(&report, "px").details.clone().unwrap();
    assert_eq!(
        (d["restarts"].as_u64(), d["worker_exits"].as_u64(), d["items"].as_u64()),
        (Some(1), Some(1), Some(79)),
        "{d}"
    );
}

#[test]
fn a_garbage_answer_is_an_item_error_and_fails_the_run_under_on_error_fail() {
    let (_tmp, train) = demo();
    let report = run(&chain(&train, &misbehaving("garbage", 2, ""), "px", "garbage")).unwrap();
    let got = take("garbage");
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    let s = &report.skipped[0];
    assert_eq!(s.stage, "px");
    assert!(
        s.reason.contains("worker answered garbage") && s.reason.contains("hello, this is not a frame"),
        "{}",
        s.reason
    );
    assert_eq!(got.len(), 79);
    let d = stage(&report, "px").details.clone().unwrap();
    assert_eq!((d["restarts"].as_u64(), d["garbage_answers"].as_u64()), (Some(1), Some(1)), "{d}");

    let err = run(&chain(&train, &misbehaving("garbage", 2, ", on_error: fail"), "px", "garbage_fail")).unwrap_err();
    let _ = take("garbage_fail");
    let RunError::Stage { stage, message, .. } = &err else { panic!("{err}") };
    assert_eq!(stage, "px");
    assert!(
        message.contains(&*s.path.to_string_lossy())
            && message.contains("garbage")
            && message.contains("on_error: fail"),
        "{message}"
    );
    assert!(err.to_string().starts_with("stage `px` failed:"), "{err}");
}

#[test]
fn exceptions_and_wrong_shapes_cost_the_item_and_the_worker_stays() {
    let (_tmp, train) = demo();
    let report = run(&chain(&train, &misbehaving("raise", 1, ""), "px", "raise")).unwrap();
    assert_eq!(take("raise").len(), 79);
    assert_eq!(report.skipped.len(), 1);
    assert!(
        report.skipped[0].reason.starts_with("worker error: ValueError: cannot handle "),
        "{}",
        report.skipped[0].reason
    );
    let d = stage(&report, "px").details.clone().unwrap();
    assert_eq!((d["restarts"].as_u64(), d["worker_errors"].as_u64()), (Some(0), Some(1)), "{d}");

    let report = run(&chain(&train, &misbehaving("shape", 1, ""), "px", "shape")).unwrap();
    assert_eq!(take("shape").len(), 79);
    assert_eq!(report.skipped.len(), 1);
    assert!(report.skipped[0].reason.contains("needs uint8 [H, W, 3]"), "{}", report.skipped[0].reason);
    assert_eq!(stage(&report, "px").details.clone().unwrap()["restarts"], 0);
}

#[test]
fn a_worker_past_its_timeout_is_killed_and_restarted() {
    let (_tmp, train) = demo();
    let t = Instant::now();
    let report = run(&chain(&train, &misbehaving("sleep", 3, ", timeout_ms: 2000"), "px", "sleep")).unwrap();
    assert_eq!(take("sleep").len(), 79);
    assert_eq!(report.skipped.len(), 1);
    assert!(
        report.skipped[0].reason.contains("no answer within 2000 ms; worker killed"),
        "{}",
        report.skipped[0].reason
    );
    let d = stage(&report, "px").details.clone().unwrap();
    assert_eq!((d["restarts"].as_u64(), d["timeouts"].as_u64()), (Some(1), Some(1)), "{d}");
    assert!(t.elapsed().as_secs_f64() < 4.5, "the sleeping worker was not waited for: {:?}", t.elapsed());
}

#[test]
fn restarts_are_bounded_and_a_broken_worker_is_fatal() {
    let (_tmp, train) = demo();
    let err = run(&chain(&train, &misbehaving("always_exit", -1, ", restarts: 2"), "px", "always")).unwrap_err();
    let _ = take("always");
    let RunError::Stage { stage, message, report } = &err else { panic!("{err}") };
    assert_eq!(stage, "px");
    assert!(message.contains("already restarted 2 time(s) (restarts: 2), giving up"), "{message}");
    assert_eq!(report.skipped.len(), 2, "the two items before the limit are listed: {:?}", report.skipped);

    let err = run(&chain(&train, &misbehaving("no_ready", -1, ""), "px", "no_ready")).unwrap_err();
    let _ = take("no_ready");
    let RunError::Stage { stage, message, .. } = &err else { panic!("{err}") };
    assert_eq!(stage, "px");
    assert!(
        message.contains("did not start")
            && message.contains("exit status: 2")
            && message.contains("cannot load my model"),
        "{message}"
    );

    // A command that is not there, or a misspelt option: the pipeline is invalid, nothing runs.
    let yaml =
        chain(&train, "  - {id: px, kind: exec, input: decode, command: [/no/such/python, x.py]}", "px", "missing");
    let cfg = convflow::config::parse_str(&yaml, Path::new("p.yaml"), &[]).unwrap();
    let e = convflow::graph::Graph::build(cfg, &registry()).err().expect("invalid").to_string();
    assert!(e.contains("/no/such/python does not exist"), "{e}");
    let yaml =
        chain(&train, &format!("  - {{id: px, kind: exec, input: decode, comand: [{}]}}", python()), "px", "typo");
    let cfg = convflow::config::parse_str(&yaml, Path::new("p.yaml"), &[]).unwrap();
    let e = convflow::graph::Graph::build(cfg, &registry()).err().expect("invalid").to_string();
    assert!(e.contains("comand"), "{e}");
}

/// Throughput of `exec` against the same transform in process, on 200 of
/// the book's images held decoded in memory (so decoding is not timed),
/// replayed `R` times so the workers' start-up can be taken out:
///   cargo test --release --test exec_stage -- --ignored --nocapture exec_throughput
#[test]
#[ignore]
fn exec_throughput() {
    const R: u64 = 6;
    let Some(data) = real_subset(100) else { return };
    let dir = data.path();
    for (label, size) in [("150x150", Some(150)), ("full size", None)] {
        let resize =
            size.map(|s| format!("  - {{id: r, kind: resize, input: decode, size: [{s}, {s}]}}")).unwrap_or_default();
        run(&chain(dir, &resize, if size.is_some() { "r" } else { "decode" }, "bench_load")).unwrap();
        let items: Vec<Item> = take("bench_load")
            .into_iter()
            .map(|(path, seq, img)| Item {
                meta: Meta {
                    path: Arc::from(path.as_path()),
                    content_hash: [7; 32],
                    label: None,
                    split: None,
                    epoch: 0,
                    variant: 0,
                    view: 0,
                    seq,
                },
                payload: Payload::Image(img),
            })
            .collect();
        let n = items.len();
        let mb: f64 = items
            .iter()
            .map(|i| if let Payload::Image(img) = &i.payload { img.len() as f64 } else { 0.0 })
            .sum::<f64>()
            / 1e6;
        image_store().lock().unwrap().insert("bench".into(), Arc::new(items));
        println!(
            "\n{n} images, {label} ({mb:.1} MB of pixels); steady state = (time for {R} rounds - time for 1 round) / ({R} - 1) rounds:"
        );
        let mut rust_ms = 0.0;
        for (name, stage_yaml) in [
            ("rust invert_rust", "{id: px, kind: invert_rust, input: src}".to_string()),
            (
                "exec workers: 1",
                format!("{{id: px, kind: exec, input: src, command: [{}, {}]}}", python(), fixture("invert.py")),
            ),
            (
                "exec workers: 2",
                format!(
                    "{{id: px, kind: exec, input: src, workers: 2, command: [{}, {}]}}",
                    python(),
                    fixture("invert.py")
                ),
            ),
        ] {
            let time = |repeat: u64| {
                let yaml = format!(
                    "name: bench\nstages:\n  - {{id: src, kind: memory_images, tag: bench, repeat: {repeat}}}\n  - {stage_yaml}\n  - {{id: sink, kind: record, input: px, tag: bench_out}}\n"
                );
                let t = Instant::now();
                let report = run(&yaml).unwrap();
                let wall = t.elapsed().as_secs_f64();
                assert_eq!(take("bench_out").len(), n * repeat as usize);
                assert_eq!(stage(&report, "px").items_out, (n * repeat as usize) as u64);
                wall
            };
            let one = time(1);
            let many = time(R);
            let ms = 1e3 * (many - one) / ((R - 1) as f64 * n as f64);
            if name.starts_with("rust") {
                rust_ms = ms;
            }
            println!(
                "  {name:<18} first round {:>6.0} images/s ({one:.3} s, worker start included); steady {:>6.0} images/s = {ms:.3} ms/image; overhead vs rust {:+.3} ms/image",
                n as f64 / one,
                1e3 / ms,
                ms - rust_ms
            );
        }
    }
}

#[test]
fn the_cache_key_follows_the_worker_script_not_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("w.py");
    let registry = registry();
    let info = registry.get("exec").unwrap();
    let key = |timeout: u64| {
        info.parse(serde_json::json!({"command": [python(), script.display().to_string()], "timeout_ms": timeout}))
            .ok()
            .unwrap()
            .canonical_json()
    };
    std::fs::write(&script, "print(1)\n").unwrap();
    let (a, a_slow) = (key(1000), key(99_000));
    std::fs::write(&script, "print(2)\n").unwrap();
    let b = key(1000);
    assert_eq!(a, a_slow, "timeout_ms does not change pixels");
    assert_ne!(a, b, "editing the script changes the key");
    assert!(a.contains(&blake3::hash(b"print(1)\n").to_hex().to_string()), "{a}");
}
