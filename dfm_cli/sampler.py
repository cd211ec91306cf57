"""Progressive sampling (docs/method.md §5): generate level 1, then bring in finer levels.

`progressive_schedule` is the single source of truth for every level's time at every step.
Segment k has `steps[k]` steps on a linear grid: level k moves 0 → tau_k (the last level
moves to 1), each earlier level moves tau_{k-1} → tau_k (→ 1 in the last segment), and later
levels stay at t = 0, masked. Unlike the official `MultiscaleScheduler`, no level ever moves
backwards, for any number of levels.

The solver integrates from t = 0 (noise) to t = 1 (data). CFG runs the conditional and
unconditional passes as one batched forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dfm_cli.errors import DfmError
from dfm_cli.flow import Velocity, mask_later_levels
from dfm_cli.seeding import SAMPLE_NOISE, mix_seed


@dataclass(frozen=True)
class Schedule:
    """`t[i, s]`: level s's time before step i (`N+1` rows); `stage[i]`: active stage of step i."""

    t: torch.Tensor
    stage: torch.Tensor

    @property
    def stage_ends(self) -> list[int]:
        """Index of the row at which each stage ends (where its preview is taken)."""
        changes = (self.stage[1:] != self.stage[:-1]).nonzero().flatten() + 1
        return [*changes.tolist(), len(self.stage)]


def progressive_schedule(steps: Sequence[int], tau: Sequence[float]) -> Schedule:
    """Per-level times for `len(steps)` stages with thresholds `tau` (one per transition).

    >>> s = progressive_schedule([2, 2], [0.5])
    >>> s.t.tolist()
    [[0.0, 0.0], [0.25, 0.0], [0.5, 0.0], [0.75, 0.5], [1.0, 1.0]]
    """
    stages = len(steps)
    tau = list(tau)
    if stages < 1 or any(int(n) != n or n < 1 for n in steps):
        raise DfmError(f"steps must be positive integers, one per stage; got {list(steps)}")
    if len(tau) != stages - 1:
        raise DfmError(f"{stages} stages need {stages - 1} tau values, got {tau}")
    if any(not 0 < v < 1 for v in tau) or any(a > b for a, b in zip(tau, tau[1:])):
        raise DfmError(f"tau must lie in (0, 1) and never decrease, got {tau}")
    ends = [*tau, 1.0]
    rows, stage = [torch.zeros(stages, dtype=torch.float64)], []
    for k, n in enumerate(steps):
        start = ends[k - 1] if k else 0.0
        for j in range(1, n + 1):
            u = j / n
            row = torch.zeros(stages, dtype=torch.float64)
            row[:k] = start + u * (ends[k] - start)
            row[k] = u * ends[k]
            rows.append(row)
            stage.append(k)
    return Schedule(torch.stack(rows), torch.tensor(stage))


@dataclass
class SampleResult:
    x: torch.Tensor
    previews: list[torch.Tensor] = field(default_factory=list)
    nfe: int = 0
    guided_nfe: int = 0


