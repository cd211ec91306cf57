"""Training statistics between two log lines: losses per level and per t-bin, speed, MFU.

Sums are kept as tensors so that ranks can add theirs together in one all-reduce; each
`stats.jsonl` line then describes the whole global batch, not rank 0's share.
"""

from __future__ import annotations

import time

import torch

from dfm_cli import distributed
from dfm_cli.training.perf import peak_memory_gb

T_BINS = 5  # per-t-bin loss of the active level, minRF-style


class Interval:
    """Accumulates one log interval's statistics on one rank."""

    def __init__(self, levels: int) -> None:
        self.levels = levels
        self.reset()

    def reset(self) -> None:
        s = self.levels
        # loss sum, images, then level sums/counts, then t-bin sums/counts
        self.sums = torch.zeros(2 + 2 * s + 2 * T_BINS, dtype=torch.float64)
        self.steps, self.grad_norm, self.data_wait = 0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor]) -> None:
        """Add one micro-batch's objective output."""
        s = self.levels
        mse, active = out["level_mse"].detach().double().cpu(), out["active"].cpu()
        stage = out["stage"].cpu()
        own = mse.gather(1, stage[:, None])[:, 0]
        t_active = out["t"].detach().cpu().double().gather(1, stage[:, None])[:, 0]
        bins = (t_active * T_BINS).long().clamp(max=T_BINS - 1)
        self.sums[0] += float(out["per_sample"].detach().double().sum())
        self.sums[1] += mse.shape[0]
        self.sums[2 : 2 + s] += (mse * active).sum(0)
        self.sums[2 + s : 2 + 2 * s] += active.double().sum(0)
        self.sums[2 + 2 * s : 2 + 2 * s + T_BINS].index_add_(0, bins, own)
        self.sums[2 + 2 * s + T_BINS :].index_add_(0, bins, torch.ones_like(own))

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of non-training work (evaluation, previews) out of the speed."""
        self.start += seconds

    def end_step(self, grad_norm: float, data_wait: float) -> None:
        self.steps += 1
        self.grad_norm += grad_norm
        self.data_wait += data_wait

    def summary(self, ctx: distributed.Context, flops_per_image: float, peak: float | None) -> dict:
        """The interval's line for `stats.jsonl`, summed over ranks."""
        s = self.levels
        sums = distributed.all_sum(ctx, self.sums.clone()).cpu()
        elapsed = time.perf_counter() - self.start
        steps = max(self.steps, 1)

        def ratio(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
            return [round(float(a / b), 6) if b else None for a, b in zip(num, den)]

        images_per_s = float(sums[1]) / elapsed
        tflops = images_per_s * flops_per_image / 1e12
        return {
            "loss": float(sums[0] / max(float(sums[1]), 1)),
            "loss_level": ratio(sums[2 : 2 + s], sums[2 + s : 2 + 2 * s]),
            "loss_t_bin": ratio(sums[2 + 2 * s : 2 + 2 * s + T_BINS], sums[2 + 2 * s + T_BINS :]),
            "grad_norm": self.grad_norm / steps,
            "images_per_s": images_per_s,
            "step_time_s": elapsed / steps,
            "data_wait_share": self.data_wait / elapsed if elapsed else 0.0,
            "tflops_per_device": tflops / ctx.world,
            "mfu": tflops / ctx.world / peak if peak else None,
            "peak_memory_gb": peak_memory_gb(ctx.device),
        }
