"""The training loop: a run is a folder, and running the same command again resumes it.

Everything random about sample i of the stream (stage, timesteps, label dropout, noise)
comes from a generator seeded by `(seed, i)`, and the data order is a function of
`(seed, position)`. So a step's maths depends neither on the number of ranks nor on the
micro-batch size, and resuming at step k replays exactly what an uninterrupted run would
have done. The checkpoint restores the weights, the EMA, the optimizer and the RNGs.

`train.batch_size` is the global batch. Each of the W ranks takes B / W samples and feeds
them in micro-batches of `train.batch_per_gpu`, accumulating gradients; the loss is scaled
so that the gradient is always that of the mean over the global batch.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from dfm_cli import distributed
from dfm_cli.config.recipe import Recipe, load_recipe
from dfm_cli.data.autoencoders import from_config
from dfm_cli.data.checkpoints import (
    RunInfo,
    complete_checkpoints,
    load_training_state,
    run_lock,
    save_training_state,
    truncate_stats,
)
from dfm_cli.data.datasets import build_dataset
from dfm_cli.errors import DfmError
from dfm_cli.listing import evenly_spaced
from dfm_cli.media import save_samples
from dfm_cli.method.cond import TextCond
from dfm_cli.method.flow import Draws
from dfm_cli.method.level_stats import level_statistics, stored_level_statistics
from dfm_cli.method.sampler import SamplerSettings, class_balanced_labels, generate, sampled_classes
from dfm_cli.methods.factory import (
    build_model,
    build_objective,
    build_pyramid,
    cascade_settings,
    load_single_level,
    plain_pyramid,
    precondition_rms,
)
from dfm_cli.models.conversion import convert_single_level, per_level_parameters
from dfm_cli.seeding import MODEL_INIT, mix_seed
from dfm_cli.training.batches import DrawnBatches, StepBatches, keep_batch, split_batch
from dfm_cli.training.perf import autocast_dtype, device_name, peak_tflops, training_forward_flops
from dfm_cli.training.stats import Interval

# Keys that may change between a run and its resumption without changing what is learned.
RESUMABLE_CHANGES = {
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.milestone_every",
    "train.preview_every",
    "train.max_nonfinite_steps",
    "train.batch_per_gpu",
    "train.compile",
    "train.peak_tflops",
    "data.num_workers",
    "train.eval_every",
    "train.eval_num",
    "train.eval_metrics",
    "train.eval_reference_num",
}
PLAIN_PROGRESS_S = 30.0  # without a terminal, a progress line at least this often

Hook = Callable[[int, torch.nn.Module], dict]


class TrainingStopped(DfmError):
    """The run stopped on purpose (non-finite policy); the folder is consistent."""


def lr_at(recipe: Recipe, step: int) -> float:
    t = recipe.train
    return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr


def stage2_start(recipe: Recipe) -> int:
    """The step at which a cascade switches to stage 2 (0: not a cascade)."""
    return cascade_settings(recipe).split_step(recipe.train.steps) if recipe.flow.method == "cascaded" else 0


def ema_decay_at(recipe: Recipe, step: int) -> float:
    """EMA decay with a warm-up, so short runs are not dominated by the random init. A cascade
    warms up again at the switch: stage 2 is a new model whose early weights are poor (stage 1,
    which no longer trains, only settles on its last weights)."""
    switch = stage2_start(recipe)
    since = step - switch if step >= switch else step
    return min(recipe.train.ema_decay, (1 + since) / (10 + since))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def check_resumable(run_dir: Path, recipe: Recipe, newest: Path | None = None) -> None:
    """Refuse to continue a run with a recipe that would change what it learns (`[sample]`
    only sets the final grid's sampler, so it may change). The recipe is
    compared with the folder's `recipe.toml` and with the one inside the `newest` checkpoint,
    which is what its weights were trained with even if the folder's copy is gone."""
    new = recipe.to_dict()
    for old_path in (run_dir / "recipe.toml", *([newest / "recipe.toml"] if newest else [])):
        if not old_path.is_file():
            continue
        old = load_recipe(old_path).to_dict()
        for section, body in new.items():
            for key, value in body.items():
                name = f"{section}.{key}"
                resumable = RESUMABLE_CHANGES - ({"train.steps"} if recipe.flow.method == "cascaded" else set())
                if section != "sample" and name not in resumable and old[section].get(key) != value:
                    raise DfmError(
                        f"{old_path.parent} was trained with {name} = {old[section].get(key)!r}, not {value!r}; "
                        "use a new --out folder, or the run's own recipe.toml to continue it"
                    )


class Step:
    """One optimizer step over this rank's share of a global batch, with the non-finite guard."""

    def __init__(self, recipe: Recipe, ctx: distributed.Context, model, forward, ema, opt, objective, pyramid):
        self.recipe, self.ctx, self.model, self.forward = recipe, ctx, model, forward
        self.ema, self.opt, self.objective, self.pyramid = ema, opt, objective, pyramid
        self.local, self.micro = split_batch(recipe, ctx.world)
        dtype = autocast_dtype(ctx.device.type, recipe.train.precision)
        self.autocast = (lambda: torch.autocast(ctx.device.type, dtype=dtype)) if dtype else nullcontext
        inner = distributed.unwrap(model)
        self.shapes = [(inner.channels, *size) for size in pyramid.level_sizes(inner.level_sizes[-1])]
        self.per_level = per_level_parameters(inner)

    def __call__(
        self, step: int, x: torch.Tensor, y: torch.Tensor, draws: Draws, interval: Interval
    ) -> tuple[float, bool]:
        """One step on this rank's batch and its `draws` (see `DrawnBatches`); returns (grad
        norm, whether the step was applied). Applied steps join `interval`."""
        t, ctx = self.recipe.train, self.ctx
        draws = draws.to(ctx.device)
        scale = ctx.world / t.batch_size  # DDP averages over ranks; we want the global mean
        chunks = range(0, self.local, self.micro)
        loss_sum, outs = torch.zeros((), dtype=torch.float64), []
        for j, lo in enumerate(chunks):
            sl = slice(lo, lo + self.micro)
            with distributed.no_grad_sync(self.model, skip=j < len(chunks) - 1), self.autocast():
                out = self.objective.loss(
                    self.forward,
                    self.pyramid.decompose(x[sl]),
                    y[sl],
                    draws[sl],
                    null=distributed.unwrap(self.model).null_condition(len(x[sl])),
                )
                (out["per_sample"].sum() * scale).backward()
            loss_sum += float(out["per_sample"].detach().sum())
            outs.append(out)
        if step < t.per_level_only_steps:  # after a conversion: only the per-level layers learn at first
            for name, p in distributed.unwrap(self.model).named_parameters():
                if name not in self.per_level:
                    p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        bad = torch.tensor([float(not (torch.isfinite(grad_norm) and torch.isfinite(loss_sum)))])
        if float(distributed.all_sum(ctx, bad)) > 0:
            self.opt.zero_grad(set_to_none=True)
            return float(grad_norm), False
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.recipe, step)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, ema_decay_at(self.recipe, step))
        for out in outs:  # skipped steps stay out of the statistics
            interval.add(out)
        return float(grad_norm), True


