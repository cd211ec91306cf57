"""What a sweep found, read only from what is on disk (so a partly run sweep is reported too):

- `results.csv`: one line per trained and scored cell (each seed of each row), with its
  settings, training compute, metrics and per-seed ratios to its baseline row;
- `results.md`: one line per row, each metric as the mean ± standard deviation over its seeds
  and its ratio to the baseline row with a 95% interval, then the compute at which each row
  reaches its baseline's final in-training value;
- a plot per swept key, the in-training curves against training FLOPs (`curves.png`) and a
  grid of every row's samples.
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
from dfm_cli.ablate.statistics import LEVEL, Ratio, mean, mean_std, ratio_interval
from dfm_cli.ablate.sweep import Sweep, baseline_rows, format_value, recipe_value, slug, toml_literal
from dfm_cli.evaluation.gates import GATES

SKIP_METRICS = ("num_samples", "seconds")


def collect(sweep: Sweep, out: Path, scored: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """One line per cell, row by row and seed by seed: its settings, training compute, metrics
    and ratios to the baseline row's run of the same `train.seed` (or, when the baseline row
    has no such seed, to the mean over its seeds). A cell not scored in `out` takes its metrics
    from `scored` (carry.py: lines of an earlier part's results.csv), if it has them there."""
    bases = baseline_rows(sweep)
    metrics = {
        c.name: {
            k: v
            for k, v in read_json(cell_dir(out, c.cell_id) / EVAL).get("metrics", {}).items()
            if k not in SKIP_METRICS
        }
        or (scored or {}).get(c.name, {})
        for c in sweep.cells
    }
    lines = []
    for row in sweep.rows:
        base = bases[row.name]
        for cell in row.cells:
            images, flops = train_compute(cell.recipe)
            line: dict[str, Any] = {"cell": row.name}
            if sweep.seeded:
                line["seed"] = cell.seed
            line.update({k: format_value(recipe_value(cell.recipe, k)) for k in sweep.swept})
            line.update(run=cell.run_id, cell_id=cell.cell_id, train_images=images, train_flops=flops)
            found = metrics[cell.name]
            line.update(found)
            line["baseline"] = base.name if base else ""
            for key, value in found.items():
                ref = None
                if base:
                    paired = [metrics[c.name].get(key) for c in base.cells if c.seed == cell.seed]
                    given = [v for c in base.cells if isinstance(v := metrics[c.name].get(key), (int, float))]
                    ref = paired[0] if paired and paired[0] is not None else (mean(given) if given else None)
                line[f"{key}_vs_baseline"] = value / ref if ref else None
            lines.append(line)
    return lines


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics shown in results.md and plotted: no per-level or spread columns."""
    keys = []
    for row in rows:
        for k in row:
            if (
                k.endswith("_vs_baseline")
                or k in ("cell", "seed", "run", "train_images", "train_flops", "baseline")
                or k.startswith("swd_level_")
                or k.endswith("_std")
            ):
                continue
            if isinstance(row[k], float) and k not in keys:
                keys.append(k)
    return keys


def summarize(sweep: Sweep, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per row, from `collect`'s lines: its settings and compute, `n` (seeds that
    were scored), and per headline metric its (mean, std) over seeds and its `Ratio`."""
    metrics = headline(lines)
    by_row: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_row.setdefault(line["cell"], []).append(line)

    def per_seed(name: str, metric: str) -> dict[int, float]:
        return {
            line.get("seed", 0): float(line[metric])
            for line in by_row.get(name, [])
            if isinstance(line.get(metric), (int, float))
        }

    summaries = []
    for name, members in by_row.items():
        first = members[0]
        summary: dict[str, Any] = {
            k: first[k] for k in ("cell", *sweep.swept, "train_images", "train_flops", "baseline")
        }
        summary["n"] = sum(any(isinstance(line.get(m), (int, float)) for m in metrics) for line in members)
        summary["stats"], summary["ratios"] = {}, {}
        for metric in metrics:
            mine = per_seed(name, metric)
            if mine:
                summary["stats"][metric] = mean_std(list(mine.values()))
                if first["baseline"]:
                    summary["ratios"][metric] = ratio_interval(mine, per_seed(first["baseline"], metric))
        summaries.append(summary)
    return summaries


# --------------------------------------------------------------------------- files


def write_results(sweep: Sweep, rows: list[dict[str, Any]], out: Path) -> None:
    """`rows` are `collect`'s lines: results.csv holds them, the rest summarizes them."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(results_markdown(sweep, rows, out))
    summaries = summarize(sweep, rows)
    for key in sweep.swept:
        plot_key(summaries, key, sweep.swept, out / f"plot_{slug(key)}.png")
    plot_curves(sweep, out, out / "curves.png")
    sample_grid(sweep, out, out / "samples.png")


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _stat(stat: tuple[float, float | None] | None) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    return _num(mean) if std is None else f"{mean:.4g} ± {std:.2g}"


def _ratio(ratio: Ratio | None, interval: bool) -> str:
    if ratio is None or ratio.value is None:
        return "–"
    if interval and ratio.low is not None and ratio.high is not None:
        return f"{ratio.value:.3f} [{ratio.low:.3f}, {ratio.high:.3f}]"
    return f"{ratio.value:.3f}"


def results_markdown(sweep: Sweep, rows: list[dict[str, Any]], out: Path | None = None) -> str:
    """The results table, one line per row; with `out`, the compute-to-baseline table under it."""
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
    header = ["cell", *sweep.swept, "train images", "train FLOPs", *(["n"] if sweep.seeded else [])]
    for m in metrics:
        header += [m, f"{m} / baseline" + (f" [{LEVEL:.0%} CI]" if sweep.seeded else "")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summarize(sweep, rows):
        own = row["baseline"] == row["cell"]
        name = row["cell"] + (" (baseline)" if own else "")
        cells = [name, *[str(row[k]) for k in sweep.swept], f"{row['train_images']:,}", f"{row['train_flops']:.3g}"]
        if sweep.seeded:
            cells.append(str(row["n"]))
        for m in metrics:
            cells += [_stat(row["stats"].get(m)), _ratio(row["ratios"].get(m), interval=not own)]
        lines.append("| " + " | ".join(cells) + " |")
    if any(row["baseline"] for row in rows):
        lines += [
            "",
            "Ratios divide by each cell's baseline: "
            + ", ".join(sorted({f"`{row['baseline']}`" for row in rows}))
            + ".",
        ]
    if sweep.seeded:
        lines += ["", *seeds_note(sweep)]
    if out is not None:
        lines += compute_to_baseline_markdown(sweep, out)
    return "\n".join(lines) + "\n"


def seeds_note(sweep: Sweep) -> list[str]:
    """How results.md's numbers are made from the seeds (its footer)."""
    how = (
        f"`seeds = {sweep.seeds}` (or a [[cell]]'s own `seeds`): each cell trains with train.seed = s, s+1, … "
        "from its own seed s"
        if sweep.seeds > 1 or any(len(r.cells) > 1 for r in sweep.rows)
        else "the cells set train.seed"
    )
    return [
        f"Seeds: {how}; results.csv has one line per seed. Every run samples the same noise "
        f"(seed {sweep.eval.seed}). A metric is the mean ± the sample standard deviation (ddof = 1) over "
        "the row's n seeds; with one seed, its value and no interval.",
        "",
        f"{LEVEL:.0%} intervals: the ratio pairs each run with the baseline's run of the same train.seed; "
        "it is the geometric mean exp(m) of the k per-seed ratios, with the Student-t interval "
        "[exp(m − t·s/√k), exp(m + t·s/√k)], m and s the mean and standard deviation of the log-ratios "
        f"and t the {(1 + LEVEL) / 2:g} quantile with k − 1 degrees of freedom. With fewer than 2 paired "
        "seeds the ratio is the ratio of the means, with no interval.",
    ]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_key(rows: list[dict[str, Any]], key: str, swept: list[str], path: Path) -> None:
    """Each headline metric against `key`'s values, one line per setting of the other keys;
    `rows` are `summarize`'s, and a row of several seeds has a ±1 standard deviation bar."""
    metrics = list(dict.fromkeys(m for row in rows for m in row["stats"]))
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
            pts = sorted(
                (
                    (float(r[key]) if numeric else xs.index(r[key]), *r["stats"][metric])
                    for r in members
                    if metric in r["stats"]
                ),
                key=lambda p: p[0],
            )
            if pts:
                x, y, std = zip(*pts)
                spread = [s or 0.0 for s in std] if any(s is not None for s in std) else None
                ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=label or None)
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


