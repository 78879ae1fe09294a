//! `convflow visualize` (the book's section 5.4) on VGG16's ImageNet weights
//! and on a trained convnet:
//!
//! - activations: every conv and pooling layer's maps of a real photo
//!   equal ONNX Runtime's intermediate outputs of the same model
//!   (`models/ort_layer_outputs.py`), within 1e-5 of each layer's largest
//!   value. Relative to the layer's scale, not absolute: VGG16's block4
//!   maps reach the thousands, where float32 itself is ~1e-4 apart, and
//!   both sides sum in float32 in different orders (gemm's im2col GEMM,
//!   ONNX Runtime's Conv); a wrong kernel layout or padding side moves
//!   them by 1e-1 and more.
//! - filter patterns: the gradient of a filter's mean activation w.r.t.
//!   the image agrees with central differences; over the 40 steps every
//!   filter's mean activation rises; the patterns differ from one another
//!   and from the noise they start from.

mod common;

use std::path::{Path, PathBuf};

use convflow::ml::convnet::vgg16::{VGG16, VGG19};
use convflow::visualize::filters::{self, Ascent};

fn weights() -> PathBuf {
    let p = common::root().join("models/vgg16_convs.safetensors");
    assert!(p.exists(), "{} missing: run models/setup.sh (the README's test command does)", p.display());
    p
}

fn npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    convflow::npy::read_f32(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `convflow visualize activations PHOTO --npy` into `out`, of VGG16 or of `model`.
fn activations(photo: &Path, model: Option<&Path>, out: &Path) {
    let mut cmd = common::bin();
    cmd.args(["visualize", "activations"]).arg(photo).arg("--out").arg(out).args(["--npy", "--threads", "2"]);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The worst |ours - ort| / max|ort| over the layers `out` holds, against
/// `ort_layer_outputs.py` of `onnx` on `input`; the layers' names in order.
fn against_onnx_runtime(out: &Path, onnx: &Path, input: &Path) -> Vec<(String, f32)> {
    let reference = out.join("ort");
    let o = std::process::Command::new(common::python())
        .arg(common::root().join("models/ort_layer_outputs.py"))
        .arg(onnx)
        .arg(input)
        .arg(&reference)
        .output()
        .unwrap();
    assert!(o.status.success(), "ort_layer_outputs.py: {}", String::from_utf8_lossy(&o.stderr));
    let mut ours: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "npy") && !p.ends_with("input.npy"))
        .collect();
    ours.sort();
    let refs = std::fs::read_dir(&reference).unwrap().count();
    assert_eq!(ours.len(), refs, "convflow wrote {} layers, onnxruntime has {refs}", ours.len());
    ours.iter()
        .enumerate()
        .map(|(i, p)| {
            let (shape, a) = npy(p);
            let (rshape, b) = npy(&reference.join(format!("{i:02}.npy")));
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            assert_eq!(shape[0], 1, "{name}: one image");
            assert_eq!(shape[1..], rshape, "{name}: shapes");
            // Each PNG beside its maps.
            assert!(p.with_extension("png").is_file(), "{name}.png missing");
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{name}: all zero: nothing compared");
            let worst = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            (name, worst / scale)
        })
        .collect()
}

#[test]
fn vgg16_activations_equal_onnx_runtimes_intermediate_outputs() {
    let Some(data) = common::shared_data() else { return };
    let photo = data.join("test/cats/cat.1700.jpg");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("act");
    activations(&photo, None, &out);
    let (shape, _) = npy(&out.join("input.npy"));
    assert_eq!(shape, [1, 150, 150, 3]);
    let layers = against_onnx_runtime(&out, &common::vgg16(), &out.join("input.npy"));
    let names: Vec<&str> = layers.iter().map(|(n, _)| n.split_once('_').unwrap().1).collect();
    assert_eq!(names, VGG16.layers(), "one picture per layer, in order");
    for (name, rel) in &layers {
        eprintln!("{name}: max|diff| / max|ort| = {rel:e}");
        assert!(*rel <= 1e-5, "{name}: {rel:e}");
    }
}

