"""The authors' imported models as `dfm` runs (issue 23): `dfm sample`/`dfm eval` on an import,
the FM→DFM finetune of their SiT (`recipes/paper/finetune_sit_xl2_512.toml`'s tiny twin) from
the exact imported velocity, and `dfm_cli.api.load_run` as docs/api.md shows it.

Everything runs on `tiny_elit` (tests/conftest.py): the authors' tiny SiT and DFM-SiT fixtures
imported by `dfm import elit`, with a random tiny autoencoder standing in for the SD-VAE."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_dfm
from PIL import Image
from rich.console import Console

from dfm_cli import distributed
from dfm_cli.config.recipe import load_recipe
from dfm_cli.errors import DfmError
from dfm_cli.methods.factory import load_single_level, load_trained
from dfm_cli.training.loop import Trainer

TWIN = ROOT / "recipes" / "tiny" / "finetune_sit_xl2_512.toml"


@pytest.fixture(scope="module")
def finetuned(tiny_elit, tmp_path_factory) -> Path:
    """The tiny twin trained 2 steps by `dfm train TWIN --init-from tiny-elit/sit`."""
    out = tmp_path_factory.mktemp("ft") / "elit_sit2dfm"
    run_dfm("train", TWIN, "--init-from", "tiny-elit/sit", "--out", out, cwd=tiny_elit)
    return out


@pytest.mark.e2e
def test_finetune_of_the_imported_sit_starts_at_its_velocity(tiny_elit, tmp_path, monkeypatch):
    """The model the training loop builds at step 0 (paper placement: the pretrained layers on
    the coarse level, carried at full size) predicts on that level what the imported SiT does,
    at every stage and with the null label; the new detail level predicts nothing yet."""
    monkeypatch.chdir(tiny_elit)
    fm = load_trained("tiny-elit/sit")[0].cpu()
    (tmp_path / "run").mkdir()  # `dfm train` holds (and makes) the folder before the trainer starts
    ctx = distributed.init()
    try:
        ema = Trainer(load_recipe(TWIN), tmp_path / "run", ctx, Console(quiet=True), []).ema.eval()
    finally:
        distributed.shutdown(ctx)
    assert ema.level_sizes == [(8, 8), (8, 8)]
    b = 6
    x, fine, t = torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8), torch.rand(b, 1)
    y = torch.tensor([0, 3, 999, 1000, 1000, 17])  # 1000: their null class
    diffs = []
    with torch.no_grad():
        expected = fm([x], t, y, torch.zeros(b, dtype=torch.long))[0]
        for stage in range(2):
            out = ema([x, fine], torch.cat([t, torch.rand(b, 1)], 1), y, torch.full((b,), stage))
            diffs.append(float((out[0] - expected).abs().max()))
            assert float(out[1].abs().max()) == 0
    print("step-0 max abs velocity difference per stage:", [f"{d:.1e}" for d in diffs])
    assert max(diffs) <= 1e-6 and float(expected.abs().max()) > 0.1


@pytest.mark.e2e
def test_finetune_refuses_other_conventions_than_the_imported_ones(tiny_elit, monkeypatch):
    """Positions and timestep features change no tensor: without the check the weights would
    load into a model that no longer computes the pretrained velocity."""
    monkeypatch.chdir(tiny_elit)
    info = load_trained("tiny-elit/sit")[2]
    for key, value in (("pos", "rope"), ("time_embed", "dit")):
        model = load_recipe(TWIN, [f"model.{key}={json.dumps(value)}"]).model
        with pytest.raises(DfmError, match=f"model.{key} = .* this run has '{value}'"):
            load_single_level("tiny-elit/sit", info, "dfm", model)
    assert load_single_level("tiny-elit/sit", info, "dfm", load_recipe(TWIN).model)


@pytest.mark.e2e
def test_finetuned_import_trains_and_samples_through_the_cli(finetuned, tmp_path):
    recipe = load_recipe(finetuned / "recipe.toml")
    assert (recipe.model.pos, recipe.model.time_embed, recipe.flow.levels) == ("sincos_wh", "sit", 2)
    assert "tiny-elit/sit/checkpoints/step-000400000" in recipe.train.init_from  # pinned to the import
    run_dfm("sample", finetuned, "--n", "4", "--out", tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[0] > 16


@pytest.mark.e2e
def test_imported_run_samples_and_evaluates_through_the_cli(tiny_elit, tmp_path):
    """`dfm sample RUN --num N` decodes the import through the autoencoder given at import
    (here a random stand-in for the SD-VAE); `dfm eval` scores the set."""
    start = time.perf_counter()
    samples = tmp_path / "samples.npz"
    run_dfm("sample", tiny_elit / "tiny-elit" / "dfm", "--num", "6", "--steps", "8,2", "--out", samples)
    images = np.load(samples)["arr_0"]
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    report = tmp_path / "eval.json"
    run_dfm("eval", samples, "--swd", "--swd-levels", "1", "--ref", ref, "--json", report)
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["num_samples"] == 6 and np.isfinite(metrics["swd"]) and metrics["swd"] > 0
    print(f"sample + eval of the import: {time.perf_counter() - start:.1f} s")


def doc_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.e2e
def test_api_doc_examples_run_as_written(tiny_elit, finetuned, tmp_path, monkeypatch):
    """docs/api.md's blocks, in order, with `runs/elit_dfm` the imported tiny DFM-SiT and
    `runs/elit_sit2dfm` the trained tiny finetune."""
    (tmp_path / "runs").mkdir()
    os.symlink(tiny_elit / "tiny-elit" / "dfm", tmp_path / "runs" / "elit_dfm")
    os.symlink(finetuned, tmp_path / "runs" / "elit_sit2dfm")
    monkeypatch.chdir(tmp_path)
    blocks = doc_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) == 3
    scope: dict = {}
    for block in blocks[:2]:
        exec(compile(block, "docs/api.md", "exec"), scope)
    assert scope["run"].settings.steps == (40, 10) and scope["run"].settings.tau == (0.9,)
    assert len(scope["result"].previews) == 2 and (tmp_path / "elit_cfg1.5_stage1.png").is_file()
    exec(compile(blocks[2], "docs/api.md", "exec"), scope)
    assert scope["images"].shape == (4, 3, 16, 16) and float(scope["images"].abs().max()) <= 1


def test_readme_published_models_commands_use_existing_flags():
    """Every `dfm` command of README's "Start from the published models", in its code block and
    in its text, names a real command, and every flag it passes is one of that command's."""
    import typer

    from dfm_cli.cli import app

    text = (ROOT / "README.md").read_text()
    section = text.split("## Start from the published models", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^dfm [^#\n]*", section, re.M) + re.findall(r"`(dfm [^`]*)`", section)
    assert len(commands) >= 3
    root = typer.main.get_command(app)
    for line in commands:
        words = line.split()[1:]
        command = root
        while hasattr(command, "commands"):  # a group (typer vendors its own click)
            command = command.commands.get(words.pop(0))
            assert command is not None, line
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        flags = {w.split("=")[0] for w in words if w.startswith("--")}
        assert flags <= known, f"{line}: {sorted(flags - known)} not options of this command"
