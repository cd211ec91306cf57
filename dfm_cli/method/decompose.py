"""Multiscale decompositions (docs/method.md §2): split a signal into levels and put it back exactly.

Level 1 is the coarsest. Images are `B C H W`, video is `B C T H W`. Every decomposition here
is a two-band pyramid in the spatial domain: at each transition a low-pass `down` gives the
coarser approximation and the level keeps the residual `x - up(down(x))`, so recomposition
is exact up to float32 rounding by construction (`(a - b) + b`), whatever `down` and `up`
are. The three decompositions differ only in that pair (paper §3 and Table 6):

- `laplacian`: bilinear down and up, as in the official code;
- `dwt`: the Haar wavelet, whose low band is the block mean and whose detail band is the
  inverse transform of the detail coefficients alone;
- `dct`: a block DCT whose low band keeps each block's low-frequency coefficients.

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
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from dfm_cli.errors import DfmError


@runtime_checkable
class Decomposition(Protocol):
    """What the objective, the sampler and the model need from a decomposition."""

    levels: int

    def level_sizes(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        """Per-level sizes, coarsest first, for a finest size `(H, W)` or `(T, H, W)`."""
        ...

    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`levels` tensors, coarsest first; the last has `x`'s resolution."""
        ...

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inverse of `decompose`; fewer levels give the coarser approximation."""
        ...

    def upsample_to(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """A partial recomposition brought to full size, for previews."""
        ...


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class TwoBandPyramid(ABC):
    """The shared skeleton: level sizes from per-transition factors, and decompose/recompose
    from a subclass's `_down`/`_up` pair.

    `factors[i]` is the spatial scale between level i+1 and level i+2 (coarse to fine); the
    paper uses 2, and 4 for its 256→1024 model. `temporal_factors` does the same for the frame
    axis of video and defaults to 1 (frames decomposed independently).
    """

    def __init__(
        self, levels: int, factors: Sequence[int] | None = None, temporal_factors: Sequence[int] | None = None
    ) -> None:
        if levels < 1:
            raise DfmError(f"levels must be >= 1, got {levels}")
        self.levels = levels
        self.factors = list(factors) if factors is not None else [2] * (levels - 1)
        self.temporal_factors = list(temporal_factors) if temporal_factors is not None else [1] * (levels - 1)
        for name, fs in (("factors", self.factors), ("temporal factors", self.temporal_factors)):
            if len(fs) != levels - 1:
                raise DfmError(f"{levels} levels need {levels - 1} {name} (one per transition), got {fs}")
            if any(int(f) != f or f < 1 for f in fs):
                raise DfmError(f"{name} must be positive integers, got {fs}")

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

    # ------------------------------------------------------------------ the two bands
    @abstractmethod
    def _down(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """The low band of `x` at the coarser `size`."""

    @abstractmethod
    def _up(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """A coarse band brought to the finer `size`."""

    # ------------------------------------------------------------------ transform
    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split `x` into `levels` tensors, coarsest first; the last has `x`'s resolution."""
        if x.ndim not in (4, 5):
            raise DfmError(f"expected B C H W or B C T H W, got shape {tuple(x.shape)}")
        lows = self.lowpasses(x)
        levels = [lows[0]]
        for coarse, fine in zip(lows[:-1], lows[1:]):
            levels.append(fine - self._up(coarse, tuple(fine.shape[2:])))
        return levels

    def lowpasses(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`x` at every level's size, coarsest first: the low bands (a Gaussian pyramid)."""
        lows = [x]
        for size in reversed(self.level_sizes(x.shape[2:])[:-1]):
            lows.insert(0, self._down(lows[0], size))
        return lows

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of `decompose`; fewer levels than `self.levels` give the coarser approximation."""
        x = levels[0]
        for band in levels[1:]:
            x = self._up(x, tuple(band.shape[2:])) + band
        return x

    def upsample_to(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Resample a partial recomposition to full size, for previews."""
        return x if tuple(x.shape[2:]) == tuple(size) else self._up(x, tuple(size))


class LaplacianPyramid(TwoBandPyramid):
    """Laplacian pyramid: bilinear resampling (trilinear when frames are resampled) with
    `align_corners=False`, as in the official code.

    A bilinear ×1/2 step with `align_corners=False` averages each 2×2 block, but a single
    ×1/4 step would sample only the two centre pixels of each 4-block and alias. So a
    power-of-two factor above 2 is taken as a cascade of ×1/2 steps (the 4×4 block mean for
    factor 4), and any other factor above 2 is antialiased; factor 2 is unchanged.
    """

    def __init__(
        self,
        levels: int,
        factors: Sequence[int] | None = None,
        temporal_factors: Sequence[int] | None = None,
        antialias: bool = False,
    ) -> None:
        super().__init__(levels, factors, temporal_factors)
        self.antialias = antialias

    def _resize(self, x: torch.Tensor, size: tuple[int, ...], antialias: bool) -> torch.Tensor:
        if x.ndim == 4:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
        b, c, t = x.shape[:3]
        if size[0] == t:  # frames stay: resample each frame spatially, antialias allowed
            frames = x.transpose(1, 2).reshape(b * t, c, *x.shape[-2:])
            frames = self._resize(frames, size[1:], antialias)
            return frames.reshape(b, t, c, *size[1:]).transpose(1, 2)
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)

    def _down(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        ratios = [a // b for a, b in zip(x.shape[2:], size)]
        if self.antialias or not all(_is_power_of_two(r) for r in ratios):
            return self._resize(x, size, self.antialias or max(ratios) > 2)
        while tuple(x.shape[2:]) != tuple(size):  # ×1/2 steps on every axis not yet there
            half = tuple(n // 2 if n > m else n for n, m in zip(x.shape[2:], size))
            x = self._resize(x, half, False)
        return x

    def _up(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return self._resize(x, size, self.antialias)


class HaarWavelet(TwoBandPyramid):
    """Multi-level Haar DWT in the spatial domain (paper Table 6, "DWT").

    One Haar step maps a 2×2 block to an approximation coefficient (twice the block mean,
    orthonormal) and three detail coefficients. Here level 1 is the approximation after
    `log2(prod(factors))` steps divided by its normalisation, that is the block mean, so it
    looks like the image at low resolution; each later level is what the inverse transform
    makes of its detail coefficients alone: the image minus its block means, repeated
    (nearest-neighbour) back to full size. Factors must be powers of two (a factor 4 is two
    Haar steps); frames are transformed independently.

    >>> import torch
    >>> low, high = HaarWavelet(2, [2]).decompose(torch.tensor([[[[1., 3.], [5., 7.]]]]))
    >>> low.flatten().tolist(), high.flatten().tolist()
    ([4.0], [-3.0, -1.0, 1.0, 3.0])
    """

    def __init__(
        self, levels: int, factors: Sequence[int] | None = None, temporal_factors: Sequence[int] | None = None
    ) -> None:
        super().__init__(levels, factors, temporal_factors)
        if not all(_is_power_of_two(f) for f in self.factors):
            raise DfmError(
                f"flow.decomposition = 'dwt' halves the size per Haar step: factors must be "
                f"powers of two, got {self.factors}"
            )
        _spatial_only("dwt", self.temporal_factors)

    def _down(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        f = x.shape[-1] // size[-1]
        return _per_frame(x, lambda im: F.avg_pool2d(im, f))

    def _up(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        f = size[-1] // x.shape[-1]
        return _per_frame(x, lambda im: im.repeat_interleave(f, -2).repeat_interleave(f, -1))


class BlockDCT(TwoBandPyramid):
    """Block DCT split into low and high bands, in the spatial domain (paper Table 6, "DCT").

    At a transition of factor f, the finer image is cut into `b × b` blocks (b = f times the
    largest divisor of the coarse size up to `block / f`, so 8 for factor 2 when it fits) and
    each block's orthonormal DCT-II keeps its `b/f × b/f` lowest frequencies, scaled by 1/f
    and inverse-transformed at the coarse size: the low band is an image at 1/f the
    resolution with the same brightness. Upsampling zero-pads the frequencies back, so
    `up(down(x))` is the orthogonal projection of `x` on each block's low frequencies and the
    detail level is exactly what it leaves out. Frames are transformed independently.

    >>> import torch
    >>> low, high = BlockDCT(2, [2]).decompose(torch.full((1, 1, 16, 16), 0.5))
    >>> low.shape[-1], round(float(low.mean()), 6), float(high.abs().max()) < 1e-6
    (8, 0.5, True)
    """

    def __init__(
        self,
        levels: int,
        factors: Sequence[int] | None = None,
        temporal_factors: Sequence[int] | None = None,
        block: int = 8,
    ) -> None:
        super().__init__(levels, factors, temporal_factors)
        _spatial_only("dct", self.temporal_factors)
        self.block = block

    def _blocks(self, coarse: Sequence[int], f: int) -> tuple[int, int]:
        """(fine block, coarse block) for a transition of factor f onto a coarse `(h, w)`."""
        m = math.gcd(coarse[0], coarse[1], max(1, self.block // f))
        return m * f, m

    def _down(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        f = x.shape[-1] // size[-1]
        b, m = self._blocks(size[-2:], f)
        return _per_frame(x, lambda im: _block_transform(im, b, m, 1.0 / f))

    def _up(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        f = size[-1] // x.shape[-1]
        b, m = self._blocks(x.shape[-2:], f)
        return _per_frame(x, lambda im: _block_transform(im, m, b, float(f)))


def _spatial_only(name: str, temporal_factors: Sequence[int]) -> None:
    if any(f != 1 for f in temporal_factors):
        raise DfmError(
            f"flow.decomposition = {name!r} transforms frames independently: "
            f"flow.temporal_factors must all be 1, got {list(temporal_factors)}"
        )


def _per_frame(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply a `B C H W` map to every frame of `B C T H W` (or directly to images)."""
    if x.ndim == 4:
        return fn(x)
    b, c, t = x.shape[:3]
    out = fn(x.transpose(1, 2).reshape(b * t, c, *x.shape[-2:]))
    return out.reshape(b, t, c, *out.shape[-2:]).transpose(1, 2)


def dct_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix `D` (`D @ v` transforms `v`; `D.T` inverts it).

    >>> import torch
    >>> d = dct_matrix(4)
    >>> bool(torch.allclose(d @ d.T, torch.eye(4), atol=1e-6))
    True
    """
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.to(dtype)


def _block_transform(x: torch.Tensor, b_in: int, b_out: int, gain: float) -> torch.Tensor:
    """Per `b_in × b_in` block: DCT, keep (or zero-pad to) `b_out × b_out` frequencies,
    multiply by `gain`, inverse DCT of size `b_out`."""
    h, w = x.shape[-2] // b_in, x.shape[-1] // b_in
    blocks = x.reshape(*x.shape[:-2], h, b_in, w, b_in)
    d_in, d_out = dct_matrix(b_in, x.dtype).to(x.device), dct_matrix(b_out, x.dtype).to(x.device)
    n = min(b_in, b_out)
    coef = torch.einsum("ki,...hiwj,lj->...hkwl", d_in[:n], blocks, d_in[:n]) * gain
    out = torch.einsum("ki,...hkwl,lj->...hiwj", d_out[:n], coef, d_out[:n])
    return out.reshape(*x.shape[:-2], h * b_out, w * b_out)


class UpsampledCoarse:
    """A decomposition whose coarsest level is carried at the next level's size: nearest
    upsampling on the way in, the block mean on the way out, which undoes it exactly.

    This is the paper's FLUX finetune (App. E). A pretrained single-level model, placed at
    the coarse level, then sees its level upsampled before noise is added, at the size it
    was trained at, with noise of its own size. Its output is brought back down at
    recomposition. Images only.
    """

    def __init__(self, decomposition: TwoBandPyramid) -> None:
        if decomposition.levels < 2:
            raise DfmError("flow.upsample_coarse needs at least 2 levels")
        if any(f != 1 for f in decomposition.temporal_factors):
            raise DfmError("flow.upsample_coarse applies to spatial factors only; set flow.temporal_factors to 1")
        self.decomposition, self.levels = decomposition, decomposition.levels
        self.factors, self.temporal_factors = decomposition.factors, decomposition.temporal_factors

    def level_sizes(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        sizes = self.decomposition.level_sizes(size)
        return [sizes[1], *sizes[1:]]

    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = self.decomposition.decompose(x)
        return [
            _per_frame(levels[0], lambda v: F.interpolate(v, scale_factor=self.factors[0], mode="nearest")),
            *levels[1:],
        ]

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        coarse = _per_frame(levels[0], lambda v: F.avg_pool2d(v, self.factors[0]))
        return self.decomposition.recompose([coarse, *levels[1:]])

    def upsample_to(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.decomposition.upsample_to(x, size)


DECOMPOSITIONS = {"laplacian": LaplacianPyramid, "dwt": HaarWavelet, "dct": BlockDCT}


def build_decomposition(
    name: str,
    levels: int,
    factors: Sequence[int] | None = None,
    temporal_factors: Sequence[int] | None = None,
    antialias: bool = False,
    upsample_coarse: bool = False,
) -> TwoBandPyramid | UpsampledCoarse:
    """Look a decomposition up by its recipe name (`flow.decomposition`); the one registry.
    `upsample_coarse` carries the coarsest level at the next level's size (`UpsampledCoarse`)."""
    if name not in DECOMPOSITIONS:
        raise DfmError(f"unknown decomposition {name!r}; choose one of {sorted(DECOMPOSITIONS)}")
    if name == "laplacian":
        base = LaplacianPyramid(levels, factors, temporal_factors, antialias)
    elif antialias:
        raise DfmError(
            f"flow.antialias applies to the 'laplacian' decomposition only; "
            f"set it to false with flow.decomposition = {name!r}"
        )
    else:
        base = DECOMPOSITIONS[name](levels, factors, temporal_factors)
    return UpsampledCoarse(base) if upsample_coarse else base
