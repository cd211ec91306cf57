"""`dfm ablate`: the sweep schema, cells sharing runs, manifests, resume and the results."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_dfm
from rich.console import Console

from dfm_cli.ablate.compute import train_compute
from dfm_cli.ablate.curves import curve_series, training_curves
from dfm_cli.ablate.execute import run_command, run_sweep, write_reference
from dfm_cli.ablate.results import collect
from dfm_cli.ablate.sweep import baseline_cells, load_sweep
from dfm_cli.errors import DfmError
from dfm_cli.methods.factory import build_model
from dfm_cli.training.perf import forward_flops

TINY_SWEEP = ROOT / "recipes" / "tiny" / "ablate.toml"


def write_sweep(tmp_path: Path, body: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'recipe = "{(ROOT / "recipes" / "tiny.toml").as_posix()}"\n' + body)
    return path


def test_tiny_sweep_has_four_cells_on_two_runs():
    sweep = load_sweep(TINY_SWEEP)
    assert [c.name for c in sweep.cells] == ["steps=4 cfg=1", "steps=4 cfg=3", "steps=8 cfg=1", "steps=8 cfg=3"]
    runs = sweep.runs
    assert [len(r.cells) for r in runs] == [2, 2]
    assert [r.recipe.train.steps for r in runs] == [4, 8]
    assert len({c.cell_id for c in sweep.cells}) == 4
    assert [c.recipe.sample.cfg for c in sweep.cells] == [1.0, 3.0, 1.0, 3.0]


def test_ids_follow_the_settings(tmp_path):
    a = load_sweep(write_sweep(tmp_path, '[grid]\n"sample.cfg" = [1.0, 2.0]\n', "a.toml")).cells
    b = load_sweep(write_sweep(tmp_path, '[grid]\n"sample.cfg" = [1.0, 2.5]\n', "b.toml")).cells
    c = load_sweep(write_sweep(tmp_path, '[set]\n"train.lr" = 0.002\n[grid]\n"sample.cfg" = [1.0]\n', "c.toml")).cells
    assert a[0].cell_id == b[0].cell_id and a[1].cell_id != b[1].cell_id  # only the changed cell moves
    assert a[0].run_id == a[1].run_id == b[1].run_id  # sampling keys share one run
    assert c[0].run_id != a[0].run_id and c[0].cell_id != a[0].cell_id  # a training key moves both


@pytest.mark.parametrize(
    "body, message",
    [
        ("grids = 1\n", "unknown key 'grids'; did you mean 'grid'?"),
        ('[grid]\n"train.step" = [1, 2]\n', "'train.step' is not a recipe key; did you mean 'train.steps'?"),
        ("[grid]\ntrain.steps = 4\n", "give a non-empty list"),
        ('[grid]\n"sample.cfg" = [1.0]\n[eval]\nmetric = ["swd"]\n', "eval.metric is not a known key; did you mean"),
        ('[grid]\n"sample.cfg" = [1.0]\n[eval]\nmetrics = ["fd"]\n', "unknown metric 'fd'"),
        ('[grid]\n"train.steps" = [4, "many"]\n', "cell 'steps=many'"),
        ('[grid]\n"sample.cfg" = [1.0]\n[eval]\nswd_levels = 4\nmetrics = ["swd"]\n', "use eval.swd_levels = 2"),
        ('baseline = "nope"\n[grid]\n"sample.cfg" = [1.0]\n', "baseline = 'nope' names no cell"),
        ('[grid]\n"sample.cfg" = [1.0]\nbaseline = "nope"\n', "'baseline' belongs at the top"),
        ('[[cell]]\nname = "a"\n"sample.cfg" = 2.0\n[grid]\n"sample.cfg" = [1.0]\n', "set in both"),
        ("", "nothing to sweep"),
        ('[[cell]]\n"train.lr" = 0.1\n[[cell]]\n"train.lr" = 0.1\n', "two cells have the same settings"),
    ],
)
def test_mistakes_are_one_line_errors_naming_the_sweep(tmp_path, body, message):
    path = write_sweep(tmp_path, body)
    with pytest.raises(DfmError) as e:
        load_sweep(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_cells_cross_the_grid_and_baselines_match_the_other_keys(tmp_path):
    path = write_sweep(
        tmp_path,
        """
