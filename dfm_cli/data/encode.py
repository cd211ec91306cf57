"""Latent stores: what `dfm encode` writes and `dfm train` reads, memory-mapped.

A store is a folder:
- `manifest.json`: what produced the store (source and its listing, resolution, frames,
  autoencoder and a digest of its weights, flip, shard size, and the decomposition of the
  statistics, antialias included), written before the first shard;
- `shard-00000.safetensors`, …: `latents` (`n C [T] H W`, float32), `labels` (`n`), and
  `latents_flip` when a flip augmentation was stored; beside each, `shard-00000.json` with
  its count, shape, SHA-256 and the files it had to skip;
- `index.json`: shard sizes, latent shape, class names, the autoencoder config, the manifest,
  and per-level statistics of the decomposed latents;
- `report.json`: the files that could not be read, and why.

Shard k holds source items `[k S, (k + 1) S)` minus unreadable ones, so shards are a fixed
function of the source: a re-run reuses the finished shards and writes the rest
byte-identically, and torchrun ranks split shards by `k % world`. A re-run whose manifest
differs is refused (or starts over with `--overwrite`), and a shard is reused only when its
record verifies: right hash, count and shape. A shard is written to a temporary name and
renamed, and one with no readable item is never written, so a failed encode leaves nothing
that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from dfm_cli import distributed
from dfm_cli.data.store import INDEX, NULL_TEXT, LatentStore, read_header
from dfm_cli.data.text_encoders import Captioner, TextSettings
from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import LaplacianPyramid
from dfm_cli.method.level_stats import level_statistics

REPORT, MANIFEST = "report.json", "manifest.json"


class EncodeFailed(DfmError):
    """`--strict` and an unreadable source file."""


class EncodeSource(Dataset):
    """What `dfm encode` reads (see `sources.py`): one `Item` per index, and the data's
    `channels` and `class_names`."""

    channels: int
    class_names: tuple[str, ...]

    if TYPE_CHECKING:  # every source has its own; `Dataset` declares none

        def __len__(self) -> int: ...


@dataclass(frozen=True)
class EncodeSettings:
    """The settings of one `dfm encode`, checked when made: a bad value is a one-line error
    naming its flag, before any work starts.

    >>> EncodeSettings("sprites", Path("stores/sprites"), shard_size=0)
    Traceback (most recent call last):
    dfm_cli.errors.DfmError: --shard-size 0: must be at least 1
    """

    source: str
    out: Path
    ae: str = "pixel"
    ae_weights: str | None = None
    resolution: int = 256
    frames: int = 0
    stride: int = 1
    fps: float = 0.0
    labels: Path | None = None
    num: int = 0
    flip: bool = False
    shard_size: int = 1024
    strict: bool = False
    workers: int = 0
    batch: int = 16
    levels: int = 2
    factors: tuple[int, ...] | None = None
    temporal_factors: tuple[int, ...] | None = None
    antialias: bool = False
    overwrite: bool = False
    captions: Path | None = None  # CSV/JSONL of path,caption: store encoded captions (text conditioning)
    text: TextSettings | None = None  # the caption encoder

    def __post_init__(self) -> None:
        at_least = {
            "--shard-size": (self.shard_size, 1),
            "--batch": (self.batch, 1),
            "--resolution": (self.resolution, 1),
            "--stride": (self.stride, 1),
            "--levels": (self.levels, 1),
            "--workers": (self.workers, 0),
            "--frames": (self.frames, 0),
            "--num-clips": (self.num, 0),
        }
        for flag, (value, low) in at_least.items():
            if value < low:
                raise DfmError(f"{flag} {value}: must be at least {low}")
        if not (math.isfinite(self.fps) and self.fps >= 0):
            raise DfmError(f"--fps {self.fps}: must be 0 (off) or a positive frame rate")
        if (self.captions is None) != (self.text is None):
            raise DfmError(
                "--captions FILE and --text-encoder go together: the captions are encoded into the store"
                if self.captions is None
                else "--captions needs --text-encoder (clip, t5 or clip+t5) "
                "and its local weights (--clip-weights / --t5-weights)"
            )
        if self.out.exists() and not self.out.is_dir():
            raise DfmError(f"--out {self.out} is a file; pass a folder for the store")
        self.decomposition()  # bad --levels/--factors fail here

    def decomposition(self) -> LaplacianPyramid:
        """The decomposition the stored per-level statistics are computed under."""
        try:
            return LaplacianPyramid(self.levels, self.factors, self.temporal_factors, antialias=self.antialias)
        except DfmError as e:
            raise DfmError(f"--levels {self.levels} / --factors / --temporal-factors: {e}") from None


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _record_name(k: int) -> str:
    return f"shard-{k:05d}.json"


def _collate(items):
    return items


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 `H W C` / `T H W C` → float `C H W` / `C T H W` in [-1, 1]."""
    x = torch.tensor(np.ascontiguousarray(array)).float() / 127.5 - 1  # a copy: PIL arrays are read-only
    return x.permute(2, 0, 1) if x.ndim == 3 else x.permute(3, 0, 1, 2)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(weights: str | None) -> str:
    """A digest of the autoencoder's weights: the files' contents for a local path, the repo
    id for one in the hub cache (whose snapshot is named by its commit)."""
    if not weights:
        return ""
    path = Path(weights)
    if not path.exists():
        return weights
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{_sha256(f)}\n".encode())
    return h.hexdigest()[:16]


