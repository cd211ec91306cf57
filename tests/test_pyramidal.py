"""Pyramidal Flow (`flow.method = "pyramidal"`): the renoising at a stage jump gives exactly the
distribution training starts the next stage from (analytic Gaussian data), the sampler lands on
the data with an exact velocity, and a tiny recipe trains and samples through the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, run_dfm

from dfm_cli.baselines.pyramidal import PyramidalSchedule, block_noise, renoise, sample_pyramidal, up
from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import LaplacianPyramid


def matrix(fn, n_in: int) -> torch.Tensor:
    """The matrix of a linear map on flattened 1-channel images, column by column."""
    return torch.stack([fn(e).flatten() for e in torch.eye(n_in, dtype=torch.float64)], 1)


def block_cov(size: int, factor: int, gamma: float) -> torch.Tensor:
    """Covariance of `block_noise` on a `size x size` image: (1 + gamma) I - gamma J per block."""
    ids = torch.arange(size * size)
    block = (ids // size // factor) * (size // factor) + (ids % size) // factor
    same = (block[:, None] == block[None, :]).double()
    return (1 + gamma) * torch.eye(size * size, dtype=torch.float64) - gamma * same


@pytest.mark.parametrize("factors", [(2,), (2, 2)])
def test_renoising_at_each_jump_gives_the_next_stages_training_start(factors):
    """Gaussian data x ~ N(mu, Sigma): stage k-1's end, upsampled and renoised, has the mean and
    covariance of stage k's training start, `c_k up(L_{k-1}) + (1 - c_k) n` with white n."""
    schedule, gamma = PyramidalSchedule(factors, 1 / 3), 1 / 3
    pyramid = LaplacianPyramid(len(factors) + 1, list(factors))
    size = 4 * 2 ** len(factors)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size * size, size * size, generator=g, dtype=torch.float64)
    sigma, mu = a @ a.T / size**2, torch.randn(size * size, generator=g, dtype=torch.float64)
    sizes = pyramid.level_sizes((size, size))
    for k in range(1, schedule.stages):
        n_fine, n_coarse = sizes[k][0] ** 2, sizes[k - 1][0] ** 2
        lowpass = matrix(lambda e, k=k: pyramid.lowpasses(e.reshape(1, 1, size, size).float())[k - 1].double(), size**2)
        upsample = matrix(lambda e, k=k: up(e.reshape(1, 1, *sizes[k - 1]), factors[k - 1]), n_coarse)
        e_prev = schedule.end(k - 1)
        end_mean, end_cov = (
            e_prev * lowpass @ mu,
            e_prev**2 * lowpass @ sigma @ lowpass.T + (1 - e_prev) ** 2 * torch.eye(n_coarse, dtype=torch.float64),
        )
        alpha, beta = schedule.jump(k)
        jump_mean = alpha * upsample @ end_mean
        jump_cov = alpha**2 * upsample @ end_cov @ upsample.T + beta**2 * block_cov(sizes[k][0], factors[k - 1], gamma)
        c = schedule.start(k)
        train_mean = c * upsample @ lowpass @ mu
        train_cov = c**2 * upsample @ lowpass @ sigma @ lowpass.T @ upsample.T + (1 - c) ** 2 * torch.eye(
            n_fine, dtype=torch.float64
        )
        torch.testing.assert_close(jump_mean, train_mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(jump_cov, train_cov, rtol=0, atol=1e-5)
        assert 0 < c < k / schedule.stages  # the corrected start is a little noisier than the previous end


def test_block_noise_has_the_block_covariance_and_renoise_is_alpha_up_plus_beta_noise():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([block_noise((1, 4, 4), 2, 1 / 3, g).flatten() for _ in range(40000)]).double()
    torch.testing.assert_close(draws.T @ draws / len(draws), block_cov(4, 2, 1 / 3), rtol=0, atol=0.03)
    schedule = PyramidalSchedule((2,), 1 / 3)
    x, noise = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 4, 4)
    alpha, beta = schedule.jump(1)
    torch.testing.assert_close(renoise(x, 1, schedule, noise), alpha * up(x, 2) + beta * noise)


def test_gamma_beyond_the_valid_block_covariance_is_refused():
    with pytest.raises(DfmError, match="flow.gamma = 0.5"):
        PyramidalSchedule((2,), 0.5)


