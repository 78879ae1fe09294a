"""Exports a convnet trained by convflow's `convnet` stage to one ONNX classifier.

    .venv/bin/python models/export_convnet.py MODEL_DIR

Reads MODEL_DIR/model.safetensors (the weights under their Keras names and
shapes; the input shape and layer list in its metadata, which is what
convflow itself rebuilds the model from) and MODEL_DIR/model.json (classes,
rescale, the stages that made the training images), and writes
MODEL_DIR/classifier.onnx:

  input  `pixels`         float32 [N, H, W, C]: raw 0..255 values, already
                          resized to the model's input shape (C = 1 or 3, as trained)
  output `probabilities`  float32 [N, outputs]: the last layer's sigmoid (one
                          unit: P(second class)) or softmax (one per class)

Inside: Mul by the rescale, NHWC -> NCHW (ONNX's Conv and MaxPool are
NCHW), Conv (+ activation) and MaxPool, back to NHWC before Flatten (Keras
flattens NHWC, and the dense kernel's rows are in that order), Gemm (+
activation). Dropout is the identity at inference and is left out.

`same` padding is written as explicit pads, the extra row/column of an odd
total at the bottom/right as in Keras/TensorFlow: ONNX's auto_pad would make
the split a matter of which of SAME_UPPER/SAME_LOWER one remembers. Max
pooling is Keras's `valid` (floor): ONNX's default, ceil_mode 0, no pads.

The class names, class mode, rescale, input shape and the stages that made
the training images are in the model's metadata_props. A layer or
activation this script does not know is refused, naming the file and the layer.
"""
import argparse
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from safetensors_f32 import read_safetensors

OPSET = 13
ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "linear": None}


class Refused(Exception):
    pass


def pair(v, default):
    """Keras's `3` or `[3, 3]` (None: the default)."""
    if v is None:
        v = default
    return [v, v] if isinstance(v, int) else list(v)


class Builder:
    """Appends nodes and initializers, tracking the per-image shape and
    whether the tensor is NHWC (as it comes in, and as flatten wants it) or
    NCHW (what ONNX's Conv and MaxPool take)."""

    def __init__(self, shape):
        self.nodes, self.inits = [], []
        self.x = "pixels"
        self.shape = list(shape)  # [h, w, c] of a map, or [d] of a vector
        self.nchw = False
        self.n = 0

    def name(self, stem):
        self.n += 1
        return f"{stem}_{self.n}"

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def node(self, op, inputs, out=None, **attrs):
        out = out or self.name(op.lower())
        self.nodes.append(helper.make_node(op, [self.x] + inputs, [out], **attrs))
        self.x = out

    def to_nchw(self):
        if not self.nchw:
            self.node("Transpose", [], perm=[0, 3, 1, 2])
            self.nchw = True

    def to_nhwc(self):
        if self.nchw:
            self.node("Transpose", [], perm=[0, 2, 3, 1])
            self.nchw = False

    def activation(self, act, last):
        if act == "softmax" and last:
            self.node("Softmax", [], axis=1)
        elif act in ACTIVATIONS and act != "softmax":
            if ACTIVATIONS[act]:
                self.node(ACTIVATIONS[act], [])
        else:
            raise Refused(f"activation `{act}` cannot be exported" + ("" if last else " on a hidden layer"))


def build_graph(weights, input_shape, layers, rescale):
    b = Builder(input_shape)
    b.node("Mul", [b.init("rescale", np.array(rescale, dtype=np.float32))])
    counts = {}
    for i, layer in enumerate(layers):
        kind = layer.get("kind")
        # Keras's names: conv2d, conv2d_1, ...; max_pooling2d and dropout count too.
        k = counts.get(kind, 0)
        counts[kind] = k + 1
        keras = kind if k == 0 else f"{kind}_{k}"
        last = i == len(layers) - 1
        try:
            if kind == "conv2d":
                conv(b, weights, keras, layer, last)
            elif kind == "max_pooling2d":
                pool(b, layer)
            elif kind == "flatten":
                b.to_nhwc()
                b.node("Flatten", [], axis=1)
                b.shape = [int(np.prod(b.shape))]
            elif kind == "dropout":
                pass  # the identity at inference
            elif kind == "dense":
                dense(b, weights, keras, layer, last)
            else:
                raise Refused("this layer kind cannot be exported")
        except Refused as e:
            raise Refused(f"layers[{i}] ({kind} `{keras}`): {e}") from None
    last = layers[-1] if layers else {}
    if last.get("kind") != "dense" or last.get("activation") not in ("sigmoid", "softmax"):
        raise Refused("the last layer is not dense with a sigmoid or softmax activation: its outputs are not probabilities")
    b.nodes[-1].output[0] = "probabilities"
    return b


