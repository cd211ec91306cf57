"""Cells scored on another machine: a study split over sessions that each start on a fresh
machine commits its `results.csv` after every part; `dfm ablate --scored CSV` reads those lines
back, so the cells they score are neither trained nor sampled again and still count in the
results (their samples and training curves stay with the machine that made them).

A line is taken only when it names a cell of this sweep exactly: its row and run id (a
digest of every training setting, the seed included) match, as do its values of the swept keys, and its
`cell_id` (a digest of the sampling and evaluation settings too) where the file has one.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dfm_cli.ablate.curves import decode_curves
from dfm_cli.ablate.results import NOT_METRICS, Scored
from dfm_cli.ablate.sweep import Sweep, format_value, recipe_value
from dfm_cli.errors import DfmError


def read_scored(sweep: Sweep, path: Path) -> tuple[dict[str, Scored], int]:
    """The metrics and in-training curves of each cell of `sweep` that `path` (a results.csv)
    scores, by cell name, and how many scored lines of it name no cell of this sweep (settings
    changed since)."""
    if not path.is_file():
        raise DfmError(f"--scored {path}: no such file; give the results.csv of an earlier run of this sweep")
    try:
        with path.open(newline="") as fh:
            lines = list(csv.DictReader(fh))
    except (csv.Error, UnicodeDecodeError) as err:
        raise DfmError(f"--scored {path}: not a readable CSV file ({err})") from None
    if not lines or not {"cell", "run"} <= set(lines[0]):
        raise DfmError(f"--scored {path}: not a results.csv written by dfm ablate (it needs 'cell' and 'run' columns)")
    cells = {(c.row or c.name, c.run_id): c for c in sweep.cells}  # the run id covers train.seed
    scored: dict[str, Scored] = {}
    stale = 0
    for number, line in enumerate(lines, start=2):
        metrics = {}
        for key, value in line.items():
            if key in NOT_METRICS or key in sweep.swept or key.endswith("_vs_baseline") or value in ("", None):
                continue
            try:
                metrics[key] = float(value)
            except ValueError:
                raise DfmError(f"--scored {path}: line {number}, column {key!r}: {value!r} is not a number") from None
        if not metrics:  # a cell the earlier part had not scored yet
            continue
        curves = line.get("curves") or ""
        try:
            decode_curves(curves)
        except ValueError as err:
            raise DfmError(f"--scored {path}: line {number}, column 'curves': {err}") from None
        cell = cells.get((line["cell"], line["run"]))
        if (
            cell is None
            or line.get("cell_id", cell.cell_id) != cell.cell_id
            or any(key in line and line[key] != format_value(recipe_value(cell.recipe, key)) for key in sweep.swept)
        ):
            stale += 1
            continue
        scored[cell.name] = Scored(metrics, curves)
    return scored, stale