# --------------------------------------------------------------------------- curves


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


Point = tuple[float, float, float, float]  # training FLOPs, mean, min, max over seeds


def row_curves(sweep: Sweep, out: Path) -> dict[str, dict[str, list[Point]]]:
    """Each row's in-training `eval_*` curves against training FLOPs (images × 3 × forward
    FLOPs, as the results count them): at each evaluation, the mean, least and greatest value
    over the row's seeds. Rows whose runs evaluated nothing are left out."""
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for run in sweep.runs:
        images, flops = train_compute(run.recipe)
        per_image = flops / images if images else 0.0
        curves = training_curves(run_dir(out, run.run_id) / "stats.jsonl")
        runs[run.run_id] = {m: [(x * per_image, v) for x, v in points] for m, points in curves.items()}
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


def curve_series(sweep: Sweep, out: Path) -> dict[str, dict[str, list[Point]]]:
    """`row_curves` as plotted: rows that share their runs (they differ only in `sample.*`
    keys) share one line, labelled with all their names."""
    curves = row_curves(sweep, out)
    labels: dict[tuple[str, ...], list[str]] = {}
    for row in sweep.rows:
        if row.name in curves:
            labels.setdefault(tuple(c.run_id for c in row.cells), []).append(row.name)
    return {" / ".join(names): curves[names[0]] for names in labels.values()}


