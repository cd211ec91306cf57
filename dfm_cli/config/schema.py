"""The recipe's schema: one typed dataclass per TOML section, with every key's default.

Pure data plus the few views every layer above needs (`to_dict`, `to_toml`, the sampler's
settings); reading, overriding and checking a file is `recipe.py`'s and `checks.py`'s.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from dfm_cli.method.sampler import COND_NOISE, SamplerSettings


@dataclass
class ModelSection:
    kind: str = "dfm"  # "dfm" (the DiT, or FM with flow.levels = 1), "flux" (see [flux]) or "autoencoder" (see [ae])
    name: str = "DFM-B/2"
    pos: str = "rope"  # "rope", "sincos", or "sincos_wh" (DiT/SiT's table, width first)
    time_embed: str = "dit"  # timestep features of 1000·t ("dit"), or of 1 − t unscaled ("sit", SiT's clock)
    class_dropout: float = 0.1
    temporal_patch: int = 1
    specialize: str = "none"  # per-stage experts (paper Table 1d): "none" | "mlp" | "all"


@dataclass
class DataSection:
    name: str = "animal-mnist"
    path: str = ""
    resolution: int = 32  # pixels (a store's latents are smaller by the autoencoder's factor)
    frames: int = 0  # video clip length for sprites; 0 = images
    num_workers: int = 0
    strict: bool = False  # stop on an unreadable training image instead of skipping it
    classes: list[int] = field(default_factory=list)  # train on these class ids only; empty = all
    captions: str = ""  # folder data: CSV/JSONL of path,caption; the captions are encoded once with [text]


@dataclass
class FlowSection:
    levels: int = 2
    decomposition: str = "laplacian"
    factors: list[int] = field(default_factory=lambda: [2])
    temporal_factors: list[int] = field(default_factory=list)  # video; empty = 1 (frames kept)
    antialias: bool = False
    standardize: bool = False  # per-level, per-channel unit variance (on for video in the paper)
    p_stage: list[float] = field(default_factory=list)
    per_batch_stage: bool = False
    t_loc: float = 0.0
    t_scale: float = 1.0
    t_shift: float = 1.0  # SD3/FLUX resolution time shift of the active level's draws; 1 = none
    prev_t_loc: float = 1.5
    prev_t_scale: float = 1.0
    tied_timesteps: bool = False
    mask_input: bool = True
    level_weights: list[float] = field(default_factory=list)
    precondition: bool = False  # EDM-style per-level input/output scaling (paper App. A.1)
    upsample_coarse: bool = False  # carry the coarsest level at the next level's size (paper App. E)
    method: str = "dfm"  # "dfm" (FM with levels = 1), "pyramidal" (Pyramidal Flow) or "cascaded" (2 models)
    gamma: float = 1 / 3  # pyramidal: the renoising's block-noise correlation at each stage jump
    pyramid_time: str = "uniform"  # pyramidal: each stage's time, "uniform" (the authors') or "logit-normal"
    cascade_split: float = 0.8  # cascaded: share of train.steps that train stage 1 (then stage 2)
    cascade_aug: list[float] = field(default_factory=lambda: [1.5, 1.0])  # cascaded: logit-normal loc, scale of
    # the conditioning's signal level in training
    cascade_condition: str = "sum"  # cascaded: stage 2 adds the conditioning image's patch embedding to its
    # tokens ("sum", about an FM forward's cost) or reads it as tokens of its own ("tokens", twice the sequence)
    cascade_upsample: str = "bilinear"  # cascaded: how the coarse image is upsampled for stage 2 ("nearest")


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    milestone_every: int = 0  # steps; 0 = no milestones (milestones are never pruned)
    batch_per_gpu: int = 0  # micro-batch per process; 0 = the whole per-process batch
    parallel: str = "ddp"  # or "fsdp" (FSDP2 fully_shard) for large models
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on the CPU; or "bf16" / "fp32"
    tf32: bool = True
    compile: bool = False
    max_nonfinite_steps: int = 100  # stop after more skipped steps than this; 0 = never stop
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look the device up
    preview_every: int = 0  # steps between preview grids; 0 = only the final grid
    eval_every: int = 0  # steps between in-training evaluations; 0 = none
    eval_num: int = 1000  # samples per in-training evaluation
    eval_metrics: list[str] = field(default_factory=lambda: ["fid"])  # "fid", "swd"
    eval_reference_num: int = 0  # FID reference: 0 = up to 10,000 training images; N = N evenly spaced
    log_to: list[str] = field(default_factory=lambda: ["jsonl"])  # "jsonl" (stats.jsonl, always) plus the
    # mirrors "tensorboard" and "wandb" (training/loggers.py)
    init_from: str = ""  # start from a single-level (FM) run, or for an autoencoder its run or diffusers folder
    per_level_only_steps: int = 0  # after init_from: steps that train only the per-level layers (paper: 4k)


@dataclass
class AESection:
    """The autoencoder that `model.kind = "autoencoder"` trains: a diffusers `AutoencoderKL`."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # n blocks: factor 2^(n-1)
    layers_per_block: int = 1
    latent_channels: int = 4
    mid_attention: bool = False
    kl_weight: float = 1e-6
    pyramid_weight: float = 1.0  # L1 on the Laplacian pyramid of the reconstruction (3 octaves)
    scale_equivariance: bool = False  # also decode downsampled latents into downsampled images
    se_factors: list[int] = field(default_factory=lambda: [2, 4])
    se_weight: float = 1.0
    stats_num: int = 4096  # training images (evenly spaced) for the latent scale and shift


