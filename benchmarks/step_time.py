"""DFM vs Flow Matching train-step time at equal tokens (paper Table 2: +1.2% on a GPU).

Both models share the size and the token grid: DFM's coarse level uses half the patch, so the
sequence length is the FM baseline's. The step is the real one from `dfm_cli.train`
(decompose, objective, backward, clip, AdamW, EMA), timed in interleaved rounds so that
machine noise hits both sides equally.

    python benchmarks/step_time.py [--model DFM-T/4] [--resolution 32] [--batch 64] [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from dfm_cli import distributed
from dfm_cli.factory import build_model, build_objective, build_pyramid, pick_device
from dfm_cli.recipe import load_recipe
from dfm_cli.stats import Interval
from dfm_cli.train import Step


def setup(levels: int, args):
    overrides = [f"model.name={args.model}", f"data.resolution={args.resolution}", f"flow.levels={levels}",
                 f"sample.steps={[20] * levels}", f"train.batch_size={args.batch}"]
    recipe = load_recipe(None, overrides)
    device = pick_device()
    model = build_model(recipe, 3, 10).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    ctx = distributed.Context(device=device)
    step = Step(recipe, ctx, model, model, ema, opt, build_objective(recipe), build_pyramid(recipe))
    parts = (step, Interval(levels), x, y)
    tokens = model.grid[0] * model.grid[1] * model.grid[2]
    return parts, tokens, sum(p.numel() for p in model.parameters())


def time_steps(parts, n: int, start: int) -> list[float]:
    step, interval, x, y = parts
    times = []
    for i in range(n):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(start + i, x, y, interval)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DFM-T/4")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per method per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    runs = {"FM (S=1)": setup(1, args), "DFM (S=2)": setup(2, args)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name, (parts, _, _) in runs.items():
        time_steps(parts, 5, 0)  # warm-up
    for r in range(args.rounds):
        for name, (parts, _, _) in runs.items():
            times[name] += time_steps(parts, args.steps, 5 + r * args.steps)
    table = Table(title=f"{args.model}, {args.resolution}px, batch {args.batch}, {pick_device()}")
    for col in ("method", "tokens", "params", "median step (ms)", "images/s"):
        table.add_column(col, justify="right")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, (_, tokens, params) in runs.items():
        table.add_row(name, str(tokens), f"{params / 1e6:.3f}M", f"{med[name] * 1e3:.2f}",
                      f"{args.batch / med[name]:.0f}")
    console = Console()
    console.print(table)
    console.print(f"DFM/FM step-time ratio: {med['DFM (S=2)'] / med['FM (S=1)']:.3f} (target <= 1.05 on CPU)")


if __name__ == "__main__":
    main()
