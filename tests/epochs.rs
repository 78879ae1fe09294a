//! Epochs through the graph: a source re-emits its items every epoch
//! (reshuffled from the seed), end-of-epoch markers flow behind them, and a
//! streaming trainer trains one epoch per marker, validating on a second
//! input. Checked on the synthetic demo data with the tiny model.

mod common;

use std::path::Path;

/// Train branch (re-emitted `epochs` times) and eval branch (validation +
/// test, once), both into one streaming dense_head.
fn streaming_yaml(data: &Path, out: &Path, cache: &Path, workers: usize, extra_head: &str) -> String {
    augmented_yaml(data, out, cache, workers, extra_head, None)
}

/// With `variants`, an augment stage (the book's values) follows the resize
/// and the source draws one of that many variants per image each epoch.
fn augmented_yaml(
    data: &Path,
    out: &Path,
    cache: &Path,
    workers: usize,
    extra_head: &str,
    variants: Option<u32>,
) -> String {
    let yaml = format!(
        "name: epochs_test
stages:
  - {{id: train_files, kind: file_reader, dir: {data}, splits: [train], epochs: 6, shuffle: true, seed: 1}}
  - {{id: train_decode, kind: decode, input: train_files, workers: {workers}}}
  - {{id: train_resize, kind: resize, input: train_decode, size: [96, 96], workers: {workers}}}
  - {{id: train_batch, kind: batch, input: train_resize, size: 20}}
  - {{id: train_features, kind: onnx_features, input: train_batch, model: {model}, device: cpu, cache: {cache}}}
  - {{id: eval_files, kind: file_reader, dir: {data}, splits: [validation, test]}}
  - {{id: eval_decode, kind: decode, input: eval_files}}
  - {{id: eval_resize, kind: resize, input: eval_decode, size: [96, 96]}}
  - {{id: eval_batch, kind: batch, input: eval_resize, size: 20}}
  - {{id: eval_features, kind: onnx_features, input: eval_batch, model: {model}, device: cpu, cache: {cache}}}
  - id: head
    kind: dense_head
    inputs: [train_features, eval_features]
    out_dir: {out}
    streaming: true
    optimizer: {{name: adam, learning_rate: 1.0e-3}}
    threads: 2
    seed: 3
{extra_head}",
        data = data.display(),
        out = out.display(),
        cache = cache.display(),
        model = common::tiny_model().display()
    );
    match variants {
        None => yaml,
        Some(k) => yaml.replace("seed: 1}", &format!("seed: 1, variants: {k}}}")).replace(
            "  - {id: train_batch, kind: batch, input: train_resize, size: 20}",
            &format!(
                "  - {{id: augment, kind: augment, input: train_resize, workers: {workers}, rotation_range: 40, \
                 width_shift_range: 0.2, height_shift_range: 0.2, shear_range: 0.2, zoom_range: 0.2, \
                 horizontal_flip: true}}\n  - {{id: train_batch, kind: batch, input: augment, size: 20}}"
            ),
        ),
    }
}

fn metrics(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

#[test]
fn a_streaming_trainer_learns_one_epoch_per_marker_identically_whatever_the_worker_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 11).unwrap();
    let cache = tmp.path().join("cache");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));

    let yaml = streaming_yaml(&data, &one, &cache, 1, "");
    let report = common::run_yaml(&common::write_pipeline(tmp.path(), "one.yaml", &yaml)).unwrap();
    let history = common::history_without_seconds(&one);
    assert_eq!(history.len(), 7, "a header and one line per source epoch: {history:?}");
    assert!(history[1..].iter().all(|l| l.split(',').nth(4).is_some_and(|v| !v.is_empty())), "validated each epoch");
    let m = metrics(&one);
    let rows = (m["train_rows"].as_u64(), m["validation_rows"].as_u64(), m["test_rows"].as_u64());
    assert_eq!(rows, (Some(80), Some(40), Some(40)), "train rows are per epoch: {m}");
    assert!(m["val_acc"].as_f64().unwrap() >= 0.9, "the synthetic classes are easy: {m}");
    assert!(m["test_acc"].is_number(), "{m}");
    // Without a random stage the epochs reuse the features: 80 train and 80
    // eval images inferred once; epochs 2..6 are cache hits at the source.
    assert_eq!(common::detail(&report, "train_features", "images_inferred"), 80);
    assert_eq!(common::detail(&report, "eval_features", "images_inferred"), 80);
    let train_source = report.stages.iter().find(|s| s.id == "train_files").unwrap();
    assert_eq!(train_source.items_out, 80 * 6);

    let yaml = streaming_yaml(&data, &two, &cache, 2, "");
    common::run_yaml(&common::write_pipeline(tmp.path(), "two.yaml", &yaml)).unwrap();
    assert_eq!(history, common::history_without_seconds(&two), "workers: 2 trains exactly as workers: 1");
}

