"""Sample sets: fingerprinted, resumable, shrinkable, extendable; and `dfm sample`'s checks."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, cli, run_dfm
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dfm_cli import distributed
from dfm_cli.cli import app
from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import LaplacianPyramid
from dfm_cli.method.sampler import SamplerSettings
from dfm_cli.sampling.sample_set import write_sample_set

PYR = LaplacianPyramid(2, [2])
SETTINGS = SamplerSettings((2, 1), (0.7,), cfg=1.5)
SOURCE = {"checkpoint": "digest-a", "ema": True, "autoencoder": None}


def make(model, out, num, batch=4, settings=SETTINGS, seed=0, source=SOURCE, **kw):
    return write_sample_set(
        model,
        PYR,
        settings,
        out,
        num=num,
        batch=batch,
        seed=seed,
        classes=10,
        source=source,
        ctx=distributed.Context(),
        **kw,
    )


def arrays(path):
    with np.load(path) as d:
        return d["arr_0"], d["arr_1"], json.loads(str(d["manifest"]))


# ----------------------------------------------------------------- manifests
@pytest.mark.parametrize(
    "change,named",
    [
        (dict(source={**SOURCE, "checkpoint": "digest-b"}), "checkpoint"),
        (dict(seed=1), "seed 0 → 1"),
        (dict(settings=SamplerSettings((2, 1), (0.7,), cfg=3.0)), "cfg 1.5 → 3.0"),
        (dict(source={**SOURCE, "ema": False}), "ema true → false"),
    ],
)
def test_a_set_made_otherwise_is_refused_in_one_line_or_started_over(model, tmp_path, change, named):
    for out in (tmp_path / "s.npz", tmp_path / "pngs"):
        make(model, out, 6)
        before = out.read_bytes() if out.is_file() else sorted(p.read_bytes() for p in out.iterdir())
        with pytest.raises(DfmError) as e:
            make(model, out, 6, **change)
        message = str(e.value)
        assert named in message and "--overwrite" in message and "\n" not in message
        after = out.read_bytes() if out.is_file() else sorted(p.read_bytes() for p in out.iterdir())
        assert after == before  # nothing already written is lost
        make(model, out, 6, overwrite=True, **change)
    images, _, manifest = arrays(tmp_path / "s.npz")
    expected = make(model, tmp_path / "fresh.npz", 6, **change)
    assert np.array_equal(images, arrays(expected)[0])
    folder = json.loads((tmp_path / "pngs" / "manifest.json").read_text())
    assert folder == {**manifest, "shape": [16, 16, 1]}  # grey PNGs stay one-channel


def test_manifest_records_what_made_the_set(model, tmp_path):
    _, _, m = arrays(make(model, tmp_path / "s.npz", 3))
    assert m == {
        "checkpoint": "digest-a",
        "ema": True,
        "autoencoder": None,
        "seed": 0,
        "steps": [2, 1],
        "tau": [0.7],
        "cfg": 1.5,
        "interval": [0.0, 1.0],
        "solver": "euler",
        "mask_input": True,
        "tied_timesteps": False,
        "shift": 1.0,
        "cond_noise": 0.025,
        "shape": [16, 16, 3],
        "num": 3,
    }


def test_a_file_without_a_manifest_is_not_trusted(model, tmp_path):
    out = tmp_path / "old.npz"
    np.savez(out, arr_0=np.zeros((4, 16, 16, 3), np.uint8), arr_1=np.arange(4))
    with pytest.raises(DfmError, match="no sample-set manifest"):
        make(model, out, 4)


# ----------------------------------------------------------------- shrink, extend, resume
def same_samples(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding: a sample's noise does not depend on the batch, but on some
    CPUs a matmul over another batch size rounds differently in the last bit, which can move
    a few uint8 pixels by one level."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1 and (a != b).mean() < 1e-3


def test_shrinking_holds_exactly_num_and_extending_keeps_the_first_samples(model, tmp_path):
    whole, labels, _ = arrays(make(model, tmp_path / "whole.npz", 10, batch=3))
    out = tmp_path / "s.npz"
    make(model, out, 7, batch=4)
    first = arrays(out)[0]
    assert same_samples(first, whole[:7])
    make(model, out, 3)
    images, lab, manifest = arrays(out)
    assert images.shape[0] == 3 and lab.tolist() == [0, 1, 2] and manifest["num"] == 3
    assert np.array_equal(images, first[:3])  # shrinking keeps the stored samples, bit for bit
    make(model, out, 10, batch=2)
    images, lab, manifest = arrays(out)
    assert np.array_equal(images[:3], first[:3])  # extending does not regenerate what is kept
    assert same_samples(images, whole) and np.array_equal(lab, labels) and manifest["num"] == 10

    folder = tmp_path / "pngs"
    make(model, folder, 7)
    stamp = (folder / "000002.png").stat().st_mtime_ns
    make(model, folder, 3)
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    make(model, folder, 10, batch=3)
    assert len(list(folder.glob("*.png"))) == 10 and (folder / "000002.png").stat().st_mtime_ns == stamp
    assert same_samples(np.asarray(Image.open(folder / "000009.png")), whole[9, ..., 0])


def test_an_interrupted_set_resumed_smaller_never_holds_more_than_num(model, tmp_path):
    out = tmp_path / "s.npz"
    make(model, out, 12, batch=4)
    parts = tmp_path / "s.npz.parts"
    # an interrupted run of --num 12: its manifest and all three parts are there, no .npz yet
    parts.mkdir()
    images, labels, manifest = arrays(out)
    (parts / "manifest.json").write_text(json.dumps(manifest))
    for a in (0, 4, 8):
        np.savez(parts / f"part-{a:09d}-{a + 4:09d}.npz", arr_0=images[a : a + 4], arr_1=labels[a : a + 4])
    out.unlink()
    make(model, out, 5, batch=4)
    got, lab, m = arrays(out)
    assert got.shape[0] == 5 and np.array_equal(got, images[:5]) and lab.tolist() == list(range(5))
    assert m["num"] == 5 and not parts.exists()


def test_only_verified_parts_are_reused(model, tmp_path):
    reference = arrays(make(model, tmp_path / "ref.npz", 8))[0]
    out, parts = tmp_path / "s.npz", tmp_path / "s.npz.parts"
    make(model, tmp_path / "tmp.npz", 8)
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps(arrays(tmp_path / "tmp.npz")[2]))
    (parts / "part-000000000-000000004.npz").write_bytes(b"PK\x03\x04 truncated")  # corrupt
    np.savez(
        parts / "part-000000004-000000008.npz", arr_0=np.zeros((3, 16, 16, 3), np.uint8), arr_1=np.arange(4, 7)
    )  # a bad count
    make(model, out, 8)
    assert np.array_equal(arrays(out)[0], reference)

    folder = tmp_path / "pngs"
    make(model, folder, 6)
    (folder / "000001.png").write_bytes((folder / "000001.png").read_bytes()[:40])  # truncated
    Image.new("L", (8, 8)).save(folder / "000004.png")  # wrong size
    stamp = (folder / "000000.png").stat().st_mtime_ns
    make(model, folder, 6)
    for i in (1, 4):
        assert np.array_equal(np.asarray(Image.open(folder / f"{i:06d}.png")), reference[i, ..., 0])
    assert (folder / "000000.png").stat().st_mtime_ns == stamp


def test_old_samples_without_a_manifest_in_a_folder_are_refused(model, tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.new("L", (16, 16)).save(folder / "000000.png")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(DfmError, match="without a manifest"):
        make(model, folder, 2)
    make(model, folder, 2, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"  # --overwrite removes only the set's own files
    assert len(list(folder.glob("*.png"))) == 2


# ----------------------------------------------------------------- the command
@pytest.mark.e2e
def test_sample_without_a_run_takes_the_newest_under_runs(trained, tmp_path):
    none = cli("sample", cwd=tmp_path)
    assert none.exit_code == 2 and "no trained run under runs/" in none.stderr
    assert len(none.stderr.strip().splitlines()) == 1
    for name, _age in (("old", 100), ("new", 0), ("empty", -50)):
        shutil.copytree(trained, tmp_path / "runs" / name)
    shutil.rmtree(tmp_path / "runs" / "empty" / "checkpoints")
    for ckpt in (tmp_path / "runs" / "old" / "checkpoints").glob("step-*"):
        t = (ckpt / "state.json").stat().st_mtime - 1000
        os.utime(ckpt / "state.json", (t, t))
    got = cli("sample", "--stages", "2", "--tau", "0.8", "--n", "4", cwd=tmp_path)
    assert got.exit_code == 0, got.stderr
    assert "newest run under runs/: runs/new" in got.stdout and (tmp_path / "grid.png").is_file()


@pytest.mark.e2e
def test_sample_prints_plain_progress_lines_to_a_log(trained, tmp_path):
    proc = run_dfm("sample", trained, "--num", "6", "--batch", "3", "--steps", "1,1", "--out", tmp_path / "s.npz")
    assert "sample 3/6" in proc.stderr and "sample 6/6 (100%)" in proc.stderr
    again = run_dfm(
        "sample", trained, "--num", "6", "--steps", "1,1", "--seed", "2", "--out", tmp_path / "s.npz", check=False
    )
    assert again.returncode == 2 and "seed 0 → 2" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args,message",
    [
        (["--stages", "3"], "--stages 3: the model has 2 levels"),
        (["--stages", "1", "--steps", "3,2"], "--steps 3,2: give 1 step count, one per stage"),
        (["--stages", "2", "--steps", "3"], "--steps 3: give 2 step counts"),
        (["--steps", "3,0"], "--steps 3,0"),
        (["--tau", "1.5"], "--tau 1.5"),
        (["--tau", "0.6,0.7"], "--tau 0.6,0.7"),
        (["--interval", "0.9,0.1"], "--interval 0.9,0.1"),
        (["--interval", "0.5"], "--interval 0.5"),
        (["--solver", "rk4"], "--solver rk4"),
        (["--n", "0"], "--n 0: must be at least 1"),
        (["--num", "4", "--batch", "0"], "--batch 0: must be at least 1"),
        (["--num", "0"], "--num 0: must be at least 1"),
        (["--out", "{tmp}/grid.xyz"], "a grid is written as .png"),
        (["--out", "{tmp}/grid.gif"], "write an image grid as .png"),
        (["--num", "4", "--out", "{tmp}/set.png"], "write an ADM .npz file or a folder"),
        (["--num", "4", "--out", "{tmp}/afile"], "is a file, but a folder is needed"),
        (["--out", "{tmp}/afile/grid.png"], "is a file, so nothing can be written under it"),
        (["--out", "{tmp}/adir.png"], "is a folder, but a file is needed"),
        (["--class", "12"], "--class 12"),
    ],
)
def test_bad_flags_stop_before_any_work_with_one_line(trained, tmp_path, args, message):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    before = sorted(tmp_path.iterdir())
    got = cli("sample", trained, *[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert got.exit_code == 2 and message in got.stderr, got.stderr
    assert len(got.stderr.strip().splitlines()) == 1 and got.exception is None or isinstance(got.exception, SystemExit)
    assert sorted(tmp_path.iterdir()) == before  # nothing written


@pytest.mark.e2e
def test_non_finite_weights_are_an_error_not_a_black_grid(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for ckpt in (run / "checkpoints").glob("step-*"):
        ema = load_file(ckpt / "ema.safetensors")
        name = next(iter(ema))
        ema[name] = torch.full_like(ema[name], float("nan"))
        save_file(ema, ckpt / "ema.safetensors")
    changed = cli("sample", run, "--out", tmp_path / "g.png")  # the recorded digest catches it first
    assert changed.exit_code == 2 and "SHA-256 differs" in changed.stderr
    got = cli("sample", run, "--no-verify", "--out", tmp_path / "g.png")  # and unverified, the NaN check
    assert got.exit_code == 2 and "hold NaN or inf" in got.stderr and "--no-ema" in got.stderr
    assert not (tmp_path / "g.png").exists()
    assert cli("sample", run, "--no-ema", "--n", "2", "--out", tmp_path / "g.png").exit_code == 0


def test_a_run_trained_on_some_classes_samples_only_those(tmp_path):
    """`data.classes = [8, 9]`: the grid, `dfm sample --num` and evaluation draw classes 8 and 9
    in turn (a finetune on a subset is scored against that subset)."""
    from rich.console import Console

    from dfm_cli.config.recipe import load_recipe
    from dfm_cli.training.loop import train

    run = tmp_path / "run"
    train(load_recipe(TINY, ["data.classes=[8, 9]", "train.steps=2"]), run, console=Console(quiet=True))
    result = CliRunner().invoke(
        app, ["sample", str(run), "--num", "5", "--batch", "5", "--out", str(tmp_path / "s.npz")]
    )
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as d:
        assert d["arr_1"].tolist() == [8, 9, 8, 9, 8]
