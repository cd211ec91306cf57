"""`dfm encode`: a dataset into a sharded latent store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dfm_cli import distributed
from dfm_cli.commands.common import app, console, from_flags, parse_list, user_errors
from dfm_cli.data.encode import REPORT, EncodeFailed, EncodeSettings, encode_store, prepare_store, read_report
from dfm_cli.data.sources import open_encode
from dfm_cli.data.store import INDEX
from dfm_cli.data.text_encoders import Captioner, TextEncoder, TextSettings
from dfm_cli.errors import DfmError
from dfm_cli.progress import Progress


@app.command()
@user_errors
def encode(
    source: Annotated[
        str,
        typer.Argument(
            help=(
                "Image folder (class subfolders), video folder (with --frames), or a built-in dataset: "
                "animal-mnist, photo-crops, sprites."
            )
        ),
    ],
    out: Annotated[Path, typer.Option(help="Store folder to write (re-running with the same settings resumes).")],
    ae: Annotated[str, typer.Option(help="Autoencoder: pixel, kl (SD-VAE/FLUX AE) or cogvideox.")] = "pixel",
    ae_weights: Annotated[str | None, typer.Option(help="Local diffusers folder or a cached hub repo id.")] = None,
    resolution: Annotated[int, typer.Option(help="Pixel resolution after the ADM centre crop.")] = 256,
    frames: Annotated[int, typer.Option(help="Video: frames per clip (0 = images).")] = 0,
    stride: Annotated[int, typer.Option(help="Video: take every stride-th frame.")] = 1,
    fps: Annotated[float, typer.Option(help="Video: resample to this frame rate instead of --stride (0 = off).")] = 0.0,
    labels: Annotated[
        Path | None, typer.Option(help="Labels file, 'relative/path,label' per line (instead of subfolders).")
    ] = None,
    flip: Annotated[bool, typer.Option(help="Also store horizontally flipped latents (augmentation).")] = False,
    shard_size: Annotated[int, typer.Option(help="Items per shard.")] = 1024,
    strict: Annotated[bool, typer.Option(help="Fail (exit 1) on an unreadable file instead of skipping it.")] = False,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 0,
    batch: Annotated[int, typer.Option(help="Encoder batch size.")] = 16,
    levels: Annotated[int, typer.Option(help="Levels for the stored per-level statistics.")] = 2,
    factors: Annotated[str | None, typer.Option(help="Factors for the stored statistics, e.g. 2.")] = None,
    temporal_factors: Annotated[str | None, typer.Option(help="Video: temporal factors for the statistics.")] = None,
    antialias: Annotated[bool, typer.Option(help="Antialias the stored level statistics (as flow.antialias).")] = False,
    num_clips: Annotated[
        int,
        typer.Option(help="Built-in data: how many items (animal-mnist: evenly spaced; 0 = the dataset's own count)."),
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="Start over if --out holds a store made otherwise.")] = False,
    captions: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Captions for text conditioning: CSV 'path,caption' or JSONL {path, caption}, paths relative to SOURCE."
            )
        ),
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option(help="Caption encoder: clip (open_clip), t5 (transformers folder) or clip+t5 (FLUX's pair)."),
    ] = None,
    clip_model: Annotated[str, typer.Option(help="open_clip architecture or config JSON (text tower).")] = "ViT-L-14",
    clip_weights: Annotated[Path | None, typer.Option(help="open_clip checkpoint for --text-encoder clip.")] = None,
    t5_weights: Annotated[
        Path | None, typer.Option(help="T5 encoder + tokenizer folder for --text-encoder t5.")
    ] = None,
    text_tokens: Annotated[int, typer.Option(help="Caption tokens kept per item (CLIP reads at most 77).")] = 77,
) -> None:
    """Encode a dataset into a sharded latent store (safetensors + index) for fast training."""
    listed = [
        None if values is None else tuple(values)
        for values in (parse_list(factors, int, "--factors"), parse_list(temporal_factors, int, "--temporal-factors"))
    ]
    text = None
    if text_encoder is not None:
        clip = str(Path(clip_model).resolve()) if clip_model.endswith(".json") else clip_model
        clip_file, t5_folder = (str(p.resolve()) if p else "" for p in (clip_weights, t5_weights))
        text = TextSettings(text_encoder, clip, clip_file, t5_folder, text_tokens)
    settings = from_flags(
        EncodeSettings, locals(), num=num_clips, factors=listed[0], temporal_factors=listed[1], text=text
    )
    ctx = distributed.init()
    try:
        data, coder = open_encode(settings, ctx.device)
        captioner = None
        if settings.text is not None:
            assert captions is not None  # EncodeSettings: --text-encoder comes with --captions
            if not hasattr(data, "files"):
                raise DfmError(f"--captions: {source} is a built-in dataset; captions go with a folder of files")
            captioner = Captioner(captions, Path(source), TextEncoder(settings.text, ctx.device))
            captioner.check([str(path) for path, _ in data.files])
        plan = prepare_store(data, coder, settings, ctx)
        start = time.perf_counter()
        with Progress(Console(stderr=True, quiet=not ctx.main), "encode", -(-len(data) // ctx.world)) as progress:

            def advance(n: int) -> None:
                done = progress.completed + n
                progress.update(completed=done, info=f"{done / (time.perf_counter() - start):.1f} items/s")

            try:
                index = encode_store(data, coder, settings, ctx, advance, plan, captioner)
            except EncodeFailed as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(1) from None
        if ctx.main:
            console.print(
                f"wrote {index['num']} items of shape {tuple(index['shape'])} to {out} "
                f"({len(index['shards'])} shards, {out / INDEX}) in {time.perf_counter() - start:.1f} s"
            )
            report = read_report(out)
            if report:
                console.print(f"[yellow]skipped {len(report)} unreadable file(s), listed in {out / REPORT}:[/]")
                for row in report[:10]:
                    console.print(f"  {row['file']}: {row['error']}")
    finally:
        distributed.shutdown(ctx)
