"""What a sweep found, read only from what is on disk (so a partly run sweep is reported too):

- `results.csv`: one line per trained and scored cell (each seed of each row), with its
  settings, training compute, metrics and per-seed ratios to its baseline row;
- `results.md`: one line per row, each metric as the mean ± standard deviation over its seeds
  and its ratio to the baseline row with a 95% interval, then the compute at which each row
  reaches its baseline's final in-training value;
- a plot per swept key, the in-training curves against training FLOPs (`curves.png`) and a
  grid of every row's samples (figures.py; the curves themselves are curves.py's).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfm_cli.ablate.compute import train_compute
from dfm_cli.ablate.curves import compute_to_baseline_markdown, encode_curves, training_curves
from dfm_cli.ablate.figures import plot_curves, plot_key, sample_grid
from dfm_cli.ablate.layout import EVAL, cell_dir, read_json, run_dir
from dfm_cli.ablate.statistics import LEVEL, Ratio, mean, mean_std, ratio_interval
from dfm_cli.ablate.sweep import Sweep, baseline_rows, format_value, recipe_value, slug, toml_literal

SKIP_METRICS = ("num_samples", "seconds")


@dataclass
class Scored:
    """A cell's line of an earlier part's results.csv (see carry.py)."""

    metrics: dict[str, float]
    curves: str = ""  # encode_curves's text of its run's in-training curves


# The columns of results.csv that describe a cell rather than score it.
NOT_METRICS = ("cell", "seed", "run", "cell_id", "train_images", "train_flops", "baseline", "curves")


def collect(sweep: Sweep, out: Path, scored: dict[str, Scored] | None = None) -> list[dict[str, Any]]:
    """One line per cell, row by row and seed by seed: its settings, training compute, metrics,
    ratios to the baseline row's run of the same `train.seed` (or, when the baseline row has
    no such seed, to the mean over its seeds) and its run's in-training curves. A cell not
    scored in `out` takes its metrics from `scored` (carry.py: lines of an earlier part's
    results.csv), if it has them there, and so does a curve whose run is not in `out`."""
    bases = baseline_rows(sweep)
    carried = scored or {}
    metrics = {
        c.name: {
            k: v
            for k, v in read_json(cell_dir(out, c.cell_id) / EVAL).get("metrics", {}).items()
            if k not in SKIP_METRICS
        }
        or (carried[c.name].metrics if c.name in carried else {})
        for c in sweep.cells
    }
    # read once per run: the cells of a run share its stats.jsonl
    curves = {
        run.run_id: encode_curves(training_curves(run_dir(out, run.run_id) / "stats.jsonl")) for run in sweep.runs
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
            line["curves"] = curves[cell.run_id] or (carried[cell.name].curves if cell.name in carried else "")
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
            if k.endswith("_vs_baseline") or k in NOT_METRICS or k.startswith("swd_level_") or k.endswith("_std"):
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
    plot_curves(sweep, rows, out / "curves.png")
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
        lines += compute_to_baseline_markdown(sweep, rows)
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
