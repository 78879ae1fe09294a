"""Exports a VGG16 fine-tuned by convflow (pipelines/fine_tune.yaml: the
`convnet` stage with `base: vgg16_block5`) to one ONNX classifier.

    .venv/bin/python models/export_fine_tuned.py MODEL_DIR [--block4 models/vgg16_block4.onnx]

Reads MODEL_DIR/model.safetensors (the fine-tuned block5 and head under
their Keras names; input shape and layers in its metadata) and
MODEL_DIR/model.json (classes, the stages that made the block4 maps: the
block4 model and its preprocessing), and writes MODEL_DIR/classifier.onnx:

  input  `pixels`         float32 [N, H, W, 3]: raw RGB 0..255, already resized
                          to the training images' size (150x150 for the book's)
  output `probabilities`  float32 [N, outputs]: the head's sigmoid (one unit:
                          P(second class)) or softmax

Inside, one graph: the recorded preprocessing (caffe: RGB -> BGR minus the
ImageNet means; export_head.py's), VGG16 blocks 1-4 as the frozen ONNX model
that made the training maps (default: the `model` of the onnx_features stage
in model.json), then block5 and the head as export_convnet.py writes a
convnet (NHWC -> NCHW for Conv/MaxPool, back to NHWC before Flatten, Gemm).
Dropout is left out. The pipeline averages the mirrored views of an image
(`views`); this model scores one view: average two calls to do the same.
"""
import argparse
import json
import os

import onnx
from onnx import helper, TensorProto

from export_convnet import OPSET, Refused, build_graph, read_model_dir
from export_head import behind_base

# Stages that may stand between the files and the maps the model trained on:
# what they do to pixels either is part of this graph (resize is the
# caller's, preprocessing and blocks 1-4 are inside) or happens only in training
# (augment) or makes extra views of one image (views).
KNOWN = {"file_reader", "decode", "resize", "augment", "views", "batch", "onnx_features"}


def export(model_dir, block4=None):
    (st_path, json_path), weights, input_shape, layers, info = read_model_dir(
        model_dir, "fine-tune a model with pipelines/fine_tune.yaml first")
    if info.get("base") != "vgg16_block5":
        raise SystemExit(f"{json_path}: `base` is {info.get('base')!r}, not vgg16_block5: "
                         "export a convnet without a base with export_convnet.py")
    made_by = info.get("images_from", [])
    other = sorted({s["kind"] for s in made_by} - KNOWN)
    if other:
        raise SystemExit(f"{json_path}: the block4 maps were made through {other}, which this graph cannot include")
    features = [s["options"] for s in made_by if s["kind"] == "onnx_features"]
    if not features:
        raise SystemExit(f"{json_path}: no onnx_features stage made the maps: which block4 model is unknown")
    block4 = block4 or features[0]["model"]
    mode = features[0].get("preprocess", "rescale")
    sizes = [s["options"]["size"] for s in made_by if s["kind"] == "resize"]
    h, w = (int(v) for v in sizes[0]) if sizes else (input_shape[0] * 16, input_shape[1] * 16)

    # block5 + head on block4 maps: the convnet exporter's graph, rescale 1.
    try:
        tuned = build_graph(weights, input_shape, layers, info.get("rescale", 1.0))
    except Refused as e:
        raise SystemExit(f"{st_path}: cannot export: {e}")
    outputs = tuned.shape[0]
    classes = info.get("classes") or []
    g = helper.make_graph(
        tuned.nodes, "block5_head",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N"] + list(input_shape))],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", outputs])],
        tuned.inits,
    )
    tuned = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    tuned.ir_version = 7

    joined = behind_base(mode, block4, tuned, "tuned/", "pixels")
    # The names a user sees: pixels in, probabilities out, at the trained size.
    joined.graph.input[0].name = "pixels"
    for node in joined.graph.node:
        node.input[:] = ["pixels" if i == "pre/pixels" else i for i in node.input]
        node.output[:] = ["probabilities" if o == "tuned/probabilities" else o for o in node.output]
    joined.graph.output[0].name = "probabilities"
    dims = joined.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims[1:3], (h, w)):
        d.ClearField("dim_param")
        d.dim_value = v
    props = {
        "classes": json.dumps(classes),
        "class_mode": json.dumps(info.get("class_mode")),
        "preprocess": mode,
        "input_shape": json.dumps([h, w, 3]),
        "input": "raw RGB pixels 0..255, NHWC, resized to input_shape",
        "block4_model": os.path.basename(block4),
        "images_from": json.dumps(made_by),
    }
    helper.set_model_props(joined, props)
    joined.producer_name = "convflow models/export_fine_tuned.py"
    joined.doc_string = json.dumps({"classes": classes, "preprocess": mode, "input": props["input"]})
    onnx.checker.check_model(joined)
    onnx.shape_inference.infer_shapes(joined, check_type=True, strict_mode=True)
    out = os.path.join(model_dir, "classifier.onnx")
    onnx.save(joined, out)
    return out, (h, w), outputs, classes, mode


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="fine_tune.yaml's out_dir (model.safetensors + model.json)")
    ap.add_argument("--block4", help="VGG16 blocks 1-4 (default: the onnx_features model recorded in model.json)")
    args = ap.parse_args()
    out, (h, w), outputs, classes, mode = export(args.model_dir, args.block4)
    print(f"wrote {out} (pixels [N, {h}, {w}, 3] 0..255 -> {mode} -> blocks 1-4 -> block5 -> head "
          f"-> probabilities [N, {outputs}]; classes {classes})")


if __name__ == "__main__":
    main()
