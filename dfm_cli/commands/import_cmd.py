"""`dfm import elit`: the authors' released checkpoints (snap-research/elit) as `dfm` run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dfm_cli.commands.common import app, user_errors
from dfm_cli.sampling.elit_import import import_elit

import_app = typer.Typer(help="Turn another code base's checkpoint into a dfm run folder.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command()
@user_errors
def elit(
    checkpoint: Annotated[Path, typer.Argument(help="Their .pt file, e.g. dfm_sit_imagenet_512px_1k_0400000.pt.")],
    out: Annotated[Path, typer.Option(help="The new run folder (must not exist, or be empty).")],
    model: Annotated[
        str | None,
        typer.Option(help="Their model name (DFM-SiT-XL/2, SiT-XL/2, ...): refuse a checkpoint of another shape."),
    ] = None,
    ema: Annotated[bool, typer.Option(help="Import the EMA weights (--no-ema: the raw ones).")] = True,
    ae_weights: Annotated[
        str | None,
        typer.Option(help="The SD-VAE folder (stabilityai/sd-vae-ft-ema, save_pretrained) that decodes samples."),
    ] = None,
) -> None:
    """Import a DFM-SiT or SiT checkpoint; `dfm sample OUT`, `dfm eval` and `--init-from OUT` then work on it."""
    report = import_elit(checkpoint, out, model, ema, ae_weights)
    a = report.arch
    kind = "DFM-SiT" if a.dfm else "SiT"
    typer.echo(
        f"imported {kind} ({a.levels} level{'s' * (a.levels > 1)}, depth {a.depth}, width {a.hidden}, "
        f"{a.num_classes} classes, {a.size}x{a.size} latents) as {a.ours}, step {report.step} → {out}"
    )
    if report.dropped:
        typer.echo(f"left out (training only): {', '.join(report.dropped)}")
