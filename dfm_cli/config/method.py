"""The `Method` interface: everything that differs between generation methods.

`dfm` trains one model on every level of a decomposition and samples progressively (Flow
Matching is `dfm` with one level). The baselines, Pyramidal Flow and the Cascade, differ in
what they train on, what they build, how they sample and what their compute costs. Each one
is a `Method` in its own module of `dfm_cli/methods/`, registered below by name, and chosen
by the recipe key `flow.method`. The training loop, the sampler front-end, the compute
accounting and the recipe checks call the interface and never branch on the method's name.

Adding a method is one module with a `Method` subclass plus one line in `METHODS` (or a
call to `register` from your own code); docs/method.md §8 walks through an example.

The registry names implementations by import path rather than importing them: they build
models and samplers from the recipe, so they sit above this layer (see docs/architecture.md).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, cast

import torch
from torch import nn

from dfm_cli.config.schema import Recipe
from dfm_cli.errors import DfmError, suggest
from dfm_cli.method.cond import Cond
from dfm_cli.method.decompose import Decomposition
from dfm_cli.method.flow import FlowObjective
from dfm_cli.method.sampler import (
    COND_NOISE,
    GuidedVelocity,
    LevelModel,
    SampleResult,
    SamplerSettings,
    guided_velocity,
)

Fail = Callable[[str, Any, str], NoReturn]
"""`fail(key, value, why)`: refuses a recipe, naming the key, its value and the fix."""

# Keys that may change between a run and its resumption without changing what is learned.
RESUMABLE_CHANGES = frozenset(
    {
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
        "train.log_to",
    }
)


@dataclass(frozen=True)
class SamplingJob:
    """One batch to sample: the model, its conditions (on its device), what recomposes its
    levels, the sampler settings, and the batch's place in the seed's sample stream."""

    model: nn.Module
    labels: Cond
    decomposition: Decomposition
    settings: SamplerSettings
    seed: int
    first_index: int = 0
    previews: bool = False

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def indices(self) -> range:
        return range(self.first_index, self.first_index + len(self.labels))

    def guided(self) -> GuidedVelocity:
        """The model's velocity with the settings' classifier-free guidance."""
        return guided_velocity(self.model, self.settings)

    def result(self, x: torch.Tensor, nfe: int) -> SampleResult:
        """A sampler's output with its model calls (each doubled by guidance when cfg != 1)."""
        return SampleResult(x=x, nfe=nfe, guided_nfe=nfe if self.settings.cfg != 1.0 else 0)


