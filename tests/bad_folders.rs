//! Messy folders: an empty class, no images at all, a symlink loop, a file
//! name that is not UTF-8. Each either works or stops before any work with
//! a message that names the folder.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn pipeline(tmp: &Path, data: &Path, follow_links: bool) -> std::path::PathBuf {
    let yaml = format!(
        "stages:
  - {{id: files, kind: file_reader, dir: {data}, follow_links: {follow_links}}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [64, 64]}}
  - {{id: batch, kind: batch, input: resize}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, device: cpu}}
  - {{id: write, kind: feature_writer, input: features, dir: {out}}}
",
        data = data.display(),
        model = common::tiny_model().display(),
        out = tmp.join("out").display()
    );
    common::write_pipeline(tmp, "p.yaml", &yaml)
}

fn jpeg(to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(common::root().join("tests/fixtures/images/cats/cat.1.jpg"), to).unwrap();
}

#[test]
fn an_empty_class_folder_is_still_a_class() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    jpeg(&data.join("cats/a.jpg"));
    std::fs::create_dir_all(data.join("dogs")).unwrap();
    common::run_yaml(&pipeline(tmp.path(), &data, false)).unwrap();
    assert_eq!(std::fs::read_to_string(tmp.path().join("out/classes.txt")).unwrap(), "cats\ndogs\n");
    assert_eq!(std::fs::read_to_string(tmp.path().join("out/paths.txt")).unwrap().lines().count(), 1);
}

#[test]
fn no_images_at_all_stops_before_any_work_naming_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("cats")).unwrap();
    std::fs::create_dir_all(data.join("dogs")).unwrap();
    std::fs::write(data.join("cats/notes.txt"), "not an image").unwrap();
    let err = common::run_yaml(&pipeline(tmp.path(), &data, false)).err().unwrap().to_string();
    assert!(
        err.contains("stage `files`") && err.contains("no images") && err.contains(&data.display().to_string()),
        "{err}"
    );
    assert!(!tmp.path().join("out").exists(), "nothing was written");
}

#[test]
fn a_symlink_loop_is_named_when_followed_and_ignored_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    jpeg(&data.join("cats/a.jpg"));
    jpeg(&data.join("dogs/b.jpg"));
    std::os::unix::fs::symlink("..", data.join("cats/up")).unwrap();
    let err = common::run_yaml(&pipeline(tmp.path(), &data, true)).err().unwrap().to_string();
    assert!(err.contains("symlink loop"), "{err}");
    common::run_yaml(&pipeline(tmp.path(), &data, false)).unwrap();
    assert_eq!(std::fs::read_to_string(tmp.path().join("out/paths.txt")).unwrap().lines().count(), 2);
}

#[test]
fn a_non_utf8_file_name_is_read_and_written_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    jpeg(&data.join("cats/a.jpg"));
    let name = OsStr::from_bytes(b"d\xffg.jpg");
    jpeg(&data.join("dogs").join(name));
    common::run_yaml(&pipeline(tmp.path(), &data, false)).unwrap();
    let paths = std::fs::read(tmp.path().join("out/paths.txt")).unwrap();
    let last = paths.split(|&b| b == b'\n').rfind(|l| !l.is_empty()).unwrap();
    assert_eq!(Path::new(OsStr::from_bytes(last)), data.join("dogs").join(name), "paths.txt holds the exact bytes");
}
