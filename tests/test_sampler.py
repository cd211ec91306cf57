import math

import pytest
import torch

from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import LaplacianPyramid
from dfm_cli.method.sampler import GuidedVelocity, SamplerSettings, generate, progressive_schedule, sample
from dfm_cli.models.dit import DFMDiT, model_size


def check_schedule(steps, tau):
    s = progressive_schedule(steps, tau)
    t = s.t
    levels = len(steps)
    assert t.shape == (sum(steps) + 1, levels)
    assert (t[0] == 0).all() and (t[-1] == 1).all()  # starts at noise, ends at data
    assert (t[1:] - t[:-1] >= -1e-12).all()  # every level is monotone: never moves backwards
    ends = s.stage_ends
    assert ends == [sum(steps[: k + 1]) for k in range(levels)]
    for k in range(1, levels):
        start = ends[k - 1]
        # level k+1 starts at 0 exactly when level k reaches tau_k, and not before
        assert t[start, k - 1] == pytest.approx(tau[k - 1])
        assert (t[: start + 1, k] == 0).all() and t[start + 1, k] > 0
        # earlier levels are already at tau_k-1 and ride along linearly
        assert t[start, :k].tolist() == pytest.approx([tau[k - 1]] * k)
    # inside a segment each level moves on a linear grid
    for k, n in enumerate(steps):
        a = ends[k - 1] if k else 0
        d = t[a + 1 : a + n + 1, k] - t[a : a + n, k]
        assert torch.allclose(d, d[0].expand_as(d))
    assert s.stage.tolist() == sum(([k] * n for k, n in enumerate(steps)), [])
    return t


def test_schedule_two_levels_paper_default():
    t = check_schedule([30, 10], [0.7])
    assert t[30].tolist() == pytest.approx([0.7, 0.0])
    assert t[31].tolist() == pytest.approx([0.73, 0.1])


def test_schedule_three_and_four_levels_never_jump_backwards():
    t = check_schedule([10, 6, 4], [0.6, 0.8])
    assert t[16].tolist() == pytest.approx([0.8, 0.8, 0.0])
    check_schedule([5, 5, 5, 5], [0.5, 0.7, 0.9])
    check_schedule([4, 3, 2], [0.9, 0.9])


@pytest.mark.parametrize("steps,tau", [([30, 10], []), ([30, 10], [1.2]), ([3, 3, 3], [0.8, 0.5]), ([0, 3], [0.5])])
def test_bad_schedules_are_clear_errors(steps, tau):
    with pytest.raises(DfmError):
        progressive_schedule(steps, tau)


# ----------------------------------------------------------------- analytic Gaussian field
# Data level s ~ N(m_s, sd_s^2) per coordinate, independent across levels. For the path
# x_t = t x1 + (1 - t) x0 the optimal velocity is E[x1 - x0 | x_t], and the exact ODE maps
# noise x0 to m + sd x0, whatever the (monotone) time reparameterisation.
M, SD = (1.5, -0.5), (0.5, 0.2)


def gaussian_velocity(xs, t, y, stage):
    out = []
    for s, x in enumerate(xs):
        ts = t[:, s].double().reshape(-1, *([1] * (x.ndim - 1)))
        x = x.double()
        var = ts**2 * SD[s] ** 2 + (1 - ts) ** 2
        resid = x - ts * M[s]
        e_x1 = M[s] + ts * SD[s] ** 2 / var * resid
        e_x0 = (1 - ts) / var * resid
        out.append((e_x1 - e_x0).float())
    return out


def run_gaussian(steps, tau, solver, n=4000):
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(n, 1, 2, 2, generator=g), torch.randn(n, 1, 4, 4, generator=g)]
    levels = len(steps)
    out = {}
    sample(
        lambda xs, t, y, k: gaussian_velocity(xs, t, y, k),
        noise,
        torch.zeros(n, dtype=torch.long),
        progressive_schedule(steps, tau),
        lambda xs: out.setdefault("xs", list(xs)) and xs[0],
        solver=solver,
    )
    exact = [M[s] + SD[s] * noise[s] for s in range(levels)]
    return out["xs"], exact


def test_euler_reaches_the_data_distribution_on_every_level():
    xs, _ = run_gaussian([60, 40], [0.7], "euler")
    for s, x in enumerate(xs):
        assert abs(float(x.mean()) - M[s]) < 0.02
        assert abs(float(x.std()) - SD[s]) < 0.02


