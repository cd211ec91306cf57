"""`dfm decompose`: the levels of an image or video, and optionally of its latent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dfm_cli.commands.common import app, console, parse_list, user_errors
from dfm_cli.data.autoencoders import build_autoencoder
from dfm_cli.errors import DfmError
from dfm_cli.media import default_photo, load_media
from dfm_cli.method.decompose import TwoBandPyramid, build_decomposition
from dfm_cli.method.level_report import analyse, crop_to_multiple, report_table, write_report


@app.command()
@user_errors
def decompose(
    path: Annotated[
        Path | None, typer.Argument(help="Image or video (GIF/MP4); default: a scikit-learn photo.")
    ] = None,
    levels: Annotated[int, typer.Option(help="Number of levels S.")] = 3,
    decomposition: Annotated[str, typer.Option(help="laplacian, dwt (Haar) or dct (block DCT).")] = "laplacian",
    factors: Annotated[str | None, typer.Option(help="Spatial factor per transition, e.g. 2,2 (default 2).")] = None,
    temporal_factors: Annotated[str | None, typer.Option(help="Video: frame factor per transition (default 1)")] = None,
    antialias: Annotated[bool, typer.Option(help="Antialias when downsampling (laplacian).")] = False,
    crop: Annotated[bool, typer.Option(help="Centre-crop to a size the factors divide instead of failing.")] = False,
    ae: Annotated[
        str | None,
        typer.Option(help="Also decompose the latent of this autoencoder (kl, cogvideox) and compare energies."),
    ] = None,
    ae_weights: Annotated[str | None, typer.Option(help="Local diffusers folder for --ae.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("decomposed"),
) -> None:
    """Split an image or video into levels; write PNGs, levels.npz and the recomposition."""
    split = build_decomposition(
        decomposition,
        levels,
        parse_list(factors, int, "--factors"),
        parse_list(temporal_factors, int, "--temporal-factors"),
        antialias,
    )
    assert isinstance(split, TwoBandPyramid)  # only `upsample_coarse` (not asked for here) wraps it
    coder = build_autoencoder(ae, ae_weights) if ae is not None else None
    if path is None:
        path, x = default_photo()
        crop = True
    else:
        x = load_media(path)
    if crop:
        x = crop_to_multiple(x, split, coder.spatial_factor if coder else 1)
    try:
        split.level_sizes(x.shape[2:])
    except DfmError as e:
        raise DfmError(f"{path}: {e}; or pass --crop to centre-crop it") from None
    report = analyse(x, split, coder.encode if coder else None)
    written = write_report(report, out)
    console.print(report_table(report, f"{path} → {out}/"))
    if report.equivariance is not None:
        console.print(
            f"scale equivariance of --ae {ae}: {report.equivariance:.3f} "
            "(1 = the latent's levels carry the image's energy split; paper §3.1, Table 5)"
        )
    console.print(f"max recomposition error (float32): {report.error:.3e}")
    console.print(f"wrote {', '.join(p.name for p in written)}")
