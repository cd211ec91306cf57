"""Raw media sources for `dfm encode` and for pixel-space video training.

Every source is a map-style dataset of `Item`s. An item that cannot be read (a corrupt
image, an empty file, a video too short for the clip) comes back with `error` set instead of
raising, so one bad file never stops an encode of a million good ones.

- `images`: a folder with class subfolders, or any folder plus a labels file
  (`relative/path,label` per line);
- `videos`: a folder of mp4/gif/webm (class subfolders as labels), one clip of `frames`
  frames per file, every `stride`-th frame (or resampled to `fps` where the file says its fps);
- `animal-mnist`: the built-in images;
- `sprites`: synthetic clips of coloured shapes moving over a textured background, the
  class being the shape. No real video data exists offline, so this is the video quickstart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dfm_cli.data import ANIMAL_CLASSES, IMAGE_EXTENSIONS, animal_mnist
from dfm_cli.errors import DfmError
from dfm_cli.media import VIDEO_SUFFIXES, adm_center_crop

SPRITE_CLASSES = ("square", "disc", "cross", "triangle")


@dataclass
class Item:
    """One sample: uint8 `H W C` or `T H W C`, its label, where it came from, or why not."""

    array: np.ndarray | None
    label: int
    name: str
    error: str = ""


def _labelled_files(root: Path, suffixes: set[str], labels_file: Path | None) -> tuple[list, tuple[str, ...]]:
    if not root.is_dir():
        raise DfmError(f"{root} is not a folder; point SOURCE at a folder (class subfolders) or a built-in dataset")
    if labels_file is not None:
        if not labels_file.is_file():
            raise DfmError(f"--labels {labels_file}: no such file (expected 'relative/path,label' per line)")
        rows = [line.rsplit(",", 1) for line in labels_file.read_text().splitlines() if line.strip()]
        if any(len(r) != 2 for r in rows):
            raise DfmError(f"--labels {labels_file}: every line must be 'relative/path,label'")
        names = tuple(sorted({label.strip() for _, label in rows}))
        return [(root / path.strip(), names.index(label.strip())) for path, label in rows], names
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes:
        files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*")) if f.is_file()]
    else:
        files, classes = [(f, 0) for f in sorted(root.rglob("*")) if f.is_file()], ["all"]
    files = [(f, c) for f, c in files if not f.name.startswith(".")]
    if not files:
        raise DfmError(f"{root}: no files found")
    return files, tuple(classes)


class ImageFiles(Dataset):
    """Images from a folder, ADM centre-cropped to `resolution`; RGB."""

    def __init__(self, root: Path, resolution: int, labels_file: Path | None = None):
        self.files, self.class_names = _labelled_files(root, IMAGE_EXTENSIONS, labels_file)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item:
        path, label = self.files[i]
        try:
            with Image.open(path) as im:
                array = np.asarray(adm_center_crop(im.convert("RGB"), self.resolution))
        except Exception as e:  # PIL raises many types for broken files
            return Item(None, label, str(path), f"{type(e).__name__}: {str(e)[:120] or 'unreadable'}")
        return Item(array, label, str(path))


class VideoFiles(Dataset):
    """One clip of `frames` frames per video file, ADM centre-cropped per frame; RGB."""

    def __init__(self, root: Path, resolution: int, frames: int, stride: int = 1, fps: float = 0.0,
                 labels_file: Path | None = None):
        files, self.class_names = _labelled_files(root, VIDEO_SUFFIXES, labels_file)
        self.files = files
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
                    clip.append(np.asarray(adm_center_crop(Image.fromarray(np.asarray(frame)).convert("RGB"),
                                                           self.resolution)))
                if len(clip) == self.frames:
                    break
            if len(clip) < self.frames:
                raise ValueError(f"only {len(clip)} frames at stride {step}, need {self.frames}")
        except Exception as e:  # imageio/ffmpeg raise many types for broken files
            return Item(None, label, str(path), f"{type(e).__name__}: {str(e)[:120] or 'unreadable'}")
        return Item(np.stack(clip), label, str(path))


class AnimalMnist(Dataset):
    def __init__(self, resolution: int):
        self.data = animal_mnist(resolution)
        self.class_names = ANIMAL_CLASSES

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Item:
        return Item(self.data.images[i].permute(1, 2, 0).numpy(), int(self.data.labels[i]), f"animal-mnist/{i}")


def sprite_clip(index: int, frames: int, size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Clip `index` of the synthetic set: `T H W 3` uint8 and its class (the shape)."""
    rng = np.random.default_rng([seed, index])
    label = index % len(SPRITE_CLASSES)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi, 2)
    background = 0.35 + 0.15 * np.sin(2 * np.pi * (xx * rng.integers(1, 4)) + phase[0])[..., None] \
        * np.array([1.0, 0.8, 0.6]) + 0.1 * np.cos(2 * np.pi * yy * rng.integers(1, 4) + phase[1])[..., None]
    color = rng.uniform(0.5, 1.0, 3)
    radius = rng.uniform(0.12, 0.2)
    pos, vel = rng.uniform(radius, 1 - radius, 2), rng.uniform(-0.06, 0.06, 2)
    clip = []
    for _ in range(frames):
        dy, dx = yy - pos[0], xx - pos[1]
        mask = {
            "square": (np.abs(dy) < radius) & (np.abs(dx) < radius),
            "disc": dy**2 + dx**2 < radius**2,
            "cross": ((np.abs(dy) < radius / 3) & (np.abs(dx) < radius)) | ((np.abs(dx) < radius / 3) & (np.abs(dy) < radius)),
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


class Sprites(Dataset):
    def __init__(self, num: int, frames: int, resolution: int, seed: int = 0):
        self.num, self.frames, self.resolution, self.seed = num, frames, resolution, seed
        self.class_names = SPRITE_CLASSES

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> Item:
        clip, label = sprite_clip(i, self.frames, self.resolution, self.seed)
        return Item(clip, label, f"sprites/{i}")


def build_source(spec: str, resolution: int, frames: int = 0, stride: int = 1, fps: float = 0.0,
                 labels_file: Path | None = None, num: int = 2000) -> Dataset:
    """SOURCE of `dfm encode`: a folder (images, or videos with `frames`), or a built-in set."""
    if spec == "animal-mnist":
        return AnimalMnist(resolution)
    if spec == "sprites":
        return Sprites(num, frames or 8, resolution)
    if frames:
        return VideoFiles(Path(spec), resolution, frames, stride, fps, labels_file)
    return ImageFiles(Path(spec), resolution, labels_file)
