//! The book's dense head (5.3.1) on cached VGG16 features: Dense(256, relu),
//! Dropout(0.5), Dense(1, sigmoid), RMSprop(lr 2e-5), batch 20, validation
//! on 1000 rows after every epoch. Criterion benches:
//!   head/epoch      - one training epoch over 2000 rows plus its validation,
//!                     on a head that keeps training from one iteration to
//!                     the next (the cost of an epoch does not depend on it)
//!   head/validate   - the validation part of an epoch alone (1000 rows)
//!   head/30_epochs  - the book's whole run from a fresh head (10 samples of
//!                     one run each); the figure the trainer issue's 5 s
//!                     target and benches/compare.py read
//! Before them it trains once and prints the accuracy every 5 epochs and a
//! digest of the final weights: equal digests mean bit-identical training,
//! so a faster kernel that changes results shows here.
//!
//!   cargo bench --bench head [-- epoch|30_epochs]
//!
//! Env: CONVFLOW_HEAD_FEATURES (a folder with train/ and validation/, each
//! holding features.npy and labels.npy; default /tmp/real/out; when absent,
//! data of the same shape and ~71% zeros is synthesized), CONVFLOW_HEAD_THREADS
//! (default: the machine's cores), CONVFLOW_HEAD_SEED (0).

use std::path::Path;
use std::time::{Duration, Instant};

use convflow::ml::head::{BOOK_INPUT_DIM, Head, LayerSpec, Optimizer, OptimizerSpec};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 20;
const EPOCHS: usize = 30;