baseline = "fm"
[[cell]]
name = "fm"
flow.levels = 1
flow.p_stage = [1.0]
sample.steps = [5]
[[cell]]
name = "dfm"
[grid]
"sample.cfg" = [1.0, 3.0]
""",
    )
    sweep = load_sweep(path)
    assert [c.name for c in sweep.cells] == ["fm cfg=1", "fm cfg=3", "dfm cfg=1", "dfm cfg=3"]
    assert [len(r.cells) for r in sweep.runs] == [2, 2]
    bases = {k: v.name for k, v in baseline_cells(sweep).items()}
    assert bases == {"fm cfg=1": "fm cfg=1", "fm cfg=3": "fm cfg=3", "dfm cfg=1": "fm cfg=1", "dfm cfg=3": "fm cfg=3"}
    # a table selects by value; a scalar matches the one-element list the recipe broadcasts to
    tau = load_sweep(
        write_sweep(
            tmp_path,
            'baseline = {"sample.tau" = 0.7}\n[grid]\n"sample.tau" = [0.5, 0.7]\n"sample.cfg" = [1.0, 2.0]\n',
            "t.toml",
        )
    )
    bases = {k: v.name for k, v in baseline_cells(tau).items()}
    assert bases["tau=0.5 cfg=2"] == "tau=0.7 cfg=2" and bases["tau=0.5 cfg=1"] == "tau=0.7 cfg=1"


def test_training_compute_is_three_forwards_per_image():
    sweep = load_sweep(TINY_SWEEP)
    recipe = sweep.runs[1].recipe
    model = build_model(recipe, (1, 16, 16), 10)
    images, flops = train_compute(recipe)
    assert images == 8 * 8 and flops == 3 * forward_flops(model) * 64


def test_training_curves_keep_the_last_row_per_step(tmp_path):
    stats = tmp_path / "stats.jsonl"
    rows = [
        {"step": 2, "images_seen": 16, "loss": 1.0},
        {"step": 4, "images": 32, "eval_fid": 90.0},
        {"step": 4, "images": 32, "eval_fid": 80.0, "eval_swd": 5.0},
        {"step": 8, "images": 64, "eval_fid": 70.0},
    ]
    stats.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert training_curves(stats) == {"eval_fid": [(32.0, 80.0), (64.0, 70.0)], "eval_swd": [(32.0, 5.0)]}


class FakeDfm:
    """Stands in for the subprocesses: writes what train/sample/eval would, and counts calls.
    A sample set's pixels encode (run, cfg), and eval scores their mean, so every cell's
    metric is distinct and known."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[str] = []
        self.fail_after = fail_after

    def __call__(self, cmd: list[str], log: Path, what: str) -> None:
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt
        kind = cmd[3]
        self.calls.append(kind)
        arg = dict(zip(cmd, cmd[1:]))
        if kind == "train":
            run = Path(arg["--out"])
            run.mkdir(parents=True, exist_ok=True)
            steps = [o for o in cmd if o.startswith("train.steps=")]
            (run / "stats.jsonl").write_text(json.dumps({"step": 1, "images": 8, "eval_swd": 1.0}) + "\n")
            (run / "steps").write_text(steps[-1] if steps else "")
        elif kind == "sample":
            run = Path(cmd[4])
            value = (3 if "steps=8" in (run / "steps").read_text() else 1) * 10 + int(float(arg["--cfg"]))
            np.savez(arg["--out"], arr_0=np.full((int(arg["--num"]), 16, 16, 3), value, np.uint8))
        else:
            mean = float(np.load(cmd[4])["arr_0"].mean())
            Path(arg["--json"]).write_text(json.dumps({"metrics": {"swd": mean, "num_samples": 64.0}}))


