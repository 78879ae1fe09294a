//! Cross-entropy losses as Keras computes them: from logits in training,
//! from probabilities when views are averaged; accuracy as Keras counts it.

use super::activation::sigmoid;

/// Which loss the last layer implies: sigmoid -> binary, softmax -> categorical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    BinaryCrossentropy,
    CategoricalCrossentropy,
}

pub fn probabilities(loss: LossKind, logits: &[f32], c: usize, out: &mut Vec<f32>) {
    match loss {
        LossKind::BinaryCrossentropy => out.extend(logits.iter().map(|&z| sigmoid(z))),
        LossKind::CategoricalCrossentropy => {
            for z in logits.chunks_exact(c) {
                let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let start = out.len();
                out.extend(z.iter().map(|&z| (z - m).exp()));
                let sum: f32 = out[start..].iter().sum();
                out[start..].iter_mut().for_each(|p| *p /= sum);
            }
        }
    }
}

/// Loss summed over rows, correct count, and (when `grad`) the gradient of
/// the batch-mean loss w.r.t. the logits. Both losses are computed from the
/// logits, as TF Keras does when the output layer is a sigmoid or softmax.
pub fn loss_and_grad(loss: LossKind, logits: &[f32], y: &[f32], rows: usize, grad: bool) -> (f64, f64, Vec<f32>) {
    let c = logits.len() / rows.max(1);
    let mut dz = if grad { vec![0.0; logits.len()] } else { Vec::new() };
    let (mut total, mut correct) = (0.0f64, 0.0f64);
    match loss {
        LossKind::BinaryCrossentropy => {
            let scale = 1.0 / (rows * c) as f32;
            for r in 0..rows {
                let (mut row_loss, mut row_ok) = (0.0f64, 0usize);
                for j in r * c..(r + 1) * c {
                    let (z, t) = (logits[j], y[j]);
                    // max(z, 0) - z*t + log(1 + exp(-|z|)): tf.nn.sigmoid_cross_entropy_with_logits
                    row_loss += f64::from(z.max(0.0) - z * t + (-z.abs()).exp().ln_1p());
                    let p = sigmoid(z);
                    row_ok += usize::from(f32::from(u8::from(p > 0.5)) == t);
                    if grad {
                        dz[j] = (p - t) * scale;
                    }
                }
                total += row_loss / c as f64;
                correct += row_ok as f64 / c as f64;
            }
        }
        LossKind::CategoricalCrossentropy => {
            let scale = 1.0 / rows as f32;
            let mut p = Vec::with_capacity(c);
            for r in 0..rows {
                let (z, t) = (&logits[r * c..(r + 1) * c], &y[r * c..(r + 1) * c]);
                p.clear();
                probabilities(loss, z, c, &mut p);
                let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = m + z.iter().map(|&z| (z - m).exp()).sum::<f32>().ln();
                let tsum: f32 = t.iter().sum();
                total += z.iter().zip(t).map(|(&z, &t)| f64::from(t * (lse - z))).sum::<f64>();
                correct += f64::from(u8::from(argmax(&p) == argmax(t)));
                if grad {
                    for j in 0..c {
                        dz[r * c + j] = (p[j] * tsum - t[j]) * scale;
                    }
                }
            }
        }
    }
    (total, correct, dz)
}

/// Loss summed over rows and correct count of probabilities (not logits),
/// such as the mean of several predictions for one image. As Keras does for
/// probabilities, they are clipped to [1e-7, 1 - 1e-7] before the log.
pub fn score_probabilities(loss: LossKind, p: &[f32], y: &[f32], rows: usize) -> (f64, f64) {
    const EPS: f64 = 1e-7;
    let c = p.len() / rows.max(1);
    let (mut total, mut correct) = (0.0f64, 0.0f64);
    for (p, t) in p.chunks_exact(c).zip(y.chunks_exact(c)) {
        match loss {
            LossKind::BinaryCrossentropy => {
                let (mut row_loss, mut row_ok) = (0.0f64, 0usize);
                for (&p, &t) in p.iter().zip(t) {
                    let (q, t64) = (f64::from(p).clamp(EPS, 1.0 - EPS), f64::from(t));
                    row_loss -= t64 * q.ln() + (1.0 - t64) * (1.0 - q).ln();
                    row_ok += usize::from(f32::from(u8::from(p > 0.5)) == t);
                }
                total += row_loss / c as f64;
                correct += row_ok as f64 / c as f64;
            }
            LossKind::CategoricalCrossentropy => {
                total -= p.iter().zip(t).map(|(&p, &t)| f64::from(t) * f64::from(p).clamp(EPS, 1.0).ln()).sum::<f64>();
                correct += f64::from(u8::from(argmax(p) == argmax(t)));
            }
        }
    }
    (total, correct)
}

/// First index of the maximum, as `argmax` in Keras's `categorical_accuracy`.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
