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
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Sampler

from dfm_cli import distributed
from dfm_cli.config.method import Method, method_of
from dfm_cli.config.recipe import Recipe
from dfm_cli.data.autoencoders import from_config
from dfm_cli.data.captions import captioned_folder
from dfm_cli.data.checkpoints import (
    RunInfo,
    complete_checkpoints,
    load_training_state,
    run_lock,
    save_training_state,
    truncate_stats,
)
from dfm_cli.data.datasets import ImageFolder, build_dataset
from dfm_cli.errors import DfmError
from dfm_cli.listing import evenly_spaced
from dfm_cli.media import grid, save_samples
from dfm_cli.method.cond import NullText, TextCond
from dfm_cli.method.decompose import Decomposition
from dfm_cli.method.flow import Draws, FlowObjective
from dfm_cli.method.level_stats import level_statistics, stored_level_statistics
from dfm_cli.method.sampler import LevelModel, class_balanced_labels, sampled_classes
from dfm_cli.methods.factory import base_decomposition, load_pinned_single_level, precondition_rms
from dfm_cli.models.conversion import convert_single_level, per_level_parameters
from dfm_cli.models.dit import DFMDiT
from dfm_cli.models.flux import DFMFlux
from dfm_cli.progress import Progress
from dfm_cli.seeding import MODEL_INIT, mix_seed
from dfm_cli.training.batches import DrawnBatches, StepBatches, keep_batch, split_batch
from dfm_cli.training.loggers import RunLogs, require
from dfm_cli.training.perf import autocast_dtype, device_name, peak_tflops
from dfm_cli.training.periodic_eval import TrainingEvaluation
from dfm_cli.training.resume import as_trained, check_resumable
from dfm_cli.training.schedules import ema_decay_at, lr_at, update_ema
from dfm_cli.training.stats import Interval

# Devices where training steps AdamW with its fused kernel: on the CPU it is 3-8% of a whole
# training step faster than the foreach kernel (benchmarks/step_time.py --ratios, docs/performance.md).
FUSED_ADAMW = ("cuda", "cpu")

Hook = Callable[[int, torch.nn.Module], dict]


class TrainingStopped(DfmError):
    """The run stopped on purpose (non-finite policy); the folder is consistent."""


@dataclass(frozen=True)
class StepSettings:
    """What one optimizer step needs from the recipe: the batch split, the learning rate,
    clipping, the EMA and the precision."""

    batch_size: int
    batch_per_gpu: int
    lr: float
    warmup_steps: int
    grad_clip: float
    ema_decay: float
    precision: str
    per_level_only_steps: int = 0

    @classmethod
    def of(cls, recipe: Recipe) -> StepSettings:
        t = recipe.train
        return cls(
            t.batch_size, t.batch_per_gpu, t.lr, t.warmup_steps, t.grad_clip, t.ema_decay, t.precision,
            t.per_level_only_steps,
        )  # fmt: skip


