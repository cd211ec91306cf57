"""The authors' released SiT and DFM-SiT weights (snap-research/elit) as DFM-DiT weights.

Their networks are the DFM-DiT with other conventions, each of which is a recipe key or a
rule applied here (docs/method.md §9):
- time runs from data to noise and the timestep embedder sees raw t: `model.time_embed = "sit"`;
- their velocity is `noise − data`, ours `data − noise`: the output heads are negated;
- positions are MAE's sin-cos table, width first: `model.pos = "sincos_wh"`; the table in the
  checkpoint is checked against ours, value for value;
- no stage embedding: ours is imported as zeros, which add nothing;
- patch embeddings are convolutions: their kernels become our linear maps (same numbers);
- REPA projectors only train: they are dropped and reported.

Architecture is read from the tensors' shapes, never from their code (which is not a dependency).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfm_cli.errors import DfmError
from dfm_cli.models.dit import MODELS, DiTSize
from dfm_cli.models.positions import sincos_embedding

# their registry: name suffix → (depth, width, heads); the same sizes as DiT's and ours
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
HEADS = {64: 2, 128: 4, **{w: h for _, w, h in SIZES.values()}}  # width → heads (N and T are ours)
TRAINING_ONLY = ("projectors.",)  # REPA's projection heads: a training loss, not the forward pass


@dataclass(frozen=True)
class ElitArch:
    """What a checkpoint's tensors say about the network that wrote them."""

    dfm: bool  # DFM-SiT (one patch embedding, timestep embedder and head per level) or SiT
    depth: int
    hidden: int
    patches: tuple[int, ...]  # per level, coarsest first
    channels: int
    num_classes: int
    grid: int  # tokens per side

    @property
    def levels(self) -> int:
        return len(self.patches)

    @property
    def size(self) -> int:
        """The finest level's side, in latent pixels."""
        return self.grid * self.patches[-1]

    @property
    def ours(self) -> str:
        """The DFM-DiT registry name of the same network."""
        heads = HEADS.get(self.hidden)
        want = DiTSize(self.depth, self.hidden, heads or 0, self.patches[-1])
        found = [name for name, size in MODELS.items() if size == want]
        if not found:
            raise DfmError(
                f"the checkpoint's network (depth {self.depth}, width {self.hidden}, patch {self.patches[-1]}) "
                "has no DFM-DiT size of the same shape; known sizes: N, T, S, B, L, XL"
            )
        return found[0]


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the bare module names them (DDP's `module.` and torch.compile's `_orig_mod.` gone)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise DfmError(f"the checkpoint's weights lack {key}: not a SiT or DFM-SiT checkpoint")
    return tuple(state[key].shape)


def infer_arch(state: dict[str, torch.Tensor]) -> ElitArch:
    """Read the network's size from its tensors; refuse what our DFM-DiT cannot reproduce."""
    if any(".q_norm." in k or ".k_norm." in k for k in state):
        raise DfmError("the checkpoint was trained with --qk-norm, which the DFM-DiT does not have")
    dfm = "x_embedder.embedders.0.proj.weight" in state
    if dfm:
        levels = len({k.split(".")[2] for k in state if k.startswith("x_embedder.embedders.")})
        convs = [_shape(state, f"x_embedder.embedders.{s}.proj.weight") for s in range(levels)]
    else:
        convs = [_shape(state, "x_embedder.proj.weight")]
    hidden, channels = convs[0][:2]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    table = _shape(state, "y_embedder.embedding_table.weight")
    head = "final_layer.projections.0" if dfm else "final_layer"
    if _shape(state, f"{head}.adaLN_modulation.1.weight") != (2 * hidden, hidden):
        raise DfmError("the checkpoint's final layer is narrower than its blocks (decoder_hidden_size): unsupported")
    mlp = _shape(state, "blocks.0.mlp.fc1.weight")[0]
    if mlp != 4 * hidden:
        raise DfmError(f"the checkpoint's MLP ratio is {mlp / hidden:g}; the DFM-DiT's is 4")
    tokens = _shape(state, "pos_embed")[1]
    grid = round(tokens**0.5)
    return ElitArch(dfm, depth, hidden, tuple(c[-1] for c in convs), channels, table[0] - 1, grid)


