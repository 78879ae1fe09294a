//! The `gradcam` stage and `pipelines/heatmaps.yaml` (issue 18, the book's
//! 5.4.3) on real photos: the heatmaps of 2 cats and 2 dogs equal those
//! `models/gradcam_reference.py` computes from the saved weights in numpy
//! (forward, and the analytic backward through the head, the pool and, for
//! block5_conv1, two conv layers) within 1e-4 (for a ReLU unit or pool
//! window float32 cannot decide, either way is right); the pictures are the book's
//! figure drawn from them; a rerun computes no block4 map again; an
//! unknown or non-conv layer and an unknown class stop before any work
//! naming the stage and the field; a corrupt photo is skipped and listed; a
//! convnet trained from scratch is checked the same way on its pixels, and a
//! fine-tuned VGG16 that has not moved draws its head's heatmaps exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

/// Cats and dogs in the book's layout, linked from the shared copy: `train`
/// 4 + 4 and `validation` 2 + 2 to train a head, `test` 2 + 2 to draw.
fn small_data(dir: &Path) -> Option<PathBuf> {
    let shared = common::shared_data()?;
    let data = dir.join("data");
    for (split, first, n) in [("train", 0, 4), ("validation", 1000, 2), ("test", 1500, 2)] {
        for class in ["cats", "dogs"] {
            let to = data.join(split).join(class);
            std::fs::create_dir_all(&to).unwrap();
            for i in first..first + n {
                let name = format!("{}.{i}.jpg", &class[..3]);
                std::os::unix::fs::symlink(shared.join(split).join(class).join(&name), to.join(&name)).unwrap();
            }
        }
    }
    Some(data)
}

fn run(args: &[&str], sets: &[(&str, String)]) -> Output {
    let mut c = common::bin();
    c.args(args);
    for (k, v) in sets {
        c.arg("--set").arg(format!("{k}={v}"));
    }
    c.output().unwrap()
}

fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
}

/// The trained head all tests here share (3 epochs on 8 photos: what is
/// checked is the gradient, not the accuracy), with its data and cache.
struct Trained {
    dir: PathBuf,
    data: PathBuf,
    head: PathBuf,
    cache: PathBuf,
}

fn trained() -> Option<&'static Trained> {
    static TRAINED: OnceLock<Option<Trained>> = OnceLock::new();
    TRAINED
        .get_or_init(|| {
            // Kept for the whole test binary (a static is never dropped), so
            // it lives in cargo's own scratch folder, emptied by the next run.
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gradcam");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let data = small_data(&dir)?;
            let (head, cache) = (dir.join("head"), dir.join("cache"));
            let o = run(
                &["run", "-q", "pipelines/feature_extraction.yaml"],
                &[
                    ("data_dir", data.display().to_string()),
                    ("out_dir", head.display().to_string()),
                    ("cache_dir", cache.display().to_string()),
                    ("preprocess", "caffe".into()),
                    ("epochs", "3".into()),
                ],
            );
            ok(&o, "training the head");
            Some(Trained { dir, data, head, cache })
        })
        .as_ref()
}

/// `pipelines/heatmaps.yaml` on the photos of `input` into `out`, with the
/// block4 maps cached in `cache`.
fn heatmaps(t: &Trained, out: &Path, input: &Path, cache: &Path, sets: &[(&str, &str)]) -> Output {
    let mut all = vec![
        ("head", t.head.display().to_string()),
        ("input_dir", input.display().to_string()),
        ("out_dir", out.display().to_string()),
        ("cache_dir", cache.display().to_string()),
    ];
    all.extend(sets.iter().map(|(k, v)| (*k, v.to_string())));
    run(&["run", "-q", "pipelines/heatmaps.yaml"], &all)
}

