"""DFM-FLUX: a pretrained FLUX transformer turned into a DFM model (paper §4.5, App. E).

The paper finetunes FLUX-dev into DFM rather than training a large text-to-image model from
scratch. `DFMFlux` keeps FLUX's transformer (double- and single-stream blocks, text and
guidance embedders, final norm, rotary positions) as one shared trunk, and gives every level
of the decomposition its own patch embedding (FLUX's `x_embedder`), timestep embedder and
output projection (`proj_out`), under the same module names as `DFMDiT`, so
`init_from.convert_single_level` converts FLUX weights exactly as it converts a DiT's:
`flux_single_level_state` renames a diffusers `FluxTransformer2DModel` state dict into a
one-level `DFMFlux`'s, and the new levels start at zero.

Two conventions meet here. Ours: `x_t = t x1 + (1 - t) x0`, t = 0 is noise, the model predicts
`x1 - x0`. FLUX's: sigma = 1 - t is the noise level and it predicts `x0 - x1`. The model feeds
FLUX's own time features with sigma and negates what FLUX's layers output, so pretrained
weights keep their meaning.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from einops import rearrange
from torch import nn

from dfm_cli.errors import DfmError, import_diffusers, reading
from dfm_cli.method.cond import NullText, TextCond
from dfm_cli.models.dit import renamed_heads
from dfm_cli.models.positions import level_patches

FLUX_DEV_TEXT = (512, 4096, 768)  # FLUX-dev's T5 tokens (max length, width) and CLIP pooled width
TIME_FEATURES = 256  # width of FLUX's sinusoidal time features
GET_WEIGHTS = (
    "download the transformer of FLUX.1-dev with `huggingface-cli download black-forest-labs/FLUX.1-dev "
    "--include 'transformer/*' --local-dir FOLDER` and pass FOLDER/transformer"
)


class FluxTimestepEmbedder(nn.Module):
    """One level's time MLP on FLUX's sinusoidal features: FLUX's `timestep_embedder` with
    `linear_1`/`linear_2` named `mlp.0`/`mlp.2` as in `DFMDiT`, so zeroing `mlp.2` silences it."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


def _flux_kwargs(config: dict, in_channels: int) -> dict:
    """`config` (a `FluxTransformer2DModel` config.json's contents, or just its architecture
    keys) with the packing keys set from our channels and patch: FLUX's own `patch_size` stays
    1 because the model packs the latents itself, per level."""
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    for key, want in (("in_channels", in_channels), ("out_channels", in_channels), ("patch_size", 1)):
        have = kwargs.pop(key, None)
        if have is not None and have != want:
            raise DfmError(
                f"FLUX config {key} = {have}, but the data's channels and patch give {want} "
                f"(in_channels = channels x patch x patch, e.g. 16 x 2 x 2 = 64 for FLUX's latents)"
            )
    return {**kwargs, "in_channels": in_channels, "patch_size": 1}


