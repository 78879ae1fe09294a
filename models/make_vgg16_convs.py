#!/usr/bin/env python3
"""VGG16's 13 conv layers' weights for the training backend: what the
visualisations (section 5.4: activations, filter patterns) run the whole
conv base on, in Rust, so that they can take its gradients.

Usage: make_vgg16_convs.py VGG16_NOTOP.onnx OUT.safetensors

VGG16_NOTOP is models/vgg16_notop.onnx (make_vgg16_notop.py's cut, checked
there against Keras's ImageNet values). OUT holds `blockB_convC/kernel`
[3, 3, in, out] (Keras's layout) and `blockB_convC/bias` [out] for all 13
convs, 14,714,688 values, metadata `format` = keras-vgg16-convs (what
src/ml/convnet/vgg16.rs checks). No input shape is stored: the base is all
convs and pools. src/ml/convnet/vgg16.rs's test runs these weights in Rust
against ONNX Runtime's intermediate outputs of VGG16_NOTOP, layer by layer.
Written atomically, only after every check has passed.
"""
import os
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

from make_vgg16_notop import K1, PARAMS, fail, find_node
from safetensors_f32 import read_safetensors, write_safetensors

FORMAT = "keras-vgg16-convs"
# Keras's names and output channels of VGG16's convs, in order.
CONVS = [("block1_conv1", 64), ("block1_conv2", 64), ("block2_conv1", 128), ("block2_conv2", 128),
         ("block3_conv1", 256), ("block3_conv2", 256), ("block3_conv3", 256),
         ("block4_conv1", 512), ("block4_conv2", 512), ("block4_conv3", 512),
         ("block5_conv1", 512), ("block5_conv2", 512), ("block5_conv3", 512)]


def conv_weights(src, convs):
    """{`NAME/kernel`: [kh,kw,in,out], `NAME/bias`: [out]} for each (NAME,
    out channels) of `convs`, from the source's Conv initializers. ONNX Conv
    weights are [out, in, kh, kw] (tf2onnx stored them so; the shapes are
    checked), Keras's kernel is [kh, kw, in, out]: kernel = W.transpose(2, 3, 1, 0)."""
    g = src.graph
    inits = {t.name: t for t in g.initializer}
    out = {}
    for name, filters in convs:
        conv = find_node(g, "Conv", name)
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        # Keras's padding="same" for a 3x3 stride-1 kernel is one pixel each side.
        if list(attrs.get("pads", [])) != [1, 1, 1, 1] or list(attrs.get("strides", [1, 1])) != [1, 1] \
                or attrs.get("group", 1) != 1 or list(attrs.get("dilations", [1, 1])) != [1, 1]:
            fail(f"{conv.name}: expected a 3x3 'same' conv (pads 1, strides 1, group 1), found {attrs}")
        if len(conv.input) != 3 or conv.input[1] not in inits or conv.input[2] not in inits:
            fail(f"{conv.name}: weight and bias are not both initializers")
        w = numpy_helper.to_array(inits[conv.input[1]])
        b = numpy_helper.to_array(inits[conv.input[2]])
        if w.shape[0] != filters or w.shape[2:] != (3, 3) or b.shape != (filters,) or w.dtype != np.float32:
            fail(f"{conv.name}: weight {w.shape} {w.dtype}, bias {b.shape}; expected OIHW ({filters},in,3,3) float32")
        out[f"{name}/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        out[f"{name}/bias"] = b.astype(np.float32)
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src_path, out_path = sys.argv[1:]
    weights = conv_weights(onnx.load(src_path), CONVS)
    n = sum(a.size for a in weights.values())
    if n != PARAMS:
        fail(f"parameter count {n:,} != {PARAMS:,}")
    # Keras layout [kh, kw, in, out]: filter 0, input channel 0 is kernel[:, :, 0, 0].
    k1 = weights["block1_conv1/kernel"][:, :, 0, 0]
    if not np.allclose(k1, K1, atol=1e-7):
        fail(f"block1_conv1 kernel[:, :, 0, 0] = {k1.tolist()} != Keras's ImageNet values")
    tmp = out_path + ".tmp"
    write_safetensors(tmp, weights, {"format": FORMAT, "source": os.path.basename(src_path),
                                     "layout": "kernel [kh, kw, in, out], Keras's"})
    back, _ = read_safetensors(tmp)  # the file reads back as what was meant
    if sorted(back) != sorted(weights) or any(not np.array_equal(back[k], weights[k]) for k in weights):
        fail(f"{tmp} does not read back as written")
    os.replace(tmp, out_path)
    print(f"make_vgg16_convs: OK: {n:,} params in 13 convs, block1_conv1 matches Keras; wrote {out_path}")


if __name__ == "__main__":
    main()
