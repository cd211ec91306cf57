"""What `dfm decompose` shows: the levels of one image or video (and of its latent), written
as PNGs and `levels.npz`, with each level's share of the energy (paper §3.1, Table 5).

The command only parses its flags; the work is here so that it can be called and tested
without a terminal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from dfm_cli.errors import DfmError
from dfm_cli.media import save_grid, signed_to_unit
from dfm_cli.method.decompose import Decomposition, TwoBandPyramid


def energy_shares(levels: Sequence[torch.Tensor]) -> list[float]:
    """Each level's share of the total energy (sum of squares), in the order given."""
    energy = [float(level.double().pow(2).sum()) for level in levels]
    total = sum(energy) or 1.0
    return [e / total for e in energy]


def equivariance(image_shares: Sequence[float], latent_shares: Sequence[float]) -> float:
    """1 − total-variation distance between two per-level energy splits: 1 when an
    autoencoder's latent spreads energy over scales as the image does (scale equivariance)."""
    return 1 - 0.5 * sum(abs(a - b) for a, b in zip(image_shares, latent_shares))


def crop_to_multiple(x: torch.Tensor, decomposition: TwoBandPyramid, extra: int = 1) -> torch.Tensor:
    """Centre-crop `x` to the largest size the decomposition's factors (times `extra`, e.g.
    an autoencoder's downsampling) divide."""
    spatial = math.prod(decomposition.factors) * extra
    temporal = math.prod(decomposition.temporal_factors)
    mults = ([temporal] if x.ndim == 5 else []) + [spatial, spatial]
    for axis, m in zip(range(2, x.ndim), mults):
        n = x.shape[axis] // m * m
        if n == 0:
            raise DfmError(f"size {tuple(x.shape[2:])} is smaller than the factors' product {m}")
        x = x.narrow(axis, (x.shape[axis] - n) // 2, n)
    return x


@dataclass
class LevelReport:
    """The levels of `x` under a decomposition, and of its latent when an encoder was given."""

    levels: list[torch.Tensor]
    recomposition: torch.Tensor
    error: float
    shares: list[float]
    latent_levels: list[torch.Tensor] | None = None
    latent_shares: list[float] | None = None

    @property
    def equivariance(self) -> float | None:
        """1 when the latent's levels carry the image's energy split (scale equivariance)."""
        return None if self.latent_shares is None else equivariance(self.shares, self.latent_shares)


def analyse(
    x: torch.Tensor, decomposition: Decomposition, encode: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> LevelReport:
    """Decompose `x` (`1 C [T] H W`), recompose it, and measure the energy split; with
    `encode`, do the same for the latent.

    >>> from dfm_cli.method.decompose import LaplacianPyramid
    >>> r = analyse(torch.randn(1, 3, 16, 16), LaplacianPyramid(2, [2]))
    >>> len(r.levels), r.error < 1e-5, round(sum(r.shares), 6)
    (2, True, 1.0)
    """
    levels = decomposition.decompose(x)
    recomposition = decomposition.recompose(levels)
    report = LevelReport(levels, recomposition, float((recomposition - x).abs().max()), energy_shares(levels))
    if encode is not None:
        report.latent_levels = decomposition.decompose(encode(x).float().cpu())
        report.latent_shares = energy_shares(report.latent_levels)
    return report


def _frames(t: torch.Tensor) -> torch.Tensor:
    """`1 C [T] H W` → `N C H W` for a grid (one tile per frame)."""
    return t[0].transpose(0, 1) if t.ndim == 5 else t


def write_report(report: LevelReport, out: Path) -> list[Path]:
    """`level_S.png` (detail levels shown signed around grey), `recomposition.png`,
    `levels.npz` and, with a latent, `latent_level_S.png` (one grey tile per channel)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for s, band in enumerate(report.levels, 1):
        view = _frames(band if s == 1 else signed_to_unit(band))
        written.append(save_grid(view, out / f"level_{s}.png", nrow=view.shape[0]))
    frames = _frames(report.recomposition)
    written.append(save_grid(frames, out / "recomposition.png", nrow=frames.shape[0]))
    arrays = {f"level_{s}": b[0].numpy() for s, b in enumerate(report.levels, 1)}
    # allow_pickle is numpy's default, named so that mypy does not read `**arrays` as it
    np.savez(out / "levels.npz", allow_pickle=True, **arrays)
    written.append(out / "levels.npz")
    for s, band in enumerate(report.latent_levels or [], 1):
        view = band if s == 1 else signed_to_unit(band)
        tiles = view[0].transpose(0, 1).flatten(0, 1)[:, None] if view.ndim == 5 else view[0][:, None]
        written.append(save_grid(tiles.clamp(-1, 1), out / f"latent_level_{s}.png", nrow=len(tiles)))
    return written


def report_table(report: LevelReport, title: str) -> Table:
    """One row per level: its shape and energy share (and the latent's share)."""
    table = Table(title=title)
    latent = report.latent_shares
    for col in ("level", "shape", "energy share") + (("latent energy share",) if latent else ()):
        table.add_column(col)
    for s, (band, share) in enumerate(zip(report.levels, report.shares), 1):
        extra = (f"{latent[s - 1]:.2%}",) if latent else ()
        table.add_row(str(s), "x".join(map(str, band.shape[2:])), f"{share:.2%}", *extra)
    return table
