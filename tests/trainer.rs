//! The dense-head trainer and predictor through whole pipelines, on the
//! synthetic demo data with the tiny model (fast), checked for what a user
//! relies on: it learns, writes its outputs, repeats itself exactly, and
//! the saved head predicts what training measured.

mod common;

use std::path::Path;

fn train_yaml(data: &Path, out: &Path, cache: &Path, extra: &str) -> String {
    format!(
        "name: train_test
stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train, validation, test]}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [96, 96]}}
  - {{id: batch, kind: batch, input: resize}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, device: cpu, cache: {cache}}}
  - id: head
    kind: dense_head
    input: features
    out_dir: {out}
    epochs: 15
    optimizer: {{name: adam, learning_rate: 1.0e-3}}
    threads: 2
    seed: 3
{extra}",
        data = data.display(),
        out = out.display(),
        cache = cache.display(),
        model = common::tiny_model().display()
    )
}

#[test]
fn trains_writes_its_outputs_repeats_exactly_and_predicts_what_it_measured() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 11).unwrap();
    let cache = tmp.path().join("cache");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for out in [&a, &b] {
        let yaml = train_yaml(&data, out, &cache, "");
        common::run_yaml(&common::write_pipeline(tmp.path(), "train.yaml", &yaml)).unwrap();
    }

    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("metrics.json")).unwrap()).unwrap();
    for key in ["val_acc", "val_loss", "test_acc", "test_loss"] {
        assert!(metrics[key].is_number(), "metrics.json lacks {key}: {metrics}");
    }
    assert_eq!(
        (metrics["train_rows"].as_u64(), metrics["validation_rows"].as_u64(), metrics["test_rows"].as_u64()),
        (Some(80), Some(40), Some(40))
    );
    assert!(metrics["val_acc"].as_f64().unwrap() >= 0.9, "the synthetic classes are easy: {metrics}");

    let history = common::history_without_seconds(&a);
    assert_eq!(history[0], "epoch,loss,acc,val_loss,val_acc");
    assert_eq!(history.len(), 16);
    assert_eq!(history, common::history_without_seconds(&b), "same seed and threads -> identical history");
    let load = |d: &Path| convflow::ml::head::Head::load_safetensors(&d.join("head.safetensors")).unwrap();
    let (ha, hb) = (load(&a), load(&b));
    for i in 0..2 {
        assert_eq!(ha.dense_weights(i), hb.dense_weights(i), "identical weights");
    }

    // Features spilled to disk (memory bounded by a batch) train identically.
    let spilled = tmp.path().join("spilled");
    let yaml = train_yaml(&data, &spilled, &cache, "    max_memory_mb: 0\n");
    common::run_yaml(&common::write_pipeline(tmp.path(), "spill.yaml", &yaml)).unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(spilled.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["spilled_to_disk"], true);
    assert_eq!(history, common::history_without_seconds(&spilled));
    assert_eq!(m["test_acc"], metrics["test_acc"]);

    let png = image::open(a.join("curves.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1200, 480));

    // The saved head, through the predict pipeline, on the test split.
    let csv = tmp.path().join("pred.csv");
    let predict = common::bin()
        .args(["--quiet", "run", "pipelines/predict.yaml"])
        .args(["--set", &format!("head={}", a.display())])
        .args(["--set", &format!("input_dir={}", data.join("test").display())])
        .args(["--set", &format!("out={}", csv.display())])
        .args(["--set", &format!("cache_dir={}", tmp.path().join("cache2").display())])
        .args(["--set", &format!("base={}", common::tiny_model().display())])
        .args(["--set", "image_size=150"])
        .output()
        .unwrap();
    // The head was trained on 96x96 tiny features (3x3x16), these are 150x150's (4x4x16):
    // refused before any work (by validation, issue 33; it used to fail at the first
    // batch), naming both sides, no CSV. predict.yaml's default, `auto`, is the head's size.
    assert_eq!(predict.status.code(), Some(2));
    let err = String::from_utf8_lossy(&predict.stderr);
    assert!(err.contains("stage `classify`") && err.contains("of 96x96") && err.contains("of 150x150"), "{err}");
    assert!(!csv.exists());

    // At the head's own size (`image_size`, which every shipped pipeline takes) it fits.
    let status = common::bin()
        .args(["--quiet", "run", "pipelines/predict.yaml", "--set", "image_size=96"])
        .args(["--set", &format!("head={}", a.display())])
        .args(["--set", &format!("input_dir={}", data.join("test").display())])
        .args(["--set", &format!("out={}", csv.display())])
        .args(["--set", &format!("cache_dir={}", cache.display())])
        .args(["--set", &format!("base={}", common::tiny_model().display())])
        .status()
        .unwrap();
    assert!(status.success());
    let rows: Vec<Vec<String>> = std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    assert_eq!(rows.len(), 40);
    let correct = rows.iter().filter(|r| r[0].contains(&format!("/{}/", r[3]))).count();
    let test_acc = metrics["test_acc"].as_f64().unwrap();
    assert!((correct as f64 / 40.0 - test_acc).abs() < 1e-6, "predictions agree with the trainer's test accuracy");
    for r in &rows {
        let (p0, p1): (f64, f64) = (r[1].parse().unwrap(), r[2].parse().unwrap());
        assert!((p0 + p1 - 1.0).abs() < 1e-5);
    }
}

#[test]
fn early_stopping_and_keep_best() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 12).unwrap();
    let out = tmp.path().join("out");
    let extra = "    epochs: 200\n    early_stopping: {monitor: val_loss, patience: 3}\n    keep_best: true\n";
    let yaml = train_yaml(&data, &out, &tmp.path().join("cache"), "").replace("    epochs: 15\n", "") + extra;
    common::run_yaml(&common::write_pipeline(tmp.path(), "es.yaml", &yaml)).unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let (run, best) = (m["epochs_run"].as_u64().unwrap(), m["best_epoch"].as_u64().unwrap());
    assert!(run < 200, "stopped early");
    assert_eq!(run, best + 3, "patience 3 after the best epoch");
    let h = std::fs::read_to_string(out.join("history.csv")).unwrap();
    let best_val_loss = h.lines().nth(best as usize).unwrap().split(',').nth(3).unwrap().to_string();
    assert_eq!(format!("{:.6}", m["val_loss"].as_f64().unwrap()), best_val_loss, "kept the best epoch's weights");
}

