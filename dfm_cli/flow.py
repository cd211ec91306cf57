"""The per-stage flow objective (METHOD.md §2, paper Algorithm 1).

Time follows the paper: t = 0 is noise, t = 1 is data, `x_t = t x1 + (1 - t) x0`, and the
velocity target is `x1 - x0`. A training example draws a stage Q (levels 1..Q active), a
logit-normal timestep for level Q, cleaner logit-normal timesteps for the levels before it,
and t = 0 for the levels after it; those later levels are zeroed at the model input and
masked out of the loss, so the model never spends capacity on scales it cannot yet see.

With one level this is exactly Flow Matching with logit-normal timesteps.

Stage indices are 0-based in code (`stage = k` means levels 0..k are active).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Velocity = Callable[..., list[torch.Tensor]]


@dataclass(frozen=True)
class FlowObjective:
    """The knobs of the DFM objective; each one is a `flow.*` recipe key."""

    p_stage: Sequence[float]
    per_batch_stage: bool = False
    t_loc: float = 0.0
    t_scale: float = 1.0
    prev_t_loc: float = 1.5
    prev_t_scale: float = 1.0
    tied_timesteps: bool = False
    mask_input: bool = True
    level_weights: Sequence[float] = field(default_factory=tuple)

    @property
    def levels(self) -> int:
        return len(self.p_stage)

    # ------------------------------------------------------------------ draws
    def sample_stage(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Stage per sample (or one for the whole batch, as the official code does)."""
        probs = torch.tensor(list(self.p_stage), dtype=torch.float64)
        n = 1 if self.per_batch_stage else batch
        stage = torch.multinomial(probs, n, replacement=True, generator=generator)
        return stage.expand(batch).clone() if self.per_batch_stage else stage

    def sample_timesteps(self, stage: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`(B, S)` timesteps: logit-normal for the active level, cleaner for earlier, 0 after."""
        b, s = stage.shape[0], self.levels
        level = torch.arange(s).expand(b, s)
        active = torch.sigmoid(self.t_loc + self.t_scale * torch.randn(b, 1, generator=generator))
        earlier = torch.sigmoid(
            self.prev_t_loc + self.prev_t_scale * torch.randn(b, s, generator=generator)
        )
        q = stage[:, None]
        if self.tied_timesteps:
            earlier = active.expand(b, s)
        t = torch.where(level < q, earlier, active.expand(b, s))
        return torch.where(level > q, torch.zeros_like(t), t)

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        velocity: Velocity,
        x1: Sequence[torch.Tensor],
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """One training loss on the decomposed clean batch `x1` (coarsest level first).

        Returns `loss` (scalar: per-level MSEs summed, averaged over samples), `level_mse`
        (`B, S`: each sample's MSE per level, masked levels included so they can be logged),
        `active` (`B, S` mask), `stage` and `t`. All randomness comes from `generator`, which
        lives on the CPU so that a seed means the same draw on every device.
        """
        device = x1[0].device
        b = x1[0].shape[0]
        stage = self.sample_stage(b, generator)
        t = self.sample_timesteps(stage, generator)
        active = torch.arange(self.levels)[None, :] <= stage[:, None]
        x0 = [torch.randn(level.shape, generator=generator).to(device) for level in x1]
        stage, t, active = stage.to(device), t.to(device), active.to(device)
        xt = [
            _bcast(t[:, s], level) * level + (1 - _bcast(t[:, s], level)) * noise
            for s, (level, noise) in enumerate(zip(x1, x0))
        ]
        if self.mask_input:
            xt = mask_later_levels(xt, stage)
        pred = velocity(xt, t, y, stage)
        level_mse = torch.stack(
            [((p.float() - (a - n)) ** 2).flatten(1).mean(1) for p, a, n in zip(pred, x1, x0)], 1
        )
        weights = torch.tensor(list(self.level_weights) or [1.0] * self.levels, device=device)
        loss = (level_mse * active * weights).sum(1).mean()
        return {"loss": loss, "level_mse": level_mse, "active": active, "stage": stage, "t": t}


def mask_later_levels(levels: Sequence[torch.Tensor], stage: torch.Tensor) -> list[torch.Tensor]:
    """Zero every level after each sample's stage; the model input for levels not yet generated."""
    return [
        level * _bcast((stage >= s).to(level.dtype), level) for s, level in enumerate(levels)
    ]


def drop_labels(
    y: torch.Tensor, p: float, null_class: int, generator: torch.Generator
) -> torch.Tensor:
    """Replace labels by the null class with probability p, for classifier-free guidance."""
    drop = torch.rand(y.shape[0], generator=generator).to(y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))
