"""Starting a DFM model from a trained single-level (Flow Matching) model (paper §4.5).

Most users already have a flow model. The paper finetunes it into DFM instead of training from
scratch. The pretrained patch embedding, timestep embedder and head become one level's: the
finest by default, with the new coarser levels added below it; or, with
`flow.upsample_coarse`, the coarsest, which is then carried at the pretrained size (paper
App. E). The other levels get zero-initialized ones. A zero patch embedding adds nothing to
the tokens, a zero timestep embedder adds nothing to the conditioning, and a zero head predicts
nothing, so at step 0 the converted model predicts, for its pretrained level, exactly what the pretrained
one did. Every
pretrained stage-embedding row is copied to every stage for the same reason.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dfm_cli.data.checkpoints import STATE, RunInfo, load_checkpoint, resolve_checkpoint
from dfm_cli.errors import DfmError
from dfm_cli.models.dit import DFMDiT
from dfm_cli.config.recipe import load_recipe

PER_LEVEL = ("patch_embeds", "t_embedders", "heads")  # the layers each level has its own copy of


def per_level_parameters(model: DFMDiT) -> set[str]:
    """Names of the per-level layers' parameters: what trains first after a conversion."""
    return {name for name, _ in model.named_parameters() if name.split(".", 1)[0] in PER_LEVEL}


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
        raise DfmError(f"train.init_from = '{path}' is a model.kind = '{recipe.model.kind}' run; this run trains "
                       f"'{kind}': start from a single-level run of the same kind")
    if recipe.flow.levels != 1:
        raise DfmError(f"train.init_from = '{path}': a Flow Matching run (flow.levels = 1) is needed, this one has "
                       f"{recipe.flow.levels} levels")
    weights, state = load_checkpoint(ckpt, ("ema",))
    old = RunInfo.from_state(state, ckpt / STATE)
    for what, have, want in (("data shape", list(old.shape), list(info.shape)),
                             ("number of classes", old.num_classes, info.num_classes)):
        if have != want:
            raise DfmError(f"train.init_from = '{path}' was trained on {what} {have}, this run has {want}; "
                           "finetune on data of the same shape and classes")
    return weights["ema"]


@torch.no_grad()
def convert_single_level(model: DFMDiT, pretrained: dict[str, torch.Tensor], level: int | None = None) -> None:
    """Load single-level weights into `model`: shared layers as they are, the per-level ones
    into `level` (default the finest; the coarsest with `flow.upsample_coarse`, the paper's
    placement), zeros for the other levels' per-level layers."""
    target_level = model.levels - 1 if level is None else level
    own = model.state_dict()
    new = dict(own)
    for key, value in pretrained.items():
        head, _, rest = key.partition(".")
        if head in PER_LEVEL:
            index, _, rest = rest.partition(".")
            if index != "0":
                raise DfmError(f"pretrained weight {key}: a single-level model has level 0 only")
            target = f"{head}.{target_level}.{rest}"
        elif head == "stage_embedder":
            target, value = key, value[:1].expand_as(own[key])
        else:
            target = key
        if target not in own and f"{target.rpartition('.')[0]}.base.{target.rpartition('.')[2]}" in own:
            target = f"{target.rpartition('.')[0]}.base.{target.rpartition('.')[2]}"  # a layer with per-stage experts
        if target not in own:
            raise DfmError(f"pretrained weight {key} has no place in this model; was it trained with another "
                           "model.name or model.pos?")
        if own[target].shape != value.shape:
            raise DfmError(f"pretrained weight {key} has shape {tuple(value.shape)}, this model's {target} has "
                           f"{tuple(own[target].shape)}: the level it goes to must use the pretrained patch size "
                           "(same model.name) and the same data shape")
        new[target] = value.clone()
    for other in (s for s in range(model.levels) if s != target_level):
        for head in PER_LEVEL:
            prefix = f"{head}.{other}."
            zeroed = [k for k in own if k.startswith(prefix)]
            if head == "t_embedders":  # zero the output layer: the embedder then adds nothing
                zeroed = [k for k in zeroed if k.startswith(f"{prefix}mlp.2.")]
            for k in zeroed:
                new[k] = torch.zeros_like(own[k])
    model.load_state_dict(new)
    for expert in getattr(model, "experts", []):  # per-stage experts start as the pretrained shared weights
        expert.sync()