/// `convflow summary` of a dense head: its input is the features of the
/// conv base upstream at the pipeline's image size (worked out by running
/// the model once), its default layers sized by the source's classes.
#[test]
fn summary_prints_the_books_dense_head_on_the_features_upstream() {
    let _ = common::vgg16();
    let data = tempfile::tempdir().unwrap();
    for split in ["train", "validation", "test"] {
        for class in ["cats", "dogs", "birds"] {
            std::fs::create_dir_all(data.path().join(split).join(class)).unwrap();
        }
    }
    let summary = |file: &str, sets: &[String]| {
        let mut cmd = common::bin();
        cmd.current_dir(common::root()).args(["summary", file]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let o = cmd.output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let data_set = format!("data_dir={}", data.path().display());
    // The book's listing 5.18 head on VGG16's 4x4x512 features at 150x150.
    for file in ["pipelines/feature_extraction.yaml", "pipelines/augmented_end_to_end.yaml"] {
        let (ok, text, err) = summary(file, std::slice::from_ref(&data_set));
        assert!(ok, "{file}: {err}");
        for want in
            ["(input (None, 8192))", "(None, 256)", "2,097,408", "dropout (Dropout)", "257", "Total params: 2,097,665"]
        {
            assert!(text.contains(want), "{file}: {want} missing from\n{text}");
        }
    }
    // At 224x224 the features are 7x7x512.
    let (ok, text, err) = summary("pipelines/feature_extraction.yaml", &[data_set.clone(), "image_size=224".into()]);
    assert!(ok, "{err}");
    assert!(text.contains("(None, 25088)") && text.contains("6,422,784"), "{text}");
    // Categorical with three class folders: the default head ends in Dense(3, softmax).
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::root().join("pipelines/feature_extraction.yaml"))
        .unwrap()
        .replace("class_mode: binary", "class_mode: categorical");
    let p = common::write_pipeline(dir.path(), "categorical.yaml", &text);
    let (ok, text, err) = summary(p.to_str().unwrap(), &[data_set, format!("base={}", common::vgg16().display())]);
    assert!(ok, "{err}");
    assert!(text.contains("dense_1 (Dense)                   (None, 3)") && text.contains("771"), "{text}");
    // No resize upstream of the conv base: the shape cannot be known, and the error says why.
    let no_resize = "stages:
  - {id: files, kind: file_reader, dir: tests/fixtures}
  - {id: decode, kind: decode, input: files}
  - {id: batch, kind: batch, input: decode}
  - {id: vgg16, kind: onnx_features, input: batch, model: models/vgg16_notop.onnx}
  - {id: head, kind: dense_head, input: vgg16, out_dir: out/x}
";
    let p = common::write_pipeline(dir.path(), "no_resize.yaml", no_resize);
    let (ok, _, err) = summary(p.to_str().unwrap(), &[]);
    assert!(!ok);
    assert!(err.contains("stage `head`") && err.contains("`vgg16`") && err.contains("resize"), "{err}");
}

#[test]
fn smooth_curves_draws_the_books_moving_average_beside_the_curves() {
    // The book's smooth_curve: previous * factor + point * (1 - factor), the first as it is.
    let s = convflow::plot::smooth([1.0, 2.0, 3.0, 3.0], 0.8);
    let want = [1.0, 1.2, 1.56, 1.848];
    assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{s:?}");

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 11).unwrap();
    let (cache, out) = (tmp.path().join("cache"), tmp.path().join("out"));
    let yaml = train_yaml(&data, &out, &cache, "    smooth_curves: 0.8\n").replace("epochs: 15", "epochs: 3");
    common::run_yaml(&common::write_pipeline(tmp.path(), "train.yaml", &yaml)).unwrap();
    for f in ["curves.png", "curves_smoothed.png"] {
        let png = std::fs::read(out.join(f)).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{f}");
    }
    // Off by default: no extra file.
    let plain = tmp.path().join("plain");
    let yaml = train_yaml(&data, &plain, &cache, "").replace("epochs: 15", "epochs: 3");
    common::run_yaml(&common::write_pipeline(tmp.path(), "plain.yaml", &yaml)).unwrap();
    assert!(plain.join("curves.png").is_file() && !plain.join("curves_smoothed.png").exists());
}