def guided_velocity(
    velocity: Velocity,
    cfg: float,
    null_class: int,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Velocity:
    """Wrap `velocity` with classifier-free guidance of scale `cfg` on every active level.

    A level is guided only while its own t lies in `interval`; when none does (or cfg == 1)
    the unconditional half is skipped. Both halves run as one forward of twice the batch.
    """

    def guided_levels(t: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        active = torch.arange(t.shape[1], device=t.device)[None] <= stage[:, None]
        return (t >= interval[0]) & (t <= interval[1]) & active & (cfg != 1.0)

    def call(xs: list[torch.Tensor], t: torch.Tensor, y: torch.Tensor, stage: torch.Tensor):
        guide = guided_levels(t, stage)
        if not bool(guide.any()):
            return velocity(xs, t, y, stage)
        out = velocity(
            [torch.cat([x, x]) for x in xs],
            torch.cat([t, t]),
            torch.cat([y, torch.full_like(y, null_class)]),
            torch.cat([stage, stage]),
        )
        res = []
        for s, v in enumerate(out):
            cond, uncond = v.chunk(2)
            g = guide[:, s].reshape(-1, *([1] * (cond.ndim - 1)))
            res.append(torch.where(g, uncond + cfg * (cond - uncond), cond))
        return res

    call.doubles = lambda t, stage: bool(guided_levels(t, stage).any())  # type: ignore[attr-defined]
    return call


@torch.no_grad()
def sample(
    velocity: Velocity,
    noise: Sequence[torch.Tensor],
    y: torch.Tensor,
    schedule: Schedule,
    recompose: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    solver: str = "euler",
    previews: bool = False,
    upsample: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SampleResult:
    """Integrate every level from its noise `noise[s]` (t = 0) along `schedule`.

    `velocity` follows the model's signature (use `guided_velocity` for CFG). The schedule may
    cover fewer stages than the model has levels: the remaining levels stay masked and the
    result is the recomposition of the generated levels only. `upsample` maps a partial
    recomposition to full size for the previews.
    """
    if solver not in ("euler", "heun"):
        raise DfmError(f"solver must be 'euler' or 'heun', got {solver!r}")
    levels = len(noise)
    stages = schedule.t.shape[1]
    if stages > levels:
        raise DfmError(f"schedule has {stages} stages but the model has {levels} levels")
    b, device = y.shape[0], y.device
    xs = [n.clone() for n in noise]
    t_all = torch.zeros(len(schedule.t), levels, dtype=torch.float64)
    t_all[:, :stages] = schedule.t
    result = SampleResult(x=xs[0])
    doubles = getattr(velocity, "doubles", lambda t, s: False)

    def evaluate(x: list[torch.Tensor], row: int, k: torch.Tensor) -> list[torch.Tensor]:
        t = t_all[row].to(device=device, dtype=torch.float32).expand(b, levels)
        result.nfe += 1
        result.guided_nfe += int(doubles(t, k))
        return velocity(mask_later_levels(x, k), t, y, k)

    ends = set(schedule.stage_ends)
    for i, k_int in enumerate(schedule.stage.tolist()):
        k = torch.full((b,), k_int, device=device, dtype=torch.long)
        dt = (t_all[i + 1] - t_all[i]).tolist()
        v = evaluate(xs, i, k)
        new = [x + dt[s] * v[s] if s <= k_int else x for s, x in enumerate(xs)]
        if solver == "heun":
            v2 = evaluate(new, i + 1, k)
            v = [(a + c) / 2 for a, c in zip(v, v2)]
            new = [x + dt[s] * v[s] if s <= k_int else x for s, x in enumerate(xs)]
        xs = new
        if previews and (i + 1) in ends:
            t_end = t_all[i + 1].tolist()
            clean = [xs[s] + (1 - t_end[s]) * v[s] for s in range(k_int + 1)]
            image = recompose(clean)
            result.previews.append(upsample(image) if upsample else image)
    result.x = recompose(xs[:stages])
    return result


def generate(
    model: torch.nn.Module,
    labels: torch.Tensor,
    steps: Sequence[int],
    tau: Sequence[float],
    pyramid,
    cfg: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    solver: str = "euler",
    seed: int = 0,
    first_index: int = 0,
    previews: bool = False,
) -> SampleResult:
    """Sample a DFM model for `labels`: `len(steps)` stages, guided by `cfg`.

    Sample j's noise comes from its own generator, seeded by `(seed, first_index + j)` on the
    CPU, so an image depends only on its index: not on the batch size, the device or the
    number of processes that share the work. `model` needs `level_sizes`, `channels` and
    `null_class`; `pyramid` recomposes the levels.
    """
    if len(steps) > model.levels:
        raise DfmError(f"--stages {len(steps)} asks for more stages than the model's {model.levels} levels")
    device = next(model.parameters()).device
    noise = [[] for _ in model.level_sizes]
    for j in range(len(labels)):
        g = torch.Generator().manual_seed(mix_seed(seed, SAMPLE_NOISE, first_index + j))
        for s, size in enumerate(model.level_sizes):
            noise[s].append(torch.randn(model.channels, *size, generator=g))
    full = model.level_sizes[-1]
    return sample(
        guided_velocity(model, cfg, model.null_class, interval),
        [torch.stack(n).to(device) for n in noise],
        labels.to(device),
        progressive_schedule(steps, tau[: len(steps) - 1]),
        pyramid.recompose,
        solver=solver,
        previews=previews,
        upsample=lambda x: pyramid.upsample_to(x, full),
    )
