"""Checkpoint I/O: safetensors weights, a JSON state, atomic writes, newest-complete lookup.

A checkpoint is a folder `checkpoints/step-<9 digits>/` holding `model.safetensors`,
`ema.safetensors`, `optimizer.safetensors`, `recipe.toml` and `state.json`. It is written
under a temporary name, every file is fsynced, `state.json` goes last, and only then is the
folder renamed into place and the `latest` link swapped. A crash at any point leaves either
the old set of checkpoints or the new one, never a folder that loads but is wrong.
No pickle is involved anywhere, so loading a stranger's checkpoint cannot run code.

`state.json` records the SHA-256 of every weight file (`"sha256": {file name: hex}`), hashed
once when the checkpoint is written; loading checks each file it reads against its record
(streamed in chunks), so a file changed or damaged since is an error, not a silently different
model. Checkpoints written before digests were recorded load unchecked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dfm_cli import distributed
from dfm_cli.errors import DfmError

STATE = "state.json"
LOCK = ".lock"
DIGESTS = "sha256"  # the key of state.json that records each weight file's SHA-256


@dataclass(frozen=True)
class RunInfo:
    """What a trained model needs besides its recipe, stored in every checkpoint's `state.json`.

    `shape` is one item of the training data (`C H W`, or `C T H W` for video; a store's
    latents, not pixels), `autoencoder` the config that decodes samples back to pixels, and
    `level_stats` the per-level statistics of a standardized decomposition (else None), and
    `text` the caption encoder of a text-conditioned run (its settings and `dims`; else None),
    which `dfm sample --prompt` runs again on the prompts.

    >>> info = RunInfo((1, 32, 32), 2, ("cat", "dog"), {"name": "pixel", "channels": 1})
    >>> RunInfo.from_state(info.to_state(), Path("state.json")) == info
    True
    """

    shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    autoencoder: dict[str, Any]
    level_stats: dict[str, Any] | None = None
    text: dict[str, Any] | None = None

    def to_state(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape), "class_names": list(self.class_names)}

    @classmethod
    def from_state(cls, state: dict[str, Any], where: Path) -> RunInfo:
        """Read back `to_state`; a state written without these keys is a one-line error."""
        missing = [k for k in ("shape", "num_classes", "class_names", "autoencoder") if k not in state]
        if missing:
            raise DfmError(
                f"{where}: lacks {', '.join(missing)}; it was not written by this version of "
                "`dfm train`; retrain the run, or add the keys by hand"
            )
        return cls(
            tuple(state["shape"]),
            int(state["num_classes"]),
            tuple(state["class_names"]),
            dict(state["autoencoder"]),
            state.get("level_stats"),
            state.get("text"),
        )


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (a model's weights never sit whole in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split a full optimizer state dict (parameter names as keys) into flat tensors
    `"<param>::<slot>"` and JSON-able param groups."""
    tensors = {
        f"{param}::{slot}": value.detach().contiguous()
        for param, per_param in state["state"].items()
        for slot, value in per_param.items()
    }
    return tensors, state["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        param, slot = key.rsplit("::", 1)
        state.setdefault(param, {})[slot] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    recipe_toml: str,
    keep: int,
) -> Path:
    """Write `weights[name]` as `<name>.safetensors` plus state and recipe, atomically.

    Keeps the newest `keep` checkpoints, plus every one whose state says `"milestone": true`.
    Each weight file is hashed right after it is written (still in the page cache) and the
    digests join the state under `"sha256"`.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"  # unique to the process, as is the link below
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    digests = {}
    for name, tensors in weights.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
        digests[f"{name}.safetensors"] = file_sha256(tmp / f"{name}.safetensors")
    (tmp / "recipe.toml").write_text(recipe_toml)
    (tmp / STATE).write_text(json.dumps({**state, DIGESTS: digests}, indent=1))
    for f in tmp.iterdir():
        _fsync_path(f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link = root / f".latest-tmp-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, root / "latest")
    _fsync_path(root)
    prunable = [c for c in complete_checkpoints(run_dir) if not json.loads((c / STATE).read_text()).get("milestone")]
    for old in prunable[:-keep]:
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


def pinned_checkpoint(path: str | Path) -> Path:
    """`resolve_checkpoint`, fixed: a run folder's newest complete checkpoint as it is now, and
    `checkpoints/latest` as the `step-N` folder it points to, so the path names the same
    weights however long the run it belongs to goes on training."""
    ckpt = resolve_checkpoint(path)
    if ckpt.is_symlink():
        ckpt = ckpt.parent / os.readlink(ckpt)
    return ckpt


def same_source(recorded: str, given: str) -> bool:
    """Whether `given` (as typed again, e.g. on resume) names what `recorded` was pinned to:
    the same checkpoint, or the run folder (or its `checkpoints/`, or `latest`) that holds it.

    >>> same_source("runs/fm/checkpoints/step-000000008", "runs/fm")
    True
    >>> same_source("runs/fm/checkpoints/step-000000008", "runs/fm/checkpoints/step-000000004")
    False
    """
    if recorded == given:
        return True
    r, g = Path(os.path.abspath(recorded)), Path(os.path.abspath(given))
    return r == g or (r.parent.name == "checkpoints" and g in (r.parent, r.parent.parent, r.parent / "latest"))


def verify_weights(ckpt: Path, names: tuple[str, ...], state: dict[str, Any], hint: str | None = None) -> None:
    """Check the named weight files of `ckpt` against the SHA-256 its state recorded when it was
    written; a file without a record (a checkpoint older than the records) is not checked.
    `hint` says what to do instead (default: an earlier checkpoint, or `--no-verify`)."""
    recorded = state.get(DIGESTS) if isinstance(state, dict) else None
    if not isinstance(recorded, dict):
        return
    for name in names:
        file = ckpt / f"{name}.safetensors"
        want = recorded.get(file.name)
        if want is not None and file_sha256(file) != want:
            raise DfmError(
                f"{file}: its SHA-256 differs from the one recorded in {STATE} when the checkpoint was written "
                f"(the file was changed or damaged since); "
                f"{hint or f'use an earlier checkpoint under {ckpt.parent}, or pass --no-verify if you trust the file'}"
            )


def load_run_info(ckpt: Path) -> RunInfo:
    """The `RunInfo` of one checkpoint folder, without loading its weights."""
    _, state = load_checkpoint(ckpt, ())
    return RunInfo.from_state(state, ckpt / STATE)


def load_checkpoint(
    ckpt: Path, names: tuple[str, ...], verify: bool = True, hint: str | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Load the named safetensors files and the JSON state of one checkpoint folder; with
    `verify`, each file must match the SHA-256 its state recorded (see `verify_weights`)."""
    try:
        weights = {name: load_file(ckpt / f"{name}.safetensors") for name in names}
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError, SafetensorError) as e:
        raise DfmError(f"{ckpt}: unreadable checkpoint ({e}); delete it to fall back to an older one") from None
    if verify:
        verify_weights(ckpt, names, state, hint)
    return weights, state