def compiled(forward: torch.nn.Module, probe: Callable[[Callable], object], console: Console) -> Callable:
    """`torch.compile(forward)` if a probe forward goes through, else eager with a clear message."""
    try:
        fn = torch.compile(forward)
        probe(fn)
        return fn
    except Exception as e:  # any backend failure (no compiler, unsupported op) falls back
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        console.print(f"[yellow]torch.compile is unavailable here ({first[:160]}); training without it[/]")
        return forward


def train(
    recipe: Recipe, run_dir: Path, console: Console | None = None, hooks: Sequence[tuple[int, Hook]] = ()
) -> dict:
    """Train (or resume) the run in `run_dir`; `hooks` are `(every_n_steps, fn(step, ema))`
    whose returned dicts join the stats (periodic evaluation), every n steps and at the last.
    Returns the last log line."""
    ctx = distributed.init()
    try:
        return _train(recipe, run_dir, ctx, console or Console(stderr=True, quiet=not ctx.main), hooks)
    finally:
        distributed.shutdown(ctx)


def _train(
    recipe: Recipe, run_dir: Path, ctx: distributed.Context, console: Console, hooks: Sequence[tuple[int, Hook]]
) -> dict:
    split_batch(recipe, ctx.world)
    with ExitStack() as held:
        refused = None
        if ctx.main:  # torchrun's ranks share the folder through rank 0's lock
            try:
                held.enter_context(run_lock(run_dir))
            except DfmError as e:
                refused = e
        if float(distributed.all_sum(ctx, torch.tensor([float(refused is not None)]))) > 0:
            raise refused or DfmError(f"{run_dir}: rank 0 could not take the run folder (see its message)")
        return _train_held(recipe, run_dir, ctx, console, hooks)


