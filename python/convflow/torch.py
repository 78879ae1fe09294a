"""`convflow.torch`: a Loader's batches as torch tensors. Imports torch when
this module is imported (never by `import convflow`).

    ds = convflow.torch.IterableDataset(loader, channels_first=True, scale=1/255)
    dl = torch.utils.data.DataLoader(ds, batch_size=None)   # batches are made by convflow
    for epoch in range(30):
        ds.set_epoch(epoch)
        for x, y in dl: ...

Tensors share the loader's buffers (`torch.from_numpy`, no copy) unless a
dtype change, `scale` or pinning needs one. Use `num_workers=0`: convflow
decodes and augments on its own threads, and a DataLoader worker would get
a copy of the whole stream.
"""

import torch
import torch.utils.data


def tensors(x, y, channels_first=False, dtype=None, scale=None, pin_memory=False):
    """One batch from numpy to torch: NHWC -> NCHW with `channels_first`
    (a view), `dtype` / `scale` (e.g. torch.float32, 1/255)."""
    tx = torch.from_numpy(x)
    if dtype is not None or scale is not None:
        tx = tx.to(dtype or torch.float32)
        if scale is not None:
            tx.mul_(scale)
    if channels_first and tx.dim() == 4:
        tx = tx.permute(0, 3, 1, 2)
    ty = None if y is None else torch.from_numpy(y)
    if pin_memory:
        tx = tx.pin_memory()
        ty = None if ty is None else ty.pin_memory()
    return tx, ty


class IterableDataset(torch.utils.data.IterableDataset):
    """A Loader as an IterableDataset of whole batches (DataLoader with
    `batch_size=None`, `num_workers=0`). With Lightning, call
    `ds.set_epoch(self.current_epoch)` in `on_train_epoch_start` (an
    IterableDataset has no sampler for Lightning to set the epoch on), and
    save `ds.state_dict()` in a checkpoint hook to resume mid-epoch."""

    def __init__(self, loader, channels_first=False, dtype=None, scale=None, pin_memory=False):
        super().__init__()
        self.loader = loader
        self.options = dict(channels_first=channels_first, dtype=dtype, scale=scale, pin_memory=pin_memory)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError("convflow.torch.IterableDataset: use DataLoader(num_workers=0); convflow decodes on "
                               "its own threads and each worker would stream every batch")
        for x, y in self.loader:
            yield tensors(x, y, **self.options)
