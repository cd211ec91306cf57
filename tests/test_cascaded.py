"""The Cascaded baseline (`flow.method = "cascaded"`): stage 2 sees stage 1 only through its
conditioning tokens, the augmentation follows its logit-normal law in training and the fixed
level when sampling, stage 2 starts from stage 1, and a tiny recipe trains and samples."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ROOT, run_dfm

from dfm_cli.baselines.cascaded import CascadedDiT, CascadedObjective, CascadeSettings, sample_cascaded
from dfm_cli.config.method import method_of
from dfm_cli.config.recipe import load_recipe
from dfm_cli.models.dit import model_size

TINY_CASCADE = ROOT / "recipes" / "tiny" / "cascaded.toml"


def cascade() -> CascadedDiT:
    torch.manual_seed(0)
    model = CascadedDiT(model_size("DFM-N/4"), [(8, 8), (16, 16)], 3, 10)
    with torch.no_grad():
        for p in model.parameters():  # no zero init may hide a path
            p.normal_(0, 0.2)
    return model.eval()


@torch.no_grad()
def test_stage_2_sees_stage_1_only_through_its_conditioning_tokens():
    model = cascade()
    g = torch.Generator().manual_seed(1)
    coarse, fine, cond = (
        torch.randn(2, 3, 8, 8, generator=g),
        torch.randn(2, 3, 16, 16, generator=g),
        torch.randn(2, 3, 16, 16, generator=g),
    )
    t, y, stage = torch.rand(2, 3, generator=g), torch.tensor([1, 2]), torch.ones(2, dtype=torch.long)
    base = model([coarse, fine, cond], t, y, stage)
    assert base[0].abs().max() == 0  # stage-2 samples get no stage-1 velocity
    other_coarse = model([torch.randn_like(coarse), fine, cond], t, y, stage)[1]
    torch.testing.assert_close(other_coarse, base[1], rtol=0, atol=0)
    other_cond = model([coarse, fine, torch.randn_like(cond)], t, y, stage)[1]
    assert (other_cond - base[1]).abs().max() > 1e-3
    other_aug = model([coarse, fine, cond], torch.cat([t[:, :2], 1 - t[:, 2:]], 1), y, stage)[1]
    assert (other_aug - base[1]).abs().max() > 1e-3  # the augmentation level is an input too


def test_training_draws_follow_the_step_and_the_augmentation_law():
    settings = CascadeSettings(split=0.8, aug_loc=1.5, aug_scale=1.0)
    recipe = load_recipe(TINY_CASCADE, ["train.steps=100", "flow.cascade_split=0.8"])
    method = method_of(recipe)
    objective = method.objective()
    assert objective == CascadedObjective(p_stage=(0.9, 0.1), cascade=settings)  # p_stage: unused, the default
    shapes = [(1, 2, 2), (1, 4, 4)]
    assert method.objective_at(objective, 79).draw(shapes, range(4), 0).stage.tolist() == [0] * 4
    draws = method.objective_at(objective, 80).draw(shapes, range(4000), 0)
    assert draws.stage.tolist() == [1] * 4000
    assert [tuple(n.shape[1:]) for n in draws.noise] == [(1, 2, 2), (1, 4, 4), (1, 4, 4)]  # + the conditioning
    aug = draws.t[:, 2].sort().values.double()
    law = torch.tensor([0.5 * (1 + math.erf((math.log(a / (1 - a)) - 1.5) / math.sqrt(2))) for a in aug.tolist()])
    empirical = torch.arange(1, len(aug) + 1, dtype=torch.float64) / len(aug)
    assert (law - empirical).abs().max() < 0.03  # Kolmogorov-Smirnov distance to logit-normal(1.5, 1)


@torch.no_grad()
def test_sampling_conditions_stage_2_on_stage_1_at_the_fixed_noise_level():
    model, seen = cascade(), []

    def spy(levels, t, y, stage):
        seen.append(([x.clone() for x in levels], t.clone(), stage.clone()))
        return [torch.zeros_like(levels[0]), torch.zeros_like(levels[1])]

    x, nfe = sample_cascaded(
        spy, torch.arange(64) % 10, model, [2, 3], 0.025, seed=0, indices=range(64), device=torch.device("cpu")
    )
    assert nfe == 5 and x.shape == (64, 3, 16, 16)
    stage2 = [call for call in seen if int(call[2][0]) == 1]
    assert len(stage2) == 3
    for levels, t, _ in stage2:
        coarse, _, cond = levels
        assert torch.all(t[:, 2] == 1 - 0.025)
        residual = (cond - 0.975 * torch.nn.functional.interpolate(coarse, scale_factor=2, mode="nearest")) / 0.025
        assert abs(float(residual.mean())) < 0.05 and abs(float(residual.std()) - 1) < 0.05


def test_stage_2_starts_from_stage_1_in_the_model_and_its_ema_and_both_count_towards_compute():
    import copy

    from dfm_cli.baselines.cascaded import switch_to_stage2

    model = cascade()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.stage1.parameters():  # stage 1 trained on; the EMA lags behind
            p.add_(1.0)
    switch_to_stage2(model, ema)
    for a, b in zip(ema.stage2_parameters(), model.stage2_parameters()):
        assert torch.equal(a, b)  # no initial weights left in stage 2's EMA
    for a, b in zip(model.stage1.blocks.parameters(), model.stage2.blocks.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(model.stage1.y_embedder.weight, model.stage2.y_embedder.weight)
    stage1, stage2 = model.stage_flops()
    assert stage2 > 2 * stage1 > 0  # twice the tokens, attention over all of them


def test_the_augmentation_level_starts_silent():
    """A new input to trained blocks starts at zero (adaLN-Zero's reasoning): at the switch,
    stage 2's conditioning of its blocks is stage 1's."""
    model = CascadedDiT(model_size("DFM-N/4"), [(8, 8), (16, 16)], 3, 10)
    assert model.aug_embedder(torch.rand(4)).abs().max() == 0


@pytest.mark.e2e
def test_tiny_cascaded_recipe_trains_both_stages_and_samples(tmp_path):
    run_dfm("train", TINY_CASCADE, "--out", tmp_path / "R")
    stats = (tmp_path / "R" / "stats.jsonl").read_text().splitlines()
    assert '"loss_level": [' in stats[0] and stats[0].split('"loss_level": [')[1].startswith(("0", "1", "2"))
    assert stats[-1].split('"loss_level": [')[1].startswith("null")  # the last steps train stage 2
    run_dfm("sample", tmp_path / "R", "--n", "4", "--out", tmp_path / "g.png")
    refused = run_dfm("train", TINY_CASCADE, "--set", "train.steps=8", "--out", tmp_path / "R", check=False)
    assert refused.returncode == 2 and "train.steps" in refused.stderr  # the split would move


@pytest.mark.parametrize("key", ["flow.levels=3", "flow.cascade_split=1.0"])
def test_cascade_settings_are_checked(key):
    from dfm_cli.config.recipe import load_recipe
    from dfm_cli.errors import DfmError

    with pytest.raises(DfmError, match=key.split("=")[0].replace(".", r"\.")):
        load_recipe(
            TINY_CASCADE,
            [key, "flow.factors=[2, 2]", "sample.steps=[2, 2, 2]", "flow.p_stage=[0.4, 0.3, 0.3]"]
            if key == "flow.levels=3"
            else [key],
        )


def test_the_split_changes_the_cascades_compute():
    """Stage 2 costs about twice stage 1 per image, so a later switch costs less per image (and
    sweep planning must not reuse one split's figure for another)."""
    from dfm_cli.ablate.compute import forward_flops_of
    from dfm_cli.config.recipe import load_recipe

    late, early = (forward_flops_of(load_recipe(TINY_CASCADE, [f"flow.cascade_split={s}"])) for s in (0.8, 0.5))
    assert 1.2 * late < early


def test_the_ema_warms_up_again_at_the_switch():
    """Stage 2's early weights are poor: its EMA averages from the switch with a fresh warm-up,
    as a new run's does; other methods keep one warm-up."""
    from dfm_cli.config.recipe import load_recipe
    from dfm_cli.training.schedules import ema_decay_at

    recipe = load_recipe(TINY_CASCADE, ["train.steps=100", "flow.cascade_split=0.8", "train.ema_decay=0.999"])

    def ema_decay(recipe, step):
        return ema_decay_at(recipe.train.ema_decay, step - method_of(recipe).ema_warmup_start(step))

    assert method_of(recipe).switch_step == 80
    assert ema_decay(recipe, 79) == pytest.approx(80 / 89) and ema_decay(recipe, 80) == pytest.approx(0.1)
    assert ema_decay(recipe, 90) == pytest.approx(11 / 20)
    plain = load_recipe(ROOT / "recipes" / "tiny.toml", ["train.steps=100", "train.ema_decay=0.999"])
    assert method_of(plain).ema_warmup_start(80) == 0 and ema_decay(plain, 80) == pytest.approx(81 / 90)
