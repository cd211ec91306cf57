"""DFM-DiT: a DiT (adaLN-Zero) that sees every level of a decomposition at once (docs/method.md §4).

Sections, as in DiT's `models.py` (positions live in `positions.py`): embedders → block → per-level heads → model →
registry. What differs from DiT:
- one patch embedding per level, with patch sizes chosen so that every level gives the same
  token grid; the embeddings are summed, so the sequence is as long as the FM baseline's;
- one timestep embedder per level (summed), plus the class embedding (or, for text, the
  pooled caption embedding), plus a learned stage-index embedding, form the adaLN conditioning;
- with text, each block also cross-attends to the caption's tokens (PixArt-α's layout);
- one zero-initialised output head per level, each predicting that level's velocity;
- 2D RoPE by default (3D for video: frames are patchified independently), sin-cos optional;
- optional EDM-style per-level pre/post-conditioning (paper App. A.1, `flow.precondition`);
- optional per-stage experts (paper Table 1d, `model.specialize`, see `experts.py`).

With one level the model is a plain DiT of the same size: the Flow Matching baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dfm_cli.errors import DfmError
from dfm_cli.method.cond import Cond, NullText, TextCond
from dfm_cli.method.level_stats import per_sample, precondition_scales
from dfm_cli.models.experts import specialize
from dfm_cli.models.positions import apply_rope, level_patches, rope_angles, rope_rotations, sincos_embedding

M = TypeVar("M", bound=nn.Module)
POSITIONS = ("rope", "sincos", "sincos_wh")  # `model.pos`; "sincos_wh" is DiT/SiT's (MAE's) table, width first


def each(modules: nn.ModuleList, kind: type[M]) -> list[M]:
    """The members of `modules`, every one a `kind`, typed as such (a `ModuleList` types them as `Module`)."""
    typed = [m for m in modules if isinstance(m, kind)]
    if len(typed) != len(modules):
        raise TypeError(f"expected a list of {kind.__name__} only")
    return typed


def linear_at(seq: nn.Sequential, index: int) -> nn.Linear:
    """`seq[index]`, a linear layer, typed as one (an `nn.Sequential` types its items as `Module`)."""
    layer = seq[index]
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"expected a linear layer at index {index}, found {type(layer).__name__}")
    return layer


# --------------------------------------------------------------------------- embedders


TIME_EMBEDS = ("dit", "sit")


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0, clock: str = "dit") -> torch.Tensor:
    """Sinusoidal features of t in [0, 1]: of 1000·t (`clock = "dit"`, so the frequencies match
    DiT's), or of 1 − t unscaled (`"sit"`: SiT's clock, which runs from data to noise; the
    authors' DFM-SiT embeds it so, docs/method.md §9)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (1.0 - t.float() if clock == "sit" else 1000.0 * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256, clock: str = "dit") -> None:
        super().__init__()
        if clock not in TIME_EMBEDS:
            raise DfmError(f"model.time_embed must be one of {', '.join(TIME_EMBEDS)}, got {clock!r}")
        self.freq_dim, self.hidden, self.clock = freq_dim, hidden, clock
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim, clock=self.clock))

    @property
    def linears(self) -> tuple[nn.Linear, nn.Linear]:
        """The MLP's two linear layers (`mlp.0`, `mlp.2`); zeroing the second silences the embedder."""
        return linear_at(self.mlp, 0), linear_at(self.mlp, 2)

    def flops(self) -> int:
        """Forward FLOPs for one sample (2 per multiply-add)."""
        return 2 * (self.freq_dim * self.hidden + self.hidden * self.hidden)


class PatchEmbed(nn.Module):
    """Linear embedding of non-overlapping `pt × p × p` patches of one level."""

    def __init__(self, channels: int, patch: tuple[int, int], hidden: int) -> None:
        super().__init__()
        self.pt, self.p = patch
        self.proj = nn.Linear(channels * self.pt * self.p * self.p, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=self.pt, ph=self.p, pw=self.p)
        return self.proj(x)

    def flops(self, tokens: int) -> int:
        """Forward FLOPs for one sample of `tokens` patches."""
        return 2 * tokens * self.proj.in_features * self.proj.out_features


