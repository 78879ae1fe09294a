//! A convnet trained by the `convnet` stage and exported by
//! `models/export_convnet.py` gives, in Python onnxruntime on the same
//! resized pixels, the probabilities `convnet_predict` writes: for a
//! sigmoid (binary) and a softmax (categorical) head on RGB images, and for
//! a 1-channel model on MNIST digits. The layers are chosen where an export
//! goes wrong: `same` padding with an odd total (Keras puts the extra row
//! and column at the bottom/right), a strided `same` conv, a `valid` conv
//! with unequal strides, pooling that drops the last row/column (floor),
//! a non-square input (height and width cannot be swapped unnoticed), a
//! flatten that must see NHWC, and dropout (the identity at inference).
//!
//! Tolerance: 1e-5 absolute on each probability. The CSV prints 6
//! decimals (rounding: at most 5e-7); both sides compute in float32 with
//! different summation orders (gemm's im2col GEMM vs ONNX Runtime's Conv),
//! ~1e-7 relative on logits of order 1, and a probability moves at most a
//! quarter as much as its logit. Absolute, not relative: the CSV's fixed
//! decimals make small probabilities meaningless in relative terms. A
//! wrong padding side or flatten order moves them by 1e-2 and more.
//! A model file the exporter cannot read is refused, naming the file and
//! the layer; an image that does not fit the model stops `convnet_predict`.

mod common;

use std::path::Path;
use std::process::Command;

use convflow::imaging::decode::decode_image;
use convflow::imaging::resize::{Filter, Resize};
use convflow::ml::Preprocess;

/// The model's input: height 31, width 29 (odd, and not square).
const H: u32 = 31;
const W: u32 = 29;

/// Layers ahead of the last one. On [31, 29, 3]: same conv, kernel [4, 2]
/// (pads top 1 / bottom 2, left 0 / right 1) -> [31, 29, 4]; pool 3 ->
/// [10, 9, 4] (the last row and 2 columns dropped); valid conv 3, strides
/// [1, 2] -> [8, 4, 6]; same conv 3, strides 2 (pads 0 / 1 each way) ->
/// [4, 2, 5]; pool [2, 1] strides 1 -> [3, 2, 5]; flatten -> 30.
const LAYERS: &str = "
      - {kind: conv2d, filters: 4, kernel_size: [4, 2], padding: same, activation: relu}
      - {kind: max_pooling2d, pool_size: 3}
      - {kind: conv2d, filters: 6, kernel_size: 3, strides: [1, 2], activation: tanh}
      - {kind: conv2d, filters: 5, kernel_size: 3, strides: 2, padding: same, activation: relu}
      - {kind: max_pooling2d, pool_size: [2, 1], strides: 1}
      - {kind: flatten}
      - {kind: dropout, rate: 0.5}
      - {kind: dense, units: 8, activation: relu}";

/// Trains the layers above plus `last` on the demo data's train and validation splits.
fn train(dir: &Path, data: &Path, out: &Path, class_mode: &str, last: &str) {
    let yaml = format!(
        "stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train, validation], class_mode: {class_mode}}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [{H}, {W}]}}
  - id: net
    kind: convnet
    input: resize
    out_dir: {out}
    rescale: 0.00392156862745098
    epochs: 4
    batch_size: 8
    threads: 2
    optimizer: {{name: adam, learning_rate: 3.0e-3}}
    layers:{LAYERS}
      - {last}
",
        data = data.display(),
        out = out.display()
    );
    common::run_yaml(&common::write_pipeline(dir, "train.yaml", &yaml)).unwrap();
}

fn export(model_dir: &Path) -> std::process::Output {
    Command::new(common::python()).arg(common::root().join("models/export_convnet.py")).arg(model_dir).output().unwrap()
}

/// (header, paths, per-class probabilities, predicted class) of a predictions CSV.
struct Csv {
    header: Vec<String>,
    paths: Vec<String>,
    probs: Vec<Vec<f32>>,
    predicted: Vec<String>,
}

fn read_csv(path: &Path) -> Csv {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(str::to_string).collect();
    let mut csv = Csv { header, paths: Vec::new(), probs: Vec::new(), predicted: Vec::new() };
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        csv.paths.push(f[0].to_string());
        csv.probs.push(f[1..f.len() - 1].iter().map(|v| v.parse().unwrap()).collect());
        csv.predicted.push(f[f.len() - 1].to_string());
    }
    csv
}

/// ONNX Runtime's probabilities against the CSV's, column by column (a
/// single sigmoid unit is the second column; the first is its complement).
/// Returns the largest absolute difference.
fn compare(csv: &Csv, ort: &[f32], outputs: usize, classes: &[&str]) -> f32 {
    assert_eq!(ort.len(), csv.paths.len() * outputs);
    let mut worst = 0f32;
    for (i, (row, p)) in csv.probs.iter().zip(ort.chunks(outputs)).enumerate() {
        let want: Vec<f32> = if outputs == 1 { vec![1.0 - p[0], p[0]] } else { p.to_vec() };
        assert_eq!(row.len(), want.len());
        for (got, want) in row.iter().zip(&want) {
            worst = worst.max((got - want).abs());
        }
        let best = want.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let runner_up = want.iter().enumerate().filter(|(j, _)| *j != best).map(|(_, v)| *v).fold(0f32, f32::max);
        // A near tie may fall either way between the two; otherwise the label must agree.
        if want[best] - runner_up > 1e-5 {
            assert_eq!(csv.predicted[i], classes[best], "{}", csv.paths[i]);
        }
    }
    worst
}