def test_heun_beats_euler_at_equal_nfe():
    for steps, tau in (([8], []), ([6, 4], [0.7])):
        euler, exact = run_gaussian([2 * n for n in steps], tau, "euler")
        heun, _ = run_gaussian(steps, tau, "heun")
        for e, h, x in zip(euler, heun, exact):
            err_e, err_h = (e - x).abs().mean(), (h - x).abs().mean()
            assert err_h < err_e / 2, (err_h, err_e)


# ----------------------------------------------------------------- CFG with the real model
def random_model(levels=2):
    sizes = LaplacianPyramid(levels, [2] * (levels - 1)).level_sizes((16, 16))
    model = DFMDiT(model_size("DFM-N/4"), sizes, channels=1, num_classes=10).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def model_inputs(b=4):
    xs = [torch.randn(b, 1, 8, 8), torch.randn(b, 1, 16, 16)]
    return xs, torch.rand(b, 2), torch.randint(0, 10, (b,)), torch.ones(b, dtype=torch.long)


@torch.no_grad()
def test_cfg_scale_one_is_the_conditional_prediction():
    model = random_model()
    xs, t, y, stage = model_inputs()
    for a, b in zip(GuidedVelocity(model, 1.0, 10)(xs, t, y, stage), model(xs, t, y, stage)):
        assert torch.equal(a, b)


@torch.no_grad()
def test_batched_cfg_equals_two_separate_forwards():
    model = random_model()
    xs, t, y, stage = model_inputs()
    cond = model(xs, t, y, stage)
    uncond = model(xs, t, torch.full_like(y, 10), stage)
    guided = GuidedVelocity(model, 2.5, 10)(xs, t, y, stage)
    for g, c, u in zip(guided, cond, uncond):
        assert torch.allclose(g, u + 2.5 * (c - u), atol=1e-5)
        assert not torch.allclose(g, c)


@torch.no_grad()
def test_guidance_interval_leaves_levels_outside_it_conditional():
    model = random_model()
    xs, _, y, stage = model_inputs()
    t = torch.tensor([[0.9, 0.2]]).expand(4, 2)
    guided = GuidedVelocity(model, 3.0, 10, interval=(0.0, 0.5))(xs, t, y, stage)
    cond = model(xs, t, y, stage)
    assert torch.allclose(guided[0], cond[0]) and not torch.allclose(guided[1], cond[1])


@torch.no_grad()
def test_generate_counts_nfe_previews_and_partial_stages():
    model = random_model()
    pyr = LaplacianPyramid(2, [2])
    labels = torch.arange(4)
    r = generate(model, labels, pyr, SamplerSettings((3, 2), (0.7,), cfg=2.0), seed=0, previews=True)
    assert r.x.shape == (4, 1, 16, 16) and r.nfe == 5 and r.guided_nfe == 5
    assert len(r.previews) == 2 and r.previews[0].shape == (4, 1, 16, 16)
    assert torch.allclose(r.previews[-1], r.x, atol=1e-6)  # at t = 1 the estimate is the sample
    heun = generate(model, labels, pyr, SamplerSettings((3, 2), (0.7,), solver="heun"), seed=0)
    assert heun.nfe == 10 and heun.guided_nfe == 0
    coarse = generate(model, labels, pyr, SamplerSettings((4,)), seed=0)
    assert coarse.x.shape == (4, 1, 8, 8) and coarse.nfe == 4
    again = generate(model, labels, pyr, SamplerSettings((3, 2), (0.7,), cfg=2.0), seed=0)
    assert torch.equal(again.x, r.x)  # a seed is a seed
    assert math.isfinite(float(r.x.abs().max()))


# ----------------------------------------------------------------- settings: one place for the knobs
def recipe_with(**flow):
    from dfm_cli.config.recipe import Recipe

    r = Recipe()
    r.sample.steps, r.sample.tau, r.sample.cfg = [6, 4, 2], [0.6, 0.8], 2.0
    for key, value in flow.items():
        setattr(r.flow, key, value)
    return r


def test_settings_resolve_flags_over_recipe_and_cut_tau_to_the_stages():
    r = recipe_with()
    assert r.sampler_settings(3) == SamplerSettings((6, 4, 2), (0.6, 0.8), cfg=2.0)
    assert r.sampler_settings(3, stages=2).tau == (0.6,)
    assert r.sampler_settings(3, steps=[5, 5]).steps == (5, 5)  # --steps alone sets the stages
    assert r.sampler_settings(3, tau=[0.8]).tau == (0.8, 0.8)  # one --tau serves every transition
    assert r.sampler_settings(3, stages=1).tau == ()
    got = r.sampler_settings(3, cfg=1.0, interval=[0.1, 0.9], solver="heun")
    assert (got.cfg, got.interval, got.solver) == (1.0, (0.1, 0.9), "heun")


