//! Per-image cost of the `augment` stage with the book's augmentation
//! (rotation 40, shifts 0.2, shear 0.2, zoom 0.2, horizontal flip, fill
//! nearest), 150x150 target, on the book's photos. Criterion benches, one
//! image and one fresh draw per iteration (so the time is per image and the
//! throughput images/s):
//!   augment/warp_150/{simd,scalar}   - draw + warp of a 150x150 image
//!                                      (Keras's path: resize first)
//!   augment/fused_150/{simd,scalar}  - `size: [150, 150]`: the full-size
//!                                      photo straight to 150x150, one warp
//!   augment/decode_resize_augment_150 - the training branch's whole work on
//!                                      one image: decode, resize, augment
//!   augment/decode_fused_150          - decode, fused augment
//! Before them it prints how far the fused output is from resize-then-augment
//! for the same draws (mean absolute difference in levels of 255), beside how
//! far Keras's own resize filters are from each other.
//!
//!   cargo bench --bench augment [-- FILTER]
//!
//! Images: ~50 photos (CONVFLOW_BENCH_IMAGES) of CONVFLOW_BENCH_DATA, else the
//! book's training split beside the checkout, else the fixture images.

mod common;

use std::hint::black_box;

use convflow::augment::{AugmentOptions, Kernel, apply_transform_with};
use convflow::imaging::decode::decode_image;
use convflow::imaging::resize::{Filter, Resize};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use image::RgbImage;

const HASH: [u8; 32] = [0; 32];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mad(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len() as f64;
    a.as_raw().iter().zip(b.as_raw()).map(|(p, q)| f64::from(p.abs_diff(*q))).sum::<f64>() / n
}

/// Draw number `i` for `img` and warp it.
fn augment(opts: &AugmentOptions, img: &RgbImage, i: usize, kernel: Kernel) -> RgbImage {
    let t = opts.transform_for(img, 0, i as u32, &HASH);
    apply_transform_with(img, &t, opts.fill(), opts.size(), kernel)
}

/// The fused warp against Keras's path (resize, then warp), same draws.
fn print_fused_distance(full: &[RgbImage], small: &[RgbImage], fused: &AugmentOptions, plain: &AugmentOptions) {
    let mut bilinear = Resize::new(150, 150, Filter::Bilinear);
    let (mut vs_nearest, mut vs_bilinear, mut nearest_vs_bilinear) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (big, small)) in full.iter().zip(small).enumerate() {
        let t = fused.transform_for(big, 0, i as u32, &HASH);
        let one = apply_transform_with(big, &t, fused.fill(), fused.size(), Kernel::Auto);
        let two = apply_transform_with(small, &t, plain.fill(), None, Kernel::Auto);
        let smooth = bilinear.apply(big.clone()).expect("resizes");
        let three = apply_transform_with(&smooth, &t, plain.fill(), None, Kernel::Auto);
        vs_nearest.push(mad(&one, &two));
        vs_bilinear.push(mad(&one, &three));
        nearest_vs_bilinear.push(mad(&two, &three));
    }
    println!("augment: MAD (median over {} images, levels of 255) of augmented outputs, same draw:", full.len());
    println!("  fused vs resize (nearest, Keras's default) then augment  {:5.2}", median(vs_nearest));
    println!("  fused vs resize (bilinear) then augment                  {:5.2}", median(vs_bilinear));
    println!("  resize nearest vs resize bilinear, both then augment     {:5.2}", median(nearest_vs_bilinear));
}

fn benches(c: &mut Criterion) {
    let n = std::env::var("CONVFLOW_BENCH_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let photos = common::photos(&common::data_dir(), n);
    let bytes: Vec<&[u8]> = photos.iter().map(|(_, b)| b.as_slice()).collect();
    let full: Vec<RgbImage> = bytes.iter().map(|b| decode_image(b, u64::MAX).expect("decodes")).collect();
    let mut resize = Resize::new(150, 150, Filter::Nearest);
    let small: Vec<RgbImage> = full.iter().map(|img| resize.apply(img.clone()).expect("resizes")).collect();
    let fused = AugmentOptions::book();
    let plain = AugmentOptions { size: None, ..fused.clone() };
    print_fused_distance(&full, &small, &fused, &plain);

    let mut g = c.benchmark_group("augment");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    for (kernel, name) in [(Kernel::Auto, "simd"), (Kernel::Scalar, "scalar")] {
        g.bench_function(format!("warp_150/{name}"), |b| {
            b.iter(|| {
                i += 1;
                black_box(augment(&plain, &small[i % small.len()], i, kernel))
            })
        });
        g.bench_function(format!("fused_150/{name}"), |b| {
            b.iter(|| {
                i += 1;
                black_box(augment(&fused, &full[i % full.len()], i, kernel))
            })
        });
    }
    g.bench_function("decode_resize_augment_150", |b| {
        b.iter(|| {
            i += 1;
            let img = resize.apply(decode_image(bytes[i % bytes.len()], u64::MAX).expect("decodes")).expect("resizes");
            black_box(augment(&plain, &img, i, Kernel::Auto))
        })
    });
    g.bench_function("decode_fused_150", |b| {
        b.iter(|| {
            i += 1;
            let img = decode_image(bytes[i % bytes.len()], u64::MAX).expect("decodes");
            black_box(augment(&fused, &img, i, Kernel::Auto))
        })
    });
    g.finish();
}

criterion_group! {
    name = augment_benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(4));
    targets = benches
}
criterion_main!(augment_benches);
