"""`dfm sample`: grids, previews and evaluation sets. Parsing and checks of the flags only."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from dfm_cli import distributed
from dfm_cli.commands.common import app, console, parse_list, user_errors
from dfm_cli.data.autoencoders import from_config
from dfm_cli.data.text_encoders import Prompts, read_prompts
from dfm_cli.errors import DfmError
from dfm_cli.media import save_samples
from dfm_cli.method.sampler import SamplerSettings, class_balanced_labels, sampled_classes
from dfm_cli.progress import Progress
from dfm_cli.sampling.runs import TrainedRun, load_for_sampling, newest_run
from dfm_cli.sampling.sample_set import check_samples_memory, decoded_shape, write_run_sample_set

GRID_SUFFIXES = {False: (".png",), True: (".gif", ".mp4")}  # by TrainedRun.video


@app.command()
@user_errors
def sample(
    run: Annotated[Path | None, typer.Argument(help="Run or checkpoint folder (default: newest in runs/).")] = None,
    stages: Annotated[int | None, typer.Option(help="Stages to generate (default: all levels).")] = None,
    tau: Annotated[str | None, typer.Option(help="Stage threshold(s), e.g. 0.8 or 0.7,0.9.")] = None,
    steps: Annotated[str | None, typer.Option(help="Euler steps per stage, e.g. 30,10.")] = None,
    cfg: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    interval: Annotated[str | None, typer.Option(help="Guidance interval in t, e.g. 0.1,0.9.")] = None,
    solver: Annotated[str | None, typer.Option(help="euler or heun.")] = None,
    shift: Annotated[
        float | None, typer.Option(help="Time shift of the sampling grid (SD3/FLUX; 1 = none; default: sample.shift).")
    ] = None,
    cond_noise: Annotated[
        float | None,
        typer.Option(help="Cascade runs: the conditioning image's noise level in [0, 1) (default: sample.cond_noise)."),
    ] = None,
    class_: Annotated[int | None, typer.Option("--class", help="Class of every sample (default: balanced).")] = None,
    n: Annotated[int, typer.Option(help="Number of samples in the grid.")] = 64,
    num: Annotated[
        int | None,
        typer.Option(
            "--num",
            "--num-samples",
            help=(
                "Evaluation set: generate NUM samples into --out (.npz or a folder) instead of a grid. "
                "Under torchrun write --num-samples (torchrun's parser takes --num for its own "
                "--numa-binding)."
            ),
        ),
    ] = None,
    batch: Annotated[int, typer.Option(help="Batch size per process for --num.")] = 64,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Grid (.png; .gif/.mp4 for video; default grid.png/grid.gif), or with --num an ADM .npz or "
                "a PNG folder."
            )
        ),
    ] = None,
    previews: Annotated[bool, typer.Option(help="Also write the clean estimate at the end of each stage.")] = False,
    ema: Annotated[bool, typer.Option(help="Use the EMA weights.")] = True,
    verify: Annotated[
        bool, typer.Option(help="Check the weights against the SHA-256 their checkpoint recorded.")
    ] = True,
    overwrite: Annotated[
        bool, typer.Option(help="With --num: start over if --out holds a set made otherwise.")
    ] = False,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            help="Text-conditioned run: the prompt (repeat the flag for several; samples cycle through them)."
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Text-conditioned run: a file of prompts, one per line; sample i gets prompt i mod P."),
    ] = None,
) -> None:
    """Generate progressively (level 1 first, finer levels joining at tau): a grid, or with --num an eval set."""
    for flag, value in (("--n", n), ("--batch", batch), ("--num", num)):
        if value is not None and value < 1:
            raise DfmError(f"{flag} {value}: must be at least 1")
    step_list = parse_list(steps, int, "--steps")
    tau_list = parse_list(tau, float, "--tau")
    interval_list = parse_list(interval, float, "--interval")
    if interval_list is not None and len(interval_list) != 2:
        raise DfmError(f"--interval {interval}: give low,high, e.g. 0.1,0.9")
    if out is not None:
        check_out(out, num is not None)
    if run is None:
        run = newest_run()
        console.print(f"sampling the newest run under runs/: {run}")
    trained = load_for_sampling(run, ema=ema, verify=verify)
    model, info = trained.model, trained.info
    settings = trained.recipe.sampler_settings(
        stages=stages,
        steps=step_list,
        tau=tau_list,
        cfg=cfg,
        interval=interval_list,
        solver=solver,
        shift=shift,
        cond_noise=cond_noise,
    )
    texts = read_prompts(prompts) if prompts is not None else list(prompt or [])
    if prompts is not None and prompt:
        raise DfmError("give --prompt or --prompts, not both")
    if info.text is None and texts:
        raise DfmError(
            f"{run} is class-conditional (no captions in its data); use --class, or train on a store "
            "encoded with `dfm encode ... --captions FILE --text-encoder clip`"
        )
    if info.text is not None and not texts:
        raise DfmError(f'{run} is text-conditioned: pass --prompt "a photo of ..." or --prompts FILE')
    if info.text is not None and class_ is not None:
        raise DfmError(f"--class: {run} is text-conditioned; pass --prompt instead")
    # `info.text` is set whenever there are prompts (checked above)
    encoded = (
        Prompts.encode(texts, info.text, next(model.parameters()).device) if texts and info.text is not None else None
    )
    num_classes = info.num_classes
    if class_ is not None and not 0 <= class_ < num_classes:
        raise DfmError(
            f"--class {class_}: the model knows classes 0..{num_classes - 1} ({', '.join(info.class_names)})"
        )
    if num is not None:
        options = dict(batch=batch, seed=seed, overwrite=overwrite, prompts=encoded)
        write_set(trained, settings, out or Path("samples.npz"), num, **options)
    else:
        video = trained.video
        out = out or Path("grid.gif" if video else "grid.png")
        if out.suffix.lower() not in GRID_SUFFIXES[video]:
            raise DfmError(
                f"--out {out}: write {'a video' if video else 'an image'} grid as {' or '.join(GRID_SUFFIXES[video])}"
            )
        write_grid(trained, settings, out, n, class_, seed, previews, encoded)


def check_out(out: Path, for_set: bool) -> None:
    """Refuse an `--out` that cannot be written, before any work starts."""
    if for_set and out.suffix and out.suffix != ".npz":
        raise DfmError(f"--out {out}: with --num, write an ADM .npz file or a folder (no suffix)")
    if not for_set and out.suffix.lower() not in {s for v in GRID_SUFFIXES.values() for s in v}:
        raise DfmError(f"--out {out}: a grid is written as .png (images) or .gif/.mp4 (video)")
    wants_folder = for_set and not out.suffix
    if out.exists() and out.is_dir() != wants_folder:
        raise DfmError(
            f"--out {out}: is a {'folder' if out.is_dir() else 'file'}, "
            f"but a {'folder' if wants_folder else 'file'} is needed"
        )
    parent = out if out.is_dir() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DfmError(f"--out {out}: {parent} is a file, so nothing can be written under it")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise DfmError(f"--out {out}: cannot write in {parent} ({e.strerror}); choose another --out") from None


def write_grid(
    trained: TrainedRun,
    settings: SamplerSettings,
    out: Path,
    n: int,
    class_: int | None,
    seed: int,
    previews: bool,
    prompts: Prompts | None = None,
) -> None:
    """`dfm sample`: one grid (one class, or one prompt, per column by default), plus a preview per stage."""
    model, info = trained.model, trained.info
    classes = sampled_classes(trained.recipe, info) if prompts is None else list(range(len(prompts.texts)))
    num_classes = len(classes)
    decode = from_config(info.autoencoder, next(model.parameters()).device).decode
    copies = 1 + (len(settings.steps) if previews else 0)  # a grid holds all its samples (and previews) at once
    hint = ", or write the samples as an evaluation set with --num, which streams them to disk"
    check_samples_memory("--n", n, decoded_shape(model, decode), copies, hint)
    labels = torch.full((n,), class_) if class_ is not None else class_balanced_labels(n, classes)
    start = time.perf_counter()
    result = trained.generate(
        labels if prompts is None else prompts.condition(labels), settings, seed=seed, previews=previews
    )
    elapsed = time.perf_counter() - start
    nrow = num_classes if class_ is None and n % num_classes == 0 else None
    save_samples(decode(result.x), out, nrow=nrow)
    written = [out]
    for k, preview in enumerate(result.previews, 1):
        written.append(save_samples(decode(preview), out.with_name(f"{out.stem}_stage{k}{out.suffix}"), nrow=nrow))
    console.print(
        f"NFE {result.nfe} ({result.guided_nfe} with CFG, batch x2) for {n} samples "
        f"in {elapsed:.2f} s; wrote {', '.join(map(str, written))}"
    )


def write_set(trained: TrainedRun, settings: SamplerSettings, out: Path, num: int, **options: Any) -> None:
    """`dfm sample --num`: a class-balanced evaluation set, sharded over torchrun processes;
    `options` (batch, seed, overwrite, prompts) go to `write_run_sample_set`."""
    ctx = distributed.init()
    try:
        trained.model.to(ctx.device)
        start = time.perf_counter()
        # a log gets a line after the first batch too: how fast this goes is worth knowing early
        with Progress(Console(stderr=True, quiet=not ctx.main), "sample", -(-num // ctx.world)) as progress:
            on_batch = lambda n: progress.advance(n, log=progress.completed == 0)  # noqa: E731
            write_run_sample_set(trained, settings, out, num=num, ctx=ctx, on_batch=on_batch, **options)
        if ctx.main:
            console.print(
                f"wrote {num} samples to {out} in {time.perf_counter() - start:.1f} s "
                f"({ctx.world} process{'es' if ctx.world > 1 else ''})"
            )
    finally:
        distributed.shutdown(ctx)
