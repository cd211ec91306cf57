"""Where a sweep's outputs live, and the manifests that make a rerun resume: running a sweep
writes this layout and the results read it, so both name its folders and files from here.

    OUT/runs/<run id>/    a trained run (`dfm train --out`), with its manifest (found by the
                          id's settings hash, whichever sweep named it)
    OUT/cells/<cell id>/  samples.npz, eval.json and the cell's manifest
    OUT/logs/, OUT/refs/  the commands' output; reference .npz files written once
"""

from __future__ import annotations

import json
import time
from pathlib import Path

MANIFEST = "ablate.json"
SAMPLES = "samples.npz"  # a cell's samples
EVAL = "eval.json"  # a cell's scores


def run_dir(out: Path, run_id: str) -> Path:
    return _find(out / "runs", run_id)


def cell_dir(out: Path, cell_id: str) -> Path:
    return _find(out / "cells", cell_id)


def _find(parent: Path, ident: str) -> Path:
    """`parent/ident`, or a folder of the same settings that another sweep in the same OUT made
    under another name: an id ends in the hash of its settings, and only its readable part
    depends on the sweep (which keys it sweeps, what it names its cells). So a tuning sweep
    and a study that share a cell train it once."""
    exact = parent / ident
    if exact.exists() or not parent.is_dir():
        return exact
    digest = ident.rsplit("-", 1)[-1]
    same = [p for p in sorted(parent.glob(f"*-{digest}")) if (p / MANIFEST).is_file()]
    return same[0] if same else exact


def is_trained(manifest: dict) -> bool:
    """Whether a run folder's manifest says its training finished."""
    return manifest.get("status") == "done"


def is_sampled(manifest: dict, folder: Path) -> bool:
    """Whether a cell folder holds its finished sample set."""
    return manifest.get("samples") == "done" and (folder / SAMPLES).is_file()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def claim(folder: Path, settings: dict) -> dict:
    """The folder's manifest if it was made with `settings`; a folder made with other
    settings (only by hand: ids hash the settings) is moved aside, never mixed in."""
    manifest = read_json(folder / MANIFEST)
    if manifest and manifest.get("settings") != settings:
        aside = folder.with_name(f"{folder.name}.replaced-{int(time.time())}")
        folder.rename(aside)
        manifest = {}
    return manifest or {"settings": settings}