@pytest.mark.parametrize(
    "flags,message",
    [
        (dict(stages=4), "--stages 4: the model has 3 levels; pick 1..3"),
        (dict(stages=0), "--stages 0"),
        (dict(stages=2, steps=[5, 5, 5]), "--steps 5,5,5: give 2 step counts"),
        (dict(steps=[5, 0]), "--steps 5,0: every stage needs"),
        (dict(tau=[1.2]), "--tau 1.2: values must lie in (0, 1)"),
        (dict(tau=[0.0]), "--tau 0: values must lie in (0, 1)"),
        (dict(tau=[0.9, 0.5]), "--tau 0.9,0.5: values must lie in (0, 1) and increase"),
        (dict(stages=2, tau=[0.5, 0.6, 0.7]), "--tau 0.5,0.6,0.7: give one threshold, or 1"),
        (dict(interval=[0.9, 0.1]), "--interval 0.9,0.1: give low,high with 0 <= low <= high <= 1"),
        (dict(interval=[-0.1, 0.5]), "--interval -0.1,0.5"),
        (dict(solver="rk4"), "--solver rk4: choose euler or heun"),
        (dict(cfg=float("nan")), "--cfg nan"),
    ],
)
def test_settings_refuse_bad_flags_naming_the_flag(flags, message):
    with pytest.raises(DfmError) as e:
        recipe_with().sampler_settings(3, **flags)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_recipe_values_name_the_recipe_key():
    r = recipe_with()
    r.sample.guidance_interval = [0.8, 0.2]
    with pytest.raises(DfmError, match=r"sample.guidance_interval 0.8,0.2"):
        r.sampler_settings(3)


# ----------------------------------------------------------------- the flow ablations at sampling time
class Spy(torch.nn.Module):
    """The model, recording what it is fed at every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.levels, self.level_sizes = model.levels, model.level_sizes
        self.channels, self.null_condition = model.channels, model.null_condition

    def forward(self, xs, t, y, stage):
        self.calls.append(([x.clone() for x in xs], t.clone(), stage.clone()))
        return self.model(xs, t, y, stage)


@torch.no_grad()
def test_without_input_masking_later_levels_are_fed_as_their_noise():
    from dfm_cli.method.sampler import sample_noise

    pyr, labels = LaplacianPyramid(2, [2]), torch.arange(4)
    noise = sample_noise(random_model(), 3, range(4))
    for mask_input in (True, False):
        settings = recipe_with(mask_input=mask_input).sampler_settings(2, steps=[3, 2], tau=[0.7])
        assert settings.mask_input is mask_input
        spy = Spy(random_model())
        generate(spy, labels, pyr, settings, seed=3)
        first_stage = [xs for xs, t, stage in spy.calls if int(stage[0]) == 0]
        assert len(first_stage) == 3
        for xs in first_stage:
            if mask_input:
                assert not xs[1].any()  # zeroed, as in training with masking
            else:
                assert torch.equal(xs[1], torch.cat([noise[1]] * 2))  # noise at t = 0, as in training (CFG: batch x2)
                assert xs[1].std() > 0.5


@torch.no_grad()
def test_tied_sampler_moves_all_active_levels_with_one_t():
    from dfm_cli.method.sampler import sample_noise

    pyr, labels = LaplacianPyramid(3, [2, 2]), torch.arange(4)
    settings = recipe_with(tied_timesteps=True).sampler_settings(3)
    assert settings.tied_timesteps
    spy = Spy(random_model(levels=3))
    r = generate(spy, labels, pyr, settings, seed=0)
    shared = []
    for _xs, t, stage in spy.calls:
        k = int(stage[0])
        assert (t[:, : k + 1] == t[:, :1]).all() and not t[:, k + 1 :].any()
        shared.append(float(t[0, 0]))
    assert len(shared) == 12 and all(a < b for a, b in zip(shared, shared[1:]))
    assert shared[6] == pytest.approx(0.6) and shared[10] == pytest.approx(0.8)
    # a level joins at the shared time, as x_t with its data guessed at 0 (the mean of a detail level)
    noise = sample_noise(spy, 0, range(4))
    assert torch.allclose(spy.calls[6][0][1], (1 - 0.6) * torch.cat([noise[1]] * 2))
    assert math.isfinite(float(r.x.abs().max()))
    untied = Spy(random_model(levels=3))
    generate(untied, labels, pyr, recipe_with().sampler_settings(3), seed=0)
    assert any(not (t[:, : int(s[0]) + 1] == t[:, :1]).all() for _, t, s in untied.calls)
