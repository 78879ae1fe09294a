//! `device: cuda` never runs on the CPU: on a machine or an ONNX Runtime
//! build without CUDA, the run stops before any work and names what is
//! missing. (The GPU path itself is checked on a GPU machine: docs/gpu.md.)

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
