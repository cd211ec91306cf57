"""The Cascade as a `Method` (`flow.method = "cascaded"`): two DiTs trained in two phases,
stage 1 at the coarse size, then stage 2 at the full size given the augmented coarse image
(the models, objective and sampler are in `dfm_cli/baselines/cascaded.py`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, cast

from torch import nn

from dfm_cli.baselines.cascaded import (
    CascadedDiT,
    CascadedObjective,
    CascadeSettings,
    sample_cascaded,
    switch_to_stage2,
)
from dfm_cli.config.method import RESUMABLE_CHANGES, Fail, Method, SamplingJob
from dfm_cli.config.recipe import Recipe
from dfm_cli.method.decompose import Decomposition
from dfm_cli.method.flow import FlowObjective
from dfm_cli.method.sampler import SampleResult
from dfm_cli.methods.factory import base_decomposition, text_dims
from dfm_cli.methods.pyramidal import (
    GAUSSIAN_STAGES_UNUSED,
    check_no_tau,
    check_stage_sampler,
    check_trained_from_scratch,
    gaussian_stack,
)
from dfm_cli.models.dit import model_size


def cascaded_dit(model: nn.Module) -> CascadedDiT:
    """`model` as what `Cascaded.build_model` builds (the trainer and sampler hand it over as an `nn.Module`)."""
    return cast(CascadedDiT, model)


class Cascaded(Method):
    name = "cascaded"
    # each stage's share of training is flow.cascade_split's, in phases, not a per-sample draw
    unused_keys: ClassVar[dict[str, Any]] = {
        **GAUSSIAN_STAGES_UNUSED,
        "flow.per_batch_stage": False,
        "flow.p_stage": [0.9, 0.1],  # what checks.DEFAULT_P_STAGE fills in for 2 levels
        "flow.gamma": 1 / 3,
    }
    unused_why = "a Gaussian pyramid of images, no per-level layers"
    # the switch to stage 2 is a share of train.steps: changing it on resume moves the switch
    resumable_changes = RESUMABLE_CHANGES - {"train.steps"}

    @classmethod
    def check(cls, recipe: Recipe, fail: Fail) -> None:
        f = recipe.flow
        check_trained_from_scratch(cls.name, recipe, fail)
        if f.levels != 2:
            fail("flow.levels", f.levels, "the cascade has 2 stages (2 models)")
        if not 0 < f.cascade_split < 1:
            fail("flow.cascade_split", f.cascade_split, "must lie in (0, 1): the share of steps for stage 1")
        if len(f.cascade_aug) != 2 or not f.cascade_aug[1] > 0:
            fail("flow.cascade_aug", f.cascade_aug, "needs [loc, scale] with scale > 0")
        if not 0 <= recipe.sample.cond_noise < 1:
            fail("sample.cond_noise", recipe.sample.cond_noise, "must lie in [0, 1)")
        super().check(recipe, fail)
        check_no_tau(cls.name, recipe, fail)

    @functools.cached_property
    def settings(self) -> CascadeSettings:
        loc, scale = self.recipe.flow.cascade_aug
        return CascadeSettings(self.recipe.flow.cascade_split, loc, scale, self.recipe.sample.cond_noise)

    @functools.cached_property
    def switch_step(self) -> int:
        """The training step at which stage 2 takes over."""
        return self.settings.split_step(self.recipe.train.steps)

    def decomposition(self, level_stats: dict | None = None) -> Decomposition:
        return gaussian_stack(self.recipe)

    def build_model(
        self, shape: tuple[int, ...], num_classes: int, level_rms: list[float] | None = None, text: dict | None = None
    ) -> nn.Module:
        sizes = base_decomposition(self.recipe).level_sizes(shape[1:])
        size, pos = model_size(self.recipe.model.name), self.recipe.model.pos
        return CascadedDiT(size, sizes, shape[0], num_classes, pos=pos, text_dims=text_dims(text))

    def objective(self) -> CascadedObjective:
        f = self.recipe.flow
        return CascadedObjective(p_stage=tuple(f.p_stage), t_loc=f.t_loc, t_scale=f.t_scale, cascade=self.settings)

    def objective_at(self, objective: FlowObjective, step: int) -> FlowObjective:
        """Stage 1's objective before the switch, stage 2's from it on."""
        stages = cast(CascadedObjective, objective)  # what `objective` makes
        return dataclasses.replace(stages, stage=int(step >= self.switch_step))

    def sample(self, job: SamplingJob) -> SampleResult:
        check_stage_sampler(self.name, job.settings)
        dit, noise = cascaded_dit(job.model), self.settings.cond_noise
        x, nfe = sample_cascaded(
            job.guided(), job.labels, dit, job.settings.steps, noise, job.seed, job.indices, job.device
        )
        return job.result(x, nfe)

    def forward_flops(self, model: nn.Module) -> float:
        """Each model's, for its share of the steps."""
        stage1, stage2 = cascaded_dit(model).stage_flops()
        split = self.recipe.flow.cascade_split
        return split * stage1 + (1 - split) * stage2

    def model_inputs(self, model: nn.Module) -> list[tuple[int, ...]]:
        """The two levels' sizes and the conditioning image's (the full size)."""
        sizes = cascaded_dit(model).level_sizes
        return [*sizes, sizes[-1]]

    def on_step(self, step: int, model: nn.Module, ema: nn.Module) -> None:
        if step == self.switch_step > 0:
            switch_to_stage2(cascaded_dit(model), cascaded_dit(ema))

    def ema_warmup_start(self, step: int) -> int:
        """Stage 2 is a new model: its EMA warms up again from the switch."""
        return self.switch_step if step >= self.switch_step else 0
