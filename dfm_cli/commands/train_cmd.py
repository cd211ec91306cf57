"""`dfm train`: parse, resolve the recipe, hand over to the training loop."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from dfm_cli.commands.common import app, console, user_errors
from dfm_cli.config.recipe import load_recipe
from dfm_cli.training.autoencoder import EXPORT, train_autoencoder
from dfm_cli.training.loop import train as run_training


@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe, e.g. recipes/quickstart.toml.")],
    set_: Annotated[list[str], typer.Option("--set", help="Override a key: --set train.steps=200 (repeatable).")] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<recipe name>); re-run to resume.")] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Start from this single-level (FM) run or checkpoint: its layers become the finest level's, "
                "new levels start at zero (same as --set train.init_from=PATH)."
            )
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved recipe and exit.")] = False,
) -> None:
    """Train a DFM (or S = 1 Flow Matching) model; run it again to continue from the newest checkpoint."""
    resolved = load_recipe(recipe, [*set_, *([f"train.init_from={json.dumps(str(init_from))}"] if init_from else [])])
    if dry_run:
        typer.echo(resolved.to_toml())
        return
    run_dir = out or Path("runs") / recipe.stem
    if resolved.model.kind == "autoencoder":
        report = train_autoencoder(resolved, run_dir, console)
        console.print(
            f"reconstruction PSNR {report['psnr']:.2f} dB, scale equivariance {report['equivariance']:.3f}, "
            f"latents {tuple(report['latent_shape'])}"
        )
        console.print(f"run folder: {run_dir}  (autoencoder for --ae kl --ae-weights: {run_dir / EXPORT})")
        return
    last = run_training(resolved, run_dir)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    if last:
        levels = ", ".join(f"{v:.4f}" if v is not None else "-" for v in last["loss_level"])
        console.print(
            f"step {last['step']}: loss {last['loss']:.4f} (per level {levels}), {last['images_per_s']:.0f} images/s"
        )
    grids = sorted((run_dir / "samples").glob("grid.*"))
    console.print(f"run folder: {run_dir}" + (f"  (grid: {grids[0]})" if grids else ""))
