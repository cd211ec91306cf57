"""Training an autoencoder with `dfm train` (`model.kind = "autoencoder"`), so that a laptop has
a latent space to run DFM in, as the paper always does.

The model is a diffusers `AutoencoderKL`, so the result loads wherever one does:
`dfm encode --ae kl --ae-weights RUN/autoencoder`. The run folder works like a DiT run's:
seeded batches, atomic checkpoints with weights, EMA and optimizer, and running the same
command again resumes (or, when finished, does nothing). At the end, the EMA weights are
exported with the latent statistics measured on the data (`scaling_factor` = 1 / std,
`shift_factor` = mean, the FLUX convention), and `report.json` gives the reconstruction PSNR
and the scale-equivariance scores.

`ae.scale_equivariance = true` adds the loss of `ae_losses.scale_equivariance_loss` at a
factor drawn per step from `ae.se_factors`; with `train.init_from` naming a trained
autoencoder, that is the paper's finetune.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from dfm_cli import distributed
from dfm_cli.config.recipe import Recipe
from dfm_cli.data import checkpoints
from dfm_cli.data.autoencoders import DiffusersAE
from dfm_cli.data.datasets import build_dataset
from dfm_cli.errors import DfmError, import_diffusers
from dfm_cli.listing import evenly_spaced
from dfm_cli.media import save_samples
from dfm_cli.method.level_report import analyse
from dfm_cli.methods.factory import base_decomposition
from dfm_cli.progress import Progress
from dfm_cli.seeding import MODEL_INIT, SAMPLE_DRAWS, mix_seed
from dfm_cli.training.autoencoder_losses import downsample, reconstruction_loss, scale_equivariance_loss
from dfm_cli.training.batches import StreamBatches
from dfm_cli.training.loggers import RunLogs, require
from dfm_cli.training.resume import check_resumable
from dfm_cli.training.schedules import ema_decay_at, lr_at, update_ema

EXPORT = "autoencoder"  # the diffusers folder inside the run: what --ae-weights takes
REPORT = "report.json"
REPORT_NUM = 1000  # evenly spaced training images for the final PSNR and equivariance


def build_vae(recipe: Recipe, channels: int):
    """A fresh `AutoencoderKL` from `[ae]`, or the one `train.init_from` names (checked to match)."""
    diffusers = import_diffusers("model.kind = 'autoencoder'")
    AutoencoderKL = diffusers.AutoencoderKL

    a = recipe.ae
    n = len(a.block_out_channels)
    config = dict(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(a.block_out_channels),
        layers_per_block=a.layers_per_block,
        latent_channels=a.latent_channels,
        norm_num_groups=math.gcd(32, *a.block_out_channels),
        sample_size=recipe.data.resolution,
        scaling_factor=1.0,
        shift_factor=0.0,
        mid_block_add_attention=a.mid_attention,
    )
    if not recipe.train.init_from:
        torch.manual_seed(mix_seed(recipe.train.seed, MODEL_INIT, 0))
        return AutoencoderKL(**config)
    folder = exported_folder(recipe.train.init_from)
    diffusers.utils.logging.set_verbosity_error()  # loading advice (accelerate) is noise to our users
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True)  # no pickle
    for key in ("in_channels", "block_out_channels", "layers_per_block", "latent_channels", "mid_block_add_attention"):
        have, want = vae.config[key], config[key]
        if (list(have) if isinstance(have, (list, tuple)) else have) != (
            list(want) if isinstance(want, tuple) else want
        ):
            raise DfmError(
                f"train.init_from = {recipe.train.init_from!r}: its {key} is {have!r}, but this recipe "
                f"asks for {want!r}; make the [ae] section match the autoencoder you start from"
            )
    return vae


def exported_folder(path: str | Path) -> Path:
    """An autoencoder run folder or its exported diffusers folder → the diffusers folder."""
    p = Path(path)
    for candidate in (p, p / EXPORT):
        if (candidate / "config.json").is_file():
            return candidate
    raise DfmError(
        f"train.init_from = '{path}': no autoencoder there; pass a run folder written by "
        f"`dfm train` with model.kind = 'autoencoder' (or its {EXPORT}/ folder)"
    )


def step_loss(vae, recipe: Recipe, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """The losses of one step; the posterior noise and the equivariance factor are seeded by
    `(seed, step)`, so a resumed run draws what an uninterrupted one would."""
    a = recipe.ae
    g = torch.Generator().manual_seed(mix_seed(recipe.train.seed, SAMPLE_DRAWS, step))
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(x.device)
    rec = vae.decode(z).sample
    out = {"rec": reconstruction_loss(rec, x, a.pyramid_weight), "kl": posterior.kl().mean()}
    loss = out["rec"] + a.kl_weight * out["kl"]
    if a.scale_equivariance:
        factor = a.se_factors[int(torch.randint(len(a.se_factors), (), generator=g))]
        out["se"] = scale_equivariance_loss(None, lambda v: vae.decode(v).sample, x, factor, a.pyramid_weight, z=z)
        loss = loss + a.se_weight * out["se"]
    out["loss"] = loss
    out["psnr"] = psnr(rec.detach(), x).mean()
    return out


def psnr(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2).

    >>> round(float(psnr(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.2))[0]), 2)
    20.0
    """
    mse = (x.clamp(-1, 1) - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp_min(1e-12))


