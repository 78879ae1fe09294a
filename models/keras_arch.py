"""keras.applications' conv bases (include_top=False) as layer graphs, and
Keras's order of their layers.

Each architecture is written layer for layer after keras.applications
(Keras 3.15's xception.py, resnet.py, inception_v3.py, mobilenet.py): the
same layers, names, paddings and epsilons. A layer is (kind, name, config,
inputs). `Net.keras_order()` gives the layers in the order of Keras's
`model.layers`, which is the order Keras stores and loads weights by
position in a .h5 file (keras/src/ops/function.py `map_graph`: layers by
decreasing depth from the output, ties by first visit of a depth-first walk
from the output). Inception V3's layer names are Keras's automatic ones
(`conv2d_57`), which differ from session to session, so position is the
only key that works for every file; it is the one Keras itself uses.
"""
import re
from dataclasses import dataclass, field


@dataclass
class Layer:
    kind: str  # conv | sepconv | dwconv | bn | relu | relu6 | maxpool | avgpool | zeropad | add | concat | input
    name: str
    cfg: dict
    inputs: list
    channels: int
    auto_name: bool = False


@dataclass
class Net:
    arch: str
    layers: list = field(default_factory=list)
    by_name: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)
    output: str = ""

    def _add(self, kind, keras_class, inputs, channels, name=None, **cfg):
        auto = name is None
        if auto:
            # Keras's automatic name in a fresh session: conv2d, conv2d_1, ...
            snake = re.sub("([a-z])([A-Z])", r"\1_\2", re.sub("(.)([A-Z][a-z]+)", r"\1_\2", keras_class)).lower()
            n = self.counters.get(snake, 0)
            self.counters[snake] = n + 1
            name = snake if n == 0 else f"{snake}_{n}"
        layer = Layer(kind, name, cfg, list(inputs), channels, auto)
        self.layers.append(layer)
        self.by_name[name] = layer
        self.output = name
        return name

    def ch(self, x):
        return self.by_name[x].channels

    # One method per Keras layer class used by the bases.
    def input(self):
        return self._add("input", "InputLayer", [], 3, name="input")

    def conv(self, x, filters, kernel, strides=1, padding="valid", use_bias=True, name=None):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        return self._add("conv", "Conv2D", [x], filters, name, filters=filters, kernel=kernel,
                         strides=strides, padding=padding, use_bias=use_bias, cin=self.ch(x))

    def sepconv(self, x, filters, name=None):  # Xception's: 3x3, 'same', no bias
        return self._add("sepconv", "SeparableConv2D", [x], filters, name, filters=filters, kernel=(3, 3),
                         strides=1, padding="same", use_bias=False, cin=self.ch(x))

    def dwconv(self, x, strides, padding, name):  # MobileNet's: 3x3, multiplier 1, no bias
        return self._add("dwconv", "DepthwiseConv2D", [x], self.ch(x), name, kernel=(3, 3), strides=strides,
                         padding=padding, use_bias=False, cin=self.ch(x))

    def bn(self, x, epsilon=1e-3, scale=True, name=None):
        return self._add("bn", "BatchNormalization", [x], self.ch(x), name, epsilon=epsilon, scale=scale)

    def relu(self, x, name=None):
        return self._add("relu", "Activation", [x], self.ch(x), name)

    def relu6(self, x, name):
        return self._add("relu6", "ReLU", [x], self.ch(x), name)

    def maxpool(self, x, size, strides, padding="valid", name=None):
        return self._add("maxpool", "MaxPooling2D", [x], self.ch(x), name, size=size, strides=strides,
                         padding=padding)

    def avgpool_same(self, x):  # Inception's 3x3, stride 1, 'same' (padding not counted)
        return self._add("avgpool", "AveragePooling2D", [x], self.ch(x), None, size=3, strides=1, padding="same")

    def zeropad(self, x, top_left, bottom_right, name):
        return self._add("zeropad", "ZeroPadding2D", [x], self.ch(x), name, pads=(top_left, bottom_right))

    def add(self, xs, name=None):
        return self._add("add", "Add", xs, self.ch(xs[0]), name)

    def concat(self, xs, name=None):
        return self._add("concat", "Concatenate", xs, sum(self.ch(x) for x in xs), name)

    def weight_shapes(self, layer):
        """The shapes of a layer's weights, in Keras's order (trainable, then non-trainable)."""
        c = layer.cfg
        kh, kw = c.get("kernel", (0, 0))
        if layer.kind == "conv":
            return [(kh, kw, c["cin"], c["filters"])] + ([(c["filters"],)] if c["use_bias"] else [])
        if layer.kind == "sepconv":
            return [(kh, kw, c["cin"], 1), (1, 1, c["cin"], c["filters"])]
        if layer.kind == "dwconv":
            return [(kh, kw, c["cin"], 1)]
        if layer.kind == "bn":
            return [(layer.channels,)] * (4 if c["scale"] else 3)
        return []

    def keras_order(self):
        """Layers in Keras's `model.layers` order (see the module's doc)."""
        visit = {}

        def walk(name):  # pre-order index of first visit, inputs in order
            if name in visit:
                return
            visit[name] = len(visit)
            for i in self.by_name[name].inputs:
                walk(i)

        walk(self.output)
        depth = {self.output: 0}
        # Creation order reversed is a topological order from the output down.
        for layer in reversed(self.layers):
            d = depth.get(layer.name, 0)
            for i in layer.inputs:
                depth[i] = max(depth.get(i, 0), d + 1)
        return sorted(self.layers, key=lambda l: (-depth[l.name], visit[l.name]))

    def weighted(self):
        return [l for l in self.keras_order() if self.weight_shapes(l)]

    def params(self):
        n = 0
        for l in self.layers:
            for s in self.weight_shapes(l):
                p = 1
                for d in s:
                    p *= d
                n += p
        return n


