"""Per-level statistics of decomposed data: the mean and std per level and channel that
`flow.standardize` and `flow.precondition` scale the levels by, and `Standardized`, the
decomposition that applies them. `dfm encode` records them in
a store's index; training uses a store's own when they match its decomposition, else
measures them on the data (`train.data_level_statistics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import Decomposition, TwoBandPyramid, UpsampledCoarse


class Items(Protocol):
    """A dataset of `(x, label)` items (a latent store, a training set)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]: ...


def level_statistics(
    data: Items, decomposition: TwoBandPyramid | UpsampledCoarse, limit: int = 4096, batch: int = 256
) -> dict[str, Any]:
    """Mean and std per level and channel of the decomposed data, from `limit` items spread
    evenly over the whole set (a store is sorted by class, so its first items would see only
    a few classes). Records the decomposition, antialias included, that they belong to."""
    n = min(limit, len(data))
    picks = [i * len(data) // n for i in range(n)]
    sums: torch.Tensor | None = None
    sq: torch.Tensor | None = None
    count = torch.zeros(decomposition.levels, dtype=torch.float64)
    for start in range(0, n, batch):
        x = torch.stack([data[i][0] for i in picks[start : start + batch]]).double()
        levels = decomposition.decompose(x)
        dims = [0] + list(range(2, x.ndim))
        s = torch.stack([lv.sum(dims) for lv in levels])
        q = torch.stack([(lv**2).sum(dims) for lv in levels])
        sums, sq = (s, q) if sums is None or sq is None else (sums + s, sq + q)
        count += torch.tensor([lv.numel() / lv.shape[1] for lv in levels], dtype=torch.float64)
    assert sums is not None and sq is not None  # n >= 1: at least one batch
    mean = sums / count[:, None]
    std = (sq / count[:, None] - mean**2).clamp_min(1e-12).sqrt()
    return {
        "levels": decomposition.levels,
        "factors": decomposition.factors,
        "temporal_factors": decomposition.temporal_factors,
        "antialias": bool(getattr(decomposition, "antialias", False)),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "items": n,
        "picked": "strided",
    }


def stored_level_statistics(
    index: dict[str, Any], decomposition: TwoBandPyramid | UpsampledCoarse
) -> dict[str, Any] | None:
    """A store's statistics when they were computed for this decomposition, else None (then
    they are measured on the data). Statistics of the same decomposition computed with another
    `antialias` are refused: they would standardize the levels with the wrong scale."""
    stored = index.get("level_stats")
    if not stored or (stored["levels"], stored["factors"], stored["temporal_factors"]) != (
        decomposition.levels,
        list(decomposition.factors),
        list(decomposition.temporal_factors),
    ):
        return None
    theirs = bool(stored.get("antialias", False))  # older stores: False
    antialias = bool(getattr(decomposition, "antialias", False))  # only the Laplacian pyramid has the option
    if theirs != antialias:
        raise DfmError(
            f"flow.antialias = {str(antialias).lower()}, but the store's level statistics were computed "
            f"with antialias = {str(theirs).lower()}; re-encode it with "
            f"`dfm encode ... {'--antialias' if antialias else '--no-antialias'} --overwrite` or set "
            f"flow.antialias = {str(theirs).lower()}"
        )
    if stored.get("picked") != "strided":  # older stores measured only their first (class-sorted) items
        return None
    return stored


class Standardized:
    """A decomposition whose levels have zero mean and unit std per level and channel.

    docs/method.md §2.4: off for FLUX-like latents (the small detail band then carries less
    loss weight, paper Table 1c), on for video. `mean`/`std` are `[level][channel]` lists, as
    the store keeps them.
    """

    def __init__(
        self, decomposition: Decomposition, mean: Sequence[Sequence[float]], std: Sequence[Sequence[float]]
    ) -> None:
        self.decomposition, self.levels = decomposition, decomposition.levels
        self.mean = [torch.tensor(m, dtype=torch.float32) for m in mean]
        self.std = [torch.tensor(s, dtype=torch.float32) for s in std]
        if len(self.mean) != decomposition.levels:
            raise DfmError(
                f"standardization statistics cover {len(self.mean)} levels, the decomposition has "
                f"{decomposition.levels}; re-run `dfm encode` with matching --levels/--factors"
            )

    def _shape(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.device, like.dtype).reshape(1, -1, *([1] * (like.ndim - 2)))

    def level_sizes(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        return self.decomposition.level_sizes(size)

    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            (lv - self._shape(m, lv)) / self._shape(s, lv)
            for lv, m, s in zip(self.decomposition.decompose(x), self.mean, self.std)
        ]

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decomposition.recompose(
            [lv * self._shape(s, lv) + self._shape(m, lv) for lv, m, s in zip(levels, self.mean, self.std)]
        )

    def upsample_to(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.decomposition.upsample_to(x, size)


def precondition_scales(t: torch.Tensor, rms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's `c_in`, `c_skip`, `c_out` (Karras et al. 2022) for the path `x_t = t x1 + (1-t) x0`
    and the velocity target `x1 - x0`, per sample and level (`B S`), from the level RMS σ.

    With `a = t²σ² + (1-t)²`, the second moment of `x_t`: `c_in = a^-1/2` gives the network a
    unit-variance input, `c_skip = (tσ² - (1-t)) / a` is the best linear guess of the
    velocity from `x_t`, and `c_out = σ a^-1/2` makes what is left for the network to predict
    unit-variance too (docs/method.md §4.5).

    >>> c_in, c_skip, c_out = precondition_scales(torch.tensor([[0.0, 1.0]]), torch.tensor([2.0, 2.0]))
    >>> c_in.tolist(), c_skip.tolist(), c_out.tolist()
    ([[1.0, 0.5]], [[-1.0, 1.0]], [[2.0, 1.0]])
    """
    t = t.float()
    var = rms.to(t.device, torch.float32).pow(2)
    a = t.pow(2) * var + (1 - t).pow(2)
    return a.rsqrt(), (t * var - (1 - t)) / a, var.sqrt() * a.rsqrt()


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)
