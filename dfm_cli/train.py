"""The training loop: a run is a folder, and running the same command again resumes it.

Everything random in a step (stage, timesteps, noise, label dropout) comes from a generator
seeded by `(seed, step)`, and the data order is a function of `(seed, position)`. Resuming
from a checkpoint at step k therefore replays exactly what an uninterrupted run would have
done, with only the weights, the EMA and the optimizer state to restore.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from dfm_cli.checkpoint import (
    complete_checkpoints,
    load_checkpoint,
    optimizer_state,
    optimizer_tensors,
    save_checkpoint,
)
from dfm_cli.data import StreamBatches, build_dataset
from dfm_cli.errors import DfmError
from dfm_cli.factory import build_model, build_objective, build_pyramid, pick_device
from dfm_cli.flow import drop_labels
from dfm_cli.media import save_grid
from dfm_cli.recipe import Recipe, load_recipe
from dfm_cli.sampler import generate
from dfm_cli.seeding import MODEL_INIT, STEP_NOISE, mix_seed

T_BINS = 5  # per-t-bin loss of the active level, minRF-style
# Keys that may change between a run and its resumption without changing what is learned.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "data.num_workers"}


def lr_at(recipe: Recipe, step: int) -> float:
    t = recipe.train
    return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr


def ema_decay_at(recipe: Recipe, step: int) -> float:
    """EMA decay with a warm-up, so short runs are not dominated by the random init."""
    return min(recipe.train.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def train_step(recipe: Recipe, step: int, model, ema, opt, objective, pyramid,
               x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """One optimizer step on a clean batch; all randomness is seeded by (seed, step)."""
    t = recipe.train
    gen = torch.Generator().manual_seed(mix_seed(t.seed, STEP_NOISE, step))
    y = drop_labels(y, recipe.model.class_dropout, model.null_class, gen)
    out = objective.loss(model, pyramid.decompose(x), y, gen)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
    for group in opt.param_groups:
        group["lr"] = lr_at(recipe, step)
    opt.step()
    update_ema(ema, model, ema_decay_at(recipe, step))
    return out, grad_norm


def check_resumable(run_dir: Path, recipe: Recipe) -> None:
    """Refuse to continue a run with a recipe that would change what it learns."""
    old_path = run_dir / "recipe.toml"
    if not old_path.is_file():
        return
    old, new = load_recipe(old_path).to_dict(), recipe.to_dict()
    for section, body in new.items():
        for key, value in body.items():
            name = f"{section}.{key}"
            if name not in RESUMABLE_CHANGES and old[section].get(key) != value:
                raise DfmError(
                    f"{run_dir} was trained with {name} = {old[section].get(key)!r}, not {value!r}; "
                    "use a new --out folder, or the run's own recipe.toml to continue it"
                )


@dataclass
class Interval:
    """Loss statistics accumulated between two log lines."""

    levels: int

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.images, self.start = 0.0, 0, 0, time.perf_counter()
        self.level_sum = torch.zeros(self.levels, dtype=torch.float64)
        self.level_n = torch.zeros(self.levels, dtype=torch.float64)
        self.bin_sum = torch.zeros(T_BINS, dtype=torch.float64)
        self.bin_n = torch.zeros(T_BINS, dtype=torch.float64)
        self.grad_norm = 0.0

    def add(self, out: dict[str, torch.Tensor], grad_norm: float) -> None:
        mse, active = out["level_mse"].detach().double().cpu(), out["active"].cpu()
        self.loss += float(out["loss"].detach())
        self.grad_norm += grad_norm
        self.steps += 1
        self.images += mse.shape[0]
        self.level_sum += (mse * active).sum(0)
        self.level_n += active.sum(0)
        stage = out["stage"].cpu()
        t_active = out["t"].cpu().double().gather(1, stage[:, None])[:, 0]
        bins = (t_active * T_BINS).long().clamp(max=T_BINS - 1)
        own = mse.gather(1, stage[:, None])[:, 0]
        self.bin_sum.index_add_(0, bins, own)
        self.bin_n.index_add_(0, bins, torch.ones_like(own))

    def summary(self) -> dict[str, float | None]:
        elapsed = time.perf_counter() - self.start
        per = lambda s, n: [round(float(a / b), 6) if b else None for a, b in zip(s, n)]  # noqa: E731
        return {
            "loss": self.loss / self.steps,
            "loss_level": per(self.level_sum, self.level_n),
            "loss_t_bin": per(self.bin_sum, self.bin_n),
            "grad_norm": self.grad_norm / self.steps,
            "images_per_s": self.images / elapsed,
            "step_time_s": elapsed / self.steps,
        }


def train(recipe: Recipe, run_dir: Path, console: Console | None = None) -> dict:
    """Train (or resume) the run in `run_dir`; returns the last stats line."""
    console = console or Console(stderr=True)
    device = pick_device()
    t = recipe.train
    check_resumable(run_dir, recipe)
    dataset = build_dataset(recipe.data.name, recipe.data.path, recipe.data.resolution)
    pyramid = build_pyramid(recipe)
    objective = build_objective(recipe)
    torch.manual_seed(mix_seed(t.seed, MODEL_INIT, 0))
    model = build_model(recipe, dataset.channels, dataset.num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                            weight_decay=t.weight_decay)
    facts = {"channels": dataset.channels, "num_classes": dataset.num_classes,
             "class_names": list(dataset.class_names)}
    start = 0
    found = complete_checkpoints(run_dir)
    if found:
        weights, state = load_checkpoint(found[-1], ("model", "ema", "optimizer"))
        model.load_state_dict(weights["model"])
        ema.load_state_dict(weights["ema"])
        opt.load_state_dict(optimizer_state(weights["optimizer"], state["param_groups"]))
        start = state["step"]
        console.print(f"resuming {run_dir} from step {start} ({found[-1].name})")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(recipe.to_toml())

    loader = DataLoader(dataset, batch_sampler=StreamBatches(len(dataset), t.batch_size, t.seed, start), num_workers=recipe.data.num_workers,
                        collate_fn=_as_batch if hasattr(dataset, "__getitems__") else None)
    stats_path = run_dir / "stats.jsonl"
    interval = Interval(recipe.flow.levels)
    last: dict = {}

    def checkpoint(step: int) -> None:
        opt_tensors, groups = optimizer_tensors(opt.state_dict())
        state = {"step": step, "images_seen": step * t.batch_size, "param_groups": groups, **facts}
        save_checkpoint(run_dir, step, {"model": model.state_dict(), "ema": ema.state_dict(),
                        "optimizer": opt_tensors}, state, recipe.to_toml(), t.keep_checkpoints)

    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                        transient=False)
    with progress, stats_path.open("a") as stats_file:
        task = progress.add_task("train", total=t.steps, completed=start, info="")
        batches = iter(loader)
        for step in range(start, t.steps):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out, grad_norm = train_step(recipe, step, model, ema, opt, objective, pyramid, x, y)
            interval.add(out, grad_norm)
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                last = {"step": done, "images_seen": done * t.batch_size,
                        "lr": lr_at(recipe, step), **interval.summary()}
                stats_file.write(json.dumps(last) + "\n")
                stats_file.flush()
                interval.reset()
                progress.update(task, info=f"loss {last['loss']:.4f}  {last['images_per_s']:.0f} img/s")
            progress.update(task, completed=done)
            if done % t.checkpoint_every == 0 or done == t.steps:
                checkpoint(done)
    if start < t.steps or not (run_dir / "samples" / "grid.png").exists():
        sample_grid(recipe, ema, pyramid, run_dir / "samples" / "grid.png", dataset.num_classes)
    return last


def _as_batch(batch):
    """In-memory datasets return whole batches from `__getitems__`; nothing to collate."""
    return batch


def class_balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def sample_grid(recipe: Recipe, model: torch.nn.Module, pyramid, path: Path, num_classes: int) -> Path:
    """The end-of-training grid: one class per column, with the recipe's sampler settings."""
    s = recipe.sample
    model.eval()
    result = generate(model, class_balanced_labels(s.n, num_classes), s.steps, s.tau, pyramid,
                      cfg=s.cfg, interval=tuple(s.guidance_interval), solver=s.solver,
                      seed=recipe.train.seed)
    return save_grid(result.x, path, nrow=num_classes if s.n % num_classes == 0 else None, scale=2)
