//! Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, 2015) for the
//! 3x3, stride-1 convolutions with many channels: VGG16's block5 and the
//! deeper layers of the book's convnets. Each 2x2 block of outputs is
//! computed from a 4x4 block of inputs with 16 multiplications per
//! (channel, filter) pair where im2col's GEMM does 36: the convolution
//! becomes 16 independent GEMMs, one per position of the 4x4 transformed
//! tile, `M[p] = V[p] (tiles x channels) * U[p] (channels x filters)`, and
//! three small linear maps around them:
//!
//! - input:  `V = Bt d B` of each 4x4 input tile `d` (zeros in the padding),
//! - kernel: `U = G g Gt` of each 3x3 kernel `g`,
//! - output: `Y = At M A`, the 2x2 outputs of the tile.
//!
//! The backward pass is the exact gradient of that computation (it is
//! linear in `d` and in `g`): `dM = A dY At`; the kernel gradient is
//! `Gt (V[p]^T dM[p]) G`, the input gradient `B (dM[p] U[p]^T) Bt`, added
//! onto the input tile by tile (neighbouring tiles overlap by two pixels).
//!
//! Every transform works on whole channel vectors (NHWC keeps a pixel's
//! channels contiguous), and every GEMM runs on one thread over one of the
//! 16 positions, so the result does not depend on the number of threads.
//! The GEMMs are 2.25x fewer multiply-adds for a 2x2-divisible output
//! (1.8x for block5's 9x9, whose tiles cover 10x10); a block5 training step
//! takes 1.6x less time than with im2col (`benches/convnet_epoch.rs`).

use rayon::prelude::*;

use super::conv2d::{ConvGeometry, bias_gradient};
use super::matmul::{Layout, matmul};
use crate::ml::activation::{Activation, activate, activation_backward};

/// Fewest input channels and filters for Winograd: the 16 GEMMs' inner
/// dimension is the channel count (the filters, for the input gradient),
/// and the transforms' cost per multiply-add grows as it shrinks. At 64 and
/// more (the book's deeper layers, VGG16's) it wins in
/// `benches/convnet_epoch.rs`; below, im2col's single GEMM is kept.
pub const MIN_CHANNELS: usize = 64;

/// Positions of a transformed tile.
const P: usize = 16;

/// Whether [`forward`] and [`backward`] compute this convolution.
pub fn applies(g: &ConvGeometry) -> bool {
    g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.in_c >= MIN_CHANNELS && g.filters >= MIN_CHANNELS
}

/// The transformed operands of one group of images, kept between steps
/// (sized on first use).
#[derive(Debug, Clone)]
pub struct WinogradScratch {
    /// [`GROUP_BYTES`], but for the tests of several groups.
    pub(crate) group_bytes: usize,
    /// `[16, in_c, filters]`: the transformed kernel.
    kernel: Vec<f32>,
    /// `[16, in_c, filters]`: its gradient, summed over the groups.
    dkernel: Vec<f32>,
    /// `[16, tiles, in_c]`: the transformed input tiles (backward: then their gradient).
    input: Vec<f32>,
    /// `[16, tiles, filters]`: the products (backward: the transformed output gradient).
    output: Vec<f32>,
}

impl Default for WinogradScratch {
    fn default() -> WinogradScratch {
        WinogradScratch {
            group_bytes: GROUP_BYTES,
            kernel: Vec::new(),
            dkernel: Vec::new(),
            input: Vec::new(),
            output: Vec::new(),
        }
    }
}

/// Tile rows and columns of one image's output.
fn tile_grid(g: &ConvGeometry) -> (usize, usize) {
    (g.out_h.div_ceil(2), g.out_w.div_ceil(2))
}

/// Whole images per parallel part of a transform (each part owns its
/// images' outputs, and the input gradient's overlapping tiles).
fn images_per_part(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads().clamp(1, rows.max(1))).max(1)
}

/// Cuts each plane of `buf` (`plane` values each: the 16 positions, or a
/// kernel's 9 taps) into chunks of `chunk` values; part `i` gets the `i`-th
/// chunk of every plane.
fn split_planes(buf: &mut [f32], plane: usize, chunk: usize) -> Vec<Vec<&mut [f32]>> {
    let parts = plane.div_ceil(chunk.max(1));
    let mut out: Vec<Vec<&mut [f32]>> = (0..parts).map(|_| Vec::with_capacity(P)).collect();
    for p in buf.chunks_mut(plane) {
        for (part, c) in out.iter_mut().zip(p.chunks_mut(chunk)) {
            part.push(c);
        }
    }
    out
}

