"""Build the core objects a recipe describes; shared by `train` and `sample` so both agree."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dfm_cli.config.method import method_of
from dfm_cli.config.recipe import Recipe, load_recipe
from dfm_cli.data.checkpoints import STATE, RunInfo, load_checkpoint, resolve_checkpoint
from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import TwoBandPyramid, UpsampledCoarse, build_decomposition
from dfm_cli.method.flow import FlowObjective


def base_decomposition(recipe: Recipe) -> TwoBandPyramid | UpsampledCoarse:
    """The recipe's decomposition as `flow.*` names it, before any per-level standardization."""
    f = recipe.flow
    return build_decomposition(f.decomposition, f.levels, f.factors, f.temporal_factors, f.antialias, f.upsample_coarse)


def text_dims(text: dict | None) -> tuple[int, int, int] | None:
    """A caption encoder record's `dims` (max tokens, token width, pooled width), or None without text."""
    if not text:
        return None
    max_tokens, token_dim, pooled_dim = text["dims"]
    return max_tokens, token_dim, pooled_dim


def build_model(
    recipe: Recipe,
    shape: tuple[int, ...],
    num_classes: int,
    level_rms: list[float] | None = None,
    text: dict | None = None,
) -> nn.Module:
    """The recipe's model for data of shape `C [T] H W` (pixels, or a store's latents); see `Method.build_model`."""
    return method_of(recipe).build_model(tuple(shape), num_classes, level_rms, text)


def build_objective(recipe: Recipe) -> FlowObjective:
    return method_of(recipe).objective()


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


def load_trained(path: str | Path, ema: bool = True) -> tuple[nn.Module, Recipe, RunInfo]:
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
