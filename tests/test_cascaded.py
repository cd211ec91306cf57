"""The Cascaded baseline (`flow.method = "cascaded"`): stage 2 sees stage 1 only through its
conditioning, summed into its tokens at an FM forward's cost (or as tokens of its own), upsampled
bilinearly in training and sampling alike; the augmentation follows its logit-normal law in
training and the fixed level when sampling; stage 2 starts from stage 1, with its own warm-ups,
while stage 1's EMA stays frozen; runs written before these settings sample as they did; and
a tiny recipe trains and samples."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, run_dfm
from rich.console import Console

from dfm_cli.baselines.cascaded import CascadedDiT, CascadedObjective, CascadeSettings, sample_cascaded
from dfm_cli.config.method import method_of
from dfm_cli.config.recipe import load_recipe
from dfm_cli.errors import DfmError
from dfm_cli.models.dit import model_size

TINY_CASCADE = ROOT / "recipes" / "tiny" / "cascaded.toml"


def cascade(condition: str = "sum") -> CascadedDiT:
    torch.manual_seed(0)
    model = CascadedDiT(model_size("DFM-N/4"), [(8, 8), (16, 16)], 3, 10, condition)
    with torch.no_grad():
        for p in model.parameters():  # no zero init may hide a path
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("condition", ["sum", "tokens"])
@torch.no_grad()
def test_stage_2_sees_stage_1_only_through_its_conditioning(condition):
    model = cascade(condition)
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


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@torch.no_grad()
def test_sampling_conditions_stage_2_on_stage_1_at_the_fixed_noise_level(mode):
    model, seen = cascade(), []

    def spy(levels, t, y, stage):
        seen.append(([x.clone() for x in levels], t.clone(), stage.clone()))
        return [torch.zeros_like(levels[0]), torch.zeros_like(levels[1])]

    settings = CascadeSettings(cond_noise=0.025, upsample=mode)
    cpu = torch.device("cpu")
    x, nfe = sample_cascaded(spy, torch.arange(64) % 10, model, [2, 3], settings, 0, range(64), cpu)
    assert nfe == 5 and x.shape == (64, 3, 16, 16)
    stage2 = [call for call in seen if int(call[2][0]) == 1]
    assert len(stage2) == 3
    for levels, t, _ in stage2:
        coarse, _, cond = levels
        assert torch.all(t[:, 2] == 1 - 0.025)
        residual = (cond - 0.975 * F.interpolate(coarse, scale_factor=2, mode=mode)) / 0.025
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
    assert stage2 > stage1 > 0  # stage 2 adds the conditioning's embeddings
    tokens1, tokens2 = cascade("tokens").stage_flops()
    assert tokens1 == stage1 and tokens2 > 2 * tokens1  # twice the tokens, attention over all of them


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
    """With its conditioning as tokens, stage 2 costs about twice stage 1 per image, so a later
    switch costs less per image (and sweep planning must not reuse one split's figure for
    another)."""
    from dfm_cli.ablate.compute import forward_flops_of

    late, early = (
        forward_flops_of(load_recipe(TINY_CASCADE, [f"flow.cascade_split={s}", "flow.cascade_condition=tokens"]))
        for s in (0.8, 0.5)
    )
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


# --------------------------------------------------------------------------- fair by default

FM = ["flow.levels=1", "flow.p_stage=[1.0]", "sample.steps=[3]"]


@pytest.mark.parametrize("model, resolution", [("DFM-T/8", 64), ("DFM-B/2", 32)])
def test_summed_conditioning_trains_at_the_cost_of_flow_matching(model, resolution):
    """Same model, same tokens per step: with the conditioning summed into stage 2's tokens (the
    default), the cascade's training FLOPs per image, and stage 2's alone, are within 2% of FM's;
    as tokens of their own they make stage 2 cost over twice as much."""
    from dfm_cli.ablate.compute import data_shape, forward_flops_of, probe_model

    size = [f"model.name={model}", f"data.resolution={resolution}"]
    fm = forward_flops_of(load_recipe(TINY, [*FM, *size]))
    summed, tokens = (
        load_recipe(TINY_CASCADE, [*size, "flow.cascade_split=0.8", *extra])
        for extra in ([], ["flow.cascade_condition=tokens"])
    )
    assert summed.flow.cascade_condition == "sum"
    assert forward_flops_of(summed) == pytest.approx(fm, rel=0.02)
    with torch.device("meta"):  # shapes only
        stage2 = [probe_model(r, data_shape(r)[0]).stage_flops()[1] for r in (summed, tokens)]
    assert stage2[0] == pytest.approx(fm, rel=0.02) and stage2[1] > 2 * fm
    assert forward_flops_of(tokens) > 1.15 * fm


@pytest.mark.parametrize("condition, length", [("sum", 16), ("tokens", 32)])
@torch.no_grad()
def test_summed_conditioning_keeps_stage_2s_sequence(condition, length):
    """Stage 2's blocks see its 16 image tokens with the conditioning summed in, or 32 with the
    conditioning's tokens joined."""
    model, seen = cascade(condition), []
    model.stage2.blocks[0].register_forward_pre_hook(lambda block, args: seen.append(args[0].shape[1]))
    levels = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    out = model(levels, torch.rand(2, 3), torch.tensor([1, 2]), torch.ones(2, dtype=torch.long))
    assert seen == [length] and out[1].shape == (2, 3, 16, 16)


