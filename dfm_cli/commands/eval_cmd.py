"""`dfm eval`: offline metrics with thresholds for CI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dfm_cli.commands.common import app, console, from_flags, user_errors
from dfm_cli.config.recipe import load_recipe
from dfm_cli.data.checkpoints import resolve_checkpoint
from dfm_cli.errors import DfmError, reading
from dfm_cli.evaluation.evaluate import (
    METRICS,
    Request,
    computation_order,
    default_eval_num,
    evaluate,
    load_source,
    reference_statistics,
    run_reference,
)
from dfm_cli.evaluation.gates import check_gates, check_thresholds
from dfm_cli.evaluation.metrics import save_statistics
from dfm_cli.evaluation.reference_cache import default_folder
from dfm_cli.methods.factory import pick_device
from dfm_cli.progress import Progress
from dfm_cli.sampling.runs import newest_run
from dfm_cli.sampling.sample_set import run_sample_set


@app.command("eval")
@user_errors
def eval_(
    samples: Annotated[
        str | None,
        typer.Argument(
            help=(
                "Samples: an ADM .npz (arr_0), an image folder, a dataset name, or a run folder. Default: "
                "the newest run under runs/, scored on its own evaluation set against its training data."
            )
        ),
    ] = None,
    ref: Annotated[
        str | None,
        typer.Option(
            help=(
                "Reference: a folder, an .npz (images or mu/sigma), or animal-mnist. Default for a run: the "
                "data it was trained on."
            )
        ),
    ] = None,
    fid: Annotated[bool, typer.Option("--fid", help="FID (frame-FID for video; torch-fidelity's Inception).")] = False,
    kid: Annotated[bool, typer.Option("--kid", help="KID via torch-fidelity.")] = False,
    isc: Annotated[bool, typer.Option("--isc", help="Inception Score (needs weights with logits).")] = False,
    fdd: Annotated[bool, typer.Option("--fdd", help="Fréchet DINOv2 distance.")] = False,
    swd: Annotated[bool, typer.Option("--swd", help="Multi-scale sliced Wasserstein distance (no weights).")] = False,
    clip: Annotated[bool, typer.Option("--clip", help="CLIP score against --captions.")] = False,
    fvd: Annotated[bool, typer.Option("--fvd", help="Fréchet video distance (I3D).")] = False,
    pr: Annotated[
        bool,
        typer.Option(
            "--pr", help="Improved precision and recall (k = 3, Inception pool features, as ADM's evaluator)."
        ),
    ] = False,
    num: Annotated[
        int | None,
        typer.Option(
            "--num", help="Scoring a run: samples in its evaluation set (default 1000 on the CPU, 10000 on CUDA)."
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")] = None,
    stats_out: Annotated[Path | None, typer.Option(help="Save SAMPLES' statistics (ADM mu, sigma) and exit.")] = None,
    max_fid: Annotated[float | None, typer.Option(help="Exit 1 if FID is above this (needs --fid).")] = None,
    max_kid: Annotated[float | None, typer.Option(help="Exit 1 if KID is above this (needs --kid).")] = None,
    max_fdd: Annotated[float | None, typer.Option(help="Exit 1 if FDD is above this (needs --fdd).")] = None,
    max_swd: Annotated[float | None, typer.Option(help="Exit 1 if SWD is above this (needs --swd).")] = None,
    max_fvd: Annotated[float | None, typer.Option(help="Exit 1 if FVD is above this (needs --fvd).")] = None,
    min_isc: Annotated[float | None, typer.Option(help="Exit 1 if IS is below this (needs --isc).")] = None,
    min_clip: Annotated[float | None, typer.Option(help="Exit 1 if CLIP score is below this (needs --clip).")] = None,
    min_precision: Annotated[float | None, typer.Option(help="Exit 1 if precision is below this (needs --pr).")] = None,
    min_recall: Annotated[float | None, typer.Option(help="Exit 1 if recall is below this (needs --pr).")] = None,
    inception_weights: Annotated[
        Path | None, typer.Option(help="Inception weights (torch-fidelity's file; tensors only).")
    ] = None,
    dinov2_weights: Annotated[
        Path | None, typer.Option(help="DINOv2 checkpoint, e.g. dinov2_vitl14_pretrain.pth.")
    ] = None,
    clip_model: Annotated[str, typer.Option(help="open_clip architecture name or config JSON.")] = "ViT-L-14",
    clip_weights: Annotated[Path | None, typer.Option(help="open_clip checkpoint for --clip-model.")] = None,
    captions: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Text file for --clip: one caption per sample, or the prompts given to `dfm sample "
                "--prompts` (sample i has prompt i mod P)."
            )
        ),
    ] = None,
    i3d_weights: Annotated[
        Path | None,
        typer.Option(
            help=(
                "i3d_torchscript.pt for --fvd. TorchScript files run the code they hold: pass only a file "
                "you trust; dfm never looks one up itself."
            )
        ),
    ] = None,
    swd_levels: Annotated[int, typer.Option(help="Pyramid levels for --swd.")] = 3,
    batch: Annotated[
        int,
        typer.Option(
            help="Feature-extraction batch size (results do not depend on it); also the sampling batch for a run."
        ),
    ] = 50,
    fid_extractor: Annotated[str, typer.Option(help="torch-fidelity extractor for FID/KID.")] = "inception-v3-compat",
    verify: Annotated[
        bool, typer.Option(help="Scoring a run: check its weights against the SHA-256 its checkpoint recorded.")
    ] = True,
    feature_cache: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help=(
                "Folder where the reference's features are saved, keyed by its images and the network, and "
                "read back next time. Default: $DFM_CACHE/features, else $XDG_CACHE_HOME/dfm/features, "
                "else ~/.cache/dfm/features."
            ),
        ),
    ] = None,
    no_feature_cache: Annotated[
        bool, typer.Option("--no-feature-cache", help="Neither read nor save the reference's features.")
    ] = False,
) -> None:
    """Score samples offline: FID/KID/IS, precision/recall, FDD, SWD, CLIP and FVD; thresholds set the exit code (0 pass, 1 fail, 2 error).

    `dfm eval --fid --max-fid X` alone scores the newest run under runs/: a CI gate in one line.
    """  # noqa: E501 (the first line is the command's one-line help)
    if feature_cache is not None and no_feature_cache:
        raise DfmError("--feature-cache DIR and --no-feature-cache contradict each other; choose one")
    if feature_cache is not None and feature_cache.exists() and not feature_cache.is_dir():
        raise DfmError(f"--feature-cache {feature_cache} is a file; name a folder")
    req = from_flags(
        Request,
        locals(),
        device=pick_device(),
        feature_cache=None if no_feature_cache else feature_cache or default_folder(),
    )
    limits = {
        "--max-fid": max_fid,
        "--max-kid": max_kid,
        "--max-fdd": max_fdd,
        "--max-swd": max_swd,
        "--max-fvd": max_fvd,
        "--min-isc": min_isc,
        "--min-clip": min_clip,
        "--min-precision": min_precision,
        "--min-recall": min_recall,
    }
    check_gates(req, limits)  # before any work: a gate that cannot fail is an error
    for flag, value in (("--batch", batch), ("--swd-levels", swd_levels), ("--num", num)):
        if value is not None and value < 1:
            raise DfmError(f"{flag} {value}: must be at least 1")
    if stats_out is None and not any(getattr(req, m.name) for m in METRICS):
        *most, last = [m.flag for m in computation_order(METRICS)]
        raise DfmError(f"choose at least one metric: {', '.join(most)} or {last}")
    if stats_out is not None and stats_out.suffix != ".npz":
        raise DfmError(f"--stats-out {stats_out}: statistics are saved as .npz (ADM layout); use a name ending in .npz")
    for flag, path in (("--json", json_out), ("--stats-out", stats_out)):
        if path is not None and path.is_dir():
            raise DfmError(f"{flag} {path} is a folder; name a file")
    start = time.perf_counter()
    err = Console(stderr=True)
    run_reference_source = None
    if samples is None or (Path(samples).is_dir() and (Path(samples) / "checkpoints").is_dir()):
        run = newest_run() if samples is None else Path(samples)
        checkpoint = resolve_checkpoint(run)
        num = num or default_eval_num(req.device)
        if not ref:  # before sampling: a run without a pixel reference (a latent store) stops here
            limit = 0 if req.device.type == "cuda" else default_eval_num(req.device)
            run_reference_source = run_reference(load_recipe(checkpoint / "recipe.toml"), run, limit)
        err.print(
            f"scoring {run}{' (the newest run under runs/)' if samples is None else ''}, checkpoint "
            f"{checkpoint.name}, on {num} samples; for a tighter estimate ask for more with --num, e.g. "
            f"--num {max(10_000, 5 * num)}",
            soft_wrap=True,
        )
        with Progress(err, "sample", num, transient=True) as progress:
            samples = str(run_sample_set(checkpoint, num, batch, progress.advance, verify=verify))
        err.print(f"evaluation set: {samples}", soft_wrap=True)
    elif num is not None:
        raise DfmError(f"--num {num} sizes a run's evaluation set; {samples} is already a sample set")
    with reading(samples, "sample set"):
        source = load_source(samples)
    if stats_out is not None:
        with Extractions(err) as tasks:
            stats, warnings = reference_statistics(source, req, tasks)
        for w in warnings:
            warn(err, w)
        save_statistics(stats_out, stats)
        console.print(f"wrote {', '.join(stats)} of {samples} to {stats_out}")
        return
    resolution = source.images.shape[-2] if source.images is not None else None
    if ref:
        with reading(ref, "reference"):
            reference = load_source(ref, resolution)
    elif run_reference_source is not None:
        reference = run_reference_source
        ref = reference.name
    else:
        reference = None
    with Extractions(err) as tasks:
        results, warnings = evaluate(source, reference, req, tasks)
    results["seconds"] = round(time.perf_counter() - start, 2)
    failed = check_thresholds(results, limits)
    for w in warnings:
        warn(err, w)
    table = Table(title=f"{samples} vs {ref}" if ref else samples)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, result in results.items():
        table.add_row(key, f"{result:.6g}")
    console.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(
            json.dumps(
                {"samples": samples, "ref": ref, "metrics": results, "warnings": warnings, "failed": failed}, indent=1
            )
        )
    if failed:
        typer.echo("threshold failed: " + "; ".join(failed), err=True)
        raise typer.Exit(1)


def warn(err: Console, message: str) -> None:
    """One line on stderr, however long, and never read as markup (paths may hold brackets)."""
    err.print(Text.assemble(("warning:", "yellow"), " ", message), soft_wrap=True)


class Extractions:
    """`evaluate`'s task API (rich's `add_task`/`advance`) over the one progress reporter: each
    feature extraction gets its own transient bar (plain lines in a log), one after the other."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.current: Progress | None = None

    def add_task(self, description: str, *, total: float | None = None) -> int:
        self.close()
        self.current = Progress(self.console, description, int(total or 0), transient=True).__enter__()
        return 0

    def advance(self, task_id: Any, advance: float = 1, /) -> None:
        if self.current is not None:
            self.current.advance(int(advance))

    def close(self) -> None:
        if self.current is not None:
            self.current.__exit__(None, None, None)
            self.current = None

    def __enter__(self) -> Extractions:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