// The 1-D transforms, applied down the columns and then along the rows
// of a tile (index `row * width + column`).

/// `W` channels at once: the transforms below are written on these, so
/// that each line is a vector operation (the compiler keeps them in
/// registers; a plain loop over channels kept its bounds checks).
#[derive(Clone, Copy)]
struct Lanes([f32; W]);
const W: usize = 16;

impl Lanes {
    /// `s` (at most `W` values), zeros after it.
    #[inline(always)]
    fn load(s: &[f32]) -> Lanes {
        match <[f32; W]>::try_from(s) {
            Ok(a) => Lanes(a),
            Err(_) => {
                let mut a = [0f32; W];
                a[..s.len()].copy_from_slice(s);
                Lanes(a)
            }
        }
    }
    #[inline(always)]
    fn store(self, d: &mut [f32]) {
        match <&mut [f32; W]>::try_from(&mut *d) {
            Ok(d) => *d = self.0,
            Err(_) => {
                let n = d.len();
                d.copy_from_slice(&self.0[..n]);
            }
        }
    }
    #[inline(always)]
    fn zip(self, o: Lanes, f: impl Fn(f32, f32) -> f32) -> Lanes {
        Lanes(std::array::from_fn(|i| f(self.0[i], o.0[i])))
    }
}
impl std::ops::Add for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn add(self, o: Lanes) -> Lanes {
        self.zip(o, |a, b| a + b)
    }
}
impl std::ops::Sub for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn sub(self, o: Lanes) -> Lanes {
        self.zip(o, |a, b| a - b)
    }
}
impl std::ops::Neg for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn neg(self) -> Lanes {
        Lanes(self.0.map(|a| -a))
    }
}
impl std::ops::Mul<f32> for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn mul(self, k: f32) -> Lanes {
        Lanes(self.0.map(|a| a * k))
    }
}

/// `Bt x`: Bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
#[inline(always)]
fn bt(x: [Lanes; 4]) -> [Lanes; 4] {
    [x[0] - x[2], x[1] + x[2], x[2] - x[1], x[1] - x[3]]
}
/// `B x`, the transpose, for the input gradient.
#[inline(always)]
fn b(x: [Lanes; 4]) -> [Lanes; 4] {
    [x[0], x[1] - x[2] + x[3], x[1] + x[2] - x[0], -x[3]]
}
/// `G x`: G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
#[inline(always)]
fn g(x: [Lanes; 3]) -> [Lanes; 4] {
    let (s, d) = ((x[0] + x[2]) * 0.5, x[1] * 0.5);
    [x[0], s + d, s - d, x[2]]
}
/// `Gt x`, for the kernel gradient.
#[inline(always)]
fn gt(x: [Lanes; 4]) -> [Lanes; 3] {
    let (s, d) = ((x[1] + x[2]) * 0.5, (x[1] - x[2]) * 0.5);
    [x[0] + s, d, s + x[3]]
}
/// `At x`: At = [[1, 1, 1, 0], [0, 1, -1, -1]].
#[inline(always)]
fn at(x: [Lanes; 4]) -> [Lanes; 2] {
    [x[0] + x[1] + x[2], x[1] - x[2] - x[3]]
}
/// `A x`, for the output gradient.
#[inline(always)]
fn a(x: [Lanes; 2]) -> [Lanes; 4] {
    [x[0], x[0] + x[1], x[0] - x[1], -x[1]]
}

/// `t` (`H x H`, row-major) with `f` applied to each column, then each row:
/// `f t ft` for a 1-D map `f` from length `H` to `O`.
#[inline(always)]
fn both<const H: usize, const O: usize, const HH: usize, const OO: usize>(
    t: [Lanes; HH],
    f: impl Fn([Lanes; H]) -> [Lanes; O],
) -> [Lanes; OO] {
    let mut cols = [[Lanes([0.0; W]); O]; H];
    for x in 0..H {
        let mut col = [Lanes([0.0; W]); H];
        for y in 0..H {
            col[y] = t[y * H + x];
        }
        cols[x] = f(col);
    }
    let mut out = [Lanes([0.0; W]); OO];
    for i in 0..O {
        let mut row = [Lanes([0.0; W]); H];
        for x in 0..H {
            row[x] = cols[x][i];
        }
        let r = f(row);
        for j in 0..O {
            out[i * O + j] = r[j];
        }
    }
    out
}