/// heatmaps.csv as (path, its fields by column name).
fn table(out: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(out.join("heatmaps.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(str::to_string).collect();
    assert_eq!(header.join(","), convflow::stages::gradcam::HEADER);
    lines.map(|l| header.iter().cloned().zip(l.split(',').map(str::to_string)).collect()).collect()
}

/// The photos as the pipeline's decode and resize stages make them, 0..255.
fn pixels(paths: &[PathBuf], to: &Path) {
    let mut w = convflow::npy::NpyWriter::create(to, &[150, 150, 3]).unwrap();
    for p in paths {
        let img = convflow::imaging::decode::decode_image(&std::fs::read(p).unwrap(), u64::MAX).unwrap();
        let img = convflow::imaging::resize::Resize::new(150, 150, Default::default()).apply(img).unwrap();
        w.push(&img.as_raw().iter().map(|&v| f32::from(v)).collect::<Vec<_>>()).unwrap();
    }
    w.finish().unwrap();
}

/// One image as `gradcam_reference.py` computes it.
struct Reference {
    class: usize,
    probability: f64,
    /// Its heatmap, then one for each other way of making the ReLU and
    /// max-pool decisions float32 could make either way (the script's
    /// `undecided`): the gradient jumps there, so the stage's float32 may
    /// rightly draw any of them.
    heatmaps: Vec<Vec<f32>>,
}

/// `gradcam_reference.py` on `pixels`: the heatmaps' shape and, per image, what it computed.
fn reference(model: &Path, pixels: &Path, out: &Path, args: &[&str]) -> (Vec<usize>, Vec<Reference>) {
    let o = std::process::Command::new(common::python())
        .arg(common::root().join("models/gradcam_reference.py"))
        .arg(model)
        .arg(pixels)
        .arg(out)
        .args(args)
        .current_dir(common::root())
        .output()
        .unwrap();
    ok(&o, "gradcam_reference.py");
    let (shape, values) = convflow::npy::read_f32(out).unwrap();
    let size = shape[1..].iter().product::<usize>();
    let images = String::from_utf8_lossy(&o.stdout)
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let mut heatmaps = vec![values[i * size..(i + 1) * size].to_vec()];
            let undecided = v["undecided"].as_u64().unwrap() as u32;
            if undecided > 0 {
                let (alt_shape, alt) =
                    convflow::npy::read_f32(&out.with_extension(format!("undecided{i}.npy"))).unwrap();
                assert_eq!(alt_shape[0], (1 << undecided) - 1);
                heatmaps.extend(alt.chunks(size).map(<[f32]>::to_vec));
            }
            Reference {
                class: v["class"].as_u64().unwrap() as usize,
                probability: v["probability"].as_f64().unwrap(),
                heatmaps,
            }
        })
        .collect();
    (shape, images)
}

/// Each image's heatmap in `got` is within 1e-4 of one of the reference's
/// for it (which one is printed: #0 is float64's own decisions).
fn assert_matches(what: &str, got: &[f32], want: &[Reference]) {
    let size = want[0].heatmaps[0].len();
    assert_eq!(got.len(), size * want.len(), "{what}");
    for (i, (ours, r)) in got.chunks(size).zip(want).enumerate() {
        let off = |h: &Vec<f32>| ours.iter().zip(h).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let (which, worst) = r.heatmaps.iter().map(off).enumerate().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
        eprintln!(
            "{what} image {i}: max |heatmap - numpy reference| = {worst:.2e} (#{which} of {} ways to decide its undecided units)",
            r.heatmaps.len()
        );
        assert!(worst <= 1e-4, "{what} image {i}: heatmap differs from the reference by {worst:.2e}");
    }
}

fn images_inferred(out: &Path) -> u64 {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    report["stages"].as_array().into_iter().flatten().filter_map(|s| s["details"]["images_inferred"].as_u64()).sum()
}

