"""Train-step time on this machine: DFM against Flow Matching, and the real training loop.

`python benchmarks/step_time.py` compares DFM and Flow Matching at equal tokens (paper
Table 2: +1.2% on a GPU). Both models share the size and the token grid: DFM's coarse level
uses half the patch, so the sequence length is the FM baseline's. The step is the real one
from `dfm_cli.training.loop`, timed in interleaved rounds so that machine noise hits both sides
equally (see train_throughput.py, which this reuses, for more sizes, MFU and memory).

`python benchmarks/step_time.py --ratios` times variants of one DFM step side by side, in
interleaved rounds, for `DFM-T/8` at 64 px (the quickstart and the 64 px study) and `DFM-S/2`
on 32x32x4 latents: RoPE against sin-cos positions, `torch.compile` against eager, and AdamW's
fused kernel (what training uses) against its foreach one; it prints each variant's step time
and its ratio to training's default step (eager, RoPE, fused AdamW). Each round starts one
variant later, so that no variant always runs first, and "the default again" is a control:
its ratio is the noise between identical steps, which every other ratio should be read against.

`python benchmarks/step_time.py --loop` runs the whole training loop (data loader, draws,
step) for a few steps at the quickstart and at DFM-B/2 64 px, and prints the median step
time, the share of it spent waiting for the data loader, and what the per-sample draws
(stage, timesteps, noise) cost when made in the training process.

    python benchmarks/step_time.py [--model DFM-T/4] [--resolution 32] [--batch 64]
    python benchmarks/step_time.py --ratios [--rounds 5] [--steps 10] [--configs DFM-T/8@64x1b64,DFM-S/2@32x4b8]
                                   [--clock cpu --threads 1]    # on a machine other jobs share
    python benchmarks/step_time.py --loop [--workers 0,1] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from train_throughput import Bench, measure

from dfm_cli.config.recipe import load_recipe
from dfm_cli.methods.factory import build_objective, pick_device
from dfm_cli.seeding import SAMPLE_DRAWS, mix_seed

ROOT = Path(__file__).resolve().parents[1]
# (label, recipe, overrides): the quickstart as shipped, and DFM-B/2 at 64 px with a batch a CPU can step.
LOOPS = [
    ("quickstart", ROOT / "recipes" / "quickstart.toml", []),
    (
        "DFM-B/2 64px",
        ROOT / "recipes" / "quickstart.toml",
        ["model.name=DFM-B/2", "data.resolution=64", "train.batch_size=4"],
    ),
]


def draw_time(recipe, repeats: int = 5) -> float:
    """Seconds to draw one global batch's stage, timesteps and noise in this process."""
    objective = build_objective(recipe)
    res, factors = recipe.data.resolution, recipe.flow.factors
    sizes = [res]
    for f in reversed(factors):
        sizes.insert(0, sizes[0] // f)
    shapes = [(1 if recipe.data.name == "animal-mnist" else 3, s, s) for s in sizes]
    b = recipe.train.batch_size
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        objective.draw(shapes, [mix_seed(0, SAMPLE_DRAWS, k * b + i) for i in range(b)], k, recipe.model.class_dropout)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_rows(steps: int, workers: list[int]) -> list[dict]:
    """Train each LOOPS entry for `steps` steps, logging every step; the first is warm-up."""
    from dfm_cli.training.loop import train

    rows = []
    for label, path, overrides in LOOPS:
        for w in workers:
            recipe = load_recipe(
                path,
                [
                    *overrides,
                    f"train.steps={steps}",
                    "train.log_every=1",
                    f"train.checkpoint_every={steps}",
                    "sample.n=1",
                    "sample.steps=[1, 1]",
                    f"data.num_workers={w}",
                ],
            )
            with tempfile.TemporaryDirectory() as tmp:
                train(recipe, Path(tmp), console=Console(quiet=True))
                lines = [json.loads(x) for x in (Path(tmp) / "stats.jsonl").read_text().splitlines()][1:]
            step = statistics.median(line["step_time_s"] for line in lines)
            draws = draw_time(recipe)
            rows.append(
                row := {
                    "config": label,
                    "model": recipe.model.name,
                    "batch": recipe.train.batch_size,
                    "workers": w,
                    "step": step,
                    "wait": statistics.median(line["data_wait_share"] for line in lines),
                    "draws": draws,
                    "draw_share": draws / step,
                }
            )
            print(row, flush=True)  # long runs: each result as soon as it is known
    return rows


def print_loop(steps: int, workers: list[int]) -> None:
    table = Table(title=f"training loop, median of {steps - 1} steps after one warm-up, {pick_device()}")
    for col in (
        "config",
        "model",
        "batch",
        "data.num_workers",
        "step (ms)",
        "waiting for data",
        "draws in-process (ms)",
        "draws / step",
    ):
        table.add_column(col, justify="right")
    for r in loop_rows(steps, workers):
        table.add_row(
            r["config"],
            r["model"],
            str(r["batch"]),
            str(r["workers"]),
            f"{r['step'] * 1e3:.1f}",
            f"{r['wait']:.1%}",
            f"{r['draws'] * 1e3:.2f}",
            f"{r['draw_share']:.1%}",
        )
    Console(width=160).print(table)


def print_fm_dfm(args: argparse.Namespace) -> None:
    rows = measure(args.model, args.resolution, 3, args.batch, args.steps, args.rounds, use_compile=False)
    table = Table(title=f"{args.model}, {args.resolution}px, batch {args.batch}, {pick_device()}")
    for col in ("method", "tokens", "params", "median step (ms)", "images/s"):
        table.add_column(col, justify="right")
    for label, r in rows.items():
        table.add_row(
            label, str(r["tokens"]), f"{r['params'] / 1e6:.3f}M", f"{r['step'] * 1e3:.2f}", f"{r['img_s']:.0f}"
        )
    console = Console()
    console.print(table)
    ratio = rows["DFM"]["step"] / rows["FM"]["step"]
    console.print(f"DFM/FM step-time ratio: {ratio:.3f} (target <= 1.05 on CPU; the paper measured 1.012 on GPU)")


VARIANTS = {  # label: (recipe overrides, compile, fused AdamW: None as training picks it)
    "RoPE, eager (training's default)": ([], False, None),
    "the default again (control)": ([], False, None),  # its ratio is the noise between identical steps
    "sin-cos": (["model.pos=sincos"], False, None),
    "foreach AdamW": ([], False, False),
    "torch.compile": ([], True, None),
    "torch.compile, sin-cos": (["model.pos=sincos"], True, None),
}
CONFIG = re.compile(r"(?P<model>[^@]+)@(?P<size>\d+)x(?P<channels>\d+)b(?P<batch>\d+)")


def print_ratios(configs: str, steps: int, rounds: int, clock: str) -> None:
    """Each VARIANT of the DFM step (2 levels) per config `MODEL@SIZExCHANNELSbBATCH`, interleaved.
    `clock` "cpu" times the process's CPU time, which other jobs on the machine hardly move."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    threads = f", {torch.get_num_threads()} threads, {clock} clock"
    table = Table(title=f"DFM train step variants, {pick_device()}{threads}, median step of {rounds} rounds × {steps}")
    for col in ("config", "batch", "variant", "step (ms)", "images/s", "/ eager RoPE"):
        table.add_column(col, justify="right")
    for config in configs.split(","):
        if not (m := CONFIG.fullmatch(config)):
            raise SystemExit(f"--configs: {config!r} is not MODEL@SIZExCHANNELSbBATCH, e.g. DFM-T/8@64x1b64")
        name, size, channels, batch = m["model"], int(m["size"]), int(m["channels"]), int(m["batch"])
        benches = {}
        for label, (overrides, use_compile, fused) in VARIANTS.items():
            benches[label] = Bench(name, size, channels, 2, batch, use_compile, overrides, fused, timer)
            benches[label].run(3, record=False)  # warm-up (and compilation)
        order = list(benches.values())
        for r in range(rounds):  # each round starts one variant later: no variant always runs first
            for bench in order[r % len(order) :] + order[: r % len(order)]:
                bench.run(steps)
        base = statistics.median(order[0].times)
        for label, bench in benches.items():
            step = statistics.median(bench.times)
            table.add_row(
                f"{name} {size}x{size}x{channels}", str(batch), label, f"{step * 1e3:.1f}", f"{batch / step:.0f}",
                f"{step / base:.3f}",
            )  # fmt: skip
    Console(width=160).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DFM-T/4")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method per round (--loop: steps per run)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loop", action="store_true", help="time the whole training loop instead")
    ap.add_argument("--workers", default="0", help="--loop: data.num_workers values, e.g. 0,1")
    ap.add_argument("--ratios", action="store_true", help="RoPE/sin-cos, compile/eager and fused/foreach AdamW")
    ap.add_argument(
        "--configs", default="DFM-T/8@64x1b64,DFM-S/2@32x4b8", help="--ratios: MODEL@SIZExCHANNELSbBATCH, ..."
    )
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="--ratios: cpu on a shared machine")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ratios:
        print_ratios(args.configs, args.steps, args.rounds, args.clock)
    elif args.loop:
        print_loop(args.steps, [int(w) for w in args.workers.split(",")])
    else:
        print_fm_dfm(args)


if __name__ == "__main__":
    main()