@torch.no_grad()
@pytest.mark.parametrize("factors", [(2,), (2, 2)])
def test_sampler_with_the_exact_velocity_lands_on_the_data(factors):
    """For one data image the velocity of each stage's path is known in closed form; the
    sampler's stage times, jumps and renoising must then carry the noise exactly to it."""
    schedule = PyramidalSchedule(factors, 1 / 3)
    pyramid = LaplacianPyramid(len(factors) + 1, list(factors))
    data = torch.randn(1, 1, 16, 16)
    lows = pyramid.lowpasses(data)
    sizes = [tuple(x.shape[2:]) for x in lows]

    def exact(xs, t, y, stage):
        x = xs[0]
        k = sizes.index(tuple(x.shape[2:]))
        e, c = schedule.end(k), schedule.start(k)
        tau = ((t[:, 0] - c) / (e - c)).reshape(-1, 1, 1, 1)
        start_signal = c * up(lows[k - 1], schedule.factors[k - 1]) if k else torch.zeros_like(x)
        signal = tau * e * lows[k] + (1 - tau) * start_signal
        noise = (x - signal) / (tau * (1 - e) + (1 - tau) * (1 - c))
        return [(e * lows[k] + (1 - e) * noise) - (start_signal + (1 - c) * noise)]

    x, nfe = sample_pyramidal(
        exact,
        torch.zeros(2, dtype=torch.long),
        schedule,
        sizes,
        1,
        [3] * len(sizes),
        seed=0,
        indices=[0, 1],
        device=torch.device("cpu"),
    )
    torch.testing.assert_close(x, data.expand(2, -1, -1, -1), rtol=0, atol=1e-4)
    assert nfe == 3 * len(sizes)


PYRAMIDAL = ROOT / "recipes" / "tiny" / "pyramidal.toml"


def stage_draws(overrides: list[str], n: int, batch_seed: int = 0):
    from dfm_cli.config.method import method_of
    from dfm_cli.config.recipe import load_recipe

    objective = method_of(load_recipe(PYRAMIDAL, overrides)).objective()
    return objective.draw([(1, 8, 8), (1, 16, 16)], range(n), batch_seed)


def test_stage_time_is_uniform_by_default_as_the_authors_draw_it():
    """Within each stage tau is uniform (Kolmogorov-Smirnov distance under the 1% critical
    value), so 10% of the draws train the stage's first tenth, where sampling starts after the
    jump; the logit-normal gives it 1.4%. The stage and noise draws are the logit-normal's."""
    n = 12000
    draws = stage_draws([], n)
    for k in range(2):
        tau = draws.t[draws.stage == k, k].double().sort().values
        m = len(tau)
        assert m > 0.4 * n
        ecdf = torch.arange(1, m + 1, dtype=torch.float64) / m
        ks = torch.maximum(ecdf - tau, tau - (ecdf - 1 / m)).max()
        assert ks < 1.63 / m**0.5
        assert abs(float((tau < 0.1).double().mean()) - 0.1) < 0.01
    assert (draws.t[draws.stage == 0, 1] == 0).all()  # the later stage is not active
    logit_normal = stage_draws(["flow.pyramid_time=logit-normal"], n)
    assert torch.equal(draws.stage, logit_normal.stage) and torch.equal(draws.noise[1], logit_normal.noise[1])
    active = logit_normal.t[torch.arange(n), logit_normal.stage]
    assert float((active < 0.1).double().mean()) < 0.02


def test_logit_normal_stage_time_is_the_one_drawn_before_the_key():
    """`flow.pyramid_time = "logit-normal"` keeps the draws of runs made before it, value for
    value (recorded from the code before `flow.pyramid_time`, seeds 0..5, batch seed 7)."""
    before = {
        (): [0.101671, 0.515414, 0.420798, 0.52223, 0.903773, 0.363988],
        ("flow.t_loc=0.3", "flow.t_scale=0.8"): [0.191076, 0.586458, 0.511098, 0.591745, 0.890113, 0.463446],
    }
    for overrides, taus in before.items():
        draws = stage_draws(["flow.pyramid_time=logit-normal", *overrides], 6, batch_seed=7)
        assert draws.stage.tolist() == [1, 0, 1, 0, 0, 1]
        torch.testing.assert_close(draws.t[torch.arange(6), draws.stage], torch.tensor(taus), rtol=0, atol=1e-6)


