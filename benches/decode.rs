//! Per-image cost of `decode` and `resize` on real photos, 150x150 target:
//!   decode/full              - the default: full decode (JPEG: libjpeg-turbo, PIL's pixels)
//!   decode/full_image_rs     - the `image` crate's decoders (zune-jpeg), the default before:
//!                              side by side with decode/full in one run
//!   decode/min_size_150      - `min_size: 150`: libjpeg-turbo at the smallest DCT scale >= 150x150
//!   resize_150/<filter>/...  - `resize` from a full decode and from a scaled one;
//!                              nearest_fir: fast_image_resize's nearest, the rule before PIL's
//!   decode_resize_150/...    - both, what the pipeline's two stages cost one image
//!   decode_resize_150/min_size_150/nearest/2_threads - the same on two threads
//!                              sharing the photos, nothing else: the most a
//!                              two-core machine can get out of these two
//!                              stages, the ceiling for `decode_resize.yaml`
//!
//!   cargo bench --bench decode [-- FILTER]
//!
//! Each iteration handles one image, cycling through ~50 photos
//! (CONVFLOW_BENCH_IMAGES, default 50) of the book's training set
//! (CONVFLOW_BENCH_DATA; the fixture images when the shared data is absent),
//! so criterion's time is per image and its throughput is images/s.
//! The augment stage's per-image costs are in benches/augment.rs.

mod common;

use std::hint::black_box;

use convflow::imaging::decode::{Decoder, decode_image, decode_image_rs};
use convflow::imaging::resize::{Filter, Resize};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use image::RgbImage;

fn benches(c: &mut Criterion) {
    let n = std::env::var("CONVFLOW_BENCH_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let photos = common::photos(&common::data_dir(), n);
    let bytes: Vec<&[u8]> = photos.iter().map(|(_, b)| b.as_slice()).collect();
    let mut scaled = Decoder::new(u64::MAX, Some((150, 150))).expect("libjpeg decoder");

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("full", |b| {
        b.iter(|| {
            i += 1;
            black_box(decode_image(bytes[i % bytes.len()], u64::MAX).expect("decodes"))
        })
    });
    g.bench_function("full_image_rs", |b| {
        b.iter(|| {
            i += 1;
            black_box(decode_image_rs(bytes[i % bytes.len()], u64::MAX).expect("decodes"))
        })
    });
    g.bench_function("min_size_150", |b| {
        b.iter(|| {
            i += 1;
            black_box(scaled.decode(bytes[i % bytes.len()]).expect("decodes"))
        })
    });
    g.finish();

    let full: Vec<RgbImage> = bytes.iter().map(|b| decode_image(b, u64::MAX).expect("decodes")).collect();
    let small: Vec<RgbImage> = bytes.iter().map(|b| scaled.decode(b).expect("decodes")).collect();
    let mut g = c.benchmark_group("resize_150");
    g.throughput(Throughput::Elements(1));
    for (filter, name) in [(Filter::Nearest, "nearest"), (Filter::Bilinear, "bilinear")] {
        let mut resize = Resize::new(150, 150, filter);
        for (from, images) in [("from_full", &full), ("from_min_size_150", &small)] {
            g.bench_function(format!("{name}/{from}"), |b| {
                b.iter_batched(
                    || {
                        i += 1;
                        images[i % images.len()].clone()
                    },
                    |img| black_box(resize.apply(img).expect("resizes")),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    // fast_image_resize's nearest, the rule `resize` followed before PIL's.
    let mut fir = fast_image_resize::Resizer::new();
    let options = fast_image_resize::ResizeOptions::new().resize_alg(fast_image_resize::ResizeAlg::Nearest);
    g.bench_function("nearest_fir/from_full", |b| {
        b.iter_batched(
            || {
                i += 1;
                full[i % full.len()].clone()
            },
            |img| {
                let (w, h) = img.dimensions();
                let src = fast_image_resize::images::Image::from_vec_u8(
                    w,
                    h,
                    img.into_raw(),
                    fast_image_resize::PixelType::U8x3,
                )
                .expect("image");
                let mut dst = fast_image_resize::images::Image::new(150, 150, fast_image_resize::PixelType::U8x3);
                fir.resize(&src, &mut dst, &options).expect("resizes");
                black_box(dst)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("decode_resize_150");
    g.throughput(Throughput::Elements(1));
    let mut resize = Resize::new(150, 150, Filter::Nearest);
    g.bench_function("full/nearest", |b| {
        b.iter(|| {
            i += 1;
            let img = decode_image(bytes[i % bytes.len()], u64::MAX).expect("decodes");
            black_box(resize.apply(img).expect("resizes"))
        })
    });
    g.bench_function("full_image_rs/nearest_fir", |b| {
        b.iter(|| {
            i += 1;
            let img = decode_image_rs(bytes[i % bytes.len()], u64::MAX).expect("decodes");
            let (w, h) = img.dimensions();
            let src =
                fast_image_resize::images::Image::from_vec_u8(w, h, img.into_raw(), fast_image_resize::PixelType::U8x3)
                    .expect("image");
            let mut dst = fast_image_resize::images::Image::new(150, 150, fast_image_resize::PixelType::U8x3);
            fir.resize(&src, &mut dst, &options).expect("resizes");
            black_box(dst)
        })
    });
    g.bench_function("min_size_150/nearest", |b| {
        b.iter(|| {
            i += 1;
            let img = scaled.decode(bytes[i % bytes.len()]).expect("decodes");
            black_box(resize.apply(img).expect("resizes"))
        })
    });
    g.finish();

    // Every photo once per iteration, split between two threads that each
    // keep their decoder and resizer, as the pipeline's workers do.
    let mut g = c.benchmark_group("decode_resize_150");
    g.throughput(Throughput::Elements(bytes.len() as u64));
    let mut workers: Vec<(Decoder, Resize)> = (0..2)
        .map(|_| {
            (Decoder::new(u64::MAX, Some((150, 150))).expect("libjpeg decoder"), Resize::new(150, 150, Filter::Nearest))
        })
        .collect();
    g.bench_function("min_size_150/nearest/2_threads", |b| {
        b.iter(|| {
            std::thread::scope(|s| {
                for (t, (decoder, resize)) in workers.iter_mut().enumerate() {
                    let bytes = &bytes;
                    s.spawn(move || {
                        for b in bytes.iter().skip(t).step_by(2) {
                            black_box(resize.apply(decoder.decode(b).expect("decodes")).expect("resizes"));
                        }
                    });
                }
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = decode;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(4));
    targets = benches
}
criterion_main!(decode);
