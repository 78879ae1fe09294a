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

/// Nothing half-written is left: no published split, no staging folder
/// (convflow's `.convflow-output` folder keeps only its marker and lock).
fn assert_nothing_published(out: &Path) {
    for e in std::fs::read_dir(out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            ["report.json", "metrics.prom", "skipped.csv", "p.yaml", "p2.yaml", ".convflow-output"]
                .contains(&name.as_str()),
            "{name} left in {}",
            out.display()
        );
    }
    if let Ok(entries) = std::fs::read_dir(out.join(".convflow-output")) {
        let mut names: Vec<String> = entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["OWNER", "lock"], "no version staged or published in {}", out.display());
    }
}

// ---------------------------------------------------------------- SIGTERM

/// No process is left whose environment names `mark` (the stalled exec
/// worker of a run that has exited), once the kernel has had a moment.
fn assert_no_worker_left(mark: &Path) {
    let needle = format!("MARK={}", mark.display());
    let alive = || -> Vec<String> {
        let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
        procs
            .flatten()
            .filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
            .filter(|p| {
                let env = std::fs::read(p.path().join("environ")).unwrap_or_default();
                env.split(|&b| b == 0).any(|v| v == needle.as_bytes())
            })
            .map(|p| p.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    while !alive().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(alive().is_empty(), "exec workers outlived convflow: pids {:?}", alive());
}

/// A temporary folder with the demo data and the places a run uses (`mark`:
/// the file a stalled run creates).
struct Scratch {
    tmp: tempfile::TempDir,
    data: PathBuf,
    out: PathBuf,
    cache: PathBuf,
    mark: PathBuf,
}

impl Scratch {
    fn new(seed: u64) -> Scratch {
        let tmp = tempfile::tempdir().unwrap();
        let data = demo(tmp.path(), seed);
        let (out, cache, mark) = (tmp.path().join("out"), tmp.path().join("cache"), tmp.path().join("stalled"));
        std::fs::create_dir_all(&out).unwrap();
        Scratch { tmp, data, out, cache, mark }
    }

    fn pipe(&self) -> Pipe<'_> {
        Pipe { data: &self.data, out: &self.out, cache: Some(&self.cache), size: 64, stall: Some(&self.mark) }
    }

    /// Starts `cmd`, waits until the stall holds it, sends `signals` 200 ms
    /// apart; returns its output and how long it took to exit after the first.
    fn signal(&self, mut cmd: Command, signals: &[&str]) -> (Output, Duration) {
        let _ = std::fs::remove_file(&self.mark);
        let child = cmd.spawn().unwrap();
        wait_for("the stall", Duration::from_secs(60), || self.mark.exists());
        let signalled = Instant::now();
        for (k, signal) in signals.iter().enumerate() {
            if k > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            kill(&child, signal);
        }
        let o = child.wait_with_output().unwrap();
        (o, signalled.elapsed())
    }
}

#[test]
fn sigterm_drains_flushes_the_cache_writes_the_report_and_exits_143() {
    let s = Scratch::new(11);
    let (o, drained_in) = s.signal(s.pipe().command("p.yaml"), &["TERM"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(143), "SIGTERM has its own exit code:\n{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    assert!(drained_in < Duration::from_secs(30), "drained within the deadline ({drained_in:?})");

    let r = report(&s.out);
    assert_eq!(r["interrupted"], true);
    assert_nothing_published(&s.out);
    let written = r["cache"]["writes"].as_u64().unwrap();
    assert!((51..160).contains(&written), "every item up to the stalled one is computed, not all ({written})");
    let verify = FeatureCache::verify(&s.cache).unwrap();
    assert!(verify.is_clean(), "{verify:?}");
    assert_eq!(verify.entries, written, "every feature computed before the signal was flushed");

    // A normal run afterwards reuses all of it (the stalled item is a hit
    // now, so it flows past the exec stage without a stall).
    let again = s.pipe().command("p.yaml").output().unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    let r = report(&s.out);
    assert_eq!(r["interrupted"], false);
    assert_eq!(r["cache"]["hits"], written);
    assert_eq!(rows(&s.out), [80, 40, 40]);
}

#[test]
fn sighup_from_a_dropped_session_drains_writes_the_report_and_exits_129() {
    let s = Scratch::new(17);
    let (o, _) = s.signal(s.pipe().command("p.yaml"), &["HUP"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(129), "SIGHUP drains like SIGTERM, with its own code:\n{err}");
    assert!(err.contains("stopped by SIGHUP"), "{err}");
    let r = report(&s.out);
    assert_eq!(r["interrupted"], true);
    assert_nothing_published(&s.out);
    let verify = FeatureCache::verify(&s.cache).unwrap();
    assert!(verify.is_clean() && verify.entries == r["cache"]["writes"].as_u64().unwrap(), "{verify:?}");
}

#[test]
fn sigterm_past_the_drain_deadline_names_the_busy_stages_and_a_second_signal_exits_at_once() {
    let s = Scratch::new(12);
    // The stalled exec worker needs 5 s; the deadline is 0.5 s.
    let mut cmd = s.pipe().command("p.yaml");
    cmd.args(["--drain-deadline", "0.5"]);
    let (o, took) = s.signal(cmd, &["TERM"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(took < Duration::from_secs(4), "did not wait for the stalled stage ({took:?})");
    // The stalled stage and everything after it cannot finish, so they are
    // named, in graph order. Stages before it are named only while they are
    // held back by it: a source that had already sent all its items is done.
    let running = err.split("stages still running after the 500ms drain deadline: ").nth(1).unwrap_or_default();
    let running: Vec<&str> = running.split(';').next().unwrap_or_default().split(", ").collect();
    assert!(running.ends_with(&["stall", "batch", "features", "write"]), "{err}");
    let order = ["files", "decode", "resize", "stall", "batch", "features", "write"];
    assert!(running.is_sorted_by_key(|s| order.iter().position(|o| o == s)), "{err}");
    assert!(running.iter().all(|s| order.contains(s)), "{err}");
    assert!(FeatureCache::verify(&s.cache).unwrap().is_clean());
    assert!(!s.out.join("train").exists());
    assert_no_worker_left(&s.mark);

    // A second signal does not wait for the drain at all.
    let (o, took) = s.signal(s.pipe().command("p.yaml"), &["INT", "TERM"]);
    assert_eq!(o.status.code(), Some(143), "the second signal's own code: {}", stderr(&o));
    assert!(stderr(&o).contains("second signal (SIGTERM): exiting now"), "{}", stderr(&o));
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(FeatureCache::verify(&s.cache).unwrap().is_clean());
    assert_no_worker_left(&s.mark);
    drop(s.tmp);
}

// ---------------------------------------------------------------- a full disk

/// A tmpfs of `kib` KiB mounted on `dir` (made here) for as long as the
/// guard lives, where this process may mount (root with CAP_SYS_ADMIN);
/// `None` elsewhere, and the caller says what it skipped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("cannot mount a tmpfs here (not privileged): that part is skipped");
        }
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn remount(&self, options: &str) {
        let remount = format!("remount,{options}");
        assert!(Command::new("mount").args(["-o", &remount]).arg(&self.0).status().unwrap().success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `cmd` run with RLIMIT_FSIZE at `kib` KiB and SIGXFSZ ignored: a write
/// past the limit fails with EFBIG, as a full disk fails with ENOSPC. Works
/// unprivileged, so CI checks this path everywhere.
fn with_file_size_limit(cmd: &Command, kib: u64) -> Command {
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$@\""))
        .arg("bash")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .current_dir(common::root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// The run whose cache filled up: exit 1, a message naming the store and
/// the reason, nothing published, a clean cache holding part of the data.
/// Returns how many entries it holds.
fn check_cache_filled_up(o: &Output, cache: &Path, out: &Path, reason: &str) -> u64 {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let store = cache.join(convflow::cache::FILE_NAME);
    let want = format!("error: stage `features` failed: feature cache {}: cannot commit: ", store.display());
    assert!(err.contains(&want) && err.contains(reason), "names the cache and the reason:\n{err}");
    assert!(err.contains("the entries committed before are intact"), "{err}");
    assert_nothing_published(out);
    let verify = FeatureCache::verify(cache).unwrap();
    assert!(verify.is_clean(), "{verify:?}");
    assert!(verify.entries < 160, "the disk filled up mid-run ({} entries)", verify.entries);
    verify.entries
}

/// With room again, a normal run completes and reuses every committed entry.
fn check_reuse(run: &mut Command, cache: &Path, out: &Path, committed: u64) {
    let o = run.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(report(out)["cache"]["hits"], committed, "everything committed before is reused");
    assert_eq!(rows(out), [80, 40, 40]);
    assert!(FeatureCache::verify(cache).unwrap().is_clean());
}

#[test]
fn a_full_disk_under_the_cache_stops_the_run_naming_it_and_loses_nothing_committed() {
    let s = Scratch::new(13);
    let (tmp, out, cache) = (s.tmp.path(), &s.out, &s.cache);

    // Every file limited to 768 KiB; 256x256 inputs make 8x8x16 features
    // (4 KiB an entry), so the store reaches the limit first.
    let pipe = Pipe { size: 256, stall: None, ..s.pipe() };
    let mut run = pipe.command("p.yaml");
    let o = with_file_size_limit(&run, 768).output().unwrap();
    let committed = check_cache_filled_up(&o, cache, out, "File too large (os error 27)");
    check_reuse(&mut run, cache, out, committed);

    // A real full device (ENOSPC), where a tmpfs can be mounted; then the
    // device grows and the same pipeline completes.
    let small = tmp.join("small");
    if let Some(fs) = Tmpfs::mount(&small, "size=1m") {
        let cache = small.join("cache");
        let pipe = Pipe { cache: Some(&cache), ..pipe };
        let mut run = pipe.command("p2.yaml");
        std::fs::remove_dir_all(out).unwrap();
        std::fs::create_dir_all(out).unwrap();
        let o = run.output().unwrap();
        let committed = check_cache_filled_up(&o, &cache, out, "No space left on device (os error 28)");
        fs.remount("size=16m");
        check_reuse(&mut run, &cache, out, committed);
    }
}

#[test]
fn a_full_disk_under_the_outputs_stops_the_run_naming_the_folder_and_leaves_no_partial_files() {
    let s = Scratch::new(14);
    let (tmp, out) = (s.tmp.path(), &s.out);
    // No cache: the train split's features.npy (80 x 4 KiB) is the first file past 200 KiB.
    let pipe = Pipe { cache: None, size: 256, stall: None, ..s.pipe() };
    let run = pipe.command("p.yaml");
    let o = with_file_size_limit(&run, 200).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let want = format!("error: stage `write` failed: writing {}/v-", out.join(".convflow-output").display());
    assert!(
        err.contains(&want) && err.contains("/train: File too large"),
        "names the output folder and the reason:\n{err}"
    );
    assert_nothing_published(out);
    assert_eq!(report(out)["interrupted"], false, "the report of the failed run is written");

    let small = tmp.join("small");
    if let Some(_fs) = Tmpfs::mount(&small, "size=400k") {
        let out = small.join("out");
        let pipe = Pipe { out: &out, ..pipe };
        std::fs::create_dir_all(&out).unwrap();
        let o = pipe.command("p.yaml").output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("error: stage `write` failed: writing ") && err.contains("No space left on device"),
            "{err}"
        );
        // The staged files are gone, so the report fits in the space they held.
        assert_nothing_published(&out);
        assert!(report(&out)["stages"].is_array());
    }
}

// ---------------------------------------------------------------- a damaged cache file

#[test]
fn a_damaged_cache_file_is_set_aside_and_rebuilt_never_a_panic() {
    let s = Scratch::new(16);
    let pipe = Pipe { stall: None, ..s.pipe() };
    let store = s.cache.join("features.redb");
    // Every page past the header flipped (redb panicked reading it), then a
    // file whose header is not redb's at all.
    let damages: [fn(&mut [u8]); 2] = [|b| b[4096..].iter_mut().for_each(|x| *x ^= 0x5a), |b| b[..16].fill(0)];
    for damage in damages {
        let o = pipe.command("p.yaml").output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let mut bytes = std::fs::read(&store).unwrap();
        damage(&mut bytes);
        std::fs::write(&store, &bytes).unwrap();

        // `cache verify` names the damage and the command that recovers.
        let v = common::bin().args(["cache", "verify", "--dir"]).arg(&s.cache).output().unwrap();
        let err = stderr(&v);
        assert_eq!(v.status.code(), Some(1), "{err}");
        let mv = format!("mv {} {}.damaged", store.display(), store.display());
        assert!(err.contains("the store is damaged") && err.contains(&mv), "{err}");

        // A run sets it aside, kept for inspection and named, and rebuilds.
        let o = pipe.command("p.yaml").output().unwrap();
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        let aside: Vec<PathBuf> = std::fs::read_dir(&s.cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("features.redb.damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(std::fs::read(&aside[0]).unwrap() == bytes, "the damaged store is kept as it was");
        assert!(err.contains(&format!("set aside as {}", aside[0].display())), "named in the log:\n{err}");
        assert_eq!(report(&s.out)["cache"]["misses"], 160, "everything computed again");
        assert_eq!(rows(&s.out), [80, 40, 40]);
        assert!(FeatureCache::verify(&s.cache).unwrap().is_clean());
        std::fs::remove_file(&aside[0]).unwrap();
    }
}

// ---------------------------------------------------------------- a cache folder that cannot be written

/// `convflow validate` and `run` both refuse, before any work, naming the
/// stage and its `cache` field, with exit 2.
fn check_cache_refused(tmp: &Path, data: &Path, cache: &Path, why: &str) {
    let out = tmp.join("out");
    let pipe = Pipe { data, out: &out, cache: Some(cache), size: 64, stall: None };
    let file = common::write_pipeline(tmp, "p.yaml", &pipe.yaml());
    for action in ["validate", "run"] {
        let o = common::bin().arg(action).arg(&file).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{action}: {err}");
        // Line 8 holds the `features` stage (a flow mapping).
        let line = err.lines().find(|l| l.starts_with(&format!("{}:8:", file.display()))).unwrap_or_default();
        let want = format!("stage `features`: field `cache`: cannot keep a feature cache in {}: ", cache.display());
        assert!(line.contains(&want) && line.contains(why), "{action}:\n{err}");
        assert!(!out.exists(), "{action}: no work was done");
    }
}

#[test]
fn a_cache_folder_that_cannot_be_written_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo(tmp.path(), 15);
    // Root ignores permissions, so: a cache folder below a regular file...
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "a file, not a folder").unwrap();
    check_cache_refused(tmp.path(), &data, &file.join("cache"), &format!("{} is a file, not a folder", file.display()));
    // ...a store that is a folder...
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(odd.join(convflow::cache::FILE_NAME)).unwrap();
    check_cache_refused(tmp.path(), &data, &odd, "features.redb is not a file");

    // ...and, where mounting works, a read-only device, empty or holding a cache.
    let ro = tmp.path().join("ro");
    if let Some(fs) = Tmpfs::mount(&ro, "size=4m") {
        let cache = ro.join("cache");
        let pipe = Pipe { data: &data, out: &tmp.path().join("filled"), cache: Some(&cache), size: 64, stall: None };
        assert!(pipe.command("filled.yaml").status().unwrap().success());
        fs.remount("ro");
        check_cache_refused(tmp.path(), &data, &cache, "features.redb is not writable: Read-only file system");
        check_cache_refused(tmp.path(), &data, &ro.join("new"), "is not writable: Read-only file system");
    }
}

// ---------------------------------------------------------------- metrics address taken

#[test]
fn a_metrics_address_already_in_use_stops_the_run_before_any_work_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo(tmp.path(), 16);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    let pipe = Pipe { data: &data, out: &out, cache: Some(&cache), size: 64, stall: None };

    // From the command line, and from the pipeline file's `metrics: {listen: ...}`.
    let mut flag = pipe.command("p.yaml");
    flag.args(["--metrics-listen", &addr]);
    let in_file =
        common::write_pipeline(tmp.path(), "m.yaml", &format!("metrics: {{listen: '{addr}'}}\n{}", pipe.yaml()));
    let mut file = common::bin();
    file.args(["--quiet", "run"]).arg(&in_file);
    for mut cmd in [flag, file] {
        let o = cmd.output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("cannot serve metrics on {addr}: ")), "{err}");
        assert!(err.contains("Address already in use"), "{err}");
        assert!(
            err.contains("--metrics-listen") && err.contains("metrics: {listen: ...}"),
            "says where to change it: {err}"
        );
        assert!(!out.exists() && !cache.exists(), "no work was done");
    }
}

// ---------------------------------------------------------------- models that do not fit

/// Runs the pipeline with `model` at `size`; returns (exit code, stderr).
fn run_model(tmp: &Path, data: &Path, model: &str, size: u32) -> (Option<i32>, String) {
    let out = tmp.join(format!("out-{model}-{size}"));
    let yaml = Pipe { data, out: &out, cache: None, size, stall: None }
        .yaml()
        .replace(&common::tiny_model().display().to_string(), &fixture_model(model).display().to_string());
    let file = common::write_pipeline(tmp, "m.yaml", &yaml);
    let o = common::bin().args(["--quiet", "run"]).arg(file).output().unwrap();
    if !o.status.success() {
        assert!(!out.exists(), "{model} at {size}: stopped before any work");
    }
    (o.status.code(), stderr(&o))
}

fn fixture_model(name: &str) -> PathBuf {
    common::root().join("tests/fixtures/models").join(format!("{name}.onnx"))
}

#[test]
fn models_that_do_not_fit_the_images_are_refused_before_any_work_saying_what_to_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo(tmp.path(), 17);
    let cases: &[(&str, u32, &str)] = &[
        (
            "fixed64",
            96,
            "the model takes 64x64 (HxW) images but the pipeline makes 96x96; set the resize stage's `size` to [64, 64]",
        ),
        ("rgba", 64, "expected an image input, [N,H,W,3] (NHWC) or [N,3,H,W] (NCHW), found [-1, -1, -1, 4]"),
        ("uint8_input", 64, "input `input` is"),
        ("int64_output", 64, "output `features` is"),
        ("reshape48", 64, "cannot take the pipeline's 64x64 images: inference failed:"),
        (
            "crop32",
            32,
            "cannot take the pipeline's 32x32 images: one 32x32 image gives an output of shape [1, 0, 32, 3]",
        ),
    ];
    for &(model, size, message) in cases {
        let (code, err) = run_model(tmp.path(), &data, model, size);
        // Refused by validation (exit 2; issue 33: the edge's facts probe the model at the
        // pipeline's size), where it used to be when the stage was built (exit 1).
        assert_eq!(code, Some(2), "{model}: {err}");
        assert!(err.contains("stage `features`: field `model`: ") && err.contains(message), "{model}:\n{err}");
        if model.ends_with("put") {
            assert!(err.contains("convflow needs a float32 tensor"), "{err}");
        }
    }
    // The same models where they fit.
    for (model, size) in [("fixed64", 64), ("reshape48", 32), ("crop32", 40), ("nchw", 64)] {
        let (code, err) = run_model(tmp.path(), &data, model, size);
        assert_eq!(code, Some(0), "{model} at {size}: {err}");
    }
    // A missing model file is a pipeline error, with validate and run alike.
    let (code, err) = run_model(tmp.path(), &data, "no_such_model", 64);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("stage `features`: field `model`: ") && err.contains("no_such_model.onnx not found"), "{err}");
}

// ---------------------------------------------------------------- image formats and bad images

#[test]
fn gif_bmp_webp_and_tiff_decode_to_plain_rgb() {
    let dir = common::root().join("tests/fixtures/formats");
    let near = |rel: &str, want: [u8; 3], tol: i32| {
        let img = convflow::imaging::decode::decode_image(&std::fs::read(dir.join(rel)).unwrap(), u64::MAX)
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(img.dimensions(), (40, 30), "{rel}");
        let got = img.get_pixel(20, 15).0;
        assert!(got.iter().zip(want).all(|(&g, w)| (g as i32 - w as i32).abs() <= tol), "{rel}: {got:?} vs {want:?}");
    };
    let (red, blue) = ([200, 30, 40], [30, 60, 210]);
    near("cats/palette.gif", red, 0);
    near("cats/anim.gif", red, 0); // the first frame
    near("cats/plain.bmp", red, 0);
    near("cats/lzw.tif", red, 0);
    near("dogs/plain.tif", blue, 0);
    near("dogs/lossy.webp", blue, 6);
    near("dogs/lossless.webp", blue, 0); // alpha dropped
    near("dogs/misnamed.png", blue, 4); // a JPEG: the bytes decide, not the name
}

/// The rows of a CSV file after its header (RFC 4180: quoted fields may
/// hold commas, quotes and line breaks).
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut field, mut quoted) = (Vec::new(), Vec::new(), String::new(), false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => row.push(std::mem::take(&mut field)),
            ('\n', false) => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (c, _) => field.push(c),
        }
    }
    rows.split_off(1)
}

