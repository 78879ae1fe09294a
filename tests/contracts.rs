//! Typed facts on every edge (issue 33): what a trained model was trained on
//! is compared with what arrives, by `convflow validate`, before any work;
//! options left `auto` take the model's own values; `convflow graph` shows
//! the facts; the layering the facts made possible holds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

/// A head trained by `dense_head` on the tiny conv base's `caffe` features
/// of the demo photos at 96x96, and the demo data.
fn caffe_head(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    convflow::demo::generate(&data, 7).unwrap();
    let head = dir.join("head");
    let train = format!(
        "stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train, validation]}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [96, 96]}}
  - {{id: batch, kind: batch, input: resize}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, preprocess: caffe, device: cpu}}
  - {{id: head, kind: dense_head, input: features, out_dir: {head}, epochs: 2}}
",
        data = data.display(),
        model = common::tiny_model().display(),
        head = head.display()
    );
    common::run_yaml(&common::write_pipeline(dir, "train.yaml", &train)).unwrap();
    (head, data)
}

fn predict(command: &str, head: &Path, data: &Path, out: &Path, sets: &[&str]) -> Output {
    let mut c = common::bin();
    c.args([command, "pipelines/predict.yaml"]);
    for set in [
        format!("head={}", head.display()),
        format!("input_dir={}", data.join("test").display()),
        format!("out={}", out.display()),
        format!("base={}", common::tiny_model().display()),
        format!("cache_dir={}", out.with_extension("cache").display()),
    ]
    .iter()
    .map(String::as_str)
    .chain(sets.iter().copied())
    {
        c.args(["--set", set]);
    }
    c.output().unwrap()
}

/// The `file:line:col` of `field:` in the stage `id` of a shipped pipeline.
fn position(pipeline: &str, id: &str, field: &str) -> String {
    let text = std::fs::read_to_string(common::root().join(pipeline)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim() == format!("- id: {id}")).unwrap();
    let (n, line) =
        lines.iter().enumerate().skip(start).find(|(_, l)| l.trim_start().starts_with(&format!("{field}:"))).unwrap();
    format!("{pipeline}:{}:{}", n + 1, line.find(field).unwrap() + 1)
}

#[test]
fn predict_refuses_a_head_of_other_preprocessing_or_size_before_any_work_and_auto_takes_the_heads() {
    let tmp = tempfile::tempdir().unwrap();
    let (head, data) = caffe_head(tmp.path());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(head.join("head.json")).unwrap()).unwrap();
    let trained_on = &record["trained_on"];
    assert_eq!(trained_on["features"]["preprocess"], "caffe", "{record}");
    assert_eq!(trained_on["features"]["model"], "tiny_vgg.onnx", "{record}");
    assert_eq!(trained_on["image_size"], serde_json::json!([96, 96]), "{record}");
    assert!(trained_on["features"]["shape"].is_array() && trained_on["features"]["model_blake3"].is_string());

    let out = tmp.path().join("predictions.csv");
    let at = position("pipelines/predict.yaml", "classify", "head");
    // The README's scenario: a caffe head, predictions made on rescale features.
    let o = predict("validate", &head, &data, &out, &["preprocess=rescale"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&at) && err.contains("stage `classify`") && err.contains("field `head`"), "{err}");
    assert!(err.contains("trained on caffe features of tiny_vgg.onnx"), "{err}");
    assert!(err.contains("this edge carries rescale features of tiny_vgg.onnx"), "{err}");
    // The same refusal stops `run` before any image is read.
    let o = predict("run", &head, &data, &out, &["preprocess=rescale"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists() && !out.with_extension("cache").exists(), "nothing was computed or written");

    // Trained at 96x96, used at 64x64: both sizes named.
    let o = predict("validate", &head, &data, &out, &["image_size=64"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&at) && err.contains("of 96x96 images") && err.contains("of 64x64 images"), "{err}");

    // Left `auto` (the shipped default): the head's preprocessing and size.
    let o = predict("graph", &head, &data, &out, &[]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("images 96x96x3") && text.contains("caffe features of tiny_vgg.onnx"), "{text}");
    let o = predict("run", &head, &data, &out, &["image_size=96", "preprocess=caffe"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let explicit = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    let o = predict("run", &head, &data, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), explicit, "auto gives the head's own settings");
    assert_eq!(explicit.lines().count(), 1 + 40);
}

#[test]
fn a_head_of_another_model_file_is_refused_by_its_content_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let (head, data) = caffe_head(tmp.path());
    // Same name, other bytes: an edited copy of the model.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let copy = other.join("tiny_vgg.onnx");
    // The same graph with one more `doc_string` (ModelProto field 6): a valid model, other bytes.
    let mut bytes = std::fs::read(common::tiny_model()).unwrap();
    bytes.extend_from_slice(&[0x32, 3, b'a', b'b', b'c']);
    std::fs::write(&copy, bytes).unwrap();
    let out = tmp.path().join("p.csv");
    let mut c = common::bin();
    c.args(["validate", "pipelines/predict.yaml"]);
    for set in [
        format!("head={}", head.display()),
        format!("input_dir={}", data.join("test").display()),
        format!("base={}", copy.display()),
        format!("out={}", out.display()),
    ] {
        c.args(["--set", &set]);
    }
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("another model") && err.contains("blake3"), "{err}");
}

