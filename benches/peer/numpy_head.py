"""The book's dense head in plain numpy (used by compare.py only when neither
TensorFlow nor PyTorch installs): Dense(256, relu) -> Dropout(0.5) ->
Dense(1, sigmoid), RMSprop(lr 2e-5, rho 0.9, eps 1e-7 as Keras), binary
cross-entropy, batch 20, validation after every epoch.

    python numpy_head.py FEATURES_DIR [EPOCHS]
"""
import json
import os
import sys
import time

import numpy as np


def load(d):
    x = np.load(os.path.join(d, "features.npy")).reshape(-1, 8192).astype(np.float32)
    return x, np.load(os.path.join(d, "labels.npy")).astype(np.float32)


def glorot(rng, fan_in, fan_out):
    lim = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-lim, lim, (fan_in, fan_out)).astype(np.float32)


def main():
    root = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    xt, yt = load(os.path.join(root, "train"))
    xv, yv = load(os.path.join(root, "validation"))
    rng = np.random.default_rng(0)
    params = [glorot(rng, 8192, 256), np.zeros(256, np.float32), glorot(rng, 256, 1), np.zeros(1, np.float32)]
    slots = [np.zeros_like(p) for p in params]
    lr, rho, eps = 2e-5, 0.9, 1e-7
    start = time.perf_counter()
    val_acc = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(xt))
        for i in range(0, len(xt), 20):
            idx = order[i:i + 20]
            x, y = xt[idx], yt[idx, None]
            w1, b1, w2, b2 = params
            h = np.maximum(x @ w1 + b1, 0)
            mask = (rng.random(h.shape) >= 0.5) / 0.5
            hd = h * mask
            p = 1 / (1 + np.exp(-(hd @ w2 + b2)))
            dz = (p - y) / len(idx)
            dh = (dz @ w2.T) * mask * (h > 0)
            grads = [x.T @ dh, dh.sum(0), hd.T @ dz, dz.sum(0)]
            for p_, g, s in zip(params, grads, slots):
                s *= rho
                s += (1 - rho) * g * g
                p_ -= lr * g / (np.sqrt(s) + eps)
        w1, b1, w2, b2 = params
        pv = 1 / (1 + np.exp(-(np.maximum(xv @ w1 + b1, 0) @ w2 + b2)))
        val_acc = float(((pv[:, 0] > 0.5) == (yv > 0.5)).mean())
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "epochs": epochs, "val_acc": val_acc, "numpy": np.__version__}))


if __name__ == "__main__":
    main()
