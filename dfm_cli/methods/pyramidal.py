"""Pyramidal Flow as a `Method` (`flow.method = "pyramidal"`): one single-level DiT at the
finest size, trained on every stage of a Gaussian pyramid and sampled stage by stage with
renoising at each jump (the maths is in `dfm_cli/baselines/pyramidal.py`)."""

from __future__ import annotations

import functools
from typing import Any, ClassVar, cast

from torch import nn

from dfm_cli.baselines.pyramidal import (
    PYRAMID_TIMES,
    GaussianStack,
    PyramidalObjective,
    PyramidalSchedule,
    sample_pyramidal,
)
from dfm_cli.config.method import Fail, Method, SamplingJob, refuse_cond_noise
from dfm_cli.config.recipe import FlowSection, Recipe
from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import Decomposition, TwoBandPyramid
from dfm_cli.method.sampler import SampleResult, SamplerSettings
from dfm_cli.methods.factory import base_decomposition, text_dims
from dfm_cli.models.dit import DFMDiT, model_size

# What the multi-stage baselines leave out: DFM's bands, per-level layers, video and the
# per-level timestep ablations (each stage has one time of its own).
GAUSSIAN_STAGES_UNUSED: dict[str, Any] = {
    "flow.standardize": False,
    "flow.precondition": False,
    "flow.upsample_coarse": False,
    "model.kind": "dfm",
    "model.specialize": "none",
    "flow.decomposition": "laplacian",
    "data.frames": 0,
    "flow.level_weights": [],
    "flow.tied_timesteps": False,
    "flow.prev_t_loc": 1.5,
    "flow.prev_t_scale": 1.0,
    "flow.mask_input": True,
    "sample.solver": "euler",  # each stage is integrated with Euler steps
    "flow.t_shift": 1.0,  # the time shift is FM's and DFM's (the baselines draw time per stage)
    "sample.shift": 1.0,
}
# The tau thresholds of DFM's progressive sampler: each stage of a baseline runs to its end.
BASELINE_TAU = 0.9


def check_trained_from_scratch(name: str, recipe: Recipe, fail: Fail) -> None:
    """The baselines have no single-level model to start from."""
    if recipe.train.init_from:
        fail(
            "train.init_from",
            recipe.train.init_from,
            f"starting from a trained model is for flow.method = 'dfm'; a '{name}' run trains from scratch",
        )


def check_no_tau(name: str, recipe: Recipe, fail: Fail) -> None:
    """The baselines sample each stage to its end: DFM's thresholds `sample.tau` stay at their default."""
    if any(tau != BASELINE_TAU for tau in recipe.sample.tau):  # broadcast to one per stage jump
        fail(
            "sample.tau",
            recipe.sample.tau,
            f"is not used by flow.method = '{name}' (each stage runs to its end); leave it at [{BASELINE_TAU}]",
        )


def check_stage_sampler(name: str, settings: SamplerSettings) -> None:
    """`--tau`, `--solver` and `--shift` are DFM's progressive sampler's; a baseline refuses them
    rather than sampling as if they were not given."""
    if settings.shift != 1:
        raise DfmError(f"--shift {settings.shift:g}: flow.method = '{name}' samples each stage on a linear grid")
    if settings.solver != "euler":
        raise DfmError(f"--solver {settings.solver}: flow.method = '{name}' integrates each stage with Euler steps")
    if any(tau != BASELINE_TAU for tau in settings.tau):
        shown = ",".join(f"{t:g}" for t in settings.tau)
        raise DfmError(f"--tau {shown}: is not used by flow.method = '{name}' (each stage runs to its end)")


def check_pyramid_time(recipe: Recipe, fail: Fail) -> None:
    """`flow.pyramid_time` is one of `PYRAMID_TIMES`; with uniform time the logit-normal's
    `flow.t_loc` and `flow.t_scale` act on nothing, so they stay at their defaults."""
    f, default = recipe.flow, FlowSection()
    if f.pyramid_time not in PYRAMID_TIMES:
        fail("flow.pyramid_time", f.pyramid_time, f"choose one of {', '.join(PYRAMID_TIMES)}")
    if f.pyramid_time == "uniform":
        for key, value, unused in (("t_loc", f.t_loc, default.t_loc), ("t_scale", f.t_scale, default.t_scale)):
            if value != unused:
                fail(
                    f"flow.{key}",
                    value,
                    "is used by flow.method = 'pyramidal' only with flow.pyramid_time = 'logit-normal' (each "
                    f"stage's time is uniform by default); leave it at {unused!r} or set flow.pyramid_time",
                )


