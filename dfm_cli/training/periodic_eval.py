"""Evaluation during training (`train.eval_every`): metric against training images, in `stats.jsonl`.

Every `train.eval_every` steps (and at the last step) the EMA model generates
`train.eval_num` class-balanced samples with the recipe's sampler settings and the same
noise each time, so successive points differ only by the weights. They are scored with
`dfm eval`'s own functions against the run's training data: FID against (up to
`evaluate.REFERENCE_MAX` of) its images, and SWD against a fixed subset as large as the sample
set. The reference's Inception features go through `dfm eval`'s feature cache (keyed by the
images' content and the weights, `evaluation/reference_cache.py`): they are computed once, and a
resumed run, another run on the same data, `dfm eval` and a sweep's cells read the same entry.
The stats line gets `eval_fid` / `eval_swd` next to `step` and `images`, so a curve of metric
against training images is one read of the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from dfm_cli import distributed
from dfm_cli.config.method import Method
from dfm_cli.config.recipe import Recipe
from dfm_cli.data.autoencoders import from_config
from dfm_cli.data.checkpoints import RunInfo
from dfm_cli.data.datasets import build_dataset
from dfm_cli.errors import DfmError
from dfm_cli.evaluation import evaluate
from dfm_cli.evaluation.evaluate import reference_images
from dfm_cli.listing import evenly_spaced
from dfm_cli.media import as_rgb, to_uint8
from dfm_cli.method.decompose import Decomposition
from dfm_cli.method.sampler import class_balanced_labels, sampled_classes

METRICS = ("fid", "swd")
BATCH = 64


def swd_levels(size: int, patch: int = 7) -> int:
    """SWD's usual 3 pyramid levels, fewer when the coarsest would be smaller than a patch.

    >>> swd_levels(32), swd_levels(16), swd_levels(8)
    (3, 2, 1)
    """
    levels = 3
    while levels > 1 and size >> (levels - 1) < patch:
        levels -= 1
    return levels


class TrainingEvaluation:
    """The `(step, ema) -> {"eval_<metric>": value}` hook that `train` calls."""

    def __init__(
        self,
        recipe: Recipe,
        dataset,
        info: RunInfo,
        method: Method,
        decomposition: Decomposition,
        ctx: distributed.Context,
        run_dir: Path,
    ):
        t = recipe.train
        unknown = sorted(set(t.eval_metrics) - set(METRICS))
        if unknown or not t.eval_metrics:
            raise DfmError(f"train.eval_metrics = {t.eval_metrics!r}: choose from {', '.join(METRICS)}")
        if t.eval_num < 2:
            raise DfmError(f"train.eval_num = {t.eval_num}: needs at least 2 samples per evaluation")
        images_of = dataset  # what FID compares with: the training images
        if recipe.data.name == "store":  # a store of built-in data compares with the images it encoded
            index = getattr(dataset, "index", {})
            if index.get("source") not in evaluate.DATASETS:
                raise DfmError(
                    "train.eval_every: the training data is a latent store of your own images, which "
                    "holds no pixels to compare with; set train.eval_every = 0 and evaluate with "
                    "`dfm sample --num` and `dfm eval --ref SOURCE`"
                )
            images_of = build_dataset(index["source"], "", index["resolution"])
        self.recipe, self.info, self.decomposition, self.ctx = recipe, info, decomposition, ctx
        self.method = method
        self.request = evaluate.Request(fid="fid" in t.eval_metrics, device=ctx.device)
        if self.request.fid:  # fail now, not after the first thousand steps
            from dfm_cli.evaluation.features import resolve_inception_weights

            resolve_inception_weights(None)
        self.reference = None
        if ctx.main:
            if t.eval_reference_num:  # the same images as `dfm ablate`'s reference_num: one cache entry
                images = reference_images(images_of, t.eval_reference_num)
                self.reference = evaluate.Source(f"{t.eval_reference_num} training images", images)
            elif recipe.data.name in evaluate.DATASETS and not recipe.data.classes:  # as `dfm eval --ref NAME`
                self.reference = evaluate.load_source(recipe.data.name, recipe.data.resolution)
            elif images_of is not dataset:
                self.reference = evaluate.load_source(index["source"], index["resolution"])
            else:
                self.reference = evaluate.Source(f"{run_dir} training data", reference_images(dataset))
            ref = self.reference.images
            assert ref is not None  # every reference above holds images, not only statistics
            self.swd_reference = evaluate.Source("training data (SWD subset)", ref[evenly_spaced(len(ref), t.eval_num)])

    @torch.no_grad()
    def samples(self, ema: torch.nn.Module) -> np.ndarray:
        """`eval_num` samples, uint8 channels-last; every rank generates (a sharded EMA needs all)."""
        num = self.recipe.train.eval_num
        settings = self.recipe.sampler_settings()
        ema.eval()
        decode = from_config(self.info.autoencoder, self.ctx.device).decode
        out = []
        for first in range(0, num, BATCH):
            labels = class_balanced_labels(num, sampled_classes(self.recipe, self.info))[first : first + BATCH]
            result = self.method.generate(
                ema, labels, self.decomposition, settings, seed=self.recipe.train.seed, first_index=first
            )
            out.append(to_uint8(decode(result.x)))
        return as_rgb(np.concatenate(out))

    def __call__(self, step: int, ema: torch.nn.Module) -> dict[str, float]:
        images = self.samples(ema)
        if not self.ctx.main:
            return {}
        generated = evaluate.Source(f"samples at step {step}", images)
        row: dict[str, float] = {}
        quiet = Progress(disable=True)
        if self.request.fid:
            found, _ = evaluate.evaluate(generated, self.reference, self.request, quiet)
            row["eval_fid"] = found["fid"] if "fid" in found else found["frame_fid"]  # video: per-frame FID
        if "swd" in self.recipe.train.eval_metrics:
            found, _ = evaluate.evaluate(
                generated,
                self.swd_reference,
                evaluate.Request(swd=True, swd_levels=swd_levels(min(images.shape[-3:-1])), device=self.ctx.device),
                quiet,
            )
            row["eval_swd"] = found["swd"]
        return row
