"""convflow from Python: run pipeline files, stream any stage's output as
numpy, and feed Keras or PyTorch training from a convflow graph.

    import convflow
    p = convflow.Pipeline("pipelines/extract_features.yaml", data_dir="data", preprocess="caffe")
    p.validate()                      # convflow.PipelineError, str() has file:line:col
    report = p.run()                  # what `convflow run` does; the report as a dict
    for b in p.stream("conv_base"): ...   # b.x, b.y, b.paths, b.split as numpy / lists
    loader = convflow.Loader(p, stage="augment", batch_size=32)

Importing this package imports neither numpy, torch, TensorFlow nor
onnxruntime: each is imported when first needed (docs/python.md).
"""

from ._native import PipelineError, RunError
from .loader import Loader
from .pipeline import Batch, Pipeline

__all__ = ["Pipeline", "Loader", "Batch", "PipelineError", "RunError"]
