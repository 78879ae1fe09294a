//! The `augment` warp with the book's augmentation (rotation 40, shifts
//! 0.2, shear 0.2, zoom 0.2, horizontal flip, fill nearest) on real photos:
//! median microseconds per 150x150 warp (Keras's path: resize first) and per
//! fused warp (full-size photo straight to 150x150), SIMD and scalar; one
//! thread's decode + resize + augment rate; and how far the fused output is
//! from resize-then-augment. Each call is timed alone and medians are
//! reported, so preemption by other jobs on a shared machine drops out.
//!
//!   cargo bench --bench augment
//!
//! Env: CONVFLOW_AUGMENT_DATA (a folder with cats/ and dogs/; default the
//! book's train split beside the checkout; 50 synthetic 500x375 pictures
//! when absent), CONVFLOW_AUGMENT_IMAGES (50), CONVFLOW_AUGMENT_REPEATS (20).

use std::path::{Path, PathBuf};
use std::time::Instant;

use convflow::augment::{AugmentOptions, Kernel, apply_transform_with};
use convflow::stages::decode::decode_image;
use convflow::stages::resize::{Filter, Resize};
use image::RgbImage;

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The first `n / 2` files of each class, as encoded bytes.
fn photos(dir: &Path, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for class in ["cats", "dogs"] {
        let Ok(entries) = std::fs::read_dir(dir.join(class)) else { continue };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        out.extend(files.iter().take(n / 2).filter_map(|p| std::fs::read(p).ok()));
    }
    out
}

fn synthetic(i: usize) -> RgbImage {
    RgbImage::from_fn(500, 375, |x, y| {
        let v = |a: f32| (127.5 + 127.5 * a.sin()) as u8;
        let (x, y, k) = (x as f32, y as f32, i as f32);
        image::Rgb([v(x / (9.0 + k) + y / 23.0), v(y / 7.0 + k), v((x - y) / 15.0)])
    })
}

fn mad(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len() as f64;
    a.as_raw().iter().zip(b.as_raw()).map(|(p, q)| f64::from(p.abs_diff(*q))).sum::<f64>() / n
}

/// Median over images of the median time of one call of `f(image, repeat)`.
/// Each call is timed alone: on a machine shared with other jobs, a call
/// now and then spans a preemption, and medians drop those.
fn per_image_us(images: &[RgbImage], repeats: u32, mut f: impl FnMut(&RgbImage, u32) -> RgbImage) -> f64 {
    let times = images
        .iter()
        .map(|img| {
            let each = (0..repeats)
                .map(|r| {
                    let start = Instant::now();
                    std::hint::black_box(f(img, r));
                    start.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            median(each)
        })
        .collect();
    median(times)
}

/// Median microseconds of `f` over the items.
fn each_us<T>(items: &[T], mut f: impl FnMut(usize, &T)) -> f64 {
    median(
        items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let start = Instant::now();
                f(i, x);
                start.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    )
}

fn main() {
    let n: usize = env_num("CONVFLOW_AUGMENT_IMAGES", 50);
    let repeats: u32 = env_num("CONVFLOW_AUGMENT_REPEATS", 20);
    let dir = std::env::var_os("CONVFLOW_AUGMENT_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/cats_and_dogs_small/train"));
    let encoded = photos(&dir, n);
    let (full, source): (Vec<RgbImage>, String) = if encoded.is_empty() {
        ((0..n).map(synthetic).collect(), "synthetic 500x375 pictures".into())
    } else {
        let imgs = encoded.iter().filter_map(|b| decode_image(b, u64::MAX).ok()).collect();
        (imgs, format!("photos from {}", dir.display()))
    };
    let mut resize = Resize::new(150, 150, Filter::Nearest);
    let small: Vec<RgbImage> = full.iter().map(|img| resize.apply(img.clone()).unwrap_or_default()).collect();
    let fused = AugmentOptions::book();
    let plain = AugmentOptions { size: None, ..fused.clone() };
    let hash = [0u8; 32];
    let warp = |opts: &AugmentOptions, kernel: Kernel| {
        let opts = opts.clone();
        move |img: &RgbImage, r: u32| {
            let t = opts.transform_for(img, r, 0, &hash);
            apply_transform_with(img, &t, opts.fill(), opts.size(), kernel)
        }
    };
    let mean_px = full.iter().map(|i| f64::from(i.width() * i.height())).sum::<f64>() / full.len() as f64;
    println!(
        "augment (draw + warp), book parameters, {} {source} (mean {:.0} pixels); median over images of the median call over {repeats} draws:",
        full.len(),
        mean_px
    );
    let plain_simd = per_image_us(&small, repeats, warp(&plain, Kernel::Auto));
    let plain_scalar = per_image_us(&small, repeats, warp(&plain, Kernel::Scalar));
    let fused_simd = per_image_us(&full, repeats, warp(&fused, Kernel::Auto));
    let fused_scalar = per_image_us(&full, repeats, warp(&fused, Kernel::Scalar));
    println!("  150x150 warp (after resize)       {plain_simd:8.1} us   scalar {plain_scalar:8.1} us");
    println!("  fused full-size -> 150x150 warp   {fused_simd:8.1} us   scalar {fused_scalar:8.1} us");

    if !encoded.is_empty() {
        let decode_us = each_us(&encoded, |_, b| {
            std::hint::black_box(decode_image(b, u64::MAX).ok());
        });
        let resize_us = each_us(&full, |_, img| {
            std::hint::black_box(resize.apply(img.clone()).ok());
        });
        let copy_us = each_us(&full, |_, img| {
            std::hint::black_box(img.clone());
        });
        let two = decode_us + (resize_us - copy_us) + plain_simd;
        let one = decode_us + fused_simd;
        println!("  decode (median)                   {decode_us:8.1} us   resize {:8.1} us", resize_us - copy_us);
        println!("  one thread, decode + resize + augment   {:7.0} images/s", 1e6 / two);
        println!("  one thread, decode + fused augment      {:7.0} images/s", 1e6 / one);
        println!("  (Keras ImageDataGenerator, one process here: 356 images/s)");
    }

    // The same draw both ways: how much the fused warp differs from
    // Keras's path, next to how much Keras's own resize filters differ.
    let mut bilinear = Resize::new(150, 150, Filter::Bilinear);
    let (mut fused_vs_nearest, mut fused_vs_bilinear, mut nearest_vs_bilinear) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (big, small)) in full.iter().zip(&small).enumerate() {
        let t = fused.transform_for(big, i as u32, 0, &hash);
        let one = apply_transform_with(big, &t, fused.fill(), fused.size(), Kernel::Auto);
        let two = apply_transform_with(small, &t, plain.fill(), None, Kernel::Auto);
        let smooth = bilinear.apply(big.clone()).unwrap_or_default();
        let three = apply_transform_with(&smooth, &t, plain.fill(), None, Kernel::Auto);
        fused_vs_nearest.push(mad(&one, &two));
        fused_vs_bilinear.push(mad(&one, &three));
        nearest_vs_bilinear.push(mad(&two, &three));
    }
    println!("  MAD (median over images, levels of 255) of augmented outputs, same draw:");
    println!("    fused vs resize (nearest, Keras's default) then augment  {:5.2}", median(fused_vs_nearest));
    println!("    fused vs resize (bilinear) then augment                  {:5.2}", median(fused_vs_bilinear));
    println!("    resize nearest vs resize bilinear, both then augment     {:5.2}", median(nearest_vs_bilinear));
}