struct Split {
    x: Vec<f32>,
    y: Vec<f32>,
    rows: usize,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn load(dir: &Path) -> Option<Split> {
    let (shape, x) = convflow::npy::read_f32(&dir.join("features.npy")).ok()?;
    let (_, y) = convflow::npy::read_f32(&dir.join("labels.npy")).ok()?;
    let rows = shape[0];
    assert_eq!(x.len(), rows * BOOK_INPUT_DIM, "features must be [N, 4, 4, 512]");
    assert_eq!(y.len(), rows, "the book's head is binary: labels must be [N]");
    Some(Split { x, y, rows })
}

/// ReLU-like features, ~71% zeros, labelled by a fixed linear rule plus noise.
fn synthesize(rows: usize, seed: u64) -> Split {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut dir_rng = ChaCha8Rng::seed_from_u64(12345);
    let dir: Vec<f32> = (0..BOOK_INPUT_DIM).map(|_| dir_rng.random_range(-1.0..1.0)).collect();
    let mut x = vec![0.0f32; rows * BOOK_INPUT_DIM];
    let mut y = vec![0.0f32; rows];
    for r in 0..rows {
        let row = &mut x[r * BOOK_INPUT_DIM..(r + 1) * BOOK_INPUT_DIM];
        let mut s = 0.0;
        for (v, &d) in row.iter_mut().zip(&dir) {
            if rng.random::<f32>() >= 0.71 {
                *v = rng.random::<f32>() * 2.0;
                s += *v * d;
            }
        }
        y[r] = f32::from(u8::from(s + rng.random_range(-5.0..5.0) > 0.0));
    }
    Split { x, y, rows }
}

/// FNV-1a over the bits of every weight: equal digests mean bit-identical training.
fn digest(head: &Head) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (k, b) in (0..).map_while(|i| head.dense_weights(i)) {
        for w in k.iter().chain(&b) {
            h = (h ^ u64::from(w.to_bits())).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

struct Data {
    train: Split,
    val: Split,
    threads: usize,
    seed: u64,
}

impl Data {
    fn from_env() -> (Data, String) {
        let folder = std::env::var("CONVFLOW_HEAD_FEATURES").unwrap_or_else(|_| "/tmp/real/out".into());
        let threads = env_num("CONVFLOW_HEAD_THREADS", std::thread::available_parallelism().map_or(1, |n| n.get()));
        let seed = env_num("CONVFLOW_HEAD_SEED", 0);
        let (train, val, source) =
            match (load(&Path::new(&folder).join("train")), load(&Path::new(&folder).join("validation"))) {
                (Some(t), Some(v)) => (t, v, folder),
                _ => (synthesize(2000, 1), synthesize(1000, 2), "synthetic (~71% zeros)".to_string()),
            };
        (Data { train, val, threads, seed }, source)
    }

    /// A new head, its optimizer and the row order (each epoch reshuffles it).
    fn fresh(&self) -> (Head, Optimizer, Vec<usize>) {
        let mut head = Head::new(BOOK_INPUT_DIM, &LayerSpec::book(), self.seed).expect("valid spec");
        head.set_threads(self.threads);
        (head, Optimizer::new(OptimizerSpec::rmsprop(2e-5)), (0..self.train.rows).collect())
    }
}

/// One epoch as the trainer runs it: reshuffle `order` from (seed, epoch),
/// train in batches of 20, validate. Returns (loss, acc, val_loss, val_acc).
fn epoch(d: &Data, head: &mut Head, opt: &mut Optimizer, order: &mut [usize], epoch: usize) -> (f64, f64, f32, f32) {
    let mut rng = ChaCha8Rng::seed_from_u64(d.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
    order.shuffle(&mut rng);
    let mut xb = vec![0.0f32; BATCH * BOOK_INPUT_DIM];
    let mut yb = [0.0f32; BATCH];
    let (mut loss_sum, mut correct) = (0.0f64, 0.0f64);
    for chunk in order.chunks(BATCH) {
        let n = chunk.len();
        for (i, &r) in chunk.iter().enumerate() {
            xb[i * BOOK_INPUT_DIM..(i + 1) * BOOK_INPUT_DIM]
                .copy_from_slice(&d.train.x[r * BOOK_INPUT_DIM..(r + 1) * BOOK_INPUT_DIM]);
            yb[i] = d.train.y[r];
        }
        let s = head.train_batch(&xb[..n * BOOK_INPUT_DIM], &yb[..n], n, opt, 0.0, &mut rng).expect("shapes match");
        loss_sum += f64::from(s.loss) * n as f64;
        correct += s.correct;
    }
    let (val_loss, val_acc) = head.evaluate(&d.val.x, &d.val.y, d.val.rows).expect("shapes match");
    let rows = d.train.rows as f64;
    (loss_sum / rows, correct / rows, val_loss, val_acc)
}

/// The book's 30 epochs once, printed, so a bench run also shows it learns.
fn describe(d: &Data, source: &str) {
    let zeros = d.train.x.iter().filter(|&&v| v == 0.0).count() as f64 / d.train.x.len() as f64;
    println!(
        "head bench: {source}: train {} x {BOOK_INPUT_DIM}, validation {}, {:.1}% zeros; batch {BATCH}, {} threads",
        d.train.rows,
        d.val.rows,
        zeros * 100.0,
        d.threads
    );
    // How many kernel rows get no gradient in a batch (RMSprop then skips their sqrt/div).
    let batches = d.train.rows / BATCH;
    let idle: usize = (0..batches)
        .map(|b| {
            (0..BOOK_INPUT_DIM)
                .filter(|&k| (b * BATCH..(b + 1) * BATCH).all(|r| d.train.x[r * BOOK_INPUT_DIM + k] == 0.0))
                .count()
        })
        .sum();
    println!(
        "  kernel rows with an all-zero input column in a batch: {:.1}%",
        100.0 * idle as f64 / (BOOK_INPUT_DIM * batches) as f64
    );
    let (mut head, mut opt, mut order) = d.fresh();
    let start = Instant::now();
    for e in 0..EPOCHS {
        let (loss, acc, val_loss, val_acc) = epoch(d, &mut head, &mut opt, &mut order, e);
        if (e + 1) % 5 == 0 {
            println!(
                "  epoch {:2}: loss {loss:.4} acc {acc:.4}  val_loss {val_loss:.4} val_acc {val_acc:.4}  ({:.2} s)",
                e + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    println!("  weights digest after {EPOCHS} epochs: {:016x}", digest(&head));
}

fn benches(c: &mut Criterion) {
    let (d, source) = Data::from_env();
    describe(&d, &source);
    let mut g = c.benchmark_group("head");
    g.throughput(Throughput::Elements(d.train.rows as u64));
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    let (mut head, mut opt, mut order) = d.fresh();
    let mut e = 0;
    g.bench_function("epoch", |b| {
        b.iter(|| {
            e += 1;
            epoch(&d, &mut head, &mut opt, &mut order, e)
        })
    });
    g.throughput(Throughput::Elements(d.val.rows as u64));
    g.bench_function("validate", |b| b.iter(|| head.evaluate(&d.val.x, &d.val.y, d.val.rows).expect("shapes match")));
    // One sample is one whole run: ~5 s each, so flat sampling, 10 samples.
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(60));
    g.throughput(Throughput::Elements((d.train.rows * EPOCHS) as u64));
    g.bench_function("30_epochs", |b| {
        b.iter(|| {
            let (mut head, mut opt, mut order) = d.fresh();
            for e in 0..EPOCHS {
                epoch(&d, &mut head, &mut opt, &mut order, e);
            }
            head
        })
    });
    g.finish();
}

criterion_group!(head, benches);
criterion_main!(head);