def test_uniform_stage_time_refuses_the_logit_normals_keys_and_an_unknown_time():
    from dfm_cli.config.recipe import load_recipe

    with pytest.raises(DfmError, match="flow.t_loc = 0.5: is used by flow.method = 'pyramidal' only with"):
        load_recipe(PYRAMIDAL, ["flow.t_loc=0.5"])
    with pytest.raises(DfmError, match="flow.pyramid_time = 'random': choose one of uniform, logit-normal"):
        load_recipe(PYRAMIDAL, ["flow.pyramid_time=random"])
    with pytest.raises(DfmError, match="flow.pyramid_time = 'logit-normal': is not used by flow.method = 'dfm'"):
        load_recipe(ROOT / "recipes" / "tiny.toml", ["flow.pyramid_time=logit-normal"])


def test_a_run_saved_before_the_key_samples_as_before_and_resumes_only_as_it_was_trained(tmp_path):
    """A pyramidal run folder whose recipe.toml lacks `flow.pyramid_time` was trained with
    logit-normal stage time: it loads and samples as it did, reads as logit-normal, and
    resuming it with the new default (uniform) is refused, naming the key."""
    from conftest import cli
    from rich.console import Console

    from dfm_cli.config.recipe import load_recipe, load_run_recipe
    from dfm_cli.training.loop import train

    run = tmp_path / "run"
    old = ["flow.pyramid_time=logit-normal", "sample.n=4"]
    train(load_recipe(PYRAMIDAL, old), run, console=Console(quiet=True))
    assert cli("sample", run, "--n", "4", "--out", tmp_path / "before.png").exit_code == 0
    saved = [run / "recipe.toml", *run.glob("checkpoints/step-*/recipe.toml")]
    for path in saved:  # as the code before the key wrote them
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if not line.startswith("pyramid_time")))
        assert load_recipe(path).flow.pyramid_time == "uniform"  # still a valid recipe
        assert load_run_recipe(path).flow.pyramid_time == "logit-normal"  # as the run was trained
    assert cli("sample", run, "--n", "4", "--out", tmp_path / "after.png").exit_code == 0
    assert (tmp_path / "before.png").read_bytes() == (tmp_path / "after.png").read_bytes()
    with pytest.raises(DfmError, match="flow.pyramid_time = 'logit-normal', not 'uniform'"):
        train(load_recipe(PYRAMIDAL, ["sample.n=4", "train.steps=3"]), run, console=Console(quiet=True))
    train(load_recipe(PYRAMIDAL, [*old, "train.steps=3"]), run, console=Console(quiet=True))
    assert 'pyramid_time = "logit-normal"' in (run / "recipe.toml").read_text()


def test_sweep_run_ids_change_only_for_pyramidal_runs_at_the_new_default():
    """`dfm ablate` names a run by the hash of its settings: the key joins them only where it
    changes what was trained before it, so a pyramidal cell at the new default trains again,
    and every other run (and a logit-normal pyramidal one) keeps its id."""
    from dfm_cli.ablate.ids import run_settings
    from dfm_cli.config.recipe import load_recipe

    assert "pyramid_time" not in run_settings(load_recipe(ROOT / "recipes" / "tiny.toml"))["flow"]
    assert "pyramid_time" not in run_settings(load_recipe(ROOT / "recipes" / "tiny" / "cascaded.toml"))["flow"]
    assert "pyramid_time" not in run_settings(load_recipe(PYRAMIDAL, ["flow.pyramid_time=logit-normal"]))["flow"]
    assert run_settings(load_recipe(PYRAMIDAL))["flow"]["pyramid_time"] == "uniform"


@pytest.mark.e2e
def test_tiny_pyramidal_recipe_trains_and_samples_and_counts_each_stages_flops(tmp_path):
    from dfm_cli.config.method import method_of
    from dfm_cli.config.recipe import load_recipe
    from dfm_cli.methods.factory import build_model
    from dfm_cli.training.perf import forward_flops

    recipe_path = ROOT / "recipes" / "tiny" / "pyramidal.toml"
    run_dfm("train", recipe_path, "--out", tmp_path / "R")
    run_dfm("sample", tmp_path / "R", "--n", "4", "--out", tmp_path / "g.png")
    assert (tmp_path / "g.png").is_file()
    recipe = load_recipe(recipe_path)
    model = build_model(recipe, (1, 16, 16), 10)
    assert model.level_sizes == [(16, 16)]  # one DiT at the finest size
    per_stage = [forward_flops(model, (1, 4, 4)), forward_flops(model, (1, 8, 8))]
    assert method_of(recipe).forward_flops(model) == pytest.approx(0.5 * per_stage[0] + 0.5 * per_stage[1])
    assert per_stage[0] < per_stage[1] == forward_flops(model)