def test_one_conditionings_weights_never_load_into_the_other():
    """The conditioning's embedding has a name per conditioning, so weights trained one way
    cannot silently sample the other way."""
    with pytest.raises(RuntimeError, match="cond_sum_embed"):
        cascade("sum").load_state_dict(cascade("tokens").state_dict())
    with pytest.raises(RuntimeError, match="cond_embed"):
        cascade("tokens").load_state_dict(cascade("sum").state_dict())


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@torch.no_grad()
def test_training_and_sampling_upsample_the_conditioning_alike(mode):
    """The objective conditions stage 2 on `a up(L) + (1 - a) n`, and the sampler on
    `(1 - cond_noise) up(x) + cond_noise n`, with the same `up`: bilinear by default."""
    recipe = load_recipe(TINY_CASCADE, [] if mode == "bilinear" else ["flow.cascade_upsample=nearest"])
    assert recipe.flow.cascade_upsample == mode
    method = method_of(recipe)
    objective = method.objective_at(method.objective(), method.switch_step)
    g = torch.Generator().manual_seed(0)
    coarse, fine = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    draws = objective.draw([(3, 8, 8), (3, 16, 16)], range(4), 0)
    seen: list[list[torch.Tensor]] = []

    def spy(levels, t, y, stage):
        seen.append([x.clone() for x in levels])
        return [torch.zeros_like(levels[0]), torch.zeros_like(levels[1])]

    objective.loss(spy, [coarse, fine], torch.zeros(4, dtype=torch.long), draws)
    a = draws.t[:, 2].reshape(4, 1, 1, 1)
    expected = a * F.interpolate(coarse, scale_factor=2, mode=mode) + (1 - a) * draws.noise[2]
    torch.testing.assert_close(seen[-1][2], expected, rtol=0, atol=1e-6)

    model, seen = method.build_model((3, 16, 16), 10), []
    model.register_forward_pre_hook(lambda module, args: seen.append([x.clone() for x in args[0]]))
    method.generate(model, torch.arange(64) % 10, method.decomposition(), recipe.sampler_settings(), seed=0)
    c = recipe.sample.cond_noise
    coarse, _, cond = seen[-1]  # a stage-2 call: the finished coarse image and the conditioning
    residual = (cond - (1 - c) * F.interpolate(coarse, scale_factor=2, mode=mode)) / c
    assert abs(float(residual.mean())) < 0.05 and abs(float(residual.std()) - 1) < 0.05


