//! One training epoch of the book's two from-scratch convnets on images in
//! memory, convflow's side of `benches/peer/keras_convnet.py` (Keras on
//! TensorFlow CPU) with the same shapes, counts, batch sizes and optimizer:
//!
//!   mnist      28x28x1, 60,000 images, batch 64, RMSprop (1e-3), categorical (5.1)
//!   cats_dogs  150x150x3, 2,000 images, batch 20, RMSprop lr 1e-4, binary (5.2)
//!   fine_tune  VGG16's block5 + the book's head on 2,000 block4 maps [9, 9, 512]
//!              (150x150 images, blocks 1-4 frozen and cached), batch 20,
//!              RMSprop lr 1e-5, binary (5.3.3; the peer runs the whole VGG16)
//!
//! Random pixels (speed does not depend on content), a few warm-up steps,
//! then the timed epoch: every image once, in a shuffled order as Keras's
//! `fit` does, forward, backward and the RMSprop update, on all cores.
//! Prints one JSON line per model, in the peer's format.
//! `benches/convnet_vs_keras.sh` runs both sides in turn and prints the table.
//!
//!   cargo bench --bench convnet_epoch [-- mnist|cats_dogs|fine_tune]
//!
//! Env: CONVFLOW_KERAS_IMAGES caps the images per epoch (as for the peer);
//! CONVFLOW_CONVNET_THREADS (default: the machine's cores).

mod common;

use std::time::Instant;

use common::convnets::{block5, cats_dogs, mnist};
use convflow::ml::convnet::{ConvOptimizer, Convnet, LayerSpec};
use convflow::ml::optimizer::OptimizerSpec;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() {
    let threads = std::env::var("CONVFLOW_CONVNET_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let cap: Option<usize> = std::env::var("CONVFLOW_KERAS_IMAGES").ok().and_then(|v| v.parse().ok());
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    for (name, (input, layers), images, batch, lr) in [
        ("mnist", mnist(), 60_000, 64, 1e-3),
        ("cats_dogs", cats_dogs(), 2_000, 20, 1e-4),
        ("fine_tune", block5(), 2_000, 20, 1e-5),
    ] {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        let n = cap.map_or(images, |c| c.min(images));
        let per = input.iter().product::<usize>();
        let classes = match layers.last() {
            Some(LayerSpec::Dense { units, .. }) => *units,
            _ => 1,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let x: Vec<f32> = (0..n * per).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let y: Vec<f32> = if classes == 1 {
            (0..n).map(|i| (i % 2) as f32).collect()
        } else {
            (0..n * classes).map(|j| f32::from(u8::from(j % classes == (j / classes) % classes))).collect()
        };
        let mut model = Convnet::new(input, &layers, 0, threads).expect("the bench's layers are valid");
        let mut opt = ConvOptimizer::new(OptimizerSpec::rmsprop(lr));
        let (mut xb, mut yb) = (Vec::with_capacity(batch * per), Vec::with_capacity(batch * classes));
        let mut step = |model: &mut Convnet, opt: &mut ConvOptimizer, rows: &[usize], rng: &mut ChaCha8Rng| {
            xb.clear();
            yb.clear();
            for &i in rows {
                xb.extend_from_slice(&x[i * per..(i + 1) * per]);
                yb.extend_from_slice(&y[i * classes..(i + 1) * classes]);
            }
            model.train_batch(&xb, &yb, rows.len(), opt, rng).expect("shapes fit");
        };
        let mut order: Vec<usize> = (0..n).collect();
        for chunk in order.chunks(batch).take(3) {
            step(&mut model, &mut opt, chunk, &mut rng);
        }
        order.shuffle(&mut rng);
        let started = Instant::now();
        for chunk in order.chunks(batch) {
            step(&mut model, &mut opt, chunk, &mut rng);
        }
        let s = started.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "model": name, "images": n, "batch": batch, "seconds": (s * 1000.0).round() / 1000.0,
                "images_per_second": (n as f64 / s * 10.0).round() / 10.0, "params": model.param_count(),
                "threads": threads,
            })
        );
    }
}
