//! See Cargo.toml: one training step of (a) block5 and (b) the cats-vs-dogs
//! convnet in burn (flex backend, NCHW as burn wants), timed as a median of
//! five steps after one warm-up. RMSprop set to Keras's rho 0.9, momentum 0,
//! epsilon 1e-7; the loss is a squared error (the head's cost is negligible).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{GradientsParams, Optimizer, RmsPropConfig};
use burn::tensor::activation::{relu, sigmoid};
use burn::prelude::*;
use std::time::Instant;

#[derive(Module, Debug)]
struct Net {
    convs: Vec<Conv2d>,
    pool_after: Vec<bool>,
    pool: MaxPool2d,
    d1: Linear,
    d2: Linear,
}

impl Net {
    fn forward(&self, mut x: Tensor<4>) -> Tensor<2> {
        for (c, &p) in self.convs.iter().zip(&self.pool_after) {
            x = relu(c.forward(x));
            if p { x = self.pool.forward(x); }
        }
        let x: Tensor<2> = x.flatten(1, 3);
        sigmoid(self.d2.forward(relu(self.d1.forward(x))))
    }
}

fn run(name: &str, net: Net, input: [usize; 4], gflop: f64, device: &Device) {
    let mut net = net;
    let mut opt = RmsPropConfig::new().with_alpha(0.9).with_momentum(0.0).with_epsilon(1e-7).init();
    let x = Tensor::<4>::random(input, burn::tensor::Distribution::Uniform(0.0, 1.0), device);
    let y = Tensor::<2>::ones([input[0], 1], device);
    let mut times = vec![];
    for i in 0..6 {
        let t = Instant::now();
        let p = net.forward(x.clone());
        let loss = (p - y.clone()).powf_scalar(2.0).mean();
        let grads = loss.backward();
        let grads = GradientsParams::from_grads(grads, &net);
        net = opt.step(1e-4, net, grads);
        // force completion
        let _ = net.d2.weight.val().sum().into_scalar::<f32>();
        let dt = t.elapsed().as_secs_f64();
        println!("{name} step {i}: {dt:.3}s  {:.1} GFLOP/s", gflop / dt);
        if i > 0 { times.push(dt); }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = times[times.len() / 2];
    println!("{name}: median {m:.3}s  {:.1} GFLOP/s (gflop {gflop:.1})", gflop / m);
}

fn conv(ci: usize, co: usize, pad: PaddingConfig2d, device: &Device) -> Conv2d {
    Conv2dConfig::new([ci, co], [3, 3]).with_padding(pad).init(device)
}

fn main() {
    let device = Device::flex().autodiff();
    let which = std::env::args().nth(1).unwrap_or_default();
    if which != "b" {
        // (a) block5 on [20, 512, 9, 9] (NCHW for burn)
        let convs = (0..3).map(|_| conv(512, 512, PaddingConfig2d::Same, &device)).collect();
        let net = Net { convs, pool_after: vec![false, false, true], pool: MaxPool2dConfig::new([2, 2]).init(),
            d1: LinearConfig::new(4 * 4 * 512, 256).init(&device), d2: LinearConfig::new(256, 1).init(&device) };
        // forward MACs per image: 3 convs * 81*512*4608; training = fwd + weight grad (all) + input grad (2 of 3)
        let conv_mac = 81.0 * 512.0 * 4608.0;
        let gflop = 20.0 * 2.0 * (conv_mac * 8.0 + 3.0 * (8192.0 * 256.0)) / 1e9;
        run("a_block5", net, [20, 512, 9, 9], gflop, &device);
    }
    if which != "a" {
        let chans = [(3, 32, 148), (32, 64, 72), (64, 128, 34), (128, 128, 15)];
        let convs = chans.iter().map(|&(i, o, _)| conv(i, o, PaddingConfig2d::Valid, &device)).collect();
        let net = Net { convs, pool_after: vec![true; 4], pool: MaxPool2dConfig::new([2, 2]).init(),
            d1: LinearConfig::new(7 * 7 * 128, 512).init(&device), d2: LinearConfig::new(512, 1).init(&device) };
        let macs: Vec<f64> = chans.iter().map(|&(i, o, s)| (s * s * o * i * 9) as f64).collect();
        let train = macs[0] * 2.0 + macs[1..].iter().sum::<f64>() * 3.0 + 3.0 * (6272.0 * 512.0);
        let gflop = 20.0 * 2.0 * train / 1e9;
        run("b_catsdogs", net, [20, 3, 150, 150], gflop, &device);
    }
}