@pytest.fixture(scope="module")
def across_the_switch(tmp_path_factory):
    """The tiny cascade trained 4 steps, stage 1 for 2 then stage 2 for 2, with a learning-rate
    warm-up of 2 steps: its EMA after every step, the learning rate each optimizer step used,
    and the stats lines."""
    import json

    from dfm_cli.training import loop

    recipe = load_recipe(TINY_CASCADE, ["train.steps=4", "train.warmup_steps=2", "sample.n=2"])
    run, emas, lrs = tmp_path_factory.mktemp("switch") / "run", {}, []

    def snapshot(done, ema):
        emas[done] = {k: v.detach().clone() for k, v in ema.state_dict().items()}
        return {}

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.torch.optim, "AdamW", Recording)
        loop.train(recipe, run, console=Console(quiet=True), hooks=[(1, snapshot)])
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    return recipe, emas, lrs, stats


def test_stage_1s_ema_stays_as_it_was_at_the_switch(across_the_switch):
    """Stage 1's EMA samples the coarse image: from the switch (after step 2) it stays bit for
    bit what it was, through every stage-2 step, while stage 2's EMA follows stage 2."""
    recipe, emas, _, _ = across_the_switch
    assert method_of(recipe).switch_step == 2 and sorted(emas) == [1, 2, 3, 4]
    stage1 = [k for k in emas[2] if k.startswith("stage1.")]
    assert len(stage1) > 10
    assert any(not torch.equal(emas[1][k], emas[2][k]) for k in stage1)  # it followed stage 1 until then
    for done in (3, 4):
        changed = [k for k in stage1 if not torch.equal(emas[done][k], emas[2][k])]
        assert not changed, f"after step {done}, stage 1's EMA moved: {changed[:3]}"
    stage2 = [k for k in emas[2] if k.startswith("stage2.blocks.")]
    assert any(not torch.equal(emas[3][k], emas[4][k]) for k in stage2)


def test_the_learning_rate_warms_up_again_at_the_switch(across_the_switch):
    """Stage 2 is a new model with fresh optimizer moments: the learning rate's warm-up
    (train.warmup_steps) starts again at the switch, in the optimizer and in the stats; other
    methods keep one warm-up."""
    recipe, _, lrs, stats = across_the_switch
    lr = recipe.train.lr
    assert lrs == pytest.approx([lr / 2, lr, lr / 2, lr])
    assert [row["lr"] for row in stats] == pytest.approx([lr / 2, lr, lr / 2, lr])
    plain = method_of(load_recipe(TINY, ["train.steps=4", "train.warmup_steps=2"]))
    assert plain.lr_warmup_start(3) == 0 and plain.ema_frozen(3) == ()


def test_a_run_saved_before_the_conditioning_keys_samples_as_it_was_trained(tmp_path):
    """A run folder whose recipe.toml predates `flow.cascade_condition` and
    `flow.cascade_upsample` was trained with tokens and nearest upsampling: it loads so, and
    samples exactly as with those keys written out; resuming it with today's defaults is
    refused, naming the key."""
    from dfm_cli.data.checkpoints import complete_checkpoints
    from dfm_cli.sampling.runs import load_for_sampling
    from dfm_cli.training.loop import train
    from dfm_cli.training.resume import check_resumable

    run, earlier = tmp_path / "run", ["flow.cascade_condition=tokens", "flow.cascade_upsample=nearest"]
    train(load_recipe(TINY_CASCADE, ["train.steps=2", "sample.n=2", *earlier]), run, console=Console(quiet=True))

    def sampled():
        trained = load_for_sampling(run)
        x = trained.generate(torch.arange(8) % 10, trained.recipe.sampler_settings(), seed=0).x
        return trained.recipe, x

    written, before = sampled()
    assert (written.flow.cascade_condition, written.flow.cascade_upsample) == ("tokens", "nearest")
    saved = sorted(run.rglob("recipe.toml"))
    assert len(saved) == 2  # the run's and its checkpoint's
    for path in saved:  # as a `dfm` without these keys wrote them
        text = path.read_text()
        path.write_text(re.sub(r"(?m)^cascade_(condition|upsample) = .*\n", "", text))
        assert "cascade_condition" not in path.read_text() and "cascade_split" in path.read_text()
    old, after = sampled()
    assert (old.flow.cascade_condition, old.flow.cascade_upsample) == ("tokens", "nearest")
    assert torch.equal(after, before)
    fresh = load_recipe(saved[0])  # the same file as a new recipe: today's defaults
    assert (fresh.flow.cascade_condition, fresh.flow.cascade_upsample) == ("sum", "bilinear")
    with pytest.raises(DfmError, match=r"flow\.cascade_condition = 'tokens', not 'sum'"):
        check_resumable(run, load_recipe(TINY_CASCADE, ["train.steps=2"]), complete_checkpoints(run)[-1])