/// Applies `f` to every channel, `W` at a time: `out[k][c] = f(inp[..][c])[k]`,
/// all slices `len` long.
#[inline(always)]
fn per_channel<const I: usize, const O: usize>(
    inp: [&[f32]; I],
    out: [&mut [f32]; O],
    len: usize,
    f: impl Fn([Lanes; I]) -> [Lanes; O],
) {
    for c in (0..len).step_by(W) {
        let n = W.min(len - c);
        let mut x = [Lanes([0.0; W]); I];
        for k in 0..I {
            x[k] = Lanes::load(&inp[k][c..c + n]);
        }
        let v = f(x);
        for k in 0..O {
            v[k].store(&mut out[k][c..c + n]);
        }
    }
}

/// The `i`-th `len`-long vector of each of the 16 planes.
fn rows_of<'a>(planes: &'a [&[f32]], i: usize, len: usize) -> [&'a [f32]; P] {
    std::array::from_fn(|p| &planes[p][i * len..][..len])
}
fn rows_of_mut<'a, const N: usize>(planes: &'a mut [&mut [f32]], i: usize, len: usize) -> [&'a mut [f32]; N] {
    let mut rows = planes.iter_mut().map(|p| &mut p[i * len..][..len]);
    std::array::from_fn(|_| rows.next().expect("a plane per position"))
}

/// Every tile of images `first..first + images`, in order: (image, tile row, tile column).
fn tiles_of(g: &ConvGeometry, first: usize, images: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let (th, tw) = tile_grid(g);
    (first..first + images).flat_map(move |n| (0..th).flat_map(move |ty| (0..tw).map(move |tx| (n, ty, tx))))
}

/// The input pixel under tap `k` of a 4x4 tile, or `None` in the padding.
fn tile_pixel(g: &ConvGeometry, ty: usize, tx: usize, k: usize) -> Option<usize> {
    let y = (2 * ty + k / 4).checked_sub(g.pad_top).filter(|&y| y < g.in_h)?;
    let x = (2 * tx + k % 4).checked_sub(g.pad_left).filter(|&x| x < g.in_w)?;
    Some(y * g.in_w + x)
}

/// `V` of the `rows` images of `x` into `buf` (`[16, tiles, c]`).
fn prepare_input(g: &ConvGeometry, x: &[f32], rows: usize, buf: &mut Vec<f32>) {
    let (th, tw) = tile_grid(g);
    let (c, tiles) = (g.in_c, rows * th * tw);
    buf.resize(P * tiles * c, 0.0);
    let per = images_per_part(rows);
    let zeros = vec![0f32; c];
    split_planes(buf, tiles * c, per * th * tw * c).into_par_iter().enumerate().for_each(|(part, mut planes)| {
        let images = planes[0].len() / (th * tw * c);
        for (t, (n, ty, tx)) in tiles_of(g, part * per, images).enumerate() {
            let image = &x[n * g.in_len()..][..g.in_len()];
            let d: [&[f32]; P] = std::array::from_fn(|k| match tile_pixel(g, ty, tx, k) {
                Some(px) => &image[px * c..][..c],
                None => &zeros,
            });
            per_channel(d, rows_of_mut(&mut planes, t, c), c, |d| both::<4, 4, 16, 16>(d, bt));
        }
    });
}

/// `U = G g Gt` of `kernel` (Keras's `[3, 3, c, f]`) into `buf` (`[16, c, f]`),
/// channels split among the threads.
fn prepare_kernel(kernel: &[f32], c: usize, f: usize, buf: &mut Vec<f32>) {
    buf.resize(P * c * f, 0.0);
    let per = c.div_ceil(rayon::current_num_threads().max(1));
    split_planes(buf, c * f, per * f).into_par_iter().enumerate().for_each(|(part, mut planes)| {
        for r in 0..planes[0].len() / f {
            let ch = part * per + r;
            let taps: [&[f32]; 9] = std::array::from_fn(|t| &kernel[(t * c + ch) * f..][..f]);
            per_channel(taps, rows_of_mut(&mut planes, r, f), f, |k| both::<3, 4, 9, 16>(k, g));
        }
    });
}

