"""Progressive sampling (docs/method.md §5): generate level 1, then bring in finer levels.

`progressive_schedule` is the single source of truth for every level's time at every step.
Segment k has `steps[k]` steps on a linear grid: level k moves 0 → tau_k (the last level
moves to 1), each earlier level moves tau_{k-1} → tau_k (→ 1 in the last segment), and later
levels stay at t = 0. Unlike the official `MultiscaleScheduler`, no level ever moves
backwards, for any number of levels. With a time `shift` (SD3's, see `flow.shift_time`) each
level moves linearly in the unshifted time between the same end points, so the grid gets
denser near noise while tau keeps its meaning.

`SamplerSettings` is the single place where the recipe's `[sample]` section, the model's
level count and the command-line flags become one validated set of sampler knobs; `tau` is
broadcast and sliced there and nowhere else.

The solver integrates from t = 0 (noise) to t = 1 (data). CFG runs the conditional and
unconditional passes as one batched forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch

from dfm_cli.errors import DfmError
from dfm_cli.method.cond import Cond, TextCond, cat_cond
from dfm_cli.method.flow import Velocity, mask_later_levels, shift_time
from dfm_cli.seeding import SAMPLE_NOISE, mix_seed

SOLVERS = ("euler", "heun")
COND_NOISE = 0.025  # `sample.cond_noise`'s default: the cascade's conditioning noise at sampling


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


def progressive_schedule(
    steps: Sequence[int], tau: Sequence[float], tied: bool = False, shift: float = 1.0
) -> Schedule:
    """Per-level times for `len(steps)` stages with thresholds `tau` (one per transition).

    With `tied` (the `flow.tied_timesteps` ablation, paper Table 1) every active level shares
    one time, as in that model's training: segment k moves the shared t from tau_{k-1} to
    tau_k, and level k joins at tau_{k-1} instead of 0.

    >>> progressive_schedule([2, 2], [0.5]).t.tolist()
    [[0.0, 0.0], [0.25, 0.0], [0.5, 0.0], [0.75, 0.5], [1.0, 1.0]]
    >>> progressive_schedule([2, 2], [0.5], tied=True).t.tolist()
    [[0.0, 0.0], [0.25, 0.0], [0.5, 0.5], [0.75, 0.75], [1.0, 1.0]]

    A `shift` s maps the grid through `shift_time`; for one level the times are `u / (u + s (1 - u))`:

    >>> progressive_schedule([2], [], shift=3.0).t.flatten().tolist()
    [0.0, 0.25, 1.0]
    """
    stages = len(steps)
    tau = list(tau)
    if stages < 1 or any(int(n) != n or n < 1 for n in steps):
        raise DfmError(f"steps must be positive integers, one per stage; got {list(steps)}")
    if len(tau) != stages - 1:
        raise DfmError(f"{stages} stages need {stages - 1} tau values, got {tau}")
    if any(not 0 < v < 1 for v in tau) or any(a > b for a, b in zip(tau, tau[1:])):
        raise DfmError(f"tau must lie in (0, 1) and never decrease, got {tau}")
    if not (math.isfinite(shift) and shift > 0):
        raise DfmError(f"shift {shift}: the time shift must be a positive number (1 = no shift)")
    ends = [*tau, 1.0]
    unshift = 1 / shift

    def moved(a: float, b: float, u: float) -> float:
        """u of the way from a to b, linearly in the unshifted time (exactly linear without a shift)."""
        if shift == 1 or u == 1:
            return a + u * (b - a)
        a_, b_ = (float(shift_time(torch.tensor(v, dtype=torch.float64), unshift)) for v in (a, b))
        return float(shift_time(torch.tensor(a_ + u * (b_ - a_), dtype=torch.float64), shift))

    rows, stage = [torch.zeros(stages, dtype=torch.float64)], []
    for k, n in enumerate(steps):
        start = ends[k - 1] if k else 0.0
        for j in range(1, n + 1):
            u = j / n
            row = torch.zeros(stages, dtype=torch.float64)
            row[: k + 1 if tied else k] = moved(start, ends[k], u)
            if not tied:
                row[k] = moved(0.0, ends[k], u)
            if tied and j == n and k + 1 < stages:
                row[k + 1] = ends[k]  # the next level joins at the shared time
            rows.append(row)
            stage.append(k)
    return Schedule(torch.stack(rows), torch.tensor(stage))


# --------------------------------------------------------------------------- settings


class SampleKeys(Protocol):
    """The sampler's defaults as a recipe's `[sample]` section gives them (read only)."""

    @property
    def steps(self) -> Sequence[int]: ...
    @property
    def tau(self) -> Sequence[float]: ...
    @property
    def cfg(self) -> float: ...
    @property
    def guidance_interval(self) -> Sequence[float]: ...
    @property
    def solver(self) -> str: ...
    @property
    def shift(self) -> float: ...
    @property
    def cond_noise(self) -> float: ...


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that decides what the sampler draws, besides the model, labels and seed.

    `mask_input` and `tied_timesteps` mirror the model's `flow.*` training ablations, so that
    sampling feeds the model what it was trained on.

    >>> SamplerSettings(steps=(30, 10), tau=(0.7,), cfg=1.5).stages
    2
    >>> SamplerSettings(steps=(3, 2), tau=(1.2,))
    Traceback (most recent call last):
    dfm_cli.errors.DfmError: tau (1.2,): values must lie in (0, 1) and increase
    """

    steps: tuple[int, ...]
    tau: tuple[float, ...] = ()
    cfg: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    solver: str = "euler"
    mask_input: bool = True
    tied_timesteps: bool = False
    shift: float = 1.0
    cond_noise: float = COND_NOISE  # the cascade's; DFM's sampler has no conditioning image

    def __post_init__(self) -> None:
        problems = _problems(self.steps, self.tau, self.cfg, self.interval, self.solver, self.shift, self.cond_noise)
        for name, why in problems:
            raise DfmError(f"{name} {getattr(self, name)!r}: {why}")

    @property
    def stages(self) -> int:
        return len(self.steps)

    def schedule(self) -> Schedule:
        return progressive_schedule(self.steps, self.tau, tied=self.tied_timesteps, shift=self.shift)

    @classmethod
    def resolve(
        cls,
        sample: SampleKeys,
        levels: int,
        *,
        mask_input: bool = True,
        tied_timesteps: bool = False,
        stages: int | None = None,
        steps: Sequence[int] | None = None,
        tau: Sequence[float] | None = None,
        cfg: float | None = None,
        interval: Sequence[float] | None = None,
        solver: str | None = None,
        shift: float | None = None,
        cond_noise: float | None = None,
    ) -> SamplerSettings:
        """The settings for a model of `levels` levels: each flag given wins over its recipe key.

        `stages` defaults to the number of `steps` given, else to every level. One `tau`
        value serves every transition; the recipe's steps and tau are cut to the stages asked.
        Errors name the flag when one was given, else the recipe key.

        >>> from types import SimpleNamespace
        >>> s = SimpleNamespace(steps=[10, 6, 4], tau=[0.9], cfg=1.0, guidance_interval=[0, 1], solver="euler",
        ...                       shift=1.0, cond_noise=0.025)
        >>> SamplerSettings.resolve(s, 3, stages=2).steps, SamplerSettings.resolve(s, 3).tau
        ((10, 6), (0.9, 0.9))
        >>> SamplerSettings.resolve(s, 3, steps=[5, 5], tau=[0.8]).tau
        (0.8,)
        >>> SamplerSettings.resolve(s, 3, stages=4)
        Traceback (most recent call last):
        dfm_cli.errors.DfmError: --stages 4: the model has 3 levels; pick 1..3
        """
        s = sample
        if stages is None and steps:  # --steps alone sets the stages, so its count is what to name
            if len(steps) > levels:
                raise DfmError(f"--steps {_csv(steps)}: the model has {levels} levels; give 1..{levels} step counts")
            stages = len(steps)
        stages = levels if stages is None else stages
        if not 1 <= stages <= levels:
            raise DfmError(f"--stages {stages}: the model has {levels} levels; pick 1..{levels}")
        if steps is not None and len(steps) != stages:
            raise DfmError(
                f"--steps {_csv(steps)}: give {stages} step count{'s' * (stages != 1)}, "
                f"one per stage (--stages {stages})"
            )
        if steps is None and len(s.steps) < stages:
            raise DfmError(f"sample.steps = {s.steps}: {stages} stages need {stages} step counts")
        tau_values = list(s.tau if tau is None else tau)
        needed = stages - 1
        if tau is not None and len(tau_values) not in (1, needed) and needed:
            raise DfmError(f"--tau {_csv(tau)}: give one threshold, or {needed} (one per stage transition)")
        if len(tau_values) != 1 and len(tau_values) < needed:
            raise DfmError(f"sample.tau = {s.tau}: {stages} stages need {needed} thresholds (or one for all)")
        new_steps = tuple(steps if steps is not None else s.steps[:stages])
        new_tau = tuple((tau_values * needed if len(tau_values) == 1 else tau_values)[:needed])
        new_cfg = s.cfg if cfg is None else cfg
        new_interval = tuple(s.guidance_interval if interval is None else interval)
        new_solver = s.solver if solver is None else solver
        new_shift = s.shift if shift is None else shift
        new_cond_noise = s.cond_noise if cond_noise is None else cond_noise
        values = {
            "steps": new_steps, "tau": new_tau, "cfg": new_cfg, "interval": new_interval, "solver": new_solver,
            "shift": new_shift, "cond_noise": new_cond_noise,
        }  # fmt: skip
        flags = {
            "steps": steps, "tau": tau, "cfg": cfg, "interval": interval, "solver": solver, "shift": shift,
            "cond_noise": cond_noise,
        }  # fmt: skip
        keys = {"interval": "sample.guidance_interval"}
        for name, why in _problems(**values, raw_tau=tau_values):
            given = flags[name] is not None
            label = f"--{name.replace('_', '-')}" if given else keys.get(name, f"sample.{name}")
            shown = flags[name] if given else values[name]
            raise DfmError(f"{label} {_csv(shown) if isinstance(shown, (list, tuple)) else shown}: {why}")
        low, high = new_interval  # two values: `_problems` checked
        return cls(
            new_steps,
            new_tau,
            new_cfg,
            (low, high),
            new_solver,
            mask_input=mask_input,
            tied_timesteps=tied_timesteps,
            shift=new_shift,
            cond_noise=new_cond_noise,
        )


