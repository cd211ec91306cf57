"""The per-stage flow objective (docs/method.md §3, paper §3.3 and Algorithm 1).

Time follows the paper: t = 0 is noise, t = 1 is data, `x_t = t x1 + (1 - t) x0`, and the
velocity target is `x1 - x0`. A training example draws a stage Q (levels 1..Q active), a
logit-normal timestep for level Q, cleaner logit-normal timesteps for the levels before it,
and t = 0 for the levels after it; those later levels are zeroed at the model input and
masked out of the loss, so the model never spends capacity on scales it cannot yet see.

With one level this is exactly Flow Matching with logit-normal timesteps. `t_shift` is the
resolution-dependent time shift of SD3 and FLUX (`shift_time`): it moves the active level's
draws towards noise, which a large image needs because its pixels stay correlated (and so
recognisable) at noise levels where a small image is already destroyed.

Stage indices are 0-based in code (`stage = k` means levels 0..k are active). All randomness
is drawn up front by `FlowObjective.draw`, one seeded generator per sample, so a batch's
maths does not depend on how it is split across devices or micro-batches. Training makes
the draws in its data loader (`batches.DrawnBatches`), off the step's critical path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dfm_cli.method.cond import Cond, where_dropped

Shapes = Sequence[Sequence[int]]
"""Per-sample shapes of the levels (`C H W` or `C T H W`), coarsest first."""

Velocity = Callable[..., list[torch.Tensor]]
"""`velocity(levels, t, y, stage) -> per-level velocities`; the DFM-DiT is one."""


@dataclass
class Draws:
    """The random part of one training batch: stage, timesteps, label dropout, per-level noise."""

    stage: torch.Tensor
    t: torch.Tensor
    drop: torch.Tensor
    noise: list[torch.Tensor]

    def to(self, device: torch.device) -> Draws:
        return Draws(
            self.stage.to(device),
            self.t.to(device),
            self.drop.to(device),
            [n.to(device, non_blocking=True) for n in self.noise],
        )

    def pin_memory(self) -> Draws:
        """Called by a `DataLoader` with `pin_memory=True`, so the copy to the GPU can overlap."""
        return Draws(
            self.stage.pin_memory(), self.t.pin_memory(), self.drop.pin_memory(), [n.pin_memory() for n in self.noise]
        )

    def __getitem__(self, rows: slice) -> Draws:
        """The draws of a slice of the batch (a micro-batch)."""
        return Draws(self.stage[rows], self.t[rows], self.drop[rows], [n[rows] for n in self.noise])


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's and FLUX's time shift in this module's direction (t = 1 is data).

    Their noise level sigma = 1 - t becomes `shift * sigma / (1 + (shift - 1) * sigma)`, which
    is `t / (t + shift * (1 - t))`: the logit of t moves by `-log(shift)`. A shift above 1
    spends more of training and of the sampling grid near noise; `shift_time(., 1 / s)` undoes
    `shift_time(., s)`, and 0 and 1 stay fixed.

    >>> shift_time(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist()
    [0.0, 0.25, 1.0]
    """
    return t / (t + shift * (1 - t))


