"""`Pipeline`: a pipeline file with its params; validate, run, stream."""

import json
import os

from . import _native, _ort
from ._native import RunError

# How long one wait on the native side lasts, GIL released. Between two,
# Python runs: Ctrl-C (KeyboardInterrupt) and progress updates happen there.
SLICE = 0.05
# After Ctrl-C, how long run() lets the interrupted run drain before it
# raises (the drain goes on in the background; the outputs are not published).
DRAIN_GRACE = 0.25


def _param(value):
    """A Python value as a `--set` value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


class Batch:
    """What a stage emitted: `x` (numpy: uint8 images NHWC, or float32
    features), `y` (float32 labels as labels.npy holds them, or None),
    `paths` and `split` (one entry per item), `epoch`. `x` and `y` are
    views on buffers Rust filled (no copy), writable."""

    __slots__ = ("x", "y", "paths", "split", "epoch")

    def __init__(self, native):
        import numpy as np

        self.x = np.asarray(native.x)
        self.y = None if native.y is None else np.asarray(native.y)
        self.paths = native.paths
        self.split = native.splits
        self.epoch = native.epoch

    def __len__(self):
        return len(self.paths)

    def __repr__(self):
        return f"Batch(x={self.x.dtype}{list(self.x.shape)}, y={None if self.y is None else list(self.y.shape)}, epoch={self.epoch})"


class _Progress:
    """A tqdm bar over the sources' items, when tqdm is installed (its
    notebook widget in Jupyter); otherwise nothing at all."""

    def __init__(self, run, enabled, desc):
        self.run, self.bar = run, None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(desc=desc, unit="img", dynamic_ncols=True, leave=True)

    def update(self):
        if self.bar is None:
            return
        sources = [p for p in self.run.progress() if p[1]]
        totals = [p[3] for p in sources]
        if sources and all(t is not None for t in totals) and self.bar.total != sum(totals):
            self.bar.total = sum(totals)
        done = sum(p[2] for p in sources)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.update()
            self.bar.close()


def _finish(run):
    """Waits for a run's end (Ctrl-C stays live); its report, or RunError."""
    while True:
        out = run.wait(SLICE)
        if out is not None:
            break
    error, report = out
    report = None if report is None else json.loads(report)
    if error is not None:
        e = RunError(error)
        e.report = report
        raise e
    return report


class Pipeline:
    """A pipeline file and its params (the keyword arguments are the
    `--set` params: `Pipeline(path, data_dir="data", preprocess="caffe")`)."""

    def __init__(self, path, **params):
        self.path = os.fspath(path)
        self.params = {k: _param(v) for k, v in params.items()}
        _ort.ensure()

    def __repr__(self):
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"convflow.Pipeline({self.path!r}{args})"

    def _set(self):
        return list(self.params.items())

    def validate(self, environment=True):
        """Checks the file as `convflow validate` does (with `environment`:
        also the folders and models it points at). Raises PipelineError;
        returns the number of stages."""
        return _native.validate(self.path, self._set(), environment)

    def stages(self):
        """[(id, kind, what it emits or None for a sink)], in file order."""
        return _native.stages(self.path, self._set())

    def run(self, progress=True):
        """What `convflow run` does (the same outputs, the report written),
        returning the report as a dict. Ctrl-C raises KeyboardInterrupt at
        once; the run drains in the background and publishes nothing, as
        the CLI's does. A failure raises RunError with the CLI's words (the
        report, when one was written, as its `.report`)."""
        run = _native.Run(self.path, self._set())
        bar = _Progress(run, progress, os.path.basename(self.path))
        try:
            while True:
                out = run.wait(SLICE)
                bar.update()
                if out is not None:
                    break
        except KeyboardInterrupt:
            run.interrupt()
            try:
                run.wait(DRAIN_GRACE)
            finally:
                raise
        finally:
            bar.close()
        return _finish(run)

    def stream(self, stage, batch_size=32):
        """Yields what `stage` emits, as Batch objects: each batch a `batch`
        stage makes, or `batch_size` items at a time (never across an
        epoch). Only `stage` and what feeds it run; nothing is written."""
        emits = {s[0]: s[2] for s in self.stages()}
        group = None if emits.get(stage) == "batch" else int(batch_size)
        if group is not None and group < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        run = _native.Run(self.path, self._set(), tap=stage, group=group)
        return _stream(run)


def _stream(run):
    try:
        while True:
            b = run.next_batch(SLICE)
            if b is not None:
                yield Batch(b)
            elif run.ended:
                break
        _finish(run)
    finally:
        # Closed early (break, an exception): stop the sources.
        run.interrupt()
