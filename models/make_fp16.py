#!/usr/bin/env python3
"""Half-precision copy of a float32 ONNX model, float32 at its edges.

Usage: make_fp16.py IN.onnx OUT.onnx

Every float32 weight (initializers, Constant nodes) becomes float16, every float32 tensor inside the graph follows, and a
Cast at each input and output keeps the model's interface float32, so
convflow's `onnx_features` feeds it and reads it exactly as the float32
model (same NHWC input, same features shape). Its features are cached apart
from float32's: the cache keys by the model file's content.

Checks before writing: the graph passes onnx.checker, and on a random batch
the half-precision model's output is within 1e-2 of the float32 model's
largest value (ONNX Runtime, CPU). Prints that difference.
Tensor types other than float32 (int64 shapes, ...) are left alone.
(bfloat16 is no option: ONNX's Conv does not take it before opset 22.)
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def convert(model):
    g = model.graph
    half = TensorProto.FLOAT16

    def half_tensor(t):
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))

    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            half_tensor(t)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                half_tensor(a.t)
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = half
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = half
    edges = {}
    for i in g.input:
        if i.type.tensor_type.elem_type == TensorProto.FLOAT:
            edges[i.name] = i.name + "__half"
    outs = {}
    for o in g.output:
        if o.type.tensor_type.elem_type == TensorProto.FLOAT:
            outs[o.name] = o.name + "__half"
    for n in g.node:
        n.input[:] = [edges.get(x, x) for x in n.input]
        n.output[:] = [outs.get(x, x) for x in n.output]
    casts_in = [helper.make_node("Cast", [name], [inner], to=half, name=f"{name}_to_half") for name, inner in edges.items()]
    casts_out = [helper.make_node("Cast", [inner], [name], to=TensorProto.FLOAT, name=f"{name}_to_float")
                 for name, inner in outs.items()]
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    return model


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1:]
    model = convert(onnx.load(src))
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    full = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    halfs = ort.InferenceSession(dst, so, providers=["CPUExecutionProvider"])
    inp = full.get_inputs()[0]
    shape = [d if isinstance(d, int) else s for d, s in zip(inp.shape, [2, 64, 64, 3])]
    x = np.random.default_rng(0).uniform(-120, 150, size=shape).astype(np.float32)
    (a,) = full.run(None, {inp.name: x})
    (b,) = halfs.run(None, {inp.name: x})
    rel = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
    print(f"make_fp16: wrote {dst}; on a random {shape} batch, max |half - float32| = {rel:.2e} of the largest value")
    if not rel <= 1e-2:
        sys.exit(f"make_fp16: {dst} is {rel:.2e} off float32 (over 1e-2): not written correctly")


if __name__ == "__main__":
    main()
