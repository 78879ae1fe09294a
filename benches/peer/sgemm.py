"""This machine's single-precision matrix-multiply rate, all cores: the best
of several 2048x2048 float32 products (2 n^3 FLOP each), through numpy's BLAS
and, when onnx and onnxruntime import, through ONNX Runtime's own MatMul
(MLAS, the kernels its convolutions use). Prints one JSON line (GFLOP/s).

    python sgemm.py
"""
import json
import os
import time

import numpy as np

N = 2048


def best_seconds(fn, reps=9):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def numpy_rate(a, b):
    blas = "numpy"
    try:
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} x{i.get('num_threads')}"
                         for i in threadpool_info())
    except ImportError:
        pass
    return 2 * N**3 / best_seconds(lambda: a @ b) / 1e9, blas


def onnxruntime_rate(a, b):
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [N, N]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [N, N])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [N, N])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return 2 * N**3 / best_seconds(lambda: sess.run(None, {"a": a, "b": b})) / 1e9


def main():
    rng = np.random.default_rng(0)
    a = rng.random((N, N), dtype=np.float32)
    b = rng.random((N, N), dtype=np.float32)
    gflops, blas = numpy_rate(a, b)
    print(json.dumps({"n": N, "numpy_gflops": gflops, "blas": blas, "onnxruntime_gflops": onnxruntime_rate(a, b)}))


if __name__ == "__main__":
    main()
