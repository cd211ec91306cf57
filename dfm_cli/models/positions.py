"""Token positions for the DFM-DiT: axial RoPE (2D for images, 3D for video) and the fixed
sin-cos alternative (docs/method.md §4.4). Every level shares the finest level's token grid,
so one table of positions serves all of them; `level_patches` picks the per-level patch
sizes that give every level that grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dfm_cli.errors import DfmError


def _axis_freqs(dim: int, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return positions[:, None].double() * freqs[None]


def grid_positions(grid: tuple[int, int, int]) -> torch.Tensor:
    """`(N, 3)` (t, h, w) integer positions of the token grid, in token order."""
    axes = [torch.arange(n) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _axis_dims(dim: int, video: bool) -> list[int]:
    """Split a feature size over (t, h, w); images give t nothing. Each part is even."""
    if not video:
        return [0, dim // 4 * 2, dim - dim // 4 * 2]
    part = dim // 6 * 2
    return [dim - 2 * part, part, part]


def rope_angles(grid: tuple[int, int, int], head_dim: int) -> torch.Tensor:
    """Axial RoPE angles `(N, head_dim / 2)`: 2D for images, 3D for video."""
    pos = grid_positions(grid)
    dims = _axis_dims(head_dim, grid[0] > 1)
    return torch.cat([_axis_freqs(d, pos[:, i]) for i, d in enumerate(dims) if d], -1).float()


def rope_rotations(angles: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers `exp(i·angle)` `(N, D/2)`: computed once per token grid, not in
    every block."""
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate each feature pair `(x_2i, x_2i+1)` of `x` (`... N D`) by its angle, as one
    complex multiplication (one fused pass forward and one backward).

    A rotation: norms are kept, and `q·k` after RoPE depends only on the positions' offset.

    >>> import math, torch
    >>> quarter_turn = rope_rotations(torch.tensor([[math.pi / 2]]))
    >>> apply_rope(torch.tensor([[1.0, 0.0]]), quarter_turn).abs().round(decimals=6).tolist()
    [[0.0, 1.0]]
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)


def sincos_embedding(grid: tuple[int, int, int], hidden: int, width_first: bool = False) -> torch.Tensor:
    """Fixed sin-cos absolute positions `(N, hidden)`, the DiT/SiT alternative to RoPE.

    `width_first` (`model.pos = "sincos_wh"`) puts the width features before the height ones,
    the order of the MAE table that DiT, SiT and the authors' DFM-SiT add to their tokens
    (docs/method.md §9); the values are otherwise the same.
    """
    pos = grid_positions(grid)
    dims = _axis_dims(hidden, grid[0] > 1)
    order = [0, 2, 1] if width_first else [0, 1, 2]
    parts = []
    for i in order:
        if dims[i]:
            a = _axis_freqs(dims[i], pos[:, i])
            parts += [torch.sin(a), torch.cos(a)]
    return torch.cat(parts, -1).float()


def level_patches(level_sizes: Sequence[tuple[int, ...]], patch: int, temporal_patch: int = 1) -> list[tuple[int, int]]:
    """Per-level `(pt, p)` so that every level gives the finest level's token grid.

    The finest level uses `patch` (and `temporal_patch`); a level at half the resolution uses
    half the patch. A level too small for that grid is an error that says which patch works.
    """
    finest = level_sizes[-1]
    video = len(finest) == 3
    if finest[-1] % patch or finest[-2] % patch or (video and finest[0] % temporal_patch):
        raise DfmError(f"patch {patch} does not divide the finest level's size {finest}")
    grid_h = finest[-2] // patch
    grid_t = finest[0] // temporal_patch if video else 1
    out = []
    for s, size in enumerate(level_sizes, 1):
        h, t = size[-2], size[0] if video else 1
        if h % grid_h or t % grid_t:
            need = max(patch, finest[-2] // h)
            raise DfmError(
                f"level {s} ({'x'.join(map(str, size))}) cannot give the {grid_h}x{grid_h} "
                f"token grid of patch {patch}; use a model with patch >= {need} "
                "(e.g. DFM-B/4) or fewer levels"
            )
        out.append((t // grid_t, h // grid_h))
    return out
