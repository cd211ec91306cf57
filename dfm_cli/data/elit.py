"""Reading the authors' released `.pt` checkpoints (snap-research/elit) without running their pickle.

Their `train.py` saves a pickled dict: `model`, `ema` (state dicts), `opt` (the optimizer's
state), `args` (the `argparse.Namespace` of the run), `steps`. `torch.load` with
`weights_only=True` rebuilds only tensors and plain containers; the one class such a
checkpoint really holds, `argparse.Namespace`, is allow-listed. Anything else (a class, a
function) is refused with the name of what it asked for, since loading it could run code.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from dfm_cli.errors import DfmError

ALLOWED = (argparse.Namespace,)  # the only non-tensor class their checkpoints hold (`args`)


def load_elit(path: Path) -> dict[str, Any]:
    """The checkpoint dict at `path`, loaded with only `ALLOWED` classes; every failure is one line."""
    if not path.is_file():
        raise DfmError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise DfmError(f"{path}: truncated or damaged checkpoint (its zip archive has no directory at the end)")
    if not head.startswith((b"PK", b"\x80")):  # neither torch's zip format nor a legacy pickle
        raise DfmError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(ALLOWED)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the outcome is what counts
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "a Python object"
        raise DfmError(
            f"{path}: refused: loading it needs {what}, which is not a tensor, a plain container or "
            f"one of the allowed classes ({', '.join(c.__module__ + '.' + c.__name__ for c in ALLOWED)}); "
            "unpickling it could run code"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DfmError(f"{path}: unreadable checkpoint, truncated or damaged ({first})") from None
    if not isinstance(ckpt, dict) or not any(isinstance(ckpt.get(k), dict) for k in ("ema", "model")):
        kind = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict of {', '.join(map(str, ckpt))[:80]}"
        raise DfmError(f"{path}: not an ELIT checkpoint: expected a dict with 'ema' and 'model' weights, found {kind}")
    return ckpt


def run_args(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The training run's arguments (`args`), as a plain dict (empty when absent)."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}