def gaussian_stack(recipe: Recipe) -> GaussianStack:
    """The recipe's pyramid as the multi-stage baselines train on it (its low bands)."""
    pyramid = base_decomposition(recipe)
    if not isinstance(pyramid, TwoBandPyramid):  # refused by `check` (GAUSSIAN_STAGES_UNUSED)
        raise DfmError("flow.upsample_coarse is not used by the multi-stage baselines; leave it at False")
    return GaussianStack(pyramid)


class PyramidalFlow(Method):
    name = "pyramidal"
    unused_keys: ClassVar[dict[str, Any]] = {
        **GAUSSIAN_STAGES_UNUSED,
        "flow.cascade_split": 0.8,
        "flow.cascade_condition": "sum",
        "flow.cascade_upsample": "bilinear",
        "flow.cascade_aug": [1.5, 1.0],
        "sample.cond_noise": 0.025,
    }
    unused_why = "a Gaussian pyramid of images, no per-level layers"
    # runs made before flow.pyramid_time drew each stage's time logit-normal
    earlier_defaults: ClassVar[dict[str, Any]] = {"flow.pyramid_time": "logit-normal"}

    @classmethod
    def check(cls, recipe: Recipe, fail: Fail) -> None:
        check_trained_from_scratch(cls.name, recipe, fail)
        if recipe.flow.levels < 2:
            fail("flow.levels", recipe.flow.levels, "Pyramidal Flow needs at least 2 stages")
        try:  # gamma's valid range depends on each jump's factor (factors under 2 are refused with theirs)
            if all(factor >= 2 for factor in recipe.flow.factors):
                PyramidalSchedule(tuple(recipe.flow.factors), recipe.flow.gamma)
        except DfmError as e:
            fail("flow.gamma", recipe.flow.gamma, str(e).split(": ", 1)[-1])
        check_pyramid_time(recipe, fail)
        super().check(recipe, fail)
        check_no_tau(cls.name, recipe, fail)

    def decomposition(self, level_stats: dict | None = None) -> Decomposition:
        return gaussian_stack(self.recipe)

    @functools.cached_property
    def schedule(self) -> PyramidalSchedule:
        return PyramidalSchedule(tuple(self.recipe.flow.factors), self.recipe.flow.gamma)

    def build_model(
        self, shape: tuple[int, ...], num_classes: int, level_rms: list[float] | None = None, text: dict | None = None
    ) -> nn.Module:
        """The single-level DiT at the finest size; earlier stages feed it smaller grids."""
        finest = base_decomposition(self.recipe).level_sizes(shape[1:])[-1]
        return DFMDiT(
            model_size(self.recipe.model.name),
            [finest],
            shape[0],
            num_classes,
            pos=self.recipe.model.pos,
            temporal_patch=self.recipe.model.temporal_patch,
            text_dims=text_dims(text),
            time_embed=self.recipe.model.time_embed,
        )

    def objective(self) -> PyramidalObjective:
        f = self.recipe.flow
        return PyramidalObjective(
            self.schedule,
            time=f.pyramid_time,
            p_stage=tuple(f.p_stage),
            per_batch_stage=f.per_batch_stage,
            t_loc=f.t_loc,
            t_scale=f.t_scale,
        )

    def sample(self, job: SamplingJob) -> SampleResult:
        check_stage_sampler(self.name, job.settings)
        refuse_cond_noise(self.name, job.settings)
        dit, s = cast(DFMDiT, job.model), job.settings  # what `build_model` builds
        sizes = job.decomposition.level_sizes(dit.level_sizes[-1])[: s.stages]
        x, nfe = sample_pyramidal(
            job.guided(), job.labels, self.schedule, sizes, dit.channels, s.steps, job.seed, job.indices, job.device
        )
        return job.result(x, nfe)

    def forward_flops(self, model: nn.Module) -> float:
        """The average over the stages, each at its own token grid, weighted by `p_stage`."""
        dit = cast(DFMDiT, model)  # what `build_model` builds
        _, patch = dit.patches[-1]
        sizes = base_decomposition(self.recipe).level_sizes(dit.level_sizes[-1])
        p_stage = self.recipe.flow.p_stage
        return sum(p * dit.flops_per_sample((1, h // patch, w // patch)) for p, (h, w) in zip(p_stage, sizes))