def _problems(
    steps, tau, cfg, interval, solver, shift=1.0, cond_noise=COND_NOISE, raw_tau=None
) -> list[tuple[str, str]]:
    """What is wrong with a set of sampler values, as (field, reason) pairs."""
    out = []
    if not steps or any(isinstance(n, bool) or int(n) != n or n < 1 for n in steps):
        out.append(("steps", "every stage needs a whole number of steps, at least 1"))
    tau_all = list(tau if raw_tau is None else raw_tau)
    if any(not 0 < v < 1 for v in tau_all) or any(a > b for a, b in zip(tau, tau[1:])):
        out.append(("tau", "values must lie in (0, 1) and increase"))
    elif len(tau) != max(len(steps) - 1, 0):
        out.append(("tau", f"{len(steps)} stages need {len(steps) - 1} thresholds"))
    if not (math.isfinite(cfg) and cfg >= 0):
        out.append(("cfg", "the guidance scale must be a finite number, 0 or more (1 = no guidance)"))
    if len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1:
        out.append(("interval", "give low,high with 0 <= low <= high <= 1"))
    if solver not in SOLVERS:
        out.append(("solver", f"choose {' or '.join(SOLVERS)}"))
    if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        out.append(("shift", "the time shift must be a positive number (1 = no shift; SD3 uses 3 at 1024 px)"))
    if isinstance(cond_noise, bool) or not (isinstance(cond_noise, (int, float)) and 0 <= cond_noise < 1):
        out.append(("cond_noise", "the conditioning's noise level must lie in [0, 1)"))
    return out


