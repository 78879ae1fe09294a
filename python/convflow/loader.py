"""`Loader`: training batches from a pipeline stage, with PyTorch
DistributedSampler's contract (docs/python.md#the-loader).

One run of the pipeline cut after `stage` serves the Loader's life (its
threads and memory are made once, not every epoch). Each iteration sends
its `file_reader` one pass: exactly which files to read in which order,
the epoch's order (a function of seed and epoch), this rank's share, minus
what a resumed state has already seen. Skipped files are never read or
decoded.
"""

import os

from . import _native
from .pipeline import SLICE, Batch, _finish

STATE_VERSION = 1


class Loader:
    """Batches `(x, y)` of what `stage` emits (numpy, no copy: x uint8 NHWC
    images or float32 features, y float32 labels or None).

    shuffle, seed, drop_last, rank, world_size: as torch's DistributedSampler
    (drop_last also drops the last short batch, as DataLoader's). `split`:
    only the files of that split of the source (its `splits:` entry)."""

    def __init__(self, pipeline, stage="augment", batch_size=32, shuffle=True, seed=0, drop_last=True,
                 rank=0, world_size=1, split=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.pipeline = pipeline
        self.stage = stage
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.split = split
        splits = _native.listing(pipeline.path, pipeline._set(), stage)
        if split is None:
            self._files = list(range(len(splits)))
        else:
            self._files = [i for i, s in enumerate(splits) if s == split]
            if not self._files:
                known = sorted({s for s in splits if s is not None})
                raise ValueError(f"stage `{stage}`'s source has no split {split!r}; its splits: {known or 'none'}")
        self.epoch = 0
        self._position = 0  # batches of this epoch handed out (or resumed past)
        self._resume = 0  # batches the next iteration skips (load_state_dict)
        self._current = None
        self._run = None  # the run every iteration's pass goes to, made at the first
        self._pid = os.getpid()

    def __len__(self):
        per = _native.per_rank(len(self._files), self.world_size, self.drop_last)
        return per // self.batch_size if self.drop_last else -(-per // self.batch_size)

    @property
    def num_items(self):
        """Files the source lists for this loader (all ranks together)."""
        return len(self._files)

    def set_epoch(self, epoch):
        """The epoch the next iteration gives (its order and augmentation)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self._position, self._resume = epoch, 0, 0

    def state_dict(self):
        """Where this loader is: resuming from it gives the batches an
        uninterrupted run would have given next."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches": self._position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "items": len(self._files),
        }

    def load_state_dict(self, state):
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Loader state version {state.get('version')!r}; this convflow reads {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "shuffle", "drop_last", "batch_size", "rank", "world_size", "items"):
            if state[key] != mine[key]:
                raise ValueError(f"the state was saved with {key}={state[key]!r}; this Loader has {key}={mine[key]!r}")
        if not 0 <= int(state["batches"]) <= len(self):
            raise ValueError(f"state batches={state['batches']} is outside this loader's 0..{len(self)}")
        self.epoch = int(state["epoch"])
        self._position = self._resume = int(state["batches"])

    def _positions(self):
        """Listing positions of this rank's epoch, the resumed ones left out."""
        order = _native.epoch_order(len(self._files), self.seed, self.epoch, self.shuffle, self.rank,
                                    self.world_size, self.drop_last)
        if self.drop_last:
            order = order[: len(self) * self.batch_size]
        start = self._resume * self.batch_size
        return [self._files[i] for i in order[start:]]

    def __iter__(self):
        """Batches `(x, y)` of epoch `self.epoch`."""
        return self._start(full=False)

    def batches(self):
        """The same batches as `convflow.Batch` objects (x, y, paths, split, epoch)."""
        return self._start(full=True)

    def _start(self, full):
        if os.getpid() != self._pid and self._run is not None:
            raise RuntimeError(
                f"convflow.Loader: started in process {self._pid}, used in process {os.getpid()} (a fork): its "
                "threads did not come along. Create the Loader in this process (e.g. in a DataLoader "
                "worker_init_fn) or use the 'spawn' start method")
        # One iteration at a time: a new one (the next `for`, after a
        # `break`) stops the one before, whose iterator then raises.
        if self._current is not None:
            self._current._supersede()
        self._pid = os.getpid()
        positions = self._positions()
        self._position, self._resume = self._resume, 0
        it = _Iteration(self, positions, full)
        self._current = it
        return it

    def _fed_run(self):
        """The run the passes go to: made once, again only after one ended (failed)."""
        if self._run is None or self._run.ended:
            p = self.pipeline
            self._run = _native.Run(p.path, p._set(), tap=self.stage, group=self.batch_size, fed=True,
                                    capacity=2 * self.batch_size)
        return self._run

    def close(self):
        """Stops the run behind the loader (also done when it is collected)."""
        if self._current is not None:
            self._current._supersede()
        if self._run is not None:
            self._run.interrupt()
            self._run = None

    def __del__(self):
        run = getattr(self, "_run", None)
        if run is not None and os.getpid() == self._pid:
            run.interrupt()


class _Iteration:
    def __init__(self, loader, positions, full):
        self.loader = loader
        self.full = full
        # Files this iteration reads: the resumed-past ones are not among them.
        self.items = len(positions)
        self.superseded = False
        self.run = None
        if positions:
            self.run = loader._fed_run()
            self.run.start_pass(loader.epoch, positions)

    def __iter__(self):
        return self

    def _supersede(self):
        self.superseded = True
        self._stop()

    def _stop(self):
        # The run goes on for the next iteration, whose pass cuts this one short.
        self.run = None

    def __next__(self):
        import numpy as np

        if self.superseded:
            raise RuntimeError("this iteration of the Loader was replaced by a newer one (iter() was called "
                               "again on the same Loader); use the newer iterator")
        if self.run is None:
            raise StopIteration
        while True:
            b = self.run.next_batch(SLICE)
            if b is not None:
                self.loader._position += 1
                if self.full:
                    return Batch(b)
                return np.asarray(b.x), None if b.y is None else np.asarray(b.y)
            if self.run.pass_ended:
                self.run = None
                raise StopIteration
            if self.run.ended:
                # The run stopped mid-pass: a stage failed (raised here) or it was interrupted.
                run, self.run = self.run, None
                if self.loader._run is run:
                    self.loader._run = None
                _finish(run)
                raise StopIteration

    def close(self):
        self._stop()
