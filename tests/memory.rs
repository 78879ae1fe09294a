//! A run's memory is bounded by its options, not by what lies in the data
//! folder. One test in this binary: it reads the peak memory of its own
//! child processes (getrusage), which other tests' children would blur.

mod common;

use std::path::Path;

/// The largest peak memory (KiB) of any child process waited for so far.
fn children_peak_kib() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    usage.ru_maxrss
}

fn run(dir: &Path, data: &Path, out: &str, extra: &str) -> serde_json::Value {
    let yaml = format!(
        "name: memory
report: {out}/report.json
stages:
  - {{id: files, kind: file_reader, dir: {data}{extra}}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [32, 32]}}
  - {{id: batch, kind: batch, input: resize, size: 4}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, device: cpu, intra_threads: 1}}
  - {{id: write, kind: feature_writer, input: features, dir: {out}}}
",
        out = dir.join(out).display(),
        data = data.display(),
        model = common::tiny_model().display(),
    );
    let file = common::write_pipeline(dir, "p.yaml", &yaml);
    let o = common::bin().args(["--quiet", "run"]).arg(&file).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(dir.join(out).join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_huge_file_that_is_no_image_is_skipped_unread_and_max_file_mb_bounds_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for class in ["cats", "dogs"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        let from = common::root().join("tests/fixtures/images").join(class);
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, data.join(class).join(p.file_name().unwrap())).unwrap();
        }
    }
    run(tmp.path(), &data, "before", "");
    let baseline = children_peak_kib();

    // 600 MiB of zeros named .jpg (sparse: no disk), and a 40 MiB PNG
    // header with nothing after it.
    let huge = data.join("cats/huge.jpg");
    std::fs::File::create(&huge).unwrap().set_len(600 << 20).unwrap();
    let big = data.join("dogs/big.png");
    let f = std::fs::File::create(&big).unwrap();
    std::io::Write::write_all(&mut &f, b"\x89PNG\r\n\x1a\n").unwrap();
    f.set_len(40 << 20).unwrap();

    let report = run(tmp.path(), &data, "after", ", max_file_mb: 32");
    let grew_mib = (children_peak_kib() - baseline) / 1024;
    assert!(grew_mib < 100, "peak memory grew by {grew_mib} MiB over a run without the big files");
    let skipped = report["skipped"].as_array().unwrap();
    let reason = |name: &str| {
        let s = skipped.iter().find(|s| s["path"].as_str().unwrap().ends_with(name)).unwrap();
        (s["stage"].as_str().unwrap().to_string(), s["reason"].as_str().unwrap().to_string())
    };
    let (stage, why) = reason("huge.jpg");
    assert_eq!(stage, "files");
    assert!(why.starts_with("629145600 bytes, over max_file_mb (32 MiB): not read"), "{why}");
    let (stage, why) = reason("big.png");
    assert_eq!(stage, "files");
    assert!(why.starts_with("41943040 bytes, over max_file_mb (32 MiB)"), "{why}");

    // Under the default bound (1024 MiB), the huge file is refused from its
    // first bytes, still unread.
    std::fs::remove_file(&big).unwrap();
    let report = run(tmp.path(), &data, "default", "");
    let s = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["path"].as_str().unwrap().ends_with("huge.jpg"))
        .cloned();
    let why = s.unwrap()["reason"].as_str().unwrap().to_string();
    assert!(
        why.starts_with("not a recognised image format (its first bytes; the 629145600 bytes are not read)"),
        "{why}"
    );
    let grew_mib = (children_peak_kib() - baseline) / 1024;
    assert!(grew_mib < 100, "peak memory grew by {grew_mib} MiB reading a 600 MiB non-image");
}