def _train_held(
    recipe: Recipe, run_dir: Path, ctx: distributed.Context, console: Console, hooks: Sequence[tuple[int, Hook]]
) -> dict:
    t = recipe.train
    found = complete_checkpoints(run_dir)
    check_resumable(run_dir, recipe, found[-1] if found else None)
    split = stage2_start(recipe)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    dataset = build_dataset(
        recipe.data.name,
        recipe.data.path,
        recipe.data.resolution,
        recipe.data.frames,
        strict=recipe.data.strict,
        classes=recipe.data.classes,
    )
    if recipe.data.captions:  # encoded once into the run folder
        from dfm_cli.data.captions import captioned_folder

        dataset = captioned_folder(dataset, recipe, run_dir, ctx)
    needs_stats = recipe.flow.standardize or recipe.flow.precondition
    level_stats = data_level_statistics(recipe, dataset) if needs_stats else None
    pyramid, objective = build_pyramid(recipe, level_stats), build_objective(recipe)
    info = RunInfo(
        tuple(dataset.shape),
        dataset.num_classes,
        tuple(dataset.class_names),
        getattr(dataset, "index", {}).get("autoencoder", {"name": "pixel", "channels": dataset.channels}),
        level_stats,
        getattr(dataset, "text", None),
    )
    if info.text and t.eval_every:
        raise DfmError(
            "train.eval_every: in-training FID is for class-conditional runs; for a text-conditioned "
            "run use `dfm sample RUN --prompts FILE --num N --out S` and `dfm eval S --clip ...`"
        )
    if t.eval_every:
        from dfm_cli.training.periodic_eval import TrainingEvaluation

        hooks = [*hooks, (t.eval_every, TrainingEvaluation(recipe, dataset, info, pyramid, ctx, run_dir))]
    torch.manual_seed(mix_seed(t.seed, MODEL_INIT, 0))
    base = build_model(recipe, dataset.shape, dataset.num_classes, precondition_rms(recipe, level_stats), info.text).to(
        ctx.device
    )
    if info.text:
        base.null_text.set(dataset.null_text())
    if t.init_from and not found:  # a resumed run has its own weights
        convert_single_level(
            base, load_single_level(t.init_from, info, recipe.model.kind), 0 if recipe.flow.upsample_coarse else None
        )
        console.print(f"starting from the single-level model {t.init_from} (new levels zero-initialized)")
    ema = distributed.shard_like(copy.deepcopy(base).requires_grad_(False), ctx, t.parallel)
    model = distributed.wrap(base, ctx, t.parallel)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=t.lr,
        betas=tuple(t.betas),
        eps=t.eps,
        weight_decay=t.weight_decay,
        fused=ctx.device.type == "cuda",
    )
    start, nonfinite = 0, 0
    if found:
        state = load_training_state(found[-1], model, ema, opt, ctx)
        start, nonfinite = state["step"], state.get("nonfinite_steps", 0)
        console.print(f"resuming {run_dir} from step {start} ({found[-1].name})")
    if ctx.main:
        truncate_stats(run_dir / "stats.jsonl", start)  # lines after the checkpoint are written again
        (run_dir / "recipe.toml").write_text(recipe.to_toml())

    step_fn = Step(recipe, ctx, model, model, ema, opt, objective, pyramid)
    # a text run's grids show the captions of evenly spaced training items
    captions = dataset.text_rows(evenly_spaced(dataset.num, recipe.sample.n).tolist()) if info.text else None
    if t.compile:

        def probe(fn):
            with torch.no_grad(), step_fn.autocast():
                xs = [torch.zeros(1, *s, device=ctx.device) for s in step_fn.shapes]
                zeros = torch.zeros(1, dtype=torch.long, device=ctx.device)
                fn(xs, torch.zeros(1, len(xs), device=ctx.device), base.null_condition(1), zeros)

        step_fn.forward = compiled(model, probe, console)
    loader = DataLoader(
        DrawnBatches(dataset, objective, step_fn.shapes, t.seed, recipe.model.class_dropout),
        batch_sampler=StepBatches(len(dataset), recipe, start, ctx.rank, ctx.world),
        num_workers=recipe.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
        collate_fn=keep_batch,
    )
    flops = training_forward_flops(recipe, distributed.unwrap(model)) * 3
    peak = peak_tflops(device_name(ctx.device), autocast_dtype(ctx.device.type, t.precision), t.tf32, t.peak_tflops)
    interval, last = Interval(recipe.flow.levels), {}

    def checkpoint(step: int) -> None:
        if not finite_weights(ema, ctx):
            good = complete_checkpoints(run_dir)
            raise TrainingStopped(
                f"step {step}: the EMA weights hold non-finite values, so no checkpoint was written; the last "
                f"good checkpoint is {good[-1] if good else 'none'}; lower train.lr or raise train.warmup_steps"
            )
        state = {
            "step": step,
            "images_seen": step * t.batch_size,
            "nonfinite_steps": nonfinite,
            "world_size": ctx.world,
            **info.to_state(),
        }
        milestone = bool(t.milestone_every) and step % t.milestone_every == 0
        save_training_state(run_dir, step, model, ema, opt, state, recipe.to_toml(), t.keep_checkpoints, milestone, ctx)

    plain = not console.is_terminal  # a log file gets plain lines, a terminal the live bar
    progress = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=plain,
    )
    stats_file = (run_dir / "stats.jsonl").open("a") if ctx.main else None
    began = last_plain = time.perf_counter()
    with progress, stats_file or nullcontext():
        task = progress.add_task("train", total=t.steps, completed=start, info="")
        batches = iter(loader)
        for step in range(start, t.steps):
            wait = time.perf_counter()
            if split and step == split:  # the cascade's stage 2 starts from stage 1
                from dfm_cli.baselines.cascaded import switch_to_stage2

                switch_to_stage2(distributed.unwrap(model), ema)
            x, y, draws = next(batches)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            wait = time.perf_counter() - wait
            grad_norm, applied = step_fn(step, x, y, draws, interval)
            interval.end_step(grad_norm if applied else 0.0, wait)
            done = step + 1
            if not applied:
                nonfinite += 1
                console.print(f"[yellow]step {done}: non-finite loss or gradient, step skipped ({nonfinite} so far)[/]")
                if t.max_nonfinite_steps and nonfinite > t.max_nonfinite_steps:
                    good = complete_checkpoints(run_dir)
                    raise TrainingStopped(
                        f"stopped at step {done}: {nonfinite} non-finite steps exceed train.max_nonfinite_steps = "
                        f"{t.max_nonfinite_steps}; the last good checkpoint is "
                        f"{good[-1] if good else 'none (no checkpoint was written yet)'}"
                    )
            logged = done % t.log_every == 0 or done == t.steps
            row = {"step": done, "images": done * t.batch_size}
            if logged:
                last = {
                    **row,
                    "images_seen": done * t.batch_size,
                    "lr": lr_at(recipe, step),
                    "nonfinite_steps": nonfinite,
                    **interval.summary(ctx, flops, peak),
                }
                row = last
            paused = time.perf_counter()
            for every, hook in hooks:
                if done % every == 0 or done == t.steps:
                    row.update(hook(done, ema))
            if t.preview_every and done % t.preview_every == 0:
                sample_grid(recipe, ema, pyramid, run_dir / "samples" / f"preview-{done:09d}", info, ctx, captions)
            interval.exclude(time.perf_counter() - paused)  # evaluation and previews are not training speed
            if logged:
                interval.reset()
            if stats_file and len(row) > 2:
                stats_file.write(json.dumps(row) + "\n")
                stats_file.flush()
            if logged:
                mfu = f"  MFU {last['mfu']:.1%}" if last["mfu"] is not None else ""
                progress.update(task, info=f"loss {last['loss']:.4f}  {last['images_per_s']:.0f} img/s{mfu}")
            progress.update(task, completed=done)
            now = time.perf_counter()
            if plain and (logged or now - last_plain >= PLAIN_PROGRESS_S):
                console.print(progress_line(done, t.steps, last, (now - began) / (done - start)), highlight=False)
                console.file.flush()
                last_plain = now
            if done % t.checkpoint_every == 0 or done == t.steps:
                checkpoint(done)
    if start < t.steps or not list((run_dir / "samples").glob("grid.*")):
        sample_grid(recipe, ema, pyramid, run_dir / "samples" / "grid", info, ctx, captions)
    return last


