"""Reading a latent store (what `dfm encode` writes, see `store.py`): a dataset of latents and
labels, or of latents and encoded captions, memory-mapped shard by shard."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dfm_cli.errors import DfmError
from dfm_cli.method.cond import TextCond

INDEX, NULL_TEXT = "index.json", "null_text.safetensors"


def read_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header["__offset__"] = 8 + n
    return header


_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64, "BOOL": np.bool_}


class LatentStore(Dataset):
    """A store as a dataset of `(latent, label)`; shards are memory-mapped, never loaded whole.

    With a flip augmentation stored, item i's flipped copy is item `num + i` (same caption).
    A store encoded with captions (`text`) gives batches of `(latents, TextCond)` instead.
    The first time a process opens a shard it checks the shard's SHA-256 and shapes against
    `index.json` (once per shard and process, not on every read): a damaged or swapped shard
    is one line naming it and the command that repairs the store.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / INDEX).is_file():
            raise DfmError(f"{root}: not a latent store (no {INDEX}); write one with `dfm encode SOURCE --out {root}`")
        self.index = json.loads((self.root / INDEX).read_text())
        self.shape = tuple(self.index["shape"])
        self.channels = self.shape[0]
        self.class_names = tuple(self.index.get("class_names", ()))
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        self._checked: set[str] = set()  # shards verified in this process
        counts = [s["count"] for s in self.index["shards"]]
        self.starts = np.cumsum([0] + counts)
        self.num = int(self.starts[-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num * (2 if self.index.get("flip") else 1)

    def _verify(self, shard: str) -> None:
        """Check `shard` against its `index.json` entry: digest, then count and shapes."""
        entry = next(s for s in self.index["shards"] if s["file"] == shard)
        path, count = self.root / shard, entry["count"]
        try:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            why = ""
            if "sha256" in entry and h.hexdigest() != entry["sha256"]:
                why = f"its SHA-256 is {h.hexdigest()[:12]}…, the index records {entry['sha256'][:12]}…"
            else:
                header = read_header(path)
                want = {"labels": [count], "latents": [count, *self.shape]}
                if self.index.get("flip"):
                    want["latents_flip"] = [count, *self.shape]
                for key, shape in want.items():
                    got = header.get(key, {}).get("shape")
                    if got != shape:
                        why = f"its {key} have shape {got}, the index says {shape}"
                        break
        except (OSError, ValueError, struct.error, AttributeError) as e:
            why = f"it cannot be read ({getattr(e, 'strerror', None) or e})"
        if why:
            raise DfmError(f"{path}: does not match {INDEX} ({why}); repair the store with `{self._repair()}`")
        self._checked.add(shard)

    def _repair(self) -> str:
        """The `dfm encode` command that writes this store again (its main flags, from the manifest)."""
        m = self.index.get("manifest", {})
        flags = [f"dfm encode {self.index.get('source') or m.get('source') or 'SOURCE'} --out {self.root}"]
        ae = (self.index.get("autoencoder") or {}).get("name", "pixel")
        for flag, value, default in (
            ("--ae", ae, "pixel"),
            ("--resolution", self.index.get("resolution"), 256),
            ("--frames", self.index.get("frames"), 0),
            ("--shard-size", m.get("shard_size"), 1024),
            ("--num-clips", m.get("num"), 0),
        ):
            if value not in (None, default):
                flags.append(f"{flag} {value}")
        if self.index.get("flip"):
            flags.append("--flip")
        return " ".join(flags) + " --overwrite"

    def _map(self, shard: str, key: str) -> np.ndarray:
        if shard not in self._checked:
            self._verify(shard)
        if (shard, key) not in self._maps:
            header = read_header(self.root / shard)
            info = header[key]
            begin, end = info["data_offsets"]
            self._maps[(shard, key)] = np.memmap(
                self.root / shard,
                dtype=np.dtype(_DTYPES[info["dtype"]]),  # what memmap does with it (None: float64)
                mode="r",
                offset=header["__offset__"] + begin,
                shape=tuple(info["shape"]),
            )
        return self._maps[(shard, key)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        flip = i >= self.num
        shard, local = self._locate(i)
        latent = self._map(shard, "latents_flip" if flip else "latents")[local]
        label = self._map(shard, "labels")[local]
        return torch.from_numpy(np.array(latent)), torch.tensor(int(label))

    @property
    def text(self) -> dict[str, Any] | None:
        """The caption encoder's settings and `dims`, for a store encoded with captions."""
        return self.index.get("text")

    def _locate(self, i: int) -> tuple[str, int]:
        j = i % self.num
        k = int(np.searchsorted(self.starts, j, side="right") - 1)
        return self.index["shards"][k]["file"], j - int(self.starts[k])

    def text_rows(self, indices: Sequence[int]) -> TextCond:
        """The encoded captions of items `indices`, as float32."""
        rows = [self._locate(i) for i in indices]
        parts = [
            torch.from_numpy(np.stack([self._map(shard, f"text_{key}")[local] for shard, local in rows]))
            for key in ("tokens", "mask", "pooled")
        ]
        return TextCond(parts[0].float(), parts[1], parts[2].float())

    def null_text(self) -> TextCond:
        """The empty caption's encoding (the null condition for dropout and CFG)."""
        from safetensors.torch import load_file

        null = load_file(self.root / NULL_TEXT)
        return TextCond(null["tokens"], null["mask"], null["pooled"])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | TextCond]:
        x, y = zip(*(self[i] for i in indices))
        return torch.stack(x), self.text_rows(indices) if self.text else torch.stack(y)
