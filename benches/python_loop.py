"""The plain Python loop users write today: PIL + onnxruntime, batch 20.

    .venv/bin/python benches/python_loop.py MODEL DIR [N]

Reads the first N images of DIR/<class>/ (sorted, like convflow), resizes to
150x150 (nearest, Keras's default), rescales by 1/255, runs batches of 20 and
prints `images_per_second=<float>` on its last line.
"""
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image


def main():
    model, root = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 10**9
    files = []
    for cls in sorted(os.listdir(root)):
        d = os.path.join(root, cls)
        files += [os.path.join(d, f) for f in sorted(os.listdir(d))]
    files = files[:n]
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    start = time.perf_counter()
    rows = 0
    for i in range(0, len(files), 20):
        batch = np.stack([
            np.asarray(Image.open(f).convert("RGB").resize((150, 150), Image.NEAREST), dtype=np.float32) / 255.0
            for f in files[i:i + 20]
        ])
        rows += sess.run(None, {name: batch})[0].shape[0]
    elapsed = time.perf_counter() - start
    print(f"images_per_second={rows / elapsed:.3f}")


if __name__ == "__main__":
    main()
