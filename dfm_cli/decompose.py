"""Multiscale decompositions (METHOD.md §1): split a signal into levels and put it back exactly.

Level 1 is the coarsest. Images are `B C H W`, video is `B C T H W`. Each level lives at its
own resolution; the Laplacian pyramid keeps the detail of level s as the residual between
level s's resolution and the upsampled coarser approximation, so recomposition is exact up to
float32 rounding by construction (`(a - b) + b`).

>>> import torch
>>> pyr = LaplacianPyramid(levels=3, factors=[2, 2])
>>> x = torch.randn(2, 3, 32, 32)
>>> [tuple(l.shape[-2:]) for l in pyr.decompose(x)]
[(8, 8), (16, 16), (32, 32)]
>>> bool((pyr.recompose(pyr.decompose(x)) - x).abs().max() < 1e-5)
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dfm_cli.errors import DfmError


class LaplacianPyramid:
    """Laplacian pyramid with `levels` levels and one spatial (and temporal) factor per transition.

    `factors[i]` is the spatial scale between level i+1 and level i+2 (coarse to fine); the
    paper uses 2, and 4 for its 256→1024 model. `temporal_factors` does the same for the frame
    axis of video and defaults to 1 (frames decomposed independently). Resampling is bilinear
    (trilinear when frames are resampled) with `align_corners=False`, as in the official code.
    """

    def __init__(
        self,
        levels: int,
        factors: Sequence[int] | None = None,
        temporal_factors: Sequence[int] | None = None,
        antialias: bool = False,
    ) -> None:
        if levels < 1:
            raise DfmError(f"levels must be >= 1, got {levels}")
        self.levels = levels
        self.factors = list(factors) if factors is not None else [2] * (levels - 1)
        self.temporal_factors = (
            list(temporal_factors) if temporal_factors is not None else [1] * (levels - 1)
        )
        for name, fs in (("factors", self.factors), ("temporal factors", self.temporal_factors)):
            if len(fs) != levels - 1:
                raise DfmError(
                    f"{levels} levels need {levels - 1} {name} (one per transition), got {fs}"
                )
            if any(int(f) != f or f < 1 for f in fs):
                raise DfmError(f"{name} must be positive integers, got {fs}")
        self.antialias = antialias

    # ------------------------------------------------------------------ shapes
    def level_sizes(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        """Per-level sizes (coarsest first) for a finest size `(H, W)` or `(T, H, W)`.

        Raises a `DfmError` naming the size and the factors when they don't divide.
        """
        size = tuple(int(s) for s in size)
        video = len(size) == 3
        spatial_total = math.prod(self.factors)
        temporal_total = math.prod(self.temporal_factors)
        h, w = size[-2:]
        problems = [f"{n}={v}" for n, v in (("H", h), ("W", w)) if v % spatial_total]
        if video and size[0] % temporal_total:
            problems.append(f"T={size[0]}")
        if problems:
            raise DfmError(
                f"{', '.join(problems)} is not divisible by the product of the factors "
                f"{self.factors}"
                + (f" / temporal factors {self.temporal_factors}" if video else "")
                + f" = {spatial_total}"
                + ("" if not video else f" / {temporal_total}")
                + "; pick a size that the factors divide, or fewer levels or smaller factors"
            )
        sizes = [size]
        for f, ft in zip(reversed(self.factors), reversed(self.temporal_factors)):
            cur = sizes[0]
            spatial = (cur[-2] // f, cur[-1] // f)
            sizes.insert(0, ((cur[0] // ft,) if video else ()) + spatial)
        return sizes

    # ------------------------------------------------------------------ resampling
    def _resize(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        if x.ndim == 4:
            return F.interpolate(
                x, size=size, mode="bilinear", align_corners=False, antialias=self.antialias
            )
        b, c, t = x.shape[:3]
        if size[0] == t:  # frames stay: resample each frame spatially, antialias allowed
            frames = x.transpose(1, 2).reshape(b * t, c, *x.shape[-2:])
            frames = self._resize(frames, size[1:])
            return frames.reshape(b, t, c, *size[1:]).transpose(1, 2)
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)

    # ------------------------------------------------------------------ transform
    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split `x` into `levels` tensors, coarsest first; the last has `x`'s resolution."""
        if x.ndim not in (4, 5):
            raise DfmError(f"expected B C H W or B C T H W, got shape {tuple(x.shape)}")
        sizes = self.level_sizes(x.shape[2:])
        lows = [x]
        for size in reversed(sizes[:-1]):
            lows.insert(0, self._resize(lows[0], size))
        levels = [lows[0]]
        for coarse, fine in zip(lows[:-1], lows[1:]):
            levels.append(fine - self._resize(coarse, tuple(fine.shape[2:])))
        return levels

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of `decompose`; fewer levels than `self.levels` give the coarser approximation."""
        x = levels[0]
        for band in levels[1:]:
            x = self._resize(x, tuple(band.shape[2:])) + band
        return x

    def upsample_to(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Resample a partial recomposition to full size, for previews."""
        return x if tuple(x.shape[2:]) == tuple(size) else self._resize(x, tuple(size))