def manifest(settings: EncodeSettings, source: EncodeSource, ae) -> dict[str, Any]:
    """What a store is a function of: everything that changes a shard or its statistics."""
    s = settings
    decomposition = s.decomposition()
    captions = None
    if s.captions is not None:
        assert s.text is not None  # __post_init__: --captions comes with its encoder
        captions = {"file": str(Path(s.captions).resolve()), "sha256": _sha256(Path(s.captions)), **s.text.to_dict()}
    folder = bool(getattr(source, "digest", ""))  # built-in sets have none: their name fixes them
    return {
        "source": str(Path(s.source).resolve()) if folder else s.source,
        "source_digest": getattr(source, "digest", ""),
        "items": len(source),
        "labels": str(Path(s.labels).resolve()) if s.labels else None,
        "num": s.num,
        "resolution": s.resolution,
        "frames": s.frames,
        "stride": s.stride,
        "fps": s.fps,
        "flip": s.flip,
        "shard_size": s.shard_size,
        "autoencoder": ae.config(),
        "weights_digest": weights_digest(s.ae_weights),
        "levels": decomposition.levels,
        "factors": decomposition.factors,
        "temporal_factors": decomposition.temporal_factors,
        "antialias": s.antialias,
        "captions": captions,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys)


def _store_files(out: Path) -> list[Path]:
    patterns = ("shard-*.safetensors", "shard-*.json", ".tmp-*", INDEX, REPORT, MANIFEST)
    return [f for pattern in patterns for f in out.glob(pattern) if f.is_file()]


def _claim(out: Path, wanted: dict[str, Any], overwrite: bool, ctx: distributed.Context) -> None:
    """Refuse a store that another manifest made (unless `overwrite`, which starts over), and
    write this run's manifest. Every rank decides before rank 0 writes anything."""
    path = out / MANIFEST
    try:
        previous = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # a damaged manifest vouches for nothing
        previous = {"manifest": "unreadable"}
    if previous is not None and previous != wanted and not overwrite:
        raise DfmError(
            f"--out {out} holds a store made with other settings ({_differences(previous, wanted)}); "
            "pass --overwrite to start over, or choose another --out"
        )
    distributed.barrier(ctx)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite or previous != wanted:
            for f in _store_files(out):  # an old store without a manifest is redone too
                f.unlink()
        for f in out.glob(".tmp-*"):
            f.unlink()
        (out / f".tmp-{os.getpid()}-{MANIFEST}").write_text(json.dumps(wanted, indent=1))
        os.replace(out / f".tmp-{os.getpid()}-{MANIFEST}", path)
    distributed.barrier(ctx)


