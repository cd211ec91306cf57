"""Latent stores: what `dfm encode` writes and `dfm train` reads, memory-mapped.

A store is a folder:
- `shard-00000.safetensors`, …: `latents` (`n C [T] H W`, float32), `labels` (`n`), and
  `latents_flip` when a flip augmentation was stored;
- `index.json`: shard sizes, latent shape, class names, the autoencoder config, the source
  and resolution, and per-level statistics of the decomposed latents;
- `report.json`: the files that could not be read, and why.

Shard k holds source items `[k S, (k + 1) S)` minus unreadable ones, so shards are a fixed
function of the source: a re-run skips finished shards and writes the rest byte-identically,
and torchrun ranks split shards by `k % world`. A shard is written to a temporary name and
renamed, so an interrupted or failed (`--strict`) encode never leaves a partial shard.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from dfm_cli import distributed
from dfm_cli.decompose import LaplacianPyramid
from dfm_cli.errors import DfmError

INDEX, REPORT = "index.json", "report.json"


class EncodeFailed(DfmError):
    """`--strict` and an unreadable source file."""


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _collate(items):
    return items


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 `H W C` / `T H W C` → float `C H W` / `C T H W` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(array)).float() / 127.5 - 1
    return x.permute(2, 0, 1) if x.ndim == 3 else x.permute(3, 0, 1, 2)


def encode_store(source: Dataset, ae, out: Path, shard_size: int, flip: bool, strict: bool,
                 ctx: distributed.Context, meta: dict[str, Any], pyramid: LaplacianPyramid, workers: int = 0,
                 batch: int = 16, on_items: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Encode `source` into shards under `out`; rank 0 writes the index, with the per-level
    statistics of the latents under `pyramid`. Returns the index."""
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-len(source) // shard_size)
    failures: list[dict[str, str]] = []
    for k in range(ctx.rank, num_shards, ctx.world):
        target = out / _shard_name(k)
        span = range(k * shard_size, min(len(source), (k + 1) * shard_size))
        if target.exists():
            on_items(len(span))
            continue
        loader = DataLoader(torch.utils.data.Subset(source, list(span)), batch_size=batch, num_workers=workers,
                            collate_fn=_collate)
        latents, flipped, labels = [], [], []
        for items in loader:
            good = [it for it in items if not it.error]
            for it in items:
                if it.error:
                    if strict:
                        raise EncodeFailed(f"{it.name}: {it.error} (--strict; no partial shard was written)")
                    failures.append({"file": it.name, "error": it.error})
            if good:
                x = torch.stack([_to_tensor(it.array) for it in good])
                latents.append(ae.encode(x).float().cpu())
                if flip:
                    flipped.append(ae.encode(x.flip(-1)).float().cpu())
                labels += [it.label for it in good]
            on_items(len(items))
        tensors = {"labels": torch.tensor(labels, dtype=torch.long)}
        if latents:
            tensors["latents"] = torch.cat(latents)
            if flip:
                tensors["latents_flip"] = torch.cat(flipped)
        tmp = out / f".tmp-{_shard_name(k)}"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, target)
    all_failures = distributed.gather_objects(ctx, failures)
    distributed.barrier(ctx)
    index: dict[str, Any] = {}
    if ctx.main:
        shards, shape = [], None
        for k in range(num_shards):
            header = _header(out / _shard_name(k))
            count = header["labels"]["shape"][0]
            shards.append({"file": _shard_name(k), "count": count})
            if count:
                shape = header["latents"]["shape"][1:]
        if shape is None:
            raise DfmError(f"{out}: no readable item in the source; see {out / REPORT}")
        index = {"version": 1, "num": sum(s["count"] for s in shards), "shape": shape, "flip": flip,
                 "shards": shards, "autoencoder": ae.config(), **meta}
        report = [f for per_rank in all_failures for f in per_rank]
        previous = json.loads((out / REPORT).read_text()) if (out / REPORT).is_file() else []
        report = previous + [f for f in report if f not in previous]
        (out / REPORT).write_text(json.dumps(report, indent=1))
        (out / INDEX).write_text(json.dumps(index, indent=1))
        index["level_stats"] = level_statistics(LatentStore(out), pyramid)
        (out / INDEX).write_text(json.dumps(index, indent=1))
    distributed.barrier(ctx)
    return index


def _header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header["__offset__"] = 8 + n
    return header


_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64}


class LatentStore(Dataset):
    """A store as a dataset of `(latent, label)`; shards are memory-mapped, never loaded whole.

    With a flip augmentation stored, item i's flipped copy is item `num + i`.
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
        counts = [s["count"] for s in self.index["shards"]]
        self.starts = np.cumsum([0] + counts)
        self.num = int(self.starts[-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num * (2 if self.index.get("flip") else 1)

    def _map(self, shard: str, key: str) -> np.ndarray:
        if (shard, key) not in self._maps:
            header = _header(self.root / shard)
            info = header[key]
            begin, end = info["data_offsets"]
            self._maps[(shard, key)] = np.memmap(self.root / shard, dtype=_DTYPES[info["dtype"]], mode="r",
                                                 offset=header["__offset__"] + begin, shape=tuple(info["shape"]))
        return self._maps[(shard, key)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        flip, j = divmod(i, self.num)
        k = int(np.searchsorted(self.starts, j, side="right") - 1)
        shard = self.index["shards"][k]["file"]
        local = j - int(self.starts[k])
        latent = self._map(shard, "latents_flip" if flip else "latents")[local]
        label = self._map(shard, "labels")[local]
        return torch.from_numpy(np.array(latent)), torch.tensor(int(label))


def level_statistics(data: Dataset, pyramid: LaplacianPyramid, limit: int = 4096, batch: int = 256) -> dict[str, Any]:
    """Mean and std per level and channel of the decomposed data (first `limit` items)."""
    n = min(limit, len(data))
    sums = sq = None
    count = torch.zeros(pyramid.levels, dtype=torch.float64)
    for start in range(0, n, batch):
        x = torch.stack([data[i][0] for i in range(start, min(n, start + batch))]).double()
        levels = pyramid.decompose(x)
        dims = [0] + list(range(2, x.ndim))
        s = torch.stack([lv.sum(dims) for lv in levels])
        q = torch.stack([(lv**2).sum(dims) for lv in levels])
        sums, sq = (s, q) if sums is None else (sums + s, sq + q)
        count += torch.tensor([lv.numel() / lv.shape[1] for lv in levels], dtype=torch.float64)
    mean = sums / count[:, None]
    std = (sq / count[:, None] - mean**2).clamp_min(1e-12).sqrt()
    return {"levels": pyramid.levels, "factors": pyramid.factors, "temporal_factors": pyramid.temporal_factors,
            "mean": mean.tolist(), "std": std.tolist(), "items": n}
