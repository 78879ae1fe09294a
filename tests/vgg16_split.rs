//! VGG16 split for fine-tuning (issue 17, the book's 5.3.3): blocks 1-4 in
//! ONNX Runtime (`models/vgg16_block4.onnx`), block5 in convflow's own
//! layers (`convflow::ml::convnet::vgg16`). Before any training the split
//! must compute what the whole conv base computes, on real photos.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use convflow::ml::convnet::vgg16;
use convflow::ml::convnet::{ConvnetError, LayerSpec};
use convflow::ml::{Device, OnnxModel, Preprocess};

fn model_file(name: &str) -> PathBuf {
    let p = common::root().join("models").join(name);
    assert!(p.exists(), "{} missing: run models/setup.sh", p.display());
    p
}

/// 4 photos of the book's test split, two cats and two dogs, resized to
/// `size` (bilinear) and `caffe`-preprocessed as `onnx_features` does it.
fn photos(data: &Path, size: u32) -> Vec<f32> {
    let mut x = Vec::new();
    for f in ["cats/cat.1500.jpg", "cats/cat.1501.jpg", "dogs/dog.1500.jpg", "dogs/dog.1501.jpg"] {
        let p = data.join("test").join(f);
        let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8();
        let img = image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle);
        Preprocess::Caffe.extend(&img, &mut x);
    }
    x
}

/// The book's fine-tuning head (listing 5.20 after the conv base). Only
/// there because a convnet ends in a sigmoid or softmax dense; these tests
/// read block5's output before it.
fn head() -> Vec<LayerSpec> {
    serde_json::from_str(
        r#"[{"kind": "flatten"}, {"kind": "dense", "units": 256, "activation": "relu"},
            {"kind": "dense", "units": 1, "activation": "sigmoid"}]"#,
    )
    .unwrap()
}

/// (max|a-b| / max|b|, the largest |a-b|/|b| over the elements with
/// |b| >= 1% of max|b|): the first is the check, the second shows no
/// element is far off in relative terms where it is not tiny.
fn relative(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "reference is all zeros: the comparison would prove nothing");
    let max_abs = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let big = a
        .iter()
        .zip(b)
        .filter(|(_, y)| y.abs() >= 0.01 * scale)
        .map(|(x, y)| (x - y).abs() / y.abs())
        .fold(0f32, f32::max);
    (max_abs / scale, big)
}

/// The intermediate `block4_pool` of the whole conv base (`vgg16_notop.onnx`),
/// NHWC, from Python onnxruntime: the Rust side sees only a model's output.
fn notop_block4_pool(x: &[f32], shape: &[usize], dir: &Path) -> (Vec<usize>, Vec<f32>) {
    let (inp, out) = (dir.join("photos.npy"), dir.join("block4_pool.npy"));
    let mut w = convflow::npy::NpyWriter::create(&inp, &shape[1..]).unwrap();
    for r in x.chunks(shape[1..].iter().product()) {
        w.push(r).unwrap();
    }
    w.finish().unwrap();
    let script = r#"
import sys, numpy as np, onnx, onnxruntime as ort
model, inp, out = sys.argv[1:]
m = onnx.load(model)
pool = [n for n in m.graph.node if n.op_type == "MaxPool" and "block4_pool" in n.name]
assert len(pool) == 1, f"{model}: {len(pool)} MaxPool nodes named like block4_pool"
m.graph.output.append(onnx.helper.make_empty_tensor_value_info(pool[0].output[0]))
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
(y,) = s.run([pool[0].output[0]], {"input": np.load(inp)})
np.save(out, y.transpose(0, 2, 3, 1).astype(np.float32))  # ONNX MaxPool is NCHW
"#;
    let status =
        Command::new(common::python()).args(["-c", script]).arg(common::vgg16()).arg(&inp).arg(&out).status().unwrap();
    assert!(status.success(), "reading block4_pool out of vgg16_notop.onnx failed");
    convflow::npy::read_f32(&out).unwrap()
}