class Standardized:
    """A decomposition whose levels have zero mean and unit std per level and channel.

    METHOD.md §1: off for FLUX-like latents (the small detail band then carries less loss
    weight), on for video. `mean`/`std` are `[level][channel]` lists, as the store keeps them.
    """

    def __init__(self, pyramid: LaplacianPyramid, mean: Sequence[Sequence[float]], std: Sequence[Sequence[float]]):
        self.pyramid, self.levels = pyramid, pyramid.levels
        self.mean = [torch.tensor(m, dtype=torch.float32) for m in mean]
        self.std = [torch.tensor(s, dtype=torch.float32) for s in std]
        if len(self.mean) != pyramid.levels:
            raise DfmError(f"standardization statistics cover {len(self.mean)} levels, the decomposition has "
                           f"{pyramid.levels}; re-run `dfm encode` with matching --levels/--factors")

    def _shape(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.device, like.dtype).reshape(1, -1, *([1] * (like.ndim - 2)))

    def level_sizes(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        return self.pyramid.level_sizes(size)

    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [(lv - self._shape(m, lv)) / self._shape(s, lv)
                for lv, m, s in zip(self.pyramid.decompose(x), self.mean, self.std)]

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.pyramid.recompose([lv * self._shape(s, lv) + self._shape(m, lv)
                                       for lv, m, s in zip(levels, self.mean, self.std)])

    def upsample_to(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.pyramid.upsample_to(x, size)


DECOMPOSITIONS = {"laplacian": LaplacianPyramid}


def build_decomposition(
    name: str,
    levels: int,
    factors: Sequence[int] | None = None,
    temporal_factors: Sequence[int] | None = None,
    antialias: bool = False,
) -> LaplacianPyramid:
    """Look a decomposition up by its recipe name (`flow.decomposition`)."""
    if name not in DECOMPOSITIONS:
        raise DfmError(f"unknown decomposition {name!r}; choose one of {sorted(DECOMPOSITIONS)}")
    return DECOMPOSITIONS[name](levels, factors, temporal_factors, antialias)


def energy_shares(levels: Sequence[torch.Tensor]) -> list[float]:
    """Each level's share of the total energy (sum of squares), in the order given."""
    energy = [float(level.double().pow(2).sum()) for level in levels]
    total = sum(energy) or 1.0
    return [e / total for e in energy]


def equivariance(image_shares: Sequence[float], latent_shares: Sequence[float]) -> float:
    """1 − total-variation distance between two per-level energy splits: 1 when an
    autoencoder's latent spreads energy over scales as the image does (scale equivariance)."""
    return 1 - 0.5 * sum(abs(a - b) for a, b in zip(image_shares, latent_shares))


def crop_to_multiple(x: torch.Tensor, pyramid: LaplacianPyramid, extra: int = 1) -> torch.Tensor:
    """Centre-crop `x` to the largest size the pyramid's factors (times `extra`, e.g. an
    autoencoder's downsampling) divide."""
    spatial, temporal = math.prod(pyramid.factors) * extra, math.prod(pyramid.temporal_factors)
    mults = ([temporal] if x.ndim == 5 else []) + [spatial, spatial]
    for axis, m in zip(range(2, x.ndim), mults):
        n = x.shape[axis] // m * m
        if n == 0:
            raise DfmError(f"size {tuple(x.shape[2:])} is smaller than the factors' product {m}")
        x = x.narrow(axis, (x.shape[axis] - n) // 2, n)
    return x
