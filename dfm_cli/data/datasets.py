"""The data layer: built-in datasets, the folder dataset and one registry.

Built-in datasets (`BUILTIN`, the one registry that `train`, `encode` and `eval --ref` read):
- `animal-mnist`: 10,000 real 28×28 animal silhouettes in 10 classes that ship inside the
  `animal-mnist` wheel; padded to 32×32 (resized if another resolution is asked for);
- `photo-crops`: random crops of the two real photos that ship inside scikit-learn
  (`photo-crops-gray`: the same crops in one luminance channel);
- `sprites`: synthetic clips of coloured shapes moving over a textured background, the class
  being the shape (no real video data exists offline, so this is the video quickstart).

Folders (`data.name = "folder"`, `dfm encode FOLDER`, `dfm eval DIR`) are all listed by
`listing.list_files`, with one rule: class subfolders (or a labels file) give the labels, and a file
counts when its suffix is an image (or video) suffix and no part of its path is hidden.

Images come out as float tensors in [-1, 1]. The order training reads them in is `batches.py`'s.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from dfm_cli.errors import DfmError
from dfm_cli.listing import IMAGE_EXTENSIONS, evenly_spaced, list_files
from dfm_cli.media import adm_center_crop

if TYPE_CHECKING:
    from dfm_cli.data.store import LatentStore

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SPRITE_CLASSES = ("square", "disc", "cross", "triangle")


class ImageDataset(Dataset):
    """A labelled set: `(image in [-1, 1] as C H W or video as C T H W, label)` items.

    `raw(i)` gives item i as the uint8 array a file would hold (`H W C` or `T H W C`), which
    is what `dfm encode` and `dfm eval` read.
    """

    shape: tuple[int, ...]
    class_names: tuple[str, ...]

    if TYPE_CHECKING:  # every subclass has its own; `Dataset` declares none

        def __len__(self) -> int: ...

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def raw(self, i: int) -> tuple[np.ndarray, int]:
        x, label = self[i]
        return ((x + 1) * 127.5).round().clamp(0, 255).byte().movedim(0, -1).numpy(), int(label)

    def raw_all(self) -> np.ndarray:
        """Every item as one uint8 array `N H W C` (or `N T H W C`)."""
        return np.stack([self.raw(i)[0] for i in range(len(self))])


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

    def raw(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i].movedim(0, -1).numpy(), int(self.labels[i])

    def raw_all(self) -> np.ndarray:
        return self.images.movedim(1, -1).numpy()


class _NumpyOnly(pickle.Unpickler):
    """The wheel's data is a pickled numpy array; allow nothing but numpy's array rebuilders."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy 2 moved it
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def animal_mnist(resolution: int = 32, num: int = 0) -> TensorImages:
    """The 10,000 animal-mnist silhouettes, padded 28 → 32 and resized to `resolution`; with
    `num`, that many evenly spaced over the (class-sorted) set, so every class stays in."""
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
        images = (
            F.interpolate(
                images.float(), size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
            )
            .round()
            .clamp(0, 255)
            .byte()
        )
    labels = torch.from_numpy(arrays[1].astype(np.int64))
    if num and num < len(labels):
        picks = torch.from_numpy(evenly_spaced(len(labels), num))
        images, labels = images[picks], labels[picks]
    return TensorImages(images, labels, ANIMAL_CLASSES)


PHOTO_CLASSES = ("china", "flower")


