//! Pixel for pixel what Keras's `load_img` gives: PIL's JPEG decode and
//! PIL's `Image.NEAREST` indices, compared with Pillow's own output.
//!
//! Expected values come from `tests/fixtures/pil/make_pil_fixtures.py`
//! (run with Pillow 13.0.0, the version `models/requirements.txt` pins), and
//! for the book's photos from the same script run live in the set-up's venv.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use convflow::imaging::decode::{Decoder, decode_image};
use convflow::imaging::resize::{Filter, Resize, pil_nearest_indices};
use image::RgbImage;

/// (height, width) targets the fixtures record, as `make_pil_fixtures.py`'s SIZES.
const SIZES: [(u32, u32); 4] = [(150, 150), (224, 224), (299, 299), (37, 91)];

fn crc(bytes: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(bytes);
    c.sum()
}

/// Pillow's side of every comparison here.
const PIL_SCRIPT: &str = "tests/fixtures/pil/make_pil_fixtures.py";

fn fixtures() -> PathBuf {
    common::root().join("tests/fixtures/pil")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

/// What convflow makes of one file, as the fixtures record it: "full" and "HxW".
fn convflow_crcs(bytes: &[u8]) -> BTreeMap<String, u32> {
    let img = decode_image(bytes, u64::MAX).unwrap();
    let via_stage = Decoder::new(u64::MAX, None).unwrap().decode(bytes).unwrap();
    assert!(img == via_stage, "the decode stage and decode_image agree");
    let mut out = BTreeMap::from([("full".to_string(), crc(img.as_raw()))]);
    for (h, w) in SIZES {
        let resized: RgbImage = Resize::new(h, w, Filter::Nearest).apply(img.clone()).unwrap();
        out.insert(format!("{h}x{w}"), crc(resized.as_raw()));
    }
    out
}

fn compare(name: &str, want: &serde_json::Value, got: &BTreeMap<String, u32>, failures: &mut Vec<String>) {
    for (key, crc) in got {
        let w = want[key].as_u64().unwrap_or_else(|| panic!("{name}: no {key} in the fixture"));
        if w != u64::from(*crc) {
            failures.push(format!("{name} {key}"));
        }
    }
}

#[test]
fn nearest_picks_the_source_pixels_pil_picks_at_every_size() {
    let expected = expected();
    for (pair, table) in expected["indices"].as_object().unwrap() {
        let (n, m) = pair.split_once("->").unwrap();
        let want: Vec<u32> = table.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(pil_nearest_indices(n.parse().unwrap(), m.parse().unwrap()), want, "{pair}");
    }
    for (m, crcs) in expected["index_crcs"].as_object().unwrap() {
        let m: u32 = m.parse().unwrap();
        let mut wrong = Vec::new();
        for (i, want) in crcs.as_array().unwrap().iter().enumerate() {
            let n = i as u32 + 1;
            let bytes: Vec<u8> = pil_nearest_indices(n, m).iter().flat_map(|x| x.to_le_bytes()).collect();
            if u64::from(crc(&bytes)) != want.as_u64().unwrap() {
                wrong.push(n);
            }
        }
        assert!(wrong.is_empty(), "{} source sizes into {m} pick other pixels than PIL: {wrong:?}", wrong.len());
    }
}

#[test]
fn odd_sizes_subsamplings_grey_and_progressive_jpegs_decode_and_resize_as_pil() {
    let expected = expected();
    let images = expected["images"].as_object().unwrap();
    assert_eq!(images.len(), 13);
    let mut failures = Vec::new();
    for (name, want) in images {
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        compare(name, want, &convflow_crcs(&bytes), &mut failures);
    }
    assert!(failures.is_empty(), "differ from PIL: {failures:?}");
}

/// Every photo of the book's test split, against Pillow run on the same files.
#[test]
fn the_books_photos_decode_and_resize_as_pil() {
    let Some(data) = common::shared_data() else { return };
    let mut files: Vec<PathBuf> = ["test/cats", "test/dogs"]
        .iter()
        .flat_map(|d| std::fs::read_dir(data.join(d)).unwrap().map(|e| e.unwrap().path()))
        .collect();
    files.sort();
    assert_eq!(files.len(), 1000);
    let args = std::iter::once(PathBuf::from("crc")).chain(files.iter().cloned());
    let pil: serde_json::Value = serde_json::from_slice(&common::run_python(PIL_SCRIPT, args)).unwrap();
    let mut failures = Vec::new();
    for f in &files {
        let name = f.to_str().unwrap();
        compare(name, &pil[name], &convflow_crcs(&std::fs::read(f).unwrap()), &mut failures);
    }
    let shown: Vec<_> = failures.iter().take(10).collect();
    assert!(
        failures.is_empty(),
        "{} of {} (photo, size) differ from PIL, e.g. {shown:?}",
        failures.len(),
        files.len() * 5
    );
}

/// `pipelines/extract_features.yaml` as shipped, on book photos whose sizes
/// made the old nearest rule pick other rows (dog.1509 is 500x374), against
/// the Keras user's loop (`load_img`, `preprocess_input`, the same model in
/// Python onnxruntime), image by image.
#[test]
fn extract_features_equals_the_keras_loop_on_jpegs_image_by_image() {
    let Some(shared) = common::shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut n = 0;
    for split in ["train", "validation", "test"] {
        for (class, first) in [("cats", 1500), ("dogs", 1500)] {
            let dir = data.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            let count = if split == "train" { 12 } else { 1 };
            let offset = match split {
                "train" => 0,
                "validation" => 12,
                _ => 13,
            };
            for i in first + offset..first + offset + count {
                let name = format!("{}.{i}.jpg", &class[..3]);
                std::fs::copy(shared.join("test").join(class).join(&name), dir.join(&name)).unwrap();
                n += 1;
            }
        }
    }
    let out = tmp.path().join("out");
    for preprocess in ["caffe", "rescale"] {
        let status = common::bin()
            .args(["run", "pipelines/extract_features.yaml", "--quiet"])
            .args(["--set", &format!("data_dir={}", data.display())])
            .args(["--set", &format!("out_dir={}", out.display())])
            .args(["--set", &format!("cache_dir={}", tmp.path().join("cache").display())])
            .args(["--set", &format!("preprocess={preprocess}")])
            .status()
            .unwrap();
        assert!(status.success());
        let mut rows = 0;
        for split in ["train", "validation", "test"] {
            let dir = out.join(split);
            let (shape, features) = convflow::npy::read_f32(&dir.join("features.npy")).unwrap();
            let reference_npy = tmp.path().join(format!("{split}-{preprocess}.npy"));
            let args = [common::vgg16(), "150".into(), preprocess.into(), dir.join("paths.txt"), reference_npy.clone()];
            common::run_python("models/keras_loop_reference.py", args);
            let (rshape, reference) = convflow::npy::read_f32(&reference_npy).unwrap();
            assert_eq!(shape, rshape);
            let per_image: usize = shape[1..].iter().product();
            let paths = std::fs::read_to_string(dir.join("paths.txt")).unwrap();
            let paths: Vec<&str> = paths.lines().collect();
            assert_eq!(paths.len() * per_image, features.len());
            common::assert_close_per_image(&features, &reference, per_image, 1e-4, |i| {
                format!("{} ({preprocess})", paths[i])
            });
            rows += paths.len();
        }
        assert_eq!(rows, n);
    }
}

/// The other formats against PIL's `open(p).convert("RGB")`: the `image`
/// crate's decoders give PIL's pixels for every fixture but two, each a
/// deliberate departure that docs/keras-pixels.md states: convflow applies
/// EXIF orientation (`load_img` does not), and scales 16-bit grey to 8 bits
/// (PIL clips it: every value over 255 becomes white).
#[test]
fn other_formats_decode_as_pil_but_exif_rotation_and_16_bit_grey() {
    let exact = [
        "images/cats/cat.2.png",
        "images/cats/gray.png",
        "images/cats/alpha.png",
        "images/cats/progressive.jpg",
        "images/dogs/cmyk.jpg",
        "formats/cats/palette.gif",
        "formats/cats/anim.gif",
        "formats/cats/plain.bmp",
        "formats/cats/lzw.tif",
        "formats/dogs/plain.tif",
        "formats/dogs/lossless.webp",
        "formats/dogs/lossy.webp",
    ];
    let names: Vec<&str> = exact.iter().copied().chain(["images/dogs/rotated.jpg", "images/dogs/deep.png"]).collect();
    let files: Vec<PathBuf> = names.iter().map(|f| common::root().join("tests/fixtures").join(f)).collect();
    let tmp = tempfile::tempdir().unwrap();
    let args = [PathBuf::from("raw"), tmp.path().to_path_buf()].into_iter().chain(files.iter().cloned());
    let sizes: Vec<[u32; 2]> = serde_json::from_slice(&common::run_python(PIL_SCRIPT, args)).unwrap();
    let pil: Vec<RgbImage> = (0..names.len())
        .map(|i| {
            let raw = std::fs::read(tmp.path().join(format!("{i}.rgb"))).unwrap();
            RgbImage::from_raw(sizes[i][0], sizes[i][1], raw).unwrap()
        })
        .collect();
    let ours: Vec<RgbImage> =
        files.iter().map(|f| decode_image(&std::fs::read(f).unwrap(), u64::MAX).unwrap()).collect();
    for i in 0..exact.len() {
        assert!(ours[i] == pil[i], "{}: differs from PIL", names[i]);
    }
    // Stored 64x32 with orientation 6: PIL's pixels turned a quarter clockwise, exactly.
    let rotated = exact.len();
    assert_eq!(pil[rotated].dimensions(), (64, 32), "load_img leaves EXIF orientation alone");
    assert!(ours[rotated] == image::imageops::rotate90(&pil[rotated]), "PIL's pixels, upright");
    // 16-bit grey 40000: PIL clips to 255, convflow scales to 155 (40000 / 257).
    let deep = rotated + 1;
    assert!(pil[deep].as_raw().iter().all(|&v| v == 255), "PIL clips 16-bit grey");
    assert!(ours[deep].as_raw().iter().all(|v| v.abs_diff(155) <= 1), "convflow scales it");
}
