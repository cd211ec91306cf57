import torch

from dfm_cli.decompose import LaplacianPyramid
from dfm_cli.flow import FlowObjective, drop_labels, mask_later_levels
from dfm_cli.model import DFMDiT, model_size


def tiny_model(levels: int = 2) -> DFMDiT:
    sizes = LaplacianPyramid(levels, [2] * (levels - 1)).level_sizes((16, 16))
    model = DFMDiT(model_size("DFM-N/4"), sizes, channels=1, num_classes=10)
    for p in model.parameters():  # leave the zero-init so every path carries gradient
        torch.nn.init.normal_(p, std=0.05)
    return model


def batch(levels: int = 2, b: int = 6):
    x = torch.randn(b, 1, 16, 16)
    return LaplacianPyramid(levels, [2] * (levels - 1)).decompose(x), torch.randint(0, 10, (b,))


def test_masked_level_gets_exactly_zero_gradient():
    model = tiny_model()
    x1, y = batch()
    out = FlowObjective(p_stage=(1.0, 0.0)).loss(model, x1, y, torch.Generator().manual_seed(0))
    assert (out["stage"] == 0).all() and (out["t"][:, 1] == 0).all()
    out["loss"].backward()
    head2 = [p.grad for p in model.heads[1].parameters()]
    assert all(g is not None for g in head2), "the masked head must stay in the graph (DDP)"
    assert all((g == 0).all() for g in head2)
    assert (model.patch_embeds[1].proj.weight.grad == 0).all()  # its input was zeroed
    assert any((p.grad != 0).any() for p in model.heads[0].parameters())


def test_p_stage_one_zero_equals_flow_matching_on_the_coarse_level():
    model = tiny_model()
    x1, y = batch()
    out = FlowObjective(p_stage=(1.0, 0.0)).loss(model, x1, y, torch.Generator().manual_seed(3))

    # Replay the same draws by hand: stage, timesteps, then the per-level noise.
    g = torch.Generator().manual_seed(3)
    b = y.shape[0]
    torch.multinomial(torch.tensor([1.0, 0.0], dtype=torch.float64), b, replacement=True, generator=g)
    t1 = torch.sigmoid(torch.randn(b, 1, generator=g))[:, 0]
    torch.randn(b, 2, generator=g)  # earlier-level draws (unused at stage 1)
    x0 = [torch.randn(level.shape, generator=g) for level in x1]
    xt1 = t1[:, None, None, None] * x1[0] + (1 - t1[:, None, None, None]) * x0[0]
    t = torch.stack([t1, torch.zeros(b)], 1)
    pred = model([xt1, torch.zeros_like(x1[1])], t, y, torch.zeros(b, dtype=torch.long))
    fm = ((pred[0] - (x1[0] - x0[0])) ** 2).mean()
    assert torch.allclose(out["loss"], fm, rtol=1e-6, atol=1e-7)


def test_single_level_objective_is_flow_matching():
    model = tiny_model(levels=1)
    x = torch.randn(4, 1, 16, 16)
    y = torch.zeros(4, dtype=torch.long)
    out = FlowObjective(p_stage=(1.0,)).loss(model, [x], y, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.multinomial(torch.tensor([1.0], dtype=torch.float64), 4, replacement=True, generator=g)
    t = torch.sigmoid(torch.randn(4, 1, generator=g))
    torch.randn(4, 1, generator=g)
    x0 = torch.randn(x.shape, generator=g)
    tb = t[:, :, None, None]
    pred = model([tb * x + (1 - tb) * x0], t, y, torch.zeros(4, dtype=torch.long))[0]
    assert torch.allclose(out["loss"], ((pred - (x - x0)) ** 2).mean(), rtol=1e-6)


def test_timestep_rules():
    obj = FlowObjective(p_stage=(0.2, 0.4, 0.4))
    g = torch.Generator().manual_seed(0)
    stage = obj.sample_stage(20000, g)
    freq = torch.bincount(stage, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64), atol=0.015)
    t = obj.sample_timesteps(stage, g)
    level = torch.arange(3).expand_as(t)
    later, earlier, current = level > stage[:, None], level < stage[:, None], level == stage[:, None]
    assert (t[later] == 0).all()
    assert ((t[earlier | current] > 0) & (t[earlier | current] < 1)).all()
    logit = lambda v: torch.log(v / (1 - v))  # noqa: E731
    assert abs(logit(t[current]).mean()) < 0.05 and abs(logit(t[current]).std() - 1) < 0.05
    assert abs(logit(t[earlier]).mean() - 1.5) < 0.05  # earlier levels are cleaner


def test_tied_timesteps_and_per_batch_stage():
    g = torch.Generator().manual_seed(0)
    tied = FlowObjective(p_stage=(0.0, 0.0, 1.0), tied_timesteps=True)
    t = tied.sample_timesteps(tied.sample_stage(8, g), g)
    assert (t == t[:, :1]).all()
    per_batch = FlowObjective(p_stage=(0.5, 0.5), per_batch_stage=True)
    for _ in range(10):
        s = per_batch.sample_stage(16, g)
        assert (s == s[0]).all()


def test_input_masking_switch():
    seen = {}

    def spy(xs, t, y, stage):
        seen["x"] = xs
        return [torch.zeros_like(x, requires_grad=True) for x in xs]

    x1, y = batch()
    FlowObjective(p_stage=(1.0, 0.0)).loss(spy, x1, y, torch.Generator().manual_seed(0))
    assert (seen["x"][1] == 0).all()
    out = FlowObjective(p_stage=(1.0, 0.0), mask_input=False).loss(spy, x1, y, torch.Generator().manual_seed(0))
    assert seen["x"][1].std() > 0.5  # pure noise goes in, but the loss still ignores it
    assert (out["active"][:, 1] == 0).all()


def test_level_weights_scale_the_level_losses():
    x1, y = batch()
    zero = lambda xs, t, y, stage: [torch.zeros_like(x) for x in xs]  # noqa: E731
    base = FlowObjective(p_stage=(0.0, 1.0)).loss(zero, x1, y, torch.Generator().manual_seed(0))
    weighted = FlowObjective(p_stage=(0.0, 1.0), level_weights=(1.0, 3.0)).loss(
        zero, x1, y, torch.Generator().manual_seed(0))
    expect = (base["level_mse"] * torch.tensor([1.0, 3.0])).sum(1).mean()
    assert torch.allclose(weighted["loss"], expect)


def test_mask_and_label_dropout_helpers():
    levels = [torch.ones(3, 1, 2, 2), torch.ones(3, 1, 4, 4)]
    masked = mask_later_levels(levels, torch.tensor([0, 1, 0]))
    assert masked[1][:, 0, 0, 0].tolist() == [0, 1, 0] and (masked[0] == 1).all()
    y = torch.arange(10000) % 10
    dropped = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    assert abs((dropped == 10).double().mean() - 0.1) < 0.01
    assert (dropped[dropped != 10] == y[dropped != 10]).all()
