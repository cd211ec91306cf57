"""Training throughput of this working tree against an earlier commit, on the same machine.

Runs the same `dfm train` (default: the 64 px study base, `DFM-T/8`, batch 64) from a
temporary git worktree at `--rev` and from this tree, alternating, `--rounds` times each, and
prints the median images/s of each (steps after the first log line, so start-up and warm-up
do not count) and their ratio. Alternating makes machine load hit both sides alike.

    python benchmarks/train_versus.py --rev e426606 [--recipe recipes/study/base64.toml]
                                      [--steps 120] [--rounds 2] [--set train.compile=true]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def images_per_s(tree: Path, recipe: Path, steps: int, sets: list[str]) -> float:
    """Median images/s of one short training run of `recipe` with the code in `tree`."""
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"train.steps={steps}", "train.log_every=20", f"train.checkpoint_every={steps}", "sample.n=1"]
        cmd = [sys.executable, "-m", "dfm_cli", "train", str(recipe), "--out", f"{out}/run"]
        for o in [*overrides, *sets]:
            cmd += ["--set", o]
        subprocess.run(cmd, cwd=tree, check=True, capture_output=True)  # cwd first on sys.path: this tree's code
        lines = [json.loads(x) for x in (Path(out) / "run" / "stats.jsonl").read_text().splitlines()]
    return statistics.median(x["images_per_s"] for x in lines[1:] if "images_per_s" in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the earlier commit")
    ap.add_argument("--recipe", default="recipes/study/base64.toml")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra overrides for both sides")
    args = ap.parse_args()
    recipe = (ROOT / args.recipe).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev], check=True)
        try:
            rates: dict[str, list[float]] = {args.rev: [], "working tree": []}
            for _ in range(args.rounds):
                rates[args.rev].append(images_per_s(old, recipe, args.steps, args.sets))
                rates["working tree"].append(images_per_s(ROOT, recipe, args.steps, args.sets))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    table = Table(title=f"dfm train {args.recipe}, {args.steps} steps, {args.rounds} alternating rounds")
    for col in ("code", "images/s (median of rounds)", "each round"):
        table.add_column(col, justify="right")
    for code, values in rates.items():
        table.add_row(code, f"{statistics.median(values):.0f}", ", ".join(f"{v:.0f}" for v in values))
    console = Console()
    console.print(table)
    ratio = statistics.median(rates["working tree"]) / statistics.median(rates[args.rev])
    console.print(f"working tree / {args.rev}: {ratio:.2f}x images/s")


if __name__ == "__main__":
    main()
