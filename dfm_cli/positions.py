"""Token positions for the DFM-DiT: axial RoPE (2D for images, 3D for video) and the fixed
sin-cos alternative (docs/method.md §4.4). Every level shares the finest level's token grid,
so one table of positions serves all of them."""

from __future__ import annotations

import torch


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
    >>> apply_rope(torch.tensor([[1.0, 0.0]]), rope_rotations(torch.tensor([[math.pi / 2]]))).abs().round(decimals=6).tolist()
    [[0.0, 1.0]]
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)


def sincos_embedding(grid: tuple[int, int, int], hidden: int) -> torch.Tensor:
    """Fixed sin-cos absolute positions `(N, hidden)`, the DiT/SiT alternative to RoPE."""
    pos = grid_positions(grid)
    dims = _axis_dims(hidden, grid[0] > 1)
    parts = []
    for i, d in enumerate(dims):
        if d:
            a = _axis_freqs(d, pos[:, i])
            parts += [torch.sin(a), torch.cos(a)]
    return torch.cat(parts, -1).float()
