//! One training step (forward, backward, RMSprop) of the convnet layers at
//! batch 20 (64 for MNIST), the figures behind the choice of training backend (the
//! trainable-convolutions issue):
//!   convnet/block5     - VGG16's block5 on [20, 9, 9, 512]: three 3x3
//!                        convs of 512 channels (same), the pool, the book's
//!                        head (Flatten, Dense 256 relu, Dense 1 sigmoid);
//!                        about 61 GFLOP (the first conv needs no input gradient)
//!   convnet/cats_dogs  - the book's 150x150 cats-vs-dogs convnet (5.2),
//!                        about 28 GFLOP
//!   convnet/mnist      - the book's MNIST convnet (5.1) at its batch of 64:
//!                        images/s to set beside Keras's
//!                        (benches/peer/keras_convnet.py)
//! Before criterion's samples it prints the median of a few steps in
//! GFLOP/s, to set beside the machine's sgemm rate (benches/peer/sgemm.py).
//!
//!   cargo bench --bench convnet [-- block5|cats_dogs]
//!
//! Env: CONVFLOW_CONVNET_THREADS (default: the machine's cores).

use std::time::{Duration, Instant};

mod common;

use common::convnets::{block5, cats_dogs, mnist};
use convflow::ml::convnet::{ConvOptimizer, Convnet, LayerSpec};
use convflow::ml::optimizer::OptimizerSpec;
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// FLOP of one training step: 2 per multiply-add, three products per layer
/// (forward, weight gradient, input gradient) except the first layer's
/// input gradient, which nobody needs.
fn step_flop(m: &Convnet, batch: usize) -> f64 {
    let mut total = 0.0;
    for (i, l) in m.layers().iter().enumerate() {
        let macs = match (l.conv, &l.spec) {
            (Some(g), _) => g.macs() as f64,
            (None, LayerSpec::Dense { units, .. }) => (l.input.len() * units) as f64,
            _ => 0.0,
        };
        total += macs * if i == 0 { 2.0 } else { 3.0 };
    }
    2.0 * total * batch as f64
}

struct Case {
    model: Convnet,
    opt: ConvOptimizer,
    x: Vec<f32>,
    y: Vec<f32>,
    rng: ChaCha8Rng,
    batch: usize,
}

impl Case {
    fn new(input: [usize; 3], layers: &[LayerSpec], batch: usize, threads: usize) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let x = (0..batch * input.iter().product::<usize>()).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let classes = match layers.last() {
            Some(LayerSpec::Dense { units, .. }) => *units,
            _ => 1,
        };
        let y = if classes == 1 {
            (0..batch).map(|i| (i % 2) as f32).collect()
        } else {
            (0..batch * classes).map(|i| f32::from(u8::from(i % classes == (i / classes) % classes))).collect()
        };
        let model = Convnet::new(input, layers, 0, threads).expect("the bench's layers are valid");
        Case { model, opt: ConvOptimizer::new(OptimizerSpec::rmsprop(1e-4)), x, y, rng, batch }
    }

    fn step(&mut self) {
        self.model.train_batch(&self.x, &self.y, self.batch, &mut self.opt, &mut self.rng).expect("shapes fit");
    }
}

fn bench(c: &mut Criterion) {
    let threads = std::env::var("CONVFLOW_CONVNET_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let mut group = c.benchmark_group("convnet");
    group.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(20));
    for (name, (input, layers), batch) in
        [("block5", block5(), 20), ("cats_dogs", cats_dogs(), 20), ("mnist", mnist(), 64)]
    {
        let mut case = Case::new(input, &layers, batch, threads);
        let flop = step_flop(&case.model, batch);
        case.step();
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                case.step();
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "convnet/{name}: {:.1} GFLOP per step of {batch}, median {:.3} s = {:.1} GFLOP/s, {:.0} images/s ({threads} threads)",
            flop / 1e9,
            median,
            flop / median / 1e9,
            batch as f64 / median
        );
        group.bench_function(name, |b| b.iter(|| case.step()));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
