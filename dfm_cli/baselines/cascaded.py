"""The Cascaded baseline (paper §4.4, App. B) in the same framework (`flow.method = "cascaded"`).

Two DiTs of the same size. Stage 1 is Flow Matching on the data at the coarse size (2 levels:
the pyramid's first), with the patch shrunk by the factor so it sees as many tokens as stage 2.
It trains for the first `flow.cascade_split` (0.8) of the steps. Stage 2 is then initialized
from stage 1 and trained at the full size, given the upsampled coarse image.

**Conditioning (`condition`, `flow.cascade_condition`).** With `"sum"` (the default), stage 2
embeds the conditioning image with a second patch embedding and adds it to its noisy image's
tokens: the channel-axis conditioning of SR3, CDM and Imagen, done the DiT way (a patch
embedding of the two images stacked on the channel axis is the sum of one embedding per
image). Stage 2 then costs what an FM forward costs, plus one patch embedding and the
augmentation level's embedder (1.0001x FM at DFM-B/2 on 256 tokens, 1.01x at DFM-T/8 on 64).
With `"tokens"` (the earlier `dfm`'s) the conditioning image's tokens join the sequence, at the
same positions, and are dropped before the head: twice the tokens, 2.1x an FM forward. The two embeddings are
registered under different names (`cond_sum_embed`, `cond_embed`), so weights of one never load
silently into the other.

Stage 2's patch embedding and head have another patch size than stage 1's, so they start
fresh (the head at zero); the augmentation-level embedder starts at zero too, so the switch
leaves stage 1's conditioning of the blocks untouched. (Starting them as stage 1's resized to
the finer patch, which makes stage 2 compute stage 1's upsampled velocity at the switch, was
measured and is worse: the averaging embedding hides the fine noise that stage 2 must predict,
and its loss stalls; docs/baselines.md.)

**Stage 1 is frozen at the switch, in the EMA too.** `stage1` and `stage2` are two separate
`DFMDiT`s: at the switch stage 2 *copies* stage 1's transformer and embeddings (values, not
modules; `start_stage2`), so nothing stage 2 learns reaches `stage1`. After the switch
`stage1` gets no gradient, and its EMA is what samples the coarse image, so the EMA must stop
following it: the training loop leaves the EMA's `stage1.*` (`STAGE1`) as they were at the
switch (`Cascaded.ema_frozen`), bit for bit. (Before, the EMA's warm-up restarted at the switch
for every parameter, and stage 1's EMA was pulled to its last raw weights within a few steps.)
Stage 2's EMA starts at the switch from stage 2's starting weights, with its own warm-up, and
the learning rate warms up again over `train.warmup_steps` from the switch: stage 2 is a new
model with fresh optimizer moments.

**Augmentation.** The coarse image is upsampled (`upsample`: bilinear by default, or nearest,
`flow.cascade_upsample`; training and sampling call the same function) and noise-augmented:
`a up(L) + (1 - a) n`, with the augmentation's signal level `a` drawn logit-normal
(`flow.cascade_aug`, loc 1.5 and scale 1) in training, and fixed at `1 - sample.cond_noise`
(noise 0.025) when sampling. Stage 2 is told `a` through its own timestep embedder. Sampling
runs stage 1 in `sample.steps[0]` Euler steps, then stage 2 in `sample.steps[1]` (20 + 20 in
the paper).

Both models count towards compute: stage 1's FLOPs for its share of the steps, stage 2's
(with the conditioning's embedding, and with `"tokens"` its doubled sequence) for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dfm_cli.baselines.pyramidal import up
from dfm_cli.errors import DfmError
from dfm_cli.method.cond import Cond
from dfm_cli.method.flow import Draws, FlowObjective, Shapes, Velocity, loss_terms
from dfm_cli.models.dit import DFMDiT, DiTSize, LevelHead, PatchEmbed, TimestepEmbedder, each
from dfm_cli.seeding import SAMPLE_NOISE, mix_seed

SHARED = ("blocks.", "t_embedders.", "y_embedder.", "text_", "stage_embedder.", "null_text.")  # stage 1 -> 2
STAGE1 = "stage1."  # the names of stage 1's parameters, frozen (in the EMA too) from the switch on
CONDITIONS = ("sum", "tokens")  # how stage 2 reads the conditioning image (`flow.cascade_condition`)
CONDITION_EMBEDS = {"sum": "cond_sum_embed", "tokens": "cond_embed"}  # its patch embedding's name
UPSAMPLERS = ("bilinear", "nearest")  # how the coarse image is brought to the full size (`flow.cascade_upsample`)


def upsample(x: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    """The coarse image `x` at `factor` times its size, as stage 2 is conditioned on it, in
    training and when sampling: `"bilinear"` (half-pixel centres, no corner alignment) or
    `"nearest"` (each pixel copied over a block, the earlier `dfm`'s).

    >>> upsample(torch.tensor([[[[0.0, 1.0]]]]), 2, "bilinear")[0, 0, 0].tolist()
    [0.0, 0.25, 0.75, 1.0]
    >>> upsample(torch.tensor([[[[0.0, 1.0]]]]), 2, "nearest")[0, 0, 0].tolist()
    [0.0, 0.0, 1.0, 1.0]
    """
    if mode == "nearest":
        return up(x, factor)
    if mode != "bilinear":
        raise DfmError(f"flow.cascade_upsample = {mode!r}: choose one of {', '.join(UPSAMPLERS)}")
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class CascadeSettings:
    split: float = 0.8  # share of the training steps that train stage 1
    aug_loc: float = 1.5  # logit-normal of the conditioning's signal level, in training
    aug_scale: float = 1.0
    cond_noise: float = 0.025  # the conditioning's noise level when sampling
    upsample: str = "bilinear"  # how the coarse image is upsampled for stage 2 (see `upsample`)

    def split_step(self, steps: int) -> int:
        return round(self.split * steps)


class CascadedDiT(nn.Module):
    """`stage1` (coarse size, patch / factor) and `stage2` (full size, patch) with the
    conditioning's patch embedding and augmentation-level embedder. `condition` is how stage
    2 reads the conditioning image: `"sum"`, added to its image's tokens, or `"tokens"`, as
    tokens of its own (see the module's docstring).

    `forward(levels, t, y, stage)` follows the DFM model's signature so the training step and
    classifier-free guidance treat it alike: `levels = [coarse x_t, fine x_t, conditioning]`,
    `t` `B 3` (coarse t, fine t, augmentation level); each sample runs the model of its
    stage and gets its velocity at that stage's level (the other level's output is zero)."""

    video = False
    level_rms = None
    unused_parameters = True  # one model idles in each phase (DDP must not wait for its gradients)

    def __init__(
        self,
        size: DiTSize,
        level_sizes: Sequence[tuple[int, ...]],
        channels: int,
        num_classes: int,
        condition: str = "sum",
        **options: Any,
    ) -> None:
        """`options` (`pos`, `text_dims`) are both stages' `DFMDiT` options."""
        super().__init__()
        if condition not in CONDITIONS:
            raise DfmError(f"flow.cascade_condition = {condition!r}: choose one of {', '.join(CONDITIONS)}")
        coarse, fine = (tuple(s) for s in level_sizes)
        factor = fine[-1] // coarse[-1]
        if size.patch % factor:
            raise DfmError(
                f"flow.method = 'cascaded': stage 1 needs patch {size.patch} / {factor} to see as many "
                "tokens as stage 2; use a model whose patch the factor divides (e.g. DFM-B/4)"
            )
        self.stage1 = DFMDiT(replace(size, patch=size.patch // factor), [coarse], channels, num_classes, **options)
        self.stage2 = DFMDiT(size, [fine], channels, num_classes, **options)
        self.condition = condition
        self.add_module(CONDITION_EMBEDS[condition], PatchEmbed(channels, (1, size.patch), size.hidden))
        self.aug_embedder = TimestepEmbedder(size.hidden)
        aug_out = self.aug_embedder.linears[1]
        nn.init.zeros_(aug_out.weight)  # a new input starts silent (adaLN-Zero's reasoning)
        nn.init.zeros_(aug_out.bias)
        self.level_sizes, self.channels, self.num_classes = [coarse, fine], channels, num_classes
        self.grid = self.stage2.grid

    @property
    def levels(self) -> int:
        return 2

    def null_condition(self, n: int) -> Cond:
        return self.stage1.null_condition(n)

    @property
    def condition_embed(self) -> PatchEmbed:
        """The conditioning image's patch embedding (named after `condition`)."""
        return cast(PatchEmbed, self.get_submodule(CONDITION_EMBEDS[self.condition]))

    @torch.no_grad()
    def start_stage2(self) -> None:
        """Stage 2 takes stage 1's transformer, embeddings of time, class or text, and stage."""
        own = self.stage2.state_dict()
        own.update({k: v for k, v in self.stage1.state_dict().items() if k.startswith(SHARED) and k in own})
        self.stage2.load_state_dict(own)

    def stage2_parameters(self) -> list[nn.Parameter]:
        """What trains after the switch: stage 2 and its conditioning's embeddings."""
        return [*self.stage2.parameters(), *self.condition_embed.parameters(), *self.aug_embedder.parameters()]

    def forward(
        self, levels: Sequence[torch.Tensor], t: torch.Tensor, y: Cond, stage: torch.Tensor
    ) -> list[torch.Tensor]:
        coarse, fine, cond = levels
        out = [torch.zeros_like(coarse), torch.zeros_like(fine)]
        zeros = torch.zeros_like(stage)
        # under autocast (bf16) each stage's velocity is cast back to the dtype of its input
        for k in stage.unique().tolist():
            rows = stage == k
            if k == 0:
                v = self.stage1([coarse[rows]], t[rows, :1], y[rows], zeros[rows])[0]
                out[0] = out[0].index_put((rows,), v.to(out[0].dtype))
                continue
            v = self._stage2(fine[rows], cond[rows], t[rows], y[rows], zeros[rows])
            out[1] = out[1].index_put((rows,), v.to(out[1].dtype))
        return out

    def _stage2(
        self, fine: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, y: Cond, stage: torch.Tensor
    ) -> torch.Tensor:
        """Stage 2's velocity: the conditioning image's embedding is added to the image tokens
        (`"sum"`), or joins the sequence as tokens of its own at the image tokens' positions
        (`"tokens"`, which the heads then leave out); its augmentation level joins the adaLN
        conditioning."""
        s2 = self.stage2
        tokens = s2.tokens([fine])
        extra = self.condition_embed(cond[:, :, None])
        if self.condition == "sum":
            x, rope = tokens.x + extra, tokens.rope
        else:
            x = torch.cat([tokens.x, extra + (0 if tokens.pos is None else tokens.pos.to(extra.dtype))], 1)
            rope = None if tokens.rope is None else torch.cat([tokens.rope, tokens.rope])
        c, text = s2.conditioning(t[:, 1:2], y, stage)
        c = c + self.aug_embedder(t[:, 2])
        h = s2.transform(x, c, rope, text, stage)
        return s2.decode(h[:, : tokens.x.shape[1]], c, tokens.grid)[0]

    def stage_flops(self) -> tuple[float, float]:
        """Forward FLOPs per image of stage 1 and of stage 2: stage 2's DiT, the conditioning's
        patch embedding and the augmentation level's embedder; with `"tokens"`, twice the
        tokens through the blocks (the head on the image tokens only)."""
        t, h, w = self.stage2.grid
        if self.condition == "sum":
            stage2 = self.stage2.flops_per_sample() + self.condition_embed.flops(t * h * w)
        else:  # the doubled grid's patch embeddings are the image's and the conditioning's
            d = self.stage2.hidden
            head = each(self.stage2.level_heads, LevelHead)[0].linear.out_features
            stage2 = self.stage2.flops_per_sample((2 * t, h, w)) - 2 * t * h * w * d * head  # heads see image tokens
        return self.stage1.flops_per_sample(), stage2 + self.aug_embedder.flops()


@torch.no_grad()
def switch_to_stage2(model: CascadedDiT, ema: CascadedDiT) -> None:
    """The switch: stage 2 starts from stage 1, and its EMA starts from what it starts with
    (not from its unused initial weights, which a slow EMA would carry for long)."""
    model.start_stage2()
    for e, p in zip(ema.stage2_parameters(), model.stage2_parameters()):
        e.copy_(p)


@dataclass(frozen=True)
class CascadedObjective(FlowObjective):
    """Flow Matching for stage 1 on the coarse data, then for stage 2 on the full data given the
    augmented coarse image. Which stage trains is a phase of the run, not a draw: the method
    hands the training loop the objective of each step's phase (`stage`)."""

    cascade: CascadeSettings = CascadeSettings()
    stage: int = 0

    def draw(
        self, level_shapes: Shapes, sample_seeds: Sequence[int], batch_seed: int, label_dropout: float = 0.0
    ) -> Draws:
        t: list[torch.Tensor] = []
        drop: list[bool] = []
        noise: list[list[torch.Tensor]] = [[] for _ in range(3)]
        for seed in sample_seeds:
            g = torch.Generator().manual_seed(seed)
            z = torch.randn(2, generator=g)
            active = torch.sigmoid(self.t_loc + self.t_scale * z[0])
            aug = torch.sigmoid(self.cascade.aug_loc + self.cascade.aug_scale * z[1])
            t.append(torch.stack([active, active, aug]))
            drop.append(bool(torch.rand(1, generator=g) < label_dropout))
            for j, shape in enumerate([*level_shapes, level_shapes[-1]]):
                noise[j].append(torch.randn(*shape, generator=g))
        n = len(sample_seeds)
        return Draws(torch.full((n,), self.stage), torch.stack(t), torch.tensor(drop), [torch.stack(v) for v in noise])

    def loss(
        self, velocity: Velocity, x1: Sequence[torch.Tensor], y: Cond, draws: Draws, null: int | Cond | None = None
    ) -> dict[str, torch.Tensor]:
        d, y = self.prepare(x1, y, draws, null)
        coarse, fine = x1
        t = d.t.reshape(*d.t.shape, 1, 1, 1)
        xt = [t[:, 0] * coarse + (1 - t[:, 0]) * d.noise[0], t[:, 1] * fine + (1 - t[:, 1]) * d.noise[1]]
        factor = fine.shape[-1] // coarse.shape[-1]
        cond = t[:, 2] * upsample(coarse, factor, self.cascade.upsample) + (1 - t[:, 2]) * d.noise[2]
        pred = velocity([*xt, cond], d.t, y, d.stage)
        level_mse = torch.stack(
            [((p.float() - (a - n).float()) ** 2).flatten(1).mean(1) for p, a, n in zip(pred, x1, d.noise)], 1
        )
        active = torch.nn.functional.one_hot(d.stage, 2).bool()
        return loss_terms(level_mse, active, d.stage, d.t[:, :2])


@torch.no_grad()
def sample_cascaded(
    velocity: Velocity,
    y: Cond,
    model: CascadedDiT,
    steps: Sequence[int],
    cascade: CascadeSettings,
    seed: int,
    indices: Sequence[int],
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Stage 1 from noise in `steps[0]` Euler steps; with one stage asked, its image. Else stage 2
    from noise in `steps[1]` steps, given the stage-1 image upsampled as in training
    (`cascade.upsample`) at noise `cascade.cond_noise`. Sample j's noise comes from its own
    generator seeded by `(seed, j)`."""
    coarse_size, fine_size = model.level_sizes
    cond_noise = cascade.cond_noise
    gens = [torch.Generator().manual_seed(mix_seed(seed, SAMPLE_NOISE, j)) for j in indices]
    draw = lambda size: torch.stack([torch.randn(model.channels, *size, generator=g) for g in gens]).to(device)  # noqa: E731
    b, nfe = len(indices), 0
    coarse, fine, cond = draw(coarse_size), torch.zeros(b, model.channels, *fine_size, device=device), None
    for k, n in enumerate(steps):
        if k == 1:
            factor = fine_size[-1] // coarse_size[-1]
            cond = (1 - cond_noise) * upsample(coarse, factor, cascade.upsample) + cond_noise * draw(fine_size)
            fine = draw(fine_size)
        for i in range(n):
            t = torch.full((b, 3), i / n, device=device)
            t[:, 2] = 1 - cond_noise
            v = velocity(
                [coarse, fine, cond if cond is not None else fine],
                t,
                y,
                torch.full((b,), k, device=device, dtype=torch.long),
            )[k]
            if k == 0:
                coarse = coarse + v / n
            else:
                fine = fine + v / n
            nfe += 1
    return (coarse if len(steps) == 1 else fine), nfe
