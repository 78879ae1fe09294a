//! The worked example of a user stage (examples/custom_stage/): registered
//! next to the built-ins, validated, listed, run with `workers: 2` between
//! built-ins, and reported like any other stage.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// The example binary: `cargo test` builds examples with the tests; a
/// single `--test custom_stage` run does not, so make sure it is fresh.
fn example_bin() -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let profile = deps.parent().unwrap();
    let bin = profile.join("examples/custom_stage");
    {
        let mut build = Command::new(env!("CARGO"));
        build.current_dir(common::root()).args(["build", "--example", "custom_stage"]);
        if profile.ends_with("release") {
            build.arg("--release");
        }
        // The features this test was built with (the README's test command
        // turns on `s3`): other ones would rebuild the whole library here.
        if cfg!(feature = "s3") {
            build.args(["--features", "s3"]);
        }
        assert!(build.status().unwrap().success());
    }
    bin
}

#[test]
fn a_user_stage_runs_between_built_ins_like_a_built_in() {
    let stages = Command::new(example_bin()).arg("stages").output().unwrap();
    let text = String::from_utf8_lossy(&stages.stdout);
    assert!(text.contains("drop_uniform: drops near-uniform images"), "{text}");
    assert!(text.contains("min_std") && text.contains("file_reader"), "{text}");

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 5).unwrap();
    for (i, grey) in [0u8, 128, 250].iter().enumerate() {
        image::RgbImage::from_pixel(120, 90, image::Rgb([*grey; 3]))
            .save(data.join(format!("train/cats/blank{i}.png")))
            .unwrap();
    }
    let out = tmp.path().join("out");
    let pipeline = tmp.path().join("p.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train]}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: no_blanks, kind: drop_uniform, input: decode, workers: 2, min_std: 3.5}}
  - {{id: resize, kind: resize, input: no_blanks, size: [64, 64]}}
  - {{id: batch, kind: batch, input: resize}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, device: cpu}}
  - {{id: write, kind: feature_writer, input: features, dir: {out}}}
",
            data = data.display(),
            model = common::tiny_model().display(),
            out = out.display()
        ),
    )
    .unwrap();

    let bad = std::fs::read_to_string(&pipeline).unwrap().replace("min_std: 3.5", "min_sdt: 3.5");
    let bad_path = tmp.path().join("bad.yaml");
    std::fs::write(&bad_path, bad).unwrap();
    let v = Command::new(example_bin()).arg("validate").arg(&bad_path).output().unwrap();
    assert_eq!(v.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&v.stderr).contains("stage `no_blanks`: field `min_sdt`: unknown field"));

    let report_path = tmp.path().join("report.json");
    let run = Command::new(example_bin())
        .args(["--quiet", "run"])
        .arg(&pipeline)
        .arg("--report")
        .arg(&report_path)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let stage = report["stages"].as_array().unwrap().iter().find(|s| s["id"] == "no_blanks").unwrap().clone();
    assert_eq!(stage["kind"], "drop_uniform");
    assert_eq!(stage["workers"], 2);
    assert_eq!((stage["items_in"].as_u64(), stage["items_out"].as_u64()), (Some(83), Some(80)));
    assert_eq!(stage["details"]["dropped_uniform"], 3);
    // ...and in the metrics, under its own id, like any built-in.
    let prom = std::fs::read_to_string(tmp.path().join("metrics.prom")).unwrap();
    assert!(
        prom.lines().any(|l| l.starts_with("convflow_stage_items_in_total")
            && l.contains("stage=\"no_blanks\"")
            && l.ends_with(" 83")),
        "{prom}"
    );
    let paths = std::fs::read_to_string(out.join("train/paths.txt")).unwrap();
    assert_eq!(paths.lines().count(), 80);
    assert!(!paths.contains("blank"));
    // Order survives the two workers: classes, then sorted names.
    let mut sorted: Vec<&str> = paths.lines().collect();
    sorted.sort_by_key(|p| (p.contains("/dogs/"), p.rsplit('/').next().unwrap().to_string()));
    assert_eq!(paths.lines().collect::<Vec<_>>(), sorted);
}
