#!/usr/bin/env python3
"""Run Python onnxruntime (CPU) on a float32 .npy; save the output .npy.

Usage: ort_reference.py MODEL.onnx INPUT.npy OUTPUT.npy

The reference the Rust integration tests compare convflow's features
against (same model, same preprocessed tensor). Single-threaded so the
numbers do not depend on the machine's core count.
"""
import sys

import numpy as np
import onnxruntime as ort


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    model, inp, out = sys.argv[1:]
    x = np.load(inp)
    if x.dtype != np.float32:
        sys.exit(f"ort_reference: {inp}: expected float32, got {x.dtype} {list(x.shape)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    # Models here have one input and one output; take the names from the model
    # rather than assuming `input`/`features`.
    (y,) = sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: np.ascontiguousarray(x)})
    np.save(out, y.astype(np.float32, copy=False))
    print(f"ort_reference: {list(x.shape)} -> {list(y.shape)} ({out})")


if __name__ == "__main__":
    main()
