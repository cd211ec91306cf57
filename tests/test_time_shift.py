"""The SD3/FLUX resolution-dependent time shift: `flow.t_shift` in training, `sample.shift`
in sampling, checked against the closed form."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY

from dfm_cli.config.recipe import load_recipe
from dfm_cli.errors import DfmError
from dfm_cli.method.flow import FlowObjective, shift_time
from dfm_cli.method.sampler import SamplerSettings, progressive_schedule
from dfm_cli.sampling.sample_set import manifest_difference, set_manifest


def test_shift_is_sd3s_noise_level_map_and_a_logit_translation():
    t = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    for s in (0.5, 2.0, 3.0):
        sigma = 1 - t  # SD3's and FLUX's noise level: sigma' = s sigma / (1 + (s - 1) sigma)
        expected = 1 - s * sigma / (1 + (s - 1) * sigma)
        torch.testing.assert_close(shift_time(t, s), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.logit(shift_time(t, s)), torch.logit(t) - math.log(s))
        torch.testing.assert_close(shift_time(shift_time(t, s), 1 / s), t)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert shift_time(ends, 3.0).tolist() == [0.0, 1.0]


def test_shifted_training_draws_are_logit_normal_with_the_location_moved_by_log_shift():
    shapes = [(1, 4, 4)]
    seeds = list(range(4000))
    shifted = FlowObjective(p_stage=(1.0,), t_loc=0.2, t_shift=3.0).draw(shapes, seeds, 0).t[:, 0]
    moved = FlowObjective(p_stage=(1.0,), t_loc=0.2 - math.log(3.0)).draw(shapes, seeds, 0).t[:, 0]
    torch.testing.assert_close(shifted, moved, rtol=0, atol=1e-6)
    plain = FlowObjective(p_stage=(1.0,), t_loc=0.2).draw(shapes, seeds, 0).t[:, 0]
    assert shifted.median() < plain.median() - 0.2  # towards noise (t = 0)


def test_dfm_shift_moves_only_the_active_levels_time():
    shapes = [(1, 2, 2), (1, 4, 4)]
    seeds = list(range(512))
    plain = FlowObjective(p_stage=(0.5, 0.5)).draw(shapes, seeds, 0)
    shifted = FlowObjective(p_stage=(0.5, 0.5), t_shift=2.0).draw(shapes, seeds, 0)
    fine = plain.stage == 1
    torch.testing.assert_close(shifted.t[fine, 0], plain.t[fine, 0])  # the earlier level's cleaner draw
    torch.testing.assert_close(shifted.t[fine, 1], shift_time(plain.t[fine, 1], 2.0))
    torch.testing.assert_close(shifted.t[~fine, 0], shift_time(plain.t[~fine, 0], 2.0))


def test_the_shifted_sampling_grid_is_the_closed_form():
    s, n = 3.0, 8
    u = torch.arange(n + 1, dtype=torch.float64) / n
    grid = progressive_schedule([n], [], shift=s).t[:, 0]
    torch.testing.assert_close(grid, u / (u + s * (1 - u)), rtol=0, atol=1e-12)
    assert progressive_schedule([n], []).t[:, 0].tolist() == u.tolist()  # no shift: linear


def test_a_shifted_progressive_grid_keeps_tau_and_never_moves_backwards():
    plain = progressive_schedule([4, 3], [0.9])
    shifted = progressive_schedule([4, 3], [0.9], shift=2.0)
    assert shifted.t[4].tolist() == [0.9, 0.0] and shifted.t[-1].tolist() == [1.0, 1.0]
    assert shifted.stage.tolist() == plain.stage.tolist()
    assert (shifted.t[1:] >= shifted.t[:-1]).all()
    assert (shifted.t[1:4, 0] < plain.t[1:4, 0]).all()  # denser near noise
    # level 1 moves 0 -> 0.9 linearly in the unshifted time, then through the shift
    unshifted_tau = shift_time(torch.tensor(0.9, dtype=torch.float64), 1 / 2.0)
    u = torch.arange(1, 5, dtype=torch.float64) / 4
    torch.testing.assert_close(shifted.t[1:5, 0], shift_time(u * unshifted_tau, 2.0))


def test_sampler_settings_take_the_shift_from_the_recipe_or_the_flag():
    recipe = load_recipe(TINY, ["sample.shift=2.0"])
    assert recipe.sampler_settings().shift == 2.0
    assert recipe.sampler_settings(shift=3.0).shift == 3.0
    assert recipe.sampler_settings(shift=3.0).schedule().t[1, 0] < recipe.sampler_settings().schedule().t[1, 0]
    with pytest.raises(DfmError, match=r"^--shift 0.0: the time shift must be a positive number"):
        recipe.sampler_settings(shift=0.0)
    with pytest.raises(DfmError, match="shift"):
        SamplerSettings(steps=(4,), shift=-1.0)


@pytest.mark.parametrize("key", ["flow.t_shift", "sample.shift"])
def test_a_non_positive_shift_in_a_recipe_is_refused_naming_the_key(key):
    with pytest.raises(DfmError, match=key.replace(".", r"\.")):
        load_recipe(TINY, [f"{key}=0.0"])


def test_a_set_written_before_the_shift_and_cond_noise_existed_still_resumes():
    source = {"checkpoint": "ab12", "ema": True, "autoencoder": None}
    new = set_manifest(SamplerSettings(steps=(4,)), seed=0, num=8, shape=(8, 8, 3), source=source)
    old = {k: v for k, v in new.items() if k not in ("shift", "cond_noise")}
    assert manifest_difference(old, new) == ""
    shifted = set_manifest(SamplerSettings(steps=(4,), shift=2.0), seed=0, num=8, shape=(8, 8, 3), source=source)
    assert manifest_difference(old, shifted) == "shift 1.0 → 2.0"
