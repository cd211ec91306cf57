import torch

from dfm_cli.method.decompose import LaplacianPyramid
from dfm_cli.method.flow import FlowObjective, mask_later_levels
from dfm_cli.models.dit import DFMDiT, model_size


def tiny_model(levels: int = 2) -> DFMDiT:
    sizes = LaplacianPyramid(levels, [2] * (levels - 1)).level_sizes((16, 16))
    model = DFMDiT(model_size("DFM-N/4"), sizes, channels=1, num_classes=10)
    for p in model.parameters():  # leave the zero-init so every path carries gradient
        torch.nn.init.normal_(p, std=0.05)
    return model


def batch(levels: int = 2, b: int = 6):
    x = torch.randn(b, 1, 16, 16)
    return LaplacianPyramid(levels, [2] * (levels - 1)).decompose(x), torch.randint(0, 10, (b,))


def draws_for(obj: FlowObjective, x1, seed: int = 0, dropout: float = 0.0):
    shapes = [level.shape[1:] for level in x1]
    return obj.draw(shapes, [seed * 1000 + i for i in range(x1[0].shape[0])], seed, dropout)


def test_masked_level_gets_exactly_zero_gradient():
    model = tiny_model()
    x1, y = batch()
    obj = FlowObjective(p_stage=(1.0, 0.0))
    out = obj.loss(model, x1, y, draws_for(obj, x1))
    assert (out["stage"] == 0).all() and (out["t"][:, 1] == 0).all()
    out["loss"].backward()
    head2 = [p.grad for p in model.level_heads[1].parameters()]
    assert all(g is not None for g in head2), "the masked head must stay in the graph (DDP)"
    assert all((g == 0).all() for g in head2)
    assert (model.patch_embeds[1].proj.weight.grad == 0).all()  # its input was zeroed
    assert any((p.grad != 0).any() for p in model.level_heads[0].parameters())


def test_p_stage_one_zero_equals_flow_matching_on_the_coarse_level():
    model = tiny_model()
    x1, y = batch()
    obj = FlowObjective(p_stage=(1.0, 0.0))
    d = draws_for(obj, x1, seed=3)
    out = obj.loss(model, x1, y, d)
    b = y.shape[0]
    # Flow Matching on level 1 alone, with the same t and noise; level 2 is simply absent.
    t1 = d.t[:, 0].reshape(-1, 1, 1, 1)
    xt1 = t1 * x1[0] + (1 - t1) * d.noise[0]
    pred = model([xt1, torch.zeros_like(x1[1])], d.t, y, torch.zeros(b, dtype=torch.long))
    fm = ((pred[0] - (x1[0] - d.noise[0])) ** 2).mean()
    assert (d.t[:, 1] == 0).all()
    assert torch.allclose(out["loss"], fm, rtol=1e-6, atol=1e-7)


def test_single_level_objective_is_flow_matching():
    model = tiny_model(levels=1)
    x = torch.randn(4, 1, 16, 16)
    y = torch.zeros(4, dtype=torch.long)
    obj = FlowObjective(p_stage=(1.0,))
    d = draws_for(obj, [x], seed=1)
    out = obj.loss(model, [x], y, d)
    t = d.t[:, :, None, None]
    pred = model([t * x + (1 - t) * d.noise[0]], d.t, y, torch.zeros(4, dtype=torch.long))[0]
    assert torch.allclose(out["loss"], ((pred - (x - d.noise[0])) ** 2).mean(), rtol=1e-6)


def test_draws_do_not_depend_on_how_the_batch_is_split():
    obj = FlowObjective(p_stage=(0.5, 0.5))
    shapes, seeds = [(1, 8, 8), (1, 16, 16)], list(range(100, 110))
    whole = obj.draw(shapes, seeds, 7, 0.3)
    parts = [obj.draw(shapes, seeds[:4], 7, 0.3), obj.draw(shapes, seeds[4:], 7, 0.3)]
    assert torch.equal(whole.t, torch.cat([p.t for p in parts]))
    assert torch.equal(whole.stage, torch.cat([p.stage for p in parts]))
    assert torch.equal(whole.drop, torch.cat([p.drop for p in parts]))
    for s in range(2):
        assert torch.equal(whole.noise[s], torch.cat([p.noise[s] for p in parts]))
    assert whole.noise[1].shape == (10, 1, 16, 16)


