"""Where a sweep's outputs live, and the manifests that make a rerun resume: running a sweep
writes this layout and the results read it, so both name its folders and files from here.

    OUT/runs/<run id>/    a trained run (`dfm train --out`), with its manifest
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
    return out / "runs" / run_id


def cell_dir(out: Path, cell_id: str) -> Path:
    return out / "cells" / cell_id


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
