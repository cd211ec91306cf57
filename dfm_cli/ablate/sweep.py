"""The sweep file's schema: read and validated into cells, each with its resolved recipe and
the ids its run and cell folders are named by, before anything trains.

A sweep file names a base recipe and the cells to compare: a `[grid]` (the product of lists),
a list of `[[cell]]` overrides, or both (each cell crossed with the grid). Keys are recipe
keys (`"train.steps"`, `"sample.cfg"`); `[set]` overrides every cell; `[eval]` says how to
score; `baseline` names the cell(s) the ratios in `results.md` divide by; `seeds = N` trains
every cell N times (`train.seed` = s, s+1, …, s+N-1 from the cell's own seed s).

A results row is a group of cells identical but for `train.seed`: the seed replicates of one
setting, whether `seeds` made them or the cells vary `train.seed` themselves.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from dfm_cli.ablate.ids import cell_manifest_settings, run_settings, settings_hash
from dfm_cli.config.recipe import SECTIONS, Recipe, _check_type, load_recipe
from dfm_cli.errors import DfmError, suggest

METRIC_FLAGS = {
    "fid": "--fid",
    "kid": "--kid",
    "isc": "--isc",
    "fdd": "--fdd",
    "fvd": "--fvd",
    "swd": "--swd",
    "pr": "--pr",
}


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


# The smallest value of each number in `[eval]`.
EVAL_LEAST = {"num": 1, "reference_num": 0, "seed": 0, "batch": 1, "swd_levels": 1, "grid_samples": 1}


@dataclass
class Cell:
    """One trained, sampled and scored setting: a resolved recipe and where its outputs live.
    The cells of one results row differ only in `train.seed`."""

    name: str
    label: str  # the [[cell]] name it came from ("" for pure grid cells)
    values: dict[str, Any]  # swept key -> value as written
    overrides: list[str]  # `--set` strings, [set] first
    recipe: Recipe
    run_id: str
    cell_id: str
    row: str = ""  # the name of its results row: its own name without the seed

    @property
    def seed(self) -> int:
        return self.recipe.train.seed


@dataclass
class Row:
    """One row of the results: the seed replicates of one setting, in seed order."""

    name: str
    cells: list[Cell]

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.cells]


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
    seeds: int = 1  # `seeds = N`: training seeds per cell
    seeded: bool = False  # seeds > 1, or a cell sets train.seed: the results report seeds

    @property
    def rows(self) -> list[Row]:
        """The results rows, in the order their first cell runs."""
        rows: dict[str, Row] = {}
        for cell in self.cells:
            rows.setdefault(cell.row or cell.name, Row(cell.row or cell.name, [])).cells.append(cell)
        for row in rows.values():
            row.cells.sort(key=lambda c: c.seed)
        return list(rows.values())

    def only(self, patterns: list[str]) -> list[Cell]:
        """The cells of the results rows that `patterns` name (shell patterns on row names,
        e.g. "DFM-*"), every seed of each; all cells when there are none. A pattern that names
        no row is refused, so a typo never runs an empty sweep."""
        if not patterns:
            return self.cells
        names = [row.name for row in self.rows]
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                raise DfmError(
                    f"{self.path}: --only {pattern!r} names no results row{suggest(pattern, names)}."
                    f" The rows are: {'; '.join(names)}."
                )
        return [c for c in self.cells if any(fnmatch.fnmatchcase(c.row or c.name, p) for p in patterns)]

    @property
    def runs(self) -> list[Run]:
        runs: dict[str, Run] = {}
        for cell in self.cells:
            if cell.run_id not in runs:
                runs[cell.run_id] = Run(cell.run_id, self.base, cell.recipe, cell.overrides, [])
            runs[cell.run_id].cells.append(cell)
        return list(runs.values())


# --------------------------------------------------------------------------- parsing

TOP_KEYS = ("recipe", "title", "baseline", "seeds", "set", "grid", "cell", "eval")
SEED = "train.seed"  # the key whose values are replicates of one row, not rows
RECIPE_KEYS = [f"{s}.{k}" for s, cls in SECTIONS.items() for k in typing.get_type_hints(cls)]


def toml_literal(value: Any) -> str:
    """A value as `--set` reads it back.

    >>> toml_literal([0.9, 0.1]), toml_literal("DFM-N/4"), toml_literal(True)
    ('[0.9, 0.1]', '"DFM-N/4"', 'true')
    """
    if isinstance(value, list):  # inline, on one line, whatever tomli_w's array style
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return tomli_w.dumps({"v": value})[4:].strip()


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
        if key.split(".")[0] in TOP_KEYS and key not in keep:
            raise DfmError(
                f"{where}: {key.split('.')[0]!r} belongs at the top of the sweep file, before the "
                "first [table] (TOML puts a key under the table above it)"
            )
        if key not in keep and key not in RECIPE_KEYS:
            raise DfmError(f"{where}: {key!r} is not a recipe key{suggest(key, RECIPE_KEYS)}")
    return flat


def format_value(value: Any) -> str:
    """A value as cell names and the results show it.

    >>> format_value(3.0), format_value([0.9, 0.1]), format_value("DFM-N/4")
    ('3', '0.9,0.1', 'DFM-N/4')
    """
    if isinstance(value, list):
        return ",".join(format_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _auto_name(values: dict[str, Any], swept: list[str]) -> str:
    """`steps=8 cfg=3`: leaf names unless two swept keys share one (train.steps, sample.steps)."""
    leaves = [k.split(".")[1] for k in swept]
    parts = []
    for key, value in values.items():
        leaf = key.split(".")[1]
        parts.append(f"{leaf if leaves.count(leaf) == 1 else key}={format_value(value)}")
    return " ".join(parts)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep, resolving every cell's recipe before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise DfmError(f"sweep {path} not found; pass a TOML file such as recipes/tiny/ablate.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (some Windows editors write one) is dropped
    except tomllib.TOMLDecodeError as e:
        raise DfmError(f"{path}: not valid TOML: {e}") from None
    if "recipe" not in raw and set(raw) & set(SECTIONS):
        raise DfmError(
            f"{path} is a recipe, not a sweep: train it with `dfm train {path}`, or write a sweep "
            f'with recipe = "BASE.toml" and a [grid] or [[cell]] list'
        )
    for key in raw:
        if key not in TOP_KEYS:
            raise DfmError(f"{path}: unknown key {key!r}{suggest(key, TOP_KEYS)} (keys: {', '.join(TOP_KEYS)})")
    if not isinstance(raw.get("recipe"), str):
        raise DfmError(f'{path}: recipe = "BASE.toml" is missing: name the base recipe, relative to the sweep file')
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
    cells_raw = [_flatten(f"{path}: [[cell]] {i + 1}", c, keep=("name", "seeds")) for i, c in enumerate(specs)]
    if not cells_raw and not grid:
        raise DfmError(f"{path}: nothing to sweep: add a [grid] of lists or [[cell]] tables")
    names = [c.get("name") for c in cells_raw]
    if any(n is not None and not isinstance(n, str) for n in names) or len({n for n in names if n}) < len(
        [n for n in names if n]
    ):
        raise DfmError(f"{path}: [[cell]] names must be distinct strings, got {names}")
    for c in cells_raw:
        both = sorted(set(c) & set(grid))
        if both:
            raise DfmError(f"{path}: {both[0]} is set in both a [[cell]] and [grid]; keep it in one")
    spec = EvalSpec()
    for key, value in raw.get("eval", {}).items():
        hints = typing.get_type_hints(EvalSpec)
        if key not in hints:
            raise DfmError(f"{path}: eval.{key} is not a known key{suggest(key, hints)} (keys: {', '.join(hints)})")
        setattr(spec, key, _check_type(f"{path}: eval.{key}", value, hints[key]))
    for metric in spec.metrics:
        if metric not in METRIC_FLAGS:
            raise DfmError(
                f"{path}: eval.metrics: unknown metric {metric!r}{suggest(metric, METRIC_FLAGS)} "
                f"(choose from {', '.join(METRIC_FLAGS)})"
            )
    for key, least in EVAL_LEAST.items():
        if getattr(spec, key) < least:
            raise DfmError(f"{path}: eval.{key} = {getattr(spec, key)}: must be at least {least}")

    seeds = _seeds(path, "seeds", raw.get("seeds", 1))
    cell_seeds = [
        _seeds(path, f"[[cell]] {c.get('name', i + 1)!r} seeds", c.get("seeds", seeds)) for i, c in enumerate(cells_raw)
    ]
    cells_raw = [{k: v for k, v in c.items() if k != "seeds"} for c in cells_raw]

    swept = list(dict.fromkeys([k for c in cells_raw for k in c if k != "name"] + list(grid)))
    row_keys = [k for k in swept if k != SEED]
    firsts = []  # each cell at its first seed: (label, values, name, row name, recipe, its seed count)
    for c, n_seeds in zip(cells_raw or [{}], cell_seeds or [seeds]):
        label = c.get("name", "")
        for combo in itertools.product(*grid.values()):
            values = {**{k: v for k, v in c.items() if k != "name"}, **dict(zip(grid, combo))}
            named = dict(zip(grid, combo)) if label else values
            name = " ".join(p for p in (label, _auto_name(named, swept)) if p)
            row = " ".join(p for p in (label, _auto_name(_without_seed(named), row_keys)) if p) or "base"
            firsts.append((label, values, name, row, _resolve(path, base, fixed, values, name), n_seeds))
    cells = []
    for k in range(max(n for *_, n in firsts)):  # seed-major: every row's first seed runs before any row's second
        for label, values, name, row, recipe, n_seeds in firsts:
            if k >= n_seeds:
                continue
            if k:  # the first seed keeps the name (and folders) a single-seed sweep gives it
                seed = recipe.train.seed + k
                values, name = {**values, SEED: seed}, f"{row} seed={seed}"
                recipe = _resolve(path, base, fixed, values, name)
            overrides = [f"{key}={toml_literal(v)}" for key, v in {**fixed, **values}.items()]
            cells.append(_make_cell(name, label, values, overrides, recipe, spec, row))
    if len({c.name for c in cells}) < len(cells):
        raise DfmError(
            f"{path}: two cells have the same settings ({', '.join(c.name for c in cells)}); "
            "give each [[cell]] a distinct name or distinct values"
        )
    _check_replicates(path, cells)
    _check_eval(path, spec, cells)
    baseline = raw.get("baseline", "")
    seeded = max(n for *_, n in firsts) > 1 or SEED in swept
    sweep = Sweep(path, str(raw.get("title", path.stem)), base, fixed, row_keys, cells, baseline, spec, seeds, seeded)
    baseline_cells(sweep)  # validates the baseline
    return sweep


def _without_seed(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != SEED}


def _resolve(path: Path, base: Path, fixed: dict[str, Any], values: dict[str, Any], name: str) -> Recipe:
    overrides = [f"{k}={toml_literal(v)}" for k, v in {**fixed, **values}.items()]
    try:
        return load_recipe(base, overrides)
    except DfmError as e:
        raise DfmError(f"{path}: cell {name!r}: {e}") from None


def _check_replicates(path: Path, cells: list[Cell]) -> None:
    """The cells of a row differ in `train.seed`, and in nothing else."""
    first: dict[tuple[str, int], Cell] = {}
    for cell in cells:
        other = first.setdefault((cell.row, cell.seed), cell)
        if other is not cell:
            raise DfmError(
                f"{path}: cells {other.name!r} and {cell.name!r} both train row {cell.row!r} with "
                f"train.seed = {cell.seed}; the cells of a row need distinct seeds (with seeds = N, each "
                "trains train.seed = s … s+N-1 from its own seed s)"
            )
    settings: dict[str, tuple[Cell, dict]] = {}
    for cell in cells:
        mine = cell.recipe.to_dict()
        mine["train"].pop("seed")
        other, theirs = settings.setdefault(cell.row, (cell, mine))
        if theirs != mine:
            raise DfmError(
                f"{path}: cells {other.name!r} and {cell.name!r} make one results row {cell.row!r} but "
                "differ in more than train.seed; give them distinct names or values"
            )


def _seeds(path: Path, key: str, value: Any) -> int:
    """A count of training seeds (`seeds = N` for the sweep, or in one [[cell]])."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DfmError(
            f"{path}: {key} = {value!r}: give the number of training seeds per cell, a whole number "
            "of at least 1 (e.g. seeds = 3)"
        )
    return value


