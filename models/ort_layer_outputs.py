#!/usr/bin/env python3
"""Every conv and pooling layer's output of an ONNX model, from Python
onnxruntime: the reference `convflow visualize activations` is checked
against (tests/visualize.rs).

Usage: ort_layer_outputs.py MODEL.onnx INPUT.npy OUT_DIR

INPUT: float32 [1, H, W, C] (or [H, W, C]), the model's input for one
image, as `convflow visualize activations --npy` writes it (input.npy). For each Conv node in graph order, the output of the
activation node that follows it (Relu, Tanh, Sigmoid: Keras's layer
output is after its activation), or the Conv's own output when none does;
for each MaxPool, its output. Written as OUT_DIR/NN.npy, float32
[h, w, c]: ONNX's Conv and MaxPool are NCHW, turned back into NHWC here.
Single-threaded, so the numbers do not depend on the machine's core count.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

ACTIVATIONS = {"Relu", "Tanh", "Sigmoid"}


def layer_outputs(graph):
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in graph.node:
        if n.op_type == "MaxPool":
            out.append(n.output[0])
        elif n.op_type == "Conv":
            after = consumers.get(n.output[0], [])
            act = [c for c in after if c.op_type in ACTIVATIONS]
            out.append(act[0].output[0] if len(after) == 1 and act else n.output[0])
    return out


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    model_path, inp, out_dir = sys.argv[1:]
    x = np.load(inp)
    if x.ndim == 3:
        x = x[None]
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[0] != 1:
        sys.exit(f"ort_layer_outputs: {inp}: expected float32 [1, H, W, C], got {x.dtype} {list(x.shape)}")
    model = onnx.load(model_path)
    names = layer_outputs(model.graph)
    if not names:
        sys.exit(f"ort_layer_outputs: {model_path}: no Conv or MaxPool node")
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ys = sess.run(names, {sess.get_inputs()[0].name: x})
    os.makedirs(out_dir, exist_ok=True)
    for i, y in enumerate(ys):
        if y.ndim != 4:
            sys.exit(f"ort_layer_outputs: {names[i]}: {list(y.shape)} is not an NCHW map")
        np.save(os.path.join(out_dir, f"{i:02d}.npy"), y[0].transpose(1, 2, 0).astype(np.float32))
    print(f"ort_layer_outputs: {len(ys)} layers of {model_path} -> {out_dir}")


if __name__ == "__main__":
    main()