def xception():
    n = Net("xception")
    x = n.input()
    x = n.conv(x, 32, 3, strides=2, use_bias=False, name="block1_conv1")
    x = n.relu(n.bn(x, name="block1_conv1_bn"), name="block1_conv1_act")
    x = n.conv(x, 64, 3, use_bias=False, name="block1_conv2")
    x = n.relu(n.bn(x, name="block1_conv2_bn"), name="block1_conv2_act")
    for block, filters in ((2, 128), (3, 256), (4, 728)):
        residual = n.bn(n.conv(x, filters, 1, strides=2, padding="same", use_bias=False))
        if block > 2:
            x = n.relu(x, name=f"block{block}_sepconv1_act")
        x = n.bn(n.sepconv(x, filters, name=f"block{block}_sepconv1"), name=f"block{block}_sepconv1_bn")
        x = n.relu(x, name=f"block{block}_sepconv2_act")
        x = n.bn(n.sepconv(x, filters, name=f"block{block}_sepconv2"), name=f"block{block}_sepconv2_bn")
        x = n.maxpool(x, 3, 2, "same", name=f"block{block}_pool")
        x = n.add([x, residual])
    for i in range(8):
        residual, p = x, f"block{i + 5}"
        for s in (1, 2, 3):
            x = n.relu(x, name=f"{p}_sepconv{s}_act")
            x = n.bn(n.sepconv(x, 728, name=f"{p}_sepconv{s}"), name=f"{p}_sepconv{s}_bn")
        x = n.add([x, residual])
    residual = n.bn(n.conv(x, 1024, 1, strides=2, padding="same", use_bias=False))
    x = n.relu(x, name="block13_sepconv1_act")
    x = n.bn(n.sepconv(x, 728, name="block13_sepconv1"), name="block13_sepconv1_bn")
    x = n.relu(x, name="block13_sepconv2_act")
    x = n.bn(n.sepconv(x, 1024, name="block13_sepconv2"), name="block13_sepconv2_bn")
    x = n.maxpool(x, 3, 2, "same", name="block13_pool")
    x = n.add([x, residual])
    x = n.relu(n.bn(n.sepconv(x, 1536, name="block14_sepconv1"), name="block14_sepconv1_bn"), name="block14_sepconv1_act")
    n.relu(n.bn(n.sepconv(x, 2048, name="block14_sepconv2"), name="block14_sepconv2_bn"), name="block14_sepconv2_act")
    return n


def resnet50():
    n = Net("resnet50")
    eps = 1.001e-5

    def block(x, filters, stride=1, conv_shortcut=True, name=""):
        if conv_shortcut:
            shortcut = n.bn(n.conv(x, 4 * filters, 1, strides=stride, name=f"{name}_0_conv"), eps, name=f"{name}_0_bn")
        else:
            shortcut = x
        x = n.conv(x, filters, 1, strides=stride, name=f"{name}_1_conv")
        x = n.relu(n.bn(x, eps, name=f"{name}_1_bn"), name=f"{name}_1_relu")
        x = n.conv(x, filters, 3, padding="same", name=f"{name}_2_conv")
        x = n.relu(n.bn(x, eps, name=f"{name}_2_bn"), name=f"{name}_2_relu")
        x = n.bn(n.conv(x, 4 * filters, 1, name=f"{name}_3_conv"), eps, name=f"{name}_3_bn")
        return n.relu(n.add([shortcut, x], name=f"{name}_add"), name=f"{name}_out")

    x = n.zeropad(n.input(), 3, 3, name="conv1_pad")
    x = n.conv(x, 64, 7, strides=2, name="conv1_conv")
    x = n.relu(n.bn(x, eps, name="conv1_bn"), name="conv1_relu")
    x = n.maxpool(n.zeropad(x, 1, 1, name="pool1_pad"), 3, 2, name="pool1_pool")
    for stack, filters, blocks, stride in (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2),
                                           ("conv5", 512, 3, 2)):
        x = block(x, filters, stride=stride, name=f"{stack}_block1")
        for i in range(2, blocks + 1):
            x = block(x, filters, conv_shortcut=False, name=f"{stack}_block{i}")
    return n


