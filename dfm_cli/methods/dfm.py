"""Decomposable Flow Matching (`flow.method = "dfm"`): one DiT sees every level of a
decomposition, trains on the per-stage flow objective and samples progressively. With
`flow.levels = 1` this is plain Flow Matching, the baseline every table compares against."""

from __future__ import annotations

from typing import Any, ClassVar, cast

from torch import nn

from dfm_cli.config.method import Method, SamplingJob, refuse_cond_noise
from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import Decomposition
from dfm_cli.method.flow import FlowObjective
from dfm_cli.method.level_stats import Standardized
from dfm_cli.method.sampler import SampleResult, generate
from dfm_cli.methods.factory import base_decomposition, text_dims
from dfm_cli.models.dit import DFMDiT, model_size
from dfm_cli.models.flux import DFMFlux, flux_config


class DFM(Method):
    name = "dfm"
    # the baselines' own settings (Pyramidal Flow's renoising, the cascade's split and conditioning)
    unused_keys: ClassVar[dict[str, Any]] = {
        "flow.gamma": 1 / 3,
        "flow.pyramid_time": "uniform",
        "flow.cascade_split": 0.8,
        "flow.cascade_aug": [1.5, 1.0],
        "flow.cascade_condition": "sum",
        "flow.cascade_upsample": "bilinear",
        "sample.cond_noise": 0.025,
    }
    unused_why = "those are the baselines' settings"

    def decomposition(self, level_stats: dict | None = None) -> Decomposition:
        """The recipe's decomposition, standardized per level when `flow.standardize` is on."""
        base = base_decomposition(self.recipe)
        if not self.recipe.flow.standardize:
            return base
        if level_stats is None:
            raise DfmError("flow.standardize needs per-level statistics (from the store or the data)")
        return Standardized(base, level_stats["mean"], level_stats["std"])

    def build_model(
        self, shape: tuple[int, ...], num_classes: int, level_rms: list[float] | None = None, text: dict | None = None
    ) -> nn.Module:
        r = self.recipe
        if r.flow.precondition and level_rms is None:
            raise DfmError("flow.precondition needs the per-level RMS of the data (from the store or the data)")
        sizes = base_decomposition(r).level_sizes(shape[1:])
        dims = text_dims(text)
        if r.model.kind == "flux":
            if not text or dims is None:
                raise DfmError(
                    "model.kind = 'flux' is text-conditioned: train on a store encoded with "
                    "`dfm encode ... --captions FILE --text-encoder t5` or set data.captions and [text]"
                )
            image_sizes = cast(list[tuple[int, int]], sizes)  # `H W` levels: DFMFlux refuses others
            return DFMFlux(
                flux_config(r.flux, text["dims"]), image_sizes, shape[0], r.flux.patch, dims, r.flux.guidance
            )
        return DFMDiT(
            model_size(r.model.name),
            sizes,
            shape[0],
            num_classes,
            pos=r.model.pos,
            temporal_patch=r.model.temporal_patch,
            level_rms=level_rms if r.flow.precondition else None,
            text_dims=dims,
            specialize_weights=r.model.specialize,
            time_embed=r.model.time_embed,
        )

    def objective(self) -> FlowObjective:
        f = self.recipe.flow
        return FlowObjective(
            p_stage=tuple(f.p_stage),
            per_batch_stage=f.per_batch_stage,
            t_loc=f.t_loc,
            t_shift=f.t_shift,
            t_scale=f.t_scale,
            prev_t_loc=f.prev_t_loc,
            prev_t_scale=f.prev_t_scale,
            tied_timesteps=f.tied_timesteps,
            mask_input=f.mask_input,
            level_weights=tuple(f.level_weights),
        )

    def sample(self, job: SamplingJob) -> SampleResult:
        refuse_cond_noise(self.name, job.settings)
        return generate(
            job.model, job.labels, job.decomposition, job.settings, seed=job.seed, first_index=job.first_index,
            previews=job.previews,
        )  # fmt: skip

    def forward_flops(self, model: nn.Module) -> float:
        return cast(DFMDiT | DFMFlux, model).flops_per_sample()  # what `build_model` builds
