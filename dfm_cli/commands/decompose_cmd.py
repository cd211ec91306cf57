"""`dfm decompose`: a Laplacian pyramid of an image or video, and optionally of its latent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from dfm_cli.commands.common import app, console, parse_list, user_errors
from dfm_cli.errors import DfmError


@app.command()
@user_errors
def decompose(
    path: Annotated[Optional[Path], typer.Argument(help="Image or video (GIF/MP4). Default: a photo shipped with scikit-learn.")] = None,
    levels: Annotated[int, typer.Option(help="Number of pyramid levels S.")] = 3,
    factors: Annotated[Optional[str], typer.Option(help="Spatial factor per transition, e.g. 2,2 (default 2 each).")] = None,
    temporal_factors: Annotated[Optional[str], typer.Option(help="Video: frame factor per transition (default 1).")] = None,
    antialias: Annotated[bool, typer.Option(help="Antialias when downsampling.")] = False,
    crop: Annotated[bool, typer.Option(help="Centre-crop to a size the factors divide instead of failing.")] = False,
    ae: Annotated[Optional[str], typer.Option(help="Also decompose the latent of this autoencoder (kl, cogvideox) and compare energies.")] = None,
    ae_weights: Annotated[Optional[str], typer.Option(help="Local diffusers folder for --ae.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("decomposed"),
) -> None:
    """Split an image or video into Laplacian levels; write PNGs, levels.npz and the recomposition."""
    from dfm_cli.decompose import LaplacianPyramid, crop_to_multiple, energy_shares, equivariance
    from dfm_cli.media import default_photo, load_media, save_grid, signed_to_unit

    pyramid = LaplacianPyramid(levels, parse_list(factors, int, "--factors"),
                               parse_list(temporal_factors, int, "--temporal-factors"), antialias)
    coder = None
    if ae is not None:
        from dfm_cli.autoencoders import build_autoencoder

        coder = build_autoencoder(ae, ae_weights)
    if path is None:
        path, x = default_photo()
        crop = True
    else:
        x = load_media(path)
    if crop:
        x = crop_to_multiple(x, pyramid, coder.spatial_factor if coder else 1)
    try:
        pyramid.level_sizes(x.shape[2:])
    except DfmError as e:
        raise DfmError(f"{path}: {e}; or pass --crop to centre-crop it") from None
    bands32 = pyramid.decompose(x)
    recon = pyramid.recompose(bands32)
    error = float((recon - x).abs().max())
    out.mkdir(parents=True, exist_ok=True)

    def frames(t):  # 1 C [T] H W → N C H W for a grid
        return t[0].transpose(0, 1) if t.ndim == 5 else t

    written = []
    for s, band in enumerate(bands32, 1):
        view = band if s == 1 else signed_to_unit(band)
        written.append(save_grid(frames(view), out / f"level_{s}.png", nrow=frames(view).shape[0]))
    save_grid(frames(recon), out / "recomposition.png", nrow=frames(recon).shape[0])
    np.savez(out / "levels.npz", **{f"level_{s}": b[0].numpy() for s, b in enumerate(bands32, 1)})

    shares = energy_shares(bands32)
    latent_shares = None
    if coder is not None:
        latent = pyramid.decompose(coder.encode(x).float().cpu())
        latent_shares = energy_shares(latent)
        for s, band in enumerate(latent, 1):  # one grey tile per latent channel
            view = band if s == 1 else signed_to_unit(band)
            tiles = view[0].transpose(0, 1).flatten(0, 1)[:, None] if view.ndim == 5 else view[0][:, None]
            written.append(save_grid(tiles.clamp(-1, 1), out / f"latent_level_{s}.png", nrow=len(tiles)))
    table = Table(title=f"{path} → {out}/")
    for col in ("level", "shape", "energy share") + (("latent energy share",) if coder else ()):
        table.add_column(col)
    for s, (band, share) in enumerate(zip(bands32, shares), 1):
        extra = (f"{latent_shares[s - 1]:.2%}",) if latent_shares else ()
        table.add_row(str(s), "x".join(map(str, band.shape[2:])), f"{share:.2%}", *extra)
    console.print(table)
    if latent_shares:
        console.print(f"scale equivariance of --ae {ae}: {equivariance(shares, latent_shares):.3f} "
                      "(1 = the latent's levels carry the image's energy split; paper §3.1, Table 5)")
    console.print(f"max recomposition error (float32): {error:.3e}")
    console.print(f"wrote {', '.join(p.name for p in written)}, recomposition.png, levels.npz")