def _make_cell(
    name: str, label: str, values: dict, overrides: list[str], recipe: Recipe, spec: EvalSpec, row: str = ""
) -> Cell:
    run_id = (
        f"{slug(_auto_name({k: v for k, v in values.items() if not k.startswith('sample.')}, list(values)))}"
        f"-{settings_hash(run_settings(recipe))}"
    )
    cell_settings = cell_manifest_settings(recipe, spec.num, spec.seed)
    cell_id = f"{slug(name)}-{settings_hash(cell_settings)}"
    return Cell(name, label, values, overrides, recipe, run_id, cell_id, row or name)


def _check_eval(path: Path, spec: EvalSpec, cells: list[Cell]) -> None:
    for cell in cells:
        d = cell.recipe.data
        if not spec.reference and d.name == "store":
            raise DfmError(
                f"{path}: cell {cell.name!r} trains on latents (data.name = 'store'): set eval.reference "
                "to an .npz of images or statistics (`dfm eval FOLDER --stats-out REF.npz`)"
            )
        if "swd" in spec.metrics and d.name != "store":
            smallest = d.resolution // 2 ** (spec.swd_levels - 1)
            if smallest < 7:
                most = max(1, int(math.log2(d.resolution / 7)) + 1) if d.resolution >= 7 else 0
                raise DfmError(
                    f"{path}: eval.swd_levels = {spec.swd_levels} is too many for {d.resolution} px "
                    f"(the coarsest SWD level would be {smallest} px, under the 7 px patch); "
                    f"use eval.swd_levels = {most}"
                )


