"""What a sweep costs: training and sampling FLOPs per cell, and the `--dry-run` plan that
turns them into an estimated time on this machine. The results table reports the same
training compute, so both read it from here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, cast

import torch

from dfm_cli.ablate.layout import MANIFEST, cell_dir, is_sampled, is_trained, read_json, run_dir
from dfm_cli.ablate.sweep import Cell, Sweep
from dfm_cli.config.method import method_of
from dfm_cli.config.recipe import Recipe
from dfm_cli.errors import DfmError
from dfm_cli.method.sampler import LevelModel
from dfm_cli.methods.factory import base_decomposition, pick_device
from dfm_cli.models.dit import model_size
from dfm_cli.models.positions import level_patches
from dfm_cli.training.perf import autocast_dtype, device_name, peak_tflops

STARTUP_S = 5.0  # per subprocess (Python + torch imports), for --dry-run estimates
CPU_FLOPS = 5e10  # FLOP/s assumed for a model too big to time on the CPU
GPU_MFU = 0.4  # share of the device's peak assumed for a model too big to time
TIMING_BUDGET = 3e10  # largest training step (FLOPs) that --dry-run times for real


def data_shape(recipe: Recipe) -> tuple[tuple[int, ...], str]:
    """`C [T] H W` of what the model sees, and a note when it had to be assumed."""
    d = recipe.data
    if d.name == "store":
        index = Path(d.path) / "index.json"
        if index.is_file():
            return tuple(json.loads(index.read_text())["shape"]), ""
        return assumed_latent_shape(recipe)
    channels = 1 if d.name == "animal-mnist" else 3
    frames = ((d.frames or 8),) if d.name == "sprites" else ()
    return (channels, *frames, d.resolution, d.resolution), ""


def assumed_latent_shape(recipe: Recipe) -> tuple[tuple[int, ...], str]:
    """The latents of a store that does not exist yet: 16-channel f8 (FLUX, CogVideoX), or,
    when the model cannot tile those, 4-channel f4 (a small autoencoder `dfm train` makes)."""
    d = recipe.data
    frames = ((d.frames - 1) // 4 + 1,) if d.frames else ()
    for channels, factor, what in ((16, 8, "FLUX / CogVideoX autoencoders"), (4, 4, "a small trained autoencoder")):
        shape = (channels, *frames, d.resolution // factor, d.resolution // factor)
        try:
            level_patches(
                base_decomposition(recipe).level_sizes(shape[1:]),
                model_size(recipe.model.name).patch,
                recipe.model.temporal_patch,
            )
        except DfmError:
            continue
        return shape, f"store not found: FLOPs assume {channels}-channel f{factor} latents ({what})"
    return shape, f"store not found, and the model tiles neither f8 nor f4 latents of {d.resolution} px"


def forward_flops_of(recipe: Recipe) -> float:
    """Model FLOPs of one forward pass per image. Big models are built shape-only (on the meta
    device, whose first use imports torch's compiler stack, seconds); small ones for real."""
    m = recipe.model
    shape = data_shape(recipe)[0]
    # the model's section and the whole flow section: a method's FLOPs may read any flow key
    sections = recipe.to_dict()
    key = (json.dumps(sections["model"], sort_keys=True), shape, json.dumps(sections["flow"], sort_keys=True))
    if key not in _FLOPS:
        size = model_size(m.name)
        big = 12 * size.depth * size.hidden**2 > 2e7
        method = method_of(recipe)
        with torch.device("meta" if big else "cpu"):
            _FLOPS[key] = method.forward_flops(probe_model(recipe, shape))
    return _FLOPS[key]


def probe_model(recipe: Recipe, shape: tuple[int, ...]) -> torch.nn.Module:
    """The recipe's model for counting and timing, before any data is seen: a preconditioned
    one gets unit level RMS (the scaling is elementwise; it changes no FLOPs)."""
    rms = [1.0] * recipe.flow.levels if recipe.flow.precondition else None
    return method_of(recipe).build_model(shape, 10, rms)


_FLOPS: dict[tuple, float] = {}


def train_compute(recipe: Recipe) -> tuple[int, float]:
    """(training images, training FLOPs = 3 × forward × images)."""
    images = recipe.train.steps * recipe.train.batch_size
    return images, 3.0 * forward_flops_of(recipe) * images


def sample_flops(recipe: Recipe, num: int) -> float:
    """FLOPs of `num` samples: one forward per step, twice with guidance."""
    s = recipe.sample
    return forward_flops_of(recipe) * num * sum(s.steps) * (2 if s.cfg != 1.0 else 1)


def measured_rates(recipe: Recipe, sample_batch: int, cache: dict) -> tuple[float, float, str]:
    """FLOP/s of training and of sampling this model here, and how they were obtained: timed
    (one training step, one sampling forward) when a step is small, else a per-FLOP constant."""
    device = pick_device()
    shape = data_shape(recipe)[0]
    fwd = forward_flops_of(recipe)
    key = (
        recipe.model.name,
        shape,
        recipe.flow.levels,
        tuple(recipe.flow.factors),
        recipe.train.batch_size,
        recipe.flow.method,
    )
    if key in cache:
        return cache[key]
    batch = min(recipe.train.batch_size, int(TIMING_BUDGET // (3 * fwd)))
    if batch < 1:
        peak = (
            peak_tflops(device_name(device), autocast_dtype(device.type, recipe.train.precision), recipe.train.tf32)
            if device.type == "cuda"
            else None
        )
        rate, how = (
            (GPU_MFU * peak * 1e12, f"per-FLOP constant: {GPU_MFU:.0%} of {device_name(device)}'s peak")
            if peak
            else (CPU_FLOPS, f"per-FLOP constant: {CPU_FLOPS / 1e9:.0f} GFLOP/s on the {device.type}")
        )
        cache[key] = (rate, rate, how)
        return cache[key]
    model = probe_model(recipe, shape).to(device)
    sizes = method_of(recipe).model_inputs(model)  # what the model's forward takes
    last_stage = len(cast(LevelModel, model).level_sizes) - 1

    def step(b: int, train: bool) -> float:
        levels = [torch.randn(b, shape[0], *s, device=device) for s in sizes]
        t, y = torch.rand(b, len(sizes), device=device), torch.zeros(b, dtype=torch.long, device=device)
        stage = torch.full((b,), last_stage, device=device)
        seconds = []
        for _ in range(2):  # the first call warms up
            start = time.perf_counter()
            with torch.set_grad_enabled(train):
                loss = sum(o.square().mean() for o in model(levels, t, y, stage))
                if train:
                    loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return seconds[-1]

    sample_b = min(sample_batch, int(TIMING_BUDGET // fwd)) or 1
    cache[key] = (
        3 * fwd * batch / step(batch, True),
        fwd * sample_b / step(sample_b, False),
        f"timed: one training step (batch {batch}) and one sampling forward on the {device.type}",
    )
    return cache[key]


def plan(
    sweep: Sweep, cells: list[Cell] | None = None, out: Path | None = None, carried: Collection[str] = ()
) -> list[dict[str, Any]]:
    """One row per cell for `--dry-run` (of `cells`, default all), in the order the sweep runs
    them (every seed of a results row is a cell of its own, with its own run): its run, compute
    and estimated time (a run's training is charged to the first cell that needs it). What is
    already done costs nothing: a run trained in `out`, a cell sampled there, a cell named in
    `carried` (scored on another machine); `done` says which ("trained", "sampled", "scored")."""
    seeds = seeds_note(sweep)
    rows: list[dict[str, Any]] = []
    rates: dict[tuple, tuple[float, float, str]] = {}  # measured_rates's cache
    runs, trained = {run.run_id: run for run in sweep.runs}, set()
    for cell in sweep.cells if cells is None else cells:
        run = runs[cell.run_id]
        images, flops = train_compute(run.recipe)
        if cell.name in carried:
            done = "scored"
        elif out is not None and is_sampled(read_json((folder := cell_dir(out, cell.cell_id)) / MANIFEST), folder):
            done = "sampled"
        elif out is not None and is_trained(read_json(run_dir(out, run.run_id) / MANIFEST)):
            done = "trained"
        else:
            done = ""
        seconds, how = 0.0, ""
        if done in ("", "trained"):
            train_rate, sample_rate, how = measured_rates(run.recipe, sweep.eval.batch, rates)
            if not done and run.run_id not in trained:
                seconds += flops / train_rate + STARTUP_S
            seconds += sample_flops(cell.recipe, sweep.eval.num) / sample_rate + 2 * STARTUP_S
            trained.add(run.run_id)
        rows.append(
            {
                "cell": cell.name,
                "run": run.run_id,
                "shared": len(run.cells),
                "train_images": images,
                "train_flops": flops,
                "seconds": seconds,
                "done": done,
                "estimate": how,
                "note": "; ".join(n for n in (data_shape(cell.recipe)[1], seeds) if n),
            }
        )
    return rows


def seeds_note(sweep: Sweep) -> str:
    """What `--dry-run` says of a sweep's seeds: how many results rows, cells and trained runs
    they make ("" for a sweep of one seed per row)."""
    if not sweep.seeded:
        return ""
    rows = sweep.rows
    counts = sorted({len(r.cells) for r in rows})
    each = f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]}–{counts[-1]} seeds"
    return (
        f"{len(rows)} results rows × {each} each = {len(sweep.cells)} cells on {len(sweep.runs)} trained runs "
        "(every seed is trained, sampled and scored; the time counts them all)"
    )
