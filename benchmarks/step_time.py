"""DFM vs Flow Matching train-step time at equal tokens (paper Table 2: +1.2% on a GPU).

Both models share the size and the token grid: DFM's coarse level uses half the patch, so the
sequence length is the FM baseline's. The step is the real one from `dfm_cli.train`, timed in
interleaved rounds so that machine noise hits both sides equally (see train_throughput.py,
which this reuses, for more sizes, MFU and memory).

    python benchmarks/step_time.py [--model DFM-T/4] [--resolution 32] [--batch 64]
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table
from train_throughput import measure

from dfm_cli.factory import pick_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DFM-T/4")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = measure(args.model, args.resolution, 3, args.batch, args.steps, args.rounds, use_compile=False)
    table = Table(title=f"{args.model}, {args.resolution}px, batch {args.batch}, {pick_device()}")
    for col in ("method", "tokens", "params", "median step (ms)", "images/s"):
        table.add_column(col, justify="right")
    for label, r in rows.items():
        table.add_row(label, str(r["tokens"]), f"{r['params'] / 1e6:.3f}M", f"{r['step'] * 1e3:.2f}",
                      f"{r['img_s']:.0f}")
    console = Console()
    console.print(table)
    ratio = rows["DFM"]["step"] / rows["FM"]["step"]
    console.print(f"DFM/FM step-time ratio: {ratio:.3f} (target <= 1.05 on CPU; the paper measured 1.012 on GPU)")


if __name__ == "__main__":
    main()
