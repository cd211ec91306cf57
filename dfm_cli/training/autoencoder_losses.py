"""The autoencoder's training losses, each a plain function of tensors.

- `pyramid_l1`: L1 on every band of a Laplacian pyramid. Plain L1 is dominated by the
  coarse content; weighting each octave's detail band on its own keeps edges sharp without a
  pretrained perceptual network (LPIPS needs downloaded weights; this needs none).
- `scale_equivariance_loss` (Skorokhodov et al. 2025, used by the DFM paper §3.1): a
  downsampled latent must decode into the downsampled image. An autoencoder trained this way
  keeps the image's coarse-to-fine energy split in its latent, which is what a
  multi-scale generator decomposes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dfm_cli.method.decompose import LaplacianPyramid

Coder = Callable[[torch.Tensor], torch.Tensor]


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Box-filter downsampling (mean over `factor`² blocks). Being linear and per channel, it
    commutes with any per-pixel linear map, so a pointwise autoencoder is equivariant to it."""
    return F.avg_pool2d(x, factor) if factor > 1 else x


def pyramid_octaves(size: int, most: int = 3) -> int:
    """How many pyramid levels a `size`-pixel image affords (at most `most`, coarsest ≥ 4 px)."""
    levels = 1
    while levels < most and size % 2**levels == 0 and size // 2**levels >= 4:
        levels += 1
    return levels


def pyramid_l1(x: torch.Tensor, target: torch.Tensor, most: int = 3) -> torch.Tensor:
    """Mean L1 over the bands of a Laplacian pyramid of `x - target`, each band weighted equally.

    >>> x = torch.zeros(1, 1, 16, 16)
    >>> float(pyramid_l1(x, x))
    0.0
    """
    levels = pyramid_octaves(min(x.shape[-2:]), most)
    if levels == 1:
        return (x - target).abs().mean()
    bands = LaplacianPyramid(levels, [2] * (levels - 1)).decompose(x - target)
    return torch.stack([band.abs().mean() for band in bands]).mean()


def reconstruction_loss(x: torch.Tensor, target: torch.Tensor, pyramid_weight: float) -> torch.Tensor:
    """L1 plus `pyramid_weight` × the pyramid L1."""
    loss = (x - target).abs().mean()
    return loss + pyramid_weight * pyramid_l1(x, target) if pyramid_weight else loss


def scale_equivariance_loss(
    encode: Coder | None,
    decode: Coder,
    x: torch.Tensor,
    factor: int,
    pyramid_weight: float = 0.0,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """How far `decode(down(encode(x)))` is from `down(x)` (`z`: the latent, if already computed;
    `encode` may then be None).

    Zero for the identity and for any per-pixel linear autoencoder; positive for one that
    mixes scales.

    >>> x = torch.randn(2, 3, 16, 16)
    >>> float(scale_equivariance_loss(lambda v: v, lambda v: v, x, 2))
    0.0
    """
    if z is None:
        if encode is None:
            raise TypeError("scale_equivariance_loss: pass `encode`, or the latent `z`")
        z = encode(x)
    return reconstruction_loss(decode(downsample(z, factor)), downsample(x, factor), pyramid_weight)