class Step:
    """One optimizer step over this rank's share of a global batch, with the non-finite guard.

    `forward` is the model's forward (compiled or not); `ema_warmup_start(step)` and
    `lr_warmup_start(step)` say from which step the EMA's and the learning rate's warm-ups
    count (a method may restart them), and `ema_frozen(step)` which parameters' EMA stays as
    it is (the `Method` hooks of the same names)."""

    def __init__(
        self,
        settings: StepSettings,
        ctx: distributed.Context,
        model: torch.nn.Module,
        ema: torch.nn.Module,
        opt: torch.optim.Optimizer,
        objective: FlowObjective,
        decomposition: Decomposition,
        ema_warmup_start: Callable[[int], int] = lambda step: 0,
        lr_warmup_start: Callable[[int], int] = lambda step: 0,
        ema_frozen: Callable[[int], tuple[str, ...]] = lambda step: (),
    ) -> None:
        self.settings, self.ctx, self.model = settings, ctx, model
        self.forward: Callable[..., list[torch.Tensor]] = model  # or its compiled version
        self.ema, self.opt, self.objective, self.decomposition = ema, opt, objective, decomposition
        self.ema_warmup_start, self.lr_warmup_start, self.ema_frozen = ema_warmup_start, lr_warmup_start, ema_frozen
        self.local, self.micro = split_batch(settings.batch_size, settings.batch_per_gpu, ctx.world)
        dtype = autocast_dtype(ctx.device.type, settings.precision)
        self.autocast = (lambda: torch.autocast(ctx.device.type, dtype=dtype)) if dtype else nullcontext
        inner = cast(LevelModel, distributed.unwrap(model))
        self.shapes = [(inner.channels, *size) for size in decomposition.level_sizes(inner.level_sizes[-1])]
        self.per_level = per_level_parameters(distributed.unwrap(model))

    def __call__(
        self, step: int, x: torch.Tensor, y: torch.Tensor, draws: Draws, interval: Interval
    ) -> tuple[float, bool]:
        """One step on this rank's batch and its `draws` (see `DrawnBatches`); returns (grad
        norm, whether the step was applied). Applied steps join `interval`."""
        s, ctx = self.settings, self.ctx
        draws = draws.to(ctx.device)
        scale = ctx.world / s.batch_size  # DDP averages over ranks; we want the global mean
        chunks = range(0, self.local, self.micro)
        loss_sum, outs = torch.zeros((), dtype=torch.float64), []
        for j, lo in enumerate(chunks):
            sl = slice(lo, lo + self.micro)
            with distributed.no_grad_sync(self.model, skip=j < len(chunks) - 1), self.autocast():
                out = self.objective.loss(
                    self.forward,
                    self.decomposition.decompose(x[sl]),
                    y[sl],
                    draws[sl],
                    null=cast(LevelModel, distributed.unwrap(self.model)).null_condition(len(x[sl])),
                )
                (out["per_sample"].sum() * scale).backward()
            loss_sum += float(out["per_sample"].detach().sum())
            outs.append(out)
        if step < s.per_level_only_steps:  # after a conversion: only the per-level layers learn at first
            for name, p in distributed.unwrap(self.model).named_parameters():
                if name not in self.per_level:
                    p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        bad = torch.tensor([float(not (torch.isfinite(grad_norm) and torch.isfinite(loss_sum)))])
        if float(distributed.all_sum(ctx, bad)) > 0:
            self.opt.zero_grad(set_to_none=True)
            return float(grad_norm), False
        for group in self.opt.param_groups:
            group["lr"] = lr_at(s.lr, s.warmup_steps, step - self.lr_warmup_start(step))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        decay = ema_decay_at(s.ema_decay, step - self.ema_warmup_start(step))
        update_ema(self.ema, self.model, decay, frozen=self.ema_frozen(step))
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
    split_batch(recipe.train.batch_size, recipe.train.batch_per_gpu, ctx.world)
    with ExitStack() as held:
        refused = None
        if ctx.main:  # torchrun's ranks share the folder through rank 0's lock
            try:
                held.enter_context(run_lock(run_dir))
            except DfmError as e:
                refused = e
        if float(distributed.all_sum(ctx, torch.tensor([float(refused is not None)]))) > 0:
            raise refused or DfmError(f"{run_dir}: rank 0 could not take the run folder (see its message)")
        return Trainer(recipe, run_dir, ctx, console, hooks).run()


