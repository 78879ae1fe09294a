//! Reliability of the real binary when the world misbehaves: SIGTERM, a full
//! disk, a cache folder that cannot be written, a metrics address already
//! taken, models that do not fit, bad images. Each stops with a message
//! naming what to fix (file, stage, field), loses nothing that was
//! committed, and leaves a cache that verifies.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use convflow::cache::FeatureCache;

// ---------------------------------------------------------------- helpers

/// The demo data set (80 / 40 / 40 images in train / validation / test).
fn demo(dir: &Path, seed: u64) -> PathBuf {
    let data = dir.join("data");
    assert_eq!(convflow::demo::generate(&data, seed).unwrap(), 160);
    data
}

/// What a pipeline looks like. `stall: Some(mark)` puts an exec stage after
/// resize that creates `mark` and then sleeps 5 s on the item with seq 50:
/// a signal sent once `mark` exists lands mid-run, after items 0..49.
struct Pipe<'a> {
    data: &'a Path,
    out: &'a Path,
    cache: Option<&'a Path>,
    size: u32,
    stall: Option<&'a Path>,
}

impl Pipe<'_> {
    fn yaml(&self) -> String {
        let stall = match self.stall {
            Some(mark) => format!(
                "  - id: stall
    kind: exec
    input: resize
    command: [{python}, {script}]
    env: {{AT: '50', MARK: {mark}}}
    timeout_ms: 30000
",
                python = common::python().display(),
                script = common::root().join("tests/fixtures/exec/stall.py").display(),
                mark = mark.display(),
            ),
            None => String::new(),
        };
        format!(
            "name: reliability
report: {out}/report.json
stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train, validation, test]}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [{size}, {size}]}}
{stall}  - {{id: batch, kind: batch, input: {batch_input}, size: 10}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, device: cpu, cache: '{cache}'}}
  - {{id: write, kind: feature_writer, input: features, dir: {out}}}
",
            out = self.out.display(),
            data = self.data.display(),
            size = self.size,
            batch_input = if self.stall.is_some() { "stall" } else { "resize" },
            model = common::tiny_model().display(),
            cache = self.cache.map(|c| c.display().to_string()).unwrap_or_default(),
        )
    }

    /// `convflow --quiet run` on this pipeline (written beside the outputs).
    fn command(&self, name: &str) -> Command {
        let dir = self.out.parent().unwrap();
        let file = common::write_pipeline(dir, name, &self.yaml());
        let mut c = common::bin();
        c.args(["--quiet", "run"]).arg(file).stdout(Stdio::null()).stderr(Stdio::piped());
        c
    }
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill(child: &Child, signal: &str) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap().success());
}

/// Rows of each split's published outputs.
fn rows(out: &Path) -> Vec<usize> {
    ["train", "validation", "test"]
        .iter()
        .map(|s| std::fs::read_to_string(out.join(s).join("paths.txt")).unwrap().lines().count())
        .collect()
}

/// Nothing half-written is left: no published split, no staging folder.
fn assert_nothing_published(out: &Path) {
    for e in std::fs::read_dir(out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            ["report.json", "metrics.prom", "skipped.csv", "p.yaml", "p2.yaml"].contains(&name.as_str()),
            "{name} left in {}",
            out.display()
        );
    }
}

// ---------------------------------------------------------------- SIGTERM

#[test]
fn sigterm_drains_flushes_the_cache_writes_the_report_and_exits_143() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo(tmp.path(), 11);
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    std::fs::create_dir_all(&out).unwrap();
    let mark = tmp.path().join("stalled");
    let pipe = Pipe { data: &data, out: &out, cache: Some(&cache), size: 64, stall: Some(&mark) };
    let mut child = pipe.command("p.yaml").spawn().unwrap();
    wait_for("the stall", Duration::from_secs(60), || mark.exists());
    let signalled = Instant::now();
    kill(&child, "TERM");
    let status = child.wait().unwrap();
    let drained_in = signalled.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(143), "SIGTERM has its own exit code:\n{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    assert!(drained_in < Duration::from_secs(25), "drained within the deadline ({drained_in:?})");

    let r = report(&out);
    assert_eq!(r["interrupted"], true);
    assert_nothing_published(&out);
    let written = r["cache"]["writes"].as_u64().unwrap();
    assert!((51..160).contains(&written), "every item up to the stalled one is computed, not all ({written})");
    let verify = FeatureCache::verify(&cache).unwrap();
    assert!(verify.is_clean(), "{verify:?}");
    assert_eq!(verify.entries, written, "every feature computed before the signal was flushed");

    // A normal run afterwards reuses all of it (the stalled item is a hit
    // now, so it flows past the exec stage without a stall).
    let again = pipe.command("p.yaml").output().unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    let r = report(&out);
    assert_eq!(r["interrupted"], false);
    assert_eq!(r["cache"]["hits"], written);
    assert_eq!(rows(&out), [80, 40, 40]);
}

#[test]
fn sigterm_past_the_drain_deadline_names_the_busy_stages_and_a_second_signal_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo(tmp.path(), 12);
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    std::fs::create_dir_all(&out).unwrap();
    let mark = tmp.path().join("stalled");
    let pipe = Pipe { data: &data, out: &out, cache: Some(&cache), size: 64, stall: Some(&mark) };

    // The stalled exec worker needs 5 s; the deadline is 0.5 s.
    let mut cmd = pipe.command("p.yaml");
    cmd.args(["--drain-deadline", "0.5"]);
    let child = cmd.spawn().unwrap();
    wait_for("the stall", Duration::from_secs(60), || mark.exists());
    let signalled = Instant::now();
    kill(&child, "TERM");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    assert!(signalled.elapsed() < Duration::from_secs(4), "did not wait for the stalled stage");
    let err = stderr(&o);
    // Everything upstream of the stall is held back by it, so all are named.
    assert!(err.contains("stages still running after the 500ms drain deadline: files, decode, resize, stall"), "{err}");
    assert!(FeatureCache::verify(&cache).unwrap().is_clean());
    assert!(!out.join("train").exists());

    // A second signal does not wait for the drain at all.
    std::fs::remove_file(&mark).unwrap();
    let child = pipe.command("p.yaml").spawn().unwrap();
    wait_for("the stall", Duration::from_secs(60), || mark.exists());
    let signalled = Instant::now();
    kill(&child, "INT");
    std::thread::sleep(Duration::from_millis(200));
    kill(&child, "TERM");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143), "the second signal's own code: {}", stderr(&o));
    assert!(stderr(&o).contains("second signal (SIGTERM): exiting now"), "{}", stderr(&o));
    assert!(signalled.elapsed() < Duration::from_secs(4));
    assert!(FeatureCache::verify(&cache).unwrap().is_clean());
}
