"""A sweep's in-training curves (the `eval_*` values a run logs while it trains) against
training FLOPs, per row over its seeds, and the share of its baseline's compute at which each
row reaches the baseline's final value: the study's "FM's FID at what fraction of its compute".

The curves travel in results.csv (a `curves` column, `encode_curves`), so a cell scored on
another machine (`--scored`) keeps its curve when its run's stats.jsonl is not here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dfm_cli.ablate.compute import train_compute
from dfm_cli.ablate.statistics import mean
from dfm_cli.ablate.sweep import Sweep, baseline_rows
from dfm_cli.evaluation.gates import GATES


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


def encode_curves(curves: dict[str, list[tuple[float, float]]]) -> str:
    """`training_curves` as one results.csv field: `metric@images=value` items, space separated.

    >>> encode_curves({"eval_fid": [(64000.0, 162.7), (128000.0, 138.1)]})
    'eval_fid@64000=162.7 eval_fid@128000=138.1'
    """
    return " ".join(f"{m}@{images:.0f}={value:.7g}" for m, points in curves.items() for images, value in points)


def decode_curves(text: str) -> dict[str, list[tuple[float, float]]]:
    """`encode_curves`'s inverse; ValueError on an item that is not `metric@images=value`."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for item in text.split():
        metric, _, rest = item.partition("@")
        images, _, value = rest.partition("=")
        if not metric.startswith("eval_") or not value:
            raise ValueError(f"{item!r} is not metric@images=value (e.g. eval_fid@64000=162.7)")
        curves.setdefault(metric, []).append((float(images), float(value)))
    return {m: sorted(points) for m, points in curves.items()}


Point = tuple[float, float, float, float]  # training FLOPs, mean, min, max over seeds


def row_curves(sweep: Sweep, lines: list[dict[str, Any]]) -> dict[str, dict[str, list[Point]]]:
    """Each row's in-training `eval_*` curves against training FLOPs (images × 3 × forward
    FLOPs, as the results count them), from the `curves` of `lines` (results.collect's): at
    each evaluation, the mean, least and greatest value over the row's seeds. Rows whose runs
    evaluated nothing are left out."""
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for run in sweep.runs:
        images, flops = train_compute(run.recipe)
        per_image = flops / images if images else 0.0
        text = next((line["curves"] for line in lines if line["run"] == run.run_id and line.get("curves")), "")
        runs[run.run_id] = {m: [(x * per_image, v) for x, v in pts] for m, pts in decode_curves(text).items()}
    rows: dict[str, dict[str, list[Point]]] = {}
    for row in sweep.rows:
        at: dict[str, dict[float, list[float]]] = {}
        for run_id in dict.fromkeys(c.run_id for c in row.cells):
            for metric, points in runs[run_id].items():
                for x, v in points:
                    at.setdefault(metric, {}).setdefault(x, []).append(v)
        if at:
            rows[row.name] = {
                m: [(x, mean(vs), min(vs), max(vs)) for x, vs in sorted(by_x.items())] for m, by_x in at.items()
            }
    return rows


def curve_series(sweep: Sweep, lines: list[dict[str, Any]]) -> dict[str, dict[str, list[Point]]]:
    """`row_curves` as plotted: rows that share their runs (they differ only in `sample.*`
    keys) share one line, labelled with all their names."""
    curves = row_curves(sweep, lines)
    labels: dict[tuple[str, ...], list[str]] = {}
    for row in sweep.rows:
        if row.name in curves:
            labels.setdefault(tuple(c.run_id for c in row.cells), []).append(row.name)
    return {" / ".join(names): curves[names[0]] for names in labels.values()}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` (`eval_` prefix or not) is better, as `dfm eval`'s
    gates say (`--min-isc`, `--min-recall`); otherwise smaller is better (FID, SWD, …)."""
    name = metric.removeprefix("eval_")
    return any(direction == "min" and name in keys for keys, direction, _ in GATES.values())


def reach_fraction(
    curve: list[tuple[float, float]], target: float, total: float, higher: bool = False
) -> tuple[float | None, bool]:
    """The fraction of `total` compute at which `curve` (FLOPs, value) first reaches `target`,
    interpolated linearly in log FLOPs between the two evaluations around the crossing, and
    whether it was already reached at the first evaluation (so the fraction is an upper bound).
    (None, False) when it never reaches it.

    >>> round(reach_fraction([(1e9, 10.0), (1e10, 5.0)], 7.5, 2e10)[0], 6)  # 10^9.5 / 2e10
    0.158114
    """
    reached = (lambda v: v >= target) if higher else (lambda v: v <= target)
    for i, (x, v) in enumerate(curve):
        if not reached(v):
            continue
        if i == 0:
            return x / total, True
        x0, v0 = curve[i - 1]
        share = (target - v0) / (v - v0)
        return math.exp(math.log(x0) + share * (math.log(x) - math.log(x0))) / total, False
    return None, False


def compute_to_baseline(sweep: Sweep, lines: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float | None, bool]]]:
    """For each row with a baseline row and curves, per `eval_*` metric both have: the
    fraction of the baseline's compute (at its last evaluation) at which the row's mean curve
    reaches the baseline's final mean value (`reach_fraction`)."""
    curves = row_curves(sweep, lines)
    bases = baseline_rows(sweep)
    found: dict[str, dict[str, tuple[float | None, bool]]] = {}
    for row in sweep.rows:
        base = bases[row.name]
        if base is None or row.name not in curves or base.name not in curves:
            continue
        found[row.name] = {}
        for metric, points in curves[row.name].items():
            ref = curves[base.name].get(metric)
            if ref:
                total, target = ref[-1][0], ref[-1][1]
                centres = [(x, m) for x, m, _, _ in points]
                found[row.name][metric] = reach_fraction(centres, target, total, higher_is_better(metric))
    return found


def compute_to_baseline_markdown(sweep: Sweep, lines: list[dict[str, Any]]) -> list[str]:
    """results.md's section on `compute_to_baseline` (nothing when no run evaluated while
    training, or there is no baseline)."""
    found = compute_to_baseline(sweep, lines)
    metrics = sorted({m for per in found.values() for m in per})
    if not metrics:
        return []
    bases = baseline_rows(sweep)
    md = [
        "",
        "## Compute to reach the baseline",
        "",
        "The fraction of its baseline's training FLOPs (at the baseline's last in-training evaluation) "
        "at which each row's in-training curve (`eval_*` in stats.jsonl, kept in results.csv's `curves`; "
        "the mean over its seeds) first reaches the baseline's final value, interpolated linearly in "
        "log FLOPs between evaluations; ≤ when it was already reached at the first evaluation.",
        "",
        "| cell | baseline | " + " | ".join(m.removeprefix("eval_") for m in metrics) + " |",
        "|" + "---|" * (2 + len(metrics)),
    ]
    for name, per in found.items():
        base = bases[name]
        cells = [name, base.name if base else ""]
        for metric in metrics:
            fraction, first = per.get(metric, (None, False))
            cells.append(
                "–" if metric not in per else "not reached" if fraction is None else f"{'≤ ' * first}{fraction:.3g}"
            )
        md.append("| " + " | ".join(cells) + " |")
    return md
