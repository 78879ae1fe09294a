//! `convflow validate` on the fixture pipelines: valid ones pass, invalid
//! ones print every expected error (from their `# expect:` lines) at the
//! right line:column, and exit 2.

mod common;

use std::fs;

#[test]
fn fixture_pipelines_report_every_expected_error() {
    let dir = common::root().join("tests/fixtures/pipelines");
    let mut checked = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let rel = format!("tests/fixtures/pipelines/{name}");
        let out = common::bin().args(["validate", &rel]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if name.starts_with("valid-") {
            assert!(out.status.success(), "{name} should be valid:\n{stderr}");
        } else if name.starts_with("invalid-") {
            assert_eq!(out.status.code(), Some(2), "{name} must exit 2:\n{stderr}");
            let expected: Vec<String> = fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter_map(|l| l.strip_prefix("# expect: ").map(str::to_string))
                .collect();
            assert!(!expected.is_empty(), "{name} has no `# expect:` lines");
            for e in &expected {
                let (pos, message) = e.split_once(' ').unwrap();
                let want = format!("{rel}:{pos}: {message}");
                assert!(stderr.lines().any(|l| l.starts_with(&want)), "{name}: missing\n  {want}\nin\n{stderr}");
            }
            let reported = stderr.lines().filter(|l| l.starts_with(&rel)).count();
            assert_eq!(reported, expected.len(), "{name}: unexpected extra errors:\n{stderr}");
        } else {
            continue;
        }
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} fixtures found");
}

