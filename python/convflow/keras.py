"""`convflow.keras.PyDataset`: a Loader as a `keras.utils.PyDataset`, so
`model.fit(convflow.keras.PyDataset(loader, rescale=1/255), epochs=30)`
trains on convflow's batches. Imports keras when this module is imported
(never by `import convflow`).

Keras asks for batches by index; a convflow Loader streams them. Each call
gets the loader's next batch whatever the index (the order is the Loader's:
`model.fit`'s own `shuffle` only permutes indices, which mean nothing
here). An epoch that begins after one whose batches were all served moves
the loader to its next epoch (`set_epoch`), so every epoch has its own
order and augmentation; one that begins after a partial epoch (Keras's JAX
backend peeks at one batch before training) starts that epoch over. A call
past the epoch's last batch (TensorFlow's backend peeks at one to learn the
shapes) starts the epoch over.
"""

import threading

import keras


class PyDataset(keras.utils.PyDataset):
    def __init__(self, loader, rescale=None, dtype="float32", **kwargs):
        kwargs.setdefault("workers", 1)
        kwargs.setdefault("use_multiprocessing", False)
        if kwargs["workers"] != 1 or kwargs["use_multiprocessing"]:
            raise ValueError("convflow.keras.PyDataset streams in order: workers=1, use_multiprocessing=False "
                             "(convflow decodes and augments on its own threads)")
        super().__init__(**kwargs)
        self.loader = loader
        self.rescale = rescale
        self.dtype = dtype
        self._it = None
        self._served = 0  # batches of the current epoch handed to Keras
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.loader)

    def __getitem__(self, index):
        with self._lock:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                x, y = next(self._it)
            except StopIteration:
                self._it = iter(self.loader)
                x, y = next(self._it)
            self._served += 1
        x = x.astype(self.dtype)
        if self.rescale is not None:
            x *= self.rescale
        return x, y

    def on_epoch_begin(self):
        with self._lock:
            if self._served >= len(self.loader):
                self.loader.set_epoch(self.loader.epoch + 1)
            self._served = 0
            self._it = None

    def on_epoch_end(self):
        with self._lock:
            self._it = None