#[test]
fn every_bad_image_is_skipped_and_listed_in_the_report_and_skipped_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut good = 0;
    for set in ["bad", "formats", "images"] {
        for class in ["cats", "dogs"] {
            std::fs::create_dir_all(data.join(class)).unwrap();
            for e in std::fs::read_dir(common::root().join("tests/fixtures").join(set).join(class)).unwrap() {
                let p = e.unwrap().path();
                let name = format!("{set}_{}", p.file_name().unwrap().to_string_lossy());
                good += usize::from(!name.contains("bad_") && set != "bad" || name.ends_with("ok.jpg"));
                std::fs::copy(&p, data.join(class).join(name)).unwrap();
            }
        }
    }
    let out = tmp.path().join("out");
    let yaml = common::extraction_yaml(&data, &common::tiny_model(), &out, None, "", 64, "rescale").replacen(
        "stages:",
        &format!("report: {}/report.json\nstages:", out.display()),
        1,
    );
    let file = common::write_pipeline(tmp.path(), "p.yaml", &yaml);
    let o = common::bin().args(["--quiet", "run"]).arg(&file).output().unwrap();
    assert!(o.status.success(), "bad images are not fatal: {}", stderr(&o));

    let mut expected = vec![
        "bad_bomb.png",
        "bad_empty.jpg",
        "bad_text.jpg",
        "bad_truncated.jpg",
        "formats_bad_bomb.gif",
        "formats_bad_truncated.bmp",
        "formats_bad_truncated.gif",
        "formats_bad_truncated.tif",
        "formats_bad_truncated.webp",
    ];
    expected.sort();
    let report = report(&out);
    let listed: Vec<Vec<String>> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| ["path", "stage", "reason"].iter().map(|k| s[*k].as_str().unwrap().to_string()).collect())
        .collect();
    let csv = csv_rows(&std::fs::read_to_string(out.join("skipped.csv")).unwrap());
    assert_eq!(csv, listed, "skipped.csv lists exactly the report's skipped items");
    let mut names: Vec<String> =
        csv.iter().map(|r| Path::new(&r[0]).file_name().unwrap().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, expected, "every bad image, and only those");
    for row in &csv {
        assert_eq!(row[1], "decode", "{row:?}");
        assert!(!row[2].is_empty() && row[0].starts_with(&data.display().to_string()), "{row:?}");
        if row[0].contains("truncated") {
            assert!(row[2].starts_with("truncated"), "a file cut short says so: {row:?}");
        }
    }
    let bomb = csv.iter().find(|r| r[0].ends_with("bomb.gif")).unwrap();
    assert!(bomb[2].contains("65535x65535 is over max_pixels"), "refused from its header: {bomb:?}");
    assert_eq!(
        std::fs::read_to_string(out.join("paths.txt")).unwrap().lines().count(),
        good,
        "every good image is kept"
    );
    assert_eq!(report["stages"][1]["item_errors"], expected.len());
}

