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
    // Escaped (docs/extraction.md#names-in-text-files): one line of UTF-8 that reads back to the exact bytes.
    assert!(std::str::from_utf8(last).unwrap().ends_with("/dogs/d\\xffg.jpg"), "{}", last.escape_ascii());
    let read_back = convflow::names::unescape(last).unwrap();
    assert_eq!(
        Path::new(OsStr::from_bytes(&read_back)),
        data.join("dogs").join(name),
        "paths.txt names the exact bytes"
    );
}

/// The pipeline's outputs in `out`: paths, and the features' bytes.
fn outputs(out: &Path) -> (Vec<String>, Vec<u8>) {
    let paths = std::fs::read_to_string(out.join("paths.txt")).unwrap().lines().map(String::from).collect();
    (paths, std::fs::read(out.join("features.npy")).unwrap())
}

fn skipped(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("skipped.csv"))
        .map(|s| s.lines().skip(1).map(String::from).collect())
        .unwrap_or_default()
}

fn run_with_report(tmp: &Path, data: &Path, follow_links: bool) -> std::path::PathBuf {
    let file = pipeline(tmp, data, follow_links);
    let out = tmp.join("out");
    let o = common::bin()
        .args(["--quiet", "run"])
        .arg(&file)
        .arg("--report")
        .arg(out.join("report.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A split made of symbolic links to the photos (the usual way to carve
/// train / validation / test without copying) reads exactly as the photos
/// themselves: the same rows in the same order with the same features, with
/// `follow_links` off, as Keras's `flow_from_directory` reads linked files.
#[test]
fn a_symlink_farm_extracts_exactly_the_rows_of_the_real_folder() {
    let source = match common::shared_data() {
        Some(d) => d.join("train"),
        None => common::root().join("tests/fixtures/images"),
    };
    let tmp = tempfile::tempdir().unwrap();
    let farm = tmp.path().join("farm");
    let mut n = 0;
    for class in ["cats", "dogs"] {
        std::fs::create_dir_all(farm.join(class)).unwrap();
        for e in std::fs::read_dir(source.join(class)).unwrap() {
            let p = e.unwrap().path();
            std::os::unix::fs::symlink(&p, farm.join(class).join(p.file_name().unwrap())).unwrap();
            n += 1;
        }
    }
    let real_tmp = tmp.path().join("real");
    let farm_tmp = tmp.path().join("linked");
    std::fs::create_dir_all(&real_tmp).unwrap();
    std::fs::create_dir_all(&farm_tmp).unwrap();
    let (real_paths, real_features) = outputs(&run_with_report(&real_tmp, &source, false));
    let (farm_paths, farm_features) = outputs(&run_with_report(&farm_tmp, &farm, false));
    assert_eq!(farm_paths.len(), n, "every linked photo is read");
    let names = |paths: &[String]| -> Vec<String> {
        paths.iter().map(|p| p.rsplit('/').take(2).collect::<Vec<_>>().join("<")).collect()
    };
    assert_eq!(names(&farm_paths), names(&real_paths), "the same files in the same order");
    assert!(farm_features == real_features, "the same features, byte for byte");
}

/// Linked files are read with or without `follow_links`; linked folders
/// below a class folder are walked only with it; a dangling link is skipped
/// and listed with its reason.
#[test]
fn linked_files_are_read_linked_folders_follow_the_option_and_dangling_links_are_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let photos = tmp.path().join("photos");
    jpeg(&photos.join("x.jpg"));
    jpeg(&photos.join("sub/y.jpg"));
    jpeg(&data.join("cats/a.jpg"));
    jpeg(&data.join("dogs/b.jpg"));
    std::os::unix::fs::symlink(photos.join("x.jpg"), data.join("cats/linked.jpg")).unwrap();
    std::os::unix::fs::symlink(photos.join("sub"), data.join("dogs/linked_folder")).unwrap();
    std::os::unix::fs::symlink(photos.join("gone.jpg"), data.join("dogs/dangling.jpg")).unwrap();
    // Links to a device that never ends and to a FIFO that would block a read.
    std::os::unix::fs::symlink("/dev/zero", data.join("dogs/zero.jpg")).unwrap();
    let fifo = std::ffi::CString::new(photos.join("pipe").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink(photos.join("pipe"), data.join("dogs/fifo.jpg")).unwrap();

    let out = run_with_report(tmp.path(), &data, false);
    let (paths, _) = outputs(&out);
    let rel: Vec<String> =
        paths.iter().map(|p| p.strip_prefix(&format!("{}/", data.display())).unwrap().to_string()).collect();
    assert_eq!(rel, ["cats/a.jpg", "cats/linked.jpg", "dogs/b.jpg"]);
    let listed = skipped(&out);
    assert_eq!(listed.len(), 3, "{listed:?}");
    let reason = |name: &str| listed.iter().find(|l| l.contains(name)).cloned().unwrap_or_default();
    assert!(reason("dangling.jpg").contains("files") && reason("dangling.jpg").contains("dangling symbolic link"));
    for special in ["zero.jpg", "fifo.jpg"] {
        let r = reason(special);
        assert!(r.contains("files") && r.contains("not a regular file (a device, FIFO or socket)"), "{listed:?}");
    }

    std::fs::remove_dir_all(&out).unwrap();
    let out = run_with_report(tmp.path(), &data, true);
    let (paths, _) = outputs(&out);
    assert_eq!(paths.len(), 4, "follow_links walks the linked folder too: {paths:?}");
    assert!(paths.iter().any(|p| p.ends_with("dogs/linked_folder/y.jpg")), "{paths:?}");
}

/// What a real photo folder holds besides photos: extensions in any case
/// are read (as Keras does); `.DS_Store` and other files without an image
/// extension are not images (as Keras); an AppleDouble `._x.jpg` and a
/// photo cut short are skipped and listed with their reason; a 1-pixel image
/// and a PNG named `.jpg` are read.
#[test]
fn what_a_real_photo_folder_holds_besides_photos() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    jpeg(&data.join("cats/upper.JPG"));
    jpeg(&data.join("cats/mixed.Jpeg"));
    jpeg(&data.join("dogs/b.jpg"));
    std::fs::write(data.join("cats/.DS_Store"), b"\0\0\0\x01Bud1").unwrap();
    let mut apple = vec![0x00, 0x05, 0x16, 0x07, 0, 2, 0, 0];
    apple.extend([0u8; 200]);
    std::fs::write(data.join("cats/._upper.JPG"), &apple).unwrap();
    let photo = std::fs::read(common::root().join("tests/fixtures/images/dogs/dog.1.jpg")).unwrap();
    std::fs::write(data.join("dogs/cut.jpg"), &photo[..photo.len() / 2]).unwrap();
    let png = std::fs::read(common::root().join("tests/fixtures/images/cats/cat.2.png")).unwrap();
    std::fs::write(data.join("dogs/png_named.jpg"), png).unwrap();
    image::RgbImage::from_pixel(1, 1, image::Rgb([200, 10, 10])).save(data.join("dogs/one_pixel.png")).unwrap();

    let out = run_with_report(tmp.path(), &data, false);
    let (paths, _) = outputs(&out);
    let names: Vec<&str> = paths.iter().map(|p| p.rsplit('/').next().unwrap()).collect();
    assert_eq!(names, ["mixed.Jpeg", "upper.JPG", "b.jpg", "one_pixel.png", "png_named.jpg"]);
    let mut listed = skipped(&out);
    listed.sort();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed[0].contains("._upper.JPG") && listed[0].contains("AppleDouble"), "{listed:?}");
    assert!(listed[1].contains("cut.jpg") && listed[1].contains("truncated"), "{listed:?}");
}
