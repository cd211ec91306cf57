import pytest
import torch

from dfm_cli.decompose import LaplacianPyramid
from dfm_cli.errors import DfmError
from dfm_cli.model import MODELS, DFMDiT, level_patches, model_size


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
    for name, (depth, hidden, heads) in {"DFM-S/2": (12, 384, 6), "DFM-B/2": (12, 768, 12),
                                          "DFM-L/2": (24, 1024, 16), "DFM-XL/2": (28, 1152, 16)}.items():
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
    for changed in ((xs, t, torch.tensor([3, 4]), stage), (xs, t.flip(1), y, stage),
                    (xs, t, y, torch.tensor([0, 0]))):
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