def plot_curves(sweep: Sweep, out: Path, path: Path) -> None:
    """Metric against training FLOPs for every row whose runs evaluated while training: the
    mean over its seeds, with a band from the least to the greatest seed."""
    series = curve_series(sweep, out)
    metrics = sorted({m for curves in series.values() for m in curves})
    if not metrics:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, curves in series.items():
            if metric in curves:
                x, centre, low, high = zip(*curves[metric])
                (line,) = ax.plot(x, centre, marker=".", label=label)
                if any(lo < hi for lo, hi in zip(low, high)):
                    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(metric.removeprefix("eval_"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def compute_to_baseline(sweep: Sweep, out: Path) -> dict[str, dict[str, tuple[float | None, bool]]]:
    """For each row with a baseline row and curves, per `eval_*` metric both have: the
    fraction of the baseline's compute (at its last evaluation) at which the row's mean curve
    reaches the baseline's final mean value (`reach_fraction`)."""
    curves = row_curves(sweep, out)
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


def compute_to_baseline_markdown(sweep: Sweep, out: Path) -> list[str]:
    """results.md's section on `compute_to_baseline` (nothing when no run evaluated while
    training, or there is no baseline)."""
    found = compute_to_baseline(sweep, out)
    metrics = sorted({m for per in found.values() for m in per})
    if not metrics:
        return []
    bases = baseline_rows(sweep)
    lines = [
        "",
        "## Compute to reach the baseline",
        "",
        "The fraction of its baseline's training FLOPs (at the baseline's last in-training evaluation) "
        "at which each row's in-training curve (`eval_*` in stats.jsonl; the mean over its seeds) first "
        "reaches the baseline's final value, interpolated linearly in log FLOPs between evaluations; "
        "≤ when it was already reached at the first evaluation.",
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
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sample_grid(sweep: Sweep, out: Path, path: Path) -> None:
    """The first `eval.grid_samples` samples of every row (its first seed that has them), side
    by side, labelled."""
    from dfm_cli.media import grid as tile

    tiles = []
    for row in sweep.rows:
        found = [cell_dir(out, c.cell_id) / SAMPLES for c in row.cells]
        samples = next((s for s in found if s.is_file()), None)
        if samples is not None:
            with np.load(samples) as data:
                images = data["arr_0"][: sweep.eval.grid_samples]
            if images.ndim == 5:  # video: the first frame
                images = images[:, 0]
            x = torch.from_numpy(images).movedim(-1, 1).float() / 127.5 - 1
            tiles.append((row.name, tile(x)))
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