# --------------------------------------------------------------------------- block


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if rope is None:
            q, k, v = qkv
        else:  # q and k rotated together, in one pass
            (q, k), v = apply_rope(qkv[:2], rope), qkv[2]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Image tokens attend to the caption's tokens (already projected to the model width);
    padding is masked out. Its output projection starts at zero, so a fresh text model starts
    as the unconditional DiT and learns how much to listen."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(self.norm(x)), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(text), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        mask = mask | ~mask.any(dim=1, keepdim=True)  # a caption with no token attends to all (no NaN)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning (adaLN-Zero),
    with cross-attention to the caption between attention and MLP when the model has text."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, text: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.cross = CrossAttention(hidden, heads) if text else None
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: torch.Tensor | None,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        if self.cross is not None:
            if text is None:
                raise ValueError("a text-conditioned block needs the caption's tokens")
            x = x + self.cross(x, *text)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))

    def zero_init_layers(self) -> list[nn.Linear]:
        """What adaLN-Zero starts at zero: the modulation, and the cross-attention's output."""
        return [linear_at(self.ada, -1), *([self.cross.proj] if self.cross is not None else [])]


# --------------------------------------------------------------------------- per-level heads


class LevelHead(nn.Module):
    """Final adaLN modulation and linear unpatchify of one level, zero-initialised
    (adaLN-Zero). It takes the already-normalised tokens: the final LayerNorm has no
    parameters, so the model computes it once for all levels."""

    def __init__(self, hidden: int, channels: int, patch: tuple[int, int]) -> None:
        super().__init__()
        self.pt, self.p = patch
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, self.pt * self.p * self.p * channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int, int], video: bool) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        x = self.linear(modulate(x, shift, scale))
        t, h, w = grid
        if not video:  # images: no frame axis, and no view of one (FSDP2 wants fresh outputs)
            return rearrange(x, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=h, w=w, ph=self.p, pw=self.p)
        return rearrange(
            x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=self.pt, ph=self.p, pw=self.p
        )

    def zero_init_layers(self) -> list[nn.Linear]:
        """What adaLN-Zero starts at zero: the modulation and the output projection."""
        return [linear_at(self.ada, -1), self.linear]

    def flops(self, tokens: int) -> int:
        """Forward FLOPs for one sample of `tokens` tokens (the modulation once, the projection per token)."""
        d = self.linear.in_features
        return 2 * tokens * d * self.linear.out_features + 2 * d * 2 * d


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DiTSize:
    depth: int
    hidden: int
    heads: int
    patch: int
    mlp_ratio: float = 4.0


TextTokens = tuple[torch.Tensor, torch.Tensor]
"""A caption's embedded tokens `B L D` and their mask `B L`, for the blocks' cross-attention."""


@dataclass
class Tokens:
    """A token sequence `B N D` on a `(T, H, W)` grid, with its RoPE rotations or sin-cos
    embedding (already added to `x`), whichever the model uses."""

    x: torch.Tensor
    grid: tuple[int, int, int]
    rope: torch.Tensor | None
    pos: torch.Tensor | None


def renamed_heads(module: nn.Module, state: dict, prefix: str, *args: object) -> None:
    """Checkpoints written before the per-level output heads were named `level_heads` load as they are."""
    for key in [k for k in state if k.startswith(prefix + "heads.")]:
        state[prefix + "level_" + key[len(prefix) :]] = state.pop(key)


