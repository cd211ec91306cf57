"""Every shipped recipe and sweep validates; every paper experiment has a tiny twin that
trains 2 steps and samples."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from rich.console import Console

from dfm_cli.ablate import compute
from dfm_cli.ablate.sweep import load_sweep
from dfm_cli.config.recipe import load_recipe

RECIPES = ROOT / "recipes"
ALL = sorted(RECIPES.rglob("*.toml"))
PAPER = sorted((RECIPES / "paper").glob("*.toml"))
TWINS = [RECIPES / "tiny" / p.name for p in PAPER]


def is_sweep(path: Path) -> bool:
    return "recipe" in tomllib.loads(path.read_text())


def name(path: Path) -> str:
    return str(path.relative_to(RECIPES))


@pytest.mark.parametrize("path", ALL, ids=name)
def test_every_recipe_and_sweep_validates(path):
    if is_sweep(path):
        sweep = load_sweep(path)
        assert sweep.cells and all(c.recipe.train.steps >= 1 for c in sweep.cells)
    else:
        load_recipe(path)


@pytest.mark.parametrize("path", [p for p in ALL if is_sweep(p)], ids=name)
def test_every_sweep_plans_its_compute(path, monkeypatch):
    """What `dfm ablate --dry-run` lists (its step timing is tested on the CI sweep)."""
    monkeypatch.setattr(compute, "TIMING_BUDGET", 0.0)  # per-FLOP constants: no timing
    sweep = load_sweep(path)
    rows = compute.plan(sweep)
    assert [r["cell"] for r in rows] == [c.name for c in sweep.cells]
    assert all(r["train_flops"] > 0 and r["seconds"] > 0 for r in rows)
    shared = {r["run"]: r["shared"] for r in rows}
    assert sum(shared.values()) == len(rows) and len(shared) == len(sweep.runs)


def keys(path: Path) -> set[str]:
    return {f"{s}.{k}" for s, body in tomllib.loads(path.read_text()).items() for k in body}


@pytest.mark.parametrize("paper, twin", list(zip(PAPER, TWINS)), ids=[p.name for p in PAPER])
def test_every_paper_experiment_has_a_tiny_twin_with_the_same_keys(paper, twin):
    assert twin.is_file(), f"{name(paper)} has no tiny twin {name(twin)}"
    assert is_sweep(paper) == is_sweep(twin)
    if not is_sweep(paper):
        assert keys(paper) == keys(twin)
        return
    p, t = tomllib.loads(paper.read_text()), tomllib.loads(twin.read_text())
    assert p.get("baseline") == t.get("baseline")
    assert [c.get("name") for c in p.get("cell", [])] == [c.get("name") for c in t.get("cell", [])]
    assert [set(c) for c in p.get("cell", [])] == [set(c) for c in t.get("cell", [])]
    assert set(p.get("grid", {})) == set(t.get("grid", {}))


def train_and_sample(recipe, run: Path, sample_recipes) -> None:
    """Train `recipe` in-process, then draw 4 samples with each of `sample_recipes`' settings."""
    from dfm_cli.config.method import method_of
    from dfm_cli.method.sampler import class_balanced_labels
    from dfm_cli.methods.factory import load_trained
    from dfm_cli.training.loop import train

    assert recipe.train.steps == 2, "tiny twins train 2 steps"
    train(recipe, run, console=Console(quiet=True))
    assert len((run / "stats.jsonl").read_text().splitlines()) >= 1
    model, trained, info = load_trained(run)
    method = method_of(trained)
    decomposition = method.decomposition(info.level_stats)
    if info.text:  # a text-conditioned twin samples from prompts, encoded by the run's own encoder
        from dfm_cli.data.text_encoders import Prompts

        condition = Prompts.encode(["a red square", "a big blue square"] * 2, info.text, torch.device("cpu")).encoded
    else:
        condition = class_balanced_labels(4, info.num_classes)
    for r in sample_recipes:
        settings = r.sampler_settings(model.levels)
        x = method.generate(model, condition, decomposition, settings, seed=0).x
        assert x.shape[0] == 4 and torch.isfinite(x).all()


# e2e: trains every twin in-process (about 1.5 min on 2 CPU cores), the text twins'
# `tiny_text` fixture runs `dfm encode` in a subprocess, and `tiny_elit` runs `dfm import elit`
@pytest.mark.e2e
@pytest.mark.parametrize("twin", TWINS, ids=name)
def test_every_tiny_twin_trains_2_steps_and_samples(twin, tmp_path, request, monkeypatch):
    if "tiny-text/" in twin.read_text():  # text twins read the tests' tiny-text/ folder
        monkeypatch.chdir(request.getfixturevalue("tiny_text"))
    if "tiny-elit/" in twin.read_text():  # the finetune of the authors' SiT reads its import there
        monkeypatch.chdir(request.getfixturevalue("tiny_elit"))
    if not is_sweep(twin):
        recipe = load_recipe(twin)
        train_and_sample(recipe, tmp_path / "run", [recipe])
        return
    for k, run in enumerate(load_sweep(twin).runs):
        train_and_sample(run.recipe, tmp_path / f"run{k}", [c.recipe for c in run.cells])
