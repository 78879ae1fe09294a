"""MobileNet v1's weights from a frozen TF-slim MobilenetV1 GraphDef (.pb),
read without TensorFlow, named as keras.applications.MobileNet names them.

A GraphDef is a protobuf: repeated NodeDef (name, op, input, attr). Frozen
variables are `Const` nodes whose `value` attr is a TensorProto (dtype,
shape, raw `tensor_content` or repeated `float_val`). The few fields this
needs are read straight from the wire format (varints and length-delimited
fields), so no schema or TensorFlow is needed.

TF-slim's names map to Keras's: `MobilenetV1/Conv2d_0/weights` -> conv1,
`MobilenetV1/Conv2d_<i>_depthwise/depthwise_weights` -> conv_dw_<i>,
`MobilenetV1/Conv2d_<i>_pointwise/weights` -> conv_pw_<i>, each
`.../BatchNorm/{gamma,beta,moving_mean,moving_variance}` -> the layer's
`_bn`. Batch norm is unfolded in the graph (`batchnorm/add/y` holds its
epsilon), which must be Keras's 1e-3. The graph's retrained top
(`final_result`, `final_training_ops`) is not read: the base ends at
conv_pw_13_relu (`MobilenetV1/Conv2d_13_pointwise/Relu6`).
"""
import struct

import numpy as np

from keras_weights import WeightsError

DT_FLOAT = 1


def _varint(buf, i):
    shift = result = 0
    while True:
        if i >= len(buf):
            raise WeightsError("truncated protobuf (varint runs past the end)")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def fields(buf):
    """(field number, wire type, value) of one message; value is an int or a memoryview."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            v, i = buf[i:i + ln], i + ln
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise WeightsError(f"unsupported protobuf wire type {wt}: not a GraphDef")
        if i > n:
            raise WeightsError("truncated protobuf (a field runs past the end)")
        yield num, wt, v


def _tensor(buf):
    """TensorProto -> float32 array (dtype 1, shape 2, tensor_content 4, float_val 5)."""
    dtype, dims, content, floats = None, [], None, []
    for num, wt, v in fields(buf):
        if num == 1:
            dtype = v
        elif num == 2:
            for n2, _, d in fields(v):
                if n2 == 2:  # Dim
                    dims.append(next((s for n3, _, s in fields(d) if n3 == 1), 0))
        elif num == 4:
            content = bytes(v)
        elif num == 5:
            floats += list(struct.unpack(f"<{len(v) // 4}f", bytes(v))) if wt == 2 else [struct.unpack("<f", bytes(v))[0]]
    if dtype != DT_FLOAT:
        return None
    size = int(np.prod(dims)) if dims else 1
    if content is not None:
        a = np.frombuffer(content, dtype="<f4")
    elif len(floats) == 1:
        a = np.full(size, floats[0], np.float32)
    else:
        a = np.asarray(floats, np.float32)
    if a.size != size:
        raise WeightsError(f"a tensor of shape {dims} holds {a.size} values")
    return a.reshape(dims).astype(np.float32)


def constants(path):
    """{node name: float32 array} of the graph's Const nodes."""
    try:
        with open(path, "rb") as f:
            data = memoryview(f.read())
    except OSError as e:
        raise WeightsError(f"{path}: {e}") from e
    out = {}
    try:
        for num, _, node in fields(data):
            if num != 1:
                continue
            name = op = value = None
            for n2, _, v in fields(node):
                if n2 == 1:
                    name = bytes(v).decode()
                elif n2 == 2:
                    op = bytes(v).decode()
                elif n2 == 5:  # map<string, AttrValue> entry: key 1, value 2
                    entry = dict((n3, v3) for n3, _, v3 in fields(v))
                    if bytes(entry.get(1, b"")) == b"value":
                        value = next((t for n4, _, t in fields(entry.get(2, b"")) if n4 == 8), None)
            if op == "Const" and value is not None:
                t = _tensor(value)
                if t is not None:
                    out[name] = t
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from e
    return out


def read(path):
    """[(Keras layer name, [arrays])] in keras.applications.MobileNet's layer order."""
    import keras_arch

    c = constants(path)

    def get(name):
        if name not in c:
            raise WeightsError(f"{path}: no constant `{name}`: not a frozen TF-slim MobilenetV1 (alpha 1.0) graph")
        return c[name]

    def bn(scope):
        # The unfolded batch norm's ops live under the scope slim opened twice.
        eps = get(f"MobilenetV1/{scope}/BatchNorm/batchnorm/add/y")
        if abs(float(eps) - 1e-3) > 1e-9:
            raise WeightsError(f"{path}: {scope}'s batch norm epsilon is {float(eps)}, Keras's MobileNet uses 1e-3")
        gamma = c.get(f"{scope}/BatchNorm/gamma")
        beta = get(f"{scope}/BatchNorm/beta")
        gamma = np.ones_like(beta) if gamma is None else gamma
        return [gamma, beta, get(f"{scope}/BatchNorm/moving_mean"), get(f"{scope}/BatchNorm/moving_variance")]

    by_name = {"conv1": [get("MobilenetV1/Conv2d_0/weights")], "conv1_bn": bn("MobilenetV1/Conv2d_0")}
    for i in range(1, len(keras_arch.MOBILENET_BLOCKS) + 1):
        dw, pw = f"MobilenetV1/Conv2d_{i}_depthwise", f"MobilenetV1/Conv2d_{i}_pointwise"
        by_name[f"conv_dw_{i}"] = [get(f"{dw}/depthwise_weights")]
        by_name[f"conv_dw_{i}_bn"] = bn(dw)
        by_name[f"conv_pw_{i}"] = [get(f"{pw}/weights")]
        by_name[f"conv_pw_{i}_bn"] = bn(pw)
    return [(l.name, by_name[l.name]) for l in keras_arch.mobilenet().weighted()]
