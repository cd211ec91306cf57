"""Performance accounting: analytic model FLOPs, device peaks, MFU, precision and memory.

MFU is the model's FLOPs (counted analytically from its shapes, training = 3 × forward) per
second over the device's dense peak. The peak comes from `train.peak_tflops` when set,
else from the table below by device name and precision; without either, MFU is not reported
rather than guessed.
"""

from __future__ import annotations

import resource
import sys
from typing import cast

import torch

from dfm_cli.errors import DfmError
from dfm_cli.models.dit import DFMDiT
from dfm_cli.models.flux import DFMFlux

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
    """FLOPs of one forward pass for one sample (2 per multiply-add), counted by the model
    itself from its shapes; `grid` is another token grid than the model's own."""
    if grid:
        return cast(DFMDiT, model).flops_per_sample(grid)  # only the DiT takes another grid
    return cast(DFMDiT | DFMFlux, model).flops_per_sample()


def train_flops(model: torch.nn.Module, images: int) -> float:
    """Forward + backward (≈ 2 × forward) FLOPs for `images` samples."""
    return 3.0 * forward_flops(model) * images


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
