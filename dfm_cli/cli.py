"""The `dfm` command: argument parsing, calls into the core library, and printed results.

No math lives here. User mistakes (`DfmError`) become a one-line `error: ...` on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from dfm_cli.errors import DfmError

app = typer.Typer(
    help="Decomposable Flow Matching: progressive multi-scale generation (arXiv 2506.19839).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


def user_errors(fn):
    """Turn a `DfmError` into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DfmError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_list(text: str | None, kind: type, flag: str) -> list | None:
    """`"30,10"` → `[30, 10]`; a clear error names the flag otherwise."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DfmError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values, e.g. 30,10") from None


# --------------------------------------------------------------------------- decompose


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


# --------------------------------------------------------------------------- encode


@app.command()
@user_errors
def encode(
    source: Annotated[str, typer.Argument(help="Image folder (class subfolders), video folder (with --frames), animal-mnist or sprites.")],
    out: Annotated[Path, typer.Option(help="Store folder to write (re-running resumes).")],
    ae: Annotated[str, typer.Option(help="Autoencoder: pixel, kl (SD-VAE/FLUX AE) or cogvideox.")] = "pixel",
    ae_weights: Annotated[Optional[str], typer.Option(help="Local diffusers folder, or a repo id in the hub cache.")] = None,
    resolution: Annotated[int, typer.Option(help="Pixel resolution after the ADM centre crop.")] = 256,
    frames: Annotated[int, typer.Option(help="Video: frames per clip (0 = images).")] = 0,
    stride: Annotated[int, typer.Option(help="Video: take every stride-th frame.")] = 1,
    fps: Annotated[float, typer.Option(help="Video: resample to this frame rate instead of --stride (0 = off).")] = 0.0,
    labels: Annotated[Optional[Path], typer.Option(help="Labels file, 'relative/path,label' per line (instead of class subfolders).")] = None,
    flip: Annotated[bool, typer.Option(help="Also store horizontally flipped latents (augmentation).")] = False,
    shard_size: Annotated[int, typer.Option(help="Items per shard.")] = 1024,
    strict: Annotated[bool, typer.Option(help="Fail (exit 1) on the first unreadable file instead of skipping it.")] = False,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 0,
    batch: Annotated[int, typer.Option(help="Encoder batch size.")] = 16,
    levels: Annotated[int, typer.Option(help="Levels for the stored per-level statistics.")] = 2,
    factors: Annotated[Optional[str], typer.Option(help="Factors for the stored statistics, e.g. 2.")] = None,
    temporal_factors: Annotated[Optional[str], typer.Option(help="Video: temporal factors for the statistics.")] = None,
    num: Annotated[int, typer.Option(help="sprites: how many synthetic clips.")] = 2000,
) -> None:
    """Encode a dataset into a sharded latent store (safetensors + index) for fast training."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dfm_cli import distributed
    from dfm_cli.autoencoders import build_autoencoder
    from dfm_cli.decompose import LaplacianPyramid
    from dfm_cli.sources import build_source
    from dfm_cli.store import INDEX, REPORT, EncodeFailed, encode_store

    ctx = distributed.init()
    try:
        data = build_source(source, resolution, frames, stride, fps, labels, num)
        channels = 1 if source == "animal-mnist" else 3
        coder = build_autoencoder(ae, ae_weights, channels, ctx.device)
        pyramid = LaplacianPyramid(levels, parse_list(factors, int, "--factors"),
                                   parse_list(temporal_factors, int, "--temporal-factors"))
        shape = coder.latent_shape((channels, *([frames] if frames else []), resolution, resolution))
        pyramid.level_sizes(shape[1:])  # fail early if the statistics' factors don't divide the latents
        meta = {"source": source, "resolution": resolution, "frames": frames,
                "class_names": list(data.class_names)}
        start, done = time.perf_counter(), [0]
        progress = Progress(TextColumn("encode"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                            TimeRemainingColumn(), console=Console(stderr=True, quiet=not ctx.main))

        def advance(n: int) -> None:
            done[0] += n
            progress.update(task, advance=n, rate=f"{done[0] / (time.perf_counter() - start):.1f} items/s")

        with progress:
            task = progress.add_task("encode", total=-(-len(data) // ctx.world), rate="")
            try:
                index = encode_store(data, coder, out, shard_size, flip, strict, ctx, meta, pyramid, workers, batch,
                                     advance)
            except EncodeFailed as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(1) from None
        if ctx.main:
            import json

            report = json.loads((out / REPORT).read_text())
            console.print(f"wrote {index['num']} items of shape {tuple(index['shape'])} to {out} "
                          f"({len(index['shards'])} shards, {out / INDEX}) in {time.perf_counter() - start:.1f} s")
            if report:
                console.print(f"[yellow]skipped {len(report)} unreadable file(s), listed in {out / REPORT}:[/]")
                for row in report[:10]:
                    console.print(f"  {row['file']}: {row['error']}")
    finally:
        distributed.shutdown(ctx)


# --------------------------------------------------------------------------- train


@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe, e.g. recipes/quickstart.toml.")],
    set_: Annotated[list[str], typer.Option("--set", help="Override a key: --set train.steps=200 (repeatable).")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<recipe name>). Re-running resumes.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved recipe and exit.")] = False,
) -> None:
    """Train a DFM (or S = 1 Flow Matching) model; run it again to continue from the newest checkpoint."""
    from dfm_cli.recipe import load_recipe

    resolved = load_recipe(recipe, set_)
    if dry_run:
        typer.echo(resolved.to_toml())
        return
    from dfm_cli.train import train as run_training

    run_dir = out or Path("runs") / recipe.stem
    last = run_training(resolved, run_dir)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    if last:
        levels = ", ".join(f"{v:.4f}" if v is not None else "-" for v in last["loss_level"])
        console.print(f"step {last['step']}: loss {last['loss']:.4f} (per level {levels}), "
                      f"{last['images_per_s']:.0f} images/s")
    grids = sorted((run_dir / "samples").glob("grid.*"))
    console.print(f"run folder: {run_dir}" + (f"  (grid: {grids[0]})" if grids else ""))


# --------------------------------------------------------------------------- sample


@app.command()
@user_errors
def sample(
    run: Annotated[Path, typer.Argument(help="Run folder or checkpoint folder.")],
    stages: Annotated[Optional[int], typer.Option(help="Stages to generate (default: all levels).")] = None,
    tau: Annotated[Optional[str], typer.Option(help="Stage threshold(s), e.g. 0.8 or 0.7,0.9.")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Euler steps per stage, e.g. 30,10.")] = None,
    cfg: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale.")] = None,
    interval: Annotated[Optional[str], typer.Option(help="Guidance interval in t, e.g. 0.1,0.9.")] = None,
    solver: Annotated[Optional[str], typer.Option(help="euler or heun.")] = None,
    class_: Annotated[Optional[int], typer.Option("--class", help="Class index for every sample (default: balanced).")] = None,
    n: Annotated[int, typer.Option(help="Number of samples in the grid.")] = 64,
    num: Annotated[Optional[int], typer.Option("--num", "--num-samples", help="Evaluation set: generate NUM samples into --out (.npz or a folder) instead of a grid. Under torchrun write --num-samples (torchrun's parser takes --num for its own --numa-binding).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size per process for --num.")] = 64,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Grid (.png; .gif/.mp4 for video; default grid.png/grid.gif), or with --num an ADM .npz or a PNG folder.")] = None,
    previews: Annotated[bool, typer.Option(help="Also write the clean estimate at the end of each stage.")] = False,
    ema: Annotated[bool, typer.Option(help="Use the EMA weights.")] = True,
) -> None:
    """Generate progressively (level 1 first, finer levels joining at tau): a grid, or with --num an eval set."""
    import torch

    from dfm_cli.autoencoders import from_config
    from dfm_cli.factory import build_pyramid, load_trained
    from dfm_cli.media import save_samples
    from dfm_cli.sampler import generate

    model, recipe, state = load_trained(run, ema=ema)
    s = recipe.sample
    stages = stages or (len(parse_list(steps, int, "--steps")) if steps else model.levels)
    if not 1 <= stages <= model.levels:
        raise DfmError(f"--stages {stages}: the model has {model.levels} levels; pick 1..{model.levels}")
    step_list = parse_list(steps, int, "--steps") or s.steps[:stages]
    if len(step_list) != stages:
        raise DfmError(f"--steps {steps}: give {stages} step counts, one per stage")
    tau_list = parse_list(tau, float, "--tau") or s.tau
    tau_list = (tau_list * (stages - 1) if len(tau_list) == 1 else tau_list)[: stages - 1]
    num_classes = state["num_classes"]
    if class_ is not None and not 0 <= class_ < num_classes:
        raise DfmError(f"--class {class_}: the model knows classes 0..{num_classes - 1} ({', '.join(state['class_names'])})")
    decode = from_config(state["autoencoder"], next(model.parameters()).device).decode
    settings = dict(steps=step_list, tau=tau_list, pyramid=build_pyramid(recipe, state.get("level_stats")),
                    cfg=s.cfg if cfg is None else cfg,
                    interval=tuple(parse_list(interval, float, "--interval") or s.guidance_interval),
                    solver=solver or s.solver, seed=seed)
    if num is not None:
        write_set(model, out or Path("samples.npz"), num, batch, num_classes, dict(settings, decode=decode))
        return
    out = out or Path("grid.gif" if model.video else "grid.png")
    labels = torch.full((n,), class_) if class_ is not None else torch.arange(n) % num_classes
    start = time.perf_counter()
    result = generate(model, labels, previews=previews, **settings)
    elapsed = time.perf_counter() - start
    nrow = num_classes if class_ is None and n % num_classes == 0 else None
    save_samples(decode(result.x), out, nrow=nrow)
    written = [out]
    for k, preview in enumerate(result.previews, 1):
        written.append(save_samples(decode(preview), out.with_name(f"{out.stem}_stage{k}{out.suffix}"), nrow=nrow))
    console.print(f"NFE {result.nfe} ({result.guided_nfe} with CFG, batch x2) for {n} samples "
                  f"in {elapsed:.2f} s; wrote {', '.join(map(str, written))}")


def write_set(model, out: Path, num: int, batch: int, num_classes: int, settings: dict) -> None:
    """`dfm sample --num`: a class-balanced evaluation set, sharded over torchrun processes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dfm_cli import distributed
    from dfm_cli.sample_set import write_sample_set

    if num < 1 or batch < 1:
        raise DfmError(f"--num {num} --batch {batch}: both must be at least 1")
    if out.suffix and out.suffix != ".npz":
        raise DfmError(f"--out {out}: with --num, write an ADM .npz file or a folder (no suffix)")
    ctx = distributed.init()
    try:
        model.to(ctx.device)
        start = time.perf_counter()
        progress = Progress(TextColumn("sample"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True, quiet=not ctx.main))
        with progress:
            task = progress.add_task("sample", total=-(-num // ctx.world))
            write_sample_set(model, out=out, num=num, batch=batch, num_classes=num_classes, ctx=ctx,
                             on_batch=lambda k: progress.advance(task, k), **settings)
        if ctx.main:
            console.print(f"wrote {num} samples to {out} in {time.perf_counter() - start:.1f} s "
                          f"({ctx.world} process{'es' if ctx.world > 1 else ''})")
    finally:
        distributed.shutdown(ctx)


# --------------------------------------------------------------------------- eval


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


def main() -> None:
    app()