#[test]
fn block5_in_the_backend_gives_onnx_runtimes_block5_pool_on_real_photos() {
    let Some(data) = common::shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut block4 = OnnxModel::load(&model_file("vgg16_block4.onnx"), Device::Cpu, 2, false).unwrap();
    let mut notop = OnnxModel::load(&common::vgg16(), Device::Cpu, 2, false).unwrap();
    // 150x150: the book's size, block4 9x9 (odd: the pool floors); 224x224: ImageNet's, 14x14.
    for (size, b4, b5) in [(150usize, 9usize, 4usize), (224, 14, 7)] {
        let x = photos(&data, size as u32);
        let (s4, f4) = block4.run(x.clone(), 4, size, size).unwrap();
        assert_eq!(s4, [4, b4, b4, 512], "vgg16_block4.onnx at {size}x{size}");

        // The cut: block4's output is the whole model's own block4_pool.
        let (sr, r4) = notop_block4_pool(&x, &[4, size, size, 3], dir.path());
        assert_eq!(sr, s4, "vgg16_notop's block4_pool at {size}x{size}");
        let (rel4, _) = relative(&f4, &r4);
        eprintln!("{size}x{size}: vgg16_block4.onnx vs vgg16_notop's block4_pool: max|a-b|/max|b| = {rel4:.2e}");
        assert!(rel4 <= 1e-6, "block4 cut differs from the whole model's block4_pool by {rel4:.2e} of its scale");

        // block5 in the backend, from the safetensors weights, on that output.
        let mut model =
            vgg16::VGG16.with_block5([b4, b4], &head(), &model_file("vgg16_block5.safetensors"), 0, 2).unwrap();
        let ours = model.layer_output(&f4, 4, 4).unwrap();
        let (s5, reference) = notop.run(x, 4, size, size).unwrap();
        assert_eq!(s5, [4, b5, b5, 512], "vgg16_notop.onnx at {size}x{size}");
        let (rel, big) = relative(&ours, &reference);
        let positive = reference.iter().filter(|v| **v > 0.0).count();
        eprintln!(
            "{size}x{size}: block5 (convflow) vs vgg16_notop.onnx: max|a-b|/max|b| = {rel:.2e}, \
             max |a-b|/|b| over |b| >= 1% of max = {big:.2e} (max|b| = {:.1}, {positive} of {} positive)",
            reference.iter().fold(0f32, |m, v| m.max(v.abs())),
            reference.len()
        );
        assert!(rel <= 1e-4, "{size}x{size}: block5 differs from ONNX Runtime's block5_pool by {rel:.2e} of its scale");
        assert!(big <= 1e-3, "{size}x{size}: an element above 1% of the scale is off by {big:.2e} of itself");
    }
}

#[test]
fn block5_weights_of_another_kind_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // A convnet checkpoint's format, with the right tensor names: still refused.
    let bad = dir.path().join("not_block5.safetensors");
    let bias = vec![0u8; 512 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![512], &bias).unwrap();
    let meta = std::collections::HashMap::from([("format".to_string(), "convflow-convnet".to_string())]);
    safetensors::serialize_to_file([("block5_conv1/bias", view)], Some(meta), &bad).unwrap();
    let err = vgg16::VGG16.with_block5([9, 9], &head(), &bad, 0, 1).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConvnetError::File { .. }), "{text}");
    assert!(text.contains("not_block5.safetensors") && text.contains("keras-vgg16-block5"), "{text}");

    // The right format with a tensor missing: named.
    let meta = std::collections::HashMap::from([("format".to_string(), vgg16::BLOCK5_FORMAT.to_string())]);
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![512], &bias).unwrap();
    safetensors::serialize_to_file([("block5_conv1/bias", view)], Some(meta), &bad).unwrap();
    let text = vgg16::VGG16.with_block5([9, 9], &head(), &bad, 0, 1).unwrap_err().to_string();
    assert!(text.contains("not_block5.safetensors") && text.contains("block5_conv1/kernel"), "{text}");
}
