"""Build the core objects a recipe describes; shared by `train` and `sample` so both agree."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfm_cli.config.method import method_of
from dfm_cli.config.recipe import Recipe, load_run_recipe
from dfm_cli.config.schema import ModelSection
from dfm_cli.data.checkpoints import (
    DIGESTS,
    STATE,
    RunInfo,
    file_sha256,
    load_checkpoint,
    pinned_checkpoint,
    resolve_checkpoint,
)
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


def load_trained(path: str | Path, ema: bool = True, verify: bool = True) -> tuple[nn.Module, Recipe, RunInfo]:
    """Rebuild a trained model from a run folder or checkpoint, on the best device, in eval mode;
    with `verify`, its weights must match the SHA-256 recorded when the checkpoint was written."""
    ckpt = resolve_checkpoint(path)
    recipe = load_run_recipe(ckpt / "recipe.toml")
    if recipe.model.kind == "autoencoder":
        raise DfmError(
            f"{ckpt.parent.parent} is an autoencoder run, not a generator: encode data with it "
            f"(dfm encode SOURCE --ae kl --ae-weights {ckpt.parent.parent / 'autoencoder'} --out STORE) "
            "and train a DFM recipe on the store"
        )
    name = "ema" if ema else "model"
    weights, state = load_checkpoint(ckpt, (name,), verify=verify)
    info = RunInfo.from_state(state, ckpt / STATE)
    rms = weights[name].get("level_rms")
    level_rms = None if rms is None else rms.tolist()
    model = build_model(recipe, info.shape, info.num_classes, level_rms, info.text)
    try:
        model.load_state_dict(weights[name])
    except RuntimeError:  # missing, unexpected or misshapen tensors: recipe.toml and weights disagree
        raise DfmError(_weights_mismatch(ckpt, recipe, info, level_rms, model, weights[name])) from None
    return model.to(pick_device()).eval(), recipe, info


def _weights_mismatch(
    ckpt: Path, recipe: Recipe, info: RunInfo, level_rms: list[float] | None, model: nn.Module, weights: dict
) -> str:
    """The one-line error of weights that do not fit the model `recipe.toml` describes: the first
    tensor that differs, and the registry model the weights are of where one fits them exactly."""
    have = {k: tuple(v.shape) for k, v in weights.items()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    first = next((f"{k}: {list(have[k])} in the weights, {list(want[k])} in the model" for k in have
                  if k in want and have[k] != want[k]), None)  # fmt: skip
    if first is None:
        missing, unexpected = [k for k in want if k not in have], [k for k in have if k not in want]
        first = f"{missing[0]} missing from the weights" if missing else f"{unexpected[0]} not in the model"
    name = recipe.model.name
    fits = _model_of(recipe, info, level_rms, have)
    of = f" ({fits})" if fits else ""
    fix = f"set model.name = {fits!r} there" if fits else "restore the recipe.toml written with the checkpoint"
    return (
        f"{ckpt}: model.name = {name!r} in recipe.toml, but the weights are of another size{of}; "
        f"first mismatch: {first}; {fix}"
    )


def _model_of(recipe: Recipe, info: RunInfo, level_rms: list[float] | None, shapes: dict[str, Any]) -> str | None:
    """The registry model (`DFM-S/2`, ...) whose network, with the recipe's other keys, has
    exactly these tensor `shapes`; built on the meta device, so nothing is allocated."""
    from dfm_cli.models.dit import MODELS

    for name in MODELS:
        if name == recipe.model.name:
            continue
        other = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name=name))
        try:
            with torch.device("meta"):
                model = build_model(other, info.shape, info.num_classes, level_rms, info.text)
        except Exception:  # a size that does not fit the data (patch, levels): not this one
            continue
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            return name
    return None


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_single_level(
    path: str | Path, info: RunInfo, kind: str = "dfm", model: ModelSection | None = None
) -> dict[str, torch.Tensor]:
    """The EMA weights of a single-level run of model kind `kind`, checked against the data the
    new run trains on (and, given the new run's `model` section, against its conventions: see
    `_check_conventions`); for `flux`, also a diffusers FLUX transformer folder (e.g. FLUX.1-dev's)."""
    return load_pinned_single_level(path, info, kind, model)[0]


def load_pinned_single_level(
    path: str | Path, info: RunInfo, kind: str = "dfm", model: ModelSection | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """`load_single_level`, and what it loaded: `{"checkpoint": RUN/checkpoints/step-N, "step",
    "sha256"}` (of the EMA file), the run folder `path` names pinned to its newest complete
    checkpoint now (None for a diffusers FLUX folder). A source still training may prune
    that checkpoint before it is read: then its newest one is taken again."""
    if kind == "flux":
        from dfm_cli.models.flux import flux_single_level_state, is_flux_folder, load_flux_transformer

        if is_flux_folder(path):
            return flux_single_level_state(load_flux_transformer(path)), None
    tries = 3
    while True:
        ckpt = pinned_checkpoint(path)
        try:
            weights, state = _single_level(path, ckpt, info, kind, model)
            break
        except DfmError:
            tries -= 1
            if tries and not ckpt.exists() and ckpt != Path(path):  # pruned meanwhile
                continue
            raise
    digest = (state.get(DIGESTS) or {}).get("ema.safetensors") or file_sha256(ckpt / "ema.safetensors")
    return weights, {"checkpoint": str(ckpt), "step": state.get("step"), "sha256": digest}


# model keys that change what a network computes without changing its tensors: a pretrained
# model's weights fit a run with other values, but no longer give its velocity
CONVENTIONS = ("pos", "time_embed")


def _check_conventions(path: str | Path, pretrained: ModelSection, model: ModelSection | None) -> None:
    """Refuse a run whose positions or timestep features differ from the pretrained model's
    (an imported SiT has `sincos_wh` and `sit`): the conversion would load, but break its
    promise of the pretrained velocity at step 0."""
    for key in CONVENTIONS if model is not None else ():
        have, want = getattr(pretrained, key), getattr(model, key)
        if have != want:
            raise DfmError(
                f"train.init_from = '{path}' was trained with model.{key} = {have!r}, this run has {want!r}: "
                f"set model.{key} = {have!r}, so that the converted model starts at the pretrained velocity"
            )


def _single_level(
    path: str | Path, ckpt: Path, info: RunInfo, kind: str, model: ModelSection | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checked EMA weights and the state of the single-level checkpoint `ckpt` (`path` resolved)."""
    recipe = load_run_recipe(ckpt / "recipe.toml")
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
    _check_conventions(path, recipe.model, model)
    hint = f"name an earlier checkpoint of that run (--init-from {ckpt.parent}/step-N)"
    weights, state = load_checkpoint(ckpt, ("ema",), hint=hint)
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
    return weights["ema"], state