def progress_line(done: int, total: int, last: dict, seconds_per_step: float) -> str:
    """The plain progress line for logs.

    >>> progress_line(50, 1500, {"loss": 0.51234, "images_per_s": 183.6}, 0.35)
    'train step 50/1500 (3%)  loss 0.5123  184 img/s  8m27s left'
    """
    left = round(seconds_per_step * (total - done))
    speed = f"  loss {last['loss']:.4f}  {last['images_per_s']:.0f} img/s" if last else ""
    return f"train step {done}/{total} ({done / total:.0%}){speed}  {left // 60}m{left % 60:02d}s left"


def finite_weights(module: torch.nn.Module, ctx: distributed.Context) -> bool:
    """Whether every parameter is finite on every rank (each rank checks its own shards)."""
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in module.parameters())
    return float(distributed.all_sum(ctx, torch.tensor([float(bad)]))) == 0


def data_level_statistics(recipe: Recipe, dataset) -> dict:
    """Per-level statistics for `flow.standardize`: the store's own when they were computed
    for this decomposition, else measured on (up to 4096 items spread over) the data."""
    pyramid = plain_pyramid(recipe)
    stored = stored_level_statistics(getattr(dataset, "index", {}), pyramid)
    if stored and stored.get("decomposition", "laplacian") == recipe.flow.decomposition:
        return stored
    return {**level_statistics(dataset, pyramid), "decomposition": recipe.flow.decomposition}


def sample_grid(
    recipe: Recipe,
    ema: torch.nn.Module,
    pyramid,
    path: Path,
    info: RunInfo,
    ctx: distributed.Context,
    captions: TextCond | None = None,
) -> None:
    """A grid with the recipe's sampler settings, one class per column (or, for a text run,
    one of `captions` per cell), decoded by the data's autoencoder: `path`.png for images,
    `path`.gif for video. Every rank samples (a sharded EMA needs them all); rank 0 writes."""
    s = recipe.sample
    classes = sampled_classes(recipe, info)
    columns = len(classes) if captions is None else int(len(captions) ** 0.5)
    ema.eval()
    settings = SamplerSettings.resolve(recipe, recipe.flow.levels)
    result = generate(
        ema,
        class_balanced_labels(s.n, classes) if captions is None else captions,
        pyramid,
        settings,
        seed=recipe.train.seed,
    )
    if ctx.main:
        pixels = from_config(info.autoencoder, result.x.device).decode(result.x)
        suffix = ".gif" if pixels.ndim == 5 else ".png"
        save_samples(pixels, path.with_suffix(suffix), nrow=columns if s.n % columns == 0 else None)
