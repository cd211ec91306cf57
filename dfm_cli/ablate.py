"""`dfm ablate`: a sweep of recipes trained, sampled and scored as one resumable study.

A sweep file names a base recipe and the cells to compare: a `[grid]` (the product of lists),
a list of `[[cell]]` overrides, or both (each cell crossed with the grid). Keys are recipe
keys (`"train.steps"`, `"sample.cfg"`); `[set]` overrides every cell; `[eval]` says how to
score; `baseline` names the cell(s) the ratios in `results.md` divide by.

Cells whose recipes differ only in `sample.*` keys share one trained run. Train, sample and
eval go through the public CLI in subprocesses (`python -m dfm_cli train|sample|eval`), the
most stable interface of the library. Every run folder (`runs/<id>`) and cell folder
(`cells/<id>`) holds an `ablate.json` manifest with its resolved settings; the id ends in a
hash of those settings, so an edited cell gets a new folder and old outputs are never mixed
in. A finished run or cell is reused; an unfinished one is continued (`dfm train` and
`dfm sample --num` both resume by themselves).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import re
import subprocess
import sys
import time
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tomli_w
import torch
from rich.console import Console

from dfm_cli.errors import DfmError
from dfm_cli.recipe import SECTIONS, Recipe, _check_type, _suggest, load_recipe

MANIFEST = "ablate.json"
BUILTIN_REFERENCES = ("animal-mnist", "photo-crops")  # names `dfm eval --ref` knows
METRIC_FLAGS = {"fid": "--fid", "kid": "--kid", "isc": "--isc", "fdd": "--fdd", "fvd": "--fvd",
                "swd": "--swd", "pr": "--pr"}
STARTUP_S = 5.0  # per subprocess (Python + torch imports), for --dry-run estimates
CPU_FLOPS = 5e10  # FLOP/s assumed for a model too big to time on the CPU
GPU_MFU = 0.4  # share of the device's peak assumed for a model too big to time
TIMING_BUDGET = 3e10  # largest training step (FLOPs) that --dry-run times for real


@dataclass
class EvalSpec:
    """The `[eval]` table: how each cell's samples are scored."""

    metrics: list[str] = field(default_factory=lambda: ["fid"])
    num: int = 1000  # samples per cell
    reference: str = ""  # a dataset name, .npz or folder; default: the run's training data
    reference_num: int = 0  # >0: an evenly spaced subset of the training data, written once
    seed: int = 0  # sampling noise seed
    batch: int = 64  # sampling batch (the samples do not depend on it)
    swd_levels: int = 3
    grid_samples: int = 16  # samples of each cell in samples.png
    inception_weights: str = ""  # for fid/kid/isc; default: what `dfm eval` finds offline
    dinov2_weights: str = ""  # for fdd: Meta's dinov2_vitl14_pretrain.pth
    i3d_weights: str = ""  # for fvd: i3d_torchscript.pt


@dataclass
class Cell:
    """One row of the results: a resolved recipe and where its outputs live."""

    name: str
    label: str  # the [[cell]] name it came from ("" for pure grid cells)
    values: dict[str, Any]  # swept key -> value as written
    overrides: list[str]  # `--set` strings, [set] first
    recipe: Recipe
    run_id: str
    cell_id: str


@dataclass
class Run:
    run_id: str
    base: Path  # the sweep's base recipe
    recipe: Recipe
    overrides: list[str]  # those of its first cell (the sample section only sets the final grid)
    cells: list[Cell]


@dataclass
class Sweep:
    path: Path
    title: str
    base: Path
    fixed: dict[str, Any]
    swept: list[str]
    cells: list[Cell]
    baseline: str | dict[str, Any]
    eval: EvalSpec

    @property
    def runs(self) -> list[Run]:
        runs: dict[str, Run] = {}
        for cell in self.cells:
            if cell.run_id not in runs:
                runs[cell.run_id] = Run(cell.run_id, self.base, cell.recipe, cell.overrides, [])
            runs[cell.run_id].cells.append(cell)
        return list(runs.values())


# --------------------------------------------------------------------------- parsing

TOP_KEYS = ("recipe", "title", "baseline", "set", "grid", "cell", "eval")
RECIPE_KEYS = [f"{s}.{k}" for s, cls in SECTIONS.items() for k in typing.get_type_hints(cls)]


