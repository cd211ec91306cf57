"""The key-usage walk: every key of `[flow]`, `[model]`, `[train]` and `[sample]`, for every
registered method, either is refused at load (naming the key) or changes the run.

Each key is set away from the tiny recipe's value to a valid alternative, and the run is
trained for two steps in-process on the CPU (a batch of 2, one checkpoint per step, a grid of
2 samples). The key is used when the run changes: its losses, gradient norms or learning
rates (stats.jsonl, without the timing columns), its weights (model and EMA), the checkpoints
it keeps or the images it samples. A key a method ignores must be in the method's
`unused_keys` (or refused by its `check`), so that an ablation over it cannot silently
measure nothing. `EXEMPT` lists the few keys that cannot change a two-step CPU run by design,
each with the reason.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, TINY
from rich.console import Console

from dfm_cli.ablate.sweep import toml_literal
from dfm_cli.config.method import METHODS
from dfm_cli.config.recipe import SECTIONS, Recipe, load_recipe
from dfm_cli.errors import DfmError

RECIPES = {
    "dfm": TINY,
    "pyramidal": ROOT / "recipes" / "tiny" / "pyramidal.toml",
    "cascaded": ROOT / "recipes" / "tiny" / "cascaded.toml",
}
WALKED = ("flow", "model", "train", "sample")
# Every run of the walk: two steps of a batch of 2, a stats line per step, a checkpoint at the
# end, a grid of 2 samples, guided (so that sample.guidance_interval has something to act on).
BASE = [
    "train.steps=2",
    "train.batch_size=2",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "sample.n=2",
    "sample.cfg=2.0",
]
FM_RUN = "<a single-level run>"  # replaced by the path of the `fm_run` fixture's run

# Keys that cannot change a two-step run on one CPU process by design, and why.
EXEMPT = {
    "train.batch_per_gpu": "splits each batch into micro-batches for memory; the gradient is the same by design "
    "(tests/test_training.py::test_micro_batches_do_not_change_the_maths)",
    "train.parallel": "how the model is spread over torchrun's processes; one process has nothing to spread, and "
    "what is learned is the same (tests/test_training.py::test_two_process_training_equals_one_process)",
    "train.tf32": "TF32 matmuls on NVIDIA GPUs (speed for a little precision); no effect on the CPU",
    "train.compile": "torch.compile runs the same model faster, or eagerly where it cannot "
    "(tests/test_training.py::test_compiled_training_matches_eager)",
    "train.max_nonfinite_steps": "when to stop after skipped non-finite steps; a healthy run has none "
    "(tests/test_training.py::test_non_finite_stop_policy_exits_with_the_last_good_checkpoint_intact)",
    "train.peak_tflops": "the device peak that the MFU column is reported against: a speed statistic, "
    "never what is learned or sampled",
    "train.eval_every": "in-training evaluation writes scores next to the run, never changes what is learned "
    "(tests/test_training.py::test_evaluation_during_training_writes_metric_rows)",
    "train.eval_num": "how many samples in-training evaluation scores (with train.eval_every); a measurement only",
    "train.eval_metrics": "which scores in-training evaluation writes (with train.eval_every); a measurement only",
    "train.eval_reference_num": "the reference in-training evaluation scores against (with train.eval_every); "
    "a measurement only",
    "train.log_to": "where stats.jsonl and the images are also written (TensorBoard, W&B), never what is learned "
    "or sampled (tests/test_loggers.py::test_tensorboard_event_files_hold_the_stats_jsonl_values)",
}


@dataclass(frozen=True)
class Alt:
    """A valid value away from the tiny recipe's: `also` are the companions the value forces
    (on the changed run only), `given` the context the key acts in (on both runs)."""

    value: Any
    also: dict[str, Any] = field(default_factory=dict)
    given: dict[str, Any] = field(default_factory=dict)


ALTERNATIVES: dict[str, Alt] = {
    "flow.levels": Alt(1, also={"flow.p_stage": [1.0], "sample.steps": [3]}),
    "flow.decomposition": Alt("dwt"),
    "flow.factors": Alt([4]),
    "flow.temporal_factors": Alt([2]),
    "flow.antialias": Alt(True),
    "flow.standardize": Alt(True),
    "flow.p_stage": Alt([0.8, 0.2]),
    "flow.per_batch_stage": Alt(True),
    "flow.t_loc": Alt(0.5),
    "flow.t_scale": Alt(0.5),
    "flow.t_shift": Alt(3.0),
    "flow.prev_t_loc": Alt(0.5),
    "flow.prev_t_scale": Alt(0.5),
    "flow.tied_timesteps": Alt(True),
    "flow.mask_input": Alt(False),
    "flow.level_weights": Alt([1.0, 2.0]),
    "flow.precondition": Alt(True),
    "flow.upsample_coarse": Alt(True),
    "flow.method": Alt("pyramidal"),
    "flow.gamma": Alt(0.2),
    "flow.pyramid_time": Alt("logit-normal"),
    "flow.cascade_split": Alt(0.75),
    "flow.cascade_aug": Alt([1.0, 0.5]),
    "flow.cascade_condition": Alt("tokens"),
    "flow.cascade_upsample": Alt("nearest"),
    "model.kind": Alt("flux"),
    "model.name": Alt("DFM-N/2"),
    "model.pos": Alt("sincos"),
    "model.time_embed": Alt("sit"),
    "model.class_dropout": Alt(1.0),
    "model.temporal_patch": Alt(2),
    "model.specialize": Alt("mlp"),
    "train.steps": Alt(3),
    "train.batch_size": Alt(4),
    "train.lr": Alt(1e-2),
    "train.warmup_steps": Alt(2),
    "train.weight_decay": Alt(0.5),
    "train.betas": Alt([0.5, 0.9]),
    "train.eps": Alt(1e-2),
    "train.grad_clip": Alt(0.01),
    "train.ema_decay": Alt(0.05),  # under the EMA's warm-up decay, so that two steps see it
    "train.seed": Alt(1),
    "train.log_every": Alt(2),
    "train.checkpoint_every": Alt(1, given={"train.keep_checkpoints": 5}),
    "train.keep_checkpoints": Alt(1, given={"train.checkpoint_every": 1}),
    # a milestone outlives pruning
    "train.milestone_every": Alt(1, given={"train.checkpoint_every": 1, "train.keep_checkpoints": 1}),
    "train.precision": Alt("bf16"),
    "train.preview_every": Alt(1),
    "train.init_from": Alt(FM_RUN),
    "train.per_level_only_steps": Alt(1),
    "sample.steps": Alt([2, 2]),
    "sample.tau": Alt([0.6]),
    "sample.cfg": Alt(3.0),
    "sample.guidance_interval": Alt([0.5, 1.0]),
    "sample.solver": Alt("heun"),
    "sample.shift": Alt(3.0),
    "sample.n": Alt(3),
    "sample.cond_noise": Alt(0.1),
}
# Where a method's tiny recipe already has the value above, or the key needs a context.
BY_METHOD: dict[str, dict[str, Alt]] = {
    "dfm": {"train.per_level_only_steps": Alt(1, given={"train.init_from": FM_RUN})},
    "pyramidal": {
        "model.name": Alt("DFM-N/4"),
        "flow.method": Alt("dfm"),
        # gamma's range shrinks with the factor, and the 4 px stage needs the finer patch
        "flow.factors": Alt([4], also={"flow.gamma": 1 / 15, "model.name": "DFM-N/4"}),
        # the logit-normal's keys act with logit-normal stage time (uniform, the default, refuses them)
        "flow.t_loc": Alt(0.5, given={"flow.pyramid_time": "logit-normal"}),
        "flow.t_scale": Alt(0.5, given={"flow.pyramid_time": "logit-normal"}),
    },
    "cascaded": {
        "flow.method": Alt("dfm", also={"flow.cascade_split": 0.8}),
        "flow.cascade_split": Alt(0.3),  # the switch moves from step 2 to step 1
        "train.steps": Alt(4),
    },
}
# The cascade trains stage 1 for its first two steps (round(0.5 * 3)), stage 2 for the last.
BASE_BY_METHOD = {"cascaded": ["train.steps=3"]}

KEYS = [f"{s}.{k}" for s in WALKED for k in typing.get_type_hints(SECTIONS[s])]
CASES = [(method, key) for method in RECIPES for key in KEYS if key not in EXEMPT]


def base_of(method: str) -> list[str]:
    return [*BASE, *BASE_BY_METHOD.get(method, [])]


def alternative(method: str, key: str) -> Alt:
    return BY_METHOD.get(method, {}).get(key) or ALTERNATIVES[key]


def overrides(values: dict[str, Any], fm_run: Path) -> list[str]:
    return [f"{k}={toml_literal(str(fm_run) if v == FM_RUN else v)}" for k, v in values.items()]


def value_of(recipe: Recipe, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


# What a run depends on: the deterministic columns of its stats, the files it keeps, and the
# bytes of its weights and images (recipe.toml and state.json restate the recipe itself).
NOT_HASHED = (".lock", "recipe.toml", "state.json", "optimizer.safetensors", "stats.jsonl")
STATS = ("step", "images", "images_seen", "lr", "nonfinite_steps", "loss", "loss_level", "loss_t_bin", "grad_norm")


def fingerprint(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """Train the run; its samples are compared as floats (8-bit images round small changes away)."""
    from dfm_cli.training import loop

    save = loop.save_samples
    samples: list[str] = []

    def save_and_record(pixels, path, **kw):
        samples.append(f"{Path(path).name}: {hashlib.sha256(pixels.float().cpu().numpy().tobytes()).hexdigest()}")
        return save(pixels, path, **kw)

    loop.save_samples = save_and_record
    try:
        loop.train(recipe, run_dir, console=Console(quiet=True))
    finally:
        loop.save_samples = save
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    out: dict[str, Any] = {"stats": [{k: row.get(k) for k in STATS} for row in rows], "samples": samples}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.name not in NOT_HASHED:
            out[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def quick(monkeypatch_module):
    """The walk's runs read the tiny data once, and use one thread each (the runs are tiny)."""
    from dfm_cli.training import loop

    threads, build, read = torch.get_num_threads(), loop.build_dataset, {}

    def build_once(name, path, resolution, frames=0, strict=False, classes=()):
        key = (name, path, resolution, frames, strict, tuple(classes))
        if key not in read:
            read[key] = build(name, path, resolution, frames, strict=strict, classes=classes)
        return read[key]

    torch.set_num_threads(1)
    monkeypatch_module.setattr(loop, "build_dataset", build_once)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory) -> Path:
    """A single-level run of the tiny data and model, for `train.init_from`."""
    from dfm_cli.training.loop import train

    run = tmp_path_factory.mktemp("fm") / "run"
    steps = ["flow.levels=1", "flow.p_stage=[1.0]", "sample.steps=[3]", "train.steps=1", "train.checkpoint_every=1"]
    train(load_recipe(TINY, [*BASE, *steps]), run, console=Console(quiet=True))
    return run


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory, fm_run):
    """The fingerprint of each method's base run in a context, computed once."""
    cache: dict[tuple, dict] = {}
    root = tmp_path_factory.mktemp("base")

    def base(method: str, given: dict[str, Any]) -> dict:
        key = (method, tuple(sorted((k, str(v)) for k, v in given.items())))
        if key not in cache:
            recipe = load_recipe(RECIPES[method], [*base_of(method), *overrides(given, fm_run)])
            cache[key] = fingerprint(recipe, root / f"{method}-{len(cache)}")
        return cache[key]

    return base


