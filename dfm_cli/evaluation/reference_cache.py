"""A reference's features on disk, so that it goes through each network once.

A reference (what `dfm eval --ref` compares with, a run's training images during training,
a sweep's reference set in every cell) is scored again and again, and its features change
only with its images and with the network. So each extraction is saved as one `.npz` in a
cache folder (`default_folder()`), named by the SHA-256 of its key:

- the images exactly as they are fed to the network: the SHA-256 of their bytes, with their
  shape and dtype. The same images from an `.npz`, a folder, a built-in dataset or a training
  run share one entry; one changed pixel, another count or another resolution is another;
- the network as its `identity()` states it (`features.py`): its name, the SHA-256 of its
  weights file, the layers it returns, how it resizes and normalises, and the device type
  (CUDA and CPU kernels differ in the last bits);
- `FORMAT`, changed whenever what an entry holds changes.

The entry holds every array the network returns (float64, one row per image), so Fréchet
statistics, KID and precision/recall are computed from them exactly as from fresh features,
and its key, compared on reading. An entry that cannot be read, holds another key or has the
wrong rows is computed again (with a warning) and replaced. Entries are written to a temporary
file in the same folder and renamed into place, so an interrupted write leaves no partial
entry. Nothing deletes entries: remove the folder to reclaim the space.

Only references are cached: samples are new every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
KEY = "__dfm_cache_key__"  # the entry's key, stored next to the features


def default_folder() -> Path:
    """`$DFM_CACHE/features`, else `$XDG_CACHE_HOME/dfm/features`, else `~/.cache/dfm/features`."""
    if os.environ.get("DFM_CACHE"):
        return Path(os.environ["DFM_CACHE"]) / "features"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores a relative path
    return base / "dfm" / "features"


def describe(images: np.ndarray) -> dict[str, Any]:
    """What identifies images exactly: the SHA-256 of their bytes, with their shape and dtype."""
    data = np.ascontiguousarray(images)
    return {"sha256": hashlib.sha256(data.data).hexdigest(), "shape": list(data.shape), "dtype": str(data.dtype)}


@dataclass(frozen=True)
class Entry:
    """Where the features of `images` from one network are (or will be) saved."""

    path: Path
    key: str  # canonical JSON of what the features are of
    rows: int

    @classmethod
    def of(cls, folder: Path, images: dict[str, Any], network: dict[str, Any]) -> Entry:
        """The entry of `images` (as `describe` gives them) through `network` (its `identity()`)."""
        key = {"format": FORMAT, "features": "float64, one row per image", "images": images, "network": network}
        text = json.dumps(key, sort_keys=True)
        return cls(Path(folder) / f"{hashlib.sha256(text.encode()).hexdigest()[:40]}.npz", text, images["shape"][0])

    def read(self) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(the saved features, None), (None, None) when there are none yet, or (None, a
        one-line warning) when the entry is unusable."""
        if not self.path.is_file():
            return None, None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                key = str(data[KEY]) if KEY in data.files else None
                found = {k: data[k] for k in data.files if k != KEY}
        except Exception as e:  # a truncated or foreign file: zipfile, numpy and the OS raise many types
            return None, self._unusable(f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
        if key != self.key:
            return None, self._unusable("it was saved for other images or another network")
        bad = [k for k, v in found.items() if v.dtype != np.float64 or v.ndim != 2 or len(v) != self.rows]
        if not found or bad:
            why = f"expected float64 arrays of {self.rows} rows, found {', '.join(bad) or 'none'}"
            return None, self._unusable(why)
        return found, None

    def _unusable(self, why: str) -> str:
        return f"feature cache entry {self.path} is unusable ({why}); computing the features again"

    def write(self, features: dict[str, np.ndarray]) -> str | None:
        """Save `features` atomically; a one-line warning when the folder cannot take them."""
        tmp: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".tmp-{uuid.uuid4().hex}-{self.path.name}")  # one per writer
            with open(tmp, "xb") as fh:  # created with the umask's permissions, like any other file
                arrays = {KEY: np.array(self.key), **features}
                np.savez(fh, allow_pickle=False, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            tmp = None
        except OSError as e:
            why = e.strerror or str(e)
            return f"could not save reference features to {self.path} ({why}); they are computed again next time"
        finally:
            if tmp is not None:  # an interrupted or failed write leaves no temporary file behind
                tmp.unlink(missing_ok=True)
        return None