class Method(ABC):
    """One generation method, bound to a validated recipe.

    Subclasses set `name` and implement the abstract methods; the others have the defaults
    that suit a method with one model trained the same way at every step.
    """

    name: ClassVar[str]
    # keys the method does not use, with the value they must keep (anything else is refused,
    # so that an ablation over such a key cannot silently measure nothing)
    unused_keys: ClassVar[dict[str, Any]] = {}
    unused_why: ClassVar[str] = ""  # what the method is instead, for the refusal's message
    # keys added with a default other than what the method's runs did before them, with that
    # earlier value: a run's saved recipe.toml that lacks one reads it (`load_run_recipe`)
    earlier_defaults: ClassVar[dict[str, Any]] = {}
    # keys that may change on resume (see RESUMABLE_CHANGES)
    resumable_changes: ClassVar[frozenset[str]] = RESUMABLE_CHANGES

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    # ------------------------------------------------------------------ recipe keys
    @classmethod
    def check(cls, recipe: Recipe, fail: Fail) -> None:
        """Refuse what this method cannot take. The default refuses the `unused_keys` that
        differ from their value; subclasses add their own ranges."""
        values = recipe.to_dict()
        for key, default in cls.unused_keys.items():
            section, name = key.split(".")
            value = values[section][name]
            if value != default:
                why = f" ({cls.unused_why})" if cls.unused_why else ""
                fail(key, value, f"is not used by flow.method = '{cls.name}'{why}; leave it at {default!r}")

    # ------------------------------------------------------------------ building
    @abstractmethod
    def decomposition(self, level_stats: dict | None = None) -> Decomposition:
        """What a training batch is split into, and what samples are put back together with."""

    @abstractmethod
    def build_model(
        self, shape: tuple[int, ...], num_classes: int, level_rms: list[float] | None = None, text: dict | None = None
    ) -> nn.Module:
        """The network for data of shape `C [T] H W`; `text` (a caption encoder record with
        `dims`) makes it text-conditioned, `level_rms` preconditions it per level."""

    @abstractmethod
    def objective(self) -> FlowObjective:
        """The training objective: it draws each batch's stages, times and noise, and gives the loss."""

    def objective_at(self, objective: FlowObjective, step: int) -> FlowObjective:
        """The objective that draws the batch of training step `step` (the same at every step
        unless the method trains in phases)."""
        return objective

    # ------------------------------------------------------------------ sampling
    def generate(
        self,
        model: nn.Module,
        labels: Cond,
        decomposition: Decomposition,
        settings: SamplerSettings,
        *,
        seed: int,
        first_index: int = 0,
        previews: bool = False,
    ) -> SampleResult:
        """Samples for `labels`; sample j is sample `first_index + j` of the seed, so an image
        depends only on its index."""
        device = next(model.parameters()).device
        job = SamplingJob(model, labels.to(device), decomposition, settings, seed, first_index, previews)
        return self.sample(job)

    @abstractmethod
    def sample(self, job: SamplingJob) -> SampleResult:
        """The method's sampler, on one batch (`generate` prepares it)."""

    def model_inputs(self, model: nn.Module) -> list[tuple[int, ...]]:
        """The sizes of the tensors the model's forward takes (for timing and compile probes)."""
        return list(cast(LevelModel, model).level_sizes)

    # ------------------------------------------------------------------ compute
    @abstractmethod
    def forward_flops(self, model: nn.Module) -> float:
        """Forward FLOPs per training image, averaged over what training feeds the model."""

    # ------------------------------------------------------------------ training
    def on_step(self, step: int, model: nn.Module, ema: nn.Module) -> None:
        """Called before training step `step` (0-based) on the unwrapped model and its EMA."""
        return None

    def ema_warmup_start(self, step: int) -> int:
        """The step the EMA's warm-up counts from at `step` (a method that starts a new model
        mid-run restarts it)."""
        return 0

    def lr_warmup_start(self, step: int) -> int:
        """The step the learning rate's warm-up (`train.warmup_steps`) counts from at `step` (a
        method that starts a new model mid-run restarts it)."""
        return 0

    def ema_frozen(self, step: int) -> tuple[str, ...]:
        """Prefixes of the names of the parameters whose EMA stays as it is at `step` (a model
        that no longer trains keeps the EMA it had); none by default."""
        return ()


METHODS: dict[str, str] = {
    "dfm": "dfm_cli.methods.dfm:DFM",
    "pyramidal": "dfm_cli.methods.pyramidal:PyramidalFlow",
    "cascaded": "dfm_cli.methods.cascaded:Cascaded",
}


def register(name: str, target: str) -> None:
    """Make `flow.method = name` use the `Method` subclass at `target` (`module:Class`)."""
    METHODS[name] = target


def method_choices(name: str) -> str:
    """What to write instead of an unknown method `name`."""
    *first, last = (f"'{n}'" for n in METHODS)
    choices = f"{', '.join(first)} or {last}".replace("'dfm'", "'dfm' (FM with flow.levels = 1)")
    return f"choose {choices}{suggest(name, METHODS)}"


def method_class(name: str) -> type[Method]:
    """The implementation of `flow.method = name`."""
    if name not in METHODS:
        raise DfmError(f"flow.method = {name!r}: {method_choices(name)}")
    module, _, attr = METHODS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise DfmError(f"flow.method = {name!r}: {METHODS[name]} is not a dfm Method")
    return cls


def method_of(recipe: Recipe) -> Method:
    """The recipe's method, bound to it."""
    return method_class(recipe.flow.method)(recipe)


def refuse_cond_noise(name: str, settings: SamplerSettings) -> None:
    """`--cond-noise` is the cascade's: no other method has a conditioning image to noise."""
    if settings.cond_noise != COND_NOISE:
        raise DfmError(
            f"--cond-noise {settings.cond_noise:g}: is not used by flow.method = '{name}' "
            "(it sets the cascade's conditioning noise)"
        )