class Trainer:
    """One run of the training loop in a folder this process holds. Set-up happens in
    `__init__` (data, method, model, optimizer, resumed state); `run` then trains from the
    resumed step to `train.steps`, one named piece per concern: the method's per-step hook,
    the step, the non-finite policy, stats, hooks and previews, progress, checkpoints."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        ctx: distributed.Context,
        console: Console,
        hooks: Sequence[tuple[int, Hook]],
    ) -> None:
        self.recipe, self.run_dir, self.ctx, self.console = recipe, run_dir, ctx, console
        t = recipe.train
        require(t.log_to)  # a missing TensorBoard or W&B stops the run before any work
        found = complete_checkpoints(run_dir)
        check_resumable(run_dir, recipe, found[-1] if found else None)
        if found:  # as the checkpoints were trained: `train.init_from` stays the checkpoint it was pinned to
            recipe = self.recipe = as_trained(run_dir, recipe, found[-1])
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
        self.dataset = self._dataset()
        needs_stats = recipe.flow.standardize or recipe.flow.precondition
        level_stats = data_level_statistics(recipe, self.dataset) if needs_stats else None
        self.method: Method = method_of(recipe)
        self.decomposition = self.method.decomposition(level_stats)
        self.objective = self.method.objective()
        self.info = RunInfo(
            tuple(self.dataset.shape),
            self.dataset.num_classes,
            tuple(self.dataset.class_names),
            getattr(self.dataset, "index", {}).get("autoencoder", {"name": "pixel", "channels": self.dataset.channels}),
            level_stats,
            getattr(self.dataset, "text", None),
        )
        self.hooks = [*hooks, *self._evaluation_hook()]
        self.init_source: dict[str, Any] | None = None  # the pinned train.init_from: checkpoint, step, sha256
        self._build_model(precondition_rms(recipe, level_stats), init_from=t.init_from if not found else "")
        self.start, self.nonfinite = 0, 0
        if found:
            state = load_training_state(found[-1], self.model, self.ema, self.opt, ctx)
            self.start, self.nonfinite = state["step"], state.get("nonfinite_steps", 0)
            self.init_source = state.get("init_from")
            console.print(f"resuming {run_dir} from step {self.start} ({found[-1].name})")
        if ctx.main:
            truncate_stats(run_dir / "stats.jsonl", self.start)  # lines after the checkpoint are written again
            (run_dir / "recipe.toml").write_text(self.recipe.to_toml())  # train.init_from pinned
        self.step_fn = Step(
            StepSettings.of(recipe),
            ctx,
            self.model,
            self.ema,
            self.opt,
            self.objective,
            self.decomposition,
            self.method.ema_warmup_start,
            self.method.lr_warmup_start,
            self.method.ema_frozen,
        )
        if t.compile:
            self.step_fn.forward = compiled(self.model, self._compile_probe, console)
        # a text run's grids show the captions of evenly spaced training items
        self.captions: TextCond | None = (
            self.dataset.text_rows(evenly_spaced(self.dataset.num, recipe.sample.n).tolist())
            if self.info.text
            else None
        )
        self.flops = self.method.forward_flops(distributed.unwrap(self.model)) * 3
        self.peak = peak_tflops(
            device_name(ctx.device), autocast_dtype(ctx.device.type, t.precision), t.tf32, t.peak_tflops
        )
        self.interval, self.last = Interval(recipe.flow.levels), cast(dict[str, Any], {})
        self.logs = RunLogs(run_dir, [], self.start, {}, main=False)  # nothing until `run` opens the recipe's

    # ------------------------------------------------------------------ set-up
    def _dataset(self) -> Any:
        d = self.recipe.data
        dataset = build_dataset(d.name, d.path, d.resolution, d.frames, strict=d.strict, classes=d.classes)
        if d.captions:  # encoded once into the run folder (the recipe checks: captions go with folders)
            assert isinstance(dataset, ImageFolder)
            return captioned_folder(dataset, self.recipe, self.run_dir, self.ctx)
        return dataset

    def _evaluation_hook(self) -> list[tuple[int, Hook]]:
        t = self.recipe.train
        if not t.eval_every:
            return []
        if self.info.text:
            raise DfmError(
                "train.eval_every: in-training FID is for class-conditional runs; for a text-conditioned "
                "run use `dfm sample RUN --prompts FILE --num N --out S` and `dfm eval S --clip ...`"
            )
        evaluation = TrainingEvaluation(
            self.recipe, self.dataset, self.info, self.method, self.decomposition, self.ctx, self.run_dir
        )
        return [(t.eval_every, evaluation)]

    def _build_model(self, level_rms: list[float] | None, init_from: str) -> None:
        """The model (seeded), converted from a single-level run when starting from one, its
        EMA, the (wrapped) model that trains, and its optimizer."""
        recipe, ctx, t = self.recipe, self.ctx, self.recipe.train
        torch.manual_seed(mix_seed(t.seed, MODEL_INIT, 0))
        base = self.method.build_model(
            tuple(self.dataset.shape), self.dataset.num_classes, level_rms, self.info.text
        ).to(ctx.device)
        if self.info.text:
            cast(NullText, base.get_submodule("null_text")).set(self.dataset.null_text())
        if init_from:
            weights, self.init_source = load_pinned_single_level(init_from, self.info, recipe.model.kind, recipe.model)
            convert_single_level(cast(DFMDiT | DFMFlux, base), weights, 0 if recipe.flow.upsample_coarse else None)
            if self.init_source:  # the run folder's recipe names the checkpoint, not the run still training
                pinned = self.init_source["checkpoint"]
                self.recipe = dataclasses.replace(recipe, train=dataclasses.replace(t, init_from=pinned))
                init_from = f"{pinned} (step {self.init_source['step']})"
            self.console.print(f"starting from the single-level model {init_from} (new levels zero-initialized)")
        self.ema = distributed.shard_like(copy.deepcopy(base).requires_grad_(False), ctx, t.parallel)
        self.model = distributed.wrap(base, ctx, t.parallel)
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            betas=(t.betas[0], t.betas[1]),
            eps=t.eps,
            weight_decay=t.weight_decay,
            fused=ctx.device.type in FUSED_ADAMW,
        )

    def _compile_probe(self, fn: Callable) -> None:
        """One forward of zeros through `fn`, to find out whether compiling works here."""
        device, inner = self.ctx.device, cast(LevelModel, distributed.unwrap(self.model))
        with torch.no_grad(), self.step_fn.autocast():
            sizes = self.method.model_inputs(distributed.unwrap(self.model))
            xs = [torch.zeros(1, inner.channels, *size, device=device) for size in sizes]
            zeros = torch.zeros(1, dtype=torch.long, device=device)
            fn(xs, torch.zeros(1, len(xs), device=device), inner.null_condition(1), zeros)

    def _loader(self) -> DataLoader:
        t, ctx = self.recipe.train, self.ctx
        where = (self.start, ctx.rank, ctx.world)
        drawn = DrawnBatches(
            self.dataset,
            functools.partial(self.method.objective_at, self.objective),
            self.step_fn.shapes,
            t.seed,
            self.recipe.model.class_dropout,
        )
        return DataLoader(
            drawn,
            # `DrawnBatches.__getitems__` takes each `BatchKey` whole, where torch expects a list of indices
            batch_sampler=cast(Sampler[list[Any]], StepBatches(len(self.dataset), t.batch_size, t.seed, *where)),
            num_workers=self.recipe.data.num_workers,
            pin_memory=ctx.device.type == "cuda",
            collate_fn=keep_batch,
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        t, ctx = self.recipe.train, self.ctx
        self.logs = RunLogs(self.run_dir, t.log_to, self.start, self.recipe.to_dict(), main=ctx.main)
        with self.logs:  # stats.jsonl (rank 0) and its mirrors; the final grid goes to them too
            with Progress(self.console, "train step", t.steps, self.start) as progress:
                batches = iter(self._loader())
                for step in range(self.start, t.steps):
                    wait = time.perf_counter()
                    self.method.on_step(step, distributed.unwrap(self.model), self.ema)
                    x, y, draws = next(batches)
                    x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                    wait = time.perf_counter() - wait
                    grad_norm, applied = self.step_fn(step, x, y, draws, self.interval)
                    self.interval.end_step(grad_norm if applied else 0.0, wait)
                    done = step + 1
                    if not applied:
                        self._skipped(done)
                    logged = done % t.log_every == 0 or done == t.steps
                    row = self._stats_row(done, step, logged)
                    self._hooks_and_previews(done, row)
                    if logged:
                        self.interval.reset()
                    if len(row) > 2:  # stats.jsonl (rank 0) and its mirrors
                        self.logs.scalars(done, row)
                    progress.update(completed=done, info=speed(self.last) if logged else None, log=logged)
                    if done % t.checkpoint_every == 0 or done == t.steps:
                        self._checkpoint(done)
            if self.start < t.steps or not list((self.run_dir / "samples").glob("grid.*")):
                self._grid(self.run_dir / "samples" / "grid", t.steps, "final")
        return self.last

    def _skipped(self, done: int) -> None:
        """The non-finite policy: count the skipped step, stop past `train.max_nonfinite_steps`."""
        self.nonfinite += 1
        limit = self.recipe.train.max_nonfinite_steps
        self.console.print(
            f"[yellow]step {done}: non-finite loss or gradient, step skipped ({self.nonfinite} so far)[/]"
        )
        if limit and self.nonfinite > limit:
            good = complete_checkpoints(self.run_dir)
            raise TrainingStopped(
                f"stopped at step {done}: {self.nonfinite} non-finite steps exceed train.max_nonfinite_steps = "
                f"{limit}; the last good checkpoint is "
                f"{good[-1] if good else 'none (no checkpoint was written yet)'}"
            )

    def _stats_row(self, done: int, step: int, logged: bool) -> dict:
        """The stats line of this step: its position, and on a log step the interval's summary."""
        t = self.recipe.train
        row = {"step": done, "images": done * t.batch_size}
        if not logged:
            return row
        self.last = {
            **row,
            "images_seen": done * t.batch_size,
            "lr": lr_at(t.lr, t.warmup_steps, step - self.method.lr_warmup_start(step)),
            "nonfinite_steps": self.nonfinite,
            **self.interval.summary(self.ctx, self.flops, self.peak),
        }
        return self.last

    def _hooks_and_previews(self, done: int, row: dict) -> None:
        """Periodic evaluation and preview grids; their time does not count as training speed."""
        t = self.recipe.train
        paused = time.perf_counter()
        for every, hook in self.hooks:
            if done % every == 0 or done == t.steps:
                row.update(hook(done, self.ema))
        if t.preview_every and done % t.preview_every == 0:
            self._grid(self.run_dir / "samples" / f"preview-{done:09d}", done, "preview")
        self.interval.exclude(time.perf_counter() - paused)

    def _checkpoint(self, step: int) -> None:
        t, ctx = self.recipe.train, self.ctx
        if not finite_weights(self.ema, ctx):
            good = complete_checkpoints(self.run_dir)
            raise TrainingStopped(
                f"step {step}: the EMA weights hold non-finite values, so no checkpoint was written; the last "
                f"good checkpoint is {good[-1] if good else 'none'}; lower train.lr or raise train.warmup_steps"
            )
        state = {
            "step": step,
            "images_seen": step * t.batch_size,
            "nonfinite_steps": self.nonfinite,
            "world_size": ctx.world,
            **self.info.to_state(),
            **({"init_from": self.init_source} if self.init_source else {}),
        }
        milestone = bool(t.milestone_every) and step % t.milestone_every == 0
        save_training_state(
            self.run_dir, step, self.model, self.ema, self.opt, state, self.recipe.to_toml(), t.keep_checkpoints,
            milestone, ctx,
        )  # fmt: skip

    def _grid(self, path: Path, step: int, tag: str) -> None:
        """The grid at `path`, and to the mirrors of `train.log_to` as `tag/grid`, with the
        clean estimate at the end of each stage as `tag/stage_K`."""
        mirrored = any(name != "jsonl" for name in self.recipe.train.log_to)  # the same on every rank
        images = sample_grid(
            self.recipe, self.method, self.ema, self.decomposition, path, self.info, self.ctx, self.captions,
            previews=mirrored,
        )  # fmt: skip
        for name, image in images.items():
            self.logs.image(step, f"{tag}/{name}", image)


