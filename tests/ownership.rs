//! convflow writes only what it owns: an output folder that holds a user's
//! files, or the photos themselves, is refused before any work and left as
//! it was; one run writes an output folder at a time; every split of a run
//! is published together.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The demo data set (80 / 40 / 40 images in train / validation / test).
fn demo(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    assert_eq!(convflow::demo::generate(&data, 3).unwrap(), 160);
    data
}

/// A pipeline writing the demo's features into `out`; `stall`: an exec
/// stage creates that file at item 50 and then sleeps 5 s.
fn pipeline(dir: &Path, name: &str, data: &Path, out: &Path, stall: Option<&Path>) -> PathBuf {
    let (stall, batch_input) = match stall {
        Some(mark) => (
            format!(
                "  - {{id: stall, kind: exec, input: resize, command: [{}, {}], env: {{AT: '50', MARK: {}}}}}\n",
                common::python().display(),
                common::root().join("tests/fixtures/exec/stall.py").display(),
                mark.display()
            ),
            "stall",
        ),
        None => (String::new(), "resize"),
    };
    let yaml = format!(
        "name: ownership
stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train, validation, test]}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [32, 32]}}
{stall}  - {{id: batch, kind: batch, input: {batch_input}, size: 10}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, device: cpu, intra_threads: 1}}
  - id: write
    kind: feature_writer
    input: features
    dir: {out}
",
        data = data.display(),
        out = out.display(),
        model = common::tiny_model().display(),
    );
    common::write_pipeline(dir, name, &yaml)
}

fn convflow(args: &[&str], file: &Path) -> Command {
    let mut c = common::bin();
    c.arg("--quiet").args(args).arg(file).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file below `dir` with its bytes, sorted (links followed, as a reader does).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() { stack.push(p) } else { all.push((p.clone(), std::fs::read(&p).unwrap())) }
        }
    }
    all.sort();
    all
}

/// Rows of a published split, counted in each of its files: they must agree.
fn split_rows(out: &Path, split: &str) -> usize {
    let dir = out.join(split);
    let paths = std::fs::read_to_string(dir.join("paths.txt")).unwrap().lines().count();
    let features = convflow::npy::read_f32(&dir.join("features.npy")).unwrap().0[0];
    let labels = convflow::npy::read_f32(&dir.join("labels.npy")).unwrap().0[0];
    assert_eq!((features, labels), (paths, paths), "{split}: features, labels and paths.txt disagree");
    paths
}

#[test]
fn an_output_folder_that_is_or_is_inside_the_data_is_refused_at_validate_and_the_photos_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo(tmp.path());
    let before = snapshot(&data);
    for out in [data.clone(), data.join("train"), data.join("features")] {
        let file = pipeline(tmp.path(), "p.yaml", &data, &out, None);
        for command in ["validate", "run"] {
            let o = convflow(&[command], &file).output().unwrap();
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{command} with dir {}:\n{err}", out.display());
            let want = format!(
                "{}:11:5: stage `write`: field `dir`: `{}` is inside `{}`, the folder stage `files` reads",
                file.display(),
                out.display(),
                data.display()
            );
            assert!(err.contains(&want), "names file:line:col, stage and field:\n{err}\nwant: {want}");
        }
    }
    assert!(snapshot(&data) == before, "every photo is still there, unchanged");
}

#[test]
fn an_output_split_folder_holding_the_users_files_is_refused_before_any_work_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("validation")).unwrap();
    std::fs::write(out.join("validation/train.py"), "# the user's own script\n").unwrap();
    let file = pipeline(tmp.path(), "p.yaml", &data, &out, None);
    let started = Instant::now();
    let o = convflow(&["run"], &file).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let want = format!("{} exists and is not convflow's output", out.join("validation").display());
    assert!(err.contains("stage `write`") && err.contains(&want), "names the stage and the folder:\n{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "refused before any work");
    assert_eq!(std::fs::read_to_string(out.join("validation/train.py")).unwrap(), "# the user's own script\n");
    assert!(!out.join("train").exists(), "no split published beside it");

    // Moved away, the same run publishes; a rerun replaces its own output.
    std::fs::remove_dir_all(out.join("validation")).unwrap();
    for _ in 0..2 {
        let o = convflow(&["run"], &file).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let rows: Vec<usize> = ["train", "validation", "test"].iter().map(|s| split_rows(&out, s)).collect();
        assert_eq!(rows, [80, 40, 40]);
    }
}

#[test]
fn a_second_run_on_the_same_output_folder_fails_fast_naming_the_first_which_publishes_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo(tmp.path());
    let out = tmp.path().join("out");
    let mark = tmp.path().join("stalled");
    let first = convflow(&["run"], &pipeline(tmp.path(), "p.yaml", &data, &out, Some(&mark))).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mark.exists() {
        assert!(Instant::now() < deadline, "the first run never reached its stall");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The first run is mid-way (stalled at item 50 for 5 s).
    let second_file = pipeline(tmp.path(), "p2.yaml", &data, &out, None);
    let started = Instant::now();
    let o = convflow(&["run"], &second_file).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let want = format!("{} is being written by another convflow run (pid {} on ", out.display(), first.id());
    assert!(err.contains(&want), "names the folder and the other run:\n{err}");
    assert!(started.elapsed() < Duration::from_secs(4), "fails fast ({:?})", started.elapsed());

    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<usize> = ["train", "validation", "test"].iter().map(|s| split_rows(&out, s)).collect();
    assert_eq!(rows, [80, 40, 40], "one run's complete output");
}
