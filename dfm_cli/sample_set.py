"""Large sample sets for evaluation: sharded over processes, resumable, class-balanced.

Sample i has label `i % num_classes` and noise seeded by `(seed, i)` (see
`sampler.generate`), so the set is a function of `(model, settings, num, seed)` only: not of
the batch size or of how many processes made it. Batch k goes to rank `k % world`. Each
finished batch is written atomically (temp file, then rename), so an interrupted run that is
started again skips what is done.

Outputs:
- `samples.npz`: ADM layout, `arr_0` uint8 `N H W 3` (video: `N T H W 3`) and `arr_1` the labels;
- a folder: `000000.png`, `000001.png`, … (grey images stay one-channel; images only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfm_cli import distributed
from dfm_cli.media import to_uint8
from dfm_cli.sampler import generate


def _atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _as_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def write_sample_set(
    model: torch.nn.Module,
    out: Path,
    num: int,
    batch: int,
    num_classes: int,
    ctx: distributed.Context,
    on_batch: Callable[[int], None] = lambda n: None,
    decode: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    **settings,
) -> Path:
    """Generate `num` samples into `out` (`.npz` or folder), decoded to pixels by `decode`;
    `settings` (steps, tau, pyramid, cfg, …) go to `sampler.generate`."""
    npz = out.suffix == ".npz"
    parts = out.with_name(out.name + ".parts") if npz else out
    if ctx.main:
        parts.mkdir(parents=True, exist_ok=True)
    distributed.barrier(ctx)
    for k in range(ctx.rank, -(-num // batch), ctx.world):
        first, last = k * batch, min(num, (k + 1) * batch)
        targets = [parts / f"part-{first:09d}.npz"] if npz else [parts / f"{i:06d}.png" for i in range(first, last)]
        if all(t.exists() for t in targets):
            on_batch(last - first)
            continue
        labels = torch.arange(first, last) % num_classes
        images = to_uint8(decode(generate(model, labels, first_index=first, **settings).x))
        if npz:
            _atomic_save(targets[0], lambda p, im=images, lb=labels: np.savez(p, arr_0=_as_rgb(im), arr_1=lb.numpy()))
        else:
            for target, image in zip(targets, images):
                _atomic_save(target, lambda p, im=image: Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
                             .save(p, format="PNG"))
        on_batch(last - first)
    distributed.barrier(ctx)
    if npz and ctx.main:
        files = sorted(parts.glob("part-*.npz"))
        loaded = [np.load(f) for f in files]
        _atomic_save(out, lambda p: np.savez(p, arr_0=np.concatenate([d["arr_0"] for d in loaded]),
                                             arr_1=np.concatenate([d["arr_1"] for d in loaded])))
        for f in files:
            f.unlink()
        parts.rmdir()
    return out
