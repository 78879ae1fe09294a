//! The layer lists of the convnet benches: VGG16's block5 with the book's
//! head, and the book's two from-scratch convnets (MNIST 5.1, cats vs.
//! dogs 5.2), as `pipelines/mnist_convnet.yaml` and
//! `pipelines/convnet_from_scratch.yaml` declare them.

use convflow::ml::activation::Activation;
use convflow::ml::convnet::LayerSpec;
use convflow::ml::convnet::conv2d::Padding;
use convflow::ml::convnet::spec::Pair;

fn conv(filters: usize, padding: Padding) -> LayerSpec {
    LayerSpec::Conv2d {
        filters,
        kernel_size: Pair::One(3),
        strides: Pair::One(1),
        padding,
        activation: Activation::Relu,
    }
}
fn pool() -> LayerSpec {
    LayerSpec::MaxPooling2d { pool_size: Pair::One(2), strides: None }
}
fn dense(units: usize, activation: Activation) -> LayerSpec {
    LayerSpec::Dense { units, activation }
}

pub fn block5() -> ([usize; 3], Vec<LayerSpec>) {
    let s = Padding::Same;
    (
        [9, 9, 512],
        vec![
            conv(512, s),
            conv(512, s),
            conv(512, s),
            pool(),
            LayerSpec::Flatten,
            dense(256, Activation::Relu),
            dense(1, Activation::Sigmoid),
        ],
    )
}

pub fn mnist() -> ([usize; 3], Vec<LayerSpec>) {
    let v = Padding::Valid;
    (
        [28, 28, 1],
        vec![
            conv(32, v),
            pool(),
            conv(64, v),
            pool(),
            conv(64, v),
            LayerSpec::Flatten,
            dense(64, Activation::Relu),
            dense(10, Activation::Softmax),
        ],
    )
}

pub fn cats_dogs() -> ([usize; 3], Vec<LayerSpec>) {
    let v = Padding::Valid;
    (
        [150, 150, 3],
        vec![
            conv(32, v),
            pool(),
            conv(64, v),
            pool(),
            conv(128, v),
            pool(),
            conv(128, v),
            pool(),
            LayerSpec::Flatten,
            dense(512, Activation::Relu),
            dense(1, Activation::Sigmoid),
        ],
    )
}
