//! `winograd`: a CPU engine for plain VGG conv bases (VGG16, VGG19: 3x3
//! stride-1 `same` convs with ReLU, 2x2 max pools), float32, forward only,
//! at about twice ONNX Runtime's speed on the same CPU
//! (docs/benchmarks.md#vgg16-on-the-cpu-the-winograd-engine).
//!
//! ONNX Runtime runs VGG's convolutions as direct products at the
//! machine's sgemm rate; nothing around them can go faster. This engine
//! does fewer multiplications: Winograd's minimal filtering F(6x6, 3x3)
//! (Lavin and Gray, 2015) computes each 6x6 block of outputs from an 8x8
//! block of inputs with 64 multiplications per (channel, filter) pair where
//! the direct convolution does 324, so every conv with many channels becomes
//! 64 independent products `M[p] = V[p] (tiles x channels) * U[p]
//! (channels x filters)` and three small linear maps around them:
//!
//! - input:  `V = Bt d B` of each 8x8 input tile `d` (zeros in the padding),
//! - kernel: `U = G g Gt` of each 3x3 kernel `g`, once at load, in float64,
//! - output: `Y = At M A`, the 6x6 outputs, fused with bias, ReLU and,
//!   where a pool follows, the 2x2 max pool (a tile's outputs hold whole
//!   pooling windows, since tiles start at even offsets).
//!
//! F(4x4, 3x3) is there too ([`Tile`], [`TILE_ENV`]): F(6x6) was faster on
//! every layer of VGG16 at 150x150 and 224x224 and its features are still
//! within 4x of the contract below (docs/benchmarks.md), but it holds the
//! transformed weights in 64 / 9 of their size (418 MB for VGG16, where
//! F(4x4) holds 235 MB).
//!
//! The first conv (3 channels) would gain nothing: it is an im2col product.
//! The products run on [`kernel::panel`], the transforms on [`lanes`], both
//! picked for AVX-512 or AVX2 at run time. The tiles are cut into chunks
//! sized so that a chunk's transformed input and products stay in the
//! caches, and the chunks are shared among threads; each output is computed
//! the same way whichever thread takes its chunk, so the features do not
//! depend on the thread count.
//!
//! Only a file that [`onnx_read::read`] recognises is served: the weights
//! are read out of that very ONNX file, so the engine can only compute what
//! the file says. Its features are within 1e-4 of ONNX Runtime's float32
//! ones relative to each image's largest value (tests/vgg_cpu.rs; measured
//! figures in docs/benchmarks.md).

pub mod kernel;
mod lanes;
pub mod onnx_read;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use kernel::Isa;
use kernel::{ROWS, pack, panel};
use lanes::{Lanes, Portable};
#[cfg(target_arch = "x86_64")]
use lanes::{Ymm, Zmm};
use onnx_read::PlainLayer;

/// The engine's name, as a pipeline writes it (`engine: winograd`).
pub const NAME: &str = "winograd";

/// Env var that forces an instruction set (`avx2`, `avx512`, `portable`):
/// for the tests of the AVX2 path on an AVX-512 machine.
pub const ISA_ENV: &str = "CONVFLOW_VGG_ISA";

/// `CONVFLOW_VGG_PROFILE=1`: each layer's wall time and the Winograd
/// phases' CPU time go to stderr (for tuning; off costs one branch a chunk).
static PROFILE: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("CONVFLOW_VGG_PROFILE").is_some());
/// Nanoseconds in the input transform, the products and the output transform.
static PHASES: [std::sync::atomic::AtomicU64; 3] = [const { std::sync::atomic::AtomicU64::new(0) }; 3];

/// Env var that forces one Winograd tile on every layer (`4`: F(4x4,3x3),
/// `6`: F(6x6,3x3)), for measuring one against the other.
pub const TILE_ENV: &str = "CONVFLOW_VGG_TILE";

/// Which Winograd tiling a conv runs: F(m x m, 3x3) computes each m x m
/// block of outputs from an (m + 2) x (m + 2) block of inputs, with
/// (m + 2)^2 multiplications per (channel, filter) pair where the direct
/// convolution does 9 m^2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// F(4x4, 3x3): 36 products for 16 outputs (4x fewer).
    F4,
    /// F(6x6, 3x3): 64 products for 36 outputs (5.1x fewer), and cheaper
    /// transforms per output; its rounding error is larger, but still
    /// well within the engine's 1e-4 contract on VGG16 and VGG19 (measured
    /// in docs/benchmarks.md).
    F6,
}