@dataclass
class FluxSection:
    """A FLUX-style transformer for `model.kind = "flux"` (diffusers' `FluxTransformer2DModel`
    with per-level input, timestep and output layers); text-conditioned data only."""

    config: str = ""  # a local FLUX transformer folder or its config.json; empty = the sizes below
    num_layers: int = 2  # double-stream blocks (FLUX.1: 19)
    num_single_layers: int = 4  # single-stream blocks (FLUX.1: 38)
    attention_head_dim: int = 32  # FLUX.1: 128
    num_attention_heads: int = 4  # FLUX.1: 24
    axes_dims_rope: list[int] = field(default_factory=lambda: [8, 12, 12])  # sums to attention_head_dim
    guidance_embeds: bool = False  # FLUX.1-dev is guidance-distilled: true
    guidance: float = 3.5  # the embedded guidance value when guidance_embeds is on
    patch: int = 2  # the finest level's patch (FLUX packs 2x2 latent patches)


@dataclass
class TextSection:
    """The caption encoder for `data.captions` (a store encoded with captions carries its own)."""

    encoder: str = ""  # "clip" (open_clip), "t5" (transformers folder) or "clip+t5" (FLUX's pair)
    clip_model: str = "ViT-L-14"  # open_clip architecture name, or a config JSON
    clip_weights: str = ""  # local open_clip checkpoint
    t5_weights: str = ""  # local transformers folder: T5 encoder and tokenizer
    max_tokens: int = 77


@dataclass
class SampleSection:
    steps: list[int] = field(default_factory=lambda: [30, 10])
    tau: list[float] = field(default_factory=lambda: [0.9])
    cfg: float = 1.0
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    solver: str = "euler"
    shift: float = 1.0  # SD3/FLUX time shift of the sampling grid (match flow.t_shift); 1 = none
    n: int = 64
    cond_noise: float = COND_NOISE  # cascaded: the conditioning image's noise level at sampling


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    flow: FlowSection = field(default_factory=FlowSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    ae: AESection = field(default_factory=AESection)
    text: TextSection = field(default_factory=TextSection)
    flux: FluxSection = field(default_factory=FluxSection)

    def sampler_settings(self, levels: int | None = None, **flags: Any) -> SamplerSettings:
        """The sampler knobs for a model of `levels` levels (the recipe's own by default):
        `[sample]`, with the flags given (`stages`, `steps`, `tau`, `cfg`, `interval`,
        `solver`) winning, fed what the model saw in training (`flow.mask_input`,
        `flow.tied_timesteps`)."""
        return SamplerSettings.resolve(
            self.sample,
            self.flow.levels if levels is None else levels,
            mask_input=self.flow.mask_input,
            tied_timesteps=self.flow.tied_timesteps,
            **flags,
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


SECTIONS: dict[str, type] = typing.get_type_hints(Recipe)
