"""The Cascade as a `Method` (`flow.method = "cascaded"`): two DiTs trained in two phases,
stage 1 at the coarse size, then stage 2 at the full size given the augmented coarse image
(the models, objective and sampler are in `dfm_cli/baselines/cascaded.py`, whose docstring
says why stage 1 freezes at the switch, in the EMA too, and why stage 2 warms up again).

At the switch (`switch_step`) the method's training hooks start stage 2: `on_step` copies
stage 1 into it, `ema_frozen` keeps stage 1's EMA as it is from then on, and
`lr_warmup_start` and `ema_warmup_start` restart the learning rate's and the EMA's warm-ups.
A run folder written before `flow.cascade_condition` and `flow.cascade_upsample` existed
loads with the earlier values, `"tokens"` and `"nearest"` (`earlier_defaults`),
so it samples as it did."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, cast

from torch import nn

from dfm_cli.baselines.cascaded import (
    CONDITIONS,
    STAGE1,
    UPSAMPLERS,
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
        "flow.pyramid_time": "uniform",
    }
    unused_why = "a Gaussian pyramid of images, no per-level layers"
    # runs made before these keys read stage 1's image as tokens of their own, upsampled nearest
    earlier_defaults: ClassVar[dict[str, Any]] = {
        "flow.cascade_condition": "tokens",
        "flow.cascade_upsample": "nearest",
    }
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
        if f.cascade_condition not in CONDITIONS:
            fail("flow.cascade_condition", f.cascade_condition, f"choose one of {', '.join(CONDITIONS)}")
        if f.cascade_upsample not in UPSAMPLERS:
            fail("flow.cascade_upsample", f.cascade_upsample, f"choose one of {', '.join(UPSAMPLERS)}")
        super().check(recipe, fail)
        check_no_tau(cls.name, recipe, fail)

    @functools.cached_property
    def settings(self) -> CascadeSettings:
        f = self.recipe.flow
        loc, scale = f.cascade_aug
        return CascadeSettings(f.cascade_split, loc, scale, self.recipe.sample.cond_noise, f.cascade_upsample)

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
        condition = self.recipe.flow.cascade_condition
        return CascadedDiT(
            size, sizes, shape[0], num_classes, condition, pos=pos, text_dims=text_dims(text),
            time_embed=self.recipe.model.time_embed,
        )  # fmt: skip

    def objective(self) -> CascadedObjective:
        f = self.recipe.flow
        return CascadedObjective(p_stage=tuple(f.p_stage), t_loc=f.t_loc, t_scale=f.t_scale, cascade=self.settings)

    def objective_at(self, objective: FlowObjective, step: int) -> FlowObjective:
        """Stage 1's objective before the switch, stage 2's from it on."""
        stages = cast(CascadedObjective, objective)  # what `objective` makes
        return dataclasses.replace(stages, stage=int(step >= self.switch_step))

    def sample(self, job: SamplingJob) -> SampleResult:
        check_stage_sampler(self.name, job.settings)
        dit, steps = cascaded_dit(job.model), job.settings.steps
        cascade = dataclasses.replace(self.settings, cond_noise=job.settings.cond_noise)  # `--cond-noise` wins
        x, nfe = sample_cascaded(job.guided(), job.labels, dit, steps, cascade, job.seed, job.indices, job.device)
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

    def lr_warmup_start(self, step: int) -> int:
        """Stage 2 is a new model with fresh optimizer moments: its learning rate warms up again
        over `train.warmup_steps` from the switch."""
        return self.switch_step if step >= self.switch_step else 0

    def ema_frozen(self, step: int) -> tuple[str, ...]:
        """From the switch on, stage 1 no longer trains, and its EMA, which samples the coarse
        image, stays as it was at the switch."""
        return (STAGE1,) if step >= self.switch_step else ()
