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

With per-level preconditioning (`flow.precondition`), the model's output on a level is
`c_skip x + c_out F(c_in x)`, with scalings from that level's data RMS. The pretrained network
was trained inside the scalings of its own data RMS, so the pretrained level takes that RMS
(the other levels keep theirs): its scalings, and so its output, are then the pretrained
model's. Preconditioning must be on in both models or in neither: the scalings cannot be
made to add nothing, nor to reproduce a pretrained model's that the other lacks.
"""

from __future__ import annotations

import torch
from torch import nn

from dfm_cli.errors import DfmError
from dfm_cli.models.dit import DFMDiT
from dfm_cli.models.flux import DFMFlux

PER_LEVEL = ("patch_embeds", "t_embedders", "level_heads")  # the layers each level has its own copy of


def check_same_preconditioning(model: nn.Module, pretrained: dict[str, torch.Tensor]) -> None:
    """Refuse single-level weights whose preconditioning (a `level_rms` buffer) `model` does not
    share: the converted model could not start at the pretrained velocity."""
    theirs, ours = "level_rms" in pretrained, getattr(model, "level_rms", None) is not None
    if theirs and not ours:
        raise DfmError(
            "the pretrained model was trained with flow.precondition = true, this run has flow.precondition = "
            "false: set flow.precondition = true, so that the pretrained level keeps the scalings it was trained in"
        )
    if ours and not theirs:
        raise DfmError(
            "the pretrained model was trained with flow.precondition = false, this run has flow.precondition = "
            "true: the scalings would change the pretrained velocity; set flow.precondition = false, or start "
            "from a run trained with flow.precondition = true"
        )


def per_level_parameters(model: nn.Module) -> set[str]:
    """Names of the per-level layers' parameters: what trains first after a conversion."""
    return {name for name, _ in model.named_parameters() if name.split(".", 1)[0] in PER_LEVEL}


@torch.no_grad()
def convert_single_level(
    model: DFMDiT | DFMFlux, pretrained: dict[str, torch.Tensor], level: int | None = None
) -> None:
    """Load single-level weights into `model`: shared layers as they are, the per-level ones
    into `level` (default the finest; the coarsest with `flow.upsample_coarse`, the paper's
    placement), zeros for the other levels' per-level layers; with preconditioning, that level
    takes the pretrained level RMS."""
    target_level = model.levels - 1 if level is None else level
    own = model.state_dict()
    new = dict(own)
    check_same_preconditioning(model, pretrained)
    for key, value in pretrained.items():
        head, _, rest = key.partition(".")
        if key == "level_rms":  # the pretrained level keeps the RMS its scalings were trained with
            if value.shape != (1,):
                raise DfmError(f"pretrained weight {key}: a single-level model has one level RMS, got {value.tolist()}")
            new[key] = own[key].clone()
            new[key][target_level] = value[0]
            continue
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
            raise DfmError(
                f"pretrained weight {key} has no place in this model; was it trained with another "
                "model.name or model.pos?"
            )
        if own[target].shape != value.shape:
            raise DfmError(
                f"pretrained weight {key} has shape {tuple(value.shape)}, this model's {target} has "
                f"{tuple(own[target].shape)}: the level it goes to must use the pretrained patch size "
                "(same model.name) and the same data shape"
            )
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
