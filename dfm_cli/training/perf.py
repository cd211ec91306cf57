"""Performance accounting: analytic model FLOPs, device peaks, MFU, precision and memory.

MFU is the model's FLOPs (counted analytically from its shapes, training = 3 × forward) per
second over the device's dense peak. The peak comes from `train.peak_tflops` when set,
else from the table below by device name and precision; without either, MFU is not reported
rather than guessed.
"""

from __future__ import annotations

import resource
import sys

import torch

from dfm_cli.errors import DfmError

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: (bf16, tf32, fp32).
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "B200": (2250.0, 1100.0, 80.0),
    "H200": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.5, 378.0, 51.2),
    "H100 NVL": (835.0, 417.5, 60.0),
    "H100": (989.4, 494.7, 66.9),  # SXM; matched after the PCIe/NVL variants
    "H800": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
    "A800": (312.0, 156.0, 19.5),
    "L40S": (362.1, 183.0, 91.6),
    "RTX 4090": (165.2, 82.6, 82.6),
}


def autocast_dtype(device_type: str, precision: str) -> torch.dtype | None:
    """The autocast dtype for `train.precision`: `auto` is bf16 on CUDA and fp32 on the CPU."""
    if precision not in ("auto", "bf16", "fp32"):
        raise DfmError(f"train.precision = {precision!r}: choose 'auto', 'bf16' or 'fp32'")
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def peak_tflops(device_name: str, dtype: torch.dtype | None, tf32: bool, override: float = 0.0) -> float | None:
    """Peak TFLOP/s for the device and math mode; `override` (the recipe's) wins."""
    if override > 0:
        return override
    for name, (bf16, tf32_peak, fp32) in PEAK_TFLOPS.items():
        if name in device_name:
            return bf16 if dtype in (torch.bfloat16, torch.float16) else tf32_peak if tf32 else fp32
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def forward_flops(model: torch.nn.Module, grid: tuple[int, int, int] | None = None) -> float:
    """FLOPs of one forward pass for one sample of a `DFMDiT` (2 per multiply-add); a model
    that counts its own (`DFMFlux`) is asked. `grid` is another token grid than the model's own."""
    if hasattr(model, "flops_per_sample"):
        return model.flops_per_sample()
    t, h, w = grid or model.grid
    n = t * h * w
    d = model.blocks[0].attn.qkv.in_features
    mlp = model.blocks[0].mlp[0].out_features
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp + 2 * d * 6 * d
    embeds = sum(2 * n * e.proj.in_features * d for e in model.patch_embeds)
    heads = sum(2 * n * d * hd.linear.out_features + 2 * d * 2 * d for hd in model.heads)
    timesteps = sum(2 * (e.mlp[0].in_features * d + d * d) for e in model.t_embedders)
    return float(len(model.blocks) * per_block + embeds + heads + timesteps)


def cascade_flops(model: torch.nn.Module) -> tuple[float, float]:
    """Forward FLOPs per image of stage 1 and of stage 2 (twice the tokens through the blocks,
    the conditioning's patch embedding and timestep embedder; the head on the image tokens)."""
    t, h, w = model.stage2.grid
    d = model.stage2.blocks[0].attn.qkv.in_features
    head = model.stage2.heads[0].linear.out_features
    stage2 = forward_flops(model.stage2, (2 * t, h, w)) - 2 * t * h * w * d * head  # heads read the image tokens only
    aug = 2 * (model.aug_embedder.mlp[0].in_features * d + d * d)
    return forward_flops(model.stage1), stage2 + aug


def training_forward_flops(recipe, model: torch.nn.Module) -> float:
    """Forward FLOPs per training image: the model's; for Pyramidal Flow the average over its
    stages, each at its own token grid, weighted by `p_stage`; for the cascade, each model's
    for its share of the steps."""
    if recipe.flow.method == "cascaded":
        stage1, stage2 = cascade_flops(model)
        return recipe.flow.cascade_split * stage1 + (1 - recipe.flow.cascade_split) * stage2
    if recipe.flow.method != "pyramidal":
        return forward_flops(model)
    from dfm_cli.methods.factory import plain_pyramid

    patch = model.heads[-1].p
    sizes = plain_pyramid(recipe).level_sizes(model.level_sizes[-1])
    return sum(p * forward_flops(model, (1, h // patch, w // patch)) for p, (h, w) in zip(recipe.flow.p_stage, sizes))


def train_flops(model: torch.nn.Module, images: int) -> float:
    """Forward + backward (≈ 2 × forward) FLOPs for `images` samples."""
    return 3.0 * forward_flops(model) * images


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