def photo_crops(resolution: int = 32, num: int = 10000, seed: int = 0, gray: bool = False) -> TensorImages:
    """Random square crops of the two real photos that ship inside scikit-learn.

    Each crop takes a side drawn log-uniformly from [resolution, 4 * resolution] (capped by
    the photo), a uniform position and a coin-flip mirror, and is resized with antialiasing.
    The label is the photo. The crops are a fixed function of `(resolution, num, seed)`, so a
    run and its evaluation reference see the same images. Natural-image statistics (a 1/f
    spectrum, texture at every scale) are what DFM's decomposition is meant for; silhouettes
    are not. `gray` gives the same crops as one luminance channel (`photo-crops-gray`), so
    that a 64 px image in 8x8 patches fits a model as narrow as `DFM-T`.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DfmError(
            "data.name = 'photo-crops' needs scikit-learn, which ships the photos; run `pip install scikit-learn`"
        )
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    rng = np.random.default_rng(seed)
    photos = [Image.open(folder / f"{name}.jpg").convert("RGB") for name in PHOTO_CLASSES]
    if resolution > min(min(p.size) for p in photos):
        raise DfmError(
            f"photo-crops: resolution {resolution} is larger than the photos' short side "
            f"({min(min(p.size) for p in photos)} px); choose a smaller resolution"
        )
    out = np.empty((num, 1 if gray else 3, resolution, resolution), dtype=np.uint8)
    labels = rng.integers(0, len(photos), size=num)
    for i, label in enumerate(labels):
        photo = photos[label]
        biggest = min(photo.size)
        side = int(round(np.exp(rng.uniform(np.log(resolution), np.log(min(4 * resolution, biggest))))))
        x = int(rng.integers(0, photo.size[0] - side + 1))
        y = int(rng.integers(0, photo.size[1] - side + 1))
        crop = photo.crop((x, y, x + side, y + side)).resize(
            (resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None
        )
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop.convert("L"))[None] if gray else np.asarray(crop).transpose(2, 0, 1)
    return TensorImages(torch.from_numpy(out), torch.from_numpy(labels.astype(np.int64)), PHOTO_CLASSES)


def sprite_clip(index: int, frames: int, size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Clip `index` of the synthetic set: `T H W 3` uint8 and its class (the shape)."""
    rng = np.random.default_rng([seed, index])
    label = index % len(SPRITE_CLASSES)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi, 2)
    background = (
        0.35
        + 0.15 * np.sin(2 * np.pi * (xx * rng.integers(1, 4)) + phase[0])[..., None] * np.array([1.0, 0.8, 0.6])
        + 0.1 * np.cos(2 * np.pi * yy * rng.integers(1, 4) + phase[1])[..., None]
    )
    color = rng.uniform(0.5, 1.0, 3)
    radius = rng.uniform(0.12, 0.2)
    pos, vel = rng.uniform(radius, 1 - radius, 2), rng.uniform(-0.06, 0.06, 2)
    clip = []
    for _ in range(frames):
        dy, dx = yy - pos[0], xx - pos[1]
        mask = {
            "square": (np.abs(dy) < radius) & (np.abs(dx) < radius),
            "disc": dy**2 + dx**2 < radius**2,
            "cross": ((np.abs(dy) < radius / 3) & (np.abs(dx) < radius))
            | ((np.abs(dx) < radius / 3) & (np.abs(dy) < radius)),
            "triangle": (dy < radius) & (dy > -radius) & (np.abs(dx) < (dy + radius) / 2),
        }[SPRITE_CLASSES[label]]
        frame = np.where(mask[..., None], color, background)
        clip.append((np.clip(frame, 0, 1) * 255).round().astype(np.uint8))
        pos = pos + vel
        for axis in range(2):  # bounce off the walls
            if not radius <= pos[axis] <= 1 - radius:
                vel[axis] = -vel[axis]
                pos[axis] = np.clip(pos[axis], radius, 1 - radius)
    return np.stack(clip), label


class SpriteClips(ImageDataset):
    """The synthetic clips, made on demand: `dfm encode sprites` at 256 px would not fit in
    memory otherwise. Training, which reads every clip each epoch, calls `in_memory()`."""

    def __init__(self, resolution: int, frames: int, num: int, seed: int = 0):
        self.resolution, self.frames, self.num, self.seed = resolution, frames, num, seed
        self.class_names = SPRITE_CLASSES
        self.shape = (3, frames, resolution, resolution)

    def __len__(self) -> int:
        return self.num

    def raw(self, i: int) -> tuple[np.ndarray, int]:
        return sprite_clip(i, self.frames, self.resolution, self.seed)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        clip, label = self.raw(i)
        return torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1, torch.tensor(label)

    def in_memory(self) -> TensorImages:
        clips = [self.raw(i) for i in range(self.num)]
        video = torch.from_numpy(np.stack([c for c, _ in clips])).permute(0, 4, 1, 2, 3).contiguous()
        return TensorImages(video, torch.tensor([label for _, label in clips]), SPRITE_CLASSES)


@dataclass(frozen=True)
class Builtin:
    """A dataset built from its name alone. `make(resolution, frames, num)`; `num = 0` means
    the dataset's own size. `class_names` are its classes (id = position), known without
    building it, so that the recipe checks can range-check `data.classes`."""

    make: Callable[[int, int, int], ImageDataset]
    channels: int
    class_names: tuple[str, ...]
    video: bool = False


BUILTIN: dict[str, Builtin] = {
    "animal-mnist": Builtin(
        lambda resolution, frames, num: animal_mnist(resolution, num), channels=1, class_names=ANIMAL_CLASSES
    ),
    "photo-crops": Builtin(
        lambda resolution, frames, num: photo_crops(resolution, num or 10000), channels=3, class_names=PHOTO_CLASSES
    ),
    "photo-crops-gray": Builtin(
        lambda resolution, frames, num: photo_crops(resolution, num or 10000, gray=True),
        channels=1,
        class_names=PHOTO_CLASSES,
    ),
    "sprites": Builtin(
        lambda resolution, frames, num: SpriteClips(resolution, frames or 8, num or 1024),
        channels=3,
        class_names=SPRITE_CLASSES,
        video=True,
    ),
}
DATA_NAMES = (*BUILTIN, "folder", "store")  # what `data.name` may be


