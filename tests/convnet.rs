//! The `convnet` trainer end to end: MNIST digits (a few hundred) train and
//! beat chance by far, bit-identically on a rerun; `convflow summary`
//! prints the book's two tables; an image that does not fit stops the run
//! before any training, naming the stage and both shapes; a layer list that
//! cannot be built is a file:line:col error from `convflow validate`.

mod common;

use std::path::Path;

fn mnist_yaml(out: &Path, train: usize, test: usize, epochs: u32, extra: &str) -> String {
    format!(
        "name: small_mnist
stages:
  - id: digits
    kind: idx_reader
    splits:
      - name: train
        images: models/mnist/train-images-idx3-ubyte
        labels: models/mnist/train-labels-idx1-ubyte
        limit: {train}
      - name: test
        images: models/mnist/t10k-images-idx3-ubyte
        labels: models/mnist/t10k-labels-idx1-ubyte
        limit: {test}
    shuffle: true
    epochs: {epochs}
  - id: net
    kind: convnet
    input: digits
    out_dir: {out}
    streaming: true
    rescale: 0.00392156862745098
    threads: 2
    layers:
      - {{kind: conv2d, filters: 8, kernel_size: 3, activation: relu}}
      - {{kind: max_pooling2d}}
      - {{kind: conv2d, filters: 16, kernel_size: 3, activation: relu}}
      - {{kind: max_pooling2d}}
      - {{kind: flatten}}
      - {{kind: dense, units: 10, activation: softmax}}
    batch_size: 32
{extra}",
        out = out.display()
    )
}

fn run_in_root(pipeline: &Path) -> std::process::Output {
    common::bin().args(["run", "-q"]).arg(pipeline).output().unwrap()
}