/// Compares one run's table and heatmaps with the reference's.
fn compare(out: &Path, t: &Trained, what: &str, args: &[&str]) -> Vec<PathBuf> {
    let rows = table(out);
    assert_eq!(rows.len(), 4, "{what}: one line per photo");
    let paths: Vec<PathBuf> = rows.iter().map(|r| PathBuf::from(&r["path"])).collect();
    let names: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(names, ["cat.1500.jpg", "cat.1501.jpg", "dog.1500.jpg", "dog.1501.jpg"], "{what}: input order");
    let px = t.dir.join(format!("{what}-pixels.npy"));
    pixels(&paths, &px);
    let (want_shape, want) = reference(&t.head, &px, &t.dir.join(format!("{what}-ref.npy")), args);
    let (shape, got) = convflow::npy::read_f32(&out.join("heatmaps.npy")).unwrap();
    assert_eq!(shape, want_shape, "{what}");
    assert_eq!(shape, [4, 9, 9], "{what}: block5's 9x9 maps of 150x150 photos");
    assert_matches(what, &got, &want);
    // Something to compare: every heatmap peaks at 1, and has more than one level.
    for (i, h) in got.chunks(81).enumerate() {
        let max = h.iter().copied().fold(0f32, f32::max);
        assert_eq!(max, 1.0, "{what}: image {i} peaks at 1");
        assert!(h.iter().any(|&v| v > 0.05 && v < 0.95), "{what}: image {i} has some shape: {h:?}");
    }
    let classes = ["cats", "dogs"];
    for (row, r) in rows.iter().zip(&want) {
        assert_eq!(row["class"], classes[r.class], "{what}: {}", row["path"]);
        let ours: f64 = row["probability"].parse().unwrap();
        assert!((ours - r.probability).abs() < 2e-6, "{what}: {} p = {ours} vs {}", row["path"], r.probability);
    }
    paths
}

#[test]
fn heatmaps_of_real_photos_are_the_numpy_references() {
    let Some(t) = trained() else { return };
    let test = t.data.join("test");

    // The last conv layer and the predicted class (the defaults), two workers.
    let out = t.dir.join("predicted");
    ok(&heatmaps(t, &out, &test, &t.cache, &[]), "heatmaps.yaml");
    let paths = compare(&out, t, "block5_conv3", &[]);
    let rows = table(&out);
    let (_, maps) = convflow::npy::read_f32(&out.join("heatmaps.npy")).unwrap();
    for (r, map) in rows.iter().zip(maps.chunks(81)) {
        assert_eq!(r["class"], r["predicted"]);
        assert_eq!(r["label"], if r["path"].contains("/cats/") { "cats" } else { "dogs" });
        // The peak's cell is the first where the heatmap is 1, and its centre in the photo.
        let (row, col): (usize, usize) = (r["peak_row"].parse().unwrap(), r["peak_col"].parse().unwrap());
        assert_eq!(map.iter().position(|&v| v == 1.0), Some(row * 9 + col), "{}", r["path"]);
        let picture = image::open(&r["picture"]).unwrap().to_rgb8();
        let (y, x): (u32, u32) = (r["peak_y"].parse().unwrap(), r["peak_x"].parse().unwrap());
        assert_eq!(
            (y, x),
            (
                ((row as f64 + 0.5) * picture.height() as f64 / 9.0) as u32,
                ((col as f64 + 0.5) * picture.width() as f64 / 9.0) as u32
            )
        );
    }

    // The pictures: the book's figure drawn, in numpy, from these heatmaps
    // on the photos as decoded here (saved losslessly for it). The one
    // rounding that may differ: an f32 against an f64 bilinear value on either
    // side of a 1/255 step of np.uint8(255 * h), one jet level: 4 x 0.4 < 2.
    let list = t.dir.join("photos.txt");
    let mut text = String::new();
    for (i, p) in paths.iter().enumerate() {
        let photo = convflow::imaging::decode::decode_image(&std::fs::read(p).unwrap(), u64::MAX).unwrap();
        let png = t.dir.join(format!("photo{i}.png"));
        photo.save(&png).unwrap();
        text.push_str(&format!("{}\n", png.display()));
    }
    std::fs::write(&list, text).unwrap();
    let drawn = t.dir.join("drawn");
    let o = std::process::Command::new(common::python())
        .arg(common::root().join("models/gradcam_reference.py"))
        .arg("--superimpose")
        .args([&list, &out.join("heatmaps.npy"), &drawn])
        .current_dir(common::root())
        .output()
        .unwrap();
    ok(&o, "gradcam_reference.py --superimpose");
    for (i, r) in rows.iter().enumerate() {
        let ours = image::open(&r["picture"]).unwrap().to_rgb8();
        assert!(
            r["picture"].ends_with(&format!("{}.png", Path::new(&r["path"]).file_stem().unwrap().to_string_lossy()))
        );
        assert!(Path::new(&r["picture"]).starts_with(&out), "{}", r["picture"]);
        let (shape, want) = read_u8(&drawn.join(format!("{i}.npy")));
        assert_eq!(shape, [ours.height() as usize, ours.width() as usize, 3], "the photo's own size");
        let diffs: Vec<u8> = ours.as_raw().iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).collect();
        let off = diffs.iter().filter(|&&d| d > 0).count();
        let worst = diffs.iter().copied().max().unwrap_or(0);
        eprintln!("picture {i}: {off} of {} values off by at most {worst}", diffs.len());
        assert!(worst <= 2 && off * 1000 <= diffs.len(), "picture {i}: {off} values differ, by up to {worst}");
        // Not the photo: the colours were added.
        let photo = image::open(t.dir.join(format!("photo{i}.png"))).unwrap().to_rgb8();
        assert_ne!(photo.as_raw(), ours.as_raw());
    }

    // The first conv layer of block5, for the class `cats` whatever is
    // predicted: the gradient now runs back through block5_conv3 and conv2.
    // Every block4 map comes from the cache.
    let out = t.dir.join("cats_conv1");
    let sets = [("layer", "block5_conv1"), ("class", "cats"), ("workers", "1")];
    ok(&heatmaps(t, &out, &test, &t.cache, &sets), "class cats");
    compare(&out, t, "block5_conv1", &["--layer", "block5_conv1", "--class", "cats"]);
    assert!(table(&out).iter().all(|r| r["class"] == "cats"));
    assert_eq!(images_inferred(&out), 0, "a rerun on the same photos runs no block4 model");
}