#[test]
fn a_description_of_a_newer_convflow_is_a_clear_error_and_an_older_one_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let (head, data) = caffe_head(tmp.path());
    let out = tmp.path().join("p.csv");
    let file = head.join("head.json");
    let mut record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();

    // Before `trained_on` existed: read from the stages it lists.
    let trained_on = record.as_object_mut().unwrap().remove("trained_on").unwrap();
    std::fs::write(&file, record.to_string()).unwrap();
    let o = predict("validate", &head, &data, &out, &["preprocess=rescale"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("trained on caffe features of tiny_vgg.onnx"), "{err}");
    let o = predict("validate", &head, &data, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A version this convflow does not know.
    let mut newer = trained_on.clone();
    newer["version"] = 2.into();
    record["trained_on"] = newer;
    std::fs::write(&file, record.to_string()).unwrap();
    let o = predict("validate", &head, &data, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("head.json") && err.contains("version 2"), "{err}");
}

#[test]
fn graph_shows_what_flows_on_each_edge_as_text_and_dot() {
    let tmp = tempfile::tempdir().unwrap();
    convflow::demo::generate(tmp.path(), 1).unwrap();
    let data = format!("data_dir={}", tmp.path().display());
    let o = common::bin().args(["graph", "pipelines/extract_features.yaml", "--set", &data]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in [
        "files (file_reader)",
        "=> bytes; labels binary [cats, dogs]; splits train, validation, test",
        "resize (resize) <- decode",
        "images 150x150x3; resized nearest",
        "rescale features of vgg16_notop.onnx at [4, 4, 512]",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    let o = common::bin().args(["graph", "--dot", "pipelines/extract_features.yaml", "--set", &data]).output().unwrap();
    let dot = String::from_utf8_lossy(&o.stdout);
    assert!(dot.starts_with("digraph") && dot.contains("rescale features of vgg16_notop.onnx at [4, 4, 512]"), "{dot}");
}

/// `--set base=NAME` on the pipelines that extract features: the image size
/// and the preprocessing follow the base unless given (VGG16 keeps the
/// book's x/255 at 150x150); the augmented pipeline's training branch, whose
/// resize is three stages before the base, gets the size too.
#[test]
fn the_base_param_sets_the_size_and_preprocessing_unless_given() {
    let model = common::root().join("models/mobilenet_notop.onnx");
    if !model.exists() {
        assert!(std::env::var_os("CI").is_none(), "tests/setup.sh runs models/bases.sh mobilenet");
        eprintln!("skipping: {} not present (models/bases.sh mobilenet)", model.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    convflow::demo::generate(tmp.path(), 1).unwrap();
    let data = format!("data_dir={}", tmp.path().display());
    let graph = |pipeline: &str, sets: &[&str]| {
        let mut c = common::bin();
        c.args(["graph", pipeline, "--set", &data]);
        for s in sets {
            c.args(["--set", s]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let cases: &[(&[&str], &str, &str)] = &[
        (&[], "images 150x150x3", "rescale features of vgg16_notop.onnx at [4, 4, 512]"),
        (&["base=mobilenet"], "images 224x224x3", "tf features of mobilenet_notop.onnx at [7, 7, 1024]"),
        (&["base=models/mobilenet_notop.onnx"], "images 224x224x3", "tf features of mobilenet_notop.onnx"),
        (
            &["base=mobilenet", "image_size=160"],
            "images 160x160x3",
            "tf features of mobilenet_notop.onnx at [5, 5, 1024]",
        ),
        (&["base=mobilenet", "preprocess=caffe"], "images 224x224x3", "caffe features of mobilenet_notop.onnx"),
        (
            &["base=vgg16", "preprocess=caffe", "image_size=224"],
            "images 224x224x3",
            "caffe features of vgg16_notop.onnx at [7, 7, 512]",
        ),
    ];
    for (sets, size, features) in cases {
        for pipeline in ["pipelines/extract_features.yaml", "pipelines/augmented_end_to_end.yaml"] {
            let text = graph(pipeline, sets);
            assert!(
                text.contains(size) && text.contains(features),
                "{pipeline} {sets:?}: {size}, {features} in\n{text}"
            );
            assert!(
                !text.contains("150x150x3") || size.contains("150"),
                "{pipeline} {sets:?}: an edge kept 150\n{text}"
            );
        }
    }
}

#[test]
fn every_shipped_pipeline_validates() {
    for e in std::fs::read_dir(common::root().join("pipelines")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        // The file alone: the inputs (trained models, data) are other runs' outputs.
        let o = common::bin().arg("validate").arg("--no-environment").arg(&path).output().unwrap();
        assert!(o.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&o.stderr));
    }
}

/// `graph` checks pipelines without running stages: it knows the stage API
/// and the facts, not the built-in stages.
#[test]
fn the_graph_imports_nothing_from_the_built_in_stages_and_no_json_passes_between_stages() {
    let src = common::root().join("src");
    for file in ["graph/mod.rs", "facts.rs", "stage/mod.rs", "stage/registry.rs"] {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        assert!(!text.contains("crate::stages"), "{file} imports the built-in stages");
    }
    let api = std::fs::read_to_string(src.join("stage/mod.rs")).unwrap();
    let context = &api[api.find("pub struct BuildContext").unwrap()..];
    let context = &context[..context.find("\n}").unwrap()];
    assert!(!context.contains("serde_json"), "BuildContext passes JSON:\n{context}");
}
