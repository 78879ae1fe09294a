//! `decode: {color_mode: grayscale}`: Keras's one-channel images, end to
//! end: the same luma PIL's `convert('L')` gives Keras, resized, augmented
//! and mirrored as one channel, trained on by a convnet of input
//! `[h, w, 1]`, and refused with a clear error by a model that takes RGB.

mod common;

use std::path::Path;
use std::process::Command;

use convflow::imaging::decode::{Decoder, to_gray};

/// PIL's `Image.open(path).convert('L')` of each file, as raw bytes.
fn pil_luma(files: &[std::path::PathBuf]) -> Vec<Vec<u8>> {
    let script = "import sys\nfrom PIL import Image\nfor p in sys.argv[1:]:\n    \
                  sys.stdout.buffer.write(Image.open(p).convert('L').tobytes())\n";
    let out = Command::new(common::python()).arg("-c").arg(script).args(files).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut at = 0;
    files
        .iter()
        .map(|f| {
            let (w, h) = image::image_dimensions(f).unwrap();
            let n = (w * h) as usize;
            at += n;
            out.stdout[at - n..at].to_vec()
        })
        .collect()
}

/// Colour PNGs (lossless, so both decoders see the same RGB) made from real
/// photos when the book's data is here, else from the demo set; plus a gray PNG.
fn colour_and_gray_pngs(dir: &Path) -> Vec<std::path::PathBuf> {
    let photos: Vec<std::path::PathBuf> = match common::shared_data() {
        Some(data) => (0..4).map(|i| data.join(format!("train/cats/cat.{i}.jpg"))).collect(),
        None => {
            convflow::demo::generate(&dir.join("demo"), 4).unwrap();
            let cats = dir.join("demo/train/cats");
            let mut v: Vec<_> = std::fs::read_dir(cats).unwrap().map(|e| e.unwrap().path()).collect();
            v.sort();
            v.truncate(4);
            v
        }
    };
    let mut pngs = Vec::new();
    for (i, p) in photos.iter().enumerate() {
        let rgb = Decoder::new(u64::MAX, None).unwrap().decode(&std::fs::read(p).unwrap()).unwrap();
        let png = dir.join(format!("colour{i}.png"));
        rgb.save(&png).unwrap();
        pngs.push(png);
        if i == 0 {
            let gray = dir.join("gray.png");
            image::GrayImage::from_fn(37, 23, |x, y| image::Luma([(x * 7 + y * 3) as u8])).save(&gray).unwrap();
            pngs.push(gray);
        }
    }
    pngs
}

#[test]
fn grayscale_decode_gives_pils_convert_l_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let pngs = colour_and_gray_pngs(dir.path());
    let want = pil_luma(&pngs);
    for (png, want) in pngs.iter().zip(want) {
        let rgb = Decoder::new(u64::MAX, None).unwrap().decode(&std::fs::read(png).unwrap()).unwrap();
        let got = to_gray(&rgb);
        let differ = got.as_raw().iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{}: {differ} of {} pixels differ from PIL's convert('L')", png.display(), want.len());
    }
}

fn pipeline(data: &Path, out: &Path, channels: usize, tail: &str) -> String {
    format!(
        "stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train, validation, test], class_mode: binary, seed: 1}}
  - {{id: decode, kind: decode, input: files, color_mode: grayscale}}
  - {{id: resize, kind: resize, input: decode, size: [31, 33], filter: bilinear}}
  - {{id: augment, kind: augment, input: resize, rotation_range: 20, zoom_range: 0.1, horizontal_flip: true, seed: 3}}
{tail}  - id: convnet
    kind: convnet
    input: {input}
    out_dir: {out}
    input_shape: [31, 33, {channels}]
    rescale: 0.00392156862745098
    epochs: 2
    layers:
      - {{kind: conv2d, filters: 4, kernel_size: 3, activation: relu}}
      - {{kind: max_pooling2d, pool_size: 2}}
      - {{kind: flatten}}
      - {{kind: dense, units: 1, activation: sigmoid}}
    optimizer: {{name: rmsprop, learning_rate: 1.0e-3}}
",
        data = data.display(),
        out = out.display(),
        input = if tail.is_empty() { "augment" } else { "views" },
    )
}

