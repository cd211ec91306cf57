"""Recipe checks: each key's own range, and the keys' consistency with each other.

`recipe.load_recipe` reads and types a recipe; `validate` then fills in the derived
defaults (`p_stage`, broadcast factors and tau) and refuses, before anything runs, any value
that would fail later, naming the key, its value and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from dfm_cli.config.method import method_choices, method_class
from dfm_cli.config.schema import SECTIONS, DataSection, Recipe
from dfm_cli.data.datasets import BUILTIN, DATA_NAMES
from dfm_cli.errors import DfmError, suggest
from dfm_cli.method.decompose import DECOMPOSITIONS, build_decomposition
from dfm_cli.method.sampler import progressive_schedule
from dfm_cli.models.dit import model_size
from dfm_cli.models.experts import SPECIALIZE
from dfm_cli.models.positions import level_patches

# Paper defaults for the stage probabilities (docs/method.md §3.1); S = 3 is a guess to ablate.
DEFAULT_P_STAGE = {1: [1.0], 2: [0.9, 0.1], 3: [0.9, 0.05, 0.05]}


def _broadcast(values: list, n: int) -> list:
    return values * n if len(values) == 1 and n > 1 else values


MODEL_KINDS = ("dfm", "flux", "autoencoder")
EVAL_METRICS = ("fid", "swd")
LOG_TO = ("jsonl", "tensorboard", "wandb")  # stats.jsonl, and its mirrors (training/loggers.py)
BATCH_MEMORY_LIMIT = 64 * 2**30  # bytes: one batch of pixels, float32, before the model runs


def batch_bytes(data: DataSection, batch_size: int) -> int:
    """Bytes of one training batch of pixels as float32 (3 channels, the clip's frames):
    a lower bound on what a run at this resolution holds in memory.

    >>> from dfm_cli.config.recipe import DataSection
    >>> batch_bytes(DataSection(resolution=65536), 64) / 2**40
    3.0
    """
    return batch_size * 3 * max(data.frames, 1) * data.resolution**2 * 4


# Keys whose own range is all there is to check, by rule.
RANGES = {
    "positive": "train.steps train.batch_size data.resolution train.log_every train.checkpoint_every "
    "train.keep_checkpoints train.eval_num model.temporal_patch sample.n",
    "non-negative": "train.batch_per_gpu train.milestone_every train.max_nonfinite_steps train.preview_every "
    "train.peak_tflops train.warmup_steps train.weight_decay train.eval_every train.eval_reference_num "
    "train.per_level_only_steps train.seed data.frames data.num_workers sample.cfg",
    "above zero": "train.lr train.eps train.grad_clip flow.t_scale flow.prev_t_scale flow.t_shift sample.shift",
}


def _check_finite(recipe: Recipe, fail) -> None:
    """Every float key of every section, and every entry of a list-of-float key, is a finite
    number: TOML's `nan` and `inf` pass the type check but no range means anything with them."""
    for section, cls in SECTIONS.items():
        body = getattr(recipe, section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(body):
            kind, value = hints[f.name], getattr(body, f.name)
            if kind is float:
                values = [value]
            elif typing.get_origin(kind) is list and typing.get_args(kind) == (float,):
                values = list(value)
            else:
                continue
            if not all(math.isfinite(v) for v in values):
                fail(f"{section}.{f.name}", value, "must be a finite number (not nan or inf)")


def _check_classes(data: DataSection, fail) -> None:
    """`data.classes`: ids of a built-in dataset's classes (a folder's are known when it is read)."""
    if data.classes and (data.name == "store" or any(c < 0 for c in data.classes)):
        fail(
            "data.classes",
            data.classes,
            "takes class ids (0 or more) of built-in data or a folder; a latent store "
            "keeps the classes it was encoded with",
        )
    builtin = BUILTIN.get(data.name)
    if builtin is not None:
        names = builtin.class_names
        bad = [c for c in data.classes if c >= len(names)]
        if bad:
            fail(
                "data.classes",
                data.classes,
                f"{bad} out of range: {data.name} has {len(names)} classes (0 to {len(names) - 1}: {', '.join(names)})",
            )


def _check_ranges(recipe: Recipe, fail) -> None:
    """Every key's own range, so a mistake stops at `--dry-run`, not in the middle of a run."""
    f, s, m, d, t = recipe.flow, recipe.sample, recipe.model, recipe.data, recipe.train
    by_key = {f"{section}.{key}": v for section, body in recipe.to_dict().items() for key, v in body.items()}
    for rule, keys in RANGES.items():
        for key in keys.split():
            value = by_key[key]
            if rule == "positive" and value < 1:
                fail(key, value, "must be at least 1")
            if rule == "non-negative" and not value >= 0:  # also catches NaN
                fail(key, value, "must be 0 or more")
            if rule == "above zero" and not (value > 0 and math.isfinite(value)):
                fail(key, value, "must be a number above 0")
    for key, value in (("flow.t_loc", f.t_loc), ("flow.prev_t_loc", f.prev_t_loc)):
        if not math.isfinite(value):
            fail(key, value, "must be a finite number")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        fail("train.betas", t.betas, "needs exactly two values in [0, 1), e.g. [0.9, 0.99]")
    if not 0 <= t.ema_decay < 1:
        fail("train.ema_decay", t.ema_decay, "must be in [0, 1)")
    if not 0 <= m.class_dropout <= 1:
        fail("model.class_dropout", m.class_dropout, "must be in [0, 1] (the share of labels dropped for CFG)")
    if m.kind not in MODEL_KINDS:
        fail("model.kind", m.kind, f"choose one of {', '.join(MODEL_KINDS)}{suggest(m.kind, MODEL_KINDS)}")
    if m.specialize not in SPECIALIZE:
        fail(
            "model.specialize",
            m.specialize,
            f"choose one of {', '.join(SPECIALIZE)}{suggest(m.specialize, SPECIALIZE)}",
        )
    if not t.eval_metrics or any(x not in EVAL_METRICS for x in t.eval_metrics):
        fail("train.eval_metrics", t.eval_metrics, f"choose one or more of {', '.join(EVAL_METRICS)}")
    _check_log_to(t.log_to, fail)
    if f.decomposition not in list(DECOMPOSITIONS):
        fail(
            "flow.decomposition",
            f.decomposition,
            f"choose one of {', '.join(list(DECOMPOSITIONS))}{suggest(f.decomposition, list(DECOMPOSITIONS))}",
        )
    for key, values in (
        ("flow.factors", f.factors),
        ("flow.temporal_factors", f.temporal_factors),
        ("sample.steps", s.steps),
    ):
        if any(v < 1 for v in values):
            fail(key, values, "every entry must be at least 1")
    if any(not w >= 0 for w in f.level_weights):
        fail("flow.level_weights", f.level_weights, "weights must be 0 or more")
    if any(not 0 < v < 1 for v in s.tau) or any(a > b for a, b in zip(s.tau, s.tau[1:])):
        fail("sample.tau", s.tau, "each tau must lie in (0, 1), never decreasing from stage to stage")
    lo_hi = s.guidance_interval
    if len(lo_hi) == 2 and not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
        fail("sample.guidance_interval", lo_hi, "needs [low, high] with 0 <= low <= high <= 1")
    need = batch_bytes(d, t.batch_size)
    if need > BATCH_MEMORY_LIMIT:
        fail(
            "data.resolution",
            d.resolution,
            f"one batch of {t.batch_size} images at {d.resolution} px is {need / 2**30:,.0f} GiB as float32 "
            f"(batch x 3 x {'frames x ' if d.frames else ''}{d.resolution}^2 x 4 B), over the "
            f"{BATCH_MEMORY_LIMIT // 2**30} GiB limit; lower data.resolution or train.batch_size",
        )


def _check_log_to(log_to: list[str], fail) -> None:
    """`train.log_to`: known names, each once, and always "jsonl" (the run's record, which
    resuming and `dfm ablate` read; the others mirror it)."""
    for name in log_to:
        if name not in LOG_TO:
            fail("train.log_to", log_to, f"unknown {name!r}: choose from {', '.join(LOG_TO)}{suggest(name, LOG_TO)}")
    if len(set(log_to)) < len(log_to):
        fail("train.log_to", log_to, "names an entry twice; give each once")
    if "jsonl" not in log_to:
        fail(
            "train.log_to",
            log_to,
            'must include "jsonl": stats.jsonl is the run\'s record (resuming and dfm ablate read it) and the '
            'others mirror it, e.g. ["jsonl", "tensorboard"]',
        )


def _check_autoencoder(recipe: Recipe, fail) -> None:
    """`[ae]`: a diffusers AutoencoderKL that divides the resolution, with sensible losses."""
    a, d = recipe.ae, recipe.data
    if not a.block_out_channels or any(c < 1 for c in a.block_out_channels):
        fail("ae.block_out_channels", a.block_out_channels, "needs one positive width per block, e.g. [32, 64, 64]")
    value: float  # the sizes, then the weights
    for key, value in (
        ("ae.layers_per_block", a.layers_per_block),
        ("ae.latent_channels", a.latent_channels),
        ("ae.stats_num", a.stats_num),
    ):
        if value < 1:
            fail(key, value, "must be at least 1")
    for key, value in (
        ("ae.kl_weight", a.kl_weight),
        ("ae.pyramid_weight", a.pyramid_weight),
        ("ae.se_weight", a.se_weight),
    ):
        if not (value >= 0 and math.isfinite(value)):
            fail(key, value, "must be 0 or more")
    factor = 2 ** (len(a.block_out_channels) - 1)
    if d.resolution % factor:
        fail(
            "data.resolution",
            d.resolution,
            f"must be divisible by the autoencoder's factor {factor} (2^(len(ae.block_out_channels) - 1))",
        )
    if not a.se_factors or any(f < 2 or (d.resolution // factor) % f for f in a.se_factors):
        fail(
            "ae.se_factors",
            a.se_factors,
            f"each factor must be at least 2 and divide the latent size "
            f"{d.resolution // factor} (data.resolution / {factor})",
        )
    if d.name in ("store", "sprites") or d.frames:
        fail("data.name", d.name, "an autoencoder trains on images: use animal-mnist, photo-crops or a folder")


def _check_method(recipe: Recipe, fail) -> None:
    """`flow.method` names a registered method, which then checks the keys it uses."""
    try:
        method = method_class(recipe.flow.method)
    except DfmError:
        fail("flow.method", recipe.flow.method, method_choices(recipe.flow.method))
    method.check(recipe, fail)


def _check_text(recipe: Recipe, fail) -> None:
    """`data.captions` and `[text]` go together, on folder data; a store brings its own captions."""
    d, x = recipe.data, recipe.text
    if d.captions and d.name != "folder":
        fail(
            "data.captions",
            d.captions,
            "goes with data.name = 'folder'"
            + (
                "; a store carries the captions it was encoded with (dfm encode --captions)"
                if d.name == "store"
                else ""
            ),
        )
    if d.captions and not x.encoder:
        fail(
            "text.encoder",
            x.encoder,
            "data.captions needs a caption encoder: 'clip' (with text.clip_weights), "
            "'t5' (with text.t5_weights) or 'clip+t5'",
        )
    if x.encoder and not d.captions:
        fail(
            "data.captions",
            d.captions,
            f"text.encoder = '{x.encoder}' needs captions: a CSV (path,caption) or "
            "JSONL file for the folder in data.path",
        )
    if x.encoder and x.encoder not in ("clip", "t5", "clip+t5"):
        fail("text.encoder", x.encoder, "choose 'clip', 't5' or 'clip+t5'")
    for key, needed in (("clip_weights", "clip"), ("t5_weights", "t5")):
        if needed in x.encoder and not getattr(x, key):
            fail(f"text.{key}", "", f"text.encoder = '{x.encoder}' needs local weights here")
    if x.max_tokens < 1:
        fail("text.max_tokens", x.max_tokens, "must be at least 1")


def validate(recipe: Recipe, source: str) -> None:
    """Range and cross-key checks; fills in derived defaults (p_stage, broadcast factors and tau)."""

    def fail(key: str, value: Any, why: str) -> typing.NoReturn:
        raise DfmError(f"{source}: {key} = {value!r}: {why}")

    f, s, m, d, t = recipe.flow, recipe.sample, recipe.model, recipe.data, recipe.train
    if f.levels < 1:
        fail("flow.levels", f.levels, "must be at least 1 (1 is the Flow Matching baseline)")
    f.factors = _broadcast(f.factors, f.levels - 1)[: f.levels - 1]
    f.temporal_factors = _broadcast(f.temporal_factors or [1], f.levels - 1)[: f.levels - 1]
    s.tau = _broadcast(s.tau, f.levels - 1)[: f.levels - 1]
    if not f.p_stage:
        f.p_stage = DEFAULT_P_STAGE.get(f.levels, [1.0 / f.levels] * f.levels)
    if len(f.p_stage) != f.levels or any(p < 0 for p in f.p_stage):
        fail("flow.p_stage", f.p_stage, f"needs {f.levels} non-negative probabilities, one per stage")
    if not math.isclose(sum(f.p_stage), 1.0, abs_tol=1e-6):
        fail("flow.p_stage", f.p_stage, f"must sum to 1 (sums to {sum(f.p_stage):g})")
    if f.level_weights and len(f.level_weights) != f.levels:
        fail("flow.level_weights", f.level_weights, f"needs {f.levels} weights or none")
    if len(s.steps) != f.levels:
        fail("sample.steps", s.steps, f"needs {f.levels} step counts, one per stage")
    if len(s.guidance_interval) != 2:
        fail("sample.guidance_interval", s.guidance_interval, "needs [low, high]")
    if s.solver not in ("euler", "heun"):
        fail("sample.solver", s.solver, "choose 'euler' or 'heun'")
    names = DATA_NAMES

    if d.name not in names:
        fail("data.name", d.name, f"choose one of {', '.join(names)}{suggest(d.name, names)}")
    _check_classes(d, fail)
    if d.name in ("folder", "store") and not d.path:
        fail(
            "data.path",
            d.path,
            f"data.name = '{d.name}' needs data.path: "
            + ("a folder of class subfolders" if d.name == "folder" else "a store written by `dfm encode`"),
        )
    _check_text(recipe, fail)
    _check_method(recipe, fail)
    _check_ranges(recipe, fail)
    _check_finite(recipe, fail)  # after the ranges, whose messages say more where a key has one
    if m.kind == "autoencoder":
        _check_autoencoder(recipe, fail)
    if m.kind == "flux":
        if m.specialize != "none":
            fail("model.specialize", m.specialize, "per-stage experts are built for model.kind = 'dfm'")
        if f.precondition:
            fail("flow.precondition", True, "is for model.kind = 'dfm'; FLUX's pretrained layers expect raw inputs")
        if d.frames:
            fail("data.frames", d.frames, "model.kind = 'flux' generates images; use model.kind = 'dfm' for video")
        if d.name not in ("folder", "store"):
            fail(
                "data.name",
                d.name,
                "model.kind = 'flux' is text-conditioned: use a store encoded with captions "
                "(dfm encode --captions) or a folder with data.captions",
            )
        if sum(recipe.flux.axes_dims_rope) != recipe.flux.attention_head_dim and not recipe.flux.config:
            fail(
                "flux.axes_dims_rope",
                recipe.flux.axes_dims_rope,
                f"must sum to flux.attention_head_dim ({recipe.flux.attention_head_dim})",
            )
    if not d.frames and d.name != "store":  # images (a store's shape is known when it is read)
        for key, value, ones in (
            ("flow.temporal_factors", f.temporal_factors, all(v == 1 for v in f.temporal_factors)),
            ("model.temporal_patch", m.temporal_patch, m.temporal_patch == 1),
        ):
            if not ones:
                fail(key, value, "applies to video (data.frames > 0); for images leave it at 1")
    if t.per_level_only_steps and not t.init_from:
        fail(
            "train.per_level_only_steps",
            t.per_level_only_steps,
            "freezes the shared weights of a model converted from train.init_from; without init_from "
            "they would stay at their random init: set train.init_from or leave this at 0",
        )
    if t.parallel not in ("ddp", "fsdp"):
        fail("train.parallel", t.parallel, "choose 'ddp' or 'fsdp'")
    if t.precision not in ("auto", "bf16", "fp32"):
        fail("train.precision", t.precision, "choose 'auto', 'bf16' or 'fp32'")
    try:
        decomposition = build_decomposition(
            f.decomposition, f.levels, f.factors, f.temporal_factors, f.antialias, f.upsample_coarse
        )
        size = ((d.frames,) if d.frames else ()) + (d.resolution, d.resolution)
        sizes = None if d.name == "store" else decomposition.level_sizes(size)  # a store's size is known at train time
    except DfmError as e:
        fail("data.resolution", d.resolution, f"with flow.levels = {f.levels} and flow.factors = {f.factors}: {e}")
    try:
        dit_size = model_size(m.name)
        if sizes is not None:
            level_patches(sizes, dit_size.patch, m.temporal_patch)
    except DfmError as e:
        fail("model.name", m.name, str(e))
    try:
        progressive_schedule(s.steps, s.tau)
    except DfmError as e:
        fail("sample.tau", s.tau, str(e))
