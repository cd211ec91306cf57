"""Reading images and video into tensors, and writing tensors as files a person can look at."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image

from dfm_cli.errors import DfmError

VIDEO_SUFFIXES = {".gif", ".mp4", ".mov", ".avi", ".webm", ".mkv"}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """`N C H W` (or `N C T H W`) in [-1, 1] → uint8 with channels last (ADM layout)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(1, -1).numpy()


def as_rgb(images: np.ndarray) -> np.ndarray:
    """Channels-last grey repeated to RGB, as reference `.npz` files store it (others unchanged)."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def signed_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map a signed band to [-1, 1] symmetrically around grey, so zero detail shows as grey."""
    peak = x.abs().amax().clamp_min(1e-12)
    return x / peak


def grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile `N C H W` images in [-1, 1] into one uint8 array (`H W` or `H W 3`)."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return out[..., 0] if c == 1 else out


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's preprocessing: halve with a box filter while the short side is at least twice
    `size`, resize bicubically so the short side is `size`, then crop the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write an image grid as PNG; `scale` enlarges small images (nearest) for viewing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid(x, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)
    return path


def save_samples(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    """Images `N C H W` → a PNG grid; clips `N C T H W` → an animated grid (`.gif` or `.mp4`)."""
    path = Path(path)
    if x.ndim == 4:
        return save_grid(x, path, nrow, scale)
    if path.suffix.lower() not in (".gif", ".mp4"):
        raise DfmError(f"{path}: video samples are written as .gif or .mp4")
    frames = []
    for t in range(x.shape[2]):
        frame = grid(x[:, :, t], nrow)
        frame = np.repeat(frame[..., None], 3, -1) if frame.ndim == 2 else frame
        frame = frame.repeat(scale, 0).repeat(scale, 1)
        if path.suffix.lower() == ".mp4":  # H.264 wants sizes in multiples of 16
            pad = [(0, -frame.shape[0] % 16), (0, -frame.shape[1] % 16), (0, 0)]
            frame = np.pad(frame, pad)
        frames.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, np.stack(frames), duration=125, loop=0)
    else:
        iio.imwrite(path, np.stack(frames), fps=8)
    return path


def load_media(path: str | Path) -> torch.Tensor:
    """An image as `1 C H W` or a video (GIF, MP4, …) as `1 C T H W`, in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise DfmError(f"{path}: no such file; pass an image (PNG, JPEG) or a video (GIF, MP4)")
    is_video = path.suffix.lower() in VIDEO_SUFFIXES
    try:
        arr = np.asarray(iio.imread(path, index=None) if is_video else iio.imread(path))
    except Exception as e:  # imageio raises many types for unreadable files
        raise DfmError(f"{path}: cannot read it as an image or video ({e})") from None
    if arr.ndim == (3 if is_video else 2):  # grey: add the channel axis
        arr = arr[..., None]
    x = torch.from_numpy(arr[..., :3].astype(np.float32)) / 127.5 - 1
    return x.permute(3, 0, 1, 2)[None] if is_video else x.permute(2, 0, 1)[None]


def default_photo() -> tuple[Path, torch.Tensor]:
    """A real photo that ships inside scikit-learn (the China summer palace, 427×640)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DfmError(
            "no image given and scikit-learn (which ships the default photo) is not installed; "
            "pass an image path or `pip install scikit-learn`"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "images" / "china.jpg"
    return path, load_media(path)
