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
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("decomposed"),
) -> None:
    """Split an image or video into Laplacian levels; write PNGs, levels.npz and the recomposition."""
    from dfm_cli.decompose import LaplacianPyramid, crop_to_multiple, energy_shares
    from dfm_cli.media import default_photo, load_media, save_grid, signed_to_unit

    pyramid = LaplacianPyramid(levels, parse_list(factors, int, "--factors"),
                               parse_list(temporal_factors, int, "--temporal-factors"), antialias)
    if path is None:
        path, x = default_photo()
        crop = True
    else:
        x = load_media(path)
    if crop:
        x = crop_to_multiple(x, pyramid)
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

    table = Table(title=f"{path} → {out}/")
    for col in ("level", "shape", "energy share"):
        table.add_column(col)
    for s, (band, share) in enumerate(zip(bands32, energy_shares(bands32)), 1):
        table.add_row(str(s), "x".join(map(str, band.shape[2:])), f"{share:.2%}")
    console.print(table)
    console.print(f"max recomposition error (float32): {error:.3e}")
    console.print(f"wrote {', '.join(p.name for p in written)}, recomposition.png, levels.npz")


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
    console.print(f"run folder: {run_dir}  (grid: {run_dir / 'samples' / 'grid.png'})")


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
    n: Annotated[int, typer.Option(help="Number of samples.")] = 64,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Grid PNG to write.")] = Path("grid.png"),
    previews: Annotated[bool, typer.Option(help="Also write the clean estimate at the end of each stage.")] = False,
    ema: Annotated[bool, typer.Option(help="Use the EMA weights.")] = True,
) -> None:
    """Generate a grid progressively: level 1 first, finer levels joining at tau."""
    import torch

    from dfm_cli.factory import build_pyramid, load_trained
    from dfm_cli.media import save_grid
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
    labels = torch.full((n,), class_) if class_ is not None else torch.arange(n) % num_classes
    guidance = parse_list(interval, float, "--interval") or s.guidance_interval
    start = time.perf_counter()
    result = generate(model, labels, step_list, tau_list, build_pyramid(recipe),
                      cfg=s.cfg if cfg is None else cfg, interval=tuple(guidance),
                      solver=solver or s.solver, seed=seed, previews=previews)
    elapsed = time.perf_counter() - start
    nrow = num_classes if class_ is None and n % num_classes == 0 else None
    save_grid(result.x, out, nrow=nrow, scale=2)
    written = [out]
    for k, preview in enumerate(result.previews, 1):
        written.append(save_grid(preview, out.with_name(f"{out.stem}_stage{k}{out.suffix}"), nrow=nrow, scale=2))
    console.print(f"NFE {result.nfe} ({result.guided_nfe} with CFG, batch x2) for {n} samples "
                  f"in {elapsed:.2f} s; wrote {', '.join(map(str, written))}")


def main() -> None:
    app()
