"""Provenance of checkpoints: every weight file's SHA-256 is recorded when it is written and
checked when it is read (sampling, evaluation, `train.init_from`, resume); a finetune pins the
checkpoint it starts from; a resume never shortens a run; a recipe.toml naming another model
size than its weights is one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, cli
from rich.console import Console
from safetensors.torch import load_file, save_file

from dfm_cli.config.recipe import load_recipe
from dfm_cli.errors import DfmError
from dfm_cli.methods.factory import load_trained
from dfm_cli.training.loop import train

FM = ["flow.levels=1", "flow.p_stage=[1.0]", "flow.factors=[]", "sample.steps=[2]", "sample.tau=[]"]
RUN = ["train.steps=4", "train.checkpoint_every=2"]
WEIGHTS = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
QUIET = Console(quiet=True)


def step(n: int) -> str:
    return f"step-{n:09d}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tamper(file: Path) -> None:
    """Replace the file's floating tensors by other finite values: same names, shapes and size,
    so it still loads and holds no NaN; only its digest can tell."""
    size = file.stat().st_size
    tensors = load_file(file)
    g = torch.Generator().manual_seed(1)
    save_file(
        {k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v for k, v in tensors.items()},
        file,
    )
    assert file.stat().st_size == size


def one_line_error(result, *needles: str) -> None:
    """Exit 2 with one `error:` line (the last on stderr, after any progress lines), no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny 2-level run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("prov") / "run"
    train(load_recipe(TINY, RUN), run, console=QUIET)
    return run


