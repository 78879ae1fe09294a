//! File and folder names are bytes: a class folder or file whose name is
//! not UTF-8, or holds a newline, a carriage return or a backslash, is read
//! like any other, and every text file convflow writes names it in one
//! escaping that `python/convflow_names.py` reads back to the exact bytes.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A class folder per name, each with copies of two fixture photos under
/// the given file names; returns every photo's path.
fn make_data(data: &Path, classes: &[&[u8]], files: &[&[u8]]) -> Vec<PathBuf> {
    let photos: Vec<PathBuf> = ["cats", "dogs"]
        .iter()
        .map(|c| {
            let dir = common::root().join("tests/fixtures/images").join(c);
            let mut all: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
            all.sort();
            all.remove(0)
        })
        .collect();
    let mut made = Vec::new();
    for class in classes {
        let dir = data.join(OsStr::from_bytes(class));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, name) in files.iter().enumerate() {
            let path = dir.join(OsStr::from_bytes(name));
            std::fs::copy(&photos[i % 2], &path).unwrap();
            made.push(path);
        }
    }
    made
}

/// The names in a text file convflow wrote, read by the Python reader the docs give.
fn python_read(file: &Path) -> Vec<Vec<u8>> {
    let out = std::process::Command::new(common::python())
        .arg(common::root().join("python/convflow_names.py"))
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .map(|h| (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect())
        .collect()
}

#[test]
fn odd_names_are_read_and_written_so_they_read_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let classes: [&[u8]; 2] = [b"caf\xe9", b"cats"];
    let files: [&[u8]; 6] =
        [b"new\nline.jpg", b"new\\nline.jpg", b"carriage\rreturn.jpg", b"tab\t.jpg", b"latin1-\xe9.jpg", b"plain.jpg"];
    let mut photos = make_data(&data, &classes, &files);
    // A file that does not decode, under a name that is not UTF-8.
    let broken = data.join("cats").join(OsStr::from_bytes(b"broken-\xff.jpg"));
    std::fs::write(&broken, b"not an image").unwrap();
    let out = tmp.path().join("out");
    let yaml = format!(
        "name: names
report: {out}/report.json
stages:
  - {{id: files, kind: file_reader, dir: {data}}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [32, 32]}}
  - {{id: batch, kind: batch, input: resize, size: 4}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, device: cpu, intra_threads: 1}}
  - {{id: write, kind: feature_writer, input: features, dir: {out}}}
",
        out = out.display(),
        data = data.display(),
        model = common::tiny_model().display(),
    );
    let file = common::write_pipeline(tmp.path(), "p.yaml", &yaml);
    let o = common::bin().args(["--quiet", "run"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");

    // Every photo is a row, in Keras's order (classes by name, files by name).
    photos.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    let want: Vec<Vec<u8>> = photos.iter().map(|p| p.as_os_str().as_bytes().to_vec()).collect();
    assert_eq!(python_read(&out.join("paths.txt")), want, "paths.txt reads back to the exact names");
    let lines = std::fs::read(out.join("paths.txt")).unwrap();
    assert!(String::from_utf8(lines.clone()).is_ok() && !lines.contains(&b'\r'), "one line of UTF-8 per row");
    assert_eq!(convflow::npy::read_f32(&out.join("features.npy")).unwrap().0[0], 12);
    assert_eq!(python_read(&out.join("classes.txt")), classes.map(|c| c.to_vec()));

    // The broken file is skipped and listed under its escaped name.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let escaped = format!("{}/cats/broken-\\xff.jpg", data.display());
    assert_eq!(report["skipped"][0]["path"], escaped.as_str(), "{report}");
    let csv = std::fs::read_to_string(out.join("skipped.csv")).unwrap();
    assert!(csv.lines().nth(1).unwrap().starts_with(&format!("{escaped},decode,")), "{csv}");
}
