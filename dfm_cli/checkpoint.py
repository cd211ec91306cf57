"""Checkpoint I/O: safetensors weights, a JSON state, atomic writes, newest-complete lookup.

A checkpoint is a folder `checkpoints/step-<9 digits>/` holding `model.safetensors`,
`ema.safetensors`, `optimizer.safetensors`, `recipe.toml` and `state.json`. It is written
under a temporary name, every file is fsynced, `state.json` goes last, and only then is the
folder renamed into place and the `latest` link swapped. A crash at any point leaves either
the old set of checkpoints or the new one, never a folder that loads but is wrong.
No pickle is involved anywhere, so loading a stranger's checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dfm_cli.errors import DfmError

STATE = "state.json"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split `optimizer.state_dict()` into flat tensors and JSON-able param groups."""
    tensors = {
        f"{idx}.{name}": value.detach().contiguous()
        for idx, per_param in state["state"].items()
        for name, value in per_param.items()
    }
    return tensors, state["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    recipe_toml: str,
    keep: int,
) -> Path:
    """Write `weights[name]` as `<name>.safetensors` plus state and recipe, atomically."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, tensors in weights.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  tmp / f"{name}.safetensors")
    (tmp / "recipe.toml").write_text(recipe_toml)
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        _fsync_path(f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link = root / ".latest-tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, root / "latest")
    _fsync_path(root)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders whose state file made it to disk, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE).is_file())


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its `checkpoints/` folder or one checkpoint → the checkpoint folder."""
    p = Path(path)
    if (p / STATE).is_file():
        return p
    found = complete_checkpoints(p) or complete_checkpoints(p.parent)
    if not found:
        raise DfmError(
            f"{path}: no checkpoint found; pass a run folder written by `dfm train` "
            "or one of its checkpoints/step-* folders"
        )
    return found[-1]


def load_checkpoint(ckpt: Path, names: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Load the named safetensors files and the JSON state of one checkpoint folder."""
    try:
        weights = {name: load_file(ckpt / f"{name}.safetensors") for name in names}
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError) as e:
        raise DfmError(f"{ckpt}: unreadable checkpoint ({e}); delete it to fall back to an older one") from None
    return weights, state