@pytest.mark.parametrize("key, value", [("flow.cascade_condition", "concat"), ("flow.cascade_upsample", "bicubic")])
def test_the_conditioning_choices_are_checked(key, value):
    with pytest.raises(DfmError, match=rf"{re.escape(key)} = '{value}': choose one of"):
        load_recipe(TINY_CASCADE, [f"{key}={value}"])
    with pytest.raises(DfmError, match=rf"{re.escape(key)} = .*: is not used by flow.method = 'dfm'"):
        load_recipe(TINY, [f"{key}={'tokens' if key.endswith('condition') else 'nearest'}"])


@pytest.mark.parametrize("bad", ["-0.01", "1.0", "nan"])
def test_the_sampling_conditioning_noise_is_range_checked(bad):
    with pytest.raises(DfmError, match=r"sample\.cond_noise = "):
        load_recipe(TINY_CASCADE, [f"sample.cond_noise={bad}"])


@pytest.mark.parametrize("cond_noise", [0.025, 0.1])
@torch.no_grad()
def test_training_draws_cover_the_sampling_conditioning_noise(cond_noise):
    """Stage 2 samples with the conditioning at noise `sample.cond_noise` (set in the recipe or
    with --set); training draws that noise level as 1 - logit-normal(flow.cascade_aug). The
    training draws reach the sampling value from both sides, as often as the law says (1.5% at
    or below the default 0.025), and the value reaches the sampler."""
    recipe = load_recipe(TINY_CASCADE, [f"sample.cond_noise={cond_noise}"])
    method = method_of(recipe)
    n = 10000
    draws = method.objective_at(method.objective(), method.switch_step).draw([(1, 2, 2), (1, 4, 4)], range(n), 0)
    noise = 1 - draws.t[:, 2].double()
    below = float((noise <= cond_noise).double().mean())
    loc, scale = recipe.flow.cascade_aug
    law = 0.5 * (1 + math.erf((loc - math.log((1 - cond_noise) / cond_noise)) / (scale * math.sqrt(2))))
    assert below == pytest.approx(law, abs=4 * math.sqrt(law * (1 - law) / n)) and 0.01 < below < 0.99
    near = ((noise > cond_noise / 2) & (noise < 2 * cond_noise)).sum()
    assert near > 50  # training sees levels around the sampling one
    if cond_noise == 0.025:
        assert law == pytest.approx(0.0152, abs=1e-4)

    model, seen = method.build_model((3, 16, 16), 10), []
    model.register_forward_pre_hook(lambda module, args: seen.append((args[1].clone(), args[3].clone())))
    method.generate(model, torch.arange(4), method.decomposition(), recipe.sampler_settings(), seed=0)
    stage2 = [t for t, stage in seen if int(stage[0]) == 1]
    assert stage2 and all(torch.all(t[:, 2] == 1 - cond_noise) for t in stage2)