#[test]
fn a_few_hundred_digits_train_far_past_chance_and_repeat_exactly() {
    let Some(_) = common::mnist() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut histories = Vec::new();
    for run in 0..2 {
        let out = dir.path().join(format!("out{run}"));
        let p = common::write_pipeline(dir.path(), "mnist.yaml", &mnist_yaml(&out, 600, 300, 3, ""));
        let o = run_in_root(&p);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
        let acc = m["test_acc"].as_f64().unwrap();
        // Chance is 0.1; 600 digits and 3 epochs reach ~0.85.
        assert!(acc > 0.6, "test accuracy {acc}");
        assert_eq!(m["epochs_run"], 3);
        assert_eq!(m["test_rows"], 300);
        for f in ["history.csv", "curves.png", "model.safetensors", "model.json"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        histories.push(common::history_without_seconds(&out));
    }
    assert_eq!(histories[0], histories[1], "same seed and threads: same history");
}

#[test]
fn summary_prints_the_books_two_tables() {
    let Some(_) = common::mnist() else { return };
    let o = common::bin().args(["summary", "pipelines/mnist_convnet.yaml"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in ["(None, 26, 26, 32)", "320", "18,496", "36,928", "650", "Total params: 93,322"] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    assert_eq!(text.matches("36,928").count(), 2, "{text}");
    // The cats-vs-dogs pipelines validate their data folder: an empty one does.
    let data = tempfile::tempdir().unwrap();
    for split in ["train", "validation", "test"] {
        std::fs::create_dir(data.path().join(split)).unwrap();
    }
    let set = format!("data_dir={}", data.path().display());
    let o = common::bin().args(["summary", "pipelines/convnet_from_scratch.yaml", "--set", &set]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in ["896", "18,496", "73,856", "147,584", "(None, 6272)", "3,211,776", "513", "Total params: 3,453,121"] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    let o = common::bin().args(["summary", "pipelines/convnet_augmented.yaml", "--set", &set]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("dropout (Dropout)") && text.contains("Total params: 3,453,121"), "{text}");
}

#[test]
fn an_image_that_does_not_fit_stops_the_run_naming_stage_and_shapes() {
    let Some(_) = common::mnist() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let p =
        common::write_pipeline(dir.path(), "bad.yaml", &mnist_yaml(&out, 50, 10, 1, "    input_shape: [32, 32, 3]\n"));
    let o = run_in_root(&p);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("net") && err.contains("[28, 28, 1]") && err.contains("[32, 32, 3]"), "{err}");
    assert!(!out.join("history.csv").exists(), "nothing was trained");
}

#[test]
fn layer_lists_that_cannot_be_built_are_file_line_col_errors() {
    let dir = tempfile::tempdir().unwrap();
    let text = "stages:
  - id: files
    kind: file_reader
    dir: tests/fixtures
  - id: decode
    kind: decode
    input: files
  - id: net
    kind: convnet
    input: decode
    out_dir: out/never
    input_shape: [3, 3, 3]
    layers:
      - {kind: conv2d, filters: 8, kernel_size: 3}
      - {kind: max_pooling2d, pool_size: 2}
      - {kind: flatten}
      - {kind: dense, units: 1, activation: sigmoid}
";
    let p = common::write_pipeline(dir.path(), "pool.yaml", text);
    let o = common::bin().arg("validate").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    // The pooling layer is line 15, its `{` at column 9.
    assert!(err.contains("pool.yaml:15:9"), "{err}");
    assert!(err.contains("max_pooling2d") && err.contains("(None, 1, 1, 8)"), "{err}");

    let text = text.replace("      - {kind: max_pooling2d, pool_size: 2}\n      - {kind: flatten}\n", "");
    let p = common::write_pipeline(dir.path(), "dense.yaml", &text);
    let o = common::bin().arg("validate").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("dense.yaml:15:9") && err.contains("flatten"), "{err}");
}

/// Digits with a validation split and dropout, for the checkpoint test.
fn resumable_yaml(out: &Path) -> String {
    format!(
        "name: resumable_mnist
stages:
  - id: digits
    kind: idx_reader
    splits:
      - {{name: train, images: models/mnist/train-images-idx3-ubyte, labels: models/mnist/train-labels-idx1-ubyte, limit: 500}}
      - {{name: validation, images: models/mnist/t10k-images-idx3-ubyte, labels: models/mnist/t10k-labels-idx1-ubyte, skip: 200, limit: 100}}
      - {{name: test, images: models/mnist/t10k-images-idx3-ubyte, labels: models/mnist/t10k-labels-idx1-ubyte, limit: 200}}
    shuffle: true
    epochs: 8
  - id: net
    kind: convnet
    input: digits
    out_dir: {out}
    streaming: true
    rescale: 0.00392156862745098
    threads: 2
    keep_best: true
    layers:
      - {{kind: conv2d, filters: 8, kernel_size: 3, activation: relu}}
      - {{kind: max_pooling2d}}
      - {{kind: flatten}}
      - {{kind: dropout, rate: 0.3}}
      - {{kind: dense, units: 10, activation: softmax}}
    batch_size: 25
",
        out = out.display()
    )
}

fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let m = convflow::ml::convnet::Convnet::load_safetensors(&out.join("model.safetensors"), 1).unwrap();
    m.tensors().into_iter().map(|(n, _, v)| (n, v.to_vec())).collect()
}

fn metrics(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

#[test]
fn a_training_killed_mid_run_resumes_to_the_uninterrupted_result() {
    let Some(_) = common::mnist() else { return };
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let o = run_in_root(&common::write_pipeline(dir.path(), "whole.yaml", &resumable_yaml(&whole)));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!whole.join("checkpoint.safetensors").exists(), "a finished training deletes its checkpoint");
    assert_eq!(metrics(&whole)["resumed_from_epoch"], serde_json::Value::Null);

    // kill -9 once a checkpoint of epoch 2 or later is down.
    let cut = dir.path().join("cut");
    let p = common::write_pipeline(dir.path(), "cut.yaml", &resumable_yaml(&cut));
    let mut command = common::bin();
    command.args(["run", "-q"]).arg(&p);
    let killed_at = common::kill_at_checkpoint(command, &cut, 2);
    let at = common::checkpoint_epoch(&cut).unwrap();
    assert!((killed_at..8).contains(&at), "killed at epoch {killed_at}, checkpoint {at}");

    // A pipeline of other options (here only out_dir) does not take it up.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(cut.join("checkpoint.safetensors"), other.join("checkpoint.safetensors")).unwrap();
    let o = common::bin()
        .args(["run"])
        .arg(common::write_pipeline(dir.path(), "other.yaml", &resumable_yaml(&other)))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("written by a pipeline with other options"), "{log}");
    assert_eq!(metrics(&other)["resumed_from_epoch"], serde_json::Value::Null);

    // The same command again: it resumes after the checkpoint's epoch and
    // ends exactly where the uninterrupted run did.
    let o = common::bin().args(["run"]).arg(&p).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains(&format!("resuming after epoch {at}")), "{log}");
    assert_eq!(metrics(&cut)["resumed_from_epoch"], at);
    assert!(!cut.join("checkpoint.safetensors").exists());
    for out in [&cut, &other] {
        assert_eq!(common::history_without_seconds(out), common::history_without_seconds(&whole), "{}", out.display());
        assert_eq!(weights(out), weights(&whole), "{}: weights", out.display());
        for key in ["best_epoch", "val_acc", "test_acc", "test_loss"] {
            assert_eq!(metrics(out)[key], metrics(&whole)[key], "{}: {key}", out.display());
        }
    }
}
