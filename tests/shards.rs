//! Sharded runs without an engine: N shard processes and a merge write,
//! byte for byte, what one process writes; a missing or foreign part is
//! named; a finished shard rerun does nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

/// Two splits of the fixture images (copies under new names in
/// `validation`) and one file that does not decode, so skipped items and
/// several output folders are covered.
fn make_data(root: &Path) -> PathBuf {
    let fixtures = common::root().join("tests/fixtures/images");
    let data = root.join("data");
    for class in ["cats", "dogs"] {
        for (split, prefix) in [("train", ""), ("validation", "v-")] {
            let to = data.join(split).join(class);
            std::fs::create_dir_all(&to).unwrap();
            for e in std::fs::read_dir(fixtures.join(class)).unwrap() {
                let p = e.unwrap().path();
                std::fs::copy(&p, to.join(format!("{prefix}{}", p.file_name().unwrap().to_string_lossy()))).unwrap();
            }
        }
    }
    std::fs::write(data.join("train/cats/broken.jpg"), b"\xff\xd8\xff not a jpeg").unwrap();
    data
}

fn pipeline(root: &Path, data: &Path) -> PathBuf {
    let yaml = format!(
        "name: sharded
params:
  out_dir: out
  cache_dir: cache
  shared_cache: \"\"
  size: 64
report: ${{out_dir}}/report.json
stages:
  - id: files
    kind: file_reader
    dir: {data}
    splits: [train, validation]
  - id: decode
    kind: decode
    input: files
  - id: resize
    kind: resize
    input: decode
    size: [\"${{size}}\", \"${{size}}\"]
  - id: batch
    kind: batch
    input: resize
    size: 4
  - id: features
    kind: onnx_features
    input: batch
    model: {model}
    preprocess: caffe
    device: cpu
    intra_threads: 1
    cache: ${{cache_dir}}
    shared_cache: ${{shared_cache}}
  - id: write
    kind: feature_writer
    input: features
    dir: ${{out_dir}}
",
        data = data.display(),
        model = common::tiny_model().display(),
    );
    common::write_pipeline(root, "sharded.yaml", &yaml)
}

fn convflow(root: &Path, args: &[&str]) -> Output {
    let out = common::bin().current_dir(root).args(args).output().unwrap();
    eprintln!(
        "$ convflow {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = convflow(root, args);
    assert!(out.status.success(), "convflow {} failed", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(root: &Path, args: &[&str]) -> (i32, String) {
    let out = convflow(root, args);
    assert!(!out.status.success(), "convflow {} should fail", args.join(" "));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            // convflow's bookkeeping (versions, lock) is not output; the links to it are.
            if p.ends_with(convflow::publish::META) {
                continue;
            }
            if p.is_dir() { walk(base, &p, out) } else { out.push(p.strip_prefix(base).unwrap().to_path_buf()) }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Runs the 4 shards as 4 processes at once, each with its own local cache.
fn run_shards(root: &Path, file: &str, plan: &str, n: u32, extra: &[&str]) {
    let children: Vec<_> = (0..n)
        .map(|i| {
            let mut args = vec![
                "-q".to_string(),
                "run".into(),
                file.into(),
                "--shard".into(),
                format!("{i}/{n}"),
                "--plan".into(),
            ];
            args.push(plan.into());
            args.extend(["--set".into(), format!("cache_dir=cache-{i}"), "--set".into(), "out_dir=merged".into()]);
            args.extend(extra.iter().map(|s| s.to_string()));
            common::bin().current_dir(root).args(&args).spawn().unwrap()
        })
        .collect();
    for (i, mut c) in children.into_iter().enumerate() {
        assert!(c.wait().unwrap().success(), "shard {i}/{n} failed");
    }
}

#[test]
fn four_shards_and_a_merge_write_what_one_process_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = make_data(root);
    let file = pipeline(root, &data);
    let file = file.to_str().unwrap();

    ok(root, &["-q", "run", file, "--set", "out_dir=one", "--set", "cache_dir=cache-one"]);
    let plan_out = ok(root, &["plan", file, "--shards", "4", "--out", "plan"]);
    assert!(plan_out.contains("19 items for 4 shards"), "{plan_out}");
    let manifest = std::fs::read_to_string(root.join("plan/manifest.tsv")).unwrap();
    assert_eq!(manifest.lines().count(), 19, "9 + 9 images and the broken file, listed once");
    assert!(manifest.lines().next().unwrap().starts_with("0\t0\t"), "split 0 (train), class 0 (cats)");

    run_shards(root, file, "plan", 4, &[]);
    let merged = ok(root, &["merge", file, "--plan", "plan", "--set", "out_dir=merged"]);
    assert!(merged.contains("merged 4 parts"), "{merged}");

    // Byte for byte, every output file; only the reports differ in kind.
    let data_files = |d: &Path| -> Vec<PathBuf> {
        let reports = ["report.json", "skipped.csv", "metrics.prom"];
        files(d).into_iter().filter(|p| !reports.iter().any(|r| p.ends_with(r))).collect()
    };
    let (one, all) = (root.join("one"), root.join("merged"));
    assert_eq!(data_files(&one), data_files(&all));
    assert_eq!(data_files(&one).len(), 8, "features, labels, paths, classes for train and validation");
    for f in data_files(&one) {
        assert!(
            std::fs::read(one.join(&f)).unwrap() == std::fs::read(all.join(&f)).unwrap(),
            "{} differs",
            f.display()
        );
    }
    let (shape, _) = convflow::npy::read_f32(&all.join("train/features.npy")).unwrap();
    assert_eq!(shape, vec![9, 2, 2, 16], "the broken file is skipped, as in one process");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(all.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["merged_from_shards"], 4);
    assert_eq!(report["skipped_count"], 1);
    assert!(report["skipped"][0]["path"].as_str().unwrap().ends_with("train/cats/broken.jpg"), "{report}");
    let files_stage = report["stages"].as_array().unwrap().iter().find(|s| s["id"] == "files").unwrap();
    assert_eq!(files_stage["items_out"], 19, "the shards' counts add up");
    let looked_up = report["cache"]["hits"].as_u64().unwrap() + report["cache"]["misses"].as_u64().unwrap();
    assert_eq!(looked_up, 19, "every item looked up once over all shards");

    // A finished shard rerun does no work at all: not even its cache is opened.
    std::fs::remove_dir_all(root.join("cache-2")).unwrap();
    let part = root.join("plan/parts/part-00002-of-00004");
    let before = std::fs::read(part.join("part.json")).unwrap();
    let again = ok(root, &["run", file, "--shard", "2/4", "--plan", "plan", "--set", "cache_dir=cache-2"]);
    assert!(again.contains("shard 2/4: already published"), "{again}");
    assert!(!root.join("cache-2").exists(), "a finished shard must not run the pipeline again");
    assert_eq!(std::fs::read(part.join("part.json")).unwrap(), before);

    // Wrong shard counts and a changed pipeline stop before any work.
    let (code, err) = fails(root, &["run", file, "--shard", "1/3", "--plan", "plan"]);
    assert!(err.contains("is for 4 shards"), "{err} ({code})");
    let (_, err) = fails(root, &["run", file, "--shard", "1/4", "--plan", "plan", "--set", "size=32"]);
    assert!(err.contains("differs from the pipeline planned in plan"), "{err}");
    let (code, err) = fails(root, &["run", file, "--shard", "4/4", "--plan", "plan"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("I must be below N"), "{err}");

    // A part that is not there is named, and so is a foreign one.
    let foreign_marker = std::fs::read_to_string(part.join("part.json")).unwrap();
    std::fs::rename(root.join("plan/parts/part-00001-of-00004"), root.join("away")).unwrap();
    let (_, err) = fails(root, &["merge", file, "--plan", "plan", "--set", "out_dir=merged"]);
    assert!(err.contains("1 of 4 parts missing") && err.contains("part-00001-of-00004"), "{err}");
    std::fs::rename(root.join("away"), root.join("plan/parts/part-00001-of-00004")).unwrap();
    let fp = serde_json::from_str::<serde_json::Value>(&foreign_marker).unwrap()["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(part.join("part.json"), foreign_marker.replace(&fp, &"0".repeat(64))).unwrap();
    let (_, err) = fails(root, &["merge", file, "--plan", "plan", "--set", "out_dir=merged"]);
    assert!(err.contains("part-00002-of-00004 is a foreign part"), "{err}");
    std::fs::write(part.join("part.json"), &foreign_marker).unwrap();
    std::fs::create_dir(root.join("plan/parts/part-00000-of-00008")).unwrap();
    let (_, err) = fails(root, &["merge", file, "--plan", "plan", "--set", "out_dir=merged"]);
    assert!(err.contains("part-00000-of-00008: foreign part"), "{err}");
    std::fs::remove_dir(root.join("plan/parts/part-00000-of-00008")).unwrap();

    // A doubled row (a part's positions tampered with) is caught, not merged.
    let pos = root.join("plan/parts/part-00000-of-00004/out/train/positions.u64");
    let mut bytes = std::fs::read(&pos).unwrap();
    let first = bytes[..8].to_vec();
    bytes[8..16].copy_from_slice(&first);
    std::fs::write(&pos, &bytes).unwrap();
    let (_, err) = fails(root, &["merge", file, "--plan", "plan", "--set", "out_dir=merged"]);
    assert!(err.contains("part-00000-of-00004/out/train/positions.u64") && err.contains("out of order"), "{err}");
}

#[test]
fn shard_auto_reads_the_engine_index_and_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = make_data(root);
    let file = pipeline(root, &data);
    let file = file.to_str().unwrap();
    ok(root, &["-q", "plan", file, "--shards", "2", "--out", "plan"]);
    let out = common::bin()
        .current_dir(root)
        .args(["run", file, "--shard", "auto", "--plan", "plan"])
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env("JOB_COMPLETION_INDEX", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("JOB_COMPLETION_INDEX is set but") && err.contains("--shard auto/N"), "{err}");
    let out = common::bin()
        .current_dir(root)
        .args(["-q", "run", file, "--shard", "auto", "--plan", "plan"])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(root.join("plan/parts/part-00001-of-00002/part.json").exists());
    assert!(!root.join("plan/parts/part-00000-of-00002").exists(), "only the engine's index ran");
}

fn report_of(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The data, the pipeline and an empty shared tier folder in `root`: the
/// pipeline file and the `shared_cache=...` override that names the tier.
fn with_shared_tier(root: &Path) -> (String, String) {
    let data = make_data(root);
    let file = pipeline(root, &data).to_str().unwrap().to_string();
    std::fs::create_dir(root.join("shared")).unwrap();
    (file, format!("shared_cache={}", root.join("shared").display()))
}

#[test]
fn a_second_sharded_run_is_all_shared_tier_hits() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (file, shared) = with_shared_tier(root);
    let file = file.as_str();

    // A tier that cannot be reached stops the run before any work.
    let (code, err) = fails(root, &["run", file, "--set", "shared_cache=/no/such/tier", "--set", "out_dir=never"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("shared_cache") && err.contains("/no/such/tier"), "{err}");
    assert!(!root.join("never").exists() && !root.join("cache").exists(), "nothing ran");

    for (run, plan) in [("a", "plan-a"), ("b", "plan-b")] {
        ok(root, &["-q", "plan", file, "--shards", "2", "--out", plan]);
        for i in 0..2 {
            let cache = format!("cache_dir=cache-{run}-{i}");
            let out = format!("out_dir=out-{run}");
            ok(
                root,
                &[
                    "-q",
                    "run",
                    file,
                    "--shard",
                    &format!("{i}/2"),
                    "--plan",
                    plan,
                    "--set",
                    &cache,
                    "--set",
                    &shared,
                    "--set",
                    &out,
                ],
            );
        }
        ok(root, &["-q", "merge", file, "--plan", plan, "--set", &format!("out_dir=out-{run}")]);
    }
    let (a, b) = (report_of(&root.join("out-a/report.json")), report_of(&root.join("out-b/report.json")));
    assert!(a["cache"]["shared"]["writes"].as_u64().unwrap() >= 9, "run a published what it computed: {a}");
    // Run b, on fresh local stores: nothing computed, everything from the tier
    // (the one miss is the file that does not decode, never computed at all).
    assert_eq!(b["cache"]["misses"], 1, "{b}");
    assert_eq!(b["cache"]["writes"], 0, "{b}");
    assert!(b["cache"]["shared"]["hits"].as_u64().unwrap() >= 9, "{b}");
    assert_eq!(b["cache"]["shared"]["errors"], 0, "{b}");
    for f in ["train/features.npy", "validation/features.npy", "train/paths.txt"] {
        assert!(
            std::fs::read(root.join("out-a").join(f)).unwrap() == std::fs::read(root.join("out-b").join(f)).unwrap()
        );
    }
}

/// The shared tier's object files (not its probe or temporary ones), sorted.
fn tier_objects(dir: &Path) -> Vec<PathBuf> {
    files(dir).into_iter().filter(|p| !p.starts_with(".tmp") && !p.starts_with("probe")).map(|p| dir.join(p)).collect()
}

#[test]
fn swapped_shared_tier_objects_are_rejected_recomputed_and_never_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (file, shared) = with_shared_tier(root);
    let file = file.as_str();
    let run = |out: &str, cache: &str, shared: &str| {
        let (out, cache) = (format!("out_dir={out}"), format!("cache_dir={cache}"));
        ok(root, &["-q", "run", file, "--set", &out, "--set", &cache, "--set", shared]);
    };
    run("a", "cache-a", &shared);
    // Two objects swapped: each well-formed, each under the other's name
    // (what anyone who may write to the tier can do).
    let objects = tier_objects(&root.join("shared"));
    // `validation` holds the train images under new names: same content, same key.
    assert_eq!(objects.len(), 9, "one object per image content that decodes");
    let (x, y) = (std::fs::read(&objects[0]).unwrap(), std::fs::read(&objects[1]).unwrap());
    std::fs::write(&objects[0], &y).unwrap();
    std::fs::write(&objects[1], &x).unwrap();

    run("b", "cache-b", &shared);
    let b = report_of(&root.join("b/report.json"));
    for f in ["train/features.npy", "validation/features.npy"] {
        let same = std::fs::read(root.join("a").join(f)).unwrap() == std::fs::read(root.join("b").join(f)).unwrap();
        assert!(same, "{f}: the swapped objects' features were served");
    }
    // Each swapped key is looked up by two images (train and validation);
    // the second is rejected too when it comes before the first's recomputed
    // value is stored, else it is a local hit.
    let rejected = b["cache"]["shared"]["rejected"].as_u64().unwrap();
    assert!((2..=4).contains(&rejected), "{b}");
    assert_eq!(b["cache"]["misses"], rejected + 1, "a rejected object is a miss (and the broken file): {b}");
    assert_eq!(b["cache"]["writes"], rejected, "what was rejected is recomputed: {b}");
    // The local store holds only right values: verified, and a run from it
    // alone writes the same features.
    let verify = common::bin().current_dir(root).args(["cache", "verify", "--dir", "cache-b"]).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    run("c", "cache-b", "shared_cache=");
    let c = report_of(&root.join("c/report.json"));
    assert_eq!(c["cache"]["misses"], 1, "only the file that does not decode: {c}");
    for f in ["train/features.npy", "validation/features.npy"] {
        assert!(std::fs::read(root.join("a").join(f)).unwrap() == std::fs::read(root.join("c").join(f)).unwrap());
    }
}