/// The 16 products `out[p] (+)= op(a[p]) op(b[p])` (`m x n`, inner
/// dimension `k`), one GEMM per thread.
#[allow(clippy::too_many_arguments)]
fn products(out: &mut [f32], a: &[f32], la: Layout, b: &[f32], lb: Layout, [m, n, k]: [usize; 3], accumulate: bool) {
    out.par_chunks_mut(m * n)
        .zip(a.par_chunks(m * k))
        .zip(b.par_chunks(k * n))
        .for_each(|((out, a), b)| matmul(m, n, k, a, la, b, lb, out, accumulate, 1));
}

/// Bytes of one group's transformed operands: the images of a batch are
/// transformed and multiplied a group at a time, so memory stays bounded
/// whatever the batch and image size (VGG16's block1 at 150x150 takes
/// 23 MB an image); block5's batch of 20 is one group.
pub const GROUP_BYTES: usize = 64 << 20;

/// Images per group: as many as fit in `bytes`, at least one; it depends
/// on the geometry alone, so the sums it splits do not depend on the threads.
fn group_images(g: &ConvGeometry, bytes: usize) -> usize {
    let (th, tw) = tile_grid(g);
    (bytes / (4 * P * th * tw * g.in_c.max(g.filters))).max(1)
}

/// `y = activation(conv(x) + bias)` for `rows` images (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    g: &ConvGeometry,
    kernel: &[f32],
    bias: &[f32],
    x: &[f32],
    rows: usize,
    activation: Option<Activation>,
    y: &mut Vec<f32>,
    s: &mut WinogradScratch,
) {
    let (c, f) = (g.in_c, g.filters);
    let (th, tw) = tile_grid(g);
    let out_len = g.out_pixels() * f;
    y.resize(rows * out_len, 0.0);
    if rows == 0 {
        return;
    }
    prepare_kernel(kernel, c, f, &mut s.kernel);
    let group = group_images(g, s.group_bytes);
    for (x, y) in x.chunks(group * g.in_len()).zip(y.chunks_mut(group * out_len)) {
        let rows = y.len() / out_len;
        let tiles = rows * th * tw;
        prepare_input(g, x, rows, &mut s.input);
        // The 16 products, one thread each.
        s.output.resize(P * tiles * f, 0.0);
        products(&mut s.output, &s.input, Layout::N, &s.kernel, Layout::N, [tiles, f, c], false);
        // Back to pixels, whole images per part: each tile's 2x2 outputs into
        // `out`, then those inside the image onto `y` with the bias.
        let per = images_per_part(rows);
        let planes: Vec<&[f32]> = s.output.chunks(tiles * f).collect();
        y.par_chunks_mut(per * out_len).enumerate().for_each(|(part, y)| {
            let mut out = vec![0f32; 4 * f];
            for (t, (n, ty, tx)) in tiles_of(g, 0, y.len() / out_len).enumerate() {
                let mut quarters = out.chunks_exact_mut(f);
                let quarters: [&mut [f32]; 4] = std::array::from_fn(|_| quarters.next().expect("4 outputs"));
                per_channel(rows_of(&planes, part * per * th * tw + t, f), quarters, f, |m| both::<4, 2, 16, 4>(m, at));
                for (k, o) in out.chunks_exact(f).enumerate() {
                    let (oy, ox) = (2 * ty + k / 2, 2 * tx + k % 2);
                    if oy < g.out_h && ox < g.out_w {
                        let px = &mut y[((n * g.out_h + oy) * g.out_w + ox) * f..][..f];
                        px.iter_mut().zip(o).zip(bias).for_each(|((y, &o), &b)| *y = o + b);
                    }
                }
            }
            if let Some(a) = activation {
                activate(a, y);
            }
        });
    }
}

