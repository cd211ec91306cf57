"""Pyramidal Flow (Jin et al. 2024) as a baseline in the same framework (`flow.method = "pyramidal"`).

One model generates the image as a sequence of stages, each at its own resolution of a
Gaussian pyramid (coarsest first), each a straight flow over its own window of the signal
level. With K stages, stage k covers signal levels `[k/K, (k+1)/K]` (t = 0 is noise, 1 is data,
as everywhere in `dfm`). In training, with the same noise `n` at the stage's resolution:

    end_k   = e_k L_k + (1 - e_k) n                        e_k = (k + 1) / K
    start_k = c_k up(L_{k-1}) + (1 - c_k) n                (start_0 = n)
    x = tau end_k + (1 - tau) start_k,  target end_k - start_k,  model time c_k + tau (e_k - c_k)

`L_k` is the data at stage k's size and `up` is nearest upsampling. At a stage jump the sampler
upsamples the previous stage's end and renoises it, `alpha up(x) + beta xi`, with `xi` drawn per
f x f block from N(0, (1 + gamma) I - gamma J) (J all ones). Upsampling copies each noise value
over a block; with `beta^2 gamma = alpha^2 (1 - a)^2` (a = k/K, the previous stage's end) the
correlated parts cancel and the noise is white again, and `alpha` makes signal and noise
coefficients sum to 1. That fixes the corrected start `c_k = alpha a < a`; training uses the
same `c_k`, so the sampler's start of each stage has exactly the training distribution
(tests/test_pyramidal.py checks the covariance with Gaussian data). `gamma <= 1 / (f^2 - 1)`
keeps the block covariance positive semi-definite; Pyramidal Flow uses 1/3 for f = 2.

The model is the single-level DiT (the FM baseline's) at the finest size; earlier stages give
it fewer tokens, so a stage's FLOPs follow its resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfm_cli.errors import DfmError
from dfm_cli.method.cond import Cond
from dfm_cli.method.decompose import TwoBandPyramid
from dfm_cli.method.flow import Draws, FlowObjective, Velocity, loss_terms
from dfm_cli.seeding import SAMPLE_NOISE, mix_seed


class GaussianStack:
    """The data at every stage's size (coarsest first), for the multi-stage baselines:
    `decompose` gives the low bands of the recipe's pyramid, `recompose` the finest one given."""

    def __init__(self, pyramid: TwoBandPyramid) -> None:
        if any(f != 1 for f in pyramid.temporal_factors):
            raise DfmError("the Pyramidal and Cascaded baselines are for images; set flow.temporal_factors to 1")
        self.pyramid, self.levels, self.factors = pyramid, pyramid.levels, pyramid.factors

    def level_sizes(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        return self.pyramid.level_sizes(size)

    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.pyramid.lowpasses(x)

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        return levels[-1]

    def upsample_to(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.pyramid.upsample_to(x, size)


@dataclass(frozen=True)
class PyramidalSchedule:
    """Each stage's signal window and the renoising at each jump, from K stages, the
    per-jump factors and gamma."""

    factors: tuple[int, ...]
    gamma: float

    def __post_init__(self) -> None:
        for f in self.factors:
            if not 0 < self.gamma <= 1 / (f * f - 1):
                raise DfmError(
                    f"flow.gamma = {self.gamma}: must be in (0, 1/(f^2 - 1)] = (0, {1 / (f * f - 1):.4g}] "
                    f"for factor {f}, or the block noise has no valid covariance"
                )

    @property
    def stages(self) -> int:
        return len(self.factors) + 1

    def end(self, k: int) -> float:
        return (k + 1) / self.stages

    def jump(self, k: int) -> tuple[float, float]:
        """`(alpha, beta)` of the renoising into stage k >= 1."""
        noise = 1 - k / self.stages  # noise coefficient at the previous stage's end
        alpha = 1 / ((1 - noise) + noise * math.sqrt(1 + 1 / self.gamma))
        return alpha, alpha * noise / math.sqrt(self.gamma)

    def start(self, k: int) -> float:
        """`c_k`: the signal coefficient at stage k's start (0 for the first stage)."""
        return 0.0 if k == 0 else self.jump(k)[0] * k / self.stages

    def model_time(self, k: int, tau: torch.Tensor) -> torch.Tensor:
        return self.start(k) + tau * (self.end(k) - self.start(k))


def up(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="nearest")


def block_noise(shape: Sequence[int], factor: int, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """`C H W` noise whose every `factor x factor` block is N(0, (1 + gamma) I - gamma J)."""
    c, h, w = shape
    n = factor * factor
    cov = (1 + gamma) * torch.eye(n, dtype=torch.float64) - gamma * torch.ones(n, n, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(cov)
    root = (vecs * vals.clamp(min=0).sqrt()).float()  # cov = root root^T (PSD even when singular)
    z = torch.randn(c, h // factor, w // factor, n, generator=generator) @ root.T
    return z.reshape(c, h // factor, w // factor, factor, factor).permute(0, 1, 3, 2, 4).reshape(c, h, w)


def renoise(x: torch.Tensor, k: int, schedule: PyramidalSchedule, noise: torch.Tensor) -> torch.Tensor:
    """The jump into stage k: the previous stage's end `x`, upsampled, and `noise` (block noise)."""
    alpha, beta = schedule.jump(k)
    return alpha * up(x, schedule.factors[k - 1]) + beta * noise


PYRAMID_TIMES = ("uniform", "logit-normal")
"""How a stage's tau is drawn (`flow.pyramid_time`): uniform in [0, 1], as the authors' code
does (`weighting_scheme='random'`), or the active level's logit-normal (`flow.t_loc`,
`flow.t_scale`), which rarely trains a stage's start (1.1% of draws below 0.1)."""


class PyramidalObjective(FlowObjective):
    """The Pyramidal Flow loss on `GaussianStack` levels; the draws are `FlowObjective`'s (a
    stage per sample from `p_stage`, noise at every stage's size), with the stage's tau
    uniform (`time = "uniform"`) or from the active level's logit-normal (`"logit-normal"`)."""

    def __init__(self, schedule: PyramidalSchedule, time: str = "uniform", **kw) -> None:
        super().__init__(**kw)
        if time not in PYRAMID_TIMES:
            raise DfmError(f"flow.pyramid_time = {time!r}: choose one of {', '.join(PYRAMID_TIMES)}")
        self.schedule, self.time = schedule, time

    def timesteps(self, stage: torch.Tensor, z_active: torch.Tensor, z_earlier: torch.Tensor) -> torch.Tensor:
        """`FlowObjective.timesteps`; with uniform time, the active level's tau is `Phi(z)`, the
        standard normal's CDF of the same draw, so it is uniform and every other draw of the
        batch (stage, noise, label dropout) stays what it is with logit-normal time."""
        t = super().timesteps(stage, z_active, z_earlier)
        if self.time == "logit-normal":
            return t
        active = torch.arange(t.shape[1])[None, :] == stage[:, None]
        return torch.where(active, torch.special.ndtr(z_active.float()).expand_as(t), t)

    def loss(
        self, velocity: Velocity, x1: Sequence[torch.Tensor], y: Cond, draws: Draws, null: int | Cond | None = None
    ) -> dict[str, torch.Tensor]:
        d, y = self.prepare(x1, y, draws, null)
        b, s = d.t.shape
        level_mse = x1[0].new_zeros(b, s, dtype=torch.float32)
        for k in d.stage.unique().tolist():
            rows = d.stage == k
            tau, noise = d.t[rows, k], d.noise[k][rows]
            end = self.schedule.end(k) * x1[k][rows] + (1 - self.schedule.end(k)) * noise
            start = (
                noise
                if k == 0
                else (
                    self.schedule.start(k) * up(x1[k - 1][rows], self.schedule.factors[k - 1])
                    + (1 - self.schedule.start(k)) * noise
                )
            )
            t = tau.reshape(-1, 1, 1, 1)
            pred = velocity(
                [t * end + (1 - t) * start],
                self.schedule.model_time(k, tau)[:, None],
                y[rows],
                torch.zeros_like(tau, dtype=torch.long),
            )[0]
            level_mse[rows, k] = ((pred.float() - (end - start).float()) ** 2).flatten(1).mean(1)
        active = torch.nn.functional.one_hot(d.stage, s).bool()
        return loss_terms(level_mse, active, d.stage, d.t)


@torch.no_grad()
def sample_pyramidal(
    velocity: Velocity,
    y: Cond,
    schedule: PyramidalSchedule,
    sizes: Sequence[tuple[int, ...]],
    channels: int,
    steps: Sequence[int],
    seed: int,
    indices: Sequence[int],
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Generate stage by stage: Euler over each stage's tau in `steps[k]` steps, renoising at
    each jump. Sample j's noise (the first stage's, then each jump's) comes from its own
    generator seeded by `(seed, j)`. Returns the finest stage and the number of model calls."""
    gens = [torch.Generator().manual_seed(mix_seed(seed, SAMPLE_NOISE, j)) for j in indices]
    x = torch.stack([torch.randn(channels, *sizes[0], generator=g) for g in gens]).to(device)
    b, nfe = len(indices), 0
    for k in range(len(steps)):
        if k:
            jump = torch.stack(
                [block_noise((channels, *sizes[k]), schedule.factors[k - 1], schedule.gamma, g) for g in gens]
            ).to(device)
            x = renoise(x, k, schedule, jump)
        taus = torch.linspace(0, 1, steps[k] + 1)
        for i in range(steps[k]):
            t = schedule.model_time(k, taus[i].expand(b)).to(device)[:, None]
            v = velocity([x], t, y, torch.zeros(b, dtype=torch.long, device=device))[0]
            x = x + float(taus[i + 1] - taus[i]) * v
            nfe += 1
    return x, nfe