def toml_literal(value: Any) -> str:
    """A value as `--set` reads it back.

    >>> toml_literal([0.9, 0.1]), toml_literal("DFM-N/4"), toml_literal(True)
    ('[0.9, 0.1]', '"DFM-N/4"', 'true')
    """
    if isinstance(value, list):  # inline, on one line, whatever tomli_w's array style
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return tomli_w.dumps({"v": value})[4:].strip()


def settings_hash(settings: Any) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def slug(text: str) -> str:
    """A folder-safe version of a cell name.

    >>> slug("steps=8 cfg=3.0 model.name=DFM-N/4")
    'steps=8-cfg=3.0-model.name=DFM-N-4'
    """
    return re.sub(r"[^A-Za-z0-9.=,+-]+", "-", text).strip("-")[:60] or "base"


def _flatten(where: str, table: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """`{"train": {"steps": 8}}` and `{"train.steps": 8}` both → `{"train.steps": 8}`, checked
    against the recipe schema."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if key in keep:
            flat[key] = value
            continue
        if isinstance(value, dict) and "." not in key:
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    for key in flat:
        if key.split(".")[0] in TOP_KEYS:
            raise DfmError(f"{where}: {key.split('.')[0]!r} belongs at the top of the sweep file, before the "
                           "first [table] (TOML puts a key under the table above it)")
        if key not in keep and key not in RECIPE_KEYS:
            raise DfmError(f"{where}: {key!r} is not a recipe key{_suggest(key, RECIPE_KEYS)}")
    return flat


def _format_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_format_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _auto_name(values: dict[str, Any], swept: list[str]) -> str:
    """`steps=8 cfg=3`: leaf names unless two swept keys share one (train.steps, sample.steps)."""
    leaves = [k.split(".")[1] for k in swept]
    parts = []
    for key, value in values.items():
        leaf = key.split(".")[1]
        parts.append(f"{leaf if leaves.count(leaf) == 1 else key}={_format_value(value)}")
    return " ".join(parts)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep, resolving every cell's recipe before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise DfmError(f"sweep {path} not found; pass a TOML file such as recipes/tiny/ablate.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise DfmError(f"{path}: not valid TOML: {e}") from None
    if "recipe" not in raw and set(raw) & set(SECTIONS):
        raise DfmError(f"{path} is a recipe, not a sweep: train it with `dfm train {path}`, or write a sweep "
                       f"with recipe = \"BASE.toml\" and a [grid] or [[cell]] list")
    for key in raw:
        if key not in TOP_KEYS:
            raise DfmError(f"{path}: unknown key {key!r}{_suggest(key, TOP_KEYS)} (keys: {', '.join(TOP_KEYS)})")
    if not isinstance(raw.get("recipe"), str):
        raise DfmError(f"{path}: recipe = \"BASE.toml\" is missing: name the base recipe, relative to the sweep file")
    base = (path.parent / raw["recipe"]).resolve()
    if not base.is_file():
        raise DfmError(f"{path}: recipe = {raw['recipe']!r}: {base} not found (the path is relative to the sweep file)")
    for key in ("set", "grid", "eval"):
        if not isinstance(raw.get(key, {}), dict):
            raise DfmError(f"{path}: {key} must be a [{key}] table")
    fixed = _flatten(f"{path}: [set]", raw.get("set", {}))
    grid = _flatten(f"{path}: [grid]", raw.get("grid", {}))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise DfmError(f"{path}: [grid] {key} = {values!r}: give a non-empty list of values, e.g. [8, 16]")
    specs = raw.get("cell", [])
    if not isinstance(specs, list) or not all(isinstance(c, dict) for c in specs):
        raise DfmError(f"{path}: cell must be a list of [[cell]] tables")
    cells_raw = [_flatten(f"{path}: [[cell]] {i + 1}", c, keep=("name",)) for i, c in enumerate(specs)]
    if not cells_raw and not grid:
        raise DfmError(f"{path}: nothing to sweep: add a [grid] of lists or [[cell]] tables")
    names = [c.get("name") for c in cells_raw]
    if any(n is not None and not isinstance(n, str) for n in names) or len({n for n in names if n}) < len(
            [n for n in names if n]):
        raise DfmError(f"{path}: [[cell]] names must be distinct strings, got {names}")
    for c in cells_raw:
        both = sorted(set(c) & set(grid))
        if both:
            raise DfmError(f"{path}: {both[0]} is set in both a [[cell]] and [grid]; keep it in one")
    spec = EvalSpec()
    for key, value in raw.get("eval", {}).items():
        hints = typing.get_type_hints(EvalSpec)
        if key not in hints:
            raise DfmError(f"{path}: eval.{key} is not a known key{_suggest(key, hints)} "
                           f"(keys: {', '.join(hints)})")
        setattr(spec, key, _check_type(f"{path}: eval.{key}", value, hints[key]))
    for metric in spec.metrics:
        if metric not in METRIC_FLAGS:
            raise DfmError(f"{path}: eval.metrics: unknown metric {metric!r}{_suggest(metric, METRIC_FLAGS)} "
                           f"(choose from {', '.join(METRIC_FLAGS)})")
    for key in ("num", "batch", "swd_levels"):
        if getattr(spec, key) < 1:
            raise DfmError(f"{path}: eval.{key} = {getattr(spec, key)}: must be at least 1")

    swept = list(dict.fromkeys([k for c in cells_raw for k in c if k != "name"] + list(grid)))
    cells = []
    for c in cells_raw or [{}]:
        label = c.get("name", "")
        for combo in itertools.product(*grid.values()):
            values = {**{k: v for k, v in c.items() if k != "name"}, **dict(zip(grid, combo))}
            auto = _auto_name(dict(zip(grid, combo)) if label else values, swept)
            name = " ".join(p for p in (label, auto) if p)
            overrides = [f"{k}={toml_literal(v)}" for k, v in {**fixed, **values}.items()]
            try:
                recipe = load_recipe(base, overrides)
            except DfmError as e:
                raise DfmError(f"{path}: cell {name!r}: {e}") from None
            cells.append(_make_cell(name, label, values, overrides, recipe, spec))
    if len({c.name for c in cells}) < len(cells):
        raise DfmError(f"{path}: two cells have the same settings ({', '.join(c.name for c in cells)}); "
                       "give each [[cell]] a distinct name or distinct values")
    _check_eval(path, spec, cells)
    baseline = raw.get("baseline", "")
    sweep = Sweep(path, str(raw.get("title", path.stem)), base, fixed, swept, cells, baseline, spec)
    baseline_cells(sweep)  # validates the baseline
    return sweep


def _make_cell(name: str, label: str, values: dict, overrides: list[str], recipe: Recipe, spec: EvalSpec) -> Cell:
    run_settings = {k: v for k, v in recipe.to_dict().items() if k != "sample"}
    run_id = f"{slug(_auto_name({k: v for k, v in values.items() if not k.startswith('sample.')}, list(values)))}" \
             f"-{settings_hash(run_settings)}"
    cell_settings = cell_manifest_settings(run_settings, recipe, spec)
    return Cell(name, label, values, overrides, recipe, run_id, f"{slug(name)}-{settings_hash(cell_settings)}")


def cell_manifest_settings(run_settings: dict, recipe: Recipe, spec: EvalSpec) -> dict:
    """What a cell's sample set depends on (its scoring is tracked separately)."""
    return {"run": run_settings, "sample": recipe.to_dict()["sample"], "num": spec.num, "seed": spec.seed}


def _check_eval(path: Path, spec: EvalSpec, cells: list[Cell]) -> None:
    for cell in cells:
        d = cell.recipe.data
        if not spec.reference and d.name == "store":
            raise DfmError(f"{path}: cell {cell.name!r} trains on latents (data.name = 'store'): set eval.reference "
                           "to an .npz of images or statistics (`dfm eval FOLDER --stats-out REF.npz`)")
        if "swd" in spec.metrics and d.name != "store":
            smallest = d.resolution // 2 ** (spec.swd_levels - 1)
            if smallest < 7:
                most = max(1, int(math.log2(d.resolution / 7)) + 1) if d.resolution >= 7 else 0
                raise DfmError(f"{path}: eval.swd_levels = {spec.swd_levels} is too many for {d.resolution} px "
                               f"(the coarsest SWD level would be {smallest} px, under the 7 px patch); "
                               f"use eval.swd_levels = {most}")


def baseline_cells(sweep: Sweep) -> dict[str, Cell | None]:
    """Each cell's baseline: among the cells the `baseline` selects (by [[cell]] name, or by
    key = value), the one that agrees with it on the most other swept keys. So with a
    `levels × cfg` grid and `baseline = {"flow.levels" = 1}`, each DFM cell is divided by the
    FM cell at its own cfg."""
    b = sweep.baseline
    if not b:
        return {c.name: None for c in sweep.cells}
    if isinstance(b, str):
        chosen = [c for c in sweep.cells if b in (c.label, c.name)]
        if not chosen:
            raise DfmError(f"{sweep.path}: baseline = {b!r} names no cell{_suggest(b, [c.name for c in sweep.cells])}")
        keys: set[str] = set()
    elif isinstance(b, dict):
        b = _flatten(f"{sweep.path}: baseline", b)
        keys = set(b)
        chosen = [c for c in sweep.cells if all(_same(_resolved(c.recipe, k), v) for k, v in b.items())]
        if not chosen:
            raise DfmError(f"{sweep.path}: baseline = {b} matches no cell; use the values of one of "
                           f"{', '.join(repr(c.name) for c in sweep.cells)}")
    else:
        raise DfmError(f"{sweep.path}: baseline = {b!r}: give a cell name or a table such as {{\"flow.levels\" = 1}}")
    out = {}
    for cell in sweep.cells:
        others = [k for k in sweep.swept if k not in keys]
        out[cell.name] = max(chosen, key=lambda c: sum(
            _same(_resolved(c.recipe, k), _resolved(cell.recipe, k)) for k in others))
    return out


def _resolved(recipe: Recipe, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def _same(a: Any, b: Any) -> bool:
    """Equal, counting a scalar as the one-element list a recipe broadcasts it to."""
    return a == b or (isinstance(a, list) and not isinstance(b, list) and a == [b])


# --------------------------------------------------------------------------- compute


def data_shape(recipe: Recipe) -> tuple[tuple[int, ...], str]:
    """`C [T] H W` of what the model sees, and a note when it had to be assumed."""
    d = recipe.data
    if d.name == "store":
        index = Path(d.path) / "index.json"
        if index.is_file():
            return tuple(json.loads(index.read_text())["shape"]), ""
        frames = ((d.frames - 1) // 4 + 1,) if d.frames else ()
        return (16, *frames, d.resolution // 8, d.resolution // 8), \
            "store not found: FLOPs assume 16-channel f8 latents (FLUX / CogVideoX autoencoders)"
    channels = 1 if d.name == "animal-mnist" else 3
    frames = ((d.frames or 8),) if d.name == "sprites" else ()
    return (channels, *frames, d.resolution, d.resolution), ""


def forward_flops_of(recipe: Recipe) -> float:
    """Model FLOPs of one forward pass per image. Big models are built shape-only (on the meta
    device, whose first use imports torch's compiler stack, seconds); small ones for real."""
    from dfm_cli.factory import build_model
    from dfm_cli.model import model_size
    from dfm_cli.perf import forward_flops

    m, f = recipe.model, recipe.flow
    shape = data_shape(recipe)[0]
    key = (m.name, m.pos, m.temporal_patch, shape, f.levels, tuple(f.factors), tuple(f.temporal_factors))
    if key not in _FLOPS:
        size = model_size(m.name)
        big = 12 * size.depth * size.hidden ** 2 > 2e7
        with torch.device("meta" if big else "cpu"):
            _FLOPS[key] = forward_flops(build_model(recipe, shape, 10))
    return _FLOPS[key]


_FLOPS: dict[tuple, float] = {}


def train_compute(recipe: Recipe) -> tuple[int, float]:
    """(training images, training FLOPs = 3 × forward × images)."""
    images = recipe.train.steps * recipe.train.batch_size
    return images, 3.0 * forward_flops_of(recipe) * images


def sample_flops(recipe: Recipe, num: int) -> float:
    """FLOPs of `num` samples: one forward per step, twice with guidance."""
    s = recipe.sample
    return forward_flops_of(recipe) * num * sum(s.steps) * (2 if s.cfg != 1.0 else 1)


def measured_rates(recipe: Recipe, sample_batch: int, cache: dict) -> tuple[float, float, str]:
    """FLOP/s of training and of sampling this model here, and how they were obtained: timed
    (one training step, one sampling forward) when a step is small, else a per-FLOP constant."""
    from dfm_cli.factory import build_model, pick_device, plain_pyramid
    from dfm_cli.perf import autocast_dtype, device_name, peak_tflops

    device = pick_device()
    shape = data_shape(recipe)[0]
    fwd = forward_flops_of(recipe)
    key = (recipe.model.name, shape, recipe.flow.levels, tuple(recipe.flow.factors), recipe.train.batch_size)
    if key in cache:
        return cache[key]
    batch = min(recipe.train.batch_size, int(TIMING_BUDGET // (3 * fwd)))
    if batch < 1:
        peak = peak_tflops(device_name(device), autocast_dtype(device.type, recipe.train.precision),
                           recipe.train.tf32) if device.type == "cuda" else None
        rate, how = (GPU_MFU * peak * 1e12, f"per-FLOP constant: {GPU_MFU:.0%} of {device_name(device)}'s peak") \
            if peak else (CPU_FLOPS, f"per-FLOP constant: {CPU_FLOPS / 1e9:.0f} GFLOP/s on the {device.type}")
        cache[key] = (rate, rate, how)
        return cache[key]
    model = build_model(recipe, shape, 10).to(device)
    sizes = plain_pyramid(recipe).level_sizes(shape[1:])

    def step(b: int, train: bool) -> float:
        levels = [torch.randn(b, shape[0], *s, device=device) for s in sizes]
        t, y = torch.rand(b, len(sizes), device=device), torch.zeros(b, dtype=torch.long, device=device)
        stage = torch.full((b,), len(sizes) - 1, device=device)
        seconds = []
        for _ in range(2):  # the first call warms up
            start = time.perf_counter()
            with torch.set_grad_enabled(train):
                loss = sum(o.square().mean() for o in model(levels, t, y, stage))
                if train:
                    loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return seconds[-1]

    sample_b = min(sample_batch, int(TIMING_BUDGET // fwd)) or 1
    cache[key] = (3 * fwd * batch / step(batch, True), fwd * sample_b / step(sample_b, False),
                  f"timed: one training step (batch {batch}) and one sampling forward on the {device.type}")
    return cache[key]


def plan(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per cell for `--dry-run`: its run, compute and estimated time."""
    rows, rates = [], {}
    for run in sweep.runs:
        images, flops = train_compute(run.recipe)
        train_rate, sample_rate, how = measured_rates(run.recipe, sweep.eval.batch, rates)
        train_s = flops / train_rate + STARTUP_S
        for k, cell in enumerate(run.cells):
            cell_s = sample_flops(cell.recipe, sweep.eval.num) / sample_rate + 2 * STARTUP_S
            rows.append({"cell": cell.name, "run": run.run_id, "shared": len(run.cells),
                         "train_images": images, "train_flops": flops,
                         "seconds": cell_s + (train_s if k == 0 else 0.0), "estimate": how,
                         "note": data_shape(cell.recipe)[1]})
    return rows


# --------------------------------------------------------------------------- running


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


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def _claim(folder: Path, settings: dict) -> dict:
    """The folder's manifest if it was made with `settings`; a folder made with other
    settings (only by hand: ids hash the settings) is moved aside, never mixed in."""
    manifest = _read(folder / MANIFEST)
    if manifest and manifest.get("settings") != settings:
        aside = folder.with_name(f"{folder.name}.replaced-{int(time.time())}")
        folder.rename(aside)
        manifest = {}
    return manifest or {"settings": settings}


def reference_for(sweep: Sweep, cell: Cell, out: Path) -> str:
    """What `dfm eval --ref` gets: the given reference, a built-in dataset's name (`dfm eval`
    loads it at the samples' resolution and caches its features), or an `.npz` of the
    training data written once under `out/refs/`."""
    spec, d = sweep.eval, cell.recipe.data
    if spec.reference and not (spec.reference in BUILTIN_REFERENCES and spec.reference_num):
        return spec.reference if spec.reference in BUILTIN_REFERENCES else str(Path(spec.reference).resolve())
    name = spec.reference or d.name
    if name in BUILTIN_REFERENCES and not spec.reference_num:
        return name
    path = d.path if name == d.name else ""
    tag = f"{name}-{d.resolution}" + (f"-{d.frames}f" if d.frames else "") + \
        (f"-{settings_hash(str(Path(path).resolve()))}" if path else "") + \
        (f"-n{spec.reference_num}" if spec.reference_num else "")
    target = out / "refs" / f"{tag}.npz"
    if not target.is_file():
        write_reference(name, path, d.resolution, d.frames, spec.reference_num, target)
    return str(target.resolve())


def write_reference(name: str, path: str, resolution: int, frames: int, num: int, target: Path) -> None:
    """The training data as an ADM `.npz` (uint8, channels last, grey as RGB): all of it, or
    `num` items evenly spaced over it (so a class-sorted set keeps every class)."""
    from dfm_cli.data import build_dataset
    from dfm_cli.train_eval import reference_images

    data = build_dataset(name, path, resolution, frames)
    arr = reference_images(data, num or len(data))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    np.savez(tmp, arr_0=arr)  # the name ends in .npz, so numpy keeps it
    tmp.replace(target)


def sample_args(recipe: Recipe) -> list[str]:
    s = recipe.sample
    args = ["--steps", ",".join(map(str, s.steps)), "--cfg", repr(s.cfg),
            "--interval", ",".join(map(repr, s.guidance_interval)), "--solver", s.solver]
    return args + (["--tau", ",".join(map(repr, s.tau))] if s.tau else [])


def eval_settings(sweep: Sweep, reference: str) -> dict:
    spec = sweep.eval
    return {"metrics": sorted(spec.metrics), "reference": reference, "swd_levels": spec.swd_levels,
            **{key: str(Path(getattr(spec, key)).resolve()) for key in WEIGHTS if getattr(spec, key)}}


WEIGHTS = ("inception_weights", "dinov2_weights", "i3d_weights")


class Progress:
    """A rich progress line over cells on a terminal, plain log lines otherwise."""

    def __init__(self, console: Console, total: int):
        self.console, self.total, self.done = console, total, 0
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(TextColumn("ablate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("{task.description}"), console=console)
            self.task = self.bar.add_task("", total=total)

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def say(self, cell: Cell, what: str) -> None:
        text = f"[{self.done + 1}/{self.total}] {cell.name}: {what}"
        if self.bar:
            self.bar.update(self.task, description=text)
        else:
            self.console.print(f"ablate {text}", markup=False, highlight=False, soft_wrap=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar:
            self.bar.update(self.task, completed=self.done)


def run_sweep(sweep: Sweep, out: Path, console: Console | None = None,
              runner: Callable[[list[str], Path, str], None] | None = None) -> list[dict[str, Any]]:
    """Train, sample and score every cell not already done; write the results. Returns the rows."""
    console = console or Console()
    runner = runner or run_command
    out.mkdir(parents=True, exist_ok=True)
    spec = sweep.eval  # fail before anything runs
    for key in ("reference", "inception_weights", "dinov2_weights", "i3d_weights"):
        value = getattr(spec, key)
        if value and value not in BUILTIN_REFERENCES and not Path(value).exists():
            raise DfmError(f"{sweep.path}: eval.{key} = {value!r} does not exist (paths are relative to the "
                           "current folder)")
    runs = {run.run_id: run for run in sweep.runs}
    with Progress(console, len(sweep.cells)) as progress:
        for cell in sweep.cells:
            train_run(runs[cell.run_id], out, progress, cell, runner)
            score_cell(sweep, cell, out, progress, runner)
            progress.advance()
    rows = collect(sweep, out)
    write_results(sweep, rows, out)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.csv'} and the plots "
                  f"({len(sweep.cells)} cells, {len(runs)} runs)", markup=False, highlight=False, soft_wrap=True)
    return rows


def train_run(run: Run, out: Path, progress: Progress, cell: Cell, runner) -> None:
    folder = out / "runs" / run.run_id
    settings = {k: v for k, v in run.recipe.to_dict().items() if k != "sample"}
    manifest = _claim(folder, settings)
    if manifest.get("status") == "done":
        return
    overrides = manifest.setdefault("overrides", run.overrides)  # an unfinished run keeps its command
    cmd = dfm("train", run.base, *[a for o in overrides for a in ("--set", o)], "--out", folder)
    manifest.update(status="training", command=cmd[1:])
    _write(folder / MANIFEST, manifest)
    progress.say(cell, f"train {folder}")
    runner(cmd, out / "logs" / f"run-{run.run_id}.log", f"dfm train for run {run.run_id}")
    manifest["status"] = "done"
    _write(folder / MANIFEST, manifest)


def score_cell(sweep: Sweep, cell: Cell, out: Path, progress: Progress, runner) -> None:
    folder = out / "cells" / cell.cell_id
    run_dir = out / "runs" / cell.run_id
    settings = cell_manifest_settings({k: v for k, v in cell.recipe.to_dict().items() if k != "sample"},
                                      cell.recipe, sweep.eval)
    manifest = _claim(folder, settings)
    manifest.update(cell=cell.name, run=cell.run_id, values=cell.values)
    samples = folder / "samples.npz"
    log = out / "logs" / f"cell-{cell.cell_id}.log"
    if manifest.get("samples") != "done" or not samples.is_file():
        manifest["samples"] = "sampling"
        _write(folder / MANIFEST, manifest)
        progress.say(cell, f"sample {sweep.eval.num} → {samples}")
        runner(dfm("sample", run_dir, "--num", sweep.eval.num, "--batch", sweep.eval.batch, "--seed",
                   sweep.eval.seed, *sample_args(cell.recipe), "--out", samples), log,
               f"dfm sample for cell {cell.name!r}")
        manifest["samples"] = "done"
        _write(folder / MANIFEST, manifest)
    reference = reference_for(sweep, cell, out)
    wanted = eval_settings(sweep, reference)
    result = folder / "eval.json"
    if manifest.get("eval") == wanted and result.is_file():
        return
    manifest["eval"] = None
    _write(folder / MANIFEST, manifest)
    flags = [METRIC_FLAGS[m] for m in sweep.eval.metrics]
    if "swd" in sweep.eval.metrics:
        flags += ["--swd-levels", str(sweep.eval.swd_levels)]
    for key in WEIGHTS:
        if getattr(sweep.eval, key):
            flags += [f"--{key.replace('_', '-')}", wanted[key]]
    progress.say(cell, f"eval {' '.join(sweep.eval.metrics)} against {reference}")
    runner(dfm("eval", samples, "--ref", reference, *flags, "--json", result), log,
           f"dfm eval for cell {cell.name!r}")
    manifest["eval"] = wanted
    _write(folder / MANIFEST, manifest)


# --------------------------------------------------------------------------- results

SKIP_METRICS = ("num_samples", "seconds")


def collect(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """One row per cell: its settings, training compute, metrics and ratios to its baseline."""
    bases = baseline_cells(sweep)
    metrics = {c.name: _read(out / "cells" / c.cell_id / "eval.json").get("metrics", {}) for c in sweep.cells}
    rows = []
    for cell in sweep.cells:
        images, flops = train_compute(cell.recipe)
        row: dict[str, Any] = {"cell": cell.name}
        row.update({k: _format_value(_resolved(cell.recipe, k)) for k in sweep.swept})
        row.update(run=cell.run_id, train_images=images, train_flops=flops)
        found = {k: v for k, v in metrics[cell.name].items() if k not in SKIP_METRICS}
        row.update(found)
        base = bases[cell.name]
        row["baseline"] = base.name if base else ""
        for key, value in found.items():
            ref = metrics[base.name].get(key) if base else None
            row[f"{key}_vs_baseline"] = value / ref if ref else None
        rows.append(row)
    return rows


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics shown in results.md and plotted: no per-level or spread columns."""
    keys = []
    for row in rows:
        for k in row:
            if (k.endswith("_vs_baseline") or k in ("cell", "run", "train_images", "train_flops", "baseline")
                    or k.startswith("swd_level_") or k.endswith("_std")):
                continue
            if isinstance(row[k], float) and k not in keys:
                keys.append(k)
    return keys


def write_results(sweep: Sweep, rows: list[dict[str, Any]], out: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(results_markdown(sweep, rows))
    for key in sweep.swept:
        plot_key(rows, key, sweep.swept, out / f"plot_{slug(key)}.png")
    plot_curves(sweep, out, out / "curves.png")
    sample_grid(sweep, out, out / "samples.png")


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def results_markdown(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    metrics = headline(rows)
    spec = sweep.eval
    lines = [f"# {sweep.title}", "",
             f"Base recipe `{sweep.base.name}`" + (", with " + ", ".join(f"`{k} = {toml_literal(v)}`"
                                                                        for k, v in sweep.fixed.items())
                                                     if sweep.fixed else "") + ".",
             f"{spec.num} samples per cell (seed {spec.seed}); metrics: {', '.join(spec.metrics)}.",
             "Training compute = images × 3 × the model's forward FLOPs per image.", ""]
    header = ["cell", *sweep.swept, "train images", "train FLOPs"]
    for m in metrics:
        header += [m, f"{m} / baseline"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        name = row["cell"] + (" (baseline)" if row["baseline"] == row["cell"] else "")
        cells = [name, *[str(row[k]) for k in sweep.swept], f"{row['train_images']:,}", f"{row['train_flops']:.3g}"]
        for m in metrics:
            ratio = row.get(f"{m}_vs_baseline")
            cells += [_num(row.get(m)), "–" if ratio is None else f"{ratio:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(row["baseline"] for row in rows):
        lines += ["", "Ratios divide by each cell's baseline: " + ", ".join(
            sorted({f"`{row['baseline']}`" for row in rows})) + "."]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_key(rows: list[dict[str, Any]], key: str, swept: list[str], path: Path) -> None:
    """Each headline metric against `key`'s values, one line per setting of the other keys."""
    metrics = headline(rows)
    if not metrics:
        return
    plt = _pyplot()
    xs = list(dict.fromkeys(row[key] for row in rows))
    numeric = all(_is_number(x) for x in xs)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    others = [k for k in swept if k != key]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(" ".join(f"{k.split('.')[1]}={row[k]}" for k in others), []).append(row)
    for ax, metric in zip(axes[0], metrics):
        for label, members in groups.items():
            pts = [(float(r[key]) if numeric else xs.index(r[key]), r[metric]) for r in members
                   if isinstance(r.get(metric), float)]
            if pts:
                pts.sort()
                ax.plot(*zip(*pts), marker="o", label=label or None)
        if not numeric:
            ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def training_curves(stats: Path) -> dict[str, list[tuple[float, float]]]:
    """`eval_*` values against training images from a run's `stats.jsonl` (the last line per
    step wins, as a resumed run may repeat steps)."""
    by_step: dict[Any, dict] = {}
    if stats.is_file():
        for line in stats.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(k.startswith("eval_") for k in row):
                by_step[row.get("step", len(by_step))] = row
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in by_step.values():
        images = row.get("images", row.get("images_seen"))
        for k, v in row.items():
            if k.startswith("eval_") and isinstance(v, (int, float)) and images is not None:
                curves.setdefault(k, []).append((float(images), float(v)))
    return {k: sorted(v) for k, v in curves.items()}


def plot_curves(sweep: Sweep, out: Path, path: Path) -> None:
    """Metric against training images for every run that evaluated while training."""
    runs = {run.run_id: training_curves(out / "runs" / run.run_id / "stats.jsonl") for run in sweep.runs}
    metrics = sorted({m for curves in runs.values() for m in curves})
    if not metrics:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for run_id, curves in runs.items():
            if metric in curves:
                ax.plot(*zip(*curves[metric]), marker=".", label=run_id.rsplit("-", 1)[0])
        ax.set_xlabel("training images")
        ax.set_ylabel(metric.removeprefix("eval_"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_grid(sweep: Sweep, out: Path, path: Path) -> None:
    """The first `eval.grid_samples` samples of every cell, side by side, labelled."""
    from dfm_cli.media import grid as tile

    tiles = []
    for cell in sweep.cells:
        samples = out / "cells" / cell.cell_id / "samples.npz"
        if samples.is_file():
            with np.load(samples) as data:
                images = data["arr_0"][: sweep.eval.grid_samples]
            if images.ndim == 5:  # video: the first frame
                images = images[:, 0]
            x = torch.from_numpy(images).movedim(-1, 1).float() / 127.5 - 1
            tiles.append((cell.name, tile(x)))
    if not tiles:
        return
    plt = _pyplot()
    cols = min(len(tiles), 4)
    rows = math.ceil(len(tiles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, image) in zip(axes.flat, tiles):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

