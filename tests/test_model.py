import pytest
import torch

from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import LaplacianPyramid
from dfm_cli.models.dit import MODELS, DFMDiT, model_size
from dfm_cli.models.positions import apply_rope, grid_positions, level_patches, rope_angles, rope_rotations


def build(levels, res=32, name="DFM-N/4", **kw):
    sizes = LaplacianPyramid(levels, [2] * (levels - 1)).level_sizes((res, res))
    return DFMDiT(model_size(name), sizes, channels=3, num_classes=10, **kw)


def test_patch_sizes_give_every_level_the_same_token_grid():
    sizes = LaplacianPyramid(3, [2, 2]).level_sizes((64, 64))
    assert level_patches(sizes, 4) == [(1, 1), (1, 2), (1, 4)]
    assert level_patches(LaplacianPyramid(2, [4]).level_sizes((64, 64)), 4) == [(1, 1), (1, 4)]
    with pytest.raises(DfmError, match="patch >= 4"):
        level_patches(sizes, 2)


def test_registry_has_the_paper_sizes_and_suggests_on_typos():
    for name, (depth, hidden, heads) in {
        "DFM-S/2": (12, 384, 6),
        "DFM-B/2": (12, 768, 12),
        "DFM-L/2": (24, 1024, 16),
        "DFM-XL/2": (28, 1152, 16),
    }.items():
        size = MODELS[name]
        assert (size.depth, size.hidden, size.heads, size.patch) == (depth, hidden, heads, 2)
    with pytest.raises(DfmError, match="did you mean 'DFM-XL/2'"):
        model_size("DFM-XXL/2")


def test_heads_are_zero_initialised_and_shapes_match_levels():
    model = build(2)
    xs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)]
    out = model(xs, torch.rand(2, 2), torch.tensor([1, 10]), torch.tensor([0, 1]))
    assert [o.shape for o in out] == [x.shape for x in xs]
    assert all((o == 0).all() for o in out)


def test_sequence_length_and_overhead_match_the_fm_baseline():
    fm, dfm = build(1, name="DFM-B/2"), build(2, name="DFM-B/2")
    assert fm.grid == dfm.grid == (1, 16, 16)
    n_fm = sum(p.numel() for p in fm.parameters())
    n_dfm = sum(p.numel() for p in dfm.parameters())
    assert 0 < (n_dfm - n_fm) / n_fm < 0.02  # paper: about +0.6% for XL


@pytest.mark.parametrize("pos", ["rope", "sincos"])
def test_conditioning_reaches_the_output(pos):
    model = build(2, pos=pos)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    xs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)]
    t, y, stage = torch.rand(2, 2), torch.tensor([1, 2]), torch.tensor([1, 1])
    base = model(xs, t, y, stage)[1]
    for changed in ((xs, t, torch.tensor([3, 4]), stage), (xs, t.flip(1), y, stage), (xs, t, y, torch.tensor([0, 0]))):
        assert not torch.allclose(model(*changed)[1], base)
    # positions matter: shifting the image content changes the prediction beyond a shift
    rolled = [x.roll(1, -1) for x in xs]
    assert not torch.allclose(model(rolled, t, y, stage)[1], base.roll(1, -1), atol=1e-4)


def test_video_model_patchifies_frames_and_keeps_shapes():
    sizes = LaplacianPyramid(2, [2], [1]).level_sizes((4, 16, 16))
    model = DFMDiT(model_size("DFM-N/2"), sizes, channels=3, num_classes=5)
    assert model.grid == (4, 8, 8)
    xs = [torch.randn(1, 3, 4, 8, 8), torch.randn(1, 3, 4, 16, 16)]
    out = model(xs, torch.rand(1, 2), torch.tensor([0]), torch.tensor([1]))
    assert [o.shape for o in out] == [x.shape for x in xs]
    with pytest.raises(DfmError, match="temporal|cannot give"):
        DFMDiT(model_size("DFM-N/2"), LaplacianPyramid(2, [2], [2]).level_sizes((4, 16, 16)), 3, 5)


def test_bad_model_settings_are_clear_errors():
    with pytest.raises(DfmError, match="model.pos"):
        build(2, pos="learned")


# --------------------------------------------------------------------------- RoPE


def test_rope_is_a_rotation_that_sees_only_relative_positions():
    grid, head_dim = (1, 6, 6), 16
    rot = rope_rotations(rope_angles(grid, head_dim))
    n = 36
    q = torch.randn(n, head_dim)
    rq = apply_rope(q, rot)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-6)  # norm-preserving
    # the same query and key vectors at every position: q·k depends only on the offset
    qv, kv = torch.randn(head_dim), torch.randn(head_dim)
    rq, rk = apply_rope(qv.expand(n, -1), rot).double(), apply_rope(kv.expand(n, -1), rot).double()
    pos = grid_positions(grid)[:, 1:]
    scores = rq @ rk.T
    seen: dict[tuple[int, int], float] = {}
    for i in range(n):
        for j in range(n):
            offset = tuple((pos[i] - pos[j]).tolist())
            seen.setdefault(offset, float(scores[i, j]))
            assert abs(seen[offset] - float(scores[i, j])) < 1e-6  # float32 tables
    assert len({round(v, 6) for v in seen.values()}) > 10  # and it does depend on the offset


