//! `device: cuda` never runs on the CPU: on a machine or an ONNX Runtime
//! build without CUDA, the run stops before any work and names what is
//! missing. (The GPU path itself is checked on a GPU machine: docs/gpu.md.)
//! The half-precision model the GPU check runs (`models/make_fp16.py`) is
//! checked here on the CPU.

mod common;

#[test]
fn device_cuda_without_cuda_fails_before_any_work_naming_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let yaml = common::extraction_yaml(
        &common::root().join("tests/fixtures/images"),
        &common::tiny_model(),
        &out,
        None,
        "",
        64,
        "rescale",
    )
    .replace("device: cpu", "device: cuda");
    let file = common::write_pipeline(tmp.path(), "p.yaml", &yaml);
    let o = common::bin().args(["--quiet", "run"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("stage `features`") && err.contains("device: cuda requested but"), "{err}");
    // Here: the CPU build of ONNX Runtime, so the provider library is what is missing.
    assert!(err.contains("libonnxruntime_providers_cuda.so") || err.contains("NVIDIA driver"), "{err}");
    assert!(!out.exists(), "nothing was written: the run stopped before any work");
}

/// `models/make_fp16.py`'s half-precision model runs on the CPU as it will on
/// the GPU (float32 in and out, same shape), within 1e-2 of float32 per
/// image, and the cache never serves float32 features for it: it keys by
/// the model's content.
#[test]
fn a_half_precision_model_runs_on_the_cpu_near_float32_and_is_cached_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let half = tmp.path().join("tiny.fp16.onnx");
    common::run_python("models/make_fp16.py", [common::tiny_model(), half.clone()]);
    let cache = tmp.path().join("cache");
    let data = common::root().join("tests/fixtures/images");
    let mut features = Vec::new();
    for (name, model) in [("fp32", common::tiny_model()), ("fp16", half)] {
        let out = tmp.path().join(name);
        let yaml = common::extraction_yaml(&data, &model, &out, Some(&cache), "", 64, "caffe");
        let report = common::run_yaml(&common::write_pipeline(tmp.path(), &format!("{name}.yaml"), &yaml)).unwrap();
        assert_eq!(
            common::detail(&report, "features", "images_inferred"),
            9,
            "{name}: computed, not served from the cache"
        );
        features.push(convflow::npy::read_f32(&out.join("features.npy")).unwrap());
    }
    let ((shape, full), (half_shape, halfs)) = (&features[0], &features[1]);
    assert_eq!(shape, half_shape);
    assert!(full != halfs, "half precision rounds differently: not float32's features");
    let per_image: usize = shape[1..].iter().product();
    common::assert_close_per_image(halfs, full, per_image, 1e-2, |i| format!("image {i}"));
}