/// VGG19 (`models/bases.sh vgg19` writes its ONNX base and the same weights
/// for convflow's own layers from Keras's file): every layer's maps equal
/// ONNX Runtime's, and its filters are drawn from its own convs.
#[test]
fn vgg19_activations_equal_onnx_runtimes_and_its_filters_are_drawn() {
    let Some(data) = common::shared_data() else { return };
    let onnx = common::root().join("models/vgg19_notop.onnx");
    if !onnx.exists() || !common::root().join(VGG19.weights).exists() {
        assert!(std::env::var_os("CI").is_none(), "tests/setup.sh runs models/bases.sh vgg19");
        eprintln!("skipping: models/bases.sh vgg19 has not run");
        return;
    }
    let photo = data.join("test/dogs/dog.1600.jpg");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("act");
    activations(&photo, Some(Path::new("vgg19")), &out);
    let layers = against_onnx_runtime(&out, &onnx, &out.join("input.npy"));
    let names: Vec<&str> = layers.iter().map(|(n, _)| n.split_once('_').unwrap().1).collect();
    assert_eq!(names, VGG19.layers(), "one picture per layer, in order");
    assert_eq!(names.len(), 21);
    assert!(names.contains(&"block5_conv4"));
    for (name, rel) in &layers {
        eprintln!("{name}: max|diff| / max|ort| = {rel:e}");
        assert!(*rel <= 1e-5, "{name}: {rel:e}");
    }
    let png = tmp.path().join("f/block4_conv4.png");
    let o = common::bin()
        .args(["visualize", "filters", "--model", "vgg19", "--layer", "block4_conv4", "--filters", "2"])
        .args(["--size", "32", "--steps", "3", "--threads", "2", "--out"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(png.is_file() && png.with_extension("csv").is_file());
    // VGG16 has no block4_conv4: named, with the layers it has.
    let o = common::bin()
        .args(["visualize", "filters", "--layer", "block4_conv4", "--filters", "2", "--out"])
        .arg(tmp.path().join("g.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not one of vgg16's convs") && err.contains("block5_conv3"), "{err}");
}

#[test]
fn a_trained_convnets_activations_equal_those_of_its_onnx_export() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    convflow::demo::generate(&data, 6).unwrap();
    let model = tmp.path().join("model");
    let yaml = format!(
        "stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train], class_mode: binary}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [33, 30]}}
  - id: net
    kind: convnet
    input: resize
    out_dir: {model}
    rescale: 0.00392156862745098
    epochs: 1
    batch_size: 4
    threads: 2
    layers:
      - {{kind: conv2d, filters: 6, kernel_size: 3, activation: relu}}
      - {{kind: max_pooling2d, pool_size: 2}}
      - {{kind: conv2d, filters: 5, kernel_size: 3, padding: same, activation: tanh}}
      - {{kind: max_pooling2d, pool_size: 2}}
      - {{kind: flatten}}
      - {{kind: dense, units: 1, activation: sigmoid}}
",
        data = data.display(),
        model = model.display()
    );
    common::run_yaml(&common::write_pipeline(tmp.path(), "train.yaml", &yaml)).unwrap();
    let o = std::process::Command::new(common::python())
        .arg(common::root().join("models/export_convnet.py"))
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "export_convnet.py: {}", String::from_utf8_lossy(&o.stderr));
    let photo = std::fs::read_dir(data.join("test/cats")).unwrap().next().unwrap().unwrap().path();
    let out = tmp.path().join("act");
    activations(&photo, Some(&model), &out);
    // The export takes raw pixels and rescales them itself.
    let (shape, x) = npy(&out.join("input.npy"));
    assert_eq!(shape, [1, 33, 30, 3]);
    let raw: Vec<f32> = x.iter().map(|v| (v * 255.0).round()).collect();
    let mut w = convflow::npy::NpyWriter::create(&tmp.path().join("raw.npy"), &shape[1..]).unwrap();
    w.push(&raw).unwrap();
    w.finish().unwrap();
    let layers = against_onnx_runtime(&out, &model.join("classifier.onnx"), &tmp.path().join("raw.npy"));
    let names: Vec<&str> = layers.iter().map(|(n, _)| n.split_once('_').unwrap().1).collect();
    assert_eq!(names, ["conv2d", "max_pooling2d", "conv2d_1", "max_pooling2d_1"]);
    for (name, rel) in &layers {
        eprintln!("{name}: max|diff| / max|ort| = {rel:e}");
        assert!(*rel <= 1e-5, "{name}: {rel:e}");
    }
}