def inception_v3():
    n = Net("inception_v3")

    def cbn(x, filters, rows, cols, padding="same", strides=1):
        x = n.conv(x, filters, (rows, cols), strides=strides, padding=padding, use_bias=False)
        return n.relu(n.bn(x, scale=False))

    x = cbn(n.input(), 32, 3, 3, strides=2, padding="valid")
    x = cbn(x, 32, 3, 3, padding="valid")
    x = cbn(x, 64, 3, 3)
    x = n.maxpool(x, 3, 2)
    x = cbn(x, 80, 1, 1, padding="valid")
    x = cbn(x, 192, 3, 3, padding="valid")
    x = n.maxpool(x, 3, 2)
    for i, pool_filters in enumerate((32, 64, 64)):  # mixed 0-2: 35 x 35
        b1 = cbn(x, 64, 1, 1)
        b5 = cbn(cbn(x, 48, 1, 1), 64, 5, 5)
        b3 = cbn(cbn(cbn(x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
        bp = cbn(n.avgpool_same(x), pool_filters, 1, 1)
        x = n.concat([b1, b5, b3, bp], name=f"mixed{i}")
    b3 = cbn(x, 384, 3, 3, strides=2, padding="valid")  # mixed 3: 17 x 17
    bd = cbn(cbn(cbn(x, 64, 1, 1), 96, 3, 3), 96, 3, 3, strides=2, padding="valid")
    x = n.concat([b3, bd, n.maxpool(x, 3, 2)], name="mixed3")
    for i, f in enumerate((128, 160, 160, 192)):  # mixed 4-7
        b1 = cbn(x, 192, 1, 1)
        b7 = cbn(cbn(cbn(x, f, 1, 1), f, 1, 7), 192, 7, 1)
        bd = cbn(cbn(cbn(cbn(cbn(x, f, 1, 1), f, 7, 1), f, 1, 7), f, 7, 1), 192, 1, 7)
        bp = cbn(n.avgpool_same(x), 192, 1, 1)
        x = n.concat([b1, b7, bd, bp], name=f"mixed{4 + i}")
    b3 = cbn(cbn(x, 192, 1, 1), 320, 3, 3, strides=2, padding="valid")  # mixed 8: 8 x 8
    b7 = cbn(cbn(cbn(cbn(x, 192, 1, 1), 192, 1, 7), 192, 7, 1), 192, 3, 3, strides=2, padding="valid")
    x = n.concat([b3, b7, n.maxpool(x, 3, 2)], name="mixed8")
    for i in range(2):  # mixed 9, 10
        b1 = cbn(x, 320, 1, 1)
        b3 = cbn(x, 384, 1, 1)
        b3 = n.concat([cbn(b3, 384, 1, 3), cbn(b3, 384, 3, 1)], name=f"mixed9_{i}")
        bd = cbn(cbn(x, 448, 1, 1), 384, 3, 3)
        bd = n.concat([cbn(bd, 384, 1, 3), cbn(bd, 384, 3, 1)])
        bp = cbn(n.avgpool_same(x), 192, 1, 1)
        x = n.concat([b1, b3, bd, bp], name=f"mixed{9 + i}")
    return n


def mobilenet():
    """MobileNet v1, alpha 1.0, depth multiplier 1; cut at conv_pw_13_relu."""
    n = Net("mobilenet")
    x = n.conv(n.input(), 32, 3, strides=2, padding="same", use_bias=False, name="conv1")
    x = n.relu6(n.bn(x, name="conv1_bn"), name="conv1_relu")
    for i, (filters, stride) in enumerate(MOBILENET_BLOCKS, start=1):
        if stride == 1:
            x = n.dwconv(x, 1, "same", name=f"conv_dw_{i}")
        else:
            x = n.dwconv(n.zeropad(x, 0, 1, name=f"conv_pad_{i}"), 2, "valid", name=f"conv_dw_{i}")
        x = n.relu6(n.bn(x, name=f"conv_dw_{i}_bn"), name=f"conv_dw_{i}_relu")
        x = n.conv(x, filters, 1, padding="same", use_bias=False, name=f"conv_pw_{i}")
        x = n.relu6(n.bn(x, name=f"conv_pw_{i}_bn"), name=f"conv_pw_{i}_relu")
    return n


# (pointwise filters, depthwise stride) of MobileNet v1's 13 blocks.
MOBILENET_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

ARCHS = {"xception": xception, "resnet50": resnet50, "inception_v3": inception_v3, "mobilenet": mobilenet}
