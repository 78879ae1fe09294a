//! The book's dense head (5.3.1) on cached VGG16 features: Dense(256, relu),
//! Dropout(0.5), Dense(1, sigmoid), RMSprop(lr 2e-5), batch 20, 30 epochs,
//! validation after every epoch, timed end to end.
//!
//!   cargo bench --bench head
//!
//! Env: CONVFLOW_HEAD_FEATURES (a folder with train/ and validation/, each
//! holding features.npy and labels.npy; default /tmp/real/out; when absent,
//! data of the same shape and ~71% zeros is synthesized), CONVFLOW_HEAD_THREADS
//! (default: the machine's cores), CONVFLOW_HEAD_EPOCHS (30),
//! CONVFLOW_HEAD_REPEATS (1), CONVFLOW_HEAD_SEED (0).

use std::path::Path;
use std::time::Instant;

use convflow::ml::head::{BOOK_INPUT_DIM, Head, LayerSpec, Optimizer, OptimizerSpec};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let folder = std::env::var("CONVFLOW_HEAD_FEATURES").unwrap_or_else(|_| "/tmp/real/out".into());
    let threads: usize = env_num("CONVFLOW_HEAD_THREADS", std::thread::available_parallelism().map_or(1, |n| n.get()));
    let epochs: usize = env_num("CONVFLOW_HEAD_EPOCHS", 30);
    let repeats: usize = env_num("CONVFLOW_HEAD_REPEATS", 1);
    let seed: u64 = env_num("CONVFLOW_HEAD_SEED", 0);
    let (train, val, source) =
        match (load(&Path::new(&folder).join("train")), load(&Path::new(&folder).join("validation"))) {
            (Some(t), Some(v)) => (t, v, folder.clone()),
            _ => (synthesize(2000, 1), synthesize(1000, 2), "synthetic (~71% zeros)".to_string()),
        };
    let zeros = train.x.iter().filter(|&&v| v == 0.0).count() as f64 / train.x.len() as f64;
    println!(
        "head bench: {source}: train {} x {BOOK_INPUT_DIM}, validation {}, {:.1}% zeros; {epochs} epochs, batch 20, {threads} threads",
        train.rows,
        val.rows,
        zeros * 100.0
    );

    let batch = 20;
    // How many kernel rows get no gradient in a batch (RMSprop then skips their sqrt/div).
    let mut idle = 0usize;
    for b in 0..train.rows / batch {
        idle += (0..BOOK_INPUT_DIM)
            .filter(|&k| (b * batch..(b + 1) * batch).all(|r| train.x[r * BOOK_INPUT_DIM + k] == 0.0))
            .count();
    }
    println!(
        "  kernel rows with an all-zero input column in a batch of {batch}: {:.1}%",
        100.0 * idle as f64 / (BOOK_INPUT_DIM * (train.rows / batch)) as f64
    );
    let mut times = Vec::new();
    for rep in 0..repeats {
        let mut head = Head::new(BOOK_INPUT_DIM, &LayerSpec::book(), seed).expect("valid spec");
        head.set_threads(threads);
        let mut opt = Optimizer::new(OptimizerSpec::rmsprop(2e-5));
        let mut order: Vec<usize> = (0..train.rows).collect();
        let mut xb = vec![0.0f32; batch * BOOK_INPUT_DIM];
        let mut yb = vec![0.0f32; batch];
        let start = Instant::now();
        for epoch in 0..epochs {
            let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
            order.shuffle(&mut rng);
            let (mut loss_sum, mut correct) = (0.0f64, 0.0f64);
            for chunk in order.chunks(batch) {
                let n = chunk.len();
                for (i, &r) in chunk.iter().enumerate() {
                    xb[i * BOOK_INPUT_DIM..(i + 1) * BOOK_INPUT_DIM]
                        .copy_from_slice(&train.x[r * BOOK_INPUT_DIM..(r + 1) * BOOK_INPUT_DIM]);
                    yb[i] = train.y[r];
                }
                let s = head
                    .train_batch(&xb[..n * BOOK_INPUT_DIM], &yb[..n], n, &mut opt, 0.0, &mut rng)
                    .expect("shapes match");
                loss_sum += f64::from(s.loss) * n as f64;
                correct += s.correct;
            }
            let (val_loss, val_acc) = head.evaluate(&val.x, &val.y, val.rows).expect("shapes match");
            if rep == 0 && (epoch + 1 == epochs || (epoch + 1) % 5 == 0) {
                println!(
                    "  epoch {:2}: loss {:.4} acc {:.4}  val_loss {:.4} val_acc {:.4}  ({:.2} s)",
                    epoch + 1,
                    loss_sum / train.rows as f64,
                    correct / train.rows as f64,
                    val_loss,
                    val_acc,
                    start.elapsed().as_secs_f64()
                );
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "  run {}: {secs:.3} s total, {:.3} s/epoch; weights digest {:016x}",
            rep + 1,
            secs / epochs as f64,
            digest(&head)
        );
        times.push(secs);
    }
    let m = median(times);
    println!("median {m:.3} s for {epochs} epochs ({:.3} s/epoch)", m / epochs as f64);
}