#[test]
fn a_filters_input_gradient_agrees_with_finite_differences() {
    // block2_conv1 of VGG16 on a 24x24 image: the gradient crosses two
    // convs, a pool and their ReLUs.
    let layer = VGG16.layers().iter().position(|l| l == "block2_conv1").unwrap();
    let mut net = VGG16.conv_base([24, 24], "block2_conv1", &weights(), 2).unwrap();
    let start = filters::patterns(&mut net, layer, &[5], &Ascent { size: 24, steps: 0, ..Default::default() }).unwrap();
    let x = start[0].image.clone();
    let (g, means) = filters::gradients(&mut net, layer, &[5], &x).unwrap();
    assert!(means[0] > 0.0, "filter 5 fires on gray noise: {means:?}");
    // The pixels with the largest gradients, where differences are well above float32's noise.
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let eps = 0.25f32;
    for &j in &order[..6] {
        let mut v = x.clone();
        v[j] = x[j] + eps;
        let up = filters::gradients(&mut net, layer, &[5], &v).unwrap().1[0];
        v[j] = x[j] - eps;
        let down = filters::gradients(&mut net, layer, &[5], &v).unwrap().1[0];
        let numeric = f64::from(up - down) / f64::from(2.0 * eps);
        let analytic = f64::from(g[j]);
        eprintln!("pixel {j}: numeric {numeric:.6e} analytic {analytic:.6e}");
        assert!((numeric - analytic).abs() <= 2e-2 * analytic.abs(), "pixel {j}: numeric {numeric} vs {analytic}");
    }
}

#[test]
fn every_filters_mean_activation_rises_and_the_patterns_differ() {
    let layer = VGG16.layers().iter().position(|l| l == "block3_conv1").unwrap();
    let mut net = VGG16.conv_base([32, 32], "block3_conv1", &weights(), 2).unwrap();
    let which: Vec<usize> = (0..8).collect();
    let start =
        filters::patterns(&mut net, layer, &which, &Ascent { size: 32, steps: 0, ..Default::default() }).unwrap();
    let ascended = filters::patterns(&mut net, layer, &which, &Ascent { size: 32, ..Default::default() }).unwrap();
    let mean_abs = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    for (p, s) in ascended.iter().zip(&start) {
        assert_eq!(p.trace.len(), 41, "the mean before each of the 40 steps and after the last");
        let (first, last) = (p.trace[0], p.trace[40]);
        eprintln!("filter {}: mean activation {first:.3} -> {last:.3}", p.filter);
        assert!(last > first, "filter {}: {first} -> {last}", p.filter);
        // Far from the noise it started from (the same seed draws the same): 40 unit-RMS steps.
        assert!(mean_abs(&p.image, &s.image) > 5.0, "filter {} barely left the noise", p.filter);
    }
    for (i, a) in ascended.iter().enumerate() {
        for b in &ascended[i + 1..] {
            assert!(mean_abs(&a.image, &b.image) > 2.0, "filters {} and {} made the same pattern", a.filter, b.filter);
        }
    }
}

#[test]
fn filters_writes_the_grid_and_the_trace_and_refuses_what_is_not_a_conv() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("f.png");
    let o = common::bin()
        .args(["visualize", "filters", "--layer", "block1_conv2", "--filters", "3", "--size", "20", "--steps", "4"])
        .arg("--out")
        .arg(&png)
        .args(["--npy", "--threads", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).unwrap();
    // Three 20-pixel tiles 5 apart in one row, under the title.
    assert_eq!(img.width(), 3 * 20 + 4 * 5);
    let csv = std::fs::read_to_string(png.with_extension("csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 5, "{csv}");
    assert_eq!(npy(&png.with_extension("npy")).0, [3, 20, 20, 3]);
    for (layer, filters, want) in [
        ("block1_pool", "3", "not one of vgg16's convs"),
        ("block9_conv1", "3", "not one of vgg16's convs"),
        ("block1_conv1", "65", "block1_conv1 has 64 filters"),
    ] {
        let o = common::bin()
            .args(["visualize", "filters", "--layer", layer, "--filters", filters, "--size", "20"])
            .arg("--out")
            .arg(&png)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{layer} {filters}: {err}");
    }
}