class DFMFlux(nn.Module):
    """FLUX's transformer with per-level patch embeddings, timestep embedders and heads.

    `forward(levels, t, y, stage)` returns one velocity per level, like `DFMDiT`: `levels` are
    `B C H W` tensors, coarsest first; `t` is `B S` in our time (1 = data); `y` a `TextCond`;
    `stage` `B` 0-based stage indices. The conditioning vector is the sum of every level's
    time embedding, the pooled-text embedding, the guidance embedding (FLUX-dev) and a
    learned stage embedding. A fresh model has diffusers' default random init; only a
    conversion (`convert_single_level`) zeroes the new levels' layers.

    The caption mask is not used: FLUX attends to all of T5's tokens, padding included, and its
    weights expect that, so a text store must keep the encoder's outputs at padded positions.
    """

    video = False
    level_rms = None
    num_classes = 0
    img_ids: torch.Tensor  # a buffer

    def __init__(
        self,
        config: dict,
        level_sizes: Sequence[tuple[int, int]],
        channels: int,
        patch: int = 2,
        text_dims: tuple[int, int, int] = FLUX_DEV_TEXT,
        guidance: float = 3.5,
    ) -> None:
        # heavy: imported when a FLUX model is built. From its own module: for type checkers,
        # `diffusers.FluxTransformer2DModel` is the placeholder diffusers defines for when torch is missing
        import_diffusers("model.kind = 'flux'")  # a one-line error with the install hint, not a traceback
        from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

        super().__init__()
        self.level_sizes = [tuple(s) for s in level_sizes]
        if any(len(s) != 2 for s in self.level_sizes):
            raise DfmError(f"the FLUX model generates images only; got level sizes {self.level_sizes}")
        self.channels, self.guidance, self.text_dims = channels, float(guidance), tuple(text_dims)
        self.patches = [p for _, p in level_patches(self.level_sizes, patch)]
        finest = self.level_sizes[-1]
        self.grid = (1, finest[0] // patch, finest[1] // patch)
        try:
            flux = FluxTransformer2DModel(**_flux_kwargs(config, channels * patch * patch))
        except TypeError as e:
            raise DfmError(f"not a FluxTransformer2DModel config: {e}") from None
        hidden = flux.inner_dim
        self.inner_dim = hidden
        if (text_dims[1], text_dims[2]) != (
            flux.context_embedder.in_features,
            flux.time_text_embed.text_embedder.linear_1.in_features,
        ):
            raise DfmError(
                f"text_dims {tuple(text_dims)} (max tokens, token width, pooled width) do not fit the FLUX config: "
                f"joint_attention_dim = {flux.context_embedder.in_features} must equal the token width and "
                f"pooled_projection_dim = {flux.time_text_embed.text_embedder.linear_1.in_features} the pooled "
                "width; encode the captions with the text encoders this model was trained with"
            )

        # shared: FLUX's trunk as it is
        self.pos_embed = flux.pos_embed
        self.time_proj = flux.time_text_embed.time_proj
        self.text_embedder = flux.time_text_embed.text_embedder
        self.guidance_embedder = getattr(flux.time_text_embed, "guidance_embedder", None)
        self.context_embedder = flux.context_embedder
        self.transformer_blocks = flux.transformer_blocks
        self.single_transformer_blocks = flux.single_transformer_blocks
        self.norm_out = flux.norm_out
        # per level (init_from.PER_LEVEL)
        self.patch_embeds = nn.ModuleList(nn.Linear(channels * p * p, hidden) for p in self.patches)
        self.t_embedders = nn.ModuleList(FluxTimestepEmbedder(hidden) for _ in self.level_sizes)
        self.level_heads = nn.ModuleList(nn.Linear(hidden, channels * p * p) for p in self.patches)
        self.register_load_state_dict_pre_hook(renamed_heads)
        self.stage_embedder = nn.Embedding(self.levels, hidden)
        nn.init.normal_(self.stage_embedder.weight, std=0.02)
        self.null_text = NullText(*text_dims)
        _, gh, gw = self.grid
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        # FLUX's image position ids: (0, row, col) on the token grid, as its pipeline makes them
        self.register_buffer(
            "img_ids", torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3), persistent=False
        )

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block, double- then single-stream: the units FSDP shards."""
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    def null_condition(self, n: int) -> TextCond:
        """The empty caption for `n` samples (caption dropout, the unguided half of CFG)."""
        return self.null_text(n)

    def _time_features(self, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """FLUX's features of a time in [0, 1], computed as FLUX computes them (×1000 in `dtype`)."""
        return self.time_proj(value.to(dtype) * 1000).to(dtype)

    def forward(
        self, levels: Sequence[torch.Tensor], t: torch.Tensor, y: TextCond, stage: torch.Tensor
    ) -> list[torch.Tensor]:
        _, gh, gw = self.grid
        x = sum(
            embed(rearrange(level, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p))
            for embed, level, p in zip(self.patch_embeds, levels, self.patches)
        )
        sigma = 1 - t  # FLUX's noise level
        temb = sum(emb(self._time_features(sigma[:, s], x.dtype)) for s, emb in enumerate(self.t_embedders))
        if self.guidance_embedder is not None:  # FLUX-dev is guidance-distilled: a constant scale
            g = torch.full((x.shape[0],), self.guidance, device=x.device)
            temb = temb + self.guidance_embedder(self._time_features(g, x.dtype))
        temb = temb + self.text_embedder(y.pooled.to(x.dtype)) + self.stage_embedder(stage)
        ctx = self.context_embedder(y.tokens.to(x.dtype))
        txt_ids = self.img_ids.new_zeros(ctx.shape[1], 3)
        rope = self.pos_embed(torch.cat([txt_ids, self.img_ids]))
        for block in self.blocks:
            ctx, x = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb, image_rotary_emb=rope)
        x = self.norm_out(x, temb)
        return [
            -rearrange(head(x), "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=gh, w=gw, ph=p, pw=p)
            for head, p in zip(self.level_heads, self.patches)
        ]

    def flops_per_sample(self) -> float:
        """Forward FLOPs for one sample, 2 per multiply-add: every linear layer (patch
        embeddings, text, time and guidance embedders, each block's modulation, projections and
        MLPs, final norm's modulation, heads) and the attention scores and weighted sums over
        the image tokens plus `text_dims[0]` text tokens. Norms, activations and RoPE are not
        counted (elementwise)."""
        n, txt, d = self.grid[1] * self.grid[2], self.text_dims[0], self.inner_dim
        tokens = n + txt

        def linear(m: nn.Linear, rows: int = 1) -> int:
            return 2 * rows * m.in_features * m.out_features

        flops = sum(linear(cast(nn.Linear, e), n) for e in self.patch_embeds)
        flops += sum(linear(cast(nn.Linear, h), n) for h in self.level_heads)
        flops += linear(self.context_embedder, txt) + linear(self.norm_out.linear)
        embedders = [self.text_embedder, *self.t_embedders]
        if self.guidance_embedder is not None:
            embedders.append(self.guidance_embedder)
        flops += sum(linear(m) for e in embedders for m in e.modules() if isinstance(m, nn.Linear))
        attention = 2 * 2 * tokens * tokens * d  # q k^T and the weighted sum of v
        for b in self.transformer_blocks:
            mlp = b.ff.net[0].proj.out_features
            flops += linear(b.norm1.linear) + linear(b.norm1_context.linear) + attention
            flops += 2 * tokens * (3 * d * d + d * d + 2 * d * mlp)  # qkv, out proj, MLP, both streams
        for b in self.single_transformer_blocks:
            mlp = b.proj_mlp.out_features
            flops += linear(b.norm.linear) + attention
            flops += 2 * tokens * (3 * d * d + d * mlp + (d + mlp) * d)  # qkv, MLP in, joint out proj
        return float(flops)


# --------------------------------------------------------------------------- pretrained FLUX weights

_RENAMES = (  # diffusers FluxTransformer2DModel prefix -> one-level DFMFlux prefix; first match wins
    ("x_embedder.", "patch_embeds.0."),
    ("proj_out.", "level_heads.0."),
    ("time_text_embed.timestep_embedder.linear_1.", "t_embedders.0.mlp.0."),
    ("time_text_embed.timestep_embedder.linear_2.", "t_embedders.0.mlp.2."),
    ("time_text_embed.", ""),
)


def flux_single_level_state(pretrained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict as the state dict of a one-level
    `DFMFlux`, ready for `convert_single_level`. The stage embedding is zero: FLUX has none, so
    the converted model's conditioning is FLUX's own."""
    if "x_embedder.weight" not in pretrained:
        raise DfmError("not a FluxTransformer2DModel state dict (no x_embedder.weight)")
    out = {}
    for key, value in pretrained.items():
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    hidden = pretrained["x_embedder.weight"].shape[0]
    out["stage_embedder.weight"] = torch.zeros(1, hidden, dtype=pretrained["x_embedder.weight"].dtype)
    return out


def load_flux_transformer(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a local diffusers FLUX transformer folder (config.json and
    *.safetensors, e.g. FLUX.1-dev's `transformer/`), as stored (bf16 for FLUX-dev), without
    building the model: a 12B-parameter model in fp32 would not fit next to the DFM one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise DfmError(f"{folder}: no FLUX transformer here (config.json missing); {GET_WEIGHTS}")
    with reading(config, "diffusers config"):
        kind = json.loads(config.read_text()).get("_class_name")
    if kind != "FluxTransformer2DModel":
        raise DfmError(f"{folder}: config.json describes a {kind}, not a FluxTransformer2DModel; {GET_WEIGHTS}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DfmError(f"{folder}: no *.safetensors weights next to config.json; {GET_WEIGHTS}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with reading(file, "safetensors file"):
            weights.update(load_file(file))
    return weights


def flux_config(section, text_dims: Sequence[int]) -> dict:
    """The FLUX architecture a recipe's `[flux]` section names: a local transformer folder's (or
    config.json's) config as it is, or the section's sizes with the text widths of the data."""
    if section.config:
        path = Path(section.config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise DfmError(f"flux.config = '{section.config}': no config.json there; {GET_WEIGHTS}")
        with reading(path, "diffusers config (JSON)"):
            return json.loads(path.read_text())
    return {
        "num_layers": section.num_layers,
        "num_single_layers": section.num_single_layers,
        "attention_head_dim": section.attention_head_dim,
        "num_attention_heads": section.num_attention_heads,
        "axes_dims_rope": tuple(section.axes_dims_rope),
        "guidance_embeds": section.guidance_embeds,
        "joint_attention_dim": int(text_dims[1]),
        "pooled_projection_dim": int(text_dims[2]),
    }


def is_flux_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers FLUX transformer folder (rather than a `dfm` run)."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == "FluxTransformer2DModel"
    except (OSError, ValueError):
        return False
