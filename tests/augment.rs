//! The `augment` stage and `convflow::augment`: equal to Keras's
//! `ImageDataGenerator.apply_transform` on fixed parameters (references made
//! by tests/fixtures/augment/make_references.py), deterministic, the same
//! whatever the worker count, and its fused mode close to resize-then-augment.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use convflow::augment::{AugmentOptions, Fill, FillMode, Kernel, Transform, apply_transform, apply_transform_with};
use convflow::config;
use convflow::graph::Graph;
use convflow::imaging::resize::{Filter, Resize};
use convflow::item::{Item, ItemKind, Payload};
use convflow::runtime::{self, RunOptions};
use convflow::stage::*;
use image::RgbImage;
use serde::{Deserialize, Serialize};

fn fixtures() -> PathBuf {
    common::root().join("tests/fixtures/augment")
}

fn load(path: &Path) -> RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

/// Mean absolute difference in pixel levels (0..255), leaving out a
/// `border`-pixel frame where one rounding of a coordinate flips a pixel
/// between an edge sample and the fill.
fn mad(a: &RgbImage, b: &RgbImage, border: u32) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let (w, h) = a.dimensions();
    let (mut sum, mut n) = (0u64, 0u64);
    for y in border..h - border {
        for x in border..w - border {
            for (p, q) in a.get_pixel(x, y).0.iter().zip(b.get_pixel(x, y).0) {
                sum += u64::from(p.abs_diff(q));
                n += 1;
            }
        }
    }
    sum as f64 / n as f64
}

#[derive(Deserialize)]
struct Case {
    name: String,
    fill_mode: FillMode,
    cval: f64,
    theta: f64,
    tx: f64,
    ty: f64,
    shear: f64,
    zx: f64,
    zy: f64,
    flip_horizontal: bool,
    flip_vertical: bool,
    channel_shift_intensity: Option<f64>,
    brightness: Option<f64>,
}

#[derive(Deserialize)]
struct Cases {
    images: Vec<String>,
    cases: Vec<Case>,
}