def _csv(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def class_balanced_labels(n: int, classes: int | Sequence[int]) -> torch.Tensor:
    """Labels 0, 1, …, C-1, 0, 1, … (or the given class ids in turn, for a run trained on a
    subset, `data.classes`): one class per grid column, and any prefix of a sample set as
    balanced as it can be.

    >>> class_balanced_labels(5, 3).tolist(), class_balanced_labels(5, [8, 9]).tolist()
    ([0, 1, 2, 0, 1], [8, 9, 8, 9, 8])
    """
    ids = torch.arange(classes) if isinstance(classes, int) else torch.tensor(list(classes))
    return ids[torch.arange(n) % len(ids)]


def sampled_classes(recipe, info) -> list[int]:
    """What a run's samples are conditioned on: the classes it trained on."""
    return list(recipe.data.classes) or list(range(info.num_classes))


# --------------------------------------------------------------------------- solver


@dataclass
class SampleResult:
    x: torch.Tensor
    previews: list[torch.Tensor] = field(default_factory=list)
    nfe: int = 0
    guided_nfe: int = 0


class GuidedVelocity:
    """Classifier-free guidance of scale `cfg` on every active level of `velocity`.

    A level is guided only while its own t lies in `interval`; when none does (or cfg == 1)
    the unconditional half is skipped. Both halves run as one forward of twice the batch.
    """

    def __init__(
        self,
        velocity: Velocity,
        cfg: float,
        null: int | Callable[[int], Cond],
        interval: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        """`null`: the null class, or a function giving the null condition for n samples."""
        self.velocity, self.cfg, self.null, self.interval = velocity, cfg, null, interval

    def guided_levels(self, t: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        """`(B, S)`: which level of which sample gets guidance at times `t`."""
        active = torch.arange(t.shape[1], device=t.device)[None] <= stage[:, None]
        return (t >= self.interval[0]) & (t <= self.interval[1]) & active & (self.cfg != 1.0)

    def doubles(self, t: torch.Tensor, stage: torch.Tensor) -> bool:
        """Whether this call runs the batch twice (counts as a guided NFE)."""
        return bool(self.guided_levels(t, stage).any())

    def null_for(self, y: Cond) -> Cond:
        """The null condition for a batch like `y`: the null class in every row, or `null(len(y))`."""
        if not isinstance(self.null, int):
            return self.null(len(y))
        if isinstance(y, TextCond):
            raise TypeError("a null class guides class labels, not encoded captions")
        return torch.full_like(y, self.null)

    def __call__(self, xs: list[torch.Tensor], t: torch.Tensor, y: Cond, stage: torch.Tensor) -> list[torch.Tensor]:
        guide = self.guided_levels(t, stage)
        if not bool(guide.any()):
            return self.velocity(xs, t, y, stage)
        out = self.velocity(
            [torch.cat([x, x]) for x in xs],
            torch.cat([t, t]),
            cat_cond([y, self.null_for(y)]),
            torch.cat([stage, stage]),
        )
        res = []
        for s, v in enumerate(out):
            cond, uncond = v.chunk(2)
            g = guide[:, s].reshape(-1, *([1] * (cond.ndim - 1)))
            res.append(torch.where(g, uncond + self.cfg * (cond - uncond), cond))
        return res


@torch.no_grad()
def sample(
    velocity: Velocity,
    noise: Sequence[torch.Tensor],
    y: Cond,
    schedule: Schedule,
    recompose: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    solver: str = "euler",
    previews: bool = False,
    upsample: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mask_input: bool = True,
) -> SampleResult:
    """Integrate every level from its noise `noise[s]` (t = 0) along `schedule`.

    `velocity` follows the model's signature (wrap it in `GuidedVelocity` for CFG). Levels not
    yet started are zeroed at the model input, or with `mask_input=False` fed as their noise
    at t = 0, as the model saw them in training (docs/method.md §2). A level whose schedule
    starts at t > 0 (the tied sampler) joins as `(1 - t) × noise`: x_t with 0, the mean of a
    detail level, as its data guess. The schedule may cover fewer stages than the model has
    levels; the result is the recomposition of the generated levels only, and `upsample`
    maps a partial recomposition to full size for the previews.
    """
    if solver not in SOLVERS:
        raise DfmError(f"solver must be 'euler' or 'heun', got {solver!r}")
    levels = len(noise)
    stages = schedule.t.shape[1]
    if stages > levels:
        raise DfmError(f"schedule has {stages} stages but the model has {levels} levels")
    b, device = len(y), y.device
    xs = [n.clone() for n in noise]
    t_all = torch.zeros(len(schedule.t), levels, dtype=torch.float64)
    t_all[:, :stages] = schedule.t
    result = SampleResult(x=xs[0])
    doubles = velocity.doubles if isinstance(velocity, GuidedVelocity) else None

    def evaluate(x: list[torch.Tensor], row: int, k: torch.Tensor) -> list[torch.Tensor]:
        t = t_all[row].to(device=device, dtype=torch.float32).expand(b, levels)
        result.nfe += 1
        result.guided_nfe += int(doubles(t, k)) if doubles else 0
        return velocity(mask_later_levels(x, k) if mask_input else x, t, y, k)

    ends, started = set(schedule.stage_ends), 0
    for i, k_int in enumerate(schedule.stage.tolist()):
        if k_int == started + 1:
            started = k_int
            xs[k_int] = xs[k_int] * (1 - float(t_all[i, k_int]))
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


class LevelModel(Protocol):
    """What the sampler reads of a model besides its forward (`nn.Module` declares none of it;
    every method's network keeps it: the DFM-DiT, the FLUX model, the Cascade)."""

    @property
    def level_sizes(self) -> Sequence[tuple[int, ...]]:
        """`[T] H W` of each level, coarsest first."""
        ...

    @property
    def channels(self) -> int: ...

    @property
    def levels(self) -> int: ...

    def null_condition(self, n: int) -> Cond:
        """The unconditional input for `n` samples: the null class, or the empty caption."""
        ...


def sample_noise(model: LevelModel, seed: int, indices: Sequence[int]) -> list[torch.Tensor]:
    """Per-level noise for the samples `indices`: sample j's from its own CPU generator
    seeded by `(seed, j)`, so it depends on nothing but its index."""
    noise: list[list[torch.Tensor]] = [[] for _ in model.level_sizes]
    for j in indices:
        g = torch.Generator().manual_seed(mix_seed(seed, SAMPLE_NOISE, j))
        for s, size in enumerate(model.level_sizes):
            noise[s].append(torch.randn(model.channels, *size, generator=g))
    return [torch.stack(n) for n in noise]


def generate(
    model: torch.nn.Module,
    labels: Cond,
    decomposition,
    settings: SamplerSettings,
    *,
    seed: int,
    first_index: int = 0,
    previews: bool = False,
) -> SampleResult:
    """Sample a DFM model for `labels` (or encoded prompts) with `settings`; `decomposition`
    recomposes the levels.

    Sample j of the batch is sample `first_index + j` of the seed: its noise comes from its
    own generator (see `sample_noise`), so an image depends only on its index, not on the
    batch size, the device or the number of processes that share the work. `model` needs
    `levels`, `level_sizes`, `channels` and `null_condition`.
    """
    device = next(model.parameters()).device
    sized = cast(LevelModel, model)  # what every method's network keeps (see `LevelModel`)
    if settings.stages > sized.levels:
        raise DfmError(f"--stages {settings.stages} asks for more stages than the model's {sized.levels} levels")
    noise = sample_noise(sized, seed, range(first_index, first_index + len(labels)))
    full = sized.level_sizes[-1]
    return sample(
        guided_velocity(model, settings),
        [n.to(device) for n in noise],
        labels.to(device),
        settings.schedule(),
        decomposition.recompose,
        solver=settings.solver,
        previews=previews,
        upsample=lambda x: decomposition.upsample_to(x, full),
        mask_input=settings.mask_input,
    )


def guided_velocity(model: torch.nn.Module, settings: SamplerSettings) -> GuidedVelocity:
    """The model's velocity with the settings' classifier-free guidance, against its null condition."""
    return GuidedVelocity(model, settings.cfg, cast(LevelModel, model).null_condition, settings.interval)