def test_the_walk_covers_every_method_and_key():
    assert set(RECIPES) == set(METHODS), "give each registered method a tiny recipe in RECIPES"
    missing = [k for k in KEYS if k not in ALTERNATIVES and k not in EXEMPT]
    assert not missing, f"give these keys an alternative value (or a reason in EXEMPT): {missing}"
    assert all(k in KEYS and reason for k, reason in EXEMPT.items())
    assert not set(EXEMPT) & set(ALTERNATIVES), "an exempt key is not walked"


@pytest.mark.e2e  # in-process, but 157 short trainings (about 25 s): kept out of the quick unit loop
@pytest.mark.parametrize("method, key", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_every_key_is_refused_or_changes_the_run(method, key, fm_run, base_runs, tmp_path):
    alt = alternative(method, key)
    given = overrides(alt.given, fm_run)
    base_recipe = load_recipe(RECIPES[method], [*base_of(method), *given])
    value = str(fm_run) if alt.value == FM_RUN else alt.value
    assert value_of(base_recipe, key) != value, f"{key}: the alternative {value!r} is the base run's own value"
    changed = [*base_of(method), *given, *overrides({key: alt.value, **alt.also}, fm_run)]
    try:
        recipe = load_recipe(RECIPES[method], changed)
    except DfmError as e:
        assert key in str(e), f"{key} = {value!r} is refused, but the message does not name it: {e}"
        return
    assert fingerprint(recipe, tmp_path / "run") != base_runs(method, alt.given), (
        f"{key} = {value!r} changes nothing for flow.method = '{method}' (losses, weights, checkpoints, "
        "samples): add it to the method's unused_keys or refuse it in its check"
    )