@pytest.fixture(scope="module")
def fm_source(tmp_path_factory) -> Path:
    """A tiny single-level (Flow Matching) run to finetune from, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("prov-fm") / "fm"
    train(load_recipe(TINY, [*FM, *RUN]), run, console=QUIET)
    return run


def copy_of(run: Path, tmp_path: Path, name: str = "run") -> Path:
    copy = tmp_path / name
    shutil.copytree(run, copy, symlinks=True)
    return copy


# ----------------------------------------------------------------------------- digests


def test_every_checkpoint_records_the_sha256_of_each_weight_file(trained):
    for ckpt in (trained / "checkpoints").glob("step-*"):
        recorded = json.loads((ckpt / "state.json").read_text())["sha256"]
        assert sorted(recorded) == sorted(WEIGHTS)
        for name in WEIGHTS:
            assert recorded[name] == sha256(ckpt / name), name


def test_sample_refuses_a_changed_weight_file_in_one_line_and_samples_with_no_verify(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    ema = run / "checkpoints" / step(4) / "ema.safetensors"
    tamper(ema)
    refused = cli("sample", run, "--n", "2", "--out", tmp_path / "g.png")
    one_line_error(refused, str(ema), "SHA-256", "--no-verify", "earlier checkpoint")
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(DfmError, match="ema.safetensors: its SHA-256 differs"):
        load_trained(run)
    # the raw weights were not changed: they still sample, verified
    assert cli("sample", run, "--no-ema", "--n", "2", "--out", tmp_path / "raw.png").exit_code == 0
    # the user who knows better
    forced = cli("sample", run, "--no-verify", "--n", "2", "--out", tmp_path / "g.png")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "g.png").is_file()


def test_eval_refuses_a_changed_weight_file_unless_no_verify(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("DFM_CACHE", str(tmp_path / "cache"))
    run = copy_of(trained, tmp_path)
    ema = run / "checkpoints" / step(4) / "ema.safetensors"
    tamper(ema)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    args = ["eval", run, "--swd", "--swd-levels", "1", "--num", "8", "--batch", "8", "--ref", ref]
    one_line_error(cli(*args), str(ema), "--no-verify")
    assert not (run / "eval").exists() or not any((run / "eval").iterdir())
    forced = cli(*args, "--no-verify")
    assert forced.exit_code == 0, (forced.output, forced.exception)
    assert (run / "eval" / f"samples-8-{step(4)}.npz").is_file()


def test_a_checkpoint_written_before_digests_still_loads_unverified(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    for n in (2, 4):
        tamper(run / "checkpoints" / step(n) / "ema.safetensors")
    old = run / "checkpoints" / step(2) / "state.json"  # as written before digests were recorded
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "sha256"}))
    load_trained(run / "checkpoints" / step(2))  # cannot be verified: loads
    with pytest.raises(DfmError, match=f"{step(4)}/ema.safetensors: its SHA-256 differs"):
        load_trained(run / "checkpoints" / step(4))


def test_resume_refuses_a_changed_checkpoint_naming_the_file(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    model = run / "checkpoints" / step(4) / "model.safetensors"
    tamper(model)
    recipe_toml = (run / "recipe.toml").read_bytes()
    with pytest.raises(DfmError, match=f"^{model}: its SHA-256 differs .* delete .*{step(4)}") as e:
        train(load_recipe(TINY, ["train.steps=6", "train.checkpoint_every=2"]), run, console=QUIET)
    assert "\n" not in str(e.value)
    assert (run / "recipe.toml").read_bytes() == recipe_toml
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [step(2), step(4)]


def test_init_from_refuses_a_changed_source_file(fm_source, tmp_path):
    source = copy_of(fm_source, tmp_path, "fm")
    ema = source / "checkpoints" / step(4) / "ema.safetensors"
    tamper(ema)
    with pytest.raises(DfmError, match=f"^{ema}: its SHA-256 differs .*--init-from {source / 'checkpoints'}/step-N"):
        train(load_recipe(TINY, [f"train.init_from={source}", "train.steps=2"]), tmp_path / "ft", console=QUIET)
    assert not (tmp_path / "ft").exists()


# ----------------------------------------------------------------------------- pinning


def test_a_finetune_pins_the_newest_checkpoint_of_a_source_still_training(tmp_path):
    """The finetune starts while its source trains (from a hook of the source's loop, after
    step 4, before that step's checkpoint): it pins step 2. The source then goes on to step 8
    (step 2 is pruned); re-running the same finetune command resumes from the pinned source."""
    source, finetune = tmp_path / "fm", tmp_path / "ft"
    seen: dict = {}

    def finetune_now(done: int, ema: torch.nn.Module) -> dict:
        if not seen:
            newest = source / "checkpoints" / step(2)
            assert sorted(p.name for p in (source / "checkpoints").glob("step-*")) == [step(2)]
            seen["sha256"] = sha256(newest / "ema.safetensors")
            seen["weights"] = load_file(newest / "ema.safetensors")
            train(load_recipe(TINY, [f"train.init_from={source}", "train.steps=2"]), finetune, console=QUIET)
        return {}

    train(
        load_recipe(TINY, [*FM, "train.steps=8", "train.checkpoint_every=2"]),
        source,
        console=QUIET,
        hooks=[(4, finetune_now)],
    )
    assert seen and not (source / "checkpoints" / step(2)).exists()  # pruned: the source went on to 8
    pinned = str(source / "checkpoints" / step(2))
    record = {"checkpoint": pinned, "step": 2, "sha256": seen["sha256"]}
    assert load_recipe(finetune / "recipe.toml").train.init_from == pinned
    assert load_recipe(finetune / "checkpoints" / step(2) / "recipe.toml").train.init_from == pinned
    assert json.loads((finetune / "checkpoints" / step(2) / "state.json").read_text())["init_from"] == record

    # the same command again, with more steps: resumes (RUN and its pinned checkpoint are one source)
    train(load_recipe(TINY, [f"train.init_from={source}", "train.steps=4"]), finetune, console=QUIET)
    assert load_recipe(finetune / "recipe.toml").train.init_from == pinned
    assert json.loads((finetune / "checkpoints" / step(4) / "state.json").read_text())["init_from"] == record
    # naming the pinned checkpoint itself is the same source too
    train(load_recipe(TINY, [f"train.init_from={pinned}", "train.steps=4"]), finetune, console=QUIET)
    # another checkpoint of the source is not
    other = source / "checkpoints" / step(8)
    with pytest.raises(DfmError, match="train.init_from"):
        train(load_recipe(TINY, [f"train.init_from={other}", "train.steps=6"]), finetune, console=QUIET)


def test_init_from_a_chosen_checkpoint_or_latest_pins_that_step(fm_source, tmp_path):
    chosen = fm_source / "checkpoints" / step(2)
    train(load_recipe(TINY, [f"train.init_from={chosen}", "train.steps=2"]), tmp_path / "a", console=QUIET)
    state = json.loads((tmp_path / "a" / "checkpoints" / step(2) / "state.json").read_text())
    assert state["init_from"] == {"checkpoint": str(chosen), "step": 2, "sha256": sha256(chosen / "ema.safetensors")}
    latest = fm_source / "checkpoints" / "latest"
    train(load_recipe(TINY, [f"train.init_from={latest}", "train.steps=2"]), tmp_path / "b", console=QUIET)
    assert load_recipe(tmp_path / "b" / "recipe.toml").train.init_from == str(fm_source / "checkpoints" / step(4))


# ----------------------------------------------------------------------------- resume and recipe.toml


def test_resume_with_fewer_steps_is_refused_and_recipe_toml_is_unchanged(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    before = {p: p.read_bytes() for p in [run / "recipe.toml", *run.glob("checkpoints/*/recipe.toml")]}
    with pytest.raises(DfmError, match="reached step 4 .*train.steps = 2"):
        train(load_recipe(TINY, ["train.steps=2", "train.checkpoint_every=2"]), run, console=QUIET)
    refused = cli("train", TINY, "--set", "train.steps=3", "--out", run)
    one_line_error(refused, "step 4", "train.steps = 3")
    assert {p: p.read_bytes() for p in before} == before
    assert load_recipe(run / "recipe.toml").train.steps == 4


def test_recipe_naming_another_model_size_is_one_line_naming_both(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    recipe = run / "checkpoints" / step(4) / "recipe.toml"
    recipe.write_text(recipe.read_text().replace('name = "DFM-N/4"', 'name = "DFM-T/4"'))
    assert 'name = "DFM-T/4"' in recipe.read_text()
    with pytest.raises(DfmError, match=r"model.name = 'DFM-T/4' in recipe.toml, but the weights are of another size"):
        load_trained(run)
    refused = cli("sample", run, "--n", "2", "--out", tmp_path / "g.png")
    one_line_error(refused, "DFM-T/4", "DFM-N/4", "first mismatch")


@pytest.mark.e2e
def test_a_finetune_started_while_its_source_trains_in_another_process_is_pinned(tmp_path):
    """Two real processes: the source trains on (and prunes) while `dfm train --init-from RUN`
    starts; the finetune records one checkpoint of the source, its step and its digest."""
    import subprocess
    import sys
    import time

    from conftest import run_dfm

    source, finetune = tmp_path / "fm", tmp_path / "ft"
    sets = [*FM, "train.steps=100000", "train.checkpoint_every=2", "train.log_every=2", "train.keep_checkpoints=2"]
    command = [sys.executable, "-m", "dfm_cli", "train", str(TINY), "--out", str(source)]
    proc = subprocess.Popen([*command, *[arg for s in sets for arg in ("--set", s)]], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (source / "checkpoints" / step(4) / "state.json").is_file():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        run_dfm("train", TINY, "--init-from", source, "--set", "train.steps=2", "--out", finetune)
        assert proc.poll() is None, "the source was still training while the finetune started"
    finally:
        proc.kill()
        proc.wait()
    record = json.loads((finetune / "checkpoints" / step(2) / "state.json").read_text())["init_from"]
    assert record["step"] >= 4 and record["step"] % 2 == 0
    assert record["checkpoint"] == str(source / "checkpoints" / step(record["step"]))
    assert load_recipe(finetune / "recipe.toml").train.init_from == record["checkpoint"]
    pinned = Path(record["checkpoint"]) / "ema.safetensors"
    if pinned.is_file():  # the source may have pruned it since (keep_checkpoints = 2)
        assert sha256(pinned) == record["sha256"]
