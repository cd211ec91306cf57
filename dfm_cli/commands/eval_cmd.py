"""`dfm eval`: offline metrics with thresholds for CI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from dfm_cli.commands.common import app, console, user_errors
from dfm_cli.errors import DfmError


@app.command("eval")
@user_errors
def eval_(
    samples: Annotated[str, typer.Argument(help="Samples: an ADM .npz (arr_0), an image folder, or a dataset name.")],
    ref: Annotated[Optional[str], typer.Option(help="Reference: a folder, an .npz (images or mu/sigma), or animal-mnist.")] = None,
    fid: Annotated[bool, typer.Option("--fid", help="FID (frame-FID for video), Inception via torch-fidelity.")] = False,
    kid: Annotated[bool, typer.Option("--kid", help="KID via torch-fidelity.")] = False,
    isc: Annotated[bool, typer.Option("--isc", help="Inception Score (needs weights with logits).")] = False,
    fdd: Annotated[bool, typer.Option("--fdd", help="Fréchet DINOv2 distance.")] = False,
    swd: Annotated[bool, typer.Option("--swd", help="Multi-scale sliced Wasserstein distance (no weights).")] = False,
    clip: Annotated[bool, typer.Option("--clip", help="CLIP score against --captions.")] = False,
    fvd: Annotated[bool, typer.Option("--fvd", help="Fréchet video distance (I3D).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON.")] = None,
    stats_out: Annotated[Optional[Path], typer.Option(help="Save SAMPLES' statistics (mu, sigma; ADM layout) and exit.")] = None,
    max_fid: Annotated[Optional[float], typer.Option(help="Exit 1 if FID is above this.")] = None,
    max_kid: Annotated[Optional[float], typer.Option(help="Exit 1 if KID is above this.")] = None,
    max_fdd: Annotated[Optional[float], typer.Option(help="Exit 1 if FDD is above this.")] = None,
    max_swd: Annotated[Optional[float], typer.Option(help="Exit 1 if SWD is above this.")] = None,
    max_fvd: Annotated[Optional[float], typer.Option(help="Exit 1 if FVD is above this.")] = None,
    min_isc: Annotated[Optional[float], typer.Option(help="Exit 1 if IS is below this.")] = None,
    min_clip: Annotated[Optional[float], typer.Option(help="Exit 1 if the CLIP score is below this.")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(help="Inception weights (torch-fidelity format).")] = None,
    dinov2_weights: Annotated[Optional[Path], typer.Option(help="DINOv2 checkpoint (Meta format), e.g. dinov2_vitl14_pretrain.pth.")] = None,
    clip_model: Annotated[str, typer.Option(help="open_clip architecture name or config JSON.")] = "ViT-L-14",
    clip_weights: Annotated[Optional[Path], typer.Option(help="open_clip checkpoint for --clip-model.")] = None,
    captions: Annotated[Optional[Path], typer.Option(help="Text file, one caption per sample, for --clip.")] = None,
    i3d_weights: Annotated[Optional[Path], typer.Option(help="i3d_torchscript.pt for --fvd.")] = None,
    swd_levels: Annotated[int, typer.Option(help="Pyramid levels for --swd.")] = 3,
    batch: Annotated[int, typer.Option(help="Feature-extraction batch size (results do not depend on it).")] = 50,
    fid_extractor: Annotated[str, typer.Option(help="torch-fidelity feature extractor for FID/KID.")] = "inception-v3-compat",
) -> None:
    """Score samples offline: FID/KID/IS, FDD, SWD, CLIP and FVD; thresholds set the exit code (0 pass, 1 fail, 2 error)."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dfm_cli.evaluate import Request, check_thresholds, evaluate, load_source, reference_statistics
    from dfm_cli.factory import pick_device
    from dfm_cli.metrics import save_statistics

    req = Request(fid=fid, kid=kid, isc=isc, fdd=fdd, swd=swd, clip=clip, fvd=fvd,
                  inception_weights=inception_weights, dinov2_weights=dinov2_weights, clip_model=clip_model,
                  clip_weights=clip_weights, captions=captions, i3d_weights=i3d_weights, swd_levels=swd_levels,
                  batch=batch, device=pick_device(), fid_extractor=fid_extractor)
    start = time.perf_counter()
    source = load_source(samples)
    err = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=err, transient=True)
    if stats_out is not None:
        with progress:
            stats = reference_statistics(source, req, progress)
        save_statistics(stats_out, stats)
        console.print(f"wrote {', '.join(stats)} of {samples} to {stats_out}")
        return
    if not any((fid, kid, isc, fdd, swd, clip, fvd)):
        raise DfmError("choose at least one metric: --fid, --kid, --isc, --fdd, --swd, --clip or --fvd")
    resolution = source.images.shape[-2] if source.images is not None else None
    reference = load_source(ref, resolution) if ref else None
    with progress:
        results, warnings = evaluate(source, reference, req, progress)
    results["seconds"] = round(time.perf_counter() - start, 2)
    limits = {"--max-fid": max_fid, "--max-kid": max_kid, "--max-fdd": max_fdd, "--max-swd": max_swd,
              "--max-fvd": max_fvd, "--min-isc": min_isc, "--min-clip": min_clip}
    failed = check_thresholds(results, limits)
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}")
    table = Table(title=f"{samples} vs {ref}" if ref else samples)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.6g}")
    console.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"samples": samples, "ref": ref, "metrics": results, "warnings": warnings,
                                        "failed": failed}, indent=1))
    if failed:
        typer.echo("threshold failed: " + "; ".join(failed), err=True)
        raise typer.Exit(1)