# --------------------------------------------------------------------------- training state


def rng_state() -> dict[str, Any]:
    """Every RNG a process holds, as JSON: torch CPU and CUDA, numpy, python."""
    # numpy's stub types the no-argument call as the dict of `legacy=False`; it returns the legacy tuple
    numpy_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_training_state(
    run_dir: Path,
    step: int,
    model,
    ema,
    optimizer,
    state: dict[str, Any],
    recipe_toml: str,
    keep: int,
    milestone: bool,
    ctx: distributed.Context,
) -> None:
    """Gather full weights, EMA, optimizer and every rank's RNGs; rank 0 writes the checkpoint."""
    weights, optim = distributed.full_state(model, optimizer)
    ema_weights, _ = distributed.full_state(ema)
    rngs = distributed.gather_objects(ctx, rng_state())
    if ctx.main:
        opt_tensors, groups = optimizer_tensors(optim)
        save_checkpoint(
            run_dir,
            step,
            {"model": weights, "ema": ema_weights, "optimizer": opt_tensors},
            {**state, "param_groups": groups, "milestone": milestone, "rng": rngs},
            recipe_toml,
            keep,
        )
    distributed.barrier(ctx)


def load_training_state(ckpt: Path, model, ema, optimizer, ctx: distributed.Context) -> dict[str, Any]:
    """Restore what `save_training_state` wrote (its files checked against their digests), on
    every rank; returns the JSON state."""
    hint = f"delete {ckpt} to resume from an earlier checkpoint, or train into a new --out folder"
    weights, state = load_checkpoint(ckpt, ("model", "ema", "optimizer"), hint=hint)
    missing = [k for k in ("step", "param_groups") if k not in state]
    if missing:
        raise DfmError(
            f"{ckpt / STATE}: lacks {', '.join(missing)}, so the run cannot resume from it; "
            "delete this checkpoint to fall back to an older one"
        )
    distributed.load_full_state(
        model, weights["model"], optimizer, optimizer_state(weights["optimizer"], state["param_groups"])
    )
    distributed.load_full_state(ema, weights["ema"])
    rngs = state.get("rng", [])
    if ctx.rank < len(rngs):
        set_rng_state(rngs[ctx.rank])
    return state


# --------------------------------------------------------------------------- the run folder


def try_lock(path: Path) -> tuple[int, str | None]:
    """Open the lock file `path` and try its exclusive `flock` without waiting: `(fd, None)`
    when this process holds it now, `(-1, PID)` when another process does (its PID as it wrote
    it). `flock` is released by the kernel however the holder ends, so no lock goes stale."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return -1, holder
    return fd, None


def claim_lock(fd: int) -> None:
    """Write this process's PID into a held lock file, for the message a second process gets."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this process: a second `dfm train` on it is refused, naming us.

    `flock` is released by the kernel when the process dies, however it dies, so a killed run
    never leaves a stale lock. A folder this call created and that holds no complete checkpoint
    at the end (the run stopped before its first one: nothing to resume) is removed again.
    """
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, holder = try_lock(run_dir / LOCK)
    except OSError as e:
        raise DfmError(f"{run_dir}: cannot use it as a run folder ({e.strerror}); pass another --out") from None
    if holder:
        raise DfmError(
            f"{run_dir} is in use by another dfm process (PID {holder}); wait for it to finish "
            "or stop it, or train into another --out folder"
        )
    try:
        claim_lock(fd)
        for stale in (run_dir / "checkpoints").glob(".*tmp-*"):  # left by a killed process
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
        yield
    finally:
        if created and not complete_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        os.close(fd)


def truncate_stats(path: Path, step: int) -> None:
    """Keep only the `stats.jsonl` lines up to `step` (the checkpoint a run resumes from), so
    lines written after it, which the resumed run writes again, appear once. A torn last
    line from a killed process goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