def test_rope_rotations_are_computed_once_per_grid_not_per_block():
    model = build(2, name="DFM-N/2")
    assert model.rope.shape == (model.grid[1] * model.grid[2], 16) and model.rope.is_complex()
    calls = []
    original = torch.Tensor.cos
    try:
        torch.Tensor.cos = lambda self: calls.append(1) or original(self)
        model(
            [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 32, 32)],
            torch.rand(1, 2),
            torch.tensor([1]),
            torch.tensor([1]),
        )
    finally:
        torch.Tensor.cos = original
    assert calls == []


# --------------------------------------------------------------------------- preconditioning


def test_precondition_gives_each_level_unit_variance_input():
    rms, b, seen = [3.0, 0.2], 4096, []
    x1 = [torch.randn(b, 3, 2, 2) * rms[0], torch.randn(b, 3, 4, 4) * rms[1]]
    small = DFMDiT(model_size("DFM-N/2"), [(2, 2), (4, 4)], channels=3, num_classes=10, level_rms=rms)
    for embed in small.patch_embeds:
        embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    t = torch.rand(b, 2)
    x0 = [torch.randn_like(x) for x in x1]
    xt = [t[:, s, None, None, None] * x + (1 - t[:, s, None, None, None]) * n for s, (x, n) in enumerate(zip(x1, x0))]
    with torch.no_grad():
        out = small(xt, t, torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long))
    for level in seen:
        assert abs(float(level.var()) - 1) < 0.05
    # zero-initialised heads: the output is c_skip x_t, the best linear guess of the velocity
    target = [x - n for x, n in zip(x1, x0)]
    for o, v in zip(out, target):
        assert float(((o - v) ** 2).mean()) < float(v.var())


def test_precondition_is_off_by_default_and_rides_in_the_state_dict():
    torch.manual_seed(0)
    plain = build(2)
    torch.manual_seed(0)
    pre = build(2, level_rms=[1.5, 0.3])
    assert "level_rms" not in plain.state_dict() and plain.level_rms is None
    assert set(pre.state_dict()) - set(plain.state_dict()) == {"level_rms"}
    for p in list(plain.parameters()) + list(pre.parameters()):
        torch.nn.init.normal_(p, std=0.05)
    pre.load_state_dict({**plain.state_dict(), "level_rms": pre.level_rms})
    xs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)]
    args = (torch.rand(2, 2), torch.tensor([1, 2]), torch.tensor([1, 1]))
    assert all(torch.equal(a, b) for a, b in zip(plain(xs, *args), plain.network(xs, *args)))
    assert not torch.allclose(pre(xs, *args)[1], plain(xs, *args)[1])
    with pytest.raises(DfmError, match="one positive level RMS per level"):
        build(2, level_rms=[1.0])


def test_precondition_rms_comes_from_the_level_statistics():
    from dfm_cli.config.recipe import load_recipe
    from dfm_cli.methods.factory import build_model, precondition_rms

    recipe = load_recipe("recipes/tiny.toml", ["flow.precondition=true"])
    stats = {"mean": [[0.5, -0.5], [0.0, 0.0]], "std": [[0.5, 0.5], [0.1, 0.3]]}
    rms = precondition_rms(recipe, stats)
    assert rms == pytest.approx([0.5**0.5, (0.05) ** 0.5])
    assert build_model(recipe, (2, 16, 16), 10, rms).level_rms.tolist() == pytest.approx(rms)
    with pytest.raises(DfmError, match="flow.precondition"):
        build_model(recipe, (2, 16, 16), 10)
    standardized = load_recipe("recipes/tiny.toml", ["flow.precondition=true", "flow.standardize=true"])
    assert precondition_rms(standardized, stats) == [1.0, 1.0]
    assert precondition_rms(load_recipe("recipes/tiny.toml"), stats) is None


def test_rope_pairs_and_angles_are_those_of_earlier_checkpoints():
    angles = rope_angles((1, 4, 4), 16)
    x = torch.randn(2, 3, 16, 16)
    x2 = x.reshape(2, 3, 16, 8, 2)  # the earlier form: strided pairs rotated by cos/sin
    cos, sin = angles.cos(), angles.sin()
    earlier = torch.stack([x2[..., 0] * cos - x2[..., 1] * sin, x2[..., 0] * sin + x2[..., 1] * cos], -1).flatten(-2)
    assert torch.allclose(apply_rope(x, rope_rotations(angles)), earlier, atol=1e-6)