#[test]
fn a_grayscale_pipeline_trains_a_one_channel_convnet() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    convflow::demo::generate(&data, 12).unwrap();
    let out = dir.path().join("out");
    let views = "  - {id: views, kind: views, input: augment, vertical_flip: true}\n";
    let p = common::write_pipeline(dir.path(), "gray.yaml", &pipeline(&data, &out, 1, views));
    let report = common::run_yaml(&p).unwrap();
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    assert_eq!(model["input_shape"], serde_json::json!([31, 33, 1]), "{model}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["test_acc"].as_f64().is_some(), "{metrics}");

    // `convflow summary` takes the one channel from decode when no input_shape says it.
    let undeclared = pipeline(&data, &out, 1, "").replace("    input_shape: [31, 33, 1]\n", "");
    let o =
        common::bin().arg("summary").arg(common::write_pipeline(dir.path(), "s.yaml", &undeclared)).output().unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && table.contains("(None, 31, 33, 1)") && table.contains("Total params: 881"),
        "{table}"
    );

    // The convnet declared for RGB is refused before any work (by validation,
    // from the edge's facts: issue 33), naming both shapes.
    let p = common::write_pipeline(dir.path(), "rgb.yaml", &pipeline(&data, &dir.path().join("out3"), 3, ""));
    let cfg = convflow::config::load(&p, &[]).unwrap();
    let err = convflow::graph::Graph::build(cfg, &convflow::stages::builtin_registry()).err().unwrap().to_string();
    assert!(err.contains("convnet") && err.contains("[31, 33, 1]") && err.contains("[31, 33, 3]"), "{err}");
}

#[test]
fn grayscale_resize_augment_and_views_treat_the_one_channel_as_each_rgb_channel() {
    use convflow::augment::AugmentOptions;
    use convflow::imaging::resize::{Filter, Resize};
    use convflow::stages::views::view_of;
    let gray = image::GrayImage::from_fn(41, 29, |x, y| image::Luma([((x * x + 3 * y) % 251) as u8]));
    let rgb = image::RgbImage::from_fn(41, 29, |x, y| {
        let v = gray.get_pixel(x, y)[0];
        image::Rgb([v, v, v])
    });
    let first = |img: &image::RgbImage| img.as_raw().iter().step_by(3).copied().collect::<Vec<u8>>();
    for filter in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic, Filter::Lanczos, Filter::Box, Filter::Hamming] {
        let g = Resize::new(17, 23, filter).apply_gray(gray.clone()).unwrap();
        let c = Resize::new(17, 23, filter).apply(rgb.clone()).unwrap();
        assert_eq!(g.as_raw(), &first(&c), "{filter:?}");
    }
    let options: AugmentOptions = serde_json::from_value(serde_json::json!({
        "rotation_range": 40, "width_shift_range": 0.2, "shear_range": 10, "zoom_range": 0.2,
        "horizontal_flip": true, "channel_shift_range": 30.0, "brightness_range": [0.6, 1.4], "seed": 5
    }))
    .unwrap();
    for variant in 0..4 {
        let g = options.augment_gray(&gray, 0, variant, &[9; 32]);
        let c = options.augment(&rgb, 0, variant, &[9; 32]);
        assert_eq!(g.as_raw(), &first(&c), "variant {variant}");
        assert_ne!(g.as_raw(), gray.as_raw(), "variant {variant} changed the pixels");
    }
    for view in 1..4 {
        assert_eq!(view_of(&gray, view).as_raw(), &first(&view_of(&rgb, view)), "view {view}");
    }
}

#[test]
fn a_model_that_takes_rgb_refuses_grayscale_images_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    convflow::demo::generate(&data, 4).unwrap();
    let yaml = format!(
        "stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train]}}
  - {{id: decode, kind: decode, input: files, color_mode: grayscale}}
  - {{id: resize, kind: resize, input: decode, size: [32, 32]}}
  - {{id: batch, kind: batch, input: resize}}
  - {{id: features, kind: onnx_features, input: batch, model: {model}, device: cpu}}
  - {{id: sink, kind: feature_writer, input: features, dir: {out}}}
",
        data = data.display(),
        model = common::tiny_model().display(),
        out = dir.path().join("features").display()
    );
    let err = common::run_yaml(&common::write_pipeline(dir.path(), "p.yaml", &yaml)).unwrap_err().to_string();
    assert!(err.contains("features") && err.contains("color_mode: rgb"), "{err}");
}