fn read_u8(path: &Path) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let dict = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(dict.contains("'|u1'"), "{dict}");
    let shape = dict.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape = shape.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    (shape, bytes[10 + hlen..].to_vec())
}

#[test]
fn a_bad_layer_or_class_stops_before_any_work_naming_the_stage_and_field() {
    let Some(t) = trained() else { return };
    let test = t.data.join("test");
    for (field, value, says) in [
        ("layer", "block5_conv9", "no layer `block5_conv9`"),
        ("layer", "max_pooling2d", "`max_pooling2d` is a max_pooling2d layer, not a conv layer"),
        ("layer", "dense", "not a conv layer"),
        ("class", "cows", "has classes [\"cats\", \"dogs\"]"),
    ] {
        let out = t.dir.join(format!("bad-{field}-{value}"));
        let o = heatmaps(t, &out, &test, &t.dir.join("unused_cache"), &[(field, value)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{field}={value}: a config error\n{err}");
        assert!(err.contains("gradcam") && err.contains(field) && err.contains(says), "{field}={value}:\n{err}");
        assert!(!out.exists(), "{field}={value}: nothing was written");
    }
    // The base's layers by Keras's names and the model's own are the same layers.
    let o = run(
        &["validate", "pipelines/heatmaps.yaml"],
        &[
            ("head", t.head.display().to_string()),
            ("input_dir", test.display().to_string()),
            ("layer", "conv2d_1".into()),
        ],
    );
    ok(&o, "layer conv2d_1 (= block5_conv2)");
}

/// The head was trained on caffe features of 150x150 photos (through the
/// real VGG16): maps of other pixels are refused by `validate`, naming both
/// sides, on the Grad-CAM path and on `predict.yaml` (issue 33); left `auto`,
/// both take the head's own.
#[test]
fn maps_of_other_pixels_than_the_heads_are_refused_before_any_work() {
    let Some(t) = trained() else { return };
    let test = t.data.join("test");
    for pipeline in ["pipelines/heatmaps.yaml", "pipelines/predict.yaml"] {
        let field = if pipeline.contains("heatmaps") { "model" } else { "head" };
        // The heatmaps' classifier takes block4 maps (only their pixels are compared);
        // predict.yaml's head takes the whole base's features.
        let preprocess = match field {
            "model" => vec!["preprocess `caffe`", "preprocess `rescale`"],
            _ => vec!["trained on caffe features", "this edge carries rescale features"],
        };
        for (set, says) in
            [(("preprocess", "rescale"), preprocess), (("image_size", "224"), vec!["of 150x150", "of 224x224"])]
        {
            let o = run(
                &["validate", pipeline],
                &[
                    ("head", t.head.display().to_string()),
                    ("input_dir", test.display().to_string()),
                    (set.0, set.1.to_string()),
                ],
            );
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{pipeline} {set:?}: {err}");
            assert!(err.contains(&format!("field `{field}`")), "{pipeline} {set:?}: {err}");
            assert!(says.iter().all(|s| err.contains(s)), "{pipeline} {set:?}: {err}");
        }
        let o = run(
            &["graph", pipeline],
            &[("head", t.head.display().to_string()), ("input_dir", test.display().to_string())],
        );
        let text = String::from_utf8_lossy(&o.stdout);
        ok(&o, pipeline);
        assert!(text.contains("images 150x150x3") && text.contains("caffe features of"), "{pipeline}:\n{text}");
    }
}

#[test]
fn a_corrupt_photo_is_skipped_and_listed_and_the_rest_are_drawn() {
    let Some(t) = trained() else { return };
    let input = t.dir.join("with_bad");
    for class in ["cats", "dogs"] {
        std::fs::create_dir_all(input.join(class)).unwrap();
        for e in std::fs::read_dir(t.data.join("test").join(class)).unwrap() {
            let p = e.unwrap().path();
            std::os::unix::fs::symlink(
                std::fs::canonicalize(&p).unwrap(),
                input.join(class).join(p.file_name().unwrap()),
            )
            .unwrap();
        }
    }
    let bad = input.join("cats/cat.broken.jpg");
    let mut bytes = std::fs::read(input.join("cats/cat.1500.jpg")).unwrap();
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&bad, bytes).unwrap();
    // A cache of its own: the other tests' runs may hold theirs open.
    let out = t.dir.join("with_bad_out");
    let o = heatmaps(t, &out, &input, &t.dir.join("with_bad_cache"), &[]);
    ok(&o, "a folder with a corrupt photo");
    let rows = table(&out);
    assert_eq!(rows.len(), 4, "the 4 good photos");
    assert!(rows.iter().all(|r| !r["path"].contains("broken")));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0]["path"].as_str().unwrap().ends_with("cat.broken.jpg"), "{skipped:?}");
    assert_eq!(std::fs::read_dir(out.join("cats")).unwrap().count(), 2, "a picture per good cat");
}