def train_autoencoder(recipe: Recipe, run_dir: Path, console: Console | None = None) -> dict:
    """Train (or resume) the autoencoder run in `run_dir`, then export it; returns the report."""
    console = console or Console(stderr=True)
    t = recipe.train
    ctx = distributed.init()
    if ctx.world > 1:
        raise DfmError("an autoencoder trains in one process; run `dfm train` without torchrun")
    try:
        require(t.log_to)  # a missing TensorBoard or W&B stops the run before any work
        with checkpoints.run_lock(run_dir):
            found = checkpoints.complete_checkpoints(run_dir)
            check_resumable(run_dir, recipe, found[-1] if found else None)
            dataset = build_dataset(
                recipe.data.name,
                recipe.data.path,
                recipe.data.resolution,
                strict=recipe.data.strict,
                classes=recipe.data.classes,
            )
            vae = build_vae(recipe, dataset.channels).to(ctx.device).train()
            ema = copy.deepcopy(vae).requires_grad_(False).eval()
            beta1, beta2 = t.betas  # config.checks: exactly two
            opt = torch.optim.AdamW(
                vae.parameters(), lr=t.lr, betas=(beta1, beta2), eps=t.eps, weight_decay=t.weight_decay
            )
            start = 0
            if found:
                start = checkpoints.load_training_state(found[-1], vae, ema, opt, ctx)["step"]
                console.print(f"resuming {run_dir} from step {start} ({found[-1].name})")
            checkpoints.truncate_stats(run_dir / "stats.jsonl", start)
            (run_dir / "recipe.toml").write_text(recipe.to_toml())
            info = checkpoints.RunInfo(
                tuple(dataset.shape),
                dataset.num_classes,
                tuple(dataset.class_names),
                {"name": "pixel", "channels": dataset.channels},
            )
            batches = iter(StreamBatches(len(dataset), t.batch_size, t.seed, start))
            began = time.perf_counter()
            sums: dict[str, float] = {}
            progress = Progress(console, "train step", t.steps, start)
            with RunLogs(run_dir, t.log_to, start, recipe.to_dict()) as logs:  # stats.jsonl and its mirrors
                with progress:
                    for step in range(start, t.steps):
                        x = gather(dataset, next(batches)).to(ctx.device)
                        out = step_loss(vae, recipe, x, step)
                        out["loss"].backward()
                        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), t.grad_clip)
                        if not torch.isfinite(grad_norm):
                            raise DfmError(f"step {step + 1}: non-finite gradient; lower train.lr or ae.kl_weight")
                        for group in opt.param_groups:
                            group["lr"] = lr_at(recipe.train.lr, recipe.train.warmup_steps, step)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        update_ema(ema, vae, ema_decay_at(recipe.train.ema_decay, step))
                        for k, v in out.items():
                            sums[k] = sums.get(k, 0.0) + float(v.detach())
                        done = step + 1
                        if done % t.log_every == 0 or done == t.steps:
                            n = t.log_every if done % t.log_every == 0 else done % t.log_every
                            row = {"step": done, "images": done * t.batch_size, **{k: v / n for k, v in sums.items()}}
                            logs.scalars(done, row)
                            sums = {}
                            speed = (done - start) * t.batch_size / (time.perf_counter() - began)
                            shown = f"loss {row['loss']:.4f}  {speed:.0f} img/s  psnr {row['psnr']:.2f} dB"
                            progress.update(completed=done, info=shown, log=True)
                        else:
                            progress.update(completed=done)
                        if done % t.checkpoint_every == 0 or done == t.steps:
                            state = {
                                "step": done,
                                "images_seen": done * t.batch_size,
                                "model_kind": "autoencoder",
                                **info.to_state(),
                            }
                            checkpoints.save_training_state(
                                run_dir,
                                done,
                                vae,
                                ema,
                                opt,
                                state,
                                recipe.to_toml(),
                                t.keep_checkpoints,
                                bool(t.milestone_every) and done % t.milestone_every == 0,
                                ctx,
                            )
                if start < t.steps or not (run_dir / REPORT).is_file():
                    export(recipe, ema, dataset, run_dir)
                    logs.image(t.steps, "final/reconstruction", run_dir / "samples" / "reconstruction.png")
            return json.loads((run_dir / REPORT).read_text())
    finally:
        distributed.shutdown(ctx)


