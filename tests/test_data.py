import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dfm_cli.data import ANIMAL_CLASSES, ImageFolder, StreamBatches, _NumpyOnly, animal_mnist, build_dataset
from dfm_cli.errors import DfmError


def test_animal_mnist_is_real_balanced_and_padded():
    ds = animal_mnist(32)
    assert len(ds) == 10000 and ds.channels == 1 and ds.class_names == ANIMAL_CLASSES
    x, y = ds.__getitems__([0, 1, 2])
    assert x.shape == (3, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert (x[:, :, :2] == -1).all()  # the 28 -> 32 padding is background
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert animal_mnist(16).images.shape[-1] == 16


def test_only_numpy_arrays_can_be_unpickled(tmp_path):
    import io
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnly(io.BytesIO(pickle.dumps(print))).load()
    arr = np.arange(5)
    assert (_NumpyOnly(io.BytesIO(pickle.dumps(arr))).load() == arr).all()


def test_image_folder(tmp_path):
    for c, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * (c + i), np.uint8)).save(tmp_path / name / f"{i}.png")
    ds = build_dataset("folder", str(tmp_path), 16)
    assert len(ds) == 6 and ds.class_names == ("cats", "dogs") and ds.channels == 3
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and int(y) == 1
    assert torch.allclose(x, torch.full_like(x, 40 * 2 / 127.5 - 1), atol=1e-2)
    with pytest.raises(DfmError, match="no images"):
        ImageFolder(tmp_path / "cats", 16)
    with pytest.raises(DfmError, match="not a folder"):
        ImageFolder(tmp_path / "missing", 16)


def test_stream_order_is_a_permutation_per_epoch_and_resumes_exactly():
    full = StreamBatches(10, 4, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(6)]
    stream = sum(batches, [])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    late = iter(StreamBatches(10, 4, seed=3, start_batch=4))
    assert [next(late), next(late)] == batches[4:6]
    assert next(iter(StreamBatches(10, 4, seed=4))) != batches[0]
