"""What a sweep found: one row per cell with its settings, training compute, metrics and
ratios to its baseline, written as `results.csv` and `results.md`, a plot per swept key,
the in-training curves and a grid of every cell's samples. Reads only what is on disk, so
it reports a partly run sweep as well.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfm_cli.ablate.compute import train_compute
from dfm_cli.ablate.layout import EVAL, SAMPLES, cell_dir, read_json, run_dir
from dfm_cli.ablate.sweep import Sweep, baseline_cells, format_value, recipe_value, slug, toml_literal

SKIP_METRICS = ("num_samples", "seconds")


def collect(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """One row per cell: its settings, training compute, metrics and ratios to its baseline."""
    bases = baseline_cells(sweep)
    metrics = {c.name: read_json(cell_dir(out, c.cell_id) / EVAL).get("metrics", {}) for c in sweep.cells}
    rows = []
    for cell in sweep.cells:
        images, flops = train_compute(cell.recipe)
        row: dict[str, Any] = {"cell": cell.name}
        row.update({k: format_value(recipe_value(cell.recipe, k)) for k in sweep.swept})
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
            if (
                k.endswith("_vs_baseline")
                or k in ("cell", "run", "train_images", "train_flops", "baseline")
                or k.startswith("swd_level_")
                or k.endswith("_std")
            ):
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
    lines = [
        f"# {sweep.title}",
        "",
        f"Base recipe `{sweep.base.name}`"
        + (", with " + ", ".join(f"`{k} = {toml_literal(v)}`" for k, v in sweep.fixed.items()) if sweep.fixed else "")
        + ".",
        f"{spec.num} samples per cell (seed {spec.seed}); metrics: {', '.join(spec.metrics)}.",
        "Training compute = images × 3 × the model's forward FLOPs per image.",
        "",
    ]
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
        lines += [
            "",
            "Ratios divide by each cell's baseline: "
            + ", ".join(sorted({f"`{row['baseline']}`" for row in rows}))
            + ".",
        ]
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
            pts = [
                (float(r[key]) if numeric else xs.index(r[key]), r[metric])
                for r in members
                if isinstance(r.get(metric), float)
            ]
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


def curve_series(sweep: Sweep, out: Path) -> tuple[str, dict[str, dict[str, list[tuple[float, float]]]]]:
    """The in-training `eval_*` curves of every run, labelled by the cells it serves, and their
    x axis: training images, or training FLOPs when the runs' images cost different compute
    (Pyramidal Flow, a cascade), so that points at one x had equal compute."""
    measured = {
        " / ".join(c.name for c in run.cells): (
            training_curves(run_dir(out, run.run_id) / "stats.jsonl"),
            train_compute(run.recipe),
        )
        for run in sweep.runs
    }
    runs = {label: (curves, flops / images) for label, (curves, (images, flops)) in measured.items() if curves}
    if not runs:
        return "training images", {}
    per_image = [f for _, f in runs.values()]
    by_flops = max(per_image) > 1.02 * min(per_image)
    return (
        "training FLOPs" if by_flops else "training images",
        {
            label: {m: [(x * (f if by_flops else 1.0), v) for x, v in points] for m, points in curves.items()}
            for label, (curves, f) in runs.items()
        },
    )


def plot_curves(sweep: Sweep, out: Path, path: Path) -> None:
    """Metric along training for every run that evaluated while training."""
    xlabel, runs = curve_series(sweep, out)
    metrics = sorted({m for curves in runs.values() for m in curves})
    if not metrics:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, curves in runs.items():
            if metric in curves:
                ax.plot(*zip(*curves[metric]), marker=".", label=label)
        ax.set_xlabel(xlabel)
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
        samples = cell_dir(out, cell.cell_id) / SAMPLES
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