#[test]
fn set_overrides_params_and_rejects_unknown_ones() {
    let ok = common::bin()
        .args([
            "validate",
            "pipelines/extract_features.yaml",
            "--set",
            "data_dir=tests/fixtures/images",
            "--set",
            "base=models/tiny_vgg.onnx",
        ])
        .output()
        .unwrap();
    // data_dir has no split folders, so the override must have reached the reader.
    let err = String::from_utf8_lossy(&ok.stderr);
    assert!(err.contains("tests/fixtures/images/train is not a folder"), "{err}");

    let bad =
        common::bin().args(["validate", "pipelines/extract_features.yaml", "--set", "dta_dir=x"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--set dta_dir: no such param"));
}

#[test]
fn graph_prints_dot_and_stages_lists_options() {
    let dot = common::bin().args(["graph", "--dot", "tests/fixtures/pipelines/valid-params.yaml"]).output().unwrap();
    let dot = String::from_utf8_lossy(&dot.stdout);
    assert!(dot.starts_with("digraph \"params_demo\""), "{dot}");
    // Each edge is labelled with what it carries (issue 33), not its item kind alone.
    assert!(dot.contains("\"decode\" -> \"resize\" [label=\"image\\nimages of any size, 3 channel(s)"), "{dot}");
    assert!(dot.contains("workers: 2"), "{dot}");

    let stages = common::bin().arg("stages").output().unwrap();
    let text = String::from_utf8_lossy(&stages.stdout);
    for kind in ["file_reader", "decode", "resize", "batch", "onnx_features", "feature_writer"] {
        assert!(text.contains(&format!("{kind}: ")), "{kind} missing from `convflow stages`");
    }
    assert!(text.contains("preprocess") && text.contains("rescale"), "{text}");
}

#[test]
fn a_file_of_many_params_and_uses_is_read_in_linear_time() {
    // 60,000 params, each used once: a list searched per key and per use
    // (quadratic) took about 10 s on the 2-core machine; linear is ~0.1 s.
    let tmp = tempfile::tempdir().unwrap();
    let n = 60_000;
    let mut yaml = String::from("name: big\nparams:\n");
    for i in 0..n {
        yaml += &format!("  p{i}: x\n");
    }
    yaml += "description: \"";
    for i in 0..n {
        yaml += &format!("${{p{i}}}");
    }
    yaml += "\"\n";
    let minimal = fs::read_to_string(common::root().join("tests/fixtures/pipelines/valid-minimal.yaml")).unwrap();
    yaml += &minimal;
    let file = common::write_pipeline(tmp.path(), "big.yaml", &yaml);
    let started = std::time::Instant::now();
    let out = common::bin().arg("validate").arg(&file).output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(took < std::time::Duration::from_secs(3), "validate took {took:?}");
}

/// A fresh clone: the pipeline files and nothing they point at (no demo
/// data, models, caches or trained heads). `--no-environment` passes every
/// shipped pipeline there, in one call; plain `validate` still checks the
/// inputs and names the missing one.
#[test]
fn every_shipped_pipeline_validates_without_its_environment_on_a_fresh_clone() {
    let clone = tempfile::tempdir().unwrap();
    let pipelines = clone.path().join("pipelines");
    fs::create_dir(&pipelines).unwrap();
    let mut files = Vec::new();
    for entry in fs::read_dir(common::root().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_owned();
            fs::copy(&path, pipelines.join(&name)).unwrap();
            files.push(std::path::Path::new("pipelines").join(name));
        }
    }
    files.sort();
    assert!(files.len() >= 10, "only {} pipelines", files.len());
    let out =
        common::bin().current_dir(clone.path()).args(["validate", "--no-environment"]).args(&files).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    for f in &files {
        assert!(stdout.contains(&format!("{}: ok", f.display())), "{} not reported ok:\n{stdout}", f.display());
    }

    let out =
        common::bin().current_dir(clone.path()).args(["validate", "pipelines/extract_features.yaml"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(".convflow/demo-data is not a folder"), "{stderr}");
    assert!(stderr.contains("models/vgg16_notop.onnx not found"), "{stderr}");
    // The file's own mistakes are still found without the environment.
    let bad =
        fs::read_to_string(pipelines.join("extract_features.yaml")).unwrap().replace("kind: batch", "kind: batches");
    fs::write(clone.path().join("bad.yaml"), bad).unwrap();
    let out =
        common::bin().current_dir(clone.path()).args(["validate", "--no-environment", "bad.yaml"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown stage kind `batches`") && !stderr.contains("not a folder"), "{stderr}");
}

/// A conv base's smallest image (Keras's: Xception 71, Inception V3 75,
/// MobileNet 32) is checked by `validate` against the resize upstream, at
/// the stage's `model` field, whether the base is named or given by its
/// file; one pixel more passes. (`--no-environment`: the bases' files need
/// not be set up for this check.)
#[test]
fn validate_refuses_an_image_size_a_base_cannot_take() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = |model: &str, size: u32| {
        format!(
            "stages:
  - id: files
    kind: file_reader
    dir: tests/fixtures/images
  - id: decode
    kind: decode
    input: files
  - id: shrink
    kind: resize
    input: decode
    size: [{size}, {size}]
  - id: batch
    kind: batch
    input: shrink
  - id: features
    kind: onnx_features
    input: batch
    model: {model}
  - id: write
    kind: feature_writer
    input: features
    dir: {out}
",
            out = tmp.path().join("out").display()
        )
    };
    for (model, min) in [("xception", 71), ("inception_v3", 75), ("models/mobilenet_notop.onnx", 32), ("vgg19", 32)] {
        let name = model.rsplit('/').next().unwrap().trim_end_matches("_notop.onnx");
        let path = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&path, yaml(model, min - 1)).unwrap();
        let out = common::bin().args(["validate", "--no-environment"]).arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{model} at {}: {stderr}", min - 1);
        let want = format!(
            "18:5: stage `features`: field `model`: {name} takes images of at least {min}x{min}; this pipeline makes {s}x{s} (stage `shrink`)",
            s = min - 1
        );
        assert!(stderr.contains(&want), "{model}: missing\n  {want}\nin\n{stderr}");
        std::fs::write(&path, yaml(model, min)).unwrap();
        let out = common::bin().args(["validate", "--no-environment"]).arg(&path).output().unwrap();
        assert!(out.status.success(), "{model} at {min}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
