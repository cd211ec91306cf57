"""What `dfm encode` reads: one `Item` per image or clip, from a folder or a built-in dataset.

An item that cannot be read (a corrupt image, an empty file, a video too short for the clip)
comes back with `error` set instead of raising, so one bad file never stops an encode of a
million good ones.

- a folder of images, or of videos (with `frames`: one clip of `frames` frames per file, every
  `stride`-th frame, or resampled to `fps` where the file says its fps), listed by
  `data.list_files` (class subfolders, or a labels file of `relative/path,label` lines);
- a built-in dataset (`data.BUILTIN`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dfm_cli.data.autoencoders import build_autoencoder
from dfm_cli.data.datasets import BUILTIN, ImageDataset, builtin
from dfm_cli.data.encode import EncodeSettings, EncodeSource
from dfm_cli.errors import DfmError
from dfm_cli.listing import IMAGE_EXTENSIONS, list_files
from dfm_cli.media import VIDEO_SUFFIXES, adm_center_crop


@dataclass
class Item:
    """One sample: uint8 `H W C` or `T H W C`, its label, where it came from, or why not."""

    array: np.ndarray | None
    label: int
    name: str
    error: str = ""


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:120] or 'unreadable'}"


class ImageFiles(EncodeSource):
    """Images from a folder, ADM centre-cropped to `resolution`; RGB."""

    channels = 3

    def __init__(self, root: Path, resolution: int, labels_file: Path | None = None):
        listing = list_files(root, IMAGE_EXTENSIONS, labels_file, what="SOURCE")
        self.files, self.class_names, self.digest = listing.files, listing.class_names, listing.digest(Path(root))
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item:
        path, label = self.files[i]
        try:
            with Image.open(path) as im:
                array = np.asarray(adm_center_crop(im.convert("RGB"), self.resolution))
        except Exception as e:  # PIL raises many types for broken files
            return Item(None, label, str(path), _reason(e))
        return Item(array, label, str(path))


class VideoFiles(EncodeSource):
    """One clip of `frames` frames per video file, ADM centre-cropped per frame; RGB."""

    channels = 3

    def __init__(
        self,
        root: Path,
        resolution: int,
        frames: int,
        stride: int = 1,
        fps: float = 0.0,
        labels_file: Path | None = None,
    ):
        listing = list_files(root, VIDEO_SUFFIXES, labels_file, what="SOURCE")
        self.files, self.class_names, self.digest = listing.files, listing.class_names, listing.digest(Path(root))
        self.resolution, self.frames, self.stride, self.fps = resolution, frames, stride, fps

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item:
        import imageio.v3 as iio

        path, label = self.files[i]
        try:
            step = self.stride
            if self.fps:
                source_fps = iio.immeta(path).get("fps") or self.fps
                step = max(1, round(source_fps / self.fps))
            clip = []
            for k, frame in enumerate(iio.imiter(path)):
                if k % step == 0:
                    clip.append(
                        np.asarray(adm_center_crop(Image.fromarray(np.asarray(frame)).convert("RGB"), self.resolution))
                    )
                if len(clip) == self.frames:
                    break
            if len(clip) < self.frames:
                raise ValueError(f"only {len(clip)} frames at stride {step}, need {self.frames}")
        except Exception as e:  # imageio/ffmpeg raise many types for broken files
            return Item(None, label, str(path), _reason(e))
        return Item(np.stack(clip), label, str(path))


class BuiltinItems(EncodeSource):
    """A built-in dataset as items; its files are generated, so they can always be read."""

    def __init__(self, name: str, data: ImageDataset):
        self.name, self.data = name, data
        self.class_names, self.channels = data.class_names, data.channels
        self.digest = ""

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Item:
        array, label = self.data.raw(i)
        return Item(array, label, f"{self.name}/{i}")


def build_source(
    spec: str,
    resolution: int,
    frames: int = 0,
    stride: int = 1,
    fps: float = 0.0,
    labels_file: Path | None = None,
    num: int = 0,
) -> EncodeSource:
    """SOURCE of `dfm encode`: a built-in dataset name, or a folder of images (or of videos,
    with `frames`). Every source says its `channels` and `class_names`, and a `digest` of its
    listing (empty for a built-in set, which its name and `num` fix)."""
    if spec in BUILTIN:
        if labels_file is not None:
            raise DfmError(f"--labels applies to a folder SOURCE; {spec} is a built-in dataset with its own labels")
        return BuiltinItems(spec, builtin(spec, resolution, frames, num))
    if not Path(spec).exists():
        raise DfmError(f"SOURCE {spec!r}: no such folder, and not a built-in dataset ({', '.join(BUILTIN)})")
    if frames:
        return VideoFiles(Path(spec), resolution, frames, stride, fps, labels_file)
    return ImageFiles(Path(spec), resolution, labels_file)


def open_encode(settings: EncodeSettings, device: torch.device = torch.device("cpu")) -> tuple[EncodeSource, Any]:
    """The source and the autoencoder of one `dfm encode`; the autoencoder takes as many
    channels as the source has (1 for animal-mnist, 3 for everything else)."""
    s = settings
    source = build_source(s.source, s.resolution, s.frames, s.stride, s.fps, s.labels, s.num)
    return source, build_autoencoder(s.ae, s.ae_weights, source.channels, device)
