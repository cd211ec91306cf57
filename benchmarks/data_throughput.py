"""Data-layer throughput: `dfm encode` items/s, and store reading vs training consumption.

1. Encodes N animal-mnist images with `pixel` and with a tiny random-config diffusers
   AutoencoderKL (the only kind available offline), and reports items/s.
2. Reads the pixel store through the training DataLoader (memory-mapped shards, the
   resumable stream order) and compares its items/s with the rate at which the quickstart
   model's training step consumes images.

    python benchmarks/data_throughput.py [--num 2048] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from train_throughput import measure

from dfm_cli import distributed
from dfm_cli.data.autoencoders import build_autoencoder
from dfm_cli.data.encode import EncodeSettings, LatentStore, encode_store
from dfm_cli.data.sources import build_source
from dfm_cli.training.batches import StreamBatches


def encode_rate(source, ae, out: Path) -> float:
    start = time.perf_counter()
    settings = EncodeSettings(source="animal-mnist", out=out, resolution=32, shard_size=1024, batch=64)
    encode_store(source, ae, settings, distributed.Context())
    return len(source) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    from diffusers import AutoencoderKL

    full = build_source("animal-mnist", 32)
    source = torch.utils.data.Subset(full, range(args.num))
    source.class_names, source.channels = full.class_names, full.channels
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        blocks = ("DownEncoderBlock2D",) * 2, ("UpDecoderBlock2D",) * 2  # 1 channel in and out, f = 2
        kl = AutoencoderKL(1, 1, *blocks, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4)
        kl.save_pretrained(tmp / "tiny-kl")
        rows.append(("encode, pixel", encode_rate(source, build_autoencoder("pixel", channels=1), tmp / "pixel")))
        rows.append(
            (
                "encode, tiny AutoencoderKL (f2, 4 ch)",
                encode_rate(source, build_autoencoder("kl", tmp / "tiny-kl"), tmp / "kl"),
            )
        )
        store = LatentStore(tmp / "pixel")
        loader = DataLoader(store, batch_sampler=StreamBatches(len(store), args.batch, 0))
        batches, start = iter(loader), time.perf_counter()
        n = 0
        while time.perf_counter() - start < 3:
            x, _ = next(batches)
            n += len(x)
        rows.append((f"store -> DataLoader (batch {args.batch}, memory-mapped)", n / (time.perf_counter() - start)))
    step = measure("DFM-T/4", 32, 1, args.batch, steps=5, rounds=2, use_compile=False)["DFM"]
    rows.append(("training step consumes (DFM-T/4, 32 px)", step["img_s"]))
    table = Table(title=f"data throughput on {torch.get_num_threads()} CPU threads")
    table.add_column("what")
    table.add_column("items/s", justify="right")
    for what, rate in rows:
        table.add_row(what, f"{rate:,.0f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