fn metadata_classes(model: &Path) -> String {
    let o = Command::new(common::python())
        .args(["-c", "import onnx, sys; m = onnx.load(sys.argv[1]); print({p.key: p.value for p in m.metadata_props}['classes'])"])
        .arg(model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn exported_convnets_give_convnet_predicts_probabilities() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 21).unwrap();
    let test_dir = data.join("test");
    let mut worst_all = 0f32;
    for (mode, last, outputs) in [
        ("binary", "{kind: dense, units: 1, activation: sigmoid}", 1),
        ("categorical", "{kind: dense, units: 2, activation: softmax}", 2),
    ] {
        let model = tmp.path().join(mode);
        train(tmp.path(), &data, &model, mode, last);
        let o = export(&model);
        assert!(o.status.success(), "export_convnet.py: {}", String::from_utf8_lossy(&o.stderr));
        let onnx = model.join("classifier.onnx");
        assert_eq!(metadata_classes(&onnx), r#"["cats", "dogs"]"#);

        let out = tmp.path().join(format!("{mode}.csv"));
        let predict = format!(
            "stages:
  - {{id: files, kind: file_reader, dir: {test}, class_mode: none}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [{H}, {W}]}}
  - {{id: classify, kind: convnet_predict, input: resize, model: {model}, out: {out}, threads: 2}}
",
            test = test_dir.display(),
            model = model.display(),
            out = out.display()
        );
        let report = common::run_yaml(&common::write_pipeline(tmp.path(), "predict.yaml", &predict)).unwrap();
        assert_eq!(common::detail(&report, "classify", "predictions"), 40);
        let csv = read_csv(&out);
        assert_eq!(csv.header, ["path", "p_cats", "p_dogs", "predicted"]);
        assert_eq!(csv.paths.len(), 40, "every test image has its line");

        // The same resized pixels, raw 0..255: the classifier rescales itself.
        let mut resize = Resize::new(H, W, Filter::Nearest);
        let mut pixels = Vec::new();
        for p in &csv.paths {
            let img = decode_image(&std::fs::read(p).unwrap(), u64::MAX).unwrap();
            Preprocess::None.extend(&resize.apply(img).unwrap(), &mut pixels);
        }
        let (shape, ort) = common::python_reference(&onnx, &[40, H as usize, W as usize, 3], &pixels, tmp.path());
        assert_eq!(shape, vec![40, outputs]);
        let worst = compare(&csv, &ort, outputs, &["cats", "dogs"]);
        // Trained, not stuck at 0.5: the comparison has something to see.
        let spread = csv.probs.iter().map(|r| (r[1] - 0.5).abs()).fold(0f32, f32::max);
        eprintln!("{mode}: max |onnxruntime - convnet_predict| = {worst:e} over 40 images (max |p - 0.5| = {spread})");
        assert!(spread > 0.1, "{mode}: the model barely trained (max |p - 0.5| = {spread})");
        assert!(worst < 1e-5, "{mode}: classifier.onnx differs from convnet_predict by {worst}");
        worst_all = worst_all.max(worst);
    }
    eprintln!("max difference, both heads: {worst_all:e}");
}

#[test]
fn a_grayscale_model_on_mnist_digits_exports_too() {
    let Some(mnist) = common::mnist() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let split = |name: &str, stem: &str, limit: usize| {
        format!(
            "      - {{name: {name}, images: {d}/{stem}-images-idx3-ubyte, labels: {d}/{stem}-labels-idx1-ubyte, limit: {limit}}}\n",
            d = mnist.display()
        )
    };
    // [28, 28, 1]: same conv kernel 4 (pads 1 / 2), pool 3 (28 -> 9, a row dropped).
    let train = format!(
        "stages:
  - id: digits
    kind: idx_reader
    splits:
{train}    class_mode: categorical
  - id: net
    kind: convnet
    input: digits
    out_dir: {model}
    rescale: 0.00392156862745098
    epochs: 2
    batch_size: 16
    threads: 2
    layers:
      - {{kind: conv2d, filters: 4, kernel_size: 4, padding: same, activation: relu}}
      - {{kind: max_pooling2d, pool_size: 3}}
      - {{kind: flatten}}
      - {{kind: dense, units: 10, activation: softmax}}
",
        train = split("train", "train", 300),
        model = model.display()
    );
    common::run_yaml(&common::write_pipeline(tmp.path(), "train.yaml", &train)).unwrap();
    let o = export(&model);
    assert!(o.status.success(), "export_convnet.py: {}", String::from_utf8_lossy(&o.stderr));

    let n = 30;
    let out = tmp.path().join("digits.csv");
    let predict = format!(
        "stages:
  - id: digits
    kind: idx_reader
    splits:
{test}  - {{id: classify, kind: convnet_predict, input: digits, model: {model}, out: {out}}}
",
        test = split("test", "t10k", n),
        model = model.display(),
        out = out.display()
    );
    common::run_yaml(&common::write_pipeline(tmp.path(), "predict.yaml", &predict)).unwrap();
    let csv = read_csv(&out);
    assert_eq!(csv.paths.len(), n);
    assert_eq!(csv.header.len(), 12, "path, p_0..p_9, predicted");

    // The digits' raw bytes (IDX: a 16-byte header, then 28x28 per image),
    // in the CSV's order (each path ends in #index).
    let raw = std::fs::read(mnist.join("t10k-images-idx3-ubyte")).unwrap();
    let mut pixels = Vec::new();
    for p in &csv.paths {
        let i: usize = p.rsplit_once('#').unwrap().1.parse().unwrap();
        pixels.extend(raw[16 + i * 784..16 + (i + 1) * 784].iter().map(|&b| f32::from(b)));
    }
    let onnx = model.join("classifier.onnx");
    let (shape, ort) = common::python_reference(&onnx, &[n, 28, 28, 1], &pixels, tmp.path());
    assert_eq!(shape, vec![n, 10]);
    let classes: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    let classes: Vec<&str> = classes.iter().map(String::as_str).collect();
    let worst = compare(&csv, &ort, 10, &classes);
    eprintln!("grayscale: max |onnxruntime - convnet_predict| = {worst:e} over {n} digits");
    assert!(worst < 1e-5, "classifier.onnx differs from convnet_predict by {worst}");
}

