"""Running a sweep: each run (every seed its own) trained once and each cell sampled and scored, through
`python -m dfm_cli train|sample|eval` in subprocesses, with a manifest per folder so that an
interrupted sweep, run again, does only what is missing. Ends by writing the results.

A run whose recipe mirrors its statistics to W&B (`train.log_to`) joins the sweep's group,
named by its run id, with the sweep's settings of its cells in its config (`wandb_env`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from dfm_cli.ablate.carry import read_scored
from dfm_cli.ablate.ids import cell_manifest_settings, run_settings, settings_hash
from dfm_cli.ablate.layout import EVAL, MANIFEST, SAMPLES, cell_dir, claim, is_sampled, is_trained, run_dir, write_json
from dfm_cli.ablate.results import Scored, collect, write_results
from dfm_cli.ablate.sweep import METRIC_FLAGS, Cell, Run, Sweep
from dfm_cli.config.recipe import Recipe
from dfm_cli.data.datasets import BUILTIN, build_dataset
from dfm_cli.errors import DfmError
from dfm_cli.evaluation.evaluate import reference_images
from dfm_cli.progress import Progress

BUILTIN_REFERENCES = tuple(name for name, entry in BUILTIN.items() if not entry.video)  # `dfm eval --ref` names
WEIGHTS = ("inception_weights", "dinov2_weights", "i3d_weights")  # [eval] keys passed on as --KEY
Runner = Callable[[list[str], Path, str], None]  # (command, log file, what it is for the error message)


def dfm(*args: Any) -> list[str]:
    return [sys.executable, "-m", "dfm_cli", *map(str, args)]


def run_command(cmd: list[str], log: Path, what: str) -> None:
    """Run one `dfm` command with its output in `log`; a failure is one line naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        last = (errors or lines or ["(no output)"])[-1]
        raise DfmError(f"{what} failed (exit {code}): {last.removeprefix('error: ')}; log: {log}")


def reference_for(sweep: Sweep, cell: Cell, out: Path) -> str:
    """What `dfm eval --ref` gets: the given reference, a built-in dataset's name (`dfm eval`
    loads it at the samples' resolution and caches its features), or an `.npz` of the
    training data written once under `out/refs/`."""
    spec, d = sweep.eval, cell.recipe.data
    if spec.reference and not (spec.reference in BUILTIN_REFERENCES and spec.reference_num):
        return spec.reference if spec.reference in BUILTIN_REFERENCES else str(Path(spec.reference).resolve())
    name = spec.reference or d.name
    classes = d.classes if name == d.name else []  # a named reference is taken whole
    if name in BUILTIN_REFERENCES and not spec.reference_num and not classes:
        return name
    path = d.path if name == d.name else ""
    tag = (
        f"{name}-{d.resolution}"
        + (f"-{d.frames}f" if d.frames else "")
        + (f"-{settings_hash(str(Path(path).resolve()))}" if path else "")
        + (f"-c{'.'.join(map(str, classes))}" if classes else "")
        + (f"-n{spec.reference_num}" if spec.reference_num else "")
    )
    target = out / "refs" / f"{tag}.npz"
    if not target.is_file():
        write_reference(name, path, d.resolution, d.frames, spec.reference_num, target, classes)
    return str(target.resolve())


def write_reference(
    name: str, path: str, resolution: int, frames: int, num: int, target: Path, classes: list[int] | None = None
) -> None:
    """The training data as an ADM `.npz` (uint8, channels last, grey as RGB): all of it (or
    only `classes`), or `num` items evenly spaced over it (so a class-sorted set keeps every class)."""
    data = build_dataset(name, path, resolution, frames, classes=classes or ())
    arr = reference_images(data, num or len(data))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    np.savez(tmp, arr_0=arr)  # the name ends in .npz, so numpy keeps it
    tmp.replace(target)


def sample_args(recipe: Recipe) -> list[str]:
    s = recipe.sample
    args = [
        "--steps",
        ",".join(map(str, s.steps)),
        "--cfg",
        repr(s.cfg),
        "--interval",
        ",".join(map(repr, s.guidance_interval)),
        "--solver",
        s.solver,
        "--shift",
        repr(s.shift),
        "--cond-noise",
        repr(s.cond_noise),
    ]
    return args + (["--tau", ",".join(map(repr, s.tau))] if s.tau else [])


def eval_settings(sweep: Sweep, reference: str) -> dict:
    spec = sweep.eval
    return {
        "metrics": sorted(spec.metrics),
        "reference": reference,
        "swd_levels": spec.swd_levels,
        **{key: str(Path(getattr(spec, key)).resolve()) for key in WEIGHTS if getattr(spec, key)},
    }


def say(progress: Progress, cell: Cell, what: str) -> None:
    """What the sweep does now, numbered by cell: `[2/4] cfg=1.5: train …`."""
    progress.say(f"[{progress.completed + 1}/{progress.total}] {cell.name}: {what}")