def _verified(out: Path, k: int, expected: int, shape: tuple[int, ...], flip: bool) -> dict[str, Any] | None:
    """Shard k's record when the shard is finished and intact, else None (it is redone)."""
    shard, record_path = out / _shard_name(k), out / _record_name(k)
    try:
        record = json.loads(record_path.read_text())
        header = read_header(shard)
        count = record["count"]
        shapes = {key: header[key]["shape"] for key in ("labels", "latents", *(["latents_flip"] if flip else []))}
        ok = (
            0 < count
            and count + len(record["failures"]) == expected
            and shapes["labels"] == [count]
            and all(v == [count, *shape] for key, v in shapes.items() if key != "labels")
            and ("latents_flip" in header) == flip
            and record["sha256"] == _sha256(shard)
        )
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        ok = False
    return record if ok else None


@dataclass(frozen=True)
class StorePlan:
    """A store folder claimed for one encode: the latent shape and the manifest it was claimed with."""

    shape: tuple[int, ...]
    manifest: dict[str, Any]


def prepare_store(source: EncodeSource, ae, settings: EncodeSettings, ctx: distributed.Context) -> StorePlan:
    """Check that the encode can run and claim `settings.out` for it: a store made with other
    settings is refused (or cleared with `overwrite`). Nothing is encoded yet."""
    s = settings
    shape = tuple(ae.latent_shape((source.channels, *([s.frames] if s.frames else []), s.resolution, s.resolution)))
    s.decomposition().level_sizes(shape[1:])  # fail early if the statistics' factors don't divide the latents
    wanted = manifest(s, source, ae)
    _claim(Path(s.out), wanted, s.overwrite, ctx)
    return StorePlan(shape, wanted)