#[test]
fn images_that_do_not_fit_stop_convnet_predict_naming_stage_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 5).unwrap();
    let model = tmp.path().join("model");
    train(tmp.path(), &data, &model, "binary", "{kind: dense, units: 1, activation: sigmoid}");
    let test_dir = data.join("test");
    let out = tmp.path().join("never.csv");
    let run = |resize: &str| {
        let (resize, input) = if resize.is_empty() {
            (String::new(), "decode")
        } else {
            (format!("  - {{id: resize, kind: resize, input: decode, size: {resize}}}\n"), "resize")
        };
        let yaml = format!(
            "stages:
  - {{id: files, kind: file_reader, dir: {test}, class_mode: none}}
  - {{id: decode, kind: decode, input: files}}
{resize}  - {{id: classify, kind: convnet_predict, input: {input}, model: {model}, out: {out}}}
",
            test = test_dir.display(),
            model = model.display(),
            out = out.display()
        );
        let p = common::write_pipeline(tmp.path(), "bad.yaml", &yaml);
        let o = common::bin().args(["run", "-q"]).arg(&p).output().unwrap();
        assert!(!o.status.success(), "a run with images that do not fit succeeded");
        assert!(!out.exists() && !tmp.path().join("never.csv.partial").exists(), "no predictions written");
        String::from_utf8_lossy(&o.stderr).to_string()
    };

    // Resized upstream to another size: refused before any work (by validation, issue 33).
    let err = run("[32, 32]");
    assert!(err.contains("classify") && err.contains("[32, 32, 3]") && err.contains("[31, 29, 3]"), "{err}");

    // Images as they are (the demo's vary in size): the first one stops it.
    let err = run("");
    let sizes: Vec<String> = std::fs::read_dir(test_dir.join("cats"))
        .unwrap()
        .chain(std::fs::read_dir(test_dir.join("dogs")).unwrap())
        .map(|e| {
            let img = decode_image(&std::fs::read(e.unwrap().path()).unwrap(), u64::MAX).unwrap();
            format!("has shape [{}, {}, 3]", img.height(), img.width())
        })
        .collect();
    assert!(err.contains("classify") && err.contains("[31, 29, 3]"), "{err}");
    assert!(sizes.iter().any(|s| err.contains(s.as_str())), "no image's shape in: {err}");
}

#[test]
fn export_refuses_a_layer_it_cannot_export_naming_file_and_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 5).unwrap();
    let model = tmp.path().join("model");
    train(tmp.path(), &data, &model, "binary", "{kind: dense, units: 1, activation: sigmoid}");

    // A layer kind convflow may learn later, written into the file's layer
    // list (an 8-byte header length, the JSON header, then the data).
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut layers: Vec<serde_json::Value> =
        serde_json::from_str(header["__metadata__"]["layers"].as_str().unwrap()).unwrap();
    layers.insert(2, serde_json::json!({"kind": "batch_normalization"}));
    header["__metadata__"]["layers"] = serde_json::Value::String(serde_json::to_string(&layers).unwrap());
    let text = serde_json::to_vec(&header).unwrap();
    let mut edited = (text.len() as u64).to_le_bytes().to_vec();
    edited.extend(&text);
    edited.extend(&bytes[8 + n..]);
    std::fs::write(&file, edited).unwrap();

    let o = export(&model);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("model.safetensors") && err.contains("layers[2]") && err.contains("batch_normalization"),
        "{err}"
    );
    assert!(!err.contains("Traceback"), "a clear message, not a crash: {err}");
    assert!(!model.join("classifier.onnx").exists());
}