#[test]
fn equals_keras_apply_transform_on_fixed_parameters() {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let Cases { images, cases } = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for case in &cases {
        let t = Transform {
            theta: case.theta,
            tx: case.tx,
            ty: case.ty,
            shear: case.shear,
            zx: case.zx,
            zy: case.zy,
            flip_horizontal: case.flip_horizontal,
            flip_vertical: case.flip_vertical,
            channel_shift_intensity: case.channel_shift_intensity,
            brightness: case.brightness,
        };
        let fill = Fill::new(case.fill_mode, case.cval);
        for image in &images {
            let input = load(&fixtures().join(format!("input_{image}.png")));
            let want = load(&fixtures().join(format!("{}_{image}.png", case.name)));
            let got = apply_transform(&input, &t, fill, None);
            let scalar = apply_transform_with(&input, &t, fill, None, Kernel::Scalar);
            assert!(got == scalar, "{} {image}: the SIMD and scalar kernels differ", case.name);
            let m = mad(&got, &want, 3);
            println!("{:<16} {image}: MAD {m:.3} levels ({:.4} of 255)", case.name, m / 255.0);
            if m > 2.0 {
                failures.push(format!("{} {image}: MAD {m:.3} > 2 levels", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_same_key_gives_the_same_pixels_and_any_other_key_others() {
    let img = load(&fixtures().join("input_a.png"));
    let opts = AugmentOptions { size: None, ..AugmentOptions::book() };
    let hash = [7u8; 32];
    let first = opts.augment(&img, 3, 1, &hash);
    assert!(first == opts.augment(&img, 3, 1, &hash));
    assert_eq!(first.dimensions(), img.dimensions());
    assert!(first != opts.augment(&img, 4, 1, &hash), "another epoch");
    assert!(first != opts.augment(&img, 3, 2, &hash), "another variant");
    assert!(first != opts.augment(&img, 3, 1, &[8u8; 32]), "another image");
    let reseeded = AugmentOptions { seed: 1, ..opts.clone() };
    assert!(first != reseeded.augment(&img, 3, 1, &hash), "another seed");
}

#[test]
fn draws_follow_kerass_ranges() {
    let opts = AugmentOptions {
        height_shift_range: convflow::augment::ShiftRange::Pixels(3),
        width_shift_range: convflow::augment::ShiftRange::Choices(vec![0.1, 0.2]),
        zoom_range: convflow::augment::ZoomRange::Range([0.5, 0.75]),
        ..AugmentOptions::book()
    };
    for epoch in 0..200 {
        let key = convflow::augment::DrawKey { seed: 0, epoch, variant: 0, content_hash: &[1; 32] };
        let t = opts.random_transform(&mut key.rng(), 150, 200);
        assert!((-40.0..40.0).contains(&t.theta));
        assert!([-2.0, -1.0, 0.0, 1.0, 2.0].contains(&t.tx), "tx {}", t.tx);
        assert!([-40.0, -20.0, 20.0, 40.0].contains(&t.ty), "ty {}", t.ty);
        assert!((-0.2..0.2).contains(&t.shear));
        assert!((0.5..0.75).contains(&t.zx) && (0.5..0.75).contains(&t.zy) && t.zx != t.zy);
        assert!(!t.flip_vertical && t.channel_shift_intensity.is_none() && t.brightness.is_none());
    }
}

#[test]
fn options_are_checked_field_by_field() {
    let parse = |json: &str| serde_json::from_str::<AugmentOptions>(json);
    let fields = |json: &str| parse(json).unwrap().check().into_iter().map(|e| e.field).collect::<Vec<_>>();
    assert!(fields("{}").is_empty());
    assert!(fields(r#"{"rotation_range": 40, "width_shift_range": 5, "height_shift_range": [0.1, 0.2]}"#).is_empty());
    assert_eq!(fields(r#"{"rotation_range": -1, "shear_range": -0.2}"#), ["rotation_range", "shear_range"]);
    assert_eq!(fields(r#"{"height_shift_range": -0.2}"#), ["height_shift_range"]);
    assert_eq!(fields(r#"{"zoom_range": 1.5}"#), ["zoom_range"]);
    assert_eq!(fields(r#"{"zoom_range": [1.2, 0.8]}"#), ["zoom_range"]);
    assert_eq!(fields(r#"{"zoom_range": [0, 0.8]}"#), ["zoom_range"]);
    assert_eq!(
        fields(r#"{"brightness_range": [0.8, 0.2], "channel_shift_range": -3}"#),
        ["channel_shift_range", "brightness_range"]
    );
    assert_eq!(fields(r#"{"cval": 256, "size": [0, 10]}"#), ["cval", "size"]);
    let err = parse(r#"{"fill_mode": "mirror"}"#).unwrap_err().to_string();
    assert!(err.contains("unknown variant `mirror`"), "{err}");
    let err = parse(r#"{"zoom_range": "big"}"#).unwrap_err().to_string();
    assert!(err.contains("a number z (zoom in [1-z, 1+z]) or [lo, hi]"), "{err}");
    let err = parse(r#"{"rotation": 40}"#).unwrap_err().to_string();
    assert!(err.contains("unknown field `rotation`"), "{err}");
}

/// A plain per-pixel f64 implementation of the same semantics (scipy's
/// rules on the grid, then bilinear on the source): the oracle for the
/// fixed-point runs, the AVX2 kernel and the fused mapping.
fn reference(src: &RgbImage, t: &Transform, fill: Fill, size: Option<(u32, u32)>) -> RgbImage {
    use convflow::augment::affine::{Affine, flips, grid_to_source, keras_matrix};
    let (sw, sh) = src.dimensions();
    let (h, w) = size.unwrap_or((sh, sw));
    let m = keras_matrix(t, h, w).unwrap_or(Affine::IDENTITY).mul(&flips(t.flip_horizontal, t.flip_vertical, h, w));
    let to_src = grid_to_source(h, w, sh, sw);
    RgbImage::from_fn(w, h, |c, r| {
        let (gr, gc) = m.apply(f64::from(r), f64::from(c));
        let (Some(gr), Some(gc)) = (fill.mode.map(gr, h), fill.mode.map(gc, w)) else {
            return image::Rgb([fill.cval_u8(); 3]);
        };
        let (qr, qc) = to_src.apply(gr, gc);
        let (qr, qc) = (qr.clamp(0.0, f64::from(sh - 1)), qc.clamp(0.0, f64::from(sw - 1)));
        let (y, x) = (qr.floor() as u32, qc.floor() as u32);
        let (fy, fx) = (qr - f64::from(y), qc - f64::from(x));
        let (y1, x1) = ((y + 1).min(sh - 1), (x + 1).min(sw - 1));
        let p = |x: u32, y: u32, ch: usize| f64::from(src.get_pixel(x, y).0[ch]);
        image::Rgb(std::array::from_fn(|ch| {
            let top = p(x, y, ch) * (1.0 - fx) + p(x1, y, ch) * fx;
            let bottom = p(x, y1, ch) * (1.0 - fx) + p(x1, y1, ch) * fx;
            (top * (1.0 - fy) + bottom * fy).round() as u8
        }))
    })
}

#[test]
fn fast_paths_agree_with_a_plain_implementation_on_odd_sizes_and_extreme_maps() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let sizes = [(1, 1), (1, 6), (6, 1), (2, 2), (3, 7), (40, 31), (150, 150), (200, 61)];
    let modes = [FillMode::Nearest, FillMode::Constant, FillMode::Reflect, FillMode::Wrap];
    let (mut worst_mad, mut worst_max) = (0.0f64, 0u8);
    for (i, &(w, h)) in sizes.iter().cycle().take(160).enumerate() {
        let src = smooth(w, h);
        let t = Transform {
            theta: rng.random_range(-180.0..180.0),
            tx: rng.random_range(-0.5..0.5) * f64::from(h),
            ty: rng.random_range(-0.5..0.5) * f64::from(w),
            shear: rng.random_range(-30.0..30.0),
            // Now and then a zoom far out: positions leave the fixed-point range.
            zx: if i % 23 == 0 { 1e7 } else { rng.random_range(0.3..2.5) },
            zy: rng.random_range(0.3..2.5),
            flip_horizontal: rng.random(),
            flip_vertical: rng.random(),
            ..Transform::default()
        };
        let fill = Fill::new(modes[i % 4], 77.0);
        let size = match i % 3 {
            0 => None,
            1 => Some((rng.random_range(1..60), rng.random_range(1..60))),
            _ => Some((h.div_ceil(3).max(1), (w * 2).max(1))),
        };
        let fast = apply_transform(&src, &t, fill, size);
        assert!(fast == apply_transform_with(&src, &t, fill, size, Kernel::Scalar), "case {i}: SIMD != scalar");
        let want = reference(&src, &t, fill, size);
        let m = mad(&fast, &want, 0);
        let max = fast.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        worst_mad = worst_mad.max(m);
        worst_max = worst_max.max(max);
        assert!(m < 0.5 && max <= 4, "case {i} ({w}x{h} -> {size:?}, {t:?}, {fill:?}): MAD {m}, max {max}");
    }
    println!("vs plain f64: worst MAD {worst_mad:.3} levels, worst pixel {worst_max} levels");
}

/// A smooth test picture (about 12 source pixels per wave).
fn smooth(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (x as f32, y as f32);
        let v = |a: f32| (127.5 + 127.5 * a.sin()) as u8;
        image::Rgb([v(x / 13.0 + y / 29.0), v(y / 11.0), v((x - y) / 17.0 + 1.0)])
    })
}

#[test]
fn fused_mode_is_close_to_resize_then_augment() {
    let t = Transform { theta: 23.0, tx: -12.0, ty: 9.0, shear: 0.2, zx: 0.9, zy: 1.15, ..Transform::default() };
    let fill = Fill::new(FillMode::Nearest, 0.0);
    for (w, h) in [(450, 300), (523, 377)] {
        let big = smooth(w, h);
        let fused = apply_transform(&big, &t, fill, Some((100, 150)));
        assert_eq!(fused.dimensions(), (150, 100));
        for filter in [Filter::Nearest, Filter::Bilinear] {
            let small = Resize::new(100, 150, filter).apply(big.clone()).unwrap();
            let m = mad(&fused, &apply_transform(&small, &t, fill, None), 3);
            println!("{w}x{h} -> 150x100, fused vs resize ({filter:?}) then augment: MAD {m:.3} levels");
            assert!(m < 2.0, "{filter:?}: MAD {m}");
        }
    }
    // At the incoming size, fused is plain.
    let img = smooth(150, 100);
    assert!(apply_transform(&img, &t, fill, Some((100, 150))) == apply_transform(&img, &t, fill, None));
}

/// (path, pixels) in arrival order.
type Images = Vec<(String, Vec<u8>)>;

#[derive(Default)]
struct Seen(Mutex<HashMap<String, Images>>);

static SEEN: LazyLock<Seen> = LazyLock::new(Seen::default);

/// Keeps every image it gets, under its probe name.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Keep {
    probe: String,
}

struct KeepStage(String);

impl Stage for KeepStage {
    fn process(&mut self, item: Item, _: &mut dyn Emit) -> Result<(), StageError> {
        let Payload::Image(img) = item.payload else { panic!("expected an image") };
        let path = item.meta.path.to_string_lossy().to_string();
        SEEN.0.lock().unwrap().entry(self.0.clone()).or_default().push((path, img.into_raw()));
        Ok(())
    }
}

impl StageConfig for Keep {
    const KIND: &'static str = "keep";
    const SUMMARY: &'static str = "test sink";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = &[];
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(KeepStage(self.probe.clone()))))
    }
}

fn run_pipeline(dir: &Path, workers: usize, probe: &str) -> Images {
    let yaml = format!(
        "stages:
  - {{id: files, kind: file_reader, dir: {dir}}}
  - {{id: decode, kind: decode, input: files, workers: {workers}}}
  - id: augment
    kind: augment
    input: decode
    workers: {workers}
    rotation_range: 40
    width_shift_range: 0.2
    height_shift_range: 0.2
    shear_range: 0.2
    zoom_range: 0.2
    horizontal_flip: true
    seed: 5
    size: [48, 64]
  - {{id: keep, kind: keep, input: augment, probe: {probe}}}
",
        dir = dir.display()
    );
    let mut registry = convflow::stages::builtin_registry();
    registry.register::<Keep>();
    let cfg = config::parse_str(&yaml, Path::new("test.yaml"), &[]).unwrap();
    let graph = Graph::build(cfg, &registry).unwrap_or_else(|e| panic!("{e}"));
    runtime::run(&graph, &RunOptions::default()).unwrap();
    SEEN.0.lock().unwrap().remove(probe).unwrap_or_default()
}

#[test]
fn a_pipeline_gives_the_same_pixels_with_one_worker_or_three() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..12u32 {
        smooth(90 + 7 * i, 70 + 3 * i).save(dir.path().join(format!("img{i:02}.png"))).unwrap();
    }
    let one = run_pipeline(dir.path(), 1, "w1");
    let three = run_pipeline(dir.path(), 3, "w3");
    assert_eq!(one.len(), 12);
    assert!(one == three, "pixels differ between workers: 1 and workers: 3");
    // And the stage does what the library function does with the item's key.
    let opts = AugmentOptions { seed: 5, size: Some([48, 64]), ..AugmentOptions::book() };
    for (path, pixels) in &one {
        let bytes = std::fs::read(path).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        let want = opts.augment(&img, 0, 0, blake3::hash(&bytes).as_bytes());
        assert!(want.as_raw() == pixels, "{path}");
    }
    let distinct: std::collections::HashSet<_> = one.iter().map(|(_, p)| p).collect();
    assert_eq!(distinct.len(), 12);
}

#[test]
fn augment_preview_writes_a_grid_and_refuses_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid.png");
    let input = fixtures().join("input_a.png");
    let run = |extra: &[&str]| {
        common::bin()
            .arg("augment-preview")
            .arg(&input)
            .arg("--out")
            .arg(&out)
            .args(["--count", "4"])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&["--config", "{fill_mode: reflect, size: [60, 80]}"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // Four tiles of 80x60 in one row, 4-pixel gaps.
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (4 * 80 + 3 * 4, 60));
    let bad = run(&["--config", "{zoom_range: [2, 1]}"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("zoom_range: lo (2) is above hi (1)"));
}