def registry_shapes(name: str, arch: ElitArch) -> dict[str, tuple[int, ...]]:
    """Every forward-pass tensor's shape in their registry model `name` (e.g. `DFM-SiT-XL/2`),
    for the checkpoint's classes, channels and token grid."""
    kind, _, rest = name.rpartition("-")
    size, _, patch_text = rest.partition("/")
    if kind not in ("SiT", "DFM-SiT") or size not in SIZES or patch_text not in ("2", "4", "8"):
        raise DfmError(f"--model {name!r}: choose DFM-SiT-<S|B|L|XL>/<2|4|8> or SiT-<S|B|L|XL>/<2|4|8>")
    depth, d, _ = SIZES[size]
    p, c = int(patch_text), arch.channels
    patches = (p // 2, p) if kind == "DFM-SiT" else (p,)
    out: dict[str, tuple[int, ...]] = {"pos_embed": (1, arch.grid**2, d)}
    per_level = [f"x_embedder.embedders.{s}." for s in range(len(patches))] if kind == "DFM-SiT" else ["x_embedder."]
    for prefix, q in zip(per_level, patches):
        out |= {prefix + "proj.weight": (d, c, q, q), prefix + "proj.bias": (d,)}
    t_prefixes = [f"t_embedder.embedders.{s}." for s in range(len(patches))] if kind == "DFM-SiT" else ["t_embedder."]
    for prefix in t_prefixes:
        out |= {prefix + "mlp.0.weight": (d, 256), prefix + "mlp.0.bias": (d,)}
        out |= {prefix + "mlp.2.weight": (d, d), prefix + "mlp.2.bias": (d,)}
    out["y_embedder.embedding_table.weight"] = (arch.num_classes + 1, d)
    for i in range(depth):
        b = f"blocks.{i}."
        for layer, (o, n) in {
            "attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (4 * d, d), "mlp.fc2": (d, 4 * d),
            "adaLN_modulation.1": (6 * d, d),
        }.items():  # fmt: skip
            out |= {f"{b}{layer}.weight": (o, n), f"{b}{layer}.bias": (o,)}
    heads = [f"final_layer.projections.{s}." for s in range(len(patches))] if kind == "DFM-SiT" else ["final_layer."]
    for prefix, q in zip(heads, patches):
        out |= {prefix + "adaLN_modulation.1.weight": (2 * d, d), prefix + "adaLN_modulation.1.bias": (2 * d,)}
        out |= {prefix + "linear.weight": (q * q * c, d), prefix + "linear.bias": (q * q * c,)}
    return out


def check_model_name(name: str, state: dict[str, torch.Tensor], arch: ElitArch) -> None:
    """Refuse `--model NAME` when the checkpoint is not that network, naming the first tensor that differs."""
    want = registry_shapes(name, arch)
    for key, shape in want.items():
        have = tuple(state[key].shape) if key in state else None
        if have != shape:
            shown = "absent" if have is None else f"{list(have)}"
            raise DfmError(
                f"--model {name} does not match the checkpoint: {key} is {shown} in the checkpoint, "
                f"{list(shape)} in {name}"
            )


@dataclass
class Converted:
    """Our state dict, and what was left out (training-only tensors), for the report."""

    state: dict[str, torch.Tensor]
    dropped: list[str]


def _target(key: str, dfm: bool) -> tuple[str, str]:
    """Our name for one of their forward-pass tensors, and how its value changes
    (`"conv"`: kernel → linear map, `"negate"`: velocity direction, `""`: as it is)."""
    parts = key.split(".")
    if key.startswith("x_embedder."):
        level = parts[2] if dfm else "0"
        return f"patch_embeds.{level}.proj.{parts[-1]}", "conv" if parts[-1] == "weight" else ""
    if key.startswith("t_embedder."):
        level = parts[2] if dfm else "0"
        return f"t_embedders.{level}.{'.'.join(parts[-3:])}", ""
    if key == "y_embedder.embedding_table.weight":
        return "y_embedder.weight", ""
    if key.startswith("blocks."):
        rest = ".".join(parts[2:])
        for theirs, ours in (("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."), ("adaLN_modulation.1.", "ada.1.")):
            rest = rest.replace(theirs, ours) if rest.startswith(theirs) else rest
        return f"blocks.{parts[1]}.{rest}", ""
    if key.startswith("final_layer."):
        level = parts[2] if dfm else "0"
        layer = "ada.1" if "adaLN_modulation" in key else "linear"
        return f"level_heads.{level}.{layer}.{parts[-1]}", "negate" if layer == "linear" else ""
    raise DfmError(
        f"the checkpoint holds {key}, which the DFM-DiT has no place for; it may be part of the "
        "forward pass, so nothing is imported"
    )


@torch.no_grad()
def convert(state: dict[str, torch.Tensor], arch: ElitArch) -> Converted:
    """Their weights as DFM-DiT weights for `model.pos = "sincos_wh"`, `model.time_embed = "sit"`."""
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in state.items():
        if key.startswith(TRAINING_ONLY):
            dropped.append(key)
            continue
        if key == "pos_embed":  # fixed, not learned: ours must be the same table
            ours = sincos_embedding((1, arch.grid, arch.grid), arch.hidden, width_first=True)
            diff = float((value[0].float() - ours).abs().max())
            if diff > 1e-5:
                raise DfmError(f"the checkpoint's position table differs from MAE's sin-cos table by {diff:.3g}")
            continue
        target, change = _target(key, arch.dfm)
        value = value.float()
        if change == "conv":
            value = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)  # (d, c, p, p) → (d, (p p c))
        elif change == "negate":
            value = -value
        out[target] = value.contiguous()
    out["stage_embedder.weight"] = torch.zeros(arch.levels, arch.hidden)
    return Converted(out, dropped)