// ---------------------------------------------------------------- fuzzing finds

/// Inputs the fuzz targets (fuzz/fuzz_targets/) once crashed on, replayed
/// through the same calls: each must give a result (an error is fine), never
/// a panic. Add a new find to tests/fixtures/fuzz/<target>/.
fn fuzz_finds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = common::root().join("tests/fixtures/fuzz").join(target);
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut finds: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    finds.sort();
    finds
}

#[test]
fn config_inputs_the_fuzzer_found_are_errors_with_positions_not_panics() {
    let registry = convflow::stages::builtin_registry();
    for (name, bytes) in fuzz_finds("config") {
        let text = String::from_utf8(bytes).unwrap();
        let result = std::panic::catch_unwind(|| {
            let cfg = convflow::config::parse_str(&text, Path::new("fuzz.yaml"), &[])?;
            convflow::graph::Graph::build(cfg, &registry).map(|g| g.to_dot())
        });
        let errors = match result {
            Ok(Err(errors)) => errors.to_string(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("{name}: panicked on\n{text}"),
        };
        assert!(errors.starts_with("fuzz.yaml:"), "{name}: every error has a position:\n{errors}");
    }
}

#[test]
fn image_bytes_the_fuzzer_found_are_skipped_not_panics() {
    for (name, bytes) in fuzz_finds("decode") {
        let result = std::panic::catch_unwind(|| convflow::imaging::decode::decode_image(&bytes, 1 << 20));
        match result {
            Ok(Ok(img)) => assert!(u64::from(img.width()) * u64::from(img.height()) <= 1 << 20, "{name}"),
            Ok(Err(reason)) => assert!(!reason.is_empty(), "{name}"),
            Err(_) => panic!("{name}: decode_image panicked"),
        }
    }
}

/// `convflow run ... | head`: the reader closes the pipe before the table
/// is printed. The run still exits 0 with its report written (it panicked
/// with exit 101 on EPIPE, after the table and before the report).
#[test]
fn a_reader_that_closes_stdout_costs_neither_the_report_nor_the_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo(tmp.path(), 31);
    let out = tmp.path().join("out");
    let file = common::write_pipeline(
        tmp.path(),
        "p.yaml",
        &Pipe { data: &data, out: &out, cache: None, size: 32, stall: None }.yaml(),
    );
    let report = tmp.path().join("report.json");
    let mut child = common::bin()
        .arg("run")
        .arg(&file)
        .arg("--report")
        .arg(&report)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // `head` has read what it wanted and gone
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["interrupted"], false);
}
