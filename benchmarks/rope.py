"""What RoPE costs over sin-cos positions in a train step, before and after the RoPE rework.

The step is a DiT-S/2 on one level (Flow Matching), 256 tokens (32×32×4 latents, patch 2),
batch 8, on the CPU: forward, MSE on the velocity, backward and an AdamW update. "before"
is `dfm_cli/models/dit.py` as it was at `--before` (cos/sin of the angles in every block, for q and
for k, strided pairs rotated through `stack`); "after" is the working tree (unit complex
rotations once per token grid, q and k rotated together by one complex multiplication). Configurations run in
interleaved rounds so that machine noise hits all of them alike; the table gives the median
and the minimum step time, and the RoPE/sin-cos ratio of each version. On a shared machine
use `--clock cpu` with `--threads 1`: the process's CPU time hardly moves with other load,
while the wall clock does.

    python benchmarks/rope.py [--before 4cc796a] [--rounds 5] [--steps 3] [--threads 0] [--clock wall]
                              [--depth 12]

`--depth` below DiT-S's 12 blocks shortens the step on a slow machine; RoPE's share of a
block is the same at any depth, so the ratios barely move.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import dfm_cli.models.dit as after

ROOT = Path(__file__).resolve().parents[1]


def model_at(rev: str) -> types.ModuleType:
    """`dfm_cli/models/dit.py` as committed at `rev`, imported under its own name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:dfm_cli/models/dit.py"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"model_{rev}")
    sys.modules[module.__name__] = module  # dataclasses resolve their module by name
    exec(compile(source, f"{rev}:dfm_cli/models/dit.py", "exec"), module.__dict__)
    return module


class TrainStep:
    """One optimizer step of a fixed batch: the work that differs is only the positions."""

    def __init__(self, module: types.ModuleType, pos: str, batch: int, depth: int, clock) -> None:
        self.clock = clock
        torch.manual_seed(0)
        s = module.model_size("DFM-S/2")
        size = module.DiTSize(depth, s.hidden, s.heads, s.patch)
        self.model = module.DFMDiT(size, [(32, 32)], 4, 10, pos=pos)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 4, 32, 32, generator=g)
        self.v = torch.randn(batch, 4, 32, 32, generator=g)
        self.t = torch.rand(batch, 1, generator=g)
        self.y = torch.randint(0, 10, (batch,), generator=g)
        self.stage = torch.zeros(batch, dtype=torch.long)

    def __call__(self) -> float:
        start = self.clock()
        (pred,) = self.model([self.x], self.t, self.y, self.stage)
        loss = (pred - self.v).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self.clock() - start


def rope_op_times(versions: dict[str, types.ModuleType], batch: int, reps: int, clock) -> dict[str, float]:
    """Minimum time of one block's RoPE on q and k, forward and backward, per version."""
    s = after.model_size("DFM-S/2")
    heads, d = s.heads, s.hidden // s.heads
    angles = after.rope_angles((1, 16, 16), d)
    qkv = torch.randn(3, batch, heads, 256, d, requires_grad=True)
    grad = torch.randn(2, batch, heads, 256, d)

    rotations = after.rope_rotations(angles)

    def old(module):  # cos/sin in every call, q and k separately
        outs = [module.apply_rope(qkv[0], angles), module.apply_rope(qkv[1], angles)]
        torch.autograd.backward(outs, [grad[0], grad[1]])

    def new(module):  # rotations made once per grid, q and k together, one complex product
        module.apply_rope(qkv[:2], rotations).backward(grad)

    best = {}
    for name, module in versions.items():
        fn = new if hasattr(module, "rope_rotations") else old
        times = []
        for _ in range(reps):
            start = clock()
            fn(module)
            times.append(clock() - start)
        best[name] = min(times)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="4cc796a", help="git revision of the old model.py")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--depth", type=int, default=12, help="blocks (DiT-S has 12)")
    ap.add_argument("--op-reps", type=int, default=30, help="repetitions of the RoPE-only timing")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock, or the process's CPU time (with --threads 1 on a busy machine)",
    )
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    versions = {"before": model_at(args.before), "after": after}
    ops = rope_op_times(versions, args.batch, args.op_reps, clock)
    console = Console()
    console.print(
        "RoPE on q and k in one block, forward + backward (min of "
        f"{args.op_reps}): " + ", ".join(f"{v} {t * 1e3:.2f} ms" for v, t in ops.items())
    )
    if not args.rounds:
        return
    steps = {
        (v, pos): TrainStep(m, pos, args.batch, args.depth, clock)
        for v, m in versions.items()
        for pos in ("sincos", "rope")
    }
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for step in steps.values():  # warm-up: allocator, optimizer state
        step()
    for r in range(args.rounds):
        for key, step in steps.items():
            times[key] += [step() for _ in range(args.steps)]
            print(
                f"round {r + 1} {key[0]:>6} {key[1]:>6}: " + " ".join(f"{t * 1e3:.0f}" for t in times[key]) + " ms",
                flush=True,
            )

    table = Table(
        title=f"DiT-S/2 (depth {args.depth}) train step, 256 tokens, batch {args.batch}, CPU, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, {args.rounds}x{args.steps} steps each"
    )
    for col in ("version", "pos", "median (ms)", "min (ms)", "rope/sincos (median)", "rope/sincos (min)"):
        table.add_column(col, justify="right")
    for v in versions:
        for pos in ("sincos", "rope"):
            ts = times[(v, pos)]
            ratio = ("", "")
            if pos == "rope":
                base = times[(v, "sincos")]
                ratio = (f"{statistics.median(ts) / statistics.median(base):.3f}", f"{min(ts) / min(base):.3f}")
            table.add_row(v, pos, f"{statistics.median(ts) * 1e3:.1f}", f"{min(ts) * 1e3:.1f}", *ratio)
    console.print(table)
    base = statistics.median(times[("after", "sincos")])
    console.print(
        "RoPE's share of a sin-cos step implied by the RoPE-only timing (x12 blocks of DiT-S, "
        f"against the depth-{args.depth} sin-cos step scaled to 12 blocks): "
        + ", ".join(f"{v} {12 * t / (base * 12 / args.depth):.1%}" for v, t in ops.items())
    )


if __name__ == "__main__":
    main()