impl Tile {
    /// Outputs per tile side.
    fn m(self) -> usize {
        match self {
            Tile::F4 => 4,
            Tile::F6 => 6,
        }
    }
    /// Inputs per tile side, `m + 2`.
    fn a(self) -> usize {
        self.m() + 2
    }
    /// Products per tile, one per position of the transformed tile.
    fn points(self) -> usize {
        self.a() * self.a()
    }
    fn g(self) -> &'static [[f64; 3]] {
        match self {
            Tile::F4 => &G4,
            Tile::F6 => &G6,
        }
    }
    fn parse(s: &str) -> Option<Tile> {
        match s {
            "4" => Some(Tile::F4),
            "6" => Some(Tile::F6),
            _ => None,
        }
    }
}

/// Bytes of a chunk's transformed input plus products, about what a core's
/// L2 holds; `CONVFLOW_VGG_CHUNK_KB` overrides it, for tuning.
static CHUNK_BYTES: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("CONVFLOW_VGG_CHUNK_KB").ok().and_then(|v| v.parse::<usize>().ok()).map_or(512 << 10, |kb| kb << 10)
});

#[derive(Debug, thiserror::Error)]
pub enum VggCpuError {
    #[error("model {path}: {message}")]
    Model { path: String, message: String },
    #[error("{0}")]
    Run(String),
}

struct Conv {
    channels: usize,
    filters: usize,
    /// Filters rounded up to whole panels.
    padded: usize,
    /// `[padded]`, zeros past `filters`.
    bias: Vec<f32>,
    /// A 2x2 max pool follows, fused where the conv is Winograd's.
    pool: bool,
    kind: Kind,
}

enum Kind {
    /// `[padded / nr][9 * channels][nr]`, rows `(ky * 3 + kx) * channels + c`.
    Im2col(Vec<f32>),
    /// `[points][padded / nr][channels][nr]`.
    Winograd(Tile, Vec<f32>),
}

/// A loaded conv base, ready to run.
pub struct VggCpu {
    convs: Vec<Conv>,
    isa: Isa,
    threads: usize,
    pool: rayon::ThreadPool,
    /// Layer outputs of earlier batches, reused.
    spare: std::sync::Mutex<Vec<Vec<f32>>>,
}

/// Fewest input channels for Winograd: below, the transforms cost more
/// than the products save (VGG's first conv, 3 channels).
const MIN_WINOGRAD_CHANNELS: usize = 16;

impl VggCpu {
    /// The engine for the ONNX file `path`, on `threads` threads (0: one per
    /// core), with `isa` or, when `None`, [`ISA_ENV`] or the best this CPU has.
    /// Fails with the reason when the file is not a plain VGG conv base.
    pub fn load(path: &Path, threads: usize, isa: Option<Isa>) -> Result<VggCpu, VggCpuError> {
        let err = |message: String| VggCpuError::Model { path: path.display().to_string(), message };
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let layers = onnx_read::read(&bytes).map_err(|e| err(format!("not a plain VGG conv base for {NAME}: {e}")))?;
        let isa = match isa {
            Some(i) => i,
            None => match std::env::var(ISA_ENV) {
                Ok(s) => Isa::parse(&s).ok_or_else(|| err(format!("{ISA_ENV}={s}: avx512, avx2 or portable")))?,
                Err(_) => Isa::detect(),
            },
        };
        if !isa.available() {
            return Err(err(format!("this CPU has no {}", isa.name())));
        }
        let tile = match std::env::var(TILE_ENV) {
            Ok(s) => Some(Tile::parse(&s).ok_or_else(|| err(format!("{TILE_ENV}={s}: 4 or 6")))?),
            Err(_) => None,
        };
        VggCpu::from_layers(&layers, threads, isa, tile)
    }

    /// Whether the engine covers the ONNX file `path` (reads it, transforms nothing).
    pub fn covers(path: &Path) -> Result<(), VggCpuError> {
        let err = |message: String| VggCpuError::Model { path: path.display().to_string(), message };
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        onnx_read::read(&bytes).map(drop).map_err(|e| err(format!("not a plain VGG conv base for {NAME}: {e}")))
    }

