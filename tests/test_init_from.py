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
from dfm_cli.method.level_stats import precondition_scales
from dfm_cli.methods.factory import build_model
from dfm_cli.models.conversion import convert_single_level, per_level_parameters
from dfm_cli.training.loop import train

FM = ["flow.levels=1", "flow.p_stage=[1.0]", "flow.factors=[]", "sample.steps=[5]", "sample.tau=[]"]
SHAPE, CLASSES = (1, 16, 16), 10
QUIET = Console(quiet=True)


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


PRECONDITION = ["model.name=DFM-N/4", "data.resolution=16", "flow.precondition=true"]


@pytest.mark.parametrize("levels, placement", [(2, None), (3, None), (2, 0)])
def test_preconditioned_conversion_reproduces_the_preconditioned_single_level_velocity_at_step_0(levels, placement):
    """With `flow.precondition`, each level's output is `c_skip x + c_out F(c_in x)` from its data
    RMS: the pretrained level takes the pretrained RMS, so its scalings are the pretrained
    model's; the other levels keep their own, and their new heads add nothing to `c_skip x`."""
    three = ["flow.levels=3", "flow.factors=[2, 2]", "sample.steps=[2, 2, 2]", "flow.p_stage=[0.4, 0.3, 0.3]"]
    coarse_placement = ["flow.upsample_coarse=true"] if placement == 0 else []
    recipe = load_recipe(TINY, PRECONDITION + (three if levels == 3 else []) + coarse_placement)
    fm_recipe = load_recipe(TINY, [*PRECONDITION, *FM])
    fm = randomized(build_model(fm_recipe, SHAPE, CLASSES, level_rms=[0.7]))
    measured = [0.9, 0.4, 0.2][-levels:]  # this run's own level RMS, none of them the pretrained one
    dfm = build_model(recipe, SHAPE, CLASSES, level_rms=measured).eval()
    convert_single_level(dfm, fm.state_dict(), placement)
    pretrained = levels - 1 if placement is None else placement
    expected_rms = [0.7 if s == pretrained else v for s, v in enumerate(measured)]
    torch.testing.assert_close(dfm.level_rms, torch.tensor(expected_rms))

    b = 5
    x = torch.randn(b, *SHAPE)
    t, y = torch.rand(b, 1), torch.randint(0, CLASSES + 1, (b,))
    with torch.no_grad():
        expected = fm([x], t, y, torch.zeros(b, dtype=torch.long))[0]
        for stage in range(levels):
            others = [torch.randn(b, 1, *size) for size in dfm.level_sizes]  # anything: the model ignores them
            inputs = [x if s == pretrained else others[s] for s in range(levels)]
            times = torch.rand(b, levels)
            times[:, pretrained] = t[:, 0]
            out = dfm(inputs, times, y, torch.full((b,), stage, dtype=torch.long))
            torch.testing.assert_close(out[pretrained], expected, rtol=0, atol=1e-5)
            _, c_skip, _ = precondition_scales(times, dfm.level_rms)
            for s in range(levels):
                if s != pretrained:  # the new heads predict nothing yet: only the skip path is left
                    skip = c_skip[:, s].reshape(-1, 1, 1, 1) * inputs[s]
                    torch.testing.assert_close(out[s], skip, rtol=0, atol=1e-6)
    assert expected.abs().max() > 0.01


@pytest.mark.parametrize("fm_pre, dfm_pre", [(True, False), (False, True)])
def test_conversion_refuses_a_preconditioning_the_pretrained_model_does_not_share(fm_pre, dfm_pre):
    """The scalings can neither be made to add nothing nor reproduce ones the other model lacks."""
    base = ["model.name=DFM-N/4", "data.resolution=16"]
    fm = build_model(
        load_recipe(TINY, [*base, f"flow.precondition={str(fm_pre).lower()}", *FM]),
        SHAPE,
        CLASSES,
        level_rms=[0.7] if fm_pre else None,
    )
    dfm = build_model(
        load_recipe(TINY, [*base, f"flow.precondition={str(dfm_pre).lower()}"]),
        SHAPE,
        CLASSES,
        level_rms=[0.9, 0.2] if dfm_pre else None,
    )
    with pytest.raises(DfmError, match=f"flow.precondition = {str(fm_pre).lower()}, this run has"):
        convert_single_level(dfm, fm.state_dict())


def test_init_from_a_trained_preconditioned_run_starts_at_its_velocity(tmp_path):
    """A preconditioned FM run, trained for 2 steps, is accepted as `train.init_from` by a
    preconditioned DFM run, whose model at step 0 gives the FM run's velocity on the finest
    level; a DFM run without preconditioning refuses it, naming flow.precondition."""
    from dfm_cli.distributed import Context
    from dfm_cli.methods.factory import load_trained
    from dfm_cli.training.loop import Trainer

    fm_run = tmp_path / "fm"
    train(load_recipe(TINY, [*PRECONDITION, *FM, "train.steps=2", "train.checkpoint_every=2"]), fm_run, console=QUIET)
    fm, _, _ = load_trained(fm_run)
    recipe = load_recipe(TINY, [*PRECONDITION, f"train.init_from={fm_run}"])
    (tmp_path / "dfm").mkdir()
    dfm = Trainer(recipe, tmp_path / "dfm", Context(), QUIET, ()).ema.eval()  # step 0, converted
    assert dfm.level_rms is not None and fm.level_rms is not None
    assert float(dfm.level_rms[-1]) == float(fm.level_rms[0])

    b = 4
    x = torch.randn(b, *SHAPE)
    t, y = torch.rand(b, 1), torch.randint(0, CLASSES + 1, (b,))
    with torch.no_grad():
        expected = fm([x], t, y, torch.zeros(b, dtype=torch.long))[0]
        for stage in range(2):
            out = dfm([torch.randn(b, 1, 8, 8), x], torch.cat([torch.rand(b, 1), t], 1), y, torch.full((b,), stage))
            torch.testing.assert_close(out[-1], expected, rtol=0, atol=1e-5)
    assert expected.abs().max() > 0.01

    plain = load_recipe(TINY, ["model.name=DFM-N/4", "data.resolution=16", f"train.init_from={fm_run}"])
    with pytest.raises(DfmError, match="flow.precondition = true, this run has flow.precondition = false"):
        train(plain, tmp_path / "plain", console=QUIET)


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
