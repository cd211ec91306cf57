"""Bad inputs, as a new user types them: each must exit non-zero with one line on stderr, show no
traceback, and leave nothing behind (no new, changed or removed file).

Rows run in-process through Typer's `CliRunner`: an uncaught exception there is a traceback a
user would see, so a row passes only if the command ended through `SystemExit`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image
from typer.testing import CliRunner

from dfm_cli.cli import app

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores file permissions


@dataclass
class World:
    """The row's own folder (also the working directory) and a finished tiny run shared by all rows."""

    tmp: Path
    run: Path

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def npz(self, name: str, **arrays) -> Path:
        path = self.tmp / name
        np.savez(path, **arrays)
        return path

    def images(self, name: str = "a.npz", shift: int = 0) -> Path:
        rng = np.random.default_rng(shift)
        return self.npz(name, arr_0=np.clip(rng.normal(120 + shift, 40, (16, 16, 16, 3)), 0, 255).astype(np.uint8))

    def png(self, name: str, size: int = 16) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size, 3), 100, np.uint8)).save(path)
        return path

    def corrupt_png(self, name: str) -> Path:
        return self.write(name, b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)

    def truncated_png(self, name: str) -> Path:
        good = self.png(name, size=64)
        data = good.read_bytes()
        good.write_bytes(data[: len(data) // 2])
        return good

    def truncated_npz(self, name: str) -> Path:
        path = self.images(name)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    def folder(self, name: str) -> Path:
        for c in ("cat", "dog"):
            for i in range(2):
                self.png(f"{name}/{c}/{i}.png")
        return self.tmp / name

    def run_copy(self, edit_state=None, truncate: str | None = None) -> Path:
        """A copy of the shared run, its checkpoints' state edited or one of their files cut short."""
        copy = self.tmp / "copied-run"
        shutil.copytree(self.run, copy, symlinks=True)
        for checkpoint in (copy / "checkpoints").glob("step-*"):
            if edit_state is not None:
                state = checkpoint / "state.json"
                state.write_text(json.dumps(edit_state(json.loads(state.read_text()))))
            if truncate is not None:
                f = checkpoint / truncate
                f.write_bytes(f.read_bytes()[:100])
        return copy

    def recipe(self, text: str, name: str = "r.toml") -> Path:
        return self.write(name, TINY.read_text() + "\n" + text)


def drop(key: str):
    return lambda state: {k: v for k, v in state.items() if k != key}


def recipe_with(section: str, line: str):
    """A tiny recipe with `line` added under `[section]` (TOML keeps one table per name)."""

    def make(w: World) -> Path:
        text = TINY.read_text().replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)
        if f"[{section}]" not in text:
            text += f"\n[{section}]\n{line}\n"
        return w.write("r.toml", text)

    return make


# (id, argv from the world, a piece of the one-line message), plus marks where another branch fixes it.


def train_on(w, recipe: Path | str) -> list:
    """`dfm train RECIPE` into the workspace's `o` folder."""
    return ["train", recipe, "--out", w.tmp / "o"]


def train_with(w, override: str) -> list:
    """`dfm train` of the tiny recipe with one `--set` override."""
    return ["train", TINY, "--set", override, "--out", w.tmp / "o"]


def against_b(w, *flags: str) -> list:
    """`dfm eval` of the workspace's images against its 30-image reference `b.npz`."""
    return ["eval", w.images(), "--ref", w.images("b.npz", 30), *flags]


ROWS = [
    # ------------------------------------------------------------------ train
    ("train-negative-lr", lambda w: train_on(w, w.write("r.toml", "[train]\nlr = -1e-4\n")), "train.lr = -0.0001"),
    ("train-one-beta", lambda w: train_on(w, recipe_with("train", "betas = [0.9]")(w)), "train.betas"),
    ("train-resolution-65536", lambda w: train_with(w, "data.resolution=65536"), "GiB"),
    ("train-class-dropout-1.5", lambda w: train_with(w, "model.class_dropout=1.5"), "model.class_dropout"),
    (
        "train-warmup-minus-3",
        lambda w: train_on(w, recipe_with("train", "warmup_steps = -3")(w)),
        "train.warmup_steps = -3",
    ),
    (
        "train-recipe-not-utf8",
        lambda w: train_on(w, w.write("latin.toml", "# caf\xe9\n".encode("latin-1"))),
        "latin.toml",
    ),
    ("train-recipe-missing", lambda w: train_on(w, w.tmp / "nope.toml"), "nope.toml"),
    ("train-recipe-is-a-folder", lambda w: train_on(w, w.folder("rf")), "rf"),
    ("train-recipe-not-toml", lambda w: train_on(w, w.write("bad.toml", "[train\n")), "not valid TOML"),
    ("train-batch-0", lambda w: train_with(w, "train.batch_size=0"), "train.batch_size = 0"),
    ("train-specialize-typo", lambda w: train_with(w, "model.specialize=mpl"), "did you mean 'mlp'"),
    ("train-unknown-decomposition", lambda w: train_with(w, "flow.decomposition=haar"), "flow.decomposition"),
    ("train-eval-metric-kid", lambda w: train_with(w, "train.eval_metrics=['kid']"), "train.eval_metrics"),
    ("train-tau-above-1", lambda w: train_with(w, "sample.tau=[1.5]"), "sample.tau"),
    ("train-grad-clip-0", lambda w: train_with(w, "train.grad_clip=0"), "train.grad_clip"),
    ("train-eps-negative", lambda w: train_with(w, "train.eps=-1e-8"), "train.eps"),
    ("train-eval-num-0", lambda w: train_with(w, "train.eval_num=0"), "train.eval_num"),
    ("train-bad-set-syntax", lambda w: train_with(w, "trainsteps"), "expected section.key=value"),
    (
        "train-folder-missing",
        lambda w: [
            "train",
            TINY,
            "--set",
            "data.name=folder",
            "--set",
            f"data.path={w.tmp / 'none'}",
            "--out",
            w.tmp / "o",
        ],
        "is not a folder",
    ),
    ("train-out-is-a-file", lambda w: ["train", TINY, "--out", w.write("taken", "x")], "taken"),
    pytest.param(
        "train-corrupt-png-strict",
        lambda w: (
            [
                "train",
                TINY,
                "--set",
                "data.name=folder",
                "--set",
                f"data.path={w.folder('imgs')}",
                "--set",
                "data.strict=true",
                "--out",
                w.tmp / "o",
            ]
            if w.corrupt_png("imgs/cat/bad.png")
            else []
        ),
        "bad.png",
    ),
    pytest.param(
        "train-out-read-only",
        lambda w: (os.chmod(w.folder("ro"), 0o500), ["train", TINY, "--out", w.tmp / "ro" / "run"])[1],
        "Permission denied",
        marks=pytest.mark.skipif(ROOT_USER, reason="root ignores file permissions"),
    ),
    # ------------------------------------------------------------------ sample
    pytest.param("sample-n-0", lambda w: ["sample", w.run, "--n", "0", "--out", w.tmp / "g.png"], "--n"),
    ("sample-batch-0", lambda w: ["sample", w.run, "--num", "4", "--batch", "0", "--out", w.tmp / "s.npz"], "--batch"),
    ("sample-num-0", lambda w: ["sample", w.run, "--num", "0", "--out", w.tmp / "s.npz"], "--num"),
    pytest.param("sample-out-xyz", lambda w: ["sample", w.run, "--n", "2", "--out", w.tmp / "x.xyz"], "x.xyz"),
    (
        "sample-num-out-png",
        lambda w: ["sample", w.run, "--num", "4", "--out", w.tmp / "x.png"],
        ".npz file or a folder",
    ),
    pytest.param(
        "sample-num-out-is-a-file",
        lambda w: ["sample", w.run, "--num", "2", "--steps", "1,1", "--out", w.write("taken", "x")],
        "taken",
    ),
    ("sample-stages-5", lambda w: ["sample", w.run, "--stages", "5", "--out", w.tmp / "g.png"], "--stages 5"),
    ("sample-tau-1.5", lambda w: ["sample", w.run, "--tau", "1.5", "--n", "2", "--out", w.tmp / "g.png"], "tau"),
    ("sample-steps-zero", lambda w: ["sample", w.run, "--steps", "0,2", "--n", "2", "--out", w.tmp / "g.png"], "steps"),
    pytest.param(
        "sample-interval-reversed",
        lambda w: ["sample", w.run, "--interval", "0.9,0.1", "--n", "2", "--out", w.tmp / "g.png"],
        "--interval",
    ),
    ("sample-class-12", lambda w: ["sample", w.run, "--class", "12", "--out", w.tmp / "g.png"], "--class 12"),
    ("sample-no-run", lambda w: ["sample", w.tmp / "nothing"], "no checkpoint found"),
    pytest.param(
        "sample-state-missing-keys",
        lambda w: ["sample", w.run_copy(drop("num_classes")), "--n", "2", "--out", w.tmp / "g.png"],
        "state.json",
    ),  # RunInfo reads state.json
    (
        "sample-truncated-weights",
        lambda w: ["sample", w.run_copy(truncate="ema.safetensors"), "--n", "2", "--out", w.tmp / "g.png"],
        "unreadable checkpoint",
    ),
    # ------------------------------------------------------------------ eval
    ("eval-max-fid-without-fid", lambda w: against_b(w, "--swd", "--max-fid", "10"), "add --fid"),
    ("eval-max-swd-nan", lambda w: against_b(w, "--swd", "--max-swd", "nan"), "NaN"),
    ("eval-min-recall-nan", lambda w: against_b(w, "--pr", "--min-recall", "nan"), "NaN"),
    ("eval-min-precision-without-pr", lambda w: against_b(w, "--fid", "--min-precision", "0.5"), "add --pr"),
    (
        "eval-truncated-npz",
        lambda w: ["eval", w.truncated_npz("t.npz"), "--ref", w.images("b.npz", 30), "--swd"],
        "t.npz",
    ),
    pytest.param(
        "eval-corrupt-png-folder",
        lambda w: [
            "eval",
            (w.png("pngs/0.png"), w.corrupt_png("pngs/1.png"))[0].parent,
            "--ref",
            w.images("b.npz", 30),
            "--swd",
        ],
        "1.png",
    ),  # the folder lister (load_source) names the image
    (
        "eval-mu-without-sigma",
        lambda w: ["eval", w.images(), "--ref", w.npz("mu.npz", mu=np.zeros(2048)), "--fid"],
        "has mu but no sigma",
    ),
    ("eval-batch-0", lambda w: against_b(w, "--swd", "--batch", "0"), "--batch 0"),
    ("eval-json-is-a-folder", lambda w: against_b(w, "--swd", "--json", w.folder("jf")), "--json"),
    ("eval-stats-out-txt", lambda w: ["eval", w.images(), "--stats-out", w.tmp / "s.txt"], ".npz"),
    ("eval-no-run-no-samples", lambda w: ["eval", "--fid"], "no trained run under runs"),
    ("eval-num-with-samples", lambda w: against_b(w, "--swd", "--num", "5"), "--num 5"),
    (
        "eval-bad-inception-weights",
        lambda w: [
            "eval",
            w.images(),
            "--ref",
            w.images("b.npz", 30),
            "--fid",
            "--inception-weights",
            w.write("w.pth", b"garbage"),
        ],
        "w.pth",
    ),
    (
        "eval-float-samples",
        lambda w: [
            "eval",
            w.npz("f.npz", arr_0=np.full((4, 8, 8, 3), np.nan)),
            "--swd",
            "--ref",
            w.images("b.npz", 30),
        ],
        "uint8",
    ),
    ("eval-no-metric", lambda w: ["eval", w.images(), "--ref", w.images("b.npz", 30)], "choose at least one metric"),
    ("eval-missing-samples", lambda w: ["eval", w.tmp / "none.npz", "--swd"], "none.npz"),
    # ------------------------------------------------------------------ encode
    pytest.param(
        "encode-shard-size-0",
        lambda w: ["encode", w.folder("src"), "--out", w.tmp / "store", "--resolution", "16", "--shard-size", "0"],
        "--shard-size",
    ),
    pytest.param(
        "encode-batch-0",
        lambda w: ["encode", w.folder("src"), "--out", w.tmp / "store", "--resolution", "16", "--batch", "0"],
        "--batch",
    ),
    pytest.param(
        "encode-resolution-0",
        lambda w: ["encode", w.folder("src"), "--out", w.tmp / "store", "--resolution", "0"],
        "--resolution",
    ),
    ("encode-missing-source", lambda w: ["encode", w.tmp / "nowhere", "--out", w.tmp / "store"], "nowhere"),
    ("encode-unknown-ae", lambda w: ["encode", w.folder("src"), "--out", w.tmp / "store", "--ae", "vqgan"], "vqgan"),
    pytest.param(
        "encode-out-is-a-file",
        lambda w: ["encode", w.folder("src"), "--out", w.write("taken", "x"), "--resolution", "16"],
        "taken",
    ),
    # ------------------------------------------------------------------ decompose
    ("decompose-corrupt-png", lambda w: ["decompose", w.corrupt_png("bad.png"), "--out", w.tmp / "d"], "bad.png"),
    ("decompose-truncated-png", lambda w: ["decompose", w.truncated_png("cut.png"), "--out", w.tmp / "d"], "cut.png"),
    ("decompose-missing-file", lambda w: ["decompose", w.tmp / "none.png", "--out", w.tmp / "d"], "none.png"),
    (
        "decompose-factors-not-numbers",
        lambda w: ["decompose", w.png("p.png"), "--factors", "x", "--out", w.tmp / "d"],
        "--factors",
    ),
    ("decompose-out-is-a-file", lambda w: ["decompose", w.png("p.png", 32), "--out", w.write("taken", "x")], "taken"),
    (
        "decompose-not-divisible",
        lambda w: ["decompose", w.png("p.png", 30), "--levels", "3", "--out", w.tmp / "d"],
        "--crop",
    ),
    # ------------------------------------------------------------------ ablate
    ("ablate-sweep-missing", lambda w: ["ablate", w.tmp / "none.toml", "--dry-run"], "none.toml"),
    ("ablate-sweep-not-toml", lambda w: ["ablate", w.write("s.toml", "[grid\n"), "--dry-run"], "s.toml"),
    ("ablate-recipe-not-sweep", lambda w: ["ablate", TINY, "--dry-run"], "is a recipe, not a sweep"),
    (
        "ablate-base-missing",
        lambda w: ["ablate", w.write("s.toml", 'recipe = "gone.toml"\n[grid]\n"sample.cfg" = [1.0]\n'), "--dry-run"],
        "gone.toml",
    ),
    (
        "ablate-unknown-grid-key",
        lambda w: ["ablate", w.write("s.toml", f'recipe = "{TINY}"\n[grid]\n"train.stpes" = [1, 2]\n'), "--dry-run"],
        "train.stpes",
    ),
    (
        "ablate-grid-bad-range",
        lambda w: ["ablate", w.write("s.toml", f'recipe = "{TINY}"\n[grid]\n"train.lr" = [-1.0]\n'), "--dry-run"],
        "train.lr",
    ),
    (
        "ablate-unknown-metric",
        lambda w: [
            "ablate",
            w.write("s.toml", f'recipe = "{TINY}"\n[grid]\n"sample.cfg" = [1.0, 2.0]\n[eval]\nmetrics = ["fdi"]\n'),
            "--dry-run",
        ],
        "fdi",
    ),
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("shared") / "run"
    result = CliRunner().invoke(app, ["train", str(TINY), "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file (and link) under `roots`, with its size and modification time."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            st = path.lstat()
            out[str(path)] = (st.st_size, st.st_mtime_ns) if not path.is_dir() else (0, 0)
    return out


@pytest.mark.parametrize("name,argv,message", ROWS, ids=[getattr(r, "values", r)[0] for r in ROWS])
def test_bad_input_gives_one_line_and_leaves_nothing(name, argv, message, tmp_path, trained_run, monkeypatch):
    world = World(tmp_path / "row", trained_run)
    world.tmp.mkdir()
    monkeypatch.chdir(world.tmp)
    monkeypatch.setenv("DFM_CACHE", str(tmp_path / "cache"))
    args = [str(a) for a in argv(world)]
    before = snapshot(world.tmp, trained_run)
    result = CliRunner().invoke(app, args)
    for path in world.tmp.rglob("*"):  # let the snapshot (and pytest's clean-up) see read-only folders
        if path.is_dir():
            path.chmod(0o700)
    assert isinstance(result.exception, SystemExit) or result.exception is None, (
        f"traceback for {args}: {result.exception!r}"
    )
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(world.tmp, trained_run) == before, "the command left files behind or changed them"


def test_there_are_at_least_forty_rows():
    assert len(ROWS) >= 40