#[test]
fn early_stopping_stops_the_source_and_keeps_the_stopping_epochs_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 11).unwrap();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");
    // A learning rate this high makes val_loss stop improving early.
    let yaml = streaming_yaml(&data, &out, &cache, 1, "    early_stopping: {monitor: val_acc, patience: 1}\n")
        .replace("epochs: 6,", "epochs: 500,")
        .replace("learning_rate: 1.0e-3", "learning_rate: 1.0e-2");
    let report = common::run_yaml(&common::write_pipeline(tmp.path(), "stop.yaml", &yaml)).unwrap();
    let m = metrics(&out);
    let run = m["epochs_run"].as_u64().unwrap();
    assert!(run < 500, "early stopping ended training: {m}");
    let emitted = report.stages.iter().find(|s| s.id == "train_files").unwrap().items_out;
    assert!(emitted < 80 * 500, "the source stopped re-emitting: {emitted} items");
    assert_eq!(common::history_without_seconds(&out).len() as u64, run + 1);
}

#[test]
fn streaming_with_an_explicit_epoch_count_on_the_head_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 3).unwrap();
    let yaml = streaming_yaml(&data, &tmp.path().join("o"), &tmp.path().join("c"), 1, "    epochs: 4\n");
    let path = common::write_pipeline(tmp.path(), "bad.yaml", &yaml);
    let cfg = convflow::config::load(&path, &[]).unwrap();
    let err = convflow::graph::Graph::build(cfg, &convflow::stages::builtin_registry()).err().expect("invalid");
    let text = err.to_string();
    assert!(text.contains("head") && text.contains("epochs") && text.contains("streaming"), "{text}");
}

#[test]
fn augmented_variants_are_inferred_once_each_and_train_identically_whatever_the_worker_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 11).unwrap();
    let cache = tmp.path().join("cache");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let yaml = augmented_yaml(&data, &one, &cache, 1, "", Some(3));
    let report = common::run_yaml(&common::write_pipeline(tmp.path(), "one.yaml", &yaml)).unwrap();
    let inferred = common::detail(&report, "train_features", "images_inferred").as_u64().unwrap();
    // 6 epochs draw from 3 variants of each of 80 images: at most 240 distinct
    // inputs, and more than the 80 of a run without augmentation.
    assert!(inferred > 80 && inferred <= 240, "{inferred} train images inferred");
    let history = common::history_without_seconds(&one);
    assert_eq!(history.len(), 7);

    // A second run with two workers per stage: every variant is a cache
    // hit now, and the training is the same to the last digit.
    let yaml = augmented_yaml(&data, &two, &cache, 2, "", Some(3));
    let report = common::run_yaml(&common::write_pipeline(tmp.path(), "two.yaml", &yaml)).unwrap();
    assert_eq!(common::detail(&report, "train_features", "images_inferred"), 0, "all variants cached");
    assert_eq!(history, common::history_without_seconds(&two), "workers: 2 and cached features train exactly alike");

    // Fresh augmentation every epoch (variants: 0) infers every epoch's images anew.
    let fresh = tmp.path().join("fresh");
    let yaml = augmented_yaml(&data, &fresh, &tmp.path().join("cache2"), 2, "", Some(0));
    let report = common::run_yaml(&common::write_pipeline(tmp.path(), "fresh.yaml", &yaml)).unwrap();
    assert_eq!(common::detail(&report, "train_features", "images_inferred"), 80 * 6);
    assert_ne!(history, common::history_without_seconds(&fresh));
}
