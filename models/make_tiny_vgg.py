#!/usr/bin/env python3
"""Write a tiny, deterministic VGG-shaped model for fast tests.

Usage: make_tiny_vgg.py OUT.onnx

Same interface as vgg16_notop.onnx: input `input` NHWC float32 [N,H,W,3]
(symbolic), output `features` NHWC float32 [N,floor(H/32),floor(W/32),16].
5 blocks of (3x3 conv pad 1 + ReLU + 2x2 max pool stride 2, floor), channels
8,8,16,16,16. Checked against a plain numpy implementation before writing.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto

CHANNELS = [8, 8, 16, 16, 16]
SEED = 20240501  # fixed: the file (and test expectations) must not change between runs


def build():
    rng = np.random.default_rng(SEED)
    # Same layout trick as the tf2onnx VGG16: NHWC in, NCHW inside, NHWC out,
    # so the Rust side exercises the same interface.
    nodes = [helper.make_node("Transpose", ["input"], ["x0"], perm=[0, 3, 1, 2])]
    inits, weights, cin, x = [], [], 3, "x0"
    for i, cout in enumerate(CHANNELS, 1):
        # He-normal init keeps activations alive through 5 ReLUs; the small
        # positive bias keeps some channels non-zero even for zero input.
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (9 * cin))).astype(np.float32)
        b = rng.uniform(0.0, 0.1, cout).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"block{i}_conv_w"), numpy_helper.from_array(b, f"block{i}_conv_b")]
        weights.append((w, b))
        nodes += [
            helper.make_node("Conv", [x, f"block{i}_conv_w", f"block{i}_conv_b"], [f"c{i}"],
                             name=f"block{i}_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"block{i}_relu"),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], name=f"block{i}_pool",
                             kernel_shape=[2, 2], strides=[2, 2]),
        ]
        cin, x = cout, f"p{i}"
    nodes.append(helper.make_node("Transpose", [x], ["features"], name="features_to_nhwc", perm=[0, 2, 3, 1]))
    graph = helper.make_graph(
        nodes, "tiny_vgg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "OH", "OW", CHANNELS[-1]])],
        inits)
    # Same opset/IR as vgg16_notop.onnx so both load on the same runtimes.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="convflow/models/make_tiny_vgg.py")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model, weights


def reference(x, weights):
    """Plain numpy forward pass (NHWC) to check the ONNX graph independently."""
    for w, b in weights:
        n, h, wd, _ = x.shape
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        win = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(1, 2))  # n,h,w,c,kh,kw
        x = np.maximum(np.einsum("nhwcij,ocij->nhwo", win, w) + b, 0)
        h2, w2 = h // 2, wd // 2  # floor, like MaxPool without ceil_mode
        x = x[:, :h2 * 2, :w2 * 2].reshape(n, h2, 2, w2, 2, -1).max(axis=(2, 4))
    return x


def fail(msg):
    sys.exit(f"make_tiny_vgg: FAIL: {msg}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_path = sys.argv[1]
    model, weights = build()
    data = model.SerializeToString()
    if len(data) >= 1_000_000:
        fail(f"model is {len(data)} bytes, expected < 1 MB")
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for shape, want in [((2, 150, 150, 3), (2, 4, 4, 16)), ((1, 64, 97, 3), (1, 2, 3, 16))]:
        x = rng.uniform(0, 1, shape).astype(np.float32)
        (y,) = sess.run(None, {"input": x})
        if y.shape != want:
            fail(f"{shape} -> {y.shape}, expected {want}")
        diff = float(np.abs(y - reference(x, weights)).max())
        if diff > 1e-4 or not np.any(y > 0):
            fail(f"{shape}: onnxruntime vs numpy max|diff|={diff:.2e}, any>0={bool(np.any(y > 0))}")
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)
    print(f"make_tiny_vgg: OK: wrote {out_path} ({len(data)} bytes, "
          f"{sum(w.size + b.size for w, b in weights)} params); [2,150,150,3]->[2,4,4,16], "
          f"matches numpy reference (max|diff|={diff:.1e})")


if __name__ == "__main__":
    main()