    /// The engine for these layers (`isa` must be available), every
    /// Winograd layer on `tile`, or on [`DEFAULT_TILE`] when `None`.
    pub(crate) fn from_layers(
        layers: &[PlainLayer],
        threads: usize,
        isa: Isa,
        tile: Option<Tile>,
    ) -> Result<VggCpu, VggCpuError> {
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("winograd-{i}"))
            .build()
            .map_err(|e| VggCpuError::Run(format!("cannot start the engine's {threads} threads: {e}")))?;
        // The weight transform's tasks run on the engine's own threads, as
        // many as it was given, not on rayon's global pool.
        let convs = pool.install(|| build(layers, isa.nr(), tile.unwrap_or(DEFAULT_TILE)));
        Ok(VggCpu { convs, isa, threads, pool, spare: Default::default() })
    }

    /// The instruction set the products run with.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The feature maps of `n` images of `h` x `w` (NHWC float32, as the
    /// ONNX file takes them): `[n, h', w', filters]` and the values, as
    /// the file's output is.
    pub fn run(&self, input: &[f32], n: usize, h: usize, w: usize) -> Result<(Vec<usize>, Vec<f32>), VggCpuError> {
        if input.len() != n * h * w * 3 {
            return Err(VggCpuError::Run(format!("{} values for a batch of [{n}, {h}, {w}, 3]", input.len())));
        }
        // Each layer's output is the next one's input.
        let mut cur: Option<Vec<f32>> = None;
        let (mut h, mut w) = (h, w);
        for conv in &self.convs {
            if h == 0 || w == 0 {
                break;
            }
            let x = cur.as_deref().unwrap_or(input);
            let started = std::time::Instant::now();
            let (out, oh, ow) = match &conv.kind {
                Kind::Im2col(wp) => {
                    let full = self.im2col(conv, wp, x, n, h, w);
                    if conv.pool {
                        let pooled = max_pool(&full, n, h, w, conv.filters);
                        self.give(full);
                        (pooled, h / 2, w / 2)
                    } else {
                        (full, h, w)
                    }
                }
                Kind::Winograd(tile, u) => self.winograd(conv, *tile, u, x, n, h, w),
            };
            if *PROFILE {
                let ph: Vec<f64> = PHASES.iter().map(|a| a.swap(0, Ordering::Relaxed) as f64 / 1e6).collect();
                eprintln!(
                    "layer {}->{} {h}x{w}{}: {:.1} ms (CPU ms: input {:.1}, products {:.1}, output {:.1})",
                    conv.channels,
                    conv.filters,
                    if conv.pool { " +pool" } else { "" },
                    started.elapsed().as_secs_f64() * 1e3,
                    ph[0],
                    ph[1],
                    ph[2]
                );
            }
            if let Some(old) = cur.replace(out) {
                self.give(old);
            }
            (h, w) = (oh, ow);
        }
        if h == 0 || w == 0 {
            return Err(VggCpuError::Run(format!("the images are too small: a feature map is {h}x{w}")));
        }
        let filters = self.convs.last().map_or(3, |c| c.filters);
        let out = match cur {
            Some(v) => {
                let out = v.clone();
                self.give(v);
                out
            }
            None => input.to_vec(),
        };
        Ok((vec![n, h, w, filters], out))
    }

    /// Runs `work(chunk, scratch)` for each of `chunks` on the engine's threads.
    /// The engine's threads are its own and live as long as it does, each
    /// with its scratch: fresh memory costs a page fault per 4 KB, which
    /// came to a tenth of a batch's time.
    fn parallel(&self, chunks: usize, scratch_len: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let next = AtomicUsize::new(0);
        self.pool.broadcast(|_| {
            SCRATCH.with(|s| {
                let mut scratch = s.borrow_mut();
                if scratch.len() < scratch_len {
                    scratch.resize(scratch_len, 0.0);
                }
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= chunks {
                        break;
                    }
                    work(i, &mut scratch[..scratch_len]);
                }
            })
        });
    }

    /// A buffer of `len` values from the spares (contents undefined: every
    /// layer writes all of its output).
    fn take(&self, len: usize) -> Vec<f32> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = match spare.iter().position(|b| b.capacity() >= len) {
            Some(i) => spare.swap_remove(i),
            None => spare.pop().unwrap_or_default(),
        };
        v.resize(len, 0.0);
        v
    }

    fn give(&self, v: Vec<f32>) {
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).push(v);
    }

    /// Chunks of `units` (tiles or pixels) of at most `max` each, a multiple
    /// of [`ROWS`] long and as many as a multiple of the threads where
    /// there is enough work, so both cores finish together: (count, length).
    fn chunks(&self, units: usize, max: usize) -> (usize, usize) {
        let max = (max / ROWS).max(1) * ROWS;
        let mut count = units.div_ceil(max);
        count = count.div_ceil(self.threads) * self.threads;
        count = count.min(units.div_ceil(ROWS)).max(1);
        let len = units.div_ceil(count).div_ceil(ROWS) * ROWS;
        (units.div_ceil(len), len)
    }

    fn im2col(&self, conv: &Conv, wp: &[f32], x: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        let (c, k, kp, isa) = (conv.channels, conv.filters, conv.padded, self.isa);
        let depth = 9 * c;
        let pixels = n * h * w;
        let (chunks, len) = self.chunks(pixels, *CHUNK_BYTES / 4 / (depth + kp));
        let mut out = self.take(pixels * k);
        let dst = SendPtr(out.as_mut_ptr());
        let geo = Geometry { c, k, kp, h, w, th: 0, tw: 0, len, pool: false };
        self.parallel(chunks, len * (depth + kp), |i, scratch| {
            let (p0, p1) = (i * len, ((i + 1) * len).min(pixels));
            // SAFETY: the chunk's pixels are its own outputs; `isa` is available.
            unsafe { im2col_chunk(isa, &geo, x, wp, &conv.bias, scratch, p0, p1, dst.get()) };
        });
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn winograd(
        &self,
        conv: &Conv,
        tile: Tile,
        u: &[f32],
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> (Vec<f32>, usize, usize) {
        let (c, k, kp, points) = (conv.channels, conv.filters, conv.padded, tile.points());
        let (th, tw) = (h.div_ceil(tile.m()), w.div_ceil(tile.m()));
        let tiles = n * th * tw;
        let (oh, ow) = if conv.pool { (h / 2, w / 2) } else { (h, w) };
        // Cache-sized chunks; but where the transformed kernel (36 c kp
        // values, 37 MB for 512 x 512 in F4) outweighs them, chunks long enough that
        // streaming it once per chunk costs no more than the chunk's own traffic.
        let max = (*CHUNK_BYTES / 4 / (points * (c + kp))).max(c * kp / (c + kp));
        let (chunks, len) = self.chunks(tiles, max);
        let mut out = self.take(n * oh * ow * k);
        let dst = SendPtr(out.as_mut_ptr());
        let geo = Geometry { c, k, kp, h, w, th, tw, len, pool: conv.pool };
        let isa = self.isa;
        self.parallel(chunks, points * len * (c + kp), |i, scratch| {
            let (t0, t1) = (i * len, ((i + 1) * len).min(tiles));
            // SAFETY: the chunk's tiles write disjoint outputs of `out`;
            // `isa` is available (checked at load).
            unsafe {
                match tile {
                    Tile::F4 => wino_chunk::<6, 4, F4>(isa, &geo, x, u, &conv.bias, scratch, t0, t1, dst.get()),
                    Tile::F6 => wino_chunk::<8, 6, F6>(isa, &geo, x, u, &conv.bias, scratch, t0, t1, dst.get()),
                }
            };
        });
        (out, oh, ow)
    }
}

struct SendPtr(*mut f32);
impl SendPtr {
    /// Through a method, so that closures capture the wrapper, not the raw pointer.
    fn get(&self) -> *mut f32 {
        self.0
    }
}
// SAFETY: every chunk writes a disjoint set of outputs through it.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

struct Geometry {
    c: usize,
    k: usize,
    kp: usize,
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    /// Tiles a chunk holds (its scratch rows).
    len: usize,
    pool: bool,
}

/// The 2x2 stride-2 max pool (floor), NHWC.
fn max_pool(x: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let (oh, ow) = (h / 2, w / 2);
    let mut out = vec![0f32; n * oh * ow * c];
    for img in 0..n {
        for y in 0..oh {
            for xx in 0..ow {
                let o = ((img * oh + y) * ow + xx) * c;
                let at = |dy: usize, dx: usize| ((img * h + 2 * y + dy) * w + 2 * xx + dx) * c;
                for j in 0..c {
                    out[o + j] = x[at(0, 0) + j].max(x[at(0, 1) + j]).max(x[at(1, 0) + j]).max(x[at(1, 1) + j]);
                }
            }
        }
    }
    out
}

/// The tiling of every Winograd layer unless [`TILE_ENV`] says otherwise.
pub const DEFAULT_TILE: Tile = Tile::F6;

/// The engine's layers from the file's, weights transformed for `tile` and packed for panels of `nr`.
fn build(layers: &[PlainLayer], nr: usize, tile: Tile) -> Vec<Conv> {
    let mut convs: Vec<Conv> = Vec::new();
    for layer in layers {
        match layer {
            PlainLayer::MaxPool2x2 => {
                if let Some(last) = convs.last_mut() {
                    last.pool = true;
                }
            }
            PlainLayer::Conv3x3Relu { channels, filters, weight, bias } => {
                let (c, k) = (*channels, *filters);
                let padded = k.div_ceil(nr) * nr;
                let mut b = bias.clone();
                b.resize(padded, 0.0);
                let kind = if c < MIN_WINOGRAD_CHANNELS {
                    // [9c][k], rows (ky*3+kx)*c + ci, from ONNX's [k][c][ky][kx].
                    let mut m = vec![0f32; 9 * c * k];
                    for f in 0..k {
                        for ci in 0..c {
                            for t in 0..9 {
                                m[(t * c + ci) * k + f] = weight[(f * c + ci) * 9 + t];
                            }
                        }
                    }
                    Kind::Im2col(pack(&m, 9 * c, k, nr))
                } else {
                    Kind::Winograd(tile, transform_kernel(tile, weight, c, k, nr))
                };
                convs.push(Conv { channels: c, filters: k, padded, bias: b, pool: false, kind });
            }
        }
    }
    convs
}

/// `G` of F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2 (and infinity).
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `G` of F(6x6, 3x3), interpolation points 0, 1, -1, 1/2, -1/2, 2, -2
/// (and infinity), as NNPACK and wincnn have them.
const G6: [[f64; 3]; 8] = [
    [1.0, 0.0, 0.0],
    [-2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0],
    [-2.0 / 9.0, 2.0 / 9.0, -2.0 / 9.0],
    [1.0 / 90.0, 1.0 / 45.0, 2.0 / 45.0],
    [1.0 / 90.0, -1.0 / 45.0, 2.0 / 45.0],
    [32.0 / 45.0, 16.0 / 45.0, 8.0 / 45.0],
    [32.0 / 45.0, -16.0 / 45.0, 8.0 / 45.0],
    [0.0, 0.0, 1.0],
];

/// `U = G g Gt` of every (filter, channel) kernel of ONNX's `[k][c][3][3]`,
/// in float64 and rounded once, packed `[points][padded / nr][c][nr]`.
fn transform_kernel(tile: Tile, weight: &[f32], c: usize, k: usize, nr: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let (gm, a) = (tile.g(), tile.a());
    let padded = k.div_ceil(nr) * nr;
    let mut u = vec![0f32; tile.points() * padded * c];
    // One panel of `nr` filters a task, on the engine's threads, and each (panel,
    // channel) written as `points` runs of `nr` values: written value by
    // value, filter by filter, every store went to another cache line, and
    // the load was most of a run's set-up (1.2 s for VGG16 in F(6x6)).
    let dst = SendPtr(u.as_mut_ptr());
    (0..padded / nr).into_par_iter().for_each(|kb| {
        let mut local = vec![0f32; a * a * nr];
        for ci in 0..c {
            for lane in 0..nr {
                let f = kb * nr + lane;
                if f >= k {
                    (0..a * a).for_each(|p| local[p * nr + lane] = 0.0);
                    continue;
                }
                let g = &weight[(f * c + ci) * 9..][..9];
                // Gg: a x 3, then (Gg) Gt: a x a.
                let mut gg = [[0f64; 3]; 8];
                for (row, out) in gm.iter().zip(gg.iter_mut()) {
                    *out = std::array::from_fn(|j| (0..3).map(|t| row[t] * f64::from(g[t * 3 + j])).sum());
                }
                for i in 0..a {
                    for j in 0..a {
                        let v: f64 = (0..3).map(|t| gg[i][t] * gm[j][t]).sum();
                        local[(i * a + j) * nr + lane] = v as f32;
                    }
                }
            }
            for p in 0..a * a {
                let at = p * padded * c + kb * c * nr + ci * nr;
                // SAFETY: `at..at + nr` is within `u`, and only the task of panel `kb` writes there.
                unsafe { std::ptr::copy_nonoverlapping(local[p * nr..].as_ptr(), dst.get().add(at), nr) };
            }
        }
    });
    u
}

/// The two 1-D transforms of a tiling F(M x M, 3x3) with `A = M + 2`,
/// written out so that each line is a few vector operations: `Bt x` of
/// `A` inputs and `At x` of `A` products. (The kernel's `G` is applied
/// once at load, in float64: [`Tile::g`].)
trait Tiling<const A: usize, const M: usize> {
    fn bt<V: Lanes>(x: [V; A]) -> [V; A];
    fn at<V: Lanes>(x: [V; A]) -> [V; M];
}

struct F4;
struct F6;

impl Tiling<6, 4> for F4 {
    /// Bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
    /// [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
    #[inline(always)]
    fn bt<V: Lanes>(x: [V; 6]) -> [V; 6] {
        let (a, b) = (x[4] - x[2] * 4.0, x[3] - x[1] * 4.0);
        let (c, d) = (x[4] - x[2], (x[3] - x[1]) * 2.0);
        [x[0] * 4.0 - x[2] * 5.0 + x[4], a + b, a - b, c + d, c - d, x[1] * 4.0 - x[3] * 5.0 + x[5]]
    }

    /// At = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
    #[inline(always)]
    fn at<V: Lanes>(x: [V; 6]) -> [V; 4] {
        let (s1, d1, s2, d2) = (x[1] + x[2], x[1] - x[2], x[3] + x[4], x[3] - x[4]);
        [x[0] + s1 + s2, d1 + d2 * 2.0, s1 + s2 * 4.0, d1 + d2 * 8.0 + x[5]]
    }
}

impl Tiling<8, 6> for F6 {
    /// Bt = [[1, 0, -21/4, 0, 21/4, 0, -1, 0], [0, 1, 1, -17/4, -17/4, 1, 1, 0],
    /// [0, -1, 1, 17/4, -17/4, -1, 1, 0], [0, 1/2, 1/4, -5/2, -5/4, 2, 1, 0],
    /// [0, -1/2, 1/4, 5/2, -5/4, -2, 1, 0], [0, 2, 4, -5/2, -5, 1/2, 1, 0],
    /// [0, -2, 4, 5/2, -5, -1/2, 1, 0], [0, -1, 0, 21/4, 0, -21/4, 0, 1]].
    #[inline(always)]
    fn bt<V: Lanes>(x: [V; 8]) -> [V; 8] {
        let (a1, a2) = (x[2] + x[6] - x[4] * 4.25, x[1] + x[5] - x[3] * 4.25);
        let (b1, b2) = (x[6] + x[2] * 0.25 - x[4] * 1.25, x[1] * 0.5 - x[3] * 2.5 + x[5] * 2.0);
        let (c1, c2) = (x[6] + (x[2] - x[4] * 1.25) * 4.0, x[1] * 2.0 - x[3] * 2.5 + x[5] * 0.5);
        [
            x[0] - x[6] + (x[4] - x[2]) * 5.25,
            a1 + a2,
            a1 - a2,
            b1 + b2,
            b1 - b2,
            c1 + c2,
            c1 - c2,
            x[7] - x[1] + (x[3] - x[5]) * 5.25,
        ]
    }

    /// At = [[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1/2, -1/2, 0],
    /// [0, 1, 1, 4, 4, 1/4, 1/4, 0], [0, 1, -1, 8, -8, 1/8, -1/8, 0],
    /// [0, 1, 1, 16, 16, 1/16, 1/16, 0], [0, 1, -1, 32, -32, 1/32, -1/32, 1]].
    #[inline(always)]
    fn at<V: Lanes>(x: [V; 8]) -> [V; 6] {
        let (s1, d1, s2, d2) = (x[1] + x[2], x[1] - x[2], x[3] + x[4], x[3] - x[4]);
        let (s3, d3) = (x[5] + x[6], x[5] - x[6]);
        [
            x[0] + s1 + s2 + s3,
            d1 + d2 * 2.0 + d3 * 0.5,
            s1 + s2 * 4.0 + s3 * 0.25,
            d1 + d2 * 8.0 + d3 * 0.125,
            s1 + s2 * 16.0 + s3 * 0.0625,
            d1 + d2 * 32.0 + d3 * 0.03125 + x[7],
        ]
    }
}

/// One chunk of tiles `t0..t1`: input transform, the `A * A` products, output
/// transform with bias, ReLU and the fused pool, written to `out`.
///
/// # Safety
/// `isa` is available; no other chunk writes the outputs of these tiles.
#[allow(clippy::too_many_arguments)]
unsafe fn wino_chunk<const A: usize, const M: usize, T: Tiling<A, M>>(
    isa: Isa,
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    bias: &[f32],
    s: &mut [f32],
    t0: usize,
    t1: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => wino_avx512::<A, M, T>(g, x, u, bias, s, t0, t1, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => wino_avx2::<A, M, T>(g, x, u, bias, s, t0, t1, out),
            _ => wino_body::<A, M, T, Portable>(Isa::Portable, g, x, u, bias, s, t0, t1, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn wino_avx512<const A: usize, const M: usize, T: Tiling<A, M>>(
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    bias: &[f32],
    s: &mut [f32],
    t0: usize,
    t1: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe { wino_body::<A, M, T, Zmm>(Isa::Avx512, g, x, u, bias, s, t0, t1, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn wino_avx2<const A: usize, const M: usize, T: Tiling<A, M>>(
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    bias: &[f32],
    s: &mut [f32],
    t0: usize,
    t1: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe { wino_body::<A, M, T, Ymm>(Isa::Avx2, g, x, u, bias, s, t0, t1, out) }
}

/// One chunk of pixels `p0..p1` of the im2col conv: gather, product,
/// bias and ReLU, written to `out` (`[pixels][k]`).
///
/// # Safety
/// `isa` is available; no other chunk writes these pixels.
#[allow(clippy::too_many_arguments)]
unsafe fn im2col_chunk(
    isa: Isa,
    g: &Geometry,
    x: &[f32],
    wp: &[f32],
    bias: &[f32],
    s: &mut [f32],
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => im2col_avx512(g, x, wp, bias, s, p0, p1, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => im2col_avx2(g, x, wp, bias, s, p0, p1, out),
            _ => im2col_body(Isa::Portable, g, x, wp, bias, s, p0, p1, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn im2col_avx512(
    g: &Geometry,
    x: &[f32],
    wp: &[f32],
    bias: &[f32],
    s: &mut [f32],
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe { im2col_body(Isa::Avx512, g, x, wp, bias, s, p0, p1, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn im2col_avx2(
    g: &Geometry,
    x: &[f32],
    wp: &[f32],
    bias: &[f32],
    s: &mut [f32],
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe { im2col_body(Isa::Avx2, g, x, wp, bias, s, p0, p1, out) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn im2col_body(
    isa: Isa,
    g: &Geometry,
    x: &[f32],
    wp: &[f32],
    bias: &[f32],
    s: &mut [f32],
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    let Geometry { c, k, kp, h, w, len, .. } = *g;
    let (depth, nr) = (9 * c, isa.nr());
    let (a, m) = s.split_at_mut(len * depth);
    for (r, p) in (p0..p1).enumerate() {
        let (img, y, xx) = (p / (h * w), p / w % h, p % w);
        let row = &mut a[r * depth..(r + 1) * depth];
        for ky in 0..3 {
            for kx in 0..3 {
                let (sy, sx) = (y + ky, xx + kx);
                let dst = &mut row[(ky * 3 + kx) * c..(ky * 3 + kx + 1) * c];
                if sy >= 1 && sy <= h && sx >= 1 && sx <= w {
                    let src = ((img * h + sy - 1) * w + sx - 1) * c;
                    if let (Ok(d), Ok(v)) =
                        (<&mut [f32; 3]>::try_from(&mut *dst), <&[f32; 3]>::try_from(&x[src..src + c]))
                    {
                        *d = *v;
                    } else {
                        dst.copy_from_slice(&x[src..src + c]);
                    }
                } else {
                    dst.iter_mut().for_each(|d| *d = 0.0);
                }
            }
        }
    }
    let rows = (p1 - p0).div_ceil(ROWS);
    for kb in 0..kp / nr {
        for gr in 0..rows {
            // SAFETY: `a` holds `len` rows of `depth` (a multiple of ROWS), `wp`
            // a panel of `depth * nr` per `kb`, `m` `len` rows of `kp`.
            unsafe {
                panel(
                    isa,
                    depth,
                    a[gr * ROWS * depth..].as_ptr(),
                    depth,
                    wp[kb * depth * nr..].as_ptr(),
                    m[gr * ROWS * kp + kb * nr..].as_mut_ptr(),
                    kp,
                )
            };
        }
    }
    // SAFETY: pixels p0..p1 are this chunk's alone, `k` values each.
    let out = unsafe { std::slice::from_raw_parts_mut(out.add(p0 * k), (p1 - p0) * k) };
    for (o, mrow) in out.chunks_exact_mut(k).zip(m.chunks_exact(kp)) {
        for ((o, &v), &b) in o.iter_mut().zip(mrow).zip(bias) {
            *o = (v + b).max(0.0);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn wino_body<const A: usize, const M: usize, T: Tiling<A, M>, V: Lanes>(
    isa: Isa,
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    bias: &[f32],
    s: &mut [f32],
    t0: usize,
    t1: usize,
    out: *mut f32,
) {
    let Geometry { c, k, kp, h, w, th, tw, len, pool } = *g;
    let nr = isa.nr();
    let (v, m) = s.split_at_mut(A * A * len * c);
    let tile_of = |t: usize| (t / (th * tw), t / tw % th, t % tw);
    let mut clock = PROFILE.then(std::time::Instant::now);
    let mut lap = |phase: usize| {
        if let Some(c) = clock.as_mut() {
            PHASES[phase].fetch_add(c.elapsed().as_nanos() as u64, Ordering::Relaxed);
            *c = std::time::Instant::now();
        }
    };
    // Input transform: V[tile][p][c], each tile's values together, so the
    // transforms write and read one run of memory per tile (position-major
    // V[p][tile][c] scattered them over A * A streams, and the transforms
    // took longer than the products). Rows first into a small stack
    // buffer, then columns: each step holds A vectors, which stay in
    // registers (whole tiles of vectors did not, and were copied by
    // library calls).
    let mut tmp = [[V::zero(); A]; A];
    for (i, t) in (t0..t1).enumerate() {
        let (img, ty, tx) = tile_of(t);
        for cb in (0..c).step_by(V::N) {
            let lanes = (c - cb).min(V::N);
            for (r, tmp_row) in tmp.iter_mut().enumerate() {
                let y = (M * ty + r).wrapping_sub(1);
                let row: [V; A] = std::array::from_fn(|col| {
                    let xx = (M * tx + col).wrapping_sub(1);
                    if y < h && xx < w { V::load_n(&x[((img * h + y) * w + xx) * c + cb..], lanes) } else { V::zero() }
                });
                *tmp_row = T::bt(row);
            }
            for col in 0..A {
                let y = T::bt(std::array::from_fn(|r| tmp[r][col]));
                for (r, val) in y.iter().enumerate() {
                    val.store_n(&mut v[(i * A * A + r * A + col) * c + cb..], lanes);
                }
            }
        }
    }
    lap(0);
    // The A * A products, in panels of `nr` filters and `ROWS` tiles:
    // M[tile][p][kp] = V[tile][p][..] U[p].
    let groups = (t1 - t0).div_ceil(ROWS);
    let (lda, ldo) = (A * A * c, A * A * kp);
    for p in 0..A * A {
        let (vp, up, mp) = (&v[p * c..], &u[p * kp * c..], &mut m[p * kp..]);
        for kb in 0..kp / nr {
            for gr in 0..groups {
                // SAFETY: `vp` holds `len` rows of `c`, `lda` apart, `up`
                // `kp / nr` panels of `c * nr`, `mp` `len` rows of `kp`,
                // `ldo` apart; `len` is a multiple of ROWS.
                unsafe {
                    panel(
                        isa,
                        c,
                        vp[gr * ROWS * lda..].as_ptr(),
                        lda,
                        up[kb * c * nr..].as_ptr(),
                        mp[gr * ROWS * ldo + kb * nr..].as_mut_ptr(),
                        ldo,
                    )
                };
            }
        }
    }
    lap(1);
    // Output transform, bias, ReLU, pool: columns first into the stack
    // buffer, then rows, as the input transform.
    let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
    let mut tmp = [[V::zero(); A]; M];
    let mut ys = [[V::zero(); M]; M];
    for (i, t) in (t0..t1).enumerate() {
        let (img, ty, tx) = tile_of(t);
        for kb in (0..k).step_by(V::N) {
            let lanes = (k - kb).min(V::N);
            for col in 0..A {
                let y = T::at(std::array::from_fn(|r| V::load_full(&m[(i * A * A + r * A + col) * kp + kb..])));
                for r in 0..M {
                    tmp[r][col] = y[r];
                }
            }
            // Whole vectors: rows of M and the bias are `kp` long, a
            // multiple of the panel width, itself a multiple of `V::N`.
            let b = V::load_full(&bias[kb..]);
            for r in 0..M {
                let y = T::at(tmp[r]);
                for col in 0..M {
                    ys[r][col] = (y[col] + b).max(V::zero());
                }
            }
            let y = |r: usize, col: usize| ys[r][col];
            if pool {
                // M is even: a tile's outputs hold whole pooling windows.
                for a in 0..M / 2 {
                    for bb in 0..M / 2 {
                        let (py, px) = (M / 2 * ty + a, M / 2 * tx + bb);
                        if py < oh && px < ow {
                            let v = y(2 * a, 2 * bb)
                                .max(y(2 * a, 2 * bb + 1))
                                .max(y(2 * a + 1, 2 * bb))
                                .max(y(2 * a + 1, 2 * bb + 1));
                            let o = ((img * oh + py) * ow + px) * k + kb;
                            // SAFETY: this tile's outputs are this chunk's alone.
                            unsafe { v.store_ptr(out.add(o), lanes) };
                        }
                    }
                }
            } else {
                for r in 0..M {
                    let oy = M * ty + r;
                    if oy >= oh {
                        break;
                    }
                    for col in 0..M {
                        let ox = M * tx + col;
                        if ox < ow {
                            let o = ((img * oh + oy) * ow + ox) * k + kb;
                            // SAFETY: as above.
                            unsafe { y(r, col).store_ptr(out.add(o), lanes) };
                        }
                    }
                }
            }
        }
    }
    lap(2);
}

#[cfg(test)]
mod tests;
