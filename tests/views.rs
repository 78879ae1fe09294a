//! Test-time augmentation: the `views` stage sends each validation/test
//! image as it is and mirrored; `dense_head` scores each image by the mean
//! of its views' probabilities (and reports view 0 alone beside it), and
//! `head_predict` writes one line per image with that mean. Checked against
//! a copy of the data mirrored on disk, on the synthetic demo data with the
//! tiny model.

mod common;

use std::collections::HashMap;
use std::path::Path;

/// Streaming head; the eval branch (validation + test) goes through `views`.
fn train_yaml(data: &Path, out: &Path, cache: &Path) -> String {
    format!(
        "name: views_test
stages:
  - {{id: train_files, kind: file_reader, dir: {data}, splits: [train], epochs: 5, shuffle: true, seed: 1}}
  - {{id: train_decode, kind: decode, input: train_files}}
  - {{id: train_resize, kind: resize, input: train_decode, size: [96, 96]}}
  - {{id: train_batch, kind: batch, input: train_resize, size: 20}}
  - {{id: train_features, kind: onnx_features, input: train_batch, model: {model}, device: cpu, cache: {cache}}}
  - {{id: eval_files, kind: file_reader, dir: {data}, splits: [validation, test]}}
  - {{id: eval_decode, kind: decode, input: eval_files}}
  - {{id: eval_views, kind: views, input: eval_decode, workers: 2}}
  - {{id: eval_resize, kind: resize, input: eval_views, size: [96, 96], workers: 2}}
  - {{id: eval_batch, kind: batch, input: eval_resize, size: 20}}
  - {{id: eval_features, kind: onnx_features, input: eval_batch, model: {model}, device: cpu, cache: {cache}}}
  - id: head
    kind: dense_head
    inputs: [train_features, eval_features]
    out_dir: {out}
    streaming: true
    optimizer: {{name: adam, learning_rate: 1.0e-4}}
    threads: 2
    seed: 3
",
        data = data.display(),
        out = out.display(),
        cache = cache.display(),
        model = common::tiny_model().display()
    )
}

/// `head` on the images of `dir` (class folders), views or not; path -> P(dogs).
fn predict(tmp: &Path, name: &str, head: &Path, dir: &Path, views: bool) -> HashMap<String, f64> {
    let views_stage = if views { "  - {id: views, kind: views, input: decode}\n" } else { "" };
    let csv = tmp.join(format!("{name}.csv"));
    let yaml = format!(
        "name: predict_{name}
stages:
  - {{id: files, kind: file_reader, dir: {dir}, class_mode: none}}
  - {{id: decode, kind: decode, input: files}}
{views_stage}  - {{id: resize, kind: resize, input: {resize_input}, size: [96, 96]}}
  - {{id: batch, kind: batch, input: resize, size: 7}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, device: cpu}}
  - {{id: classify, kind: head_predict, input: features, head: {head}, out: {csv}}}
",
        dir = dir.display(),
        resize_input = if views { "views" } else { "decode" },
        model = common::tiny_model().display(),
        head = head.display(),
        csv = csv.display(),
    );
    common::run_yaml(&common::write_pipeline(tmp, &format!("{name}.yaml"), &yaml)).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            let stem = Path::new(cols[0]).file_stem().unwrap().to_string_lossy().into_owned();
            (stem, cols[2].parse().unwrap())
        })
        .collect()
}

fn accuracy(p: &HashMap<String, f64>) -> f64 {
    let correct = p.iter().filter(|(stem, p)| (**p > 0.5) == stem.starts_with("dog")).count();
    correct as f64 / p.len() as f64
}

#[test]
fn views_are_cached_once_each_and_scored_by_their_mean_per_image() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 11).unwrap();
    let cache = tmp.path().join("cache");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let report =
        common::run_yaml(&common::write_pipeline(tmp.path(), "a.yaml", &train_yaml(&data, &a, &cache))).unwrap();
    // 40 validation + 40 test images, two views each, each view inferred once.
    assert_eq!(common::detail(&report, "eval_features", "images_inferred"), 160);
    let report =
        common::run_yaml(&common::write_pipeline(tmp.path(), "b.yaml", &train_yaml(&data, &b, &cache))).unwrap();
    assert_eq!(common::detail(&report, "eval_features", "images_inferred"), 0, "both views are cache hits");
    assert_eq!(common::history_without_seconds(&a), common::history_without_seconds(&b));

    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("metrics.json")).unwrap()).unwrap();
    assert_eq!((m["test_rows"].as_u64(), m["test_views_per_image"].as_f64()), (Some(80), Some(2.0)), "{m}");
    assert_eq!(m["val_views_per_image"].as_f64(), Some(2.0));

    // The same test images mirrored on disk (PNG: the mirrored pixels exactly).
    let test = data.join("test");
    let mirrored = tmp.path().join("mirrored");
    for class in ["cats", "dogs"] {
        std::fs::create_dir_all(mirrored.join(class)).unwrap();
        for entry in std::fs::read_dir(test.join(class)).unwrap() {
            let path = entry.unwrap().path();
            let img = convflow::imaging::decode::decode_image(&std::fs::read(&path).unwrap(), u64::MAX).unwrap();
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            image::imageops::flip_horizontal(&img).save(mirrored.join(class).join(format!("{stem}.png"))).unwrap();
        }
    }
    let plain = predict(tmp.path(), "plain", &a, &test, false);
    let mirror = predict(tmp.path(), "mirror", &a, &mirrored, false);
    let views = predict(tmp.path(), "views", &a, &test, true);
    assert_eq!((plain.len(), mirror.len(), views.len()), (40, 40, 40), "one line per image");
    let mut differ = 0;
    for (stem, &p) in &views {
        let mean = (plain[stem] + mirror[stem]) / 2.0;
        assert!((p - mean).abs() < 2e-6, "{stem}: {p} is not the mean of {} and {}", plain[stem], mirror[stem]);
        differ += usize::from((plain[stem] - mirror[stem]).abs() > 1e-3);
    }
    assert!(differ > 20, "the mirror is a different input for most images ({differ} of 40)");
    // The trainer's figures are those of the same predictions.
    let close = |a: f64, b: &serde_json::Value| (a - b.as_f64().unwrap()).abs() < 1e-6;
    assert!(close(accuracy(&views), &m["test_acc"]), "{} vs {m}", accuracy(&views));
    assert!(close(accuracy(&plain), &m["test_acc_one_view"]), "{} vs {m}", accuracy(&plain));
}

/// The progress log counts a sink against what reaches it: with two views
/// per image, twice the files (it used to expect one per file, and ended
/// at 80/40 with a wrong ETA all along).
#[test]
fn the_progress_total_counts_every_view() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 11).unwrap();
    let views = "  - {id: views, kind: views, input: decode}\n";
    let yaml = common::extraction_yaml(
        &data.join("test"),
        &common::tiny_model(),
        &tmp.path().join("out"),
        None,
        views,
        32,
        "caffe",
    )
    .replace("input: decode\n    size", "input: views\n    size");
    let pipeline = common::write_pipeline(tmp.path(), "p.yaml", &yaml);
    let o = common::bin().args(["run", pipeline.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let files = 40;
    let last = stderr.lines().rfind(|l| l.contains("progress: ")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(last.contains(&format!("files {files}/{files} ")), "{last}");
    assert!(last.contains(&format!("write {n}/{n} ", n = 2 * files)), "{last}");
}