def test_timestep_rules():
    obj = FlowObjective(p_stage=(0.2, 0.4, 0.4))
    d = obj.draw([(1,), (1,), (1,)], list(range(20000)), 0)
    stage, t = d.stage, d.t
    freq = torch.bincount(stage, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64), atol=0.015)
    level = torch.arange(3).expand_as(t)
    later, earlier, current = level > stage[:, None], level < stage[:, None], level == stage[:, None]
    assert (t[later] == 0).all()
    assert ((t[earlier | current] > 0) & (t[earlier | current] < 1)).all()
    logit = lambda v: torch.log(v / (1 - v))  # noqa: E731
    assert abs(logit(t[current]).mean()) < 0.05 and abs(logit(t[current]).std() - 1) < 0.05
    assert abs(logit(t[earlier]).mean() - 1.5) < 0.05  # earlier levels are cleaner


def test_tied_timesteps_and_per_batch_stage():
    tied = FlowObjective(p_stage=(0.0, 0.0, 1.0), tied_timesteps=True)
    t = tied.draw([(1,)] * 3, list(range(8)), 0).t
    assert (t == t[:, :1]).all()
    per_batch = FlowObjective(p_stage=(0.5, 0.5), per_batch_stage=True)
    stages = [per_batch.draw([(1,), (1,)], list(range(16)), k).stage for k in range(10)]
    assert all((s == s[0]).all() for s in stages) and len({int(s[0]) for s in stages}) == 2


def test_input_masking_switch():
    seen = {}

    def spy(xs, t, y, stage):
        seen["x"] = xs
        return [torch.zeros_like(x, requires_grad=True) for x in xs]

    x1, y = batch()
    obj = FlowObjective(p_stage=(1.0, 0.0))
    obj.loss(spy, x1, y, draws_for(obj, x1))
    assert (seen["x"][1] == 0).all()
    unmasked = FlowObjective(p_stage=(1.0, 0.0), mask_input=False)
    out = unmasked.loss(spy, x1, y, draws_for(unmasked, x1))
    assert seen["x"][1].std() > 0.5  # pure noise goes in, but the loss still ignores it
    assert (out["active"][:, 1] == 0).all()


def test_level_weights_scale_the_level_losses():
    x1, y = batch()
    zero = lambda xs, t, y, stage: [torch.zeros_like(x) for x in xs]  # noqa: E731
    base_obj = FlowObjective(p_stage=(0.0, 1.0))
    base = base_obj.loss(zero, x1, y, draws_for(base_obj, x1))
    weighted = FlowObjective(p_stage=(0.0, 1.0), level_weights=(1.0, 3.0)).loss(zero, x1, y, draws_for(base_obj, x1))
    expect = (base["level_mse"] * torch.tensor([1.0, 3.0])).sum(1).mean()
    assert torch.allclose(weighted["loss"], expect)


def test_mask_and_label_dropout():
    levels = [torch.ones(3, 1, 2, 2), torch.ones(3, 1, 4, 4)]
    masked = mask_later_levels(levels, torch.tensor([0, 1, 0]))
    assert masked[1][:, 0, 0, 0].tolist() == [0, 1, 0] and (masked[0] == 1).all()
    obj = FlowObjective(p_stage=(1.0,))
    d = obj.draw([(1,)], list(range(10000)), 0, label_dropout=0.1)
    assert abs(d.drop.double().mean() - 0.1) < 0.01
    seen = {}

    def spy(xs, t, y, stage):
        seen["y"] = y
        return [torch.zeros_like(x) for x in xs]

    y = torch.arange(10000) % 10
    obj.loss(spy, [torch.zeros(10000, 1)], y, d, null=10)
    assert ((seen["y"] == 10) == d.drop).all() and (seen["y"][~d.drop] == y[~d.drop]).all()
