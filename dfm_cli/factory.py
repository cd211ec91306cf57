"""Build the core objects a recipe describes; shared by `train` and `sample` so both agree."""

from __future__ import annotations

from pathlib import Path

import torch

from dfm_cli.checkpoint import STATE, RunInfo, load_checkpoint, resolve_checkpoint
from dfm_cli.decompose import LaplacianPyramid, Standardized, build_decomposition
from dfm_cli.errors import DfmError
from dfm_cli.flow import FlowObjective
from dfm_cli.model import DFMDiT, model_size
from dfm_cli.recipe import Recipe, load_recipe


def plain_pyramid(recipe: Recipe) -> LaplacianPyramid:
    f = recipe.flow
    return build_decomposition(f.decomposition, f.levels, f.factors, f.temporal_factors, f.antialias)


def build_pyramid(recipe: Recipe, level_stats: dict | None = None):
    """The recipe's decomposition, standardized per level when `flow.standardize` is on."""
    pyramid = plain_pyramid(recipe)
    if recipe.flow.standardize:
        if level_stats is None:
            raise DfmError("flow.standardize needs per-level statistics (from the store or the data)")
        return Standardized(pyramid, level_stats["mean"], level_stats["std"])
    return pyramid


def build_model(recipe: Recipe, shape: tuple[int, ...], num_classes: int) -> DFMDiT:
    """The model for data of shape `C [T] H W` (pixels, or a store's latents)."""
    return DFMDiT(
        model_size(recipe.model.name),
        plain_pyramid(recipe).level_sizes(shape[1:]),
        shape[0],
        num_classes,
        pos=recipe.model.pos,
        temporal_patch=recipe.model.temporal_patch,
    )


def build_objective(recipe: Recipe) -> FlowObjective:
    f = recipe.flow
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
    name = "ema" if ema else "model"
    weights, state = load_checkpoint(ckpt, (name,))
    info = RunInfo.from_state(state, ckpt / STATE)
    model = build_model(recipe, info.shape, info.num_classes)
    model.load_state_dict(weights[name])
    return model.to(pick_device()).eval(), recipe, info


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