def test_curves_are_against_training_flops_and_rows_sharing_a_run_share_a_line(tmp_path):
    from dfm_cli.ablate.layout import run_dir

    body = '[[cell]]\nname = "a"\n[[cell]]\nname = "b"\n"{key}" = {value}\n'
    for key, value, labels in (("sample.cfg", 2.0, ["a / b"]), ("model.name", '"DFM-T/4"', ["a", "b"])):
        sweep, out = load_sweep(write_sweep(tmp_path, body.format(key=key, value=value))), tmp_path / key
        for run in sweep.runs:
            run_dir(out, run.run_id).mkdir(parents=True)
            (run_dir(out, run.run_id) / "stats.jsonl").write_text('{"step": 1, "images": 8, "eval_fid": 50.0}\n')
        curves = curve_series(sweep, collect(sweep, out))
        assert list(curves) == labels
        per_image = [train_compute(run.recipe)[1] / train_compute(run.recipe)[0] for run in sweep.runs]
        assert sorted({x for c in curves.values() for x, *_ in c["eval_fid"]}) == sorted(8 * f for f in per_image)


def test_sweep_runs_each_training_once_resumes_and_writes_results(tmp_path):
    sweep = load_sweep(TINY_SWEEP)
    out = tmp_path / "out"
    log = io.StringIO()
    broken = FakeDfm(fail_after=4)  # train, sample, eval, sample: stops before the second cell's eval
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, Console(file=log), runner=broken)
    assert re.search(r"^ablate \[1/4\] steps=4 cfg=1: train ", log.getvalue(), re.M)  # plain lines off a terminal
    fake = FakeDfm()
    rows = run_sweep(sweep, out, Console(file=io.StringIO()), runner=fake)
    assert fake.calls == ["eval", "train", "sample", "eval", "sample", "eval"]  # only what was missing
    assert len(list(out.glob("runs/*/stats.jsonl"))) == 2
    assert [r["swd"] for r in rows] == [11.0, 13.0, 31.0, 33.0]
    assert [r["swd_vs_baseline"] for r in rows] == [1.0, 1.0, 31 / 11, 33 / 13]
    with (out / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4 and float(table[3]["swd_vs_baseline"]) == pytest.approx(33 / 13)
    assert float(table[2]["train_flops"]) == train_compute(sweep.runs[1].recipe)[1]
    md = (out / "results.md").read_text()
    assert "| steps=8 cfg=3 | 8 | 3 | 64 |" in md and "2.538" in md
    assert {p.name for p in out.glob("*.png")} == {
        "plot_train.steps.png",
        "plot_sample.cfg.png",
        "curves.png",
        "samples.png",
    }
    again = FakeDfm()
    assert run_sweep(sweep, out, Console(file=io.StringIO()), runner=again) == rows and again.calls == []
    # a changed metric re-scores the kept samples; nothing is trained or sampled again
    sweep.eval.swd_levels = 1
    rescore = FakeDfm()
    run_sweep(sweep, out, Console(file=io.StringIO()), runner=rescore)
    assert rescore.calls == ["eval"] * 4


def test_each_training_gets_the_sweeps_wandb_group_its_name_and_its_settings(tmp_path, monkeypatch):
    """`dfm ablate` hands a run's W&B group, name and config to its `dfm train` in the environment
    (training/loggers.py reads them), and puts the environment back afterwards."""
    monkeypatch.delenv("DFM_WANDB_GROUP", raising=False)
    seen: dict[str, dict[str, str]] = {}

    class Recording(FakeDfm):
        def __call__(self, cmd, log, what):
            if cmd[3] == "train":
                seen[Path(cmd[cmd.index("--out") + 1]).name] = {
                    k: os.environ[k] for k in ("DFM_WANDB_GROUP", "DFM_WANDB_NAME", "DFM_WANDB_CONFIG")
                }
            else:
                assert "DFM_WANDB_GROUP" not in os.environ, "only the trainings join the group"
            super().__call__(cmd, log, what)

    sweep = load_sweep(TINY_SWEEP)
    run_sweep(sweep, tmp_path / "out", Console(file=io.StringIO()), runner=Recording())
    assert set(seen) == {run.run_id for run in sweep.runs} and "DFM_WANDB_GROUP" not in os.environ
    for run in sweep.runs:
        env = seen[run.run_id]
        assert env["DFM_WANDB_GROUP"] == "tiny: training steps x cfg" and env["DFM_WANDB_NAME"] == run.run_id
        assert json.loads(env["DFM_WANDB_CONFIG"]) == {
            "ablate": {
                "sweep": "tiny: training steps x cfg",
                "run": run.run_id,
                "cells": [c.name for c in run.cells],  # the two cfg values share the run
                "settings": {"train.steps": run.recipe.train.steps},  # sample.cfg is not the run's
            }
        }


def test_log_to_is_not_part_of_a_runs_id(tmp_path):
    """Adding a mirror to a sweep finds its trained runs again: where statistics also go is no
    part of what a run learns."""
    plain = load_sweep(TINY_SWEEP)
    body = TINY_SWEEP.read_text().replace('recipe = "../tiny.toml"', "")
    body += '\n[set]\n"train.log_to" = ["jsonl", "tensorboard"]\n'
    mirrored = load_sweep(write_sweep(tmp_path, body))
    assert [c.recipe.train.log_to for c in mirrored.cells] == [["jsonl", "tensorboard"]] * 4
    assert [c.run_id for c in mirrored.cells] == [c.run_id for c in plain.cells]
    assert [c.cell_id for c in mirrored.cells] == [c.cell_id for c in plain.cells]


def test_a_failing_command_names_its_log(tmp_path):
    log = tmp_path / "x.log"
    with pytest.raises(DfmError, match=r"dfm sample for cell 'a' failed \(exit 2\): --class 12: bad; log: "):
        run_command(
            ["sh", "-c", "echo working; echo 'error: --class 12: bad' >&2; exit 2"], log, "dfm sample for cell 'a'"
        )


@pytest.mark.e2e
def test_cli_dry_run_lists_cells_runs_and_time():
    proc = run_dfm("ablate", TINY_SWEEP, "--dry-run")
    assert "4 cells, 2 trained runs" in proc.stdout and proc.stdout.count("shared by 2") == 4
    assert "timed: one training step" in proc.stdout
    bad = run_dfm("ablate", ROOT / "recipes" / "tiny.toml", "--dry-run", check=False)
    assert bad.returncode == 2 and "is a recipe, not a sweep" in bad.stderr and "Traceback" not in bad.stderr


def test_a_run_and_cell_another_sweep_made_in_the_same_folder_are_reused(tmp_path):
    out = tmp_path / "out"
    first = load_sweep(write_sweep(tmp_path, '[[cell]]\nname = "short"\n"train.steps" = 4\n', "a.toml"))
    run_sweep(first, out, Console(file=io.StringIO()), runner=FakeDfm())
    second = load_sweep(write_sweep(tmp_path, '[grid]\n"train.steps" = [4, 8]\n', "b.toml"))
    assert second.cells[0].cell_id != first.cells[0].cell_id  # named by each sweep's cell names
    assert second.cells[0].cell_id.rsplit("-", 1)[1] == first.cells[0].cell_id.rsplit("-", 1)[1]
    fake = FakeDfm()
    rows = run_sweep(second, out, Console(file=io.StringIO()), runner=fake)
    assert fake.calls == ["train", "sample", "eval"]  # only the 8-step cell
    assert len(list(out.glob("runs/*/stats.jsonl"))) == 2 and [r["swd"] for r in rows] == [11.0, 31.0]


@pytest.mark.e2e
def test_tiny_sweep_end_to_end_and_resumed_equals_uninterrupted(tmp_path):
    """The CI sweep for real: 2 trained runs for 4 cells, and a sweep interrupted in its second
    training, then run again, ends with the same numbers."""
    whole = tmp_path / "whole"
    proc = subprocess.run(
        [sys.executable, "-m", "dfm_cli", "ablate", str(TINY_SWEEP), "--out", str(whole)],
        capture_output=True,
        text=True,
        timeout=3600,
    )  # a minute on 2 idle cores
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ablate [") >= 4 and "train" in proc.stdout  # plain lines: not a terminal
    assert len(list(whole.rglob("stats.jsonl"))) == 2
    assert len(list(csv.DictReader((whole / "results.csv").open()))) == 4
    assert (whole / "results.md").is_file() and len(list(whole.glob("*.png"))) >= 3

    calls = []

    def interrupted(cmd, log, what):
        calls.append(cmd[3])
        if calls.count("train") == 2:  # the second run stops at its step-4 checkpoint
            run_command(cmd + ["--set", "train.steps=4"], log, what)
            raise KeyboardInterrupt
        run_command(cmd, log, what)

    part = tmp_path / "part"
    sweep = load_sweep(TINY_SWEEP)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, part, Console(file=io.StringIO()), runner=interrupted)
    calls.clear()
    run_sweep(
        sweep,
        part,
        Console(file=io.StringIO()),
        runner=lambda c, log, what: (calls.append(c[3]), run_command(c, log, what)),
    )
    assert calls == ["train", "sample", "eval", "sample", "eval"]
    assert "resuming" in (part / "logs" / f"run-{sweep.runs[1].run_id}.log").read_text()
    assert (part / "results.csv").read_text() == (whole / "results.csv").read_text()
    first, second = (np.load(next((d / "cells").glob("steps=8-cfg=3*/samples.npz")))["arr_0"] for d in (whole, part))
    assert np.array_equal(first, second)


def test_in_training_reference_is_the_sweep_reference_and_shares_its_feature_cache(tmp_path, monkeypatch):
    from dfm_cli.data.datasets import build_dataset
    from dfm_cli.evaluation import evaluate
    from dfm_cli.evaluation.evaluate import reference_images
    from dfm_cli.evaluation.reference_cache import describe

    monkeypatch.setenv("DFM_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "ref.npz"
    write_reference("animal-mnist", "", 16, 0, 37, target)
    swept = evaluate.load_source(str(target))
    in_training = reference_images(build_dataset("animal-mnist", "", 16, 0), 37)
    assert in_training.shape == (37, 16, 16, 3) and in_training.dtype == np.uint8
    assert np.array_equal(swept.images, in_training)
    assert describe(swept.images) == describe(in_training)  # so one entry in the reference feature cache
    labels = build_dataset("animal-mnist", "", 16, 0).labels
    assert len(set(labels[np.linspace(0, len(labels) - 1, 37).round().astype(int)].tolist())) == len(
        set(labels.tolist())
    )


def test_preconditioning_changes_no_flops_and_is_planned_on_its_own():
    """A preconditioned cell is counted with its own model (unit level RMS before any data is
    seen), and its elementwise scaling adds no FLOPs."""
    from dfm_cli.ablate.compute import forward_flops_of
    from dfm_cli.config.recipe import load_recipe

    tiny = ROOT / "recipes" / "tiny.toml"
    plain = load_recipe(tiny, ["flow.standardize=true"])
    scaled = load_recipe(tiny, ["flow.standardize=true", "flow.precondition=true"])
    assert forward_flops_of(scaled) == forward_flops_of(plain) > 0


def test_the_ids_of_published_sweeps_never_change():
    """A run folder is found by its id, so a recipe key added later must leave the ids of runs
    that do not use it unchanged (ids.LATER_KEYS); otherwise every study retrains from scratch.
    These are the ids of runs the 64 px study trained and committed results for."""
    sweep = load_sweep(ROOT / "recipes" / "study" / "tune64_lr.toml")
    ids = {c.name: c.run_id for c in sweep.cells}
    assert ids["FM lr=0.004"] == "levels=1-p-stage=1-standardize=False-lr=0.004-3676937f"
    assert ids["DFM-2 lr=0.002"] == "lr=0.002-5ea4260e"


def test_plot_per_key_only_where_the_key_varies_along_a_line(tmp_path):
    """A grid's keys each get a plot; cells that differ in many keys at once (no two share a
    setting of the other keys) get none, instead of an unreadable one with a point per line."""
    from dfm_cli.ablate.figures import plot_key

    keys = ["train.steps", "sample.cfg"]

    def row(steps: str, cfg: str) -> dict:
        return {"train.steps": steps, "sample.cfg": cfg, "stats": {"fid": (1.0, None)}}

    grid = [row(s, c) for s in ("4", "8") for c in ("1", "3")]
    for key in keys:
        plot_key(grid, key, keys, tmp_path / f"{key}.png")
        assert (tmp_path / f"{key}.png").stat().st_size > 0
    cells = [row("4", "1"), row("8", "3")]
    for key in keys:
        plot_key(cells, key, keys, tmp_path / f"cells_{key}.png")
        assert not (tmp_path / f"cells_{key}.png").exists()
