"""Train throughput of DFM and Flow Matching side by side: step time, images/s, MFU, memory.

For each (model, resolution) it builds the FM baseline (S = 1) and DFM (S = 2) at equal
tokens, runs the real training step from `dfm_cli.training.loop` (decompose, objective, backward,
clip, AdamW, EMA) on synthetic latents in interleaved rounds, and prints one table with the
DFM/FM ratio. On CUDA it defaults to DFM-B/2 and DFM-XL/2 at 256 and 512 px (SD-VAE-like
4-channel latents at 1/8 resolution), bf16 autocast; on the CPU to tiny sizes in pixels.

    python benchmarks/train_throughput.py [--configs DFM-XL/2@512,...] [--batch 32] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table

from dfm_cli import distributed
from dfm_cli.config.method import method_of
from dfm_cli.config.recipe import load_recipe
from dfm_cli.methods.factory import build_model, pick_device
from dfm_cli.training.loop import FUSED_ADAMW, Step, StepSettings, compiled
from dfm_cli.training.perf import autocast_dtype, device_name, forward_flops, peak_memory_gb, peak_tflops
from dfm_cli.training.stats import Interval

CUDA_CONFIGS = "DFM-B/2@256,DFM-B/2@512,DFM-XL/2@256,DFM-XL/2@512"
CPU_CONFIGS = "DFM-N/2@16,DFM-T/4@32"


class Bench:
    """One method (FM or DFM) at one configuration, ready to step."""

    def __init__(
        self,
        model_name: str,
        size: int,
        channels: int,
        levels: int,
        batch: int,
        use_compile: bool,
        overrides: Sequence[str] = (),
        fused: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """`overrides` are extra recipe settings (e.g. `model.pos=sincos`); `fused` picks
        AdamW's fused kernel over its foreach one (default: as training does, `FUSED_ADAMW`);
        `clock` is `time.process_time` to time CPU work on a machine other jobs share."""
        device = pick_device()
        self.recipe = load_recipe(
            None,
            [
                f"model.name={model_name}",
                f"data.resolution={size}",
                f"flow.levels={levels}",
                f"sample.steps={[20] * levels}",
                f"train.batch_size={batch}",
                *overrides,
            ],
        )
        torch.manual_seed(0)
        model = build_model(self.recipe, (channels, size, size), 1000).to(device)
        fused = device.type in FUSED_ADAMW if fused is None else fused
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        ctx = distributed.Context(device=device)
        method = method_of(self.recipe)
        self.step = Step(
            StepSettings.of(self.recipe),
            ctx,
            model,
            copy.deepcopy(model).requires_grad_(False),
            opt,
            method.objective(),
            method.decomposition(),
        )
        if use_compile:
            self.step.forward = compiled(model, lambda fn: None, Console())
        self.x = torch.randn(batch, channels, size, size, device=device)
        self.y = torch.randint(0, 1000, (batch,), device=device)
        seeds = range(batch)  # drawn once: in training the data loader makes them off the step
        self.draws = self.step.objective.draw(self.step.shapes, seeds, 0, self.recipe.model.class_dropout)
        self.interval, self.device, self.model = Interval(levels), device, model
        self.times: list[float] = []
        self.count, self.clock = 0, clock

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = self.clock()
            self.step(self.count, self.x, self.y, self.draws, self.interval)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.count += 1
            if record:
                self.times.append(self.clock() - t0)

    def row(self, batch: int) -> dict:
        med = statistics.median(self.times)
        dtype = autocast_dtype(self.device.type, self.recipe.train.precision)
        peak = peak_tflops(device_name(self.device), dtype, self.recipe.train.tf32)
        tflops = 3 * forward_flops(self.model) * batch / med / 1e12
        return {
            "step": med,
            "img_s": batch / med,
            "tflops": tflops,
            "mfu": tflops / peak if peak else None,
            "params": sum(p.numel() for p in self.model.parameters()),
            "tokens": self.model.grid[0] * self.model.grid[1] * self.model.grid[2],
        }


def measure(
    model_name: str, size: int, channels: int, batch: int, steps: int, rounds: int, use_compile: bool
) -> dict[str, dict]:
    """FM and DFM rows for one configuration, timed in interleaved rounds."""
    rows = {}
    benches = {}
    for label, levels in (("FM", 1), ("DFM", 2)):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        benches[label] = Bench(model_name, size, channels, levels, batch, use_compile)
        benches[label].run(3, record=False)  # warm-up (and compilation)
    for _ in range(rounds):
        for bench in benches.values():
            bench.run(steps)
    for label, bench in benches.items():
        rows[label] = bench.row(batch)
        rows[label]["memory_gb"] = peak_memory_gb(bench.device)
    return rows


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=CUDA_CONFIGS if cuda else CPU_CONFIGS, help="comma-separated MODEL@PIXELS")
    ap.add_argument("--batch", type=int, default=32 if cuda else 16, help="per-device batch")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--pixels", action="store_true", help="train in pixel space (3 channels) even on CUDA")
    args = ap.parse_args()
    latent = cuda and not args.pixels
    table = Table(
        title=f"train throughput on {device_name(pick_device())}, batch {args.batch}, "
        f"{'bf16' if cuda else 'fp32'}{', compiled' if args.compile else ''}"
    )
    for col in (
        "config",
        "method",
        "tokens",
        "params",
        "step ms",
        "img/s",
        "TFLOP/s",
        "MFU",
        "peak mem GB",
        "DFM/FM time",
    ):
        table.add_column(col, justify="right")
    for config in args.configs.split(","):
        name, px = config.split("@")
        size, channels = (int(px) // 8, 4) if latent else (int(px), 3)
        rows = measure(name, size, channels, args.batch, args.steps, args.rounds, args.compile)
        ratio = rows["DFM"]["step"] / rows["FM"]["step"]
        for label, r in rows.items():
            table.add_row(
                f"{name} {px}px",
                label,
                str(r["tokens"]),
                f"{r['params'] / 1e6:.2f}M",
                f"{r['step'] * 1e3:.1f}",
                f"{r['img_s']:.1f}",
                f"{r['tflops']:.2f}",
                f"{r['mfu']:.1%}" if r["mfu"] is not None else "-",
                f"{r['memory_gb']:.2f}",
                f"{ratio:.3f}" if label == "DFM" else "",
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
