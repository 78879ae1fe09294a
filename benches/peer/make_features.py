"""Synthetic cached features for the head comparison, the shape of the book's:
train 2000 and validation 1000 rows of [4, 4, 512] float32, ~71% zeros (as
VGG16's ReLU output), labels from a fixed linear rule plus noise.

    python make_features.py OUT_DIR
"""
import os
import sys

import numpy as np


def split(rng, rows, direction):
    x = rng.random((rows, 8192), dtype=np.float32) * 2.0
    x[rng.random((rows, 8192)) < 0.71] = 0.0
    y = ((x @ direction + rng.uniform(-5, 5, rows)) > 0).astype(np.float32)
    return x.reshape(rows, 4, 4, 512), y


def main():
    out = sys.argv[1]
    rng = np.random.default_rng(0)
    direction = np.random.default_rng(12345).uniform(-1, 1, 8192).astype(np.float32)
    for name, rows in (("train", 2000), ("validation", 1000)):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        x, y = split(rng, rows, direction)
        np.save(os.path.join(d, "features.npy"), x)
        np.save(os.path.join(d, "labels.npy"), y)


if __name__ == "__main__":
    main()