/// The gradients of [`forward`] from `dy` (turned in place into the
/// pre-activation's gradient when `activation` is given): kernel and bias
/// (with `weights`) and input (with `dx`), as [`super::conv2d::backward`],
/// which handles an empty batch.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &ConvGeometry,
    kernel: &[f32],
    x: &[f32],
    y: &[f32],
    activation: Option<Activation>,
    dy: &mut [f32],
    rows: usize,
    weights: Option<(&mut [f32], &mut [f32])>,
    mut dx: Option<&mut Vec<f32>>,
    s: &mut WinogradScratch,
) {
    let (c, f) = (g.in_c, g.filters);
    let (th, tw) = tile_grid(g);
    let out_len = g.out_pixels() * f;
    if let Some(a) = activation {
        dy.par_chunks_mut(1 << 14).zip(y.par_chunks(1 << 14)).for_each(|(d, y)| activation_backward(a, y, d));
    }
    let dy: &[f32] = dy;
    if dx.is_some() {
        prepare_kernel(kernel, c, f, &mut s.kernel);
    }
    if let Some(dx) = dx.as_deref_mut() {
        dx.resize(rows * g.in_len(), 0.0);
    }
    let group = group_images(g, s.group_bytes);
    for (i, dy) in dy.chunks(group * out_len).enumerate() {
        let rows = dy.len() / out_len;
        let (tiles, per) = (rows * th * tw, images_per_part(rows));
        // dM = A dY At, tile by tile (zeros beyond the output's edge).
        s.output.resize(P * tiles * f, 0.0);
        split_planes(&mut s.output, tiles * f, per * th * tw * f).into_par_iter().enumerate().for_each(
            |(part, mut planes)| {
                let zeros = vec![0f32; f];
                let images = planes[0].len() / (th * tw * f);
                for (t, (n, ty, tx)) in tiles_of(g, part * per, images).enumerate() {
                    let e: [&[f32]; 4] = std::array::from_fn(|k| {
                        let (oy, ox) = (2 * ty + k / 2, 2 * tx + k % 2);
                        if oy < g.out_h && ox < g.out_w {
                            &dy[((n * g.out_h + oy) * g.out_w + ox) * f..][..f]
                        } else {
                            &zeros
                        }
                    });
                    per_channel(e, rows_of_mut(&mut planes, t, f), f, |e| both::<2, 4, 4, 16>(e, a));
                }
            },
        );
        if weights.is_some() {
            // dU[p] += V[p]^T dM[p], summed over the groups in order.
            prepare_input(g, &x[i * group * g.in_len()..][..rows * g.in_len()], rows, &mut s.input);
            s.dkernel.resize(P * c * f, 0.0);
            products(&mut s.dkernel, &s.input, Layout::T, &s.output, Layout::N, [c, f, tiles], i > 0);
        }
        if let Some(dx) = dx.as_deref_mut() {
            // dV[p] = dM[p] U[p]^T, then each tile's B dV Bt added onto its pixels.
            s.input.resize(P * tiles * c, 0.0);
            products(&mut s.input, &s.output, Layout::N, &s.kernel, Layout::T, [tiles, c, f], false);
            let planes: Vec<&[f32]> = s.input.chunks(tiles * c).collect();
            let dx = &mut dx[i * group * g.in_len()..][..rows * g.in_len()];
            dx.par_chunks_mut(per * g.in_len()).enumerate().for_each(|(part, dx)| {
                dx.fill(0.0);
                let mut tile = vec![0f32; P * c];
                for (t, (n, ty, tx)) in tiles_of(g, 0, dx.len() / g.in_len()).enumerate() {
                    let mut out = tile.chunks_exact_mut(c);
                    let out: [&mut [f32]; P] = std::array::from_fn(|_| out.next().expect("16 positions"));
                    per_channel(rows_of(&planes, part * per * th * tw + t, c), out, c, |v| both::<4, 4, 16, 16>(v, b));
                    let image = &mut dx[n * g.in_len()..][..g.in_len()];
                    for (k, d) in tile.chunks_exact(c).enumerate() {
                        if let Some(px) = tile_pixel(g, ty, tx, k) {
                            image[px * c..][..c].iter_mut().zip(d).for_each(|(x, &d)| *x += d);
                        }
                    }
                }
            });
        }
    }
    if let Some((dkernel, dbias)) = weights {
        // dkernel = Gt dU G, channels split among the threads.
        let per_c = c.div_ceil(rayon::current_num_threads().max(1));
        let planes: Vec<&[f32]> = s.dkernel.chunks(c * f).collect();
        split_planes(dkernel, c * f, per_c * f).into_par_iter().enumerate().for_each(|(part, mut taps)| {
            for r in 0..taps[0].len() / f {
                let out: [&mut [f32]; 9] = rows_of_mut(&mut taps, r, f);
                per_channel(rows_of(&planes, part * per_c + r, f), out, f, |u| both::<4, 3, 16, 9>(u, gt));
            }
        });
        bias_gradient(dy, f, dbias);
    }
}