/// A convnet trained from scratch (two conv layers, on the photos' pixels
/// times 1/255): its heatmaps from the images themselves, for the last conv
/// layer and through a pool and a conv to the first, equal the reference's.
#[test]
fn a_convnet_from_scratch_gets_its_heatmaps_from_the_pixels() {
    let Some(t) = trained() else { return };
    let model = t.dir.join("convnet");
    let yaml = format!(
        "stages:
  - {{id: files, kind: file_reader, dir: {data}, splits: [train, validation], class_mode: binary}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [150, 150]}}
  - id: net
    kind: convnet
    input: resize
    out_dir: {out}
    rescale: 0.00392156862745098
    epochs: 2
    batch_size: 4
    threads: 1
    layers:
      - {{kind: conv2d, filters: 4, kernel_size: 3, strides: 2, activation: relu}}
      - {{kind: max_pooling2d}}
      - {{kind: conv2d, filters: 8, kernel_size: 3, activation: relu}}
      - {{kind: max_pooling2d}}
      - {{kind: flatten}}
      - {{kind: dense, units: 1, activation: sigmoid}}
",
        data = t.data.display(),
        out = model.display()
    );
    let train = common::write_pipeline(&t.dir, "train_convnet.yaml", &yaml);
    ok(&common::bin().args(["run", "-q"]).arg(&train).output().unwrap(), "training a convnet");
    for (layer, shape) in [(None, [4, 35, 35]), (Some("conv2d"), [4, 74, 74])] {
        let out = t.dir.join(format!("convnet-{}", layer.unwrap_or("last")));
        let layer_line = layer.map(|l| format!("    layer: {l}\n")).unwrap_or_default();
        let yaml = format!(
            "stages:
  - {{id: files, kind: file_reader, dir: {test}, class_mode: categorical}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [150, 150]}}
  - id: gradcam
    kind: gradcam
    input: resize
    model: {model}
    out_dir: {out}
{layer_line}",
            test = t.data.join("test").display(),
            model = model.display(),
            out = out.display()
        );
        let p = common::write_pipeline(&t.dir, "convnet_gradcam.yaml", &yaml);
        ok(&common::bin().args(["run", "-q"]).arg(&p).output().unwrap(), "gradcam on a convnet");
        let paths: Vec<PathBuf> = table(&out).iter().map(|r| PathBuf::from(&r["path"])).collect();
        assert_eq!(paths.len(), 4);
        let px = t.dir.join("convnet-pixels.npy");
        pixels(&paths, &px);
        let args: Vec<&str> = layer.map(|l| vec!["--layer", l]).unwrap_or_default();
        let (want_shape, want) = reference(&model, &px, &t.dir.join("convnet-ref.npy"), &args);
        let (got_shape, got) = convflow::npy::read_f32(&out.join("heatmaps.npy")).unwrap();
        assert_eq!((got_shape.as_slice(), want_shape.as_slice()), (shape.as_slice(), shape.as_slice()));
        assert_matches(&format!("convnet {layer:?}"), &got, &want);
        // A barely trained convnet: a map may weigh wholly against the class
        // (all zero, and then no peak in the CSV); most do not.
        let per = shape[1] * shape[2];
        let maxima: Vec<f32> = got.chunks(per).map(|h| h.iter().copied().fold(0f32, f32::max)).collect();
        assert!(maxima.iter().all(|&m| m == 0.0 || m == 1.0) && maxima.contains(&1.0), "{maxima:?}");
        for ((row, r), max) in table(&out).iter().zip(&want).zip(&maxima) {
            assert_eq!(row["class"], ["cats", "dogs"][r.class]);
            let p = r.probability;
            assert!((row["probability"].parse::<f64>().unwrap() - p).abs() < 2e-6, "{row:?} vs {p}");
            assert_eq!(row["peak_row"].is_empty(), *max == 0.0, "{row:?}");
        }
    }
}

