//! `MaxPooling2D` as Keras's default (`strides = pool_size`, `padding =
//! 'valid'`): the output is `floor((size - pool) / stride) + 1`, so the last
//! row/column of an odd map is never read (9 -> 4, 15 -> 7, 11 -> 5 in
//! chapter 5). The forward pass keeps each output's argmax, and the
//! backward pass sends the gradient there alone; of equal values the first
//! in row-major order wins, as TensorFlow's kernel does.

use rayon::prelude::*;

/// Channels pooled together in [`PoolGeometry::image_forward`]: two AVX2
/// registers of `f32` (and of `u32` indices); every conv layer of the
/// book has a multiple of it.
const LANES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeometry {
    pub in_h: usize,
    pub in_w: usize,
    pub c: usize,
    pub ph: usize,
    pub pw: usize,
    pub sh: usize,
    pub sw: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl PoolGeometry {
    /// `None` when the window does not fit the map (pooling a 1x1 map by 2).
    pub fn new(input: [usize; 3], pool: [usize; 2], strides: [usize; 2]) -> Option<PoolGeometry> {
        let [in_h, in_w, c] = input;
        let ([ph, pw], [sh, sw]) = (pool, strides);
        if ph == 0 || pw == 0 || sh == 0 || sw == 0 || in_h < ph || in_w < pw {
            return None;
        }
        Some(PoolGeometry { in_h, in_w, c, ph, pw, sh, sw, out_h: (in_h - ph) / sh + 1, out_w: (in_w - pw) / sw + 1 })
    }

    pub fn in_len(&self) -> usize {
        self.in_h * self.in_w * self.c
    }

    pub fn out_len(&self) -> usize {
        self.out_h * self.out_w * self.c
    }

    /// Pools one image, dispatched at run time to an AVX2 build of the same
    /// code where the CPU has it (the crate's own build targets baseline
    /// x86-64, whose 4-wide SSE2 halves the throughput of this loop).
    fn image_forward(&self, x: &[f32], y: &mut [f32], arg: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { self.image_forward_avx2(x, y, arg) };
        }
        self.image_forward_any(x, y, arg);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn image_forward_avx2(&self, x: &[f32], y: &mut [f32], arg: &mut [u32]) {
        self.image_forward_any(x, y, arg);
    }

    /// Each output's maximum and its index, [`LANES`] channels at a time
    /// kept in registers across the window (fixed-size arrays: the
    /// compiler turns each into vector compares and selects).
    #[inline(always)]
    fn image_forward_any(&self, x: &[f32], y: &mut [f32], arg: &mut [u32]) {
        let c = self.c;
        let full = c / LANES * LANES;
        for oy in 0..self.out_h {
            for ox in 0..self.out_w {
                let o = (oy * self.out_w + ox) * c;
                let first = ((oy * self.sh) * self.in_w + ox * self.sw) * c;
                let (y, arg) = (&mut y[o..o + c], &mut arg[o..o + c]);
                for ch in (0..full).step_by(LANES) {
                    let mut best: [f32; LANES] =
                        <[f32; LANES]>::try_from(&x[first + ch..][..LANES]).expect("LANES values");
                    let mut at: [u32; LANES] = std::array::from_fn(|l| (first + ch + l) as u32);
                    for s in self.window(oy, ox) {
                        let v = <&[f32; LANES]>::try_from(&x[s + ch..][..LANES]).expect("LANES values");
                        for l in 0..LANES {
                            // Branch-free: on real activations the comparison is a
                            // coin toss (a branch on it was 9% of a training step).
                            // Strictly greater: the first maximum keeps the gradient.
                            let greater = v[l] > best[l];
                            best[l] = if greater { v[l] } else { best[l] };
                            at[l] = if greater { (s + ch + l) as u32 } else { at[l] };
                        }
                    }
                    y[ch..ch + LANES].copy_from_slice(&best);
                    arg[ch..ch + LANES].copy_from_slice(&at);
                }
                for ch in full..c {
                    let (mut best, mut at) = (x[first + ch], (first + ch) as u32);
                    for s in self.window(oy, ox) {
                        if x[s + ch] > best {
                            (best, at) = (x[s + ch], (s + ch) as u32);
                        }
                    }
                    (y[ch], arg[ch]) = (best, at);
                }
            }
        }
    }

    /// The offset of each window position of output `(oy, ox)` after the
    /// first, in row-major order (an iterator, not a callback: a closure
    /// would be compiled apart, without the caller's AVX2).
    #[inline(always)]
    fn window(&self, oy: usize, ox: usize) -> impl Iterator<Item = usize> {
        let (y0, x0, (w, c)) = (oy * self.sh, ox * self.sw, (self.in_w, self.c));
        (0..self.ph).flat_map(move |dy| (0..self.pw).map(move |dx| ((y0 + dy) * w + x0 + dx) * c)).skip(1)
    }

    /// One image's input gradient: each output's gradient goes to its argmax.
    fn image_backward(&self, dy: &[f32], arg: &[u32], dx: &mut [f32]) {
        if self.sh != self.ph || self.sw != self.pw {
            // Overlapping (or gapped) windows: an input can be the argmax of several.
            dx.fill(0.0);
            for (&a, &d) in arg.iter().zip(dy) {
                dx[a as usize] += d;
            }
            return;
        }
        // Windows that tile the map: each input lies in at most one window,
        // so each window is written whole (zeros, then its maxima) in one
        // pass over `dx`, and only the edge no window covers is zeroed apart.
        let (c, row) = (self.c, self.in_w * self.c);
        let (covered_h, covered_w) = (self.out_h * self.ph, self.out_w * self.pw * c);
        dx[covered_h * row..].fill(0.0);
        for y in 0..covered_h {
            dx[y * row + covered_w..(y + 1) * row].fill(0.0);
        }
        for oy in 0..self.out_h {
            for ox in 0..self.out_w {
                for ky in 0..self.ph {
                    let s = ((oy * self.ph + ky) * self.in_w + ox * self.pw) * c;
                    dx[s..s + self.pw * c].fill(0.0);
                }
                let o = (oy * self.out_w + ox) * c;
                for (&a, &d) in arg[o..o + c].iter().zip(&dy[o..o + c]) {
                    dx[a as usize] = d;
                }
            }
        }
    }
}

/// Pools `rows` images; `arg` gets, per output, the index of its input
/// inside its own image.
pub fn forward(g: &PoolGeometry, x: &[f32], rows: usize, y: &mut Vec<f32>, arg: &mut Vec<u32>) {
    y.resize(rows * g.out_len(), 0.0);
    arg.resize(rows * g.out_len(), 0);
    y.par_chunks_mut(g.out_len())
        .zip(arg.par_chunks_mut(g.out_len()))
        .zip(x.par_chunks(g.in_len()))
        .for_each(|((y, arg), x)| g.image_forward(x, y, arg));
}

/// Routes `dy` back to the argmax of each window (`dx` is overwritten whole).
pub fn backward(g: &PoolGeometry, dy: &[f32], arg: &[u32], rows: usize, dx: &mut Vec<f32>) {
    dx.resize(rows * g.in_len(), 0.0);
    dx.par_chunks_mut(g.in_len())
        .zip(dy.par_chunks(g.out_len()))
        .zip(arg.par_chunks(g.out_len()))
        .for_each(|((dx, dy), arg)| g.image_backward(dy, arg, dx));
}
