"""FM→DFM finetuning: a single-level model converted with `train.init_from` predicts, at
step 0, exactly what it predicted before; the new levels' layers start at zero."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import TINY, run_dfm
from dfm_cli.errors import DfmError
from dfm_cli.factory import build_model
from dfm_cli.init_from import convert_single_level, per_level_parameters
from dfm_cli.recipe import load_recipe
from dfm_cli.train import train

FM = ["flow.levels=1", "flow.p_stage=[1.0]", "flow.factors=[]", "sample.steps=[5]", "sample.tau=[]"]
SHAPE, CLASSES = (1, 16, 16), 10


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (a trained model's heads are not zero), so equality means something."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("levels", [2, 3])
def test_converted_model_reproduces_the_single_level_velocity_at_step_0(levels):
    recipe = load_recipe(TINY, ["model.name=DFM-N/4", "data.resolution=16"] if levels == 2 else
                         ["model.name=DFM-N/4", "data.resolution=16", "flow.levels=3", "flow.factors=[2, 2]",
                          "sample.steps=[2, 2, 2]", "flow.p_stage=[0.4, 0.3, 0.3]"])
    fm = randomized(build_model(load_recipe(TINY, ["model.name=DFM-N/4", "data.resolution=16", *FM]), SHAPE, CLASSES))
    dfm = build_model(recipe, SHAPE, CLASSES).eval()
    convert_single_level(dfm, fm.state_dict())

    b = 5
    x = torch.randn(b, *SHAPE)
    t, y = torch.rand(b, 1), torch.randint(0, CLASSES + 1, (b,))
    coarse = [torch.randn(b, 1, *size) for size in dfm.level_sizes[:-1]]  # anything: the model ignores it
    with torch.no_grad():
        expected = fm([x], t, y, torch.zeros(b, dtype=torch.long))[0]
        for stage in range(levels):
            out = dfm([*coarse, x], torch.cat([torch.rand(b, levels - 1), t], 1), y,
                      torch.full((b,), stage, dtype=torch.long))
            torch.testing.assert_close(out[-1], expected, rtol=0, atol=1e-6)
            assert all(float(o.abs().max()) == 0 for o in out[:-1])  # new heads predict nothing yet
    assert expected.abs().max() > 0.01


def test_conversion_refuses_a_model_of_another_patch_size():
    fm = build_model(load_recipe(TINY, ["model.name=DFM-N/2", "data.resolution=16", *FM]), SHAPE, CLASSES)
    dfm = build_model(load_recipe(TINY, ["model.name=DFM-N/4", "data.resolution=16"]), SHAPE, CLASSES)
    with pytest.raises(DfmError, match="pretrained patch size"):
        convert_single_level(dfm, fm.state_dict())


def test_per_level_only_steps_keep_the_shared_layers_fixed(tmp_path):
    fm_run = tmp_path / "fm"
    train(load_recipe(TINY, FM), fm_run, console=Console(quiet=True))
    recipe = load_recipe(TINY, [f"train.init_from={fm_run}", "train.per_level_only_steps=8"])
    train(recipe, tmp_path / "dfm", console=Console(quiet=True))
    before = load_file(fm_run / "checkpoints" / "step-000000008" / "ema.safetensors")
    after = load_file(tmp_path / "dfm" / "checkpoints" / "step-000000008" / "model.safetensors")
    model = build_model(recipe, (1, 32, 32), CLASSES)
    trained = per_level_parameters(model)
    assert "patch_embeds.0.proj.weight" in trained and "blocks.0.attn.qkv.weight" not in trained
    for name in after:
        if name not in trained and name in before and not name.startswith("stage_embedder"):
            assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["patch_embeds.0.proj.weight"], torch.zeros_like(after["patch_embeds.0.proj.weight"]))


def test_cli_init_from_trains_and_samples_and_refuses_a_multi_level_source(tmp_path):
    run_dfm("train", TINY, *[a for s in FM for a in ("--set", s)], "--set", "train.steps=2", "--out", tmp_path / "fm")
    run_dfm("train", TINY, "--init-from", tmp_path / "fm", "--set", "train.steps=2", "--out", tmp_path / "dfm")
    run_dfm("sample", tmp_path / "dfm", "--out", tmp_path / "grid.png")
    assert (tmp_path / "grid.png").is_file()
    refused = run_dfm("train", TINY, "--init-from", tmp_path / "dfm", "--out", tmp_path / "again", check=False)
    assert refused.returncode != 0 and "flow.levels = 1" in refused.stderr and "Traceback" not in refused.stderr