/// `pipelines/fine_tune_from_head.yaml` with learning rate 0 saves block5 and the head
/// unchanged as one convnet (its layers named conv2d, conv2d_1, ...): the
/// heatmaps of that folder are those of the head's, bit for bit, for
/// `block5_conv2` by either name.
#[test]
fn a_fine_tuned_vgg16_before_any_step_has_the_heads_heatmaps() {
    let Some(t) = trained() else { return };
    let tuned = t.dir.join("fine_tuned");
    let cache = t.dir.join("fine_tune_cache");
    let o = run(
        &["run", "-q", "pipelines/fine_tune_from_head.yaml"],
        &[
            ("data_dir", t.data.display().to_string()),
            ("out_dir", tuned.display().to_string()),
            ("cache_dir", cache.display().to_string()),
            ("head", t.head.display().to_string()),
            ("epochs", "1".into()),
            ("variants", "1".into()),
            ("threads", "1".into()),
            ("learning_rate", "0.0".into()),
        ],
    );
    ok(&o, "fine-tuning with lr 0");
    let test = t.data.join("test");
    let (a, b) = (t.dir.join("tuned_heatmaps"), t.dir.join("head_heatmaps"));
    let tuned_run = run(
        &["run", "-q", "pipelines/heatmaps.yaml"],
        &[
            ("head", tuned.display().to_string()),
            ("input_dir", test.display().to_string()),
            ("out_dir", a.display().to_string()),
            ("cache_dir", cache.display().to_string()),
            ("layer", "conv2d_1".into()),
        ],
    );
    ok(&tuned_run, "heatmaps of the fine-tuned folder");
    ok(&heatmaps(t, &b, &test, &cache, &[("layer", "block5_conv2")]), "heatmaps of the head");
    let (ta, tb) = (table(&a), table(&b));
    assert_eq!(ta.len(), 4);
    for (x, y) in ta.iter().zip(&tb) {
        for k in ["path", "class", "probability", "peak_row", "peak_col"] {
            assert_eq!(x[k], y[k], "{k}");
        }
    }
    let (ha, hb) = (
        convflow::npy::read_f32(&a.join("heatmaps.npy")).unwrap(),
        convflow::npy::read_f32(&b.join("heatmaps.npy")).unwrap(),
    );
    assert_eq!(ha, hb);
    assert!(ha.1.iter().any(|&v| v > 0.0 && v < 1.0), "heatmaps with some shape");
}

