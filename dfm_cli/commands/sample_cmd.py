"""`dfm sample`: grids, previews and evaluation sets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from dfm_cli.commands.common import app, console, parse_list, user_errors
from dfm_cli.errors import DfmError


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

    model, recipe, info = load_trained(run, ema=ema)
    s = recipe.sample
    stages = stages or (len(parse_list(steps, int, "--steps")) if steps else model.levels)
    if not 1 <= stages <= model.levels:
        raise DfmError(f"--stages {stages}: the model has {model.levels} levels; pick 1..{model.levels}")
    step_list = parse_list(steps, int, "--steps") or s.steps[:stages]
    if len(step_list) != stages:
        raise DfmError(f"--steps {steps}: give {stages} step counts, one per stage")
    tau_list = parse_list(tau, float, "--tau") or s.tau
    tau_list = (tau_list * (stages - 1) if len(tau_list) == 1 else tau_list)[: stages - 1]
    num_classes = info.num_classes
    if class_ is not None and not 0 <= class_ < num_classes:
        raise DfmError(f"--class {class_}: the model knows classes 0..{num_classes - 1} ({', '.join(info.class_names)})")
    decode = from_config(info.autoencoder, next(model.parameters()).device).decode
    settings = dict(steps=step_list, tau=tau_list, pyramid=build_pyramid(recipe, info.level_stats),
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
