"""A sweep's figures: each metric against each swept key, the in-training curves against
training FLOPs (`curves.png`, with a band over seeds) and a grid of every row's samples."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfm_cli.ablate.curves import curve_series
from dfm_cli.ablate.layout import SAMPLES, cell_dir
from dfm_cli.ablate.sweep import Sweep


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_key(rows: list[dict[str, Any]], key: str, swept: list[str], path: Path) -> None:
    """Each headline metric against `key`'s values, one line per setting of the other keys;
    `rows` are `summarize`'s, and a row of several seeds has a ±1 standard deviation bar.
    Written only where some setting of the other keys has two values of `key` or more, so a
    list of unrelated [[cell]]s (where every point stands alone)
    gets no plot."""
    metrics = list(dict.fromkeys(m for row in rows for m in row["stats"]))
    others = [k for k in swept if k != key]
    groups: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row[k]) for k in others), []).append(row)
    if not metrics or all(len({r[key] for r in members}) < 2 for members in groups.values()):
        return
    varying = [i for i, k in enumerate(others) if len({setting[i] for setting in groups}) > 1]
    plt = _pyplot()
    xs = list(dict.fromkeys(row[key] for row in rows))
    numeric = all(_is_number(x) for x in xs)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    labels = {setting: " ".join(f"{others[i].split('.')[1]}={setting[i]}" for i in varying) for setting in groups}
    for ax, metric in zip(axes[0], metrics):
        for setting, members in groups.items():
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
                ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=labels[setting] or None)
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


def plot_curves(sweep: Sweep, lines: list[dict[str, Any]], path: Path) -> None:
    """Metric against training FLOPs for every row whose runs evaluated while training: the
    mean over its seeds, with a band from the least to the greatest seed."""
    series = curve_series(sweep, lines)
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