def baseline_cells(sweep: Sweep) -> dict[str, Cell | None]:
    """Each cell's baseline: among the cells the `baseline` selects (by [[cell]] name, or by
    key = value), the one that agrees with it on the most other swept keys. So with a
    `levels × cfg` grid and `baseline = {"flow.levels" = 1}`, each DFM cell is divided by the
    FM cell at its own cfg."""
    b = sweep.baseline
    if not b:
        return {c.name: None for c in sweep.cells}
    if isinstance(b, str):
        chosen = [c for c in sweep.cells if b in (c.label, c.name, c.row)]
        if not chosen:
            raise DfmError(f"{sweep.path}: baseline = {b!r} names no cell{suggest(b, [c.name for c in sweep.cells])}")
        keys: set[str] = set()
    elif isinstance(b, dict):
        b = _flatten(f"{sweep.path}: baseline", b)
        keys = set(b)
        chosen = [c for c in sweep.cells if all(_same(recipe_value(c.recipe, k), v) for k, v in b.items())]
        if not chosen:
            raise DfmError(
                f"{sweep.path}: baseline = {b} matches no cell; use the values of one of "
                f"{', '.join(repr(c.name) for c in sweep.cells)}"
            )
    else:
        raise DfmError(f'{sweep.path}: baseline = {b!r}: give a cell name or a table such as {{"flow.levels" = 1}}')
    out: dict[str, Cell | None] = {}
    for cell in sweep.cells:
        others = [k for k in sweep.swept if k not in keys]
        out[cell.name] = max(
            chosen, key=lambda c: sum(_same(recipe_value(c.recipe, k), recipe_value(cell.recipe, k)) for k in others)
        )
    return out


def baseline_rows(sweep: Sweep) -> dict[str, Row | None]:
    """Each row's baseline row: the row of its first cell's baseline cell."""
    bases = baseline_cells(sweep)
    rows = {row.name: row for row in sweep.rows}
    out: dict[str, Row | None] = {}
    for row in rows.values():
        base = bases[row.cells[0].name]
        out[row.name] = rows[base.row] if base else None
    return out


def recipe_value(recipe: Recipe, key: str) -> Any:
    """The recipe's resolved value of a `section.name` key."""
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def _same(a: Any, b: Any) -> bool:
    """Equal, counting a scalar as the one-element list a recipe broadcasts it to."""
    return a == b or (isinstance(a, list) and not isinstance(b, list) and a == [b])
