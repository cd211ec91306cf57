"""Finding a trained run and loading it for sampling: the newest run, checked weights, a digest.

`dfm sample` and `dfm eval` act on the run the user just trained when none is named, so the
usage lines `dfm train RECIPE && dfm sample` work as typed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from dfm_cli.config.method import Method, method_of
from dfm_cli.config.recipe import Recipe
from dfm_cli.data.autoencoders import from_config
from dfm_cli.data.checkpoints import STATE, RunInfo, complete_checkpoints, resolve_checkpoint
from dfm_cli.errors import DfmError
from dfm_cli.method.cond import Cond
from dfm_cli.method.decompose import Decomposition
from dfm_cli.method.sampler import LevelModel, SampleResult, SamplerSettings
from dfm_cli.methods.factory import load_trained

RUNS = Path("runs")


def newest_run(root: Path = RUNS) -> Path:
    """The run folder under `root` whose latest complete checkpoint was written last."""
    found = []
    if root.is_dir():
        for run in root.iterdir():
            ckpts = complete_checkpoints(run) if run.is_dir() else []
            if ckpts:
                found.append(((ckpts[-1] / STATE).stat().st_mtime_ns, str(run), run))
    if not found:
        raise DfmError(
            f"no trained run under {root}/: train one (dfm train recipes/quickstart.toml) or name a run folder"
        )
    return max(found)[2]


class VideoModel(LevelModel, Protocol):
    """A sampled model also says whether it makes clips (every method's network does)."""

    @property
    def video(self) -> bool: ...


@dataclass(frozen=True)
class TrainedRun:
    """A model ready to sample, and where its weights came from."""

    checkpoint: Path
    weights: Path
    ema: bool
    model: torch.nn.Module
    recipe: Recipe
    info: RunInfo

    @property
    def video(self) -> bool:
        """Whether the model makes clips (`C T H W` samples) rather than images."""
        return cast(VideoModel, self.model).video

    @functools.cached_property
    def method(self) -> Method:
        return method_of(self.recipe)

    @functools.cached_property
    def decomposition(self) -> Decomposition:
        """What the model's levels recompose with (standardized with the run's statistics)."""
        return self.method.decomposition(self.info.level_stats)

    @property
    def settings(self) -> SamplerSettings:
        """The recipe's `[sample]` settings, what `dfm sample RUN` uses without flags; for
        others, `recipe.sampler_settings(cfg=..., steps=[...])`."""
        return self.recipe.sampler_settings()

    def generate(
        self,
        labels: Cond,
        settings: SamplerSettings | None = None,
        *,
        seed: int,
        first_index: int = 0,
        previews: bool = False,
    ) -> SampleResult:
        """The run's samples for `labels`, the way its method samples (see `Method.generate`),
        with `settings` (default: the recipe's)."""
        return self.method.generate(
            self.model,
            labels,
            self.decomposition,
            settings or self.settings,
            seed=seed,
            first_index=first_index,
            previews=previews,
        )

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples (latents, for a run trained on a store) as images in [-1, 1], through the
        autoencoder the run records (loaded once, on the model's device)."""
        return self._autoencoder.decode(x)

    @functools.cached_property
    def _autoencoder(self) -> Any:
        return from_config(self.info.autoencoder, next(self.model.parameters()).device)


def load_for_sampling(path: Path, ema: bool = True, verify: bool = True) -> TrainedRun:
    """Load a run folder or checkpoint (with `verify`, its weights checked against the SHA-256
    recorded when it was written); refuse weights that hold NaN or inf, which would otherwise
    sample a blank grid and exit 0."""
    ckpt = resolve_checkpoint(path)
    model, recipe, info = load_trained(ckpt, ema=ema, verify=verify)
    weights = ckpt / f"{'ema' if ema else 'model'}.safetensors"
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        hint = "sample the raw weights with --no-ema, or " if ema else ""
        raise DfmError(
            f"{weights}: {len(bad)} tensors hold NaN or inf (first: {bad[0]}); "
            f"{hint}an earlier checkpoint under {ckpt.parent}"
        )
    return TrainedRun(ckpt, weights, ema, model, recipe, info)
