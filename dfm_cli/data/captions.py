"""A captioned image folder: `data.name = "folder"` with `data.captions` and a `[text]` encoder.

The captions are encoded once, at the start of the run, into `RUN/captions.safetensors`
(with the empty caption, the null condition); a resumed run reads them back, and a run whose
captions file or encoder changed is refused by the recipe check, like any other change. The
dataset then looks like a store encoded with captions: batches of `(images, TextCond)`.
For large sets, encode a store instead (`dfm encode FOLDER --captions ...`), which memory-maps
the captions rather than holding them in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from dfm_cli import distributed
from dfm_cli.data.datasets import ImageFolder
from dfm_cli.data.text_encoders import Captioner, TextEncoder, TextSettings
from dfm_cli.errors import DfmError
from dfm_cli.method.cond import TextCond

CAPTIONS = "captions.safetensors"
ENCODE_BATCH = 64


class CaptionedFolder(Dataset):
    """`folder` with each item's encoded caption (`table` row i is item i's)."""

    def __init__(self, folder: ImageFolder, table: TextCond, null: TextCond, record: dict[str, Any]) -> None:
        self.folder, self.table, self.null, self.record = folder, table, null, record
        self.shape, self.channels = folder.shape, folder.channels
        self.class_names, self.num_classes = folder.class_names, folder.num_classes
        self.num = len(folder)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.folder[i]

    @property
    def text(self) -> dict[str, Any]:
        return self.record

    def text_rows(self, indices: Sequence[int]) -> TextCond:
        return self.table[torch.as_tensor(list(indices))]

    def null_text(self) -> TextCond:
        return self.null

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, TextCond]:
        # an unreadable image is replaced by the next readable one: its caption comes with it
        items = [self.folder.item(i) for i in indices]
        return torch.stack([x for x, _, _ in items]), self.text_rows([j for _, _, j in items])


def text_settings(recipe) -> TextSettings:
    """The recipe's `[text]` section, with local paths made absolute for later sampling."""
    x = recipe.text

    def absolute(p: str) -> str:
        return str(Path(p).resolve()) if p else ""

    model = absolute(x.clip_model) if x.clip_model.endswith(".json") else x.clip_model
    return TextSettings(x.encoder, model, absolute(x.clip_weights), absolute(x.t5_weights), x.max_tokens)


def captioned_folder(folder: ImageFolder, recipe, run_dir: Path, ctx: distributed.Context) -> CaptionedFolder:
    """`folder` with its captions, encoded into `run_dir` once (rank 0) and read back after."""
    captions = Path(recipe.data.captions)
    if not captions.is_file():
        raise DfmError(
            f"data.captions = '{captions}': not found; pass a CSV (path,caption) or JSONL file of "
            f"captions for the images under {recipe.data.path}"
        )
    settings = text_settings(recipe)
    digest = hashlib.sha256(captions.read_bytes()).hexdigest()[:16]
    want = {
        **settings.to_dict(),
        "captions": str(captions.resolve()),
        "captions_sha256": digest,
        "items": [str(Path(p).resolve().relative_to(folder.root.resolve())) for p, _ in folder.items],
    }
    path = run_dir / CAPTIONS
    if ctx.main and _stored_record(path) != want:
        _encode(folder, captions, settings, want, path, ctx.device)
    distributed.barrier(ctx)
    tensors = load_file(path)
    record = json.loads(_metadata(path)["record"])
    table = TextCond(tensors["tokens"].float(), tensors["mask"], tensors["pooled"].float())
    null = TextCond(tensors["null_tokens"], tensors["null_mask"], tensors["null_pooled"])
    return CaptionedFolder(folder, table, null, {**settings.to_dict(), "dims": record["dims"]})


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def _stored_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(_metadata(path)["record"])
    except (KeyError, ValueError, OSError):
        return None
    return {k: v for k, v in record.items() if k != "dims"}


def _encode(
    folder: ImageFolder,
    captions: Path,
    settings: TextSettings,
    record: dict[str, Any],
    path: Path,
    device: torch.device,
) -> None:
    captioner = Captioner(captions, folder.root, TextEncoder(settings, device))
    names = [str(p) for p, _ in folder.items]
    try:
        captioner.check(names)
    except DfmError as e:
        raise DfmError(str(e).replace("--captions", "data.captions =", 1)) from None
    parts = [captioner(names[i : i + ENCODE_BATCH]) for i in range(0, len(names), ENCODE_BATCH)]
    null = captioner.null()
    tensors = {
        "tokens": torch.cat([p.tokens for p in parts]).half(),
        "mask": torch.cat([p.mask for p in parts]),
        "pooled": torch.cat([p.pooled for p in parts]).half(),
        "null_tokens": null.tokens,
        "null_mask": null.mask,
        "null_pooled": null.pooled,
    }
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, tmp, metadata={"record": json.dumps({**record, "dims": list(captioner.dims)})})
    os.replace(tmp, path)
