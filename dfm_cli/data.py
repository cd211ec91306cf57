"""Data sources and a resumable, deterministic order over them.

- `animal-mnist`: 10,000 real 28×28 animal silhouettes in 10 classes that ship inside the
  `animal-mnist` wheel; padded to 32×32 (resized if another resolution is asked for).
- `folder`: an ImageNet-layout folder (one subfolder per class), centre-cropped and resized.

Images come out as float tensors in [-1, 1]. The order is a fixed function of the seed and
the position in the stream (EDM2-style), so resuming at step k reads exactly the batches an
uninterrupted run would have read: no sampler state needs saving.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from dfm_cli.errors import DfmError
from dfm_cli.media import adm_center_crop
from dfm_cli.seeding import DATA_ORDER, mix_seed

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class ImageDataset(Dataset):
    """A labelled set: `(image in [-1, 1] as C H W or video as C T H W, label)` items."""

    shape: tuple[int, ...]
    class_names: tuple[str, ...]

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class TensorImages(ImageDataset):
    """Images (or clips) held in memory as uint8; batches are gathered with one index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...]):
        self.images, self.labels, self.class_names = images, labels, class_names
        self.shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].float() / 127.5 - 1, self.labels[i]

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx].float() / 127.5 - 1, self.labels[idx]


class _NumpyOnly(pickle.Unpickler):
    """The wheel's data is a pickled numpy array; allow nothing but numpy's array rebuilders."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy 2 moved it
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def animal_mnist(resolution: int = 32) -> TensorImages:
    """The 10,000 animal-mnist silhouettes, padded 28 → 32 and resized to `resolution`."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DfmError(
            "the animal-mnist data is not installed; run "
            "`pip install --no-deps animal-mnist==0.4` (--no-deps: it declares tensorflow)"
        )
    root = Path(spec.submodule_search_locations[0]) / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(root / name, "rb") as fh:
            arrays.append(_NumpyOnly(fh).load())
    images = torch.from_numpy(np.ascontiguousarray(arrays[0]))[:, None]
    images = F.pad(images, (2, 2, 2, 2))
    if resolution != 32:
        images = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear",
                               antialias=True, align_corners=False).round().clamp(0, 255).byte()
    return TensorImages(images, torch.from_numpy(arrays[1].astype(np.int64)), ANIMAL_CLASSES)


class ImageFolder(ImageDataset):
    """ImageNet layout: `root/<class>/<image>`; classes are the sorted subfolder names.
    Images are centre-cropped and resized as ADM does."""

    def __init__(self, root: str | Path, resolution: int):
        self.root, self.resolution = Path(root), resolution
        if not self.root.is_dir():
            raise DfmError(f"data.path {str(root)!r} is not a folder; point it at a folder of class subfolders")
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.items = [
            (f, c) for c, name in enumerate(classes) for f in sorted((self.root / name).rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.items:
            raise DfmError(
                f"data.path {str(root)!r} holds no images in class subfolders "
                f"(expected {root}/<class>/<image>.png)"
            )
        self.class_names = tuple(classes)
        with Image.open(self.items[0][0]) as im:
            self.shape = (1 if im.mode in ("L", "I", "I;16", "1") else 3, resolution, resolution)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.items[i]
        with Image.open(path) as im:
            im = adm_center_crop(im.convert("L" if self.channels == 1 else "RGB"), self.resolution)
            arr = np.asarray(im, dtype=np.float32).reshape(self.resolution, self.resolution, -1)
        return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1, torch.tensor(label)


PHOTO_CLASSES = ("china", "flower")


def photo_crops(resolution: int = 32, num: int = 10000, seed: int = 0) -> TensorImages:
    """Random square crops of the two real photos that ship inside scikit-learn.

    Each crop takes a side drawn log-uniformly from [resolution, 4 * resolution] (capped by
    the photo), a uniform position and a coin-flip mirror, and is resized with antialiasing.
    The label is the photo. The crops are a fixed function of `(resolution, num, seed)`, so a
    run and its evaluation reference see the same images. Natural-image statistics (a 1/f
    spectrum, texture at every scale) are what DFM's decomposition is meant for; silhouettes
    are not.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DfmError("data.name = 'photo-crops' needs scikit-learn, which ships the photos; "
                       "run `pip install scikit-learn`")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    rng = np.random.default_rng(seed)
    photos = [Image.open(folder / f"{name}.jpg").convert("RGB") for name in PHOTO_CLASSES]
    out = np.empty((num, 3, resolution, resolution), dtype=np.uint8)
    labels = rng.integers(0, len(photos), size=num)
    for i, label in enumerate(labels):
        photo = photos[label]
        biggest = min(photo.size)
        side = int(round(np.exp(rng.uniform(np.log(resolution), np.log(min(4 * resolution, biggest))))))
        x = int(rng.integers(0, photo.size[0] - side + 1))
        y = int(rng.integers(0, photo.size[1] - side + 1))
        crop = photo.crop((x, y, x + side, y + side)).resize((resolution, resolution), Image.Resampling.BICUBIC,
                                                             reducing_gap=None)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop).transpose(2, 0, 1)
    return TensorImages(torch.from_numpy(out), torch.from_numpy(labels.astype(np.int64)), PHOTO_CLASSES)


def sprites(resolution: int, frames: int, num: int = 1024) -> TensorImages:
    """The synthetic moving-sprite clips (see `sources.sprite_clip`), in memory."""
    from dfm_cli.sources import SPRITE_CLASSES, sprite_clip

    clips = [sprite_clip(i, frames, resolution) for i in range(num)]
    video = torch.from_numpy(np.stack([c for c, _ in clips])).permute(0, 4, 1, 2, 3).contiguous()
    return TensorImages(video, torch.tensor([label for _, label in clips]), SPRITE_CLASSES)


def build_dataset(name: str, path: str, resolution: int, frames: int = 0) -> Dataset:
    """`data.name`: animal-mnist, photo-crops, folder (ImageNet layout), store (from `dfm encode`), sprites."""
    if name == "animal-mnist":
        return animal_mnist(resolution)
    if name == "photo-crops":
        return photo_crops(resolution)
    if name == "sprites":
        return sprites(resolution, frames or 8)
    if name == "store":
        from dfm_cli.store import LatentStore

        return LatentStore(path)
    return ImageFolder(path, resolution)


class StreamBatches(Sampler[list[int]]):
    """This rank's share of the batches of an endless stream of epochs, each a seeded
    permutation of the dataset.

    Item i of the stream is `perm(epoch = i // n)[i % n]`. Global batch k covers items
    `[k B, (k + 1) B)`, and rank r of W takes the r-th contiguous B / W of them. Starting at
    `start_batch` therefore resumes exactly, for any W that divides B.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.start_batch = n, batch_size, seed, start_batch
        self.rank, self.local = rank, batch_size // world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(mix_seed(self.seed, DATA_ORDER, epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start_batch
        while True:
            first = k * self.batch_size + self.rank * self.local
            yield [int(self._perm(i // self.n)[i % self.n]) for i in range(first, first + self.local)]
            k += 1