/// A head trained on VGG19's features (`models/bases.sh vgg19`): Grad-CAM
/// runs VGG19's blocks 1-4 in ONNX Runtime and its four-conv block5 in
/// convflow's own layers, and gives the head's own probabilities (those of
/// `predict.yaml` on `vgg19_notop.onnx`'s features); `block5_conv4` is a
/// layer; VGG16's block4 maps, of the same shape, are refused by `validate`.
#[test]
fn a_head_on_vgg19_features_gets_vgg19_heatmaps_with_the_heads_probabilities() {
    let vgg19 = ["vgg19_notop.onnx", "vgg19_block4.onnx", "vgg19_convs.safetensors"];
    if vgg19.iter().any(|f| !common::root().join("models").join(f).exists()) {
        assert!(std::env::var_os("CI").is_none(), "tests/setup.sh runs models/bases.sh vgg19");
        eprintln!("skipping: models/bases.sh vgg19 has not run");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(data) = small_data(tmp.path()) else { return };
    let (head, cache) = (tmp.path().join("head"), tmp.path().join("cache"));
    let o = run(
        &["run", "-q", "pipelines/feature_extraction.yaml"],
        &[
            ("data_dir", data.display().to_string()),
            ("out_dir", head.display().to_string()),
            ("cache_dir", cache.display().to_string()),
            ("base", "vgg19".into()),
            ("image_size", "150".into()),
            ("epochs", "2".into()),
        ],
    );
    ok(&o, "training a head on VGG19's features");
    let test = data.join("test");
    let predictions = tmp.path().join("predictions.csv");
    let o = run(
        &["run", "-q", "pipelines/predict.yaml"],
        &[
            ("head", head.display().to_string()),
            ("input_dir", test.display().to_string()),
            ("out", predictions.display().to_string()),
            ("cache_dir", cache.display().to_string()),
            ("base", "vgg19".into()),
        ],
    );
    ok(&o, "predict.yaml on VGG19's features");
    let t = Trained { dir: tmp.path().to_path_buf(), data: data.clone(), head: head.clone(), cache: cache.clone() };
    let out = tmp.path().join("heatmaps");
    let block4 = common::root().join("models/vgg19_block4.onnx").display().to_string();
    ok(&heatmaps(&t, &out, &test, &cache, &[("block4", &block4)]), "heatmaps.yaml on VGG19's block4 maps");

    let predicted: std::collections::HashMap<String, f64> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let (cats, dogs): (f64, f64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
            (f[0].to_string(), cats.max(dogs))
        })
        .collect();
    let rows = table(&out);
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let ours: f64 = r["probability"].parse().unwrap();
        let want = predicted[&r["path"]];
        assert!((ours - want).abs() < 1e-5, "{}: Grad-CAM's p = {ours}, the head's on vgg19_notop = {want}", r["path"]);
    }
    let (shape, maps) = convflow::npy::read_f32(&out.join("heatmaps.npy")).unwrap();
    assert_eq!(shape, [4, 9, 9]);
    for h in maps.chunks(81) {
        assert_eq!(h.iter().copied().fold(0f32, f32::max), 1.0);
    }

    // VGG19's last conv by name; a fifth is no layer, and the message lists block5_conv4.
    let named = tmp.path().join("conv4");
    let sets = [("block4", block4.as_str()), ("layer", "block5_conv4")];
    ok(&heatmaps(&t, &named, &test, &cache, &sets), "layer block5_conv4");
    assert_eq!(std::fs::read(named.join("heatmaps.npy")).unwrap(), std::fs::read(out.join("heatmaps.npy")).unwrap());
    let o = heatmaps(&t, &tmp.path().join("conv5"), &test, &cache, &[("block4", &block4), ("layer", "block5_conv5")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("block5_conv4") && err.contains("field `layer`"), "{err}");

    // VGG16's blocks 1-4 give maps of the same shape: refused before any work.
    let o = heatmaps(&t, &tmp.path().join("mixed"), &test, &cache, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("vgg19_block5") && err.contains("vgg16_block4.onnx") && err.contains("vgg19_block4.onnx"),
        "{err}"
    );
    assert!(!tmp.path().join("mixed").join("heatmaps.csv").exists());
}
