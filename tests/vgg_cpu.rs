//! The `winograd` engine (`convflow::ml::vgg_cpu`) against ONNX Runtime's
//! float32 on the book's photos: within 1e-4 of each image's largest
//! feature, at the sizes where Winograd's 6x6 tiles overhang the maps, on
//! the AVX2 path (forced, also on an AVX-512 machine) and on the best path
//! this CPU has. And what it must refuse: any file that is not a plain VGG.

mod common;

use std::path::Path;

use convflow::ml::vgg_cpu::{Isa, VggCpu};
use convflow::ml::{Device, OnnxModel, Preprocess};

/// `count` photos of the book's test split (cats and dogs alternating),
/// resized to `h` x `w` (bilinear) and preprocessed.
fn photos(data: &Path, count: usize, h: u32, w: u32, mode: Preprocess) -> Vec<f32> {
    let mut x = Vec::new();
    for i in 0..count {
        let f = if i % 2 == 0 { format!("cats/cat.{}.jpg", 1500 + i) } else { format!("dogs/dog.{}.jpg", 1500 + i) };
        let p = data.join("test").join(f);
        let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8();
        let img = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
        mode.extend(&img, &mut x);
    }
    x
}

/// The paths to check: AVX2 forced, and the best one when it is another.
fn isas() -> Vec<Isa> {
    let mut v = Vec::new();
    if Isa::Avx2.available() {
        v.push(Isa::Avx2);
    }
    if Isa::detect() != Isa::Avx2 {
        v.push(Isa::detect());
    }
    eprintln!("paths checked: {:?} (AVX-512 on this CPU: {})", v, Isa::Avx512.available());
    v
}

fn worst_per_image(got: &[f32], want: &[f32], per_image: usize) -> f32 {
    got.chunks(per_image)
        .zip(want.chunks(per_image))
        .map(|(g, w)| {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "ORT's features are all zero: the comparison would prove nothing");
            g.iter().zip(w).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
        })
        .fold(0f32, f32::max)
}

fn check_model(model: &Path, sizes: &[(u32, u32)], count: usize, modes: &[Preprocess]) {
    let Some(data) = common::shared_data() else { return };
    let mut ort = OnnxModel::load(model, Device::Cpu, 2, false).unwrap();
    for isa in isas() {
        let engine = VggCpu::load(model, 2, Some(isa)).unwrap();
        assert_eq!(engine.isa(), isa);
        for &(h, w) in sizes {
            for &mode in modes {
                let x = photos(&data, count, h, w, mode);
                let (shape, want) = ort.run(x.clone(), count, h as usize, w as usize).unwrap();
                let (got_shape, got) = engine.run(&x, count, h as usize, w as usize).unwrap();
                assert_eq!(got_shape, shape, "{isa:?} {h}x{w}");
                let worst = worst_per_image(&got, &want, want.len() / count);
                eprintln!("{} {isa:?} {h}x{w} {mode:?}: max |diff| / max |ORT| = {worst:.2e}", model.display());
                assert!(worst <= 1e-4, "{isa:?} {h}x{w} {mode:?}: {worst:e} > 1e-4");
            }
        }
    }
}

#[test]
fn vgg16_features_match_onnx_runtime_within_1e4_on_photos() {
    let sizes = [(150, 150), (224, 224), (37, 91), (33, 33), (32, 47)];
    check_model(&common::vgg16(), &sizes, 4, &[Preprocess::Caffe, Preprocess::Rescale]);
}

/// Another plain VGG than VGG16, read from its own file: the engine
/// computes what the file says, not VGG16.
#[test]
fn other_plain_vgg_files_are_run_as_they_are() {
    check_model(&common::tiny_model(), &[(150, 150), (37, 91)], 2, &[Preprocess::Rescale]);
    let block4 = common::root().join("models/vgg16_block4.onnx");
    if block4.exists() {
        check_model(&block4, &[(150, 150)], 2, &[Preprocess::Caffe]);
    }
    // VGG19 is set up on demand (models/bases.sh vgg19).
    let vgg19 = common::root().join("models/vgg19_notop.onnx");
    if vgg19.exists() {
        check_model(&vgg19, &[(150, 150), (37, 91)], 2, &[Preprocess::Caffe]);
    } else {
        eprintln!("VGG19 not checked: models/bases.sh vgg19 sets it up");
    }
}

/// Variants of the tiny VGG that compute something else must be refused,
/// each with what differs.
#[test]
fn files_that_are_not_a_plain_vgg_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
import sys, onnx
from onnx import helper
src, out = sys.argv[1], sys.argv[2]
def variant(name, edit):
    m = onnx.load(src)
    edit(m.graph)
    onnx.save(m, f"{out}/{name}.onnx")
def stride(g):
    c = [n for n in g.node if n.op_type == "Conv"][1]
    for a in c.attribute:
        if a.name == "strides": a.ints[:] = [2, 2]
    else: c.attribute.append(helper.make_attribute("strides", [2, 2]))
def sigmoid(g):
    [n for n in g.node if n.op_type == "Relu"][0].op_type = "Sigmoid"
def pad(g):
    c = [n for n in g.node if n.op_type == "Conv"][0]
    for a in c.attribute:
        if a.name == "pads": a.ints[:] = [0, 0, 0, 0]
def ceil(g):
    [n for n in g.node if n.op_type == "MaxPool"][0].attribute.append(helper.make_attribute("ceil_mode", 1))
variant("stride", stride); variant("sigmoid", sigmoid); variant("pad", pad); variant("ceil", ceil)
"#;
    let o = std::process::Command::new(common::python())
        .args(["-c", script])
        .arg(common::tiny_model())
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (name, says) in [("stride", "3x3 conv"), ("sigmoid", "Sigmoid"), ("pad", "3x3 conv"), ("ceil", "MaxPool")] {
        let e = VggCpu::load(&tmp.path().join(format!("{name}.onnx")), 1, None)
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted"));
        let msg = e.to_string();
        assert!(msg.contains(says) && msg.contains("not a plain VGG"), "{name}: {msg}");
    }
    // Not ONNX at all.
    std::fs::write(tmp.path().join("junk.onnx"), b"\x0a\xff\xff\xff").unwrap();
    assert!(VggCpu::load(&tmp.path().join("junk.onnx"), 1, None).is_err());
}
