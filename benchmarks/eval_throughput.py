"""Inception feature extraction on this machine: torch-fidelity's call as `dfm eval` made it
before ("before": the network as torch-fidelity builds it, under `no_grad`, one call per
`--batch` of images) against `dfm`'s extractor ("after": batch norms folded into the convs,
channels-last layout, `inference_mode`, 8 images per call).

The two are timed in interleaved rounds on the same random images, so machine noise hits both
alike, and their pool features are compared (the FID agreement with torch-fidelity is a test:
tests/test_eval.py). Needs the Inception weights `dfm eval` finds offline.

    python benchmarks/eval_throughput.py [--num 128] [--resolution 64] [--batch 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from dfm_cli.evaluation.features import InceptionFeatures, _inception_class, _rgb, load_inception_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=50, help="images per call of the 'before' path (dfm eval --batch)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cpu = torch.device("cpu")
    after = InceptionFeatures(None, cpu)
    before = _inception_class()("inception-v3-compat", after.layers, load_inception_state(after.weights)).eval()
    images = np.random.default_rng(0).integers(0, 256, (args.num, args.resolution, args.resolution, 3), np.uint8)

    def run_before() -> np.ndarray:
        with torch.no_grad():
            x = _rgb(images)
            return torch.cat([before(x[i : i + args.batch])[0] for i in range(0, len(x), args.batch)]).double().numpy()

    def run_after() -> np.ndarray:
        return after(images)["pool"]

    times: dict[str, list[float]] = {"before": [], "after": []}
    outputs: dict[str, np.ndarray] = {}
    run_after(), run_before()  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("before", run_before), ("after", run_after)):
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: args.num / statistics.median(t) for name, t in times.items()}
    table = Table(title=f"Inception on {args.num} images of {args.resolution} px, {torch.get_num_threads()} threads")
    for column in ("path", "images/s", "vs before"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for name in ("before", "after"):
        table.add_row(name, f"{rate[name]:.1f}", f"{rate[name] / rate['before']:.2f}x")
    Console().print(table)
    diff = np.abs(outputs["after"] - outputs["before"]).max() / np.abs(outputs["before"]).max()
    print(f"pool features: largest difference {diff:.1e} of their largest value")


if __name__ == "__main__":
    main()