def speed(last: dict) -> str:
    """The progress field of a log step.

    >>> speed({"loss": 0.51234, "images_per_s": 183.6, "mfu": None})
    'loss 0.5123  184 img/s'
    """
    mfu = f"  MFU {last['mfu']:.1%}" if last.get("mfu") is not None else ""
    return f"loss {last['loss']:.4f}  {last['images_per_s']:.0f} img/s{mfu}"


def finite_weights(module: torch.nn.Module, ctx: distributed.Context) -> bool:
    """Whether every parameter is finite on every rank (each rank checks its own shards)."""
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in module.parameters())
    return float(distributed.all_sum(ctx, torch.tensor([float(bad)]))) == 0


def data_level_statistics(recipe: Recipe, dataset: Any) -> dict:
    """Per-level statistics for `flow.standardize`: the store's own when they were computed
    for this decomposition, else measured on (up to 4096 items spread over) the data."""
    decomposition = base_decomposition(recipe)
    stored = stored_level_statistics(getattr(dataset, "index", {}), decomposition)
    if stored and stored.get("decomposition", "laplacian") == recipe.flow.decomposition:
        return stored
    return {**level_statistics(dataset, decomposition), "decomposition": recipe.flow.decomposition}


def sample_grid(
    recipe: Recipe,
    method: Method,
    ema: torch.nn.Module,
    decomposition: Decomposition,
    path: Path,
    info: RunInfo,
    ctx: distributed.Context,
    captions: TextCond | None = None,
    previews: bool = False,
) -> dict[str, np.ndarray]:
    """A grid with the recipe's sampler settings, one class per column (or, for a text run,
    one of `captions` per cell), decoded by the data's autoencoder: `path`.png for images,
    `path`.gif for video. Every rank samples (a sharded EMA needs them all); rank 0 writes.
    With `previews` (for the mirrors of `train.log_to`), rank 0 returns the grid as a uint8
    image (a video's first frame) as `grid` and each stage's clean estimate as `stage_K`."""
    s = recipe.sample
    classes = sampled_classes(recipe, info)
    columns = len(classes) if captions is None else int(len(captions) ** 0.5)
    ema.eval()
    labels = class_balanced_labels(s.n, classes) if captions is None else captions
    result = method.generate(
        ema, labels, decomposition, recipe.sampler_settings(), seed=recipe.train.seed, previews=previews
    )
    if not ctx.main:
        return {}
    decode = from_config(info.autoencoder, result.x.device).decode
    pixels = decode(result.x)
    nrow = columns if s.n % columns == 0 else None
    save_samples(pixels, path.with_suffix(".gif" if pixels.ndim == 5 else ".png"), nrow=nrow)
    if not previews:
        return {}
    shown = [pixels, *(decode(x) for x in result.previews)]
    names = ["grid", *(f"stage_{k}" for k in range(1, len(result.previews) + 1))]
    return {name: grid(x[:, :, 0] if x.ndim == 5 else x, nrow) for name, x in zip(names, shown)}
