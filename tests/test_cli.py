"""End-to-end: the real `dfm` command on a tiny recipe, as a user would run it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_dfm
from PIL import Image

from dfm_cli.method.decompose import LaplacianPyramid


@pytest.mark.e2e
def test_train_writes_a_complete_run_folder(tmp_path):
    run = tmp_path / "run"
    proc = run_dfm("train", TINY, "--out", run)
    assert "run folder" in proc.stdout
    assert (run / "recipe.toml").is_file()
    lines = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6, 8]
    last = lines[-1]
    for key in ("loss", "loss_level", "loss_t_bin", "images_per_s", "lr", "grad_norm", "images_seen"):
        assert key in last
    assert len(last["loss_level"]) == 2 and len(last["loss_t_bin"]) == 5
    latest = run / "checkpoints" / "latest"
    assert (latest / "model.safetensors").is_file() and (latest / "ema.safetensors").is_file()
    assert json.loads((latest / "state.json").read_text())["step"] == 8
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000000004", "step-000000008"]
    assert Image.open(run / "samples" / "grid.png").size[0] > 16
    # running the finished command again does nothing new and says so
    again = run_dfm("train", TINY, "--out", run)
    assert "resuming" in again.stderr and len((run / "stats.jsonl").read_text().splitlines()) == 4


@pytest.mark.e2e
def test_resume_with_a_different_recipe_is_refused(tmp_path):
    run = tmp_path / "run"
    run_dfm("train", TINY, "--out", run)
    proc = run_dfm("train", TINY, "--out", run, "--set", "train.lr=0.5", check=False)
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "Traceback" not in proc.stderr
    run_dfm("train", TINY, "--out", run, "--set", "train.steps=10")  # extending is fine


@pytest.mark.e2e
def test_sample_writes_grid_previews_and_reports_nfe(tmp_path):
    run = tmp_path / "run"
    run_dfm("train", TINY, "--out", run)
    out = tmp_path / "grid.png"
    proc = run_dfm(
        "sample",
        run,
        "--stages",
        "2",
        "--tau",
        "0.8",
        "--steps",
        "3,2",
        "--cfg",
        "1.5",
        "--n",
        "20",
        "--seed",
        "1",
        "--out",
        out,
        "--previews",
    )
    assert "NFE 5" in proc.stdout
    assert out.is_file() and (tmp_path / "grid_stage1.png").is_file() and (tmp_path / "grid_stage2.png").is_file()
    coarse = tmp_path / "coarse.png"
    run_dfm(
        "sample",
        run / "checkpoints" / "step-000000004",
        "--stages",
        "1",
        "--class",
        "3",
        "--n",
        "4",
        "--solver",
        "heun",
        "--out",
        coarse,
    )
    # the coarse level alone is half the resolution: 4 tiles of 8 px at scale 2
    assert Image.open(coarse).size[1] < Image.open(out).size[1]
    bad = run_dfm("sample", run, "--class", "12", "--out", out, check=False)
    assert bad.returncode == 2 and "--class 12" in bad.stderr
    missing = run_dfm("sample", tmp_path / "nothing", check=False)
    assert missing.returncode == 2 and "no checkpoint found" in missing.stderr


@pytest.mark.e2e
def test_decompose_default_photo_and_video(tmp_path):
    out = tmp_path / "dec"
    proc = run_dfm("decompose", "--levels", "3", "--out", out)
    assert "max recomposition error" in proc.stdout
    err = float(proc.stdout.split("max recomposition error (float32):")[1].split()[0])
    assert err <= 1e-5
    levels = np.load(out / "levels.npz")
    assert sorted(levels.files) == ["level_1", "level_2", "level_3"]
    pyr = LaplacianPyramid(3, [2, 2])
    recon = pyr.recompose([torch.from_numpy(levels[f"level_{s}"])[None] for s in (1, 2, 3)])
    assert recon.shape[-2:] == (424, 640) and levels["level_1"].shape[-2:] == (106, 160)
    for name in ("level_1.png", "level_2.png", "level_3.png", "recomposition.png"):
        assert (out / name).is_file()

    frames = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    gif = tmp_path / "clip.gif"
    Image.fromarray(frames[0]).save(gif, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]])
    run_dfm("decompose", gif, "--levels", "2", "--factors", "2", "--out", tmp_path / "vid")
    assert np.load(tmp_path / "vid" / "levels.npz")["level_1"].shape == (3, 4, 8, 8)

    bad = run_dfm("decompose", gif, "--levels", "3", "--factors", "3,2", check=False)
    assert bad.returncode == 2 and "not divisible" in bad.stderr and "--crop" in bad.stderr
    run_dfm("decompose", gif, "--levels", "3", "--factors", "3,2", "--crop", "--out", tmp_path / "cropped")
    assert np.load(tmp_path / "cropped" / "levels.npz")["level_3"].shape == (3, 4, 12, 12)


def test_the_error_boundary_maps_user_file_failures_and_keeps_bugs(tmp_path):
    import zipfile

    import pytest
    import typer

    from dfm_cli.commands.common import user_errors

    def command_raising(error):
        @user_errors
        def command(samples: Path = tmp_path / "a.npz"):
            raise error

        return command

    (tmp_path / "a.npz").write_bytes(b"PK")
    for error in (
        IsADirectoryError(21, "Is a directory", str(tmp_path / "out.npz")),
        PermissionError(13, "Permission denied", str(tmp_path / "ro")),
        zipfile.BadZipFile("File is not a zip file"),
    ):
        with pytest.raises(typer.Exit) as exit_info:
            command_raising(error)()
        assert exit_info.value.exit_code == 2
    for bug in (KeyError("num_classes"), OSError("no file named"), ZeroDivisionError(), TypeError("x")):
        with pytest.raises(type(bug)):  # internal bugs keep their traceback
            command_raising(bug)()
