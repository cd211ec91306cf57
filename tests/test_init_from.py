"""FM→DFM finetuning: a single-level model converted with `train.init_from` predicts, at
step 0, exactly what it predicted before; the new levels' layers start at zero."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, run_dfm
from rich.console import Console
from safetensors.torch import load_file

from dfm_cli.config.recipe import load_recipe
from dfm_cli.errors import DfmError
from dfm_cli.methods.factory import build_model
from dfm_cli.models.conversion import convert_single_level, per_level_parameters
from dfm_cli.training.loop import train

FM = ["flow.levels=1", "flow.p_stage=[1.0]", "flow.factors=[]", "sample.steps=[5]", "sample.tau=[]"]
SHAPE, CLASSES = (1, 16, 16), 10


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (a trained model's heads are not zero), so equality means something."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("levels, specialize", [(2, "none"), (3, "none"), (2, "all")])
def test_converted_model_reproduces_the_single_level_velocity_at_step_0(levels, specialize):
    """Also with per-stage experts: they start as copies of the pretrained shared weights."""
    recipe = load_recipe(
        TINY,
        [f"model.specialize={specialize}", "model.name=DFM-N/4", "data.resolution=16"]
        + (
            []
            if levels == 2
            else ["flow.levels=3", "flow.factors=[2, 2]", "sample.steps=[2, 2, 2]", "flow.p_stage=[0.4, 0.3, 0.3]"]
        ),
    )
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
            out = dfm(
                [*coarse, x], torch.cat([torch.rand(b, levels - 1), t], 1), y, torch.full((b,), stage, dtype=torch.long)
            )
            torch.testing.assert_close(out[-1], expected, rtol=0, atol=1e-6)
            assert all(float(o.abs().max()) == 0 for o in out[:-1])  # new heads predict nothing yet
    assert expected.abs().max() > 0.01


def test_coarse_placement_reproduces_the_pretrained_velocity_on_the_upsampled_coarse_level():
    """The paper's FLUX variant (App. E): the pretrained layers take the coarse level, carried
    at the pretrained size; the finest level's new layers start at zero."""
    recipe = load_recipe(TINY, ["model.name=DFM-N/4", "data.resolution=16", "flow.upsample_coarse=true"])
    fm = randomized(build_model(load_recipe(TINY, ["model.name=DFM-N/4", "data.resolution=16", *FM]), SHAPE, CLASSES))
    dfm = build_model(recipe, SHAPE, CLASSES).eval()
    assert dfm.level_sizes == [(16, 16), (16, 16)]
    convert_single_level(dfm, fm.state_dict(), level=0)
    b = 4
    x, fine = torch.randn(b, *SHAPE), torch.randn(b, *SHAPE)
    t, y = torch.rand(b, 1), torch.randint(0, CLASSES + 1, (b,))
    with torch.no_grad():
        expected = fm([x], t, y, torch.zeros(b, dtype=torch.long))[0]
        out = dfm([x, fine], torch.cat([t, torch.rand(b, 1)], 1), y, torch.zeros(b, dtype=torch.long))
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-6)
    assert float(out[1].abs().max()) == 0


def test_upsampled_coarse_decomposition_recomposes_exactly():
    from dfm_cli.methods.factory import base_decomposition

    pyramid = base_decomposition(load_recipe(TINY, ["flow.upsample_coarse=true"]))
    x = torch.randn(2, 1, 32, 32)
    levels = pyramid.decompose(x)
    assert [tuple(v.shape[2:]) for v in levels] == [(32, 32), (32, 32)]
    torch.testing.assert_close(pyramid.recompose(levels), x, rtol=0, atol=1e-5)
    blocks = levels[0].unfold(2, 2, 2).unfold(3, 2, 2)  # the coarse level is constant on 2x2 blocks
    assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks))


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


@pytest.mark.e2e
def test_cli_init_from_trains_and_samples_and_refuses_a_multi_level_source(tmp_path):
    run_dfm("train", TINY, *[a for s in FM for a in ("--set", s)], "--set", "train.steps=2", "--out", tmp_path / "fm")
    run_dfm("train", TINY, "--init-from", tmp_path / "fm", "--set", "train.steps=2", "--out", tmp_path / "dfm")
    run_dfm("sample", tmp_path / "dfm", "--out", tmp_path / "grid.png")
    run_dfm(
        "train",
        TINY,
        "--init-from",
        tmp_path / "fm",
        "--set",
        "train.steps=2",
        "--set",
        "flow.upsample_coarse=true",
        "--out",
        tmp_path / "coarse",
    )
    run_dfm("sample", tmp_path / "coarse", "--out", tmp_path / "coarse.png")
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "coarse.png").is_file()
    refused = run_dfm("train", TINY, "--init-from", tmp_path / "dfm", "--out", tmp_path / "again", check=False)
    assert refused.returncode != 0 and "flow.levels = 1" in refused.stderr and "Traceback" not in refused.stderr