def run_sweep(
    sweep: Sweep,
    out: Path,
    console: Console | None = None,
    runner: Runner | None = None,
    only: list[str] | None = None,
    scored: Path | None = None,
) -> list[dict[str, Any]]:
    """Train, sample and score every cell not already done (of the rows `only` names, if any).
    The results are rewritten after every cell, over every cell of the sweep scored so far, so a
    sweep split over several sessions has its results at each stop. A cell that the results.csv
    `scored` scores (an earlier part, run on another machine) counts as done. Returns the rows."""
    console = console or Console()
    carried: dict[str, Scored] = {}
    if scored is not None:
        carried, stale = read_scored(sweep, scored)
        note = f"{scored}: {len(carried)} cells scored there are not run again"
        if stale:
            note += f"; {stale} scored lines name no cell of this sweep (settings changed) and are left out"
        console.print(note, markup=False)
    runner = runner or run_command
    out.mkdir(parents=True, exist_ok=True)
    spec = sweep.eval  # fail before anything runs
    for key in ("reference", *WEIGHTS):
        value = getattr(spec, key)
        if value and value not in BUILTIN_REFERENCES and not Path(value).exists():
            raise DfmError(
                f"{sweep.path}: eval.{key} = {value!r} does not exist (paths are relative to the current folder)"
            )
    runs = {run.run_id: run for run in sweep.runs}
    cells = [c for c in sweep.only(only or []) if c.name not in carried or (cell_dir(out, c.cell_id) / EVAL).is_file()]
    with Progress(console, "ablate", len(cells)) as progress:
        for cell in cells:
            with environment(wandb_env(sweep, runs[cell.run_id])):
                train_run(runs[cell.run_id], out, progress, cell, runner)
            if score_cell(sweep, cell, out, progress, runner):  # resumed cells change nothing
                write_results(sweep, collect(sweep, out, carried), out)
            progress.advance()
    rows = collect(sweep, out, carried)
    write_results(sweep, rows, out)
    counts = f"{len(cells)} cells, {len({c.run_id for c in cells})} runs"
    if sweep.seeded:
        counts = f"{len({c.row or c.name for c in cells})} rows, {counts} with their seeds"
    console.print(
        f"wrote {out / 'results.md'}, {out / 'results.csv'} and the plots ({counts})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return rows


def wandb_env(sweep: Sweep, run: Run) -> dict[str, str]:
    """What the training of `run` reads for its W&B run (training/loggers.py): the sweep's title
    as the group, the run's id as the name, and as config the sweep's settings of the run's
    cells (`[set]` and the swept keys, but the `sample.*` keys, in which cells sharing a run
    differ) and their names."""
    first = run.cells[0]
    settings = {k: v for k, v in {**sweep.fixed, **first.values}.items() if not k.startswith("sample.")}
    cells = [c.name for c in run.cells]
    config = {"ablate": {"sweep": sweep.title, "run": run.run_id, "cells": cells, "settings": settings}}
    return {"DFM_WANDB_GROUP": sweep.title, "DFM_WANDB_NAME": run.run_id, "DFM_WANDB_CONFIG": json.dumps(config)}


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in `os.environ` while the block runs (the subprocesses it starts inherit them)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_run(run: Run, out: Path, progress: Progress, cell: Cell, runner: Runner) -> None:
    folder = run_dir(out, run.run_id)
    manifest = claim(folder, run_settings(run.recipe))
    if is_trained(manifest):
        return
    overrides = manifest.setdefault("overrides", run.overrides)  # an unfinished run keeps its command
    cmd = dfm("train", run.base, *[a for o in overrides for a in ("--set", o)], "--out", folder)
    manifest.update(status="training", command=cmd[1:])
    write_json(folder / MANIFEST, manifest)
    say(progress, cell, f"train {folder}")
    runner(cmd, out / "logs" / f"run-{run.run_id}.log", f"dfm train for run {run.run_id}")
    manifest["status"] = "done"
    write_json(folder / MANIFEST, manifest)


def score_cell(sweep: Sweep, cell: Cell, out: Path, progress: Progress, runner: Runner) -> bool:
    """Sample and evaluate `cell` unless that is done; True when it scored the cell now."""
    folder = cell_dir(out, cell.cell_id)
    manifest = claim(folder, cell_manifest_settings(cell.recipe, sweep.eval.num, sweep.eval.seed))
    manifest.update(cell=cell.name, run=cell.run_id, values=cell.values)
    samples = folder / SAMPLES
    log = out / "logs" / f"cell-{cell.cell_id}.log"
    if not is_sampled(manifest, folder):
        manifest["samples"] = "sampling"
        write_json(folder / MANIFEST, manifest)
        say(progress, cell, f"sample {sweep.eval.num} → {samples}")
        runner(
            dfm(
                "sample",
                run_dir(out, cell.run_id),
                "--num",
                sweep.eval.num,
                "--batch",
                sweep.eval.batch,
                "--seed",
                sweep.eval.seed,
                *sample_args(cell.recipe),
                "--out",
                samples,
            ),
            log,
            f"dfm sample for cell {cell.name!r}",
        )
        manifest["samples"] = "done"
        write_json(folder / MANIFEST, manifest)
    reference = reference_for(sweep, cell, out)
    wanted = eval_settings(sweep, reference)
    result = folder / EVAL
    if manifest.get("eval") == wanted and result.is_file():
        return False
    manifest["eval"] = None
    write_json(folder / MANIFEST, manifest)
    flags = [METRIC_FLAGS[m] for m in sweep.eval.metrics]
    if "swd" in sweep.eval.metrics:
        flags += ["--swd-levels", str(sweep.eval.swd_levels)]
    for key in WEIGHTS:
        if getattr(sweep.eval, key):
            flags += [f"--{key.replace('_', '-')}", wanted[key]]
    say(progress, cell, f"eval {' '.join(sweep.eval.metrics)} against {reference}")
    runner(dfm("eval", samples, "--ref", reference, *flags, "--json", result), log, f"dfm eval for cell {cell.name!r}")
    manifest["eval"] = wanted
    write_json(folder / MANIFEST, manifest)
    return True
