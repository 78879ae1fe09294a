"""Grad-CAM heatmaps of a classifier trained by convflow, from its saved
weights, with numpy alone (onnxruntime only for VGG16's frozen blocks 1-4):
the reference `tests/gradcam.rs` checks the `gradcam` stage against.

    .venv/bin/python models/gradcam_reference.py MODEL_DIR PIXELS.npy OUT.npy
        [--layer NAME] [--class predicted|NAME] [--block4 models/vgg16_block4.onnx]
        [--block5 models/vgg16_block5.safetensors]
        [--superimpose PHOTOS.txt HEATMAPS.npy PICTURES_DIR]

MODEL_DIR is a `dense_head`'s out_dir (head.safetensors + head.json: the
head on VGG16's block5, whose weights are --block5) or a `convnet`'s
(model.safetensors + model.json; `base: vgg16_block5` for a fine-tuned
VGG16). PIXELS.npy: float32 [N, H, W, 3] (or 1 channel), the images as
resized, 0..255. For a VGG16-based model they are preprocessed as the
training features were (head.json / model.json record it: caffe is RGB ->
BGR minus the ImageNet means) and run through --block4 by onnxruntime;
for a convnet they are multiplied by its rescale.

Then, in float64: the forward pass of every layer after (conv2d with
Keras's `same` / `valid` padding, max pooling, flatten, dropout as the
identity, dense), the class probability (sigmoid: P(class 1) = p,
P(class 0) = 1 - p; softmax: p_c), and its analytic gradient back through
the head, the pool and any conv layers in between to the output A of the
chosen conv layer (default: the last). alpha_k = mean over the map of
dp/dA[..., k]; heatmap = relu(sum_k alpha_k A[..., k]) / its max (zeros
when the max is 0).

Writes OUT.npy, float32 [N, h, w], and prints one JSON line per image:
{"class": c, "probability": p, "predicted": k, "undecided": u}.

Below a ReLU the gradient jumps where a unit's pre-activation crosses 0
(and where a max-pool window's top two swap), so float32 and float64 may
draw different heatmaps near such a point, both right to float32's
precision. u counts the image's decisions float32 could make either way
(see UNDECIDED); when u > 0, OUT.undecided<i>.npy, float32 [2^u - 1, h, w],
holds image i's heatmaps for every other way of making them.

--superimpose draws, for each photo path in PHOTOS.txt (PNG files, read
exactly) and the matching heatmap of HEATMAPS.npy, the book's figure:
cv2.resize's bilinear to the photo's size, np.uint8(255 * h), jet, then
jet * 0.4 + photo clipped to 0..255; saved as PICTURES_DIR/<i>.npy (uint8).
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np

from safetensors_f32 import read_safetensors

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])
BLOCK5 = ["block5_conv1", "block5_conv2", "block5_conv3"]
# A ReLU unit whose |z| is at most this fraction of sum |x| |w| + |b| (or
# two max-pool values that close) is undecided: float32, which the stage
# computes in, may take it either way. Measured on VGG16's block5 and a
# head: numpy's float32 is off by at most 1.7e-7 of that sum, so 1e-6
# leaves a margin of 6 for other summation orders. The gradient below such
# a unit jumps with the decision (one block5_conv3 unit at 1.3e-8 moved a
# block5_conv1 heatmap by 1.25e-2).
UNDECIDED = 1e-6
# More undecided decisions than this in one image: 2^k heatmaps is no check.
MOST_UNDECIDED = 8


def pair(v, default):
    if v is None:
        v = default
    return (v, v) if isinstance(v, int) else tuple(v)


def keras_names(layers):
    counts, names = {}, []
    for layer in layers:
        k = counts.get(layer["kind"], 0)
        counts[layer["kind"]] = k + 1
        names.append(layer["kind"] if k == 0 else f"{layer['kind']}_{k}")
    return names


def load(model_dir, block5_path):
    """(layers, weights {name: (kernel, bias)}, is VGG16-based, classes,
    rescale, preprocess)."""
    st = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(st):
        tensors, meta = read_safetensors(st)
        layers = json.loads(meta["layers"])
        with open(os.path.join(model_dir, "model.json")) as f:
            info = json.load(f)
        names = keras_names(layers)
        weights = {n: (tensors[f"{n}/kernel"], tensors[f"{n}/bias"]) for n in names if f"{n}/kernel" in tensors}
        made = [s for s in info.get("images_from", []) if s["kind"] == "onnx_features"]
        pre = made[-1]["options"].get("preprocess", "rescale") if made else None
        vgg = info.get("base") == "vgg16_block5"
        return layers, names, weights, vgg, info["classes"], info.get("rescale", 1.0), pre
    tensors, _ = read_safetensors(os.path.join(model_dir, "head.safetensors"))
    with open(os.path.join(model_dir, "head.json")) as f:
        info = json.load(f)
    block5, _ = read_safetensors(block5_path)
    conv = {"kind": "conv2d", "filters": 512, "kernel_size": 3, "padding": "same", "activation": "relu"}
    layers = [conv, conv, conv, {"kind": "max_pooling2d", "pool_size": 2}, {"kind": "flatten"}]
    layers += [l for l in info["layers"] if l["kind"] in ("dense", "dropout")]
    names = keras_names(layers)
    weights = {names[i]: (block5[f"{b}/kernel"], block5[f"{b}/bias"]) for i, b in enumerate(BLOCK5)}
    dense = [n for n, l in zip(names, layers) if l["kind"] == "dense"]
    for i, n in enumerate(dense):
        weights[n] = (tensors[f"dense_{i}.kernel"], tensors[f"dense_{i}.bias"])
    made = [s for s in info.get("features_from", []) if s["kind"] == "onnx_features"]
    pre = made[-1]["options"].get("preprocess", "rescale") if made else "rescale"
    return layers, names, weights, True, info["classes"], 1.0, pre


def pads(n, k, s, padding):
    """(output size, pad before, pad after) along one axis, as TensorFlow."""
    if padding == "same":
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        return out, total // 2, total - total // 2
    return (n - k) // s + 1, 0, 0


def conv_geometry(x, layer):
    kh, kw = pair(layer["kernel_size"], None)
    sh, sw = pair(layer.get("strides"), 1)
    padding = layer.get("padding", "valid")
    _, h, w, _ = x.shape
    oh, pt, pb = pads(h, kh, sh, padding)
    ow, pl, pr = pads(w, kw, sw, padding)
    return kh, kw, sh, sw, oh, ow, (pt, pb, pl, pr)


def im2col(x, kh, kw, sh, sw, oh, ow, p):
    xp = np.pad(x, ((0, 0), (p[0], p[1]), (p[2], p[3]), (0, 0)))
    n, c = x.shape[0], x.shape[3]
    cols = np.empty((n, oh, ow, kh, kw, c))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = xp[:, i:i + sh * oh:sh, j:j + sw * ow:sw, :]
    return cols.reshape(n, oh, ow, kh * kw * c), xp.shape


def activate(act, z):
    if act == "relu":
        return np.maximum(z, 0)
    if act == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if act == "tanh":
        return np.tanh(z)
    if act in ("linear", None):
        return z
    raise SystemExit(f"activation {act} on a hidden layer is not supported here")


def activation_grad(act, y, d):
    """d w.r.t. the pre-activation, from d w.r.t. the output y."""
    if act == "relu":
        return d * (y > 0)
    if act == "sigmoid":
        return d * y * (1 - y)
    if act == "tanh":
        return d * (1 - y * y)
    return d


def forward(x, layers, names, weights, flips=(), track=False):
    """Each layer's output (the last: logits), what backward needs and,
    with `track`, the undecided decisions (see `undecided`). `flips`:
    decisions (layer, index, alternative) made the other way: a ReLU unit
    outputs |z| where float64 says 0 and 0 where it says z; a max-pool
    window passes its runner-up `alternative`."""
    outs, saved, found = [], [], []
    scale = None  # sum |x| |w| + |b| of the last conv or dense layer's units
    for i, (layer, name) in enumerate(zip(layers, names)):
        last = i == len(layers) - 1
        kind = layer["kind"]
        mine = [(idx, alt) for j, idx, alt in flips if j == i]
        if kind == "conv2d":
            kernel, bias = (w.astype(np.float64) for w in weights[name])
            g = conv_geometry(x, layer)
            cols, padded = im2col(x, *g[:6], g[6])
            # 2-D products: numpy's stacked matmul on 4-D arrays skips BLAS.
            flat, k2 = cols.reshape(-1, cols.shape[3]), kernel.reshape(-1, kernel.shape[3])
            z = (flat @ k2).reshape(cols.shape[:3] + (-1,))
            z = z + bias
            if track:
                scale = (np.abs(flat) @ np.abs(k2)).reshape(z.shape) + np.abs(bias)
            y = z if last else activate(layer.get("activation", "linear"), z)
            saved.append((g, padded, kernel))
        elif kind == "max_pooling2d":
            ph, pw = pair(layer.get("pool_size"), 2)
            sh, sw = pair(layer.get("strides"), (ph, pw))
            n, h, w, c = x.shape
            oh, ow = (h - ph) // sh + 1, (w - pw) // sw + 1
            win = np.stack([x[:, i:i + sh * oh:sh, j:j + sw * ow:sw, :] for i in range(ph) for j in range(pw)])
            arg = win.argmax(axis=0)
            for idx, alt in mine:
                arg[idx] = alt
            y = np.take_along_axis(win, arg[None], axis=0)[0]
            if track and scale is not None:
                # Two positive values float32 cannot order: either may pass.
                # Equal ones (a flat patch of photo: equal inputs, computed
                # alike) are decided: both take the first, as argmax.
                order = np.argsort(win, axis=0, kind="stable")
                top, second = (np.take_along_axis(win, order[r][None], axis=0)[0] for r in (-1, -2))
                ws = np.stack([scale[:, i:i + sh * oh:sh, j:j + sw * ow:sw, :] for i in range(ph) for j in range(pw)])
                s = np.take_along_axis(ws, order[-1][None], axis=0)[0]
                near = (second > 0) & (top > second) & (top - second <= UNDECIDED * s)
                found += [(i, idx, int(order[-2][idx])) for idx in zip(*np.nonzero(near))]
            scale = None
            saved.append((x.shape, ph, pw, sh, sw, oh, ow, arg))
        elif kind == "flatten":
            y = x.reshape(x.shape[0], -1)
            saved.append(x.shape)
        elif kind == "dropout":
            y = x
            saved.append(None)
        elif kind == "dense":
            kernel, bias = (w.astype(np.float64) for w in weights[name])
            z = x @ kernel + bias
            if track:
                scale = np.abs(x) @ np.abs(kernel) + np.abs(bias)
            y = z if last else activate(layer.get("activation", "linear"), z)
            saved.append(kernel)
        else:
            raise SystemExit(f"layer kind {kind} is not supported")
        if kind in ("conv2d", "dense") and not last and layer.get("activation") == "relu":
            for idx, _ in mine:
                y[idx] = abs(z[idx]) if y[idx] == 0 else 0
            if track:
                found += [(i, idx, None) for idx in zip(*np.nonzero(np.abs(z) <= UNDECIDED * scale))]
        outs.append(y)
        x = y
    return outs, saved, found


def backward(d, layers, outs, saved, down_to):
    """d (w.r.t. the logits) back to the output of layer `down_to`."""
    for i in range(len(layers) - 1, down_to, -1):
        layer, kind = layers[i], layers[i]["kind"]
        last = i == len(layers) - 1
        if kind in ("conv2d", "dense") and not last:
            d = activation_grad(layer.get("activation", "linear"), outs[i], d)
        if kind == "dense":
            d = d @ saved[i].T
        elif kind == "flatten":
            d = d.reshape(saved[i])
        elif kind == "max_pooling2d":
            shape, ph, pw, sh, sw, oh, ow, arg = saved[i]
            dx = np.zeros(shape)
            for k in range(ph * pw):
                a, b = divmod(k, pw)
                dx[:, a:a + sh * oh:sh, b:b + sw * ow:sw, :] += d * (arg == k)
            d = dx
        elif kind == "conv2d":
            (kh, kw, sh, sw, oh, ow, p), padded, kernel = saved[i]
            dcols = (d.reshape(-1, d.shape[3]) @ kernel.reshape(-1, kernel.shape[3]).T).reshape(d.shape[0], oh, ow, kh, kw, -1)
            dxp = np.zeros(padded)
            for a in range(kh):
                for b in range(kw):
                    dxp[:, a:a + sh * oh:sh, b:b + sw * ow:sw, :] += dcols[:, :, :, a, b, :]
            d = dxp[:, p[0]:padded[1] - p[1], p[2]:padded[2] - p[3], :]
    return d


def probabilities(last, z):
    if last.get("activation") == "sigmoid":
        p1 = 1 / (1 + np.exp(-z[:, 0]))
        return np.stack([1 / (1 + np.exp(z[:, 0])), p1], axis=1)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def score_gradient(last, p, c):
    """dp_c/dz per row, c the class of each row."""
    rows = np.arange(len(c))
    if last.get("activation") == "sigmoid":
        s = p[:, 0] * p[:, 1]
        return np.where(c == 1, s, -s)[:, None]
    d = -p[rows, c][:, None] * p
    d[rows, c] = p[rows, c] * (1 - p[rows, c])
    return d


def jet(q):
    """The jet of each 8-bit level q that src/visualize/picture.rs draws
    (OpenCV's COLORMAP_JET shape): clip(1.5 - |4v - centre|, 0, 1) * 255 for
    v = q / 255, in float32 as there, rounded half away from zero as Rust's
    f32::round. Its values sit on .5 exactly (382.5 - |4q - 255 centre|),
    so numpy's round-half-even in float64 would be a different colour map."""
    v = q.astype(np.float32) / np.float32(255)
    def ch(centre):
        x = np.clip(np.float32(1.5) - np.abs(np.float32(4) * v - np.float32(centre)), 0, 1).astype(np.float32)
        x = x * np.float32(255)
        return np.where(x - np.floor(x) >= 0.5, np.ceil(x), np.floor(x)).astype(np.float64)
    return np.stack([ch(3.0), ch(2.0), ch(1.0)], axis=-1)


def resize_linear(a, height, width):
    """cv2.resize(a, (width, height)) with INTER_LINEAR (half-pixel centres)."""
    def taps(n, m):
        f = (np.arange(m) + 0.5) * (n / m) - 0.5
        i = np.floor(f)
        w = f - i
        w[i < 0] = 0
        i[i < 0] = 0
        w[i >= n - 1] = 0
        i[i >= n - 1] = n - 1
        i = i.astype(int)
        return i, np.minimum(i + 1, n - 1), w
    r0, r1, fy = taps(a.shape[0], height)
    c0, c1, fx = taps(a.shape[1], width)
    top = a[r0][:, c0] * (1 - fx) + a[r0][:, c1] * fx
    bottom = a[r1][:, c0] * (1 - fx) + a[r1][:, c1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def superimpose(photos, heatmaps_path, out_dir):
    from PIL import Image
    heat = np.load(heatmaps_path).astype(np.float64)
    os.makedirs(out_dir, exist_ok=True)
    with open(photos) as f:
        paths = [l.strip() for l in f if l.strip()]
    for i, path in enumerate(paths):
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        h = resize_linear(heat[i], img.shape[0], img.shape[1])
        q = np.uint8(255 * np.clip(h, 0, 1))
        out = np.clip(np.round(jet(q) * 0.4 + img), 0, 255).astype(np.uint8)
        np.save(os.path.join(out_dir, f"{i}.npy"), out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("pixels", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--layer")
    ap.add_argument("--class", dest="cls", default="predicted")
    ap.add_argument("--block4", default="models/vgg16_block4.onnx")
    ap.add_argument("--block5", default="models/vgg16_block5.safetensors")
    ap.add_argument("--superimpose", nargs=3, metavar=("PHOTOS", "HEATMAPS", "DIR"))
    args = ap.parse_args()
    if args.superimpose:
        superimpose(*args.superimpose)
        return
    if not (args.model_dir and args.pixels and args.out):
        ap.error("MODEL_DIR, PIXELS.npy and OUT.npy are needed")

    layers, names, weights, vgg, classes, rescale, pre = load(args.model_dir, args.block5)
    pixels = np.load(args.pixels)
    if vgg:
        import onnxruntime as ort
        x = pixels.astype(np.float64)
        if pre == "caffe":
            x = x[..., ::-1] - CAFFE_MEAN_BGR
        elif pre == "rescale":
            x = x / 255.0
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(args.block4, so, providers=["CPUExecutionProvider"])
        (x,) = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})
    else:
        # The stage multiplies in float32, as the trainer did.
        x = pixels.astype(np.float32) * np.float32(rescale)
    x = x.astype(np.float64)

    convs = [i for i, l in enumerate(layers) if l["kind"] == "conv2d"]
    if args.layer is None:
        k = convs[-1]
    elif vgg and args.layer in BLOCK5:
        k = convs[BLOCK5.index(args.layer)]
    elif args.layer in names and names.index(args.layer) in convs:
        k = names.index(args.layer)
    else:
        sys.exit(f"no conv layer {args.layer}: {[names[i] for i in convs]}")

    outs, saved, found = forward(x, layers, names, weights, track=True)
    p = probabilities(layers[-1], outs[-1])
    # The predicted class: the later one on a tie, as convflow's CSVs.
    predicted = p.shape[1] - 1 - np.argmax(p[:, ::-1], axis=1)
    c = predicted if args.cls == "predicted" else np.full(len(p), classes.index(args.cls))
    np.save(args.out, grad_cam(layers, outs, saved, p, c, k).astype(np.float32))
    for i in range(len(p)):
        # Image i's decisions, indexed as in its own one-image forward pass.
        mine = [(j, (0,) + idx[1:], alt) for j, idx, alt in found if idx[0] == i]
        if len(mine) > MOST_UNDECIDED:
            sys.exit(f"image {i}: {len(mine)} undecided ReLU units or pool windows (most {MOST_UNDECIDED})")
        maps = []
        for bits in itertools.product([False, True], repeat=len(mine)):
            if any(bits):
                flips = [f for b, f in zip(bits, mine) if b]
                o, sv, _ = forward(x[i:i + 1], layers, names, weights, flips)
                maps.append(grad_cam(layers, o, sv, probabilities(layers[-1], o[-1]), c[i:i + 1], k)[0])
        if maps:
            np.save(alternatives_path(args.out, i), np.stack(maps).astype(np.float32))
        print(json.dumps({"class": int(c[i]), "probability": float(p[i, c[i]]), "predicted": int(predicted[i]),
                          "undecided": len(mine)}))


def grad_cam(layers, outs, saved, p, c, k):
    """The heatmaps of class c at the output of layer k."""
    grad = backward(score_gradient(layers[-1], p, c), layers, outs, saved, k)
    a = outs[k]
    alpha = grad.mean(axis=(1, 2))
    cam = np.maximum(np.einsum("nhwk,nk->nhw", a, alpha), 0)
    top = cam.max(axis=(1, 2), keepdims=True)
    return np.where(top > 0, cam / np.where(top > 0, top, 1), 0)


def alternatives_path(out, i):
    """Where image i's heatmaps with its undecided decisions made otherwise go."""
    stem = out[:-4] if out.endswith(".npy") else out
    return f"{stem}.undecided{i}.npy"

if __name__ == "__main__":
    main()