class DFMDiT(nn.Module):
    """The DFM-DiT. `forward(levels, t, y, stage)` returns one velocity per level.

    `levels`: list of `B C H W` (or `B C T H W`) tensors, coarsest first, later levels already
    zeroed by the caller; `t`: `B S` timesteps; `y`: `B` labels (the null class is
    `num_classes`), or with `text_dims = (max_tokens, token_dim, pooled_dim)` a `TextCond` of
    encoded captions (the null is the empty caption's, `null_text`); `stage`: `B` 0-based
    stage indices.

    `level_rms` turns on the per-level pre/post-conditioning (docs/method.md §4.5): the
    root-mean-square of each level of the data, kept as a buffer so a checkpoint carries it.
    Without it (the default) the network is used as it is.
    """

    # buffers (`register_buffer`), None when unused
    rope: torch.Tensor | None
    pos_embed: torch.Tensor | None
    level_rms: torch.Tensor | None

    def __init__(
        self,
        size: DiTSize,
        level_sizes: Sequence[tuple[int, ...]],
        channels: int,
        num_classes: int,
        pos: str = "rope",
        temporal_patch: int = 1,
        level_rms: Sequence[float] | None = None,
        text_dims: tuple[int, int, int] | None = None,
        specialize_weights: str = "none",
        time_embed: str = "dit",
    ) -> None:
        super().__init__()
        if size.hidden % size.heads:
            raise DfmError(f"hidden {size.hidden} is not divisible by heads {size.heads}")
        if pos not in POSITIONS:
            raise DfmError(f"model.pos must be one of {', '.join(map(repr, POSITIONS))}, got {pos!r}")
        self.level_sizes = [tuple(s) for s in level_sizes]
        self.video = len(self.level_sizes[-1]) == 3
        self.num_classes = num_classes
        self.channels = channels
        self.hidden, self.num_heads = size.hidden, size.heads
        self.mlp_width = int(size.hidden * size.mlp_ratio)  # the blocks' MLP width
        self.patches = patches = level_patches(self.level_sizes, size.patch, temporal_patch)  # per level (pt, p)
        finest = self.level_sizes[-1]
        self.grid = (
            finest[0] // temporal_patch if self.video else 1,
            finest[-2] // size.patch,
            finest[-1] // size.patch,
        )
        levels = len(self.level_sizes)
        self.patch_embeds = nn.ModuleList(PatchEmbed(channels, p, size.hidden) for p in patches)
        self.t_embedders = nn.ModuleList(TimestepEmbedder(size.hidden, clock=time_embed) for _ in range(levels))
        self.text_dims = tuple(text_dims) if text_dims else None
        if self.text_dims:
            _, token_dim, pooled_dim = self.text_dims
            self.null_text = NullText(*self.text_dims)
            self.text_pooled = nn.Sequential(
                nn.Linear(pooled_dim, size.hidden), nn.SiLU(), nn.Linear(size.hidden, size.hidden)
            )
            self.text_tokens = nn.Sequential(
                nn.Linear(token_dim, size.hidden), nn.GELU(approximate="tanh"), nn.Linear(size.hidden, size.hidden)
            )
        else:
            self.y_embedder = nn.Embedding(num_classes + 1, size.hidden)
        self.stage_embedder = nn.Embedding(levels, size.hidden)
        self.blocks = nn.ModuleList(
            DiTBlock(size.hidden, size.heads, size.mlp_ratio, text=bool(self.text_dims)) for _ in range(size.depth)
        )
        self.final_norm = nn.LayerNorm(size.hidden, elementwise_affine=False, eps=1e-6)
        self.level_heads = nn.ModuleList(LevelHead(size.hidden, channels, p) for p in patches)
        self.register_load_state_dict_pre_hook(renamed_heads)
        head_dim = size.hidden // size.heads
        self.register_buffer(
            "rope", rope_rotations(rope_angles(self.grid, head_dim)) if pos == "rope" else None, persistent=False
        )
        self.width_first = pos == "sincos_wh"
        self.register_buffer(
            "pos_embed",
            sincos_embedding(self.grid, size.hidden, self.width_first) if pos != "rope" else None,
            persistent=False,
        )
        if level_rms is not None:
            if len(level_rms) != levels or any(not v > 0 for v in level_rms):
                raise DfmError(
                    f"preconditioning needs one positive level RMS per level ({levels}), got {list(level_rms)}"
                )
            self.register_buffer("level_rms", torch.tensor([float(v) for v in level_rms]))
        else:
            self.level_rms = None
        self._init_weights()
        self.experts = specialize(self.blocks, specialize_weights, levels)  # copies of the initialized weights

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def null_condition(self, n: int) -> Cond:
        """The unconditional input for `n` samples: the null class, or the empty caption."""
        if self.text_dims:
            return self.null_text(n)
        return torch.full((n,), self.num_classes, dtype=torch.long, device=self.stage_embedder.weight.device)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in each(self.t_embedders, TimestepEmbedder):
            for layer in emb.linears:
                nn.init.normal_(layer.weight, std=0.02)
        if not self.text_dims:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.stage_embedder.weight, std=0.02)
        zeroed = [layer for block in each(self.blocks, DiTBlock) for layer in block.zero_init_layers()]
        zeroed += [layer for head in each(self.level_heads, LevelHead) for layer in head.zero_init_layers()]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, xs: Sequence[torch.Tensor], t: torch.Tensor, y: Cond, stage: torch.Tensor) -> list[torch.Tensor]:
        if self.level_rms is None:
            return self.network(xs, t, y, stage)
        c_in, c_skip, c_out = precondition_scales(t, self.level_rms)
        scaled = [x * per_sample(c_in[:, s], x) for s, x in enumerate(xs)]
        out = self.network(scaled, t, y, stage)
        return [
            per_sample(c_skip[:, s], x) * x + per_sample(c_out[:, s], x) * o for s, (x, o) in enumerate(zip(xs, out))
        ]

    def network(self, xs: Sequence[torch.Tensor], t: torch.Tensor, y: Cond, stage: torch.Tensor) -> list[torch.Tensor]:
        """The transformer itself, without pre/post-conditioning. Inputs smaller than the
        model's size (Pyramidal Flow's early stages) give a smaller token grid, with positions
        for that grid."""
        tokens = self.tokens(xs)
        c, text = self.conditioning(t, y, stage)
        return self.decode(self.transform(tokens.x, c, tokens.rope, text, stage), c, tokens.grid)

    def tokens(self, xs: Sequence[torch.Tensor]) -> Tokens:
        """The levels' patch embeddings summed into one token sequence, with its positions."""
        levels = list(xs) if self.video else [x[:, :, None] for x in xs]  # images: one-frame videos
        pt, p = self.patches[-1]
        grid = (levels[-1].shape[2] // pt, levels[-1].shape[3] // p, levels[-1].shape[4] // p)
        rope, pos = (self.rope, self.pos_embed) if grid == self.grid else self._positions(grid, x=levels[-1])
        x = sum(embed(level) for embed, level in zip(self.patch_embeds, levels))
        if pos is not None:
            x = x + pos.to(x.dtype)
        return Tokens(x, grid, rope, pos)

    def conditioning(self, t: torch.Tensor, y: Cond, stage: torch.Tensor) -> tuple[torch.Tensor, TextTokens | None]:
        """The adaLN conditioning (every level's time, the class or pooled caption, the
        stage) and, for a text model, the caption tokens the blocks attend to."""
        c = sum(emb(t[:, s]) for s, emb in enumerate(self.t_embedders))
        if isinstance(y, TextCond):
            c = c + self.text_pooled(y.pooled.to(c.dtype)) + self.stage_embedder(stage)
            return c, (self.text_tokens(y.tokens.to(c.dtype)), y.mask.bool())
        return c + self.y_embedder(y) + self.stage_embedder(stage), None

    def transform(
        self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None, text: TextTokens | None, stage: torch.Tensor
    ) -> torch.Tensor:
        """The blocks over a token sequence (per-stage experts pick their weights by `stage`)."""
        for expert in self.experts:
            expert.stage = stage
        for block in self.blocks:
            x = block(x, c, rope, text)
        return x

    def decode(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int, int]) -> list[torch.Tensor]:
        """Every level's velocity from the (image) tokens."""
        x = self.final_norm(x)
        return [head(x, c, grid, self.video) for head in self.level_heads]

    def flops_per_sample(self, grid: tuple[int, int, int] | None = None) -> float:
        """FLOPs of one forward pass for one sample (2 per multiply-add), on the model's token
        grid or on `grid`; norms, activations and positions are not counted (elementwise)."""
        t, h, w = grid or self.grid
        n = t * h * w
        d, mlp = self.hidden, self.mlp_width
        per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp + 2 * d * 6 * d
        embeds = sum(e.flops(n) for e in each(self.patch_embeds, PatchEmbed))
        heads = sum(hd.flops(n) for hd in each(self.level_heads, LevelHead))
        timesteps = sum(e.flops() for e in each(self.t_embedders, TimestepEmbedder))
        return float(len(self.blocks) * per_block + embeds + heads + timesteps)

    def _positions(
        self, grid: tuple[int, int, int], x: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """RoPE rotations or sin-cos embedding for another token grid, made on first use."""
        cache = self.__dict__.setdefault("_grid_positions", {})
        if grid not in cache:
            head_dim = self.hidden // self.num_heads
            cache[grid] = (
                rope_rotations(rope_angles(grid, head_dim)).to(x.device) if self.rope is not None else None,
                sincos_embedding(grid, self.hidden, self.width_first).to(x.device)
                if self.pos_embed is not None
                else None,
            )
        return cache[grid]


# --------------------------------------------------------------------------- registry

SIZES = {
    "N": (2, 64, 2),  # nano: unit tests
    "T": (4, 128, 4),  # tiny: CPU quickstart
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
MODELS = {
    f"DFM-{name}/{patch}": DiTSize(depth, hidden, heads, patch)
    for name, (depth, hidden, heads) in SIZES.items()
    for patch in (1, 2, 4, 8)
}


def model_size(name: str) -> DiTSize:
    """Look a registry name up, e.g. `DFM-XL/2`; an unknown one suggests the nearest."""
    if name not in MODELS:
        import difflib

        near = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise DfmError(f"unknown model {name!r}{hint}; known: {', '.join(MODELS)}")
    return MODELS[name]