def evenly_spaced_images(dataset, num: int) -> torch.Tensor:
    """`num` images spread over the whole (often class-sorted) set, so every class is in."""
    return gather(dataset, evenly_spaced(len(dataset), num).tolist())


def gather(dataset, indices: list[int]) -> torch.Tensor:
    """The images (not labels) at `indices`, as one batch."""
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)[0]
    return torch.stack([dataset[i][0] for i in indices])


@torch.no_grad()
def latent_statistics(vae, images: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """(mean, std) of the posterior-mean latents of `images`, over every value."""
    z = torch.cat(
        [vae.encode(images[i : i + batch].to(vae.device)).latent_dist.mean.cpu() for i in range(0, len(images), batch)]
    )
    return float(z.mean()), float(z.std())


def export(recipe: Recipe, ema, dataset, run_dir: Path) -> None:
    """Write `run_dir/autoencoder` (diffusers, with the data's latent scale and shift) and the report."""
    shift, std = latent_statistics(ema, evenly_spaced_images(dataset, recipe.ae.stats_num))
    ema.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    tmp, final = run_dir / f".{EXPORT}-tmp", run_dir / EXPORT
    shutil.rmtree(tmp, ignore_errors=True)
    ema.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    report = autoencoder_report(recipe, final, evenly_spaced_images(dataset, REPORT_NUM))
    (run_dir / REPORT).write_text(json.dumps(report, indent=1))
    x = evenly_spaced_images(dataset, 16)
    coder = DiffusersAE("kl", str(final))
    save_samples(torch.cat([x, coder.decode(coder.encode(x))]), run_dir / "samples" / "reconstruction.png", nrow=16)


@torch.no_grad()
def autoencoder_report(recipe: Recipe, folder: Path, images: torch.Tensor) -> dict:
    """Round-trip PSNR through the exported folder (loaded the way `dfm encode --ae kl` loads
    it), the per-level energy equivariance score of `dfm decompose --ae` under the recipe's
    decomposition, and the scale-equivariance loss at each of `ae.se_factors`."""
    coder = DiffusersAE("kl", str(folder))
    rec = torch.cat([coder.decode(coder.encode(images[i : i + 250])) for i in range(0, len(images), 250)])
    split = base_decomposition(recipe)
    score = analyse(images, split, lambda v: torch.cat([coder.encode(v[i : i + 250]) for i in range(0, len(v), 250)]))
    vae = coder.vae
    se = {
        str(f): float(
            scale_equivariance_loss(
                lambda v: vae.encode(v).latent_dist.mean, lambda v: vae.decode(v).sample.clamp(-1, 1), images[:250], f
            )
        )
        for f in recipe.ae.se_factors
    }
    se_psnr = {
        str(f): float(
            psnr(
                vae.decode(downsample(vae.encode(images[:250]).latent_dist.mean, f)).sample, downsample(images[:250], f)
            ).mean()
        )
        for f in recipe.ae.se_factors
    }
    return {
        "psnr": float(psnr(rec, images).mean()),
        "images": len(images),
        "equivariance": score.equivariance,
        "image_shares": score.shares,
        "latent_shares": score.latent_shares,
        "se_l1": se,
        "se_psnr": se_psnr,
        "scaling_factor": coder.scale,
        "shift_factor": coder.shift,
        "latent_shape": list(coder.latent_shape(tuple(images.shape[1:]))),
        "weights": str(folder),
    }
