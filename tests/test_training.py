"""Training at scale, on the CPU: DDP/FSDP equivalence, accumulation, crash safety, the guard."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY, run_dfm, run_torchrun
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from dfm_cli.cli import app
from dfm_cli.config.recipe import load_recipe
from dfm_cli.data import checkpoints as ckpt_io
from dfm_cli.data.datasets import TensorImages
from dfm_cli.errors import DfmError
from dfm_cli.training.loop import compiled, train


def weights(run, step=None, names=("model", "ema", "optimizer")):
    folder = run / "checkpoints" / (f"step-{step:09d}" if step else "latest")
    return {name: load_file(folder / f"{name}.safetensors") for name in names}


def assert_close(a, b, atol):
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            diff = (a[name][key].double() - b[name][key].double()).abs().max()
            assert diff <= atol, f"{name}.{key}: {diff}"


@pytest.mark.e2e
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_training_equals_one_process(tmp_path, parallel):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_dfm("train", TINY, "--out", single)
    run_torchrun("train", str(TINY), "--out", str(multi), "--set", f"train.parallel={parallel}", port=29500)
    assert_close(weights(single), weights(multi), atol=1e-6)
    state = json.loads((multi / "checkpoints" / "latest" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2


@pytest.mark.e2e
def test_micro_batches_do_not_change_the_maths(tmp_path):
    run_dfm("train", TINY, "--out", tmp_path / "whole")
    run_dfm("train", TINY, "--out", tmp_path / "micro", "--set", "train.batch_per_gpu=2")
    assert_close(weights(tmp_path / "whole"), weights(tmp_path / "micro"), atol=1e-6)
    bad = run_dfm("train", TINY, "--out", tmp_path / "bad", "--set", "train.batch_per_gpu=3", check=False)
    assert bad.returncode == 2 and "train.batch_per_gpu = 3" in bad.stderr


@pytest.mark.e2e
def test_killed_at_random_points_resumes_bit_identically(tmp_path):
    args = ["--set", "train.steps=240", "--set", "train.checkpoint_every=20", "--set", "train.log_every=20"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_dfm("train", TINY, "--out", straight, *args)
    rng = random.Random()
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "dfm_cli", "train", str(TINY), "--out", str(resumed), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        before = len(ckpt_io.complete_checkpoints(resumed))
        deadline = time.time() + 120
        while len(ckpt_io.complete_checkpoints(resumed)) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.4))  # anywhere after a checkpoint, possibly inside the next write
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        for c in ckpt_io.complete_checkpoints(resumed):  # whatever survived is loadable and right
            step = json.loads((c / "state.json").read_text())["step"]
            reference = straight / "checkpoints" / c.name
            if reference.exists():
                assert_close(weights(straight, step), weights(resumed, step), atol=0)
    assert kills >= 1
    run_dfm("train", TINY, "--out", resumed, *args)
    assert_close(weights(straight), weights(resumed), atol=0)


class Crash(BaseException):
    """Stands in for SIGKILL inside a checkpoint write."""


def test_a_crash_at_any_point_of_a_checkpoint_write_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    run = tmp_path / "run"
    tensors = lambda v: {"model": {"w": torch.full((3,), float(v))}}  # noqa: E731
    ckpt_io.save_checkpoint(run, 1, tensors(1), {"step": 1}, "", keep=2)
    calls = {"n": 0, "crash_at": 0}

    def crashing(fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise Crash
            return fn(*a, **k)

        return wrapped

    for name in ("save_file", "_fsync_path"):
        monkeypatch.setattr(ckpt_io, name, crashing(getattr(ckpt_io, name)))
    monkeypatch.setattr(ckpt_io.os, "replace", crashing(os.replace))
    crash_points = 0
    for crash_at in range(1, 100):
        calls.update(n=0, crash_at=crash_at)
        try:
            ckpt_io.save_checkpoint(run, 2, tensors(2), {"step": 2}, "", keep=2)
        except Crash:
            crash_points += 1
            found = ckpt_io.complete_checkpoints(run)
            newest = found[-1]
            step = json.loads((newest / "state.json").read_text())["step"]
            weights_ = load_file(newest / "model.safetensors")["w"]
            assert torch.equal(weights_, torch.full((3,), float(step))), f"crash point {crash_at}"
            ckpt_io.resolve_checkpoint(run)  # a run folder always resolves to a complete one
            if step == 2:  # the crash came after the rename: undo for the next round
                import shutil

                shutil.rmtree(newest)
            continue
        break
    assert crash_points >= 5
    assert [c.name for c in ckpt_io.complete_checkpoints(run)] == ["step-000000001", "step-000000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def inject_nonfinite(monkeypatch, calls_to_poison):
    original = TensorImages.__getitems__
    seen = {"n": 0}

    def poisoned(self, idx):
        seen["n"] += 1
        x, y = original(self, idx)
        return (x * float("nan"), y) if seen["n"] in calls_to_poison else (x, y)

    monkeypatch.setattr(TensorImages, "__getitems__", poisoned)


def test_non_finite_batches_are_skipped_and_counted(tmp_path, monkeypatch):
    inject_nonfinite(monkeypatch, {3})
    result = CliRunner().invoke(app, ["train", str(TINY), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "non-finite" in result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 8 and lines[-1]["nonfinite_steps"] == 1
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run")["model"].values())
    assert all(line["loss"] == line["loss"] for line in lines)  # the skipped step is not in the stats


def test_non_finite_stop_policy_exits_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    train(load_recipe(TINY), clean, console=Console(quiet=True))
    inject_nonfinite(monkeypatch, {6, 7})
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(TINY), "--out", str(run), "--set", "train.max_nonfinite_steps=1"])
    assert result.exit_code == 2
    assert "stopped at step 7: 2 non-finite steps exceed train.max_nonfinite_steps = 1" in result.output
    assert "step-000000004" in result.output and "Traceback" not in result.output
    assert [c.name for c in ckpt_io.complete_checkpoints(run)] == ["step-000000004"]
    assert_close(weights(clean, 4), weights(run, 4), atol=0)


def test_hooks_previews_milestones_and_mfu(tmp_path):
    recipe = load_recipe(
        TINY,
        [
            "train.preview_every=4",
            "train.milestone_every=3",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=1",
            "train.peak_tflops=0.001",
        ],
    )
    calls = []

    def evaluate(step, ema):
        calls.append(step)
        return {"fake_metric": float(step)}

    train(recipe, tmp_path, console=Console(quiet=True), hooks=[(4, evaluate)])
    assert calls == [4, 8]
    lines = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [line.get("fake_metric") for line in lines] == [None, 4.0, None, 8.0]
    for line in lines:
        assert line["mfu"] == pytest.approx(line["tflops_per_device"] / 0.001)
        assert 0 <= line["data_wait_share"] <= 1 and line["peak_memory_gb"] > 0
    assert (tmp_path / "samples" / "preview-000000004.png").is_file()
    assert (tmp_path / "samples" / "preview-000000008.png").is_file()
    assert [c.name for c in ckpt_io.complete_checkpoints(tmp_path)] == ["step-000000006", "step-000000008"]


def test_compile_falls_back_with_a_clear_message():
    model = torch.nn.Linear(2, 2)
    console = Console(record=True, width=200)

    def broken(fn):
        raise RuntimeError("no working C++ compiler\nmore detail")

    assert compiled(model, broken, console) is model
    assert "torch.compile is unavailable here (no working C++ compiler); training without it" in console.export_text()


@pytest.mark.e2e
@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    run_dfm("train", TINY, "--out", tmp_path / "eager")
    run_dfm("train", TINY, "--out", tmp_path / "compiled", "--set", "train.compile=true")
    assert_close(weights(tmp_path / "eager"), weights(tmp_path / "compiled"), atol=1e-4)


def stats_steps(run):
    return [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_a_second_train_on_a_held_folder_is_refused_and_the_first_run_stays_intact(tmp_path):
    run = tmp_path / "run"
    args = ["--out", str(run), "--set", "train.steps=20", "--set", "train.checkpoint_every=10"]
    first = subprocess.Popen(
        [sys.executable, "-m", "dfm_cli", "train", str(TINY), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not ((run / ".lock").is_file() and (run / ".lock").read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.time() < deadline, "the first run never took the folder"
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # the first run holds the folder for as long as the second takes to start
    try:
        second = run_dfm("train", TINY, *args, check=False)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip() == (
        f"error: {run} is in use by another dfm process (PID {first.pid}); wait for it "
        "to finish or stop it, or train into another --out folder"
    )
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert stats_steps(run) == list(range(2, 21, 2))
    assert [c.name for c in ckpt_io.complete_checkpoints(run)] == ["step-000000010", "step-000000020"]
    assert not list((run / "checkpoints").glob(".*tmp*"))
    assert load_recipe(run / "recipe.toml") == load_recipe(TINY, ["train.steps=20", "train.checkpoint_every=10"])


@pytest.mark.e2e
def test_the_lock_goes_with_a_killed_process_and_a_refused_new_folder_is_not_left_behind(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfm_cli", "train", str(TINY), "--out", str(run), "--set", "train.steps=100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not (run / "stats.jsonl").is_file() or not (run / "stats.jsonl").read_text():
        assert proc.poll() is None
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with ckpt_io.run_lock(run):  # the kernel released the dead process's lock
        pass
    bad = run_dfm(
        "train",
        TINY,
        "--out",
        tmp_path / "new",
        "--set",
        "data.name=folder",
        "--set",
        f"data.path={tmp_path / 'missing'}",
        check=False,
    )
    assert bad.returncode == 2 and not (tmp_path / "new").exists()


@pytest.mark.e2e
def test_stats_are_cut_back_to_the_resumed_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["--out", run, "--set", "train.steps=12", "--set", "train.log_every=1", "--set", "train.keep_checkpoints=5"]
    run_dfm("train", TINY, *args)
    straight = (run / "stats.jsonl").read_text().splitlines()
    # As if killed after logging step 12 but before its checkpoint (and step 8's) made it to disk.
    for step in (8, 12):
        import shutil

        shutil.rmtree(run / "checkpoints" / f"step-{step:09d}")
    with (run / "stats.jsonl").open("a") as f:
        f.write('{"step": 13, "lo')  # a line torn by the kill
    run_dfm("train", TINY, *args)
    assert stats_steps(run) == list(range(1, 13))
    resumed = (run / "stats.jsonl").read_text().splitlines()
    drop_speed = lambda rows: [
        {k: v for k, v in json.loads(r).items() if k in ("step", "images", "loss")}  # noqa: E731
        for r in rows
    ]
    assert drop_speed(resumed) == drop_speed(straight)


@pytest.mark.e2e
def test_resume_compares_the_recipe_of_the_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_dfm("train", TINY, "--out", run)
    (run / "recipe.toml").unlink()
    bad = run_dfm("train", TINY, "--out", run, "--set", "train.steps=12", "--set", "train.lr=0.002", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == (
        f"error: {run / 'checkpoints' / 'step-000000008'} was trained with train.lr = 0.001, "
        "not 0.002; use a new --out folder, or the run's own recipe.toml to continue it"
    )
    assert [c.name for c in ckpt_io.complete_checkpoints(run)] == ["step-000000004", "step-000000008"]


def test_non_finite_ema_weights_are_never_saved_as_a_checkpoint(tmp_path, monkeypatch):
    import dfm_cli.training.loop as training

    original = training.update_ema

    def poisoned(ema, model, decay, **kw):
        original(ema, model, decay, **kw)
        if not training.complete_checkpoints(tmp_path / "run"):  # after step 4's checkpoint, break the EMA
            return
        next(ema.parameters()).data.fill_(float("inf"))

    monkeypatch.setattr(training, "update_ema", poisoned)
    result = CliRunner().invoke(app, ["train", str(TINY), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert (
        "step 8: the EMA weights hold non-finite values, so no checkpoint was written; the last good "
        f"checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-000000004'}"
    ) in result.output
    assert [c.name for c in ckpt_io.complete_checkpoints(tmp_path / "run")] == ["step-000000004"]
    assert not (tmp_path / "run" / "samples").exists()


@pytest.mark.e2e
def test_progress_lines_reach_a_log_file_while_training_runs(tmp_path):
    log = tmp_path / "log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dfm_cli",
                "train",
                str(TINY),
                "--out",
                str(tmp_path / "run"),
                "--set",
                "train.steps=100000",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while log.read_text().count("train step") < 2:
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.01)
        proc.kill()
        proc.wait()
    lines = [line for line in log.read_text().splitlines() if line.startswith("train step")]
    assert lines[0].startswith("train step 2/100000 (0%)  loss ") and lines[0].endswith("s left")
    assert lines[1].startswith("train step 4/100000")


def test_evaluation_during_training_writes_metric_rows(tmp_path):
    recipe = load_recipe(
        TINY, ["train.eval_every=3", "train.eval_num=6", 'train.eval_metrics=["swd"]', "train.eval_reference_num=20"]
    )
    train(recipe, tmp_path, console=Console(quiet=True))
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [(r["step"], r["images"]) for r in rows] == [(2, 16), (3, 24), (4, 32), (6, 48), (8, 64)]
    evaluated = {r["step"]: r["eval_swd"] for r in rows if "eval_swd" in r}
    assert list(evaluated) == [3, 6, 8]  # every eval_every steps, and at the last step
    assert all(0 < v < float("inf") for v in evaluated.values())
    assert "loss" not in rows[1] and "loss" in rows[3]  # step 3 is an evaluation-only row
    with pytest.raises(DfmError, match=r"train.eval_metrics = \['fdd'\]: choose one or more of fid, swd"):
        load_recipe(TINY, ["train.eval_every=3", 'train.eval_metrics=["fdd"]'])  # refused before any run


@pytest.mark.e2e
def test_evaluation_during_training_on_a_store_of_built_in_data_compares_with_its_source(tmp_path):
    """A store remembers the built-in data it encoded; in-training metrics use those images.
    A store of one's own folder has no pixels to compare with: refused before training."""
    run_dfm("encode", "animal-mnist", "--num-clips", "40", "--resolution", "16", "--out", tmp_path / "S")
    recipe = load_recipe(
        TINY,
        [
            "data.name=store",
            f"data.path={tmp_path / 'S'}",
            "train.steps=2",
            "train.eval_every=2",
            "train.eval_num=4",
            'train.eval_metrics=["swd"]',
            "train.eval_reference_num=20",
        ],
    )
    train(recipe, tmp_path / "run", console=Console(quiet=True))
    rows = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["eval_swd"] < float("inf")
    index = tmp_path / "S" / "index.json"
    index.write_text(index.read_text().replace('"source": "animal-mnist"', '"source": "/data/mine"'))
    with pytest.raises(DfmError, match="latent store of your own images"):
        train(recipe, tmp_path / "run2", console=Console(quiet=True))


@pytest.mark.e2e
def test_a_state_without_run_info_is_a_one_line_error_naming_the_file(tmp_path):
    from dfm_cli.methods.factory import load_trained

    run = tmp_path / "run"
    train(load_recipe(TINY, ["train.steps=2", "train.checkpoint_every=2"]), run, console=Console(quiet=True))
    info = ckpt_io.load_run_info(ckpt_io.resolve_checkpoint(run))
    assert info.shape == (1, 16, 16) and info.num_classes == 10 and info.class_names[0] == "bear"
    state_file = run / "checkpoints" / "step-000000002" / "state.json"
    state = json.loads(state_file.read_text())
    del state["shape"], state["autoencoder"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(DfmError, match=f"^{state_file}: lacks shape, autoencoder; it was not written by this "):
        load_trained(run)
    bad = run_dfm("sample", run, "--out", tmp_path / "grid.png", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and str(state_file) in bad.stderr