def encode_store(
    source: EncodeSource,
    ae,
    settings: EncodeSettings,
    ctx: distributed.Context,
    on_items: Callable[[int], None] = lambda n: None,
    plan: StorePlan | None = None,
    captioner: Captioner | None = None,
) -> dict[str, Any]:
    """Encode `source` into shards under `settings.out`; rank 0 writes the index, with the
    per-level statistics of the latents under `settings.decomposition()`. Returns the index.

    `source` yields `Item`s (see `sources.py`) and says its `channels` and `class_names`;
    `plan` is what `prepare_store` returned (it is called here when not given); `captioner`
    (with `settings.captions`) encodes each item's caption into the shard beside its latent."""
    s, out = settings, Path(settings.out)
    plan = plan or prepare_store(source, ae, settings, ctx)
    shape, wanted, decomposition = plan.shape, plan.manifest, s.decomposition()
    num_shards = -(-len(source) // s.shard_size)
    empty: dict[int, list[dict[str, str]]] = {}  # shards with no readable item: never written
    for k in range(ctx.rank, num_shards, ctx.world):
        span = range(k * s.shard_size, min(len(source), (k + 1) * s.shard_size))
        record = _verified(out, k, len(span), shape, s.flip)
        if record is not None:
            if s.strict and record["failures"]:
                bad = record["failures"][0]
                raise EncodeFailed(
                    f"{bad['file']}: {bad['error']} (--strict; it was skipped by an earlier run "
                    "without --strict: pass --overwrite to start over)"
                )
            on_items(len(span))
            continue
        failures = _encode_shard(source, ae, s, out, k, span, on_items, captioner)
        if failures is not None:
            empty[k] = failures
    empty_all = {k: v for per_rank in distributed.gather_objects(ctx, empty) for k, v in per_rank.items()}
    distributed.barrier(ctx)
    index: dict[str, Any] = {}
    if ctx.main:
        shards, report = [], []
        for k in range(num_shards):
            if k in empty_all:
                report += empty_all[k]
                continue
            record = json.loads((out / _record_name(k)).read_text())
            shards.append({"file": _shard_name(k), "count": record["count"], "sha256": record["sha256"]})
            report += record["failures"]
        (out / REPORT).write_text(json.dumps(report, indent=1))
        if not shards:
            raise DfmError(f"{out}: no readable item in the source; see {out / REPORT}")
        index = {
            "version": 2,
            "num": sum(x["count"] for x in shards),
            "shape": list(shape),
            "flip": s.flip,
            "shards": shards,
            "autoencoder": ae.config(),
            "source": s.source,
            "resolution": s.resolution,
            "frames": s.frames,
            "class_names": list(source.class_names),
            "manifest": wanted,
        }
        if captioner is not None:
            index["text"] = {**captioner.settings.to_dict(), "dims": list(captioner.dims)}
            null = captioner.null()
            save_file({"tokens": null.tokens, "mask": null.mask, "pooled": null.pooled}, out / NULL_TEXT)
        (out / INDEX).write_text(json.dumps(index, indent=1))
        index["level_stats"] = level_statistics(LatentStore(out), decomposition)
        (out / INDEX).write_text(json.dumps(index, indent=1))
    distributed.barrier(ctx)
    return index


def _encode_shard(
    source: EncodeSource,
    ae,
    s: EncodeSettings,
    out: Path,
    k: int,
    span: range,
    on_items: Callable[[int], None],
    captioner: Captioner | None,
) -> list[dict[str, str]] | None:
    """Write shard k and its record; returns the failures instead when no item was readable."""
    loader = DataLoader(
        torch.utils.data.Subset(source, list(span)), batch_size=s.batch, num_workers=s.workers, collate_fn=_collate
    )
    latents, flipped, labels, failures, texts = [], [], [], [], []
    for items in loader:
        good = [it for it in items if not it.error]
        for it in items:
            if it.error:
                if s.strict:
                    raise EncodeFailed(f"{it.name}: {it.error} (--strict; no partial shard was written)")
                failures.append({"file": it.name, "error": it.error})
        if good:
            x = torch.stack([_to_tensor(it.array) for it in good])
            latents.append(ae.encode(x).float().cpu())
            if s.flip:
                flipped.append(ae.encode(x.flip(-1)).float().cpu())
            labels += [it.label for it in good]
            if captioner is not None:
                texts.append(captioner([it.name for it in good]))
        on_items(len(items))
    for name in (_shard_name(k), _record_name(k)):
        (out / name).unlink(missing_ok=True)
    if not labels:
        return failures
    tensors = {"labels": torch.tensor(labels, dtype=torch.long), "latents": torch.cat(latents)}
    if s.flip:
        tensors["latents_flip"] = torch.cat(flipped)
    if texts:
        tensors.update(
            {
                f"text_{key}": torch.cat([getattr(t, key) for t in texts]).to(dtype)
                for key, dtype in (("tokens", torch.float16), ("mask", torch.bool), ("pooled", torch.float16))
            }
        )
    tmp = out / f".tmp-{os.getpid()}-{_shard_name(k)}"
    save_file({key: v.contiguous() for key, v in tensors.items()}, tmp)
    record = {
        "file": _shard_name(k),
        "count": len(labels),
        "shape": list(tensors["latents"].shape[1:]),
        "sha256": _sha256(tmp),
        "failures": failures,
    }
    os.replace(tmp, out / _shard_name(k))
    tmp_record = out / f".tmp-{os.getpid()}-{_record_name(k)}"
    tmp_record.write_text(json.dumps(record, indent=1))
    os.replace(tmp_record, out / _record_name(k))  # the shard counts as done from here on
    return None


def read_report(out: Path) -> list[dict[str, str]]:
    """The files a finished encode into `out` had to skip, and why."""
    return json.loads((Path(out) / REPORT).read_text())
