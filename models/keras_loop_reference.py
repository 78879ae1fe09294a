#!/usr/bin/env python3
"""The loop a Keras user writes, on onnxruntime: features for a list of photos.

Usage: keras_loop_reference.py MODEL.onnx SIZE PREPROCESS PATHS.txt OUT.npy

Each path (one per line) is loaded as `keras.utils.load_img(path,
target_size=(SIZE, SIZE))` does it: `PIL.Image.open(p).convert("RGB")`, then
`.resize((SIZE, SIZE), Image.NEAREST)`; then preprocessed as Keras's
`imagenet_utils.preprocess_input` mode `caffe` (RGB -> BGR, minus the
ImageNet means) or the book's `rescale` (x / 255), and run through the model
one image at a time, single-threaded. tests/keras_pixels.rs holds convflow's
`extract_features.yaml` to this, image by image.
"""
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def load_img(path, size):
    img = Image.open(path).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return np.asarray(img, dtype=np.float32)


def preprocess(x, mode):
    if mode == "caffe":
        return x[..., ::-1] - CAFFE_MEAN_BGR
    if mode == "rescale":
        return x / np.float32(255.0)
    sys.exit(f"keras_loop_reference: unknown preprocess {mode!r}")


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    model, size, mode, paths, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rows = []
    for p in open(paths, encoding="utf-8").read().splitlines():
        x = np.ascontiguousarray(preprocess(load_img(p, size), mode)[None], dtype=np.float32)
        rows.append(sess.run(None, {name: x})[0][0])
    np.save(out, np.stack(rows).astype(np.float32))
    print(f"keras_loop_reference: {len(rows)} images -> {list(np.stack(rows).shape)}")


if __name__ == "__main__":
    main()
