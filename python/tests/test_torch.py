"""The PyTorch adapter. torch is not in the tests' set-up (its Linux wheel
pulls the CUDA libraries, gigabytes): these tests run where torch is
installed and say why they skip elsewhere."""

import pytest

import convflow

torch = pytest.importorskip("torch", reason="torch is not installed (not part of python/tests/requirements.txt)")


def test_tensors_are_views_nchw_and_an_iterable_dataset(loader_pipeline, small_data):
    import convflow.torch as ct

    p = convflow.Pipeline(loader_pipeline, data_dir=small_data)
    loader = convflow.Loader(p, stage="augment", batch_size=8)
    x, y = next(iter(loader))
    tx, ty = ct.tensors(x, y, channels_first=True)
    assert tx.shape == (8, 3, 64, 64) and tx.data_ptr() == x.ctypes.data
    ds = ct.IterableDataset(loader, channels_first=True, scale=1 / 255)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    batches = list(dl)
    assert len(batches) == len(loader) == 7
    assert batches[0][0].dtype == torch.float32 and float(batches[0][0].max()) <= 1.0
