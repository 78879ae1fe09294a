#!/usr/bin/env python3
"""A keras.applications conv base's weights -> the ONNX base convflow runs.

Usage: make_keras_base.py ARCH WEIGHTS OUT.onnx
  ARCH     xception | resnet50 | inception_v3 | mobilenet
  WEIGHTS  a Keras .h5 weight file (e.g. ~/.keras/models/
           resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5), a Keras 3
           .keras archive holding the base as a nested model named ARCH, or,
           for mobilenet, a frozen TF-slim MobilenetV1 GraphDef (.pb)

The graph is keras.applications' ARCH(include_top=False) layer for layer
(models/keras_arch.py): NHWC float32 `input` [N, H, W, 3], already
preprocessed as Keras's preprocess_input for ARCH does (`tf` for xception,
inception_v3, mobilenet; `caffe` for resnet50), and NHWC `features`, as
Keras's Flatten sees them. Weights are assigned by position in Keras's
layer order, as Keras's own loader does, and every shape must match: a file
of another architecture, or with layers missing, is refused with the first
layer that does not fit. Batch norm stays a BatchNormalization node (ONNX
Runtime folds it into the convolution when it loads the model).
Written only after onnx.checker and a run on a batch of two pass.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras_arch  # noqa: E402
import keras_weights  # noqa: E402

# A size every base takes, and the output it must give there.
CHECK = {"xception": (96, 3), "resnet50": (96, 3), "inception_v3": (96, 1), "mobilenet": (96, 3)}


def fail(msg):
    sys.exit(f"make_keras_base: {msg}")


def read(arch, path):
    if path.endswith(".keras"):
        return keras_weights.read_keras_zip(path, arch)
    if path.endswith(".pb"):
        if arch != "mobilenet":
            fail(f"{path}: a TF GraphDef is read for mobilenet only")
        import tf_mobilenet
        return tf_mobilenet.read(path)
    return keras_weights.read_h5(path)


def assign(net, layers, path):
    """{layer name: arrays}, by position, every shape checked."""
    want = net.weighted()
    if len(layers) != len(want):
        fail(f"{path} holds {len(layers)} layers with weights; keras.applications' {net.arch} has {len(want)}: "
             f"not {net.arch}'s weights (or a damaged file)")
    out = {}
    for i, (layer, (name, arrays)) in enumerate(zip(want, layers)):
        shapes = [tuple(a.shape) for a in arrays]
        if shapes != net.weight_shapes(layer):
            fail(f"{path}: layer {i} `{name}` holds {shapes}, where {net.arch}'s `{layer.name}` takes "
                 f"{net.weight_shapes(layer)}: not {net.arch}'s weights")
        out[layer.name] = arrays
    return out


def emit(net, weights):
    """The ONNX graph, NCHW inside, NHWC at its edges."""
    nodes = [helper.make_node("Transpose", ["input"], ["input_nchw"], perm=[0, 3, 1, 2], name="to_nchw")]
    inits = []
    tensor = {"input": "input_nchw"}

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    for l in net.layers:
        if l.kind == "input":
            continue
        c, ins, y = l.cfg, [tensor[i] for i in l.inputs], l.name
        pad = {"auto_pad": "SAME_UPPER"} if c.get("padding") == "same" else {}
        s = c.get("strides", 1)
        w = weights.get(l.name)
        if l.kind == "conv":
            kh, kw = c["kernel"]
            inputs = [ins[0], init(f"{y}/W", w[0].transpose(3, 2, 0, 1))] + ([init(f"{y}/b", w[1])] if c["use_bias"] else [])
            nodes.append(helper.make_node("Conv", inputs, [y], name=y, kernel_shape=[kh, kw], strides=[s, s], **pad))
        elif l.kind in ("sepconv", "dwconv"):
            # Keras's depthwise kernel [kh, kw, in, 1] is ONNX's grouped Conv weight [in, 1, kh, kw].
            dw = y if l.kind == "dwconv" else f"{y}_depthwise"
            nodes.append(helper.make_node("Conv", [ins[0], init(f"{y}/dw", w[0].transpose(2, 3, 0, 1))], [dw], name=dw,
                                          kernel_shape=[3, 3], strides=[s, s], group=c["cin"], **pad))
            if l.kind == "sepconv":
                nodes.append(helper.make_node("Conv", [dw, init(f"{y}/pw", w[1].transpose(3, 2, 0, 1))], [y], name=y,
                                              kernel_shape=[1, 1]))
        elif l.kind == "bn":
            gamma = w[0] if c["scale"] else np.ones(l.channels, np.float32)
            beta, mean, var = w[-3:]
            nodes.append(helper.make_node("BatchNormalization", [ins[0], init(f"{y}/gamma", gamma), init(f"{y}/beta", beta),
                                                                 init(f"{y}/mean", mean), init(f"{y}/var", var)],
                                          [y], name=y, epsilon=c["epsilon"]))
        elif l.kind == "relu":
            nodes.append(helper.make_node("Relu", ins, [y], name=y))
        elif l.kind == "relu6":
            nodes.append(helper.make_node("Clip", ins + [init(f"{y}/min", np.float32(0)), init(f"{y}/max", np.float32(6))],
                                          [y], name=y))
        elif l.kind in ("maxpool", "avgpool"):
            op = "MaxPool" if l.kind == "maxpool" else "AveragePool"
            nodes.append(helper.make_node(op, ins, [y], name=y, kernel_shape=[c["size"]] * 2, strides=[s, s], **pad))
        elif l.kind == "zeropad":
            (a, b) = c["pads"]
            pads = numpy_helper.from_array(np.array([0, 0, a, a, 0, 0, b, b], np.int64), f"{y}/pads")
            inits.append(pads)
            nodes.append(helper.make_node("Pad", [ins[0], f"{y}/pads"], [y], name=y))
        elif l.kind == "add":
            nodes.append(helper.make_node("Add", ins, [y], name=y))
        elif l.kind == "concat":
            nodes.append(helper.make_node("Concat", ins, [y], name=y, axis=1))
        else:
            fail(f"unknown layer kind {l.kind}")
        tensor[l.name] = y
    nodes.append(helper.make_node("Transpose", [tensor[net.output]], ["features"], perm=[0, 2, 3, 1], name="to_nhwc"))
    channels = net.by_name[net.output].channels
    graph = helper.make_graph(
        nodes, f"{net.arch}_notop",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "OH", "OW", channels])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="convflow/models/make_keras_base.py")
    model.ir_version = 7
    return model


def build(arch, path):
    net = keras_arch.ARCHS[arch]()
    try:
        layers = read(arch, path)
    except keras_weights.WeightsError as e:
        fail(str(e))
    return net, emit(net, assign(net, layers, path))


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in keras_arch.ARCHS:
        sys.exit(__doc__)
    arch, path, out = sys.argv[1:]
    if not os.path.isfile(path):
        fail(f"{path}: no such file")
    net, model = build(arch, path)
    onnx.checker.check_model(model)
    tmp = out + ".tmp"
    onnx.save(model, tmp)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    size, side = CHECK[arch]
    y = ort.InferenceSession(tmp, so, providers=["CPUExecutionProvider"]).run(
        None, {"input": np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)})[0]
    channels = net.by_name[net.output].channels
    if y.shape != (2, side, side, channels) or not np.isfinite(y).all():
        os.remove(tmp)
        fail(f"a {size}x{size} batch of 2 gives {y.shape} (finite: {np.isfinite(y).all()}), expected (2, {side}, {side}, {channels})")
    os.replace(tmp, out)
    print(f"make_keras_base: {arch}: {net.params():,} params from {path}; wrote {out}")


if __name__ == "__main__":
    main()