@dataclass(frozen=True)
class FlowObjective:
    """The knobs of the DFM objective; each one is a `flow.*` recipe key."""

    p_stage: Sequence[float]
    per_batch_stage: bool = False
    t_loc: float = 0.0
    t_scale: float = 1.0
    t_shift: float = 1.0
    prev_t_loc: float = 1.5
    prev_t_scale: float = 1.0
    tied_timesteps: bool = False
    mask_input: bool = True
    level_weights: Sequence[float] = field(default_factory=tuple)

    @property
    def levels(self) -> int:
        return len(self.p_stage)

    # ------------------------------------------------------------------ draws
    def draw(
        self, level_shapes: Shapes, sample_seeds: Sequence[int], batch_seed: int, label_dropout: float = 0.0
    ) -> Draws:
        """Every random choice for a batch, one generator per sample.

        Sample i's stage, timesteps, label dropout and noise come only from
        `sample_seeds[i]`, so they do not depend on how a global batch is split over ranks or
        micro-batches; `batch_seed` serves the per-batch stage option. `level_shapes` are the
        per-sample level shapes (`C H W` or `C T H W`).
        """
        probs = torch.tensor(list(self.p_stage), dtype=torch.float64)
        batch_stage = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(batch_seed)))
        stage: list[int] = []
        t_active: list[torch.Tensor] = []
        t_earlier: list[torch.Tensor] = []
        drop: list[bool] = []
        noise: list[list[torch.Tensor]] = [[] for _ in level_shapes]
        for seed in sample_seeds:
            g = torch.Generator().manual_seed(int(seed))
            stage.append(int(torch.multinomial(probs, 1, generator=g)))
            t_active.append(torch.randn(1, generator=g))
            t_earlier.append(torch.randn(self.levels, generator=g))
            drop.append(bool(torch.rand(1, generator=g) < label_dropout))
            for s, shape in enumerate(level_shapes):
                noise[s].append(torch.randn(tuple(shape), generator=g))
        stage_t = torch.full((len(stage),), batch_stage) if self.per_batch_stage else torch.tensor(stage)
        t = self.timesteps(stage_t, torch.cat(t_active)[:, None], torch.stack(t_earlier))
        return Draws(stage_t, t, torch.tensor(drop), [torch.stack(n) for n in noise])

    def timesteps(self, stage: torch.Tensor, z_active: torch.Tensor, z_earlier: torch.Tensor) -> torch.Tensor:
        """`(B, S)` timesteps from standard normals: logit-normal for the active level (shifted
        by `t_shift`), cleaner logit-normal for earlier levels, 0 for later ones."""
        b, s = z_earlier.shape
        level = torch.arange(s).expand(b, s)
        active = shift_time(torch.sigmoid(self.t_loc + self.t_scale * z_active), self.t_shift).expand(b, s)
        earlier = active if self.tied_timesteps else torch.sigmoid(self.prev_t_loc + self.prev_t_scale * z_earlier)
        q = stage[:, None]
        t = torch.where(level < q, earlier, active)
        return torch.where(level > q, torch.zeros_like(t), t)

    # ------------------------------------------------------------------ loss
    def prepare(self, x1: Sequence[torch.Tensor], y: Cond, draws: Draws, null: int | Cond | None) -> tuple[Draws, Cond]:
        """The draws on the data's device, and the conditions with the dropped ones (classifier-free
        guidance) replaced by `null`."""
        d = draws.to(x1[0].device)
        return d, y if null is None else where_dropped(d.drop, null, y)

    def loss(
        self, velocity: Velocity, x1: Sequence[torch.Tensor], y: Cond, draws: Draws, null: int | Cond | None = None
    ) -> dict[str, torch.Tensor]:
        """The training loss on the decomposed clean batch `x1` (coarsest level first).

        Returns `loss` (scalar: per-level MSEs summed, averaged over samples), `per_sample`
        (`B`: each sample's summed loss, for exact gradient accumulation), `level_mse`
        (`B, S`, masked levels included so they can be logged), `active`, `stage` and `t`.
        Conditions in `draws.drop` become `null` (classifier-free guidance): the null class,
        or the model's `null_condition` for the batch (the empty caption).
        """
        device = x1[0].device
        d, y = self.prepare(x1, y, draws, null)
        active = torch.arange(self.levels, device=device)[None, :] <= d.stage[:, None]
        xt = [
            _bcast(d.t[:, s], level) * level + (1 - _bcast(d.t[:, s], level)) * noise
            for s, (level, noise) in enumerate(zip(x1, d.noise))
        ]
        if self.mask_input:
            xt = mask_later_levels(xt, d.stage)
        pred = velocity(xt, d.t, y, d.stage)
        level_mse = torch.stack(
            [((p.float() - (a - n).float()) ** 2).flatten(1).mean(1) for p, a, n in zip(pred, x1, d.noise)], 1
        )
        weights = torch.tensor(list(self.level_weights) or [1.0] * self.levels, device=device)
        return loss_terms(level_mse, active, d.stage, d.t, weights)


def loss_terms(
    level_mse: torch.Tensor,
    active: torch.Tensor,
    stage: torch.Tensor,
    t: torch.Tensor,
    weights: torch.Tensor | float = 1.0,
) -> dict[str, torch.Tensor]:
    """What an objective's `loss` returns, from its per-level MSEs `B S`: each sample's loss is
    the (weighted) sum over its active levels, and `loss` their mean."""
    per_sample = (level_mse * active * weights).sum(1)
    return {
        "loss": per_sample.mean(), "per_sample": per_sample, "level_mse": level_mse, "active": active, "stage": stage,
        "t": t,
    }  # fmt: skip


def mask_later_levels(levels: Sequence[torch.Tensor], stage: torch.Tensor) -> list[torch.Tensor]:
    """Zero every level after each sample's stage; the model input for levels not yet generated."""
    return [level * _bcast((stage >= s).to(level.dtype), level) for s, level in enumerate(levels)]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))