def conv(b, weights, keras, layer, last):
    if len(b.shape) != 3:
        raise Refused(f"needs a feature map, gets a vector of {b.shape[0]}")
    h, w, c = b.shape
    kernel, bias = tensor(weights, f"{keras}/kernel"), tensor(weights, f"{keras}/bias")
    kh, kw = pair(layer.get("kernel_size"), None)
    sh, sw = pair(layer.get("strides"), 1)
    filters = layer.get("filters")
    if list(kernel.shape) != [kh, kw, c, filters] or list(bias.shape) != [filters]:
        raise Refused(f"{keras}/kernel is {list(kernel.shape)}, the layer on {b.shape} wants {[kh, kw, c, filters]}")
    padding = layer.get("padding", "valid")
    if padding == "valid":
        if h < kh or w < kw:
            raise Refused(f"kernel {[kh, kw]} does not fit a {[h, w]} map")
        oh, ow, pads = (h - kh) // sh + 1, (w - kw) // sw + 1, [0, 0, 0, 0]
    elif padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
        ph, pw = max((oh - 1) * sh + kh - h, 0), max((ow - 1) * sw + kw - w, 0)
        # ONNX pads: [top, left, bottom, right]; TensorFlow puts the odd one at the end.
        pads = [ph // 2, pw // 2, ph - ph // 2, pw - pw // 2]
    else:
        raise Refused(f"padding `{padding}` cannot be exported")
    b.to_nchw()
    # Keras HWIO [kh, kw, in, out] -> ONNX OIHW [out, in, kh, kw].
    wname = b.init(f"{keras}.weight", kernel.transpose(3, 2, 0, 1))
    bname = b.init(f"{keras}.bias", bias)
    b.node("Conv", [wname, bname], kernel_shape=[kh, kw], strides=[sh, sw], pads=pads, dilations=[1, 1], group=1)
    b.shape = [oh, ow, filters]
    b.activation(layer.get("activation", "linear"), last)


def pool(b, layer):
    if len(b.shape) != 3:
        raise Refused(f"needs a feature map, gets a vector of {b.shape[0]}")
    h, w, c = b.shape
    ph, pw = pair(layer.get("pool_size"), 2)
    sh, sw = pair(layer.get("strides"), [ph, pw])
    if h < ph or w < pw:
        raise Refused(f"pool {[ph, pw]} does not fit a {[h, w]} map")
    b.to_nchw()
    b.node("MaxPool", [], kernel_shape=[ph, pw], strides=[sh, sw])
    b.shape = [(h - ph) // sh + 1, (w - pw) // sw + 1, c]


def dense(b, weights, keras, layer, last):
    if len(b.shape) != 1:
        raise Refused(f"needs a vector, gets a {b.shape} map (no flatten before it)")
    kernel, bias = tensor(weights, f"{keras}/kernel"), tensor(weights, f"{keras}/bias")
    units = layer.get("units")
    if list(kernel.shape) != [b.shape[0], units] or list(bias.shape) != [units]:
        raise Refused(f"{keras}/kernel is {list(kernel.shape)}, the layer on {b.shape[0]} inputs wants {[b.shape[0], units]}")
    b.node("Gemm", [b.init(f"{keras}.kernel", kernel), b.init(f"{keras}.bias", bias)])
    b.shape = [units]
    b.activation(layer.get("activation", "linear"), last)


def tensor(weights, name):
    if name not in weights:
        raise Refused(f"no tensor `{name}` in the file")
    return weights[name]


def read_model_dir(model_dir, hint):
    """A convnet stage's outputs in MODEL_DIR: (paths of model.safetensors and
    model.json, weights, input shape, layers, model.json's content); a missing
    file is an error saying `hint` (how to make one)."""
    st_path = os.path.join(model_dir, "model.safetensors")
    json_path = os.path.join(model_dir, "model.json")
    for p in (st_path, json_path):
        if not os.path.isfile(p):
            raise SystemExit(f"{p} not found ({hint})")
    weights, meta = read_safetensors(st_path)
    try:
        input_shape = json.loads(meta["input_shape"])
        layers = json.loads(meta["layers"])
    except (KeyError, ValueError) as e:
        raise SystemExit(f"{st_path}: metadata lacks a readable `input_shape` and `layers` ({e}): not a convflow convnet")
    with open(json_path) as f:
        info = json.load(f)
    return (st_path, json_path), weights, input_shape, layers, info


def export(model_dir):
    (st_path, json_path), weights, input_shape, layers, info = read_model_dir(
        model_dir, "train a model with the convnet stage first")
    classes, rescale = info.get("classes") or [], info.get("rescale")
    if not isinstance(rescale, (int, float)) or not rescale > 0:
        raise SystemExit(f"{json_path}: no positive `rescale`")
    try:
        b = build_graph(weights, input_shape, layers, rescale)
    except Refused as e:
        raise SystemExit(f"{st_path}: cannot export: {e}")
    outputs = b.shape[0]
    if len(classes) != (2 if outputs == 1 else outputs):
        raise SystemExit(f"{json_path}: classes {classes} do not fit the model's {outputs} output unit(s)")
    graph = helper.make_graph(
        b.nodes,
        "convflow_convnet",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N"] + list(input_shape))],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", outputs])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="convflow models/export_convnet.py")
    model.ir_version = 7
    props = {
        "classes": json.dumps(classes),
        "class_mode": json.dumps(info.get("class_mode")),
        "rescale": repr(float(np.float32(rescale))),
        "input_shape": json.dumps(input_shape),
        "input": "raw pixels 0..255, NHWC, resized to input_shape",
        "images_from": json.dumps(info.get("images_from", [])),
    }
    helper.set_model_props(model, props)
    model.doc_string = json.dumps({"classes": classes, "class_mode": info.get("class_mode"), "input": props["input"]})
    onnx.checker.check_model(model)
    # Strict inference proves the declared [N, outputs] is what the layers
    # compute (a geometry mistake above would stop here, not at run time).
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    out = os.path.join(model_dir, "classifier.onnx")
    onnx.save(model, out)
    return out, input_shape, outputs, classes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="a convnet stage's out_dir (model.safetensors + model.json)")
    args = ap.parse_args()
    out, shape, outputs, classes = export(args.model_dir)
    print(f"wrote {out} (pixels [N, {', '.join(map(str, shape))}] 0..255 -> probabilities [N, {outputs}]; classes {classes})")


if __name__ == "__main__":
    main()
