"""Build the core objects a recipe describes; shared by `train` and `sample` so both agree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from dfm_cli.config.recipe import Recipe, load_recipe
from dfm_cli.data.checkpoints import STATE, RunInfo, load_checkpoint, resolve_checkpoint
from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import Decomposition, TwoBandPyramid, build_decomposition
from dfm_cli.method.flow import FlowObjective
from dfm_cli.method.level_stats import Standardized
from dfm_cli.models.dit import DFMDiT, model_size


def plain_pyramid(recipe: Recipe) -> TwoBandPyramid:
    f = recipe.flow
    return build_decomposition(f.decomposition, f.levels, f.factors, f.temporal_factors, f.antialias, f.upsample_coarse)


def model_level_sizes(recipe: Recipe, size: Sequence[int]) -> list[tuple[int, ...]]:
    """The sizes the model's levels are built for: every level for DFM, the finest only for
    Pyramidal Flow (one single-level DiT that also reads the earlier stages' smaller grids)."""
    sizes = plain_pyramid(recipe).level_sizes(size)
    return sizes[-1:] if recipe.flow.method == "pyramidal" else sizes


def build_pyramid(recipe: Recipe, level_stats: dict | None = None) -> Decomposition:
    """The recipe's decomposition, standardized per level when `flow.standardize` is on."""
    pyramid = plain_pyramid(recipe)
    if recipe.flow.method == "pyramidal":
        from dfm_cli.baselines.pyramidal import PyramidStages

        return PyramidStages(pyramid, recipe.flow.gamma)
    if recipe.flow.method == "cascaded":
        from dfm_cli.baselines.cascaded import CascadeStack

        return CascadeStack(pyramid, cascade_settings(recipe))
    if recipe.flow.standardize:
        if level_stats is None:
            raise DfmError("flow.standardize needs per-level statistics (from the store or the data)")
        return Standardized(pyramid, level_stats["mean"], level_stats["std"])
    return pyramid


def build_model(
    recipe: Recipe,
    shape: tuple[int, ...],
    num_classes: int,
    level_rms: Sequence[float] | None = None,
    text: dict | None = None,
) -> DFMDiT:
    """The model for data of shape `C [T] H W` (pixels, or a store's latents); `level_rms`
    (see `precondition_rms`) is required when `flow.precondition` is on; `text` (a store's
    caption encoder record, with `dims`) makes it text-conditioned."""
    if recipe.flow.precondition and level_rms is None:
        raise DfmError("flow.precondition needs the per-level RMS of the data (from the store or the data)")
    if recipe.model.kind == "flux":
        from dfm_cli.models.flux import DFMFlux, flux_config

        if not text:
            raise DfmError(
                "model.kind = 'flux' is text-conditioned: train on a store encoded with "
                "`dfm encode ... --captions FILE --text-encoder t5` or set data.captions and [text]"
            )
        return DFMFlux(
            flux_config(recipe.flux, text["dims"]),
            model_level_sizes(recipe, shape[1:]),
            shape[0],
            recipe.flux.patch,
            tuple(text["dims"]),
            recipe.flux.guidance,
        )
    if recipe.model.kind == "dfm" and recipe.flow.method == "cascaded":
        from dfm_cli.baselines.cascaded import CascadedDiT

        return CascadedDiT(
            model_size(recipe.model.name),
            plain_pyramid(recipe).level_sizes(shape[1:]),
            shape[0],
            num_classes,
            recipe.model.pos,
            tuple(text["dims"]) if text else None,
        )
    return DFMDiT(
        model_size(recipe.model.name),
        model_level_sizes(recipe, shape[1:]),
        shape[0],
        num_classes,
        pos=recipe.model.pos,
        temporal_patch=recipe.model.temporal_patch,
        level_rms=level_rms if recipe.flow.precondition else None,
        text_dims=tuple(text["dims"]) if text else None,
        specialize_weights=recipe.model.specialize,
    )


def precondition_rms(recipe: Recipe, level_stats: dict | None) -> list[float] | None:
    """Per-level RMS of what the model sees, for `flow.precondition` (docs/method.md §4.5):
    1 for standardized levels, else from the per-level, per-channel mean and std."""
    if not recipe.flow.precondition:
        return None
    if recipe.flow.standardize:
        return [1.0] * recipe.flow.levels
    if level_stats is None:
        raise DfmError("flow.precondition needs per-level statistics (from the store or the data)")
    return [
        math.sqrt(sum(m * m + s * s for m, s in zip(mean, std)) / len(mean))
        for mean, std in zip(level_stats["mean"], level_stats["std"])
    ]


def cascade_settings(recipe: Recipe):
    from dfm_cli.baselines.cascaded import CascadeSettings

    loc, scale = recipe.flow.cascade_aug
    return CascadeSettings(recipe.flow.cascade_split, loc, scale, recipe.sample.cond_noise)


def build_objective(recipe: Recipe) -> FlowObjective:
    f = recipe.flow
    if f.method == "cascaded":
        from dfm_cli.baselines.cascaded import CascadedObjective

        return CascadedObjective(
            cascade_settings(recipe), recipe.train.steps, p_stage=tuple(f.p_stage), t_loc=f.t_loc, t_scale=f.t_scale
        )
    if f.method == "pyramidal":
        from dfm_cli.baselines.pyramidal import PyramidalObjective, PyramidalSchedule

        return PyramidalObjective(
            PyramidalSchedule(tuple(f.factors), f.gamma),
            p_stage=tuple(f.p_stage),
            per_batch_stage=f.per_batch_stage,
            t_loc=f.t_loc,
            t_scale=f.t_scale,
        )
    return FlowObjective(
        p_stage=tuple(f.p_stage),
        per_batch_stage=f.per_batch_stage,
        t_loc=f.t_loc,
        t_scale=f.t_scale,
        prev_t_loc=f.prev_t_loc,
        prev_t_scale=f.prev_t_scale,
        tied_timesteps=f.tied_timesteps,
        mask_input=f.mask_input,
        level_weights=tuple(f.level_weights),
    )


def load_trained(path: str | Path, ema: bool = True) -> tuple[DFMDiT, Recipe, RunInfo]:
    """Rebuild a trained model from a run folder or checkpoint, on the best device, in eval mode."""
    ckpt = resolve_checkpoint(path)
    recipe = load_recipe(ckpt / "recipe.toml")
    if recipe.model.kind == "autoencoder":
        raise DfmError(
            f"{ckpt.parent.parent} is an autoencoder run, not a generator: encode data with it "
            f"(dfm encode SOURCE --ae kl --ae-weights {ckpt.parent.parent / 'autoencoder'} --out STORE) "
            "and train a DFM recipe on the store"
        )
    name = "ema" if ema else "model"
    weights, state = load_checkpoint(ckpt, (name,))
    info = RunInfo.from_state(state, ckpt / STATE)
    rms = weights[name].get("level_rms")
    model = build_model(recipe, info.shape, info.num_classes, None if rms is None else rms.tolist(), info.text)
    model.load_state_dict(weights[name])
    return model.to(pick_device()).eval(), recipe, info


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_single_level(path: str | Path, info: RunInfo, kind: str = "dfm") -> dict[str, torch.Tensor]:
    """The EMA weights of a single-level run of model kind `kind`, checked against the data the
    new run trains on; for `flux`, also a diffusers FLUX transformer folder (e.g. FLUX.1-dev's)."""
    if kind == "flux":
        from dfm_cli.models.flux import flux_single_level_state, is_flux_folder, load_flux_transformer

        if is_flux_folder(path):
            return flux_single_level_state(load_flux_transformer(path))
    ckpt = resolve_checkpoint(path)
    recipe = load_recipe(ckpt / "recipe.toml")
    if recipe.model.kind == "autoencoder":
        raise DfmError(f"train.init_from = '{path}' is an autoencoder run, not a flow model")
    if recipe.model.kind != kind:
        raise DfmError(
            f"train.init_from = '{path}' is a model.kind = '{recipe.model.kind}' run; this run trains "
            f"'{kind}': start from a single-level run of the same kind"
        )
    if recipe.flow.levels != 1:
        raise DfmError(
            f"train.init_from = '{path}': a Flow Matching run (flow.levels = 1) is needed, this one has "
            f"{recipe.flow.levels} levels"
        )
    weights, state = load_checkpoint(ckpt, ("ema",))
    old = RunInfo.from_state(state, ckpt / STATE)
    for what, have, want in (
        ("data shape", list(old.shape), list(info.shape)),
        ("number of classes", old.num_classes, info.num_classes),
    ):
        if have != want:
            raise DfmError(
                f"train.init_from = '{path}' was trained on {what} {have}, this run has {want}; "
                "finetune on data of the same shape and classes"
            )
    return weights["ema"]
