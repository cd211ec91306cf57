"""`dfm import elit`: one of the authors' released checkpoints as a `dfm` run folder.

The run folder is an ordinary one (`recipe.toml`, `checkpoints/step-N/` with `model` and `ema`
weights and `state.json`), so `dfm sample`, `dfm eval` and `dfm train --init-from` use it as
they use a trained run. Its recipe carries the conventions of their code as recipe keys
(docs/method.md §9) and the sampling settings of their published numbers
(`recipes/imported/*.toml` hold the same values).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfm_cli.config.recipe import Recipe, load_recipe
from dfm_cli.data.checkpoints import RunInfo, file_sha256, save_checkpoint
from dfm_cli.data.elit import load_elit, run_args
from dfm_cli.errors import DfmError
from dfm_cli.methods.factory import build_model
from dfm_cli.models.elit import ElitArch, check_model_name, convert, infer_arch, strip_prefixes

SD_VAE_SCALE = 0.18215  # their latents are SD-VAE posterior samples × 0.18215, no shift
# what the published numbers were sampled with (their experiments/generation/*.yaml), in our clock
ELIT_SAMPLING = {
    True: {"sample.steps": [40, 10], "sample.tau": [0.9], "sample.cfg": 1.0},  # threshold 0.1 → tau 1 − 0.1
    False: {"sample.steps": [50], "sample.tau": [], "sample.cfg": 1.0},
}
# their training settings, for finetuning an import (their experiments/train/*.yaml, loss.py)
ELIT_TRAINING = {
    "train.lr": 1e-4,
    "train.batch_size": 256,
    "train.weight_decay": 0.0,
    "flow.prev_t_loc": 2.0,  # their −2.0 on the data→noise clock
    "flow.per_batch_stage": True,
}


@dataclass
class ImportReport:
    run: Path
    arch: ElitArch
    name: str
    step: int
    dropped: list[str] = field(default_factory=list)  # training-only tensors and checkpoint entries


def elit_recipe(arch: ElitArch, resolution: int, overrides: dict[str, Any] | None = None) -> Recipe:
    """The recipe of an imported network: its size and conventions, their sampling and training settings."""
    keys: dict[str, Any] = {
        "model.name": arch.ours,
        "model.pos": "sincos_wh",
        "model.time_embed": "sit",
        "data.name": "store",
        "data.path": f"stores/imagenet{resolution}",  # where `dfm encode` would write their latents
        "data.resolution": resolution,
        "flow.levels": arch.levels,
        "flow.factors": [2] * (arch.levels - 1),
        "flow.p_stage": [0.9, 0.1] if arch.levels == 2 else [1.0],
        **ELIT_TRAINING,
        **ELIT_SAMPLING[arch.dfm],
        **(overrides or {}),
    }
    if arch.levels > 2:
        raise DfmError(f"the checkpoint has {arch.levels} levels; their released models have 1 or 2")
    return load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in keys.items()])


def import_elit(
    path: Path, out: Path, model: str | None = None, ema: bool = True, ae_weights: str | None = None
) -> ImportReport:
    """Convert the checkpoint at `path` into the run folder `out` (which must be new or empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DfmError(f"--out {out}: exists and is not empty; pass a new folder")
    ckpt = load_elit(path)
    which = "ema" if ema else "model"
    if not isinstance(ckpt.get(which), dict):
        other = "--no-ema" if ema else "--ema"
        raise DfmError(f"{path}: the checkpoint has no '{which}' weights; try {other}")
    state = strip_prefixes({k: v for k, v in ckpt[which].items() if isinstance(v, torch.Tensor)})
    arch = infer_arch(state)
    if model:
        check_model_name(model, state, arch)
    converted = convert(state, arch)
    args = run_args(ckpt)
    resolution = int(args.get("resolution") or arch.size * 8)
    recipe = elit_recipe(arch, resolution)
    shape = (arch.channels, arch.size, arch.size)
    net = build_model(recipe, shape, arch.num_classes)
    try:
        net.load_state_dict(converted.state)  # strict: every tensor the forward pass needs is there
    except RuntimeError as e:
        raise DfmError(f"{path}: the converted weights do not fit {arch.ours}: {str(e).splitlines()[0]}") from None
    step = int(ckpt.get("steps") or 0)
    info = RunInfo(
        shape,
        arch.num_classes,
        tuple(f"class {i}" for i in range(arch.num_classes)),
        {
            "name": "kl",
            "weights": str(Path(ae_weights).expanduser().resolve()) if ae_weights else "",
            "scale": SD_VAE_SCALE,
            "shift": 0.0,
            "spatial_factor": 8,
            "temporal_factor": 1,
        },
    )
    provenance = {"format": "elit", "file": str(path.resolve()), "sha256": file_sha256(path), "weights": which}
    weights = {name: converted.state for name in ("model", "ema")}
    save_checkpoint(out, step, weights, {"step": step, **info.to_state(), "imported": provenance}, recipe.to_toml(), 1)
    (out / "recipe.toml").write_text(recipe.to_toml())
    left = [k for k in ckpt if k not in ("model", "ema", "args", "steps")]  # optimizer, scheduler
    unused = "model" if ema else "ema"
    repa = [f"REPA projectors ({len(converted.dropped)} tensors)"] if converted.dropped else []
    dropped = repa + ([f"the {unused} weights"] if unused in ckpt else []) + [f"'{k}'" for k in left]
    return ImportReport(out, arch, model or arch.ours, step, dropped)
