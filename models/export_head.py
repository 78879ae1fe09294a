"""Exports a head trained by convflow's `dense_head` stage to ONNX.

    .venv/bin/python models/export_head.py HEAD_DIR [--conv-base models/vgg16_notop.onnx]

Writes, next to the head (HEAD_DIR/head.safetensors + head.json):
  head.onnx        features [N, H, W, C] (as convflow stores them, NHWC) ->
                   probabilities [N, outputs]
  classifier.onnx  (with --conv-base) raw RGB pixels [N, height, width, 3],
                   0..255 float32, already resized -> probabilities: the
                   preprocessing recorded in head.json, the conv base and the
                   head in one graph, so the result runs wherever ONNX Runtime does.
Dropout is the identity at inference and is left out. The probabilities are
the sigmoid (one unit: P(second class)) or softmax outputs of the last layer.
"""
import argparse
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from safetensors_f32 import read_safetensors

OPSET = 13
CAFFE_MEAN_BGR = [103.939, 116.779, 123.68]


def head_graph(head_dir):
    weights, meta = read_safetensors(os.path.join(head_dir, "head.safetensors"))
    with open(os.path.join(head_dir, "head.json")) as f:
        info = json.load(f)
    layers = [l for l in info["layers"] if l["kind"] == "dense"]
    shape = info["input_shape"]
    nodes = [helper.make_node("Flatten", ["features"], ["x0"], axis=1)]
    inits = []
    x = "x0"
    for i, layer in enumerate(layers):
        w, b = weights[f"dense_{i}.kernel"], weights[f"dense_{i}.bias"]
        inits += [numpy_helper.from_array(w, f"dense_{i}.kernel"), numpy_helper.from_array(b, f"dense_{i}.bias")]
        nodes.append(helper.make_node("Gemm", [x, f"dense_{i}.kernel", f"dense_{i}.bias"], [f"z{i}"]))
        act = layer["activation"]
        y = "probabilities" if i == len(layers) - 1 else f"a{i}"
        op = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax", "linear": "Identity"}[act]
        kw = {"axis": 1} if op == "Softmax" else {}
        nodes.append(helper.make_node(op, [f"z{i}"], [y], **kw))
        x = y
    outputs = layers[-1]["units"]
    graph = helper.make_graph(
        nodes,
        "convflow_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N"] + shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", outputs])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 7
    model.doc_string = json.dumps({"classes": info["classes"], "class_mode": info["class_mode"]})
    return model, info


def preprocess_graph(mode):
    """Raw pixels -> what the conv base was fed in training (rescale | caffe | tf | none)."""
    nodes, inits = [], []
    if mode == "rescale":
        inits.append(numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), "scale"))
        nodes.append(helper.make_node("Mul", ["pixels", "scale"], ["pre"]))
    elif mode == "caffe":
        # RGB -> BGR, minus the ImageNet means (in BGR order), as Keras's VGG16.
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), "bgr"))
        inits.append(numpy_helper.from_array(np.array(CAFFE_MEAN_BGR, dtype=np.float32), "mean"))
        nodes.append(helper.make_node("Gather", ["pixels", "bgr"], ["bgr_pixels"], axis=3))
        nodes.append(helper.make_node("Sub", ["bgr_pixels", "mean"], ["pre"]))
    elif mode == "tf":
        # Keras's `tf` mode (Xception, Inception V3, MobileNet): x / 127.5 - 1.
        inits.append(numpy_helper.from_array(np.array(1.0 / 127.5, dtype=np.float32), "scale"))
        inits.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"))
        nodes.append(helper.make_node("Mul", ["pixels", "scale"], ["scaled"]))
        nodes.append(helper.make_node("Sub", ["scaled", "one"], ["pre"]))
    elif mode == "none":
        nodes.append(helper.make_node("Identity", ["pixels"], ["pre"]))
    else:
        # A mode this graph does not reproduce must not pass as raw pixels.
        raise SystemExit(f"export_head: classifier.onnx cannot reproduce preprocess `{mode}` "
                         "(rescale, caffe, tf, none); head.onnx was written and works on the features")
    graph = helper.make_graph(
        nodes,
        "preprocess",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("pre", TensorProto.FLOAT, ["N", "H", "W", 3])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 7
    return m


def behind_base(mode, base_path, model, prefix, model_input):
    """One graph from raw pixels (`pre/pixels`) through preprocessing `mode`
    and the conv base at `base_path` into `model` (its names under `prefix`),
    whose input `model_input` takes the base's output."""
    base = onnx.load(base_path)
    base = onnx.version_converter.convert_version(base, OPSET) if base.opset_import[0].version != OPSET else base
    base.ir_version = 7
    base_in, base_out = base.graph.input[0].name, base.graph.output[0].name
    pre = compose.add_prefix(preprocess_graph(mode), "pre/")
    joined = compose.merge_models(pre, base, io_map=[("pre/pre", base_in)])
    return compose.merge_models(joined, compose.add_prefix(model, prefix), io_map=[(base_out, prefix + model_input)])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("head_dir")
    ap.add_argument("--conv-base", help="the conv base the features came from (e.g. models/vgg16_notop.onnx)")
    ap.add_argument("--preprocess", choices=["rescale", "caffe", "tf", "none"], default=None,
                    help="default: what head.json records (features_from)")
    args = ap.parse_args()

    head, info = head_graph(args.head_dir)
    onnx.checker.check_model(head)
    onnx.save(head, os.path.join(args.head_dir, "head.onnx"))
    print(f"wrote {os.path.join(args.head_dir, 'head.onnx')}")
    if not args.conv_base:
        return
    # classifier.onnx only reproduces preprocessing + conv base: refuse when
    # other stages shaped the pixels the head was trained on.
    known = {"file_reader", "decode", "resize", "batch", "onnx_features"}
    other = sorted({s["kind"] for s in info.get("features_from", [])} - known)
    if other:
        raise SystemExit(f"classifier.onnx cannot include the stages {other} that made the features; "
                         "head.onnx was written and works on features made the same way")
    recorded = [s["options"].get("preprocess") for s in info.get("features_from", []) if s["kind"] == "onnx_features"]
    mode = args.preprocess or (recorded[0] if recorded else None) or "rescale"
    joined = behind_base(mode, args.conv_base, head, "head/", "features")
    joined.doc_string = json.dumps({"classes": info["classes"], "preprocess": mode, "input": "raw RGB 0..255, NHWC"})
    onnx.checker.check_model(joined)
    out = os.path.join(args.head_dir, "classifier.onnx")
    onnx.save(joined, out)
    print(f"wrote {out} (preprocess {mode}; input {joined.graph.input[0].name}, output {joined.graph.output[0].name})")


if __name__ == "__main__":
    main()