def builtin(name: str, resolution: int, frames: int = 0, num: int = 0) -> ImageDataset:
    """The built-in dataset `name`; clips of `frames` frames for a video one.

    >>> builtin("sprites", 8, frames=2, num=3).shape
    (3, 2, 8, 8)
    """
    entry = BUILTIN[name]
    if frames and not entry.video:
        raise DfmError(
            f"{name} holds images, not video: frames = {frames} applies only to sprites or a "
            "folder of videos; set it to 0"
        )
    return entry.make(resolution, frames, num)


class UnreadableImage(DfmError):
    """A training image that cannot be read under `data.strict = true`.

    A DataLoader worker re-raises its exception in the main process as
    `type(message_with_the_worker_traceback)`; this keeps only the one line a user needs.
    """

    def __init__(self, message: str):
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class ImageFolder(ImageDataset):
    """A folder (see `list_files`), ADM centre-cropped and resized.

    An unreadable image is reported once (per process) with its path and replaced by the next
    readable item of the listing, so a batch keeps its size and stays a fixed function of the
    seed; with `strict` it stops the run instead.
    """

    def __init__(self, root: str | Path, resolution: int, strict: bool = False):
        self.root, self.resolution, self.strict = Path(root), resolution, strict
        listing = list_files(self.root, IMAGE_EXTENSIONS, what="data.path")
        self.items: Sequence[tuple[Path, int]] = listing.files
        self.class_names = listing.class_names
        self._reported: set[Path] = set()
        self.shape = (3, resolution, resolution)
        first = self._first_readable(0)
        self.shape = (1 if first[0].mode in ("L", "I", "I;16", "1") else 3, resolution, resolution)

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, i: int) -> Image.Image | None:
        """Item i decoded, or None (reported once) when the file cannot be read."""
        path = self.items[i][0]
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except Exception as e:  # PIL raises many types for broken files
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:120] or 'unreadable'}"
            if self.strict:
                raise UnreadableImage(
                    f"data.path: cannot read {path} ({reason}); data.strict = true stops "
                    "here (remove the file, or set data.strict = false to skip it)"
                ) from None
            if path not in self._reported:
                self._reported.add(path)
                print(
                    f"warning: data.path: cannot read {path} ({reason}); using the next readable image "
                    "in its place (data.strict = true stops instead)",
                    file=sys.stderr,
                    flush=True,
                )
            return None

    def _first_readable(self, i: int) -> tuple[Image.Image, int, int]:
        """Item i, or the next readable one after it (wrapping around), its label and index."""
        for j in range(i, i + len(self.items)):
            im = self._open(j % len(self.items))
            if im is not None:
                return im, self.items[j % len(self.items)][1], j % len(self.items)
        raise DfmError(f"data.path {str(self.root)!r}: none of its {len(self.items)} images can be read")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.item(i)[:2]

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Item i (or the readable one that stands in for it), its label, and its index."""
        im, label, j = self._first_readable(i)
        im = adm_center_crop(im.convert("L" if self.channels == 1 else "RGB"), self.resolution)
        arr = np.asarray(im, dtype=np.float32).reshape(self.resolution, self.resolution, -1)
        return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1, torch.tensor(label), j


def build_dataset(
    name: str, path: str, resolution: int, frames: int = 0, strict: bool = False, classes: Sequence[int] = ()
) -> ImageDataset | LatentStore:
    """`data.name`: a built-in dataset, `folder` (see `list_files`) or `store` (from `dfm encode`);
    with `classes` (`data.classes`), only the items of those classes."""
    data: ImageDataset | LatentStore
    if name in BUILTIN:
        data = builtin(name, resolution, frames)
        data = data.in_memory() if isinstance(data, SpriteClips) else data
    elif name == "store":
        from dfm_cli.data.store import LatentStore

        data = LatentStore(path)
    elif name == "folder":
        data = ImageFolder(path, resolution, strict)
    else:
        raise DfmError(f"data.name {name!r}: choose one of {', '.join(DATA_NAMES)}")
    return select_classes(data, classes) if classes else data


def select_classes(data: ImageDataset | LatentStore, classes: Sequence[int]) -> ImageDataset:
    """Only the items whose label is in `classes`. Labels keep their ids, so a model trained
    on every class conditions the same way (a finetune on a subset, paper §4.5 stand-in)."""
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise DfmError(
            f"data.classes = {list(classes)}: {bad} out of range; the data has {data.num_classes} "
            f"classes (0 to {data.num_classes - 1}: {', '.join(data.class_names)})"
        )
    if isinstance(data, TensorImages):
        keep = torch.isin(data.labels, torch.tensor(list(classes)))
        return TensorImages(data.images[keep], data.labels[keep], data.class_names)
    if isinstance(data, ImageFolder):
        data.items = [item for item in data.items if item[1] in classes]
        return data
    raise DfmError(
        "data.classes: a latent store holds the classes it was encoded with; encode a folder of only "
        "those classes instead, and leave data.classes empty"
    )
