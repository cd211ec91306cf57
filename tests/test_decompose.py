import pytest
import torch

from dfm_cli.decompose import LaplacianPyramid, build_decomposition, crop_to_multiple, energy_shares
from dfm_cli.errors import DfmError

CASES = [
    # levels, factors, temporal factors, shape (B C [T] H W)
    (2, [2], None, (2, 3, 32, 32)),
    (3, [2, 2], None, (1, 4, 48, 64)),
    (4, [2, 2, 2], None, (2, 1, 64, 32)),
    (2, [4], None, (2, 3, 64, 64)),
    (3, [4, 2], None, (1, 2, 32, 40)),
    (4, [2, 4, 2], None, (1, 3, 64, 128)),
    (2, [2], None, (2, 3, 5, 16, 16)),
    (3, [2, 4], None, (1, 3, 3, 32, 64)),
    (3, [2, 2], [1, 2], (2, 3, 4, 16, 16)),
    (4, [2, 2, 2], [2, 2, 1], (1, 2, 8, 32, 32)),
]


@pytest.mark.parametrize("levels,factors,tfactors,shape", CASES)
@pytest.mark.parametrize("antialias", [False, True])
def test_recomposition_is_exact(levels, factors, tfactors, shape, antialias):
    pyr = LaplacianPyramid(levels, factors, tfactors, antialias=antialias)
    x = torch.randn(shape) * 3
    bands = pyr.decompose(x)
    assert len(bands) == levels
    assert [tuple(b.shape[2:]) for b in bands] == pyr.level_sizes(shape[2:])
    assert bands[-1].shape == x.shape
    assert (pyr.recompose(bands) - x).abs().max() <= 1e-5


def test_level_one_is_the_downsampled_image_and_detail_has_zero_mean_for_smooth_input():
    pyr = LaplacianPyramid(2, [2])
    x = torch.ones(1, 1, 8, 8) * 0.5
    low, high = pyr.decompose(x)
    assert low.shape[-1] == 4 and torch.allclose(low, torch.full_like(low, 0.5))
    assert high.abs().max() < 1e-7  # a constant image has no detail


def test_partial_recomposition_is_the_coarse_approximation():
    pyr = LaplacianPyramid(3, [2, 2])
    x = torch.randn(1, 1, 16, 16)
    bands = pyr.decompose(x)
    coarse = pyr.recompose(bands[:2])
    assert coarse.shape[-1] == 8
    assert pyr.upsample_to(coarse, (16, 16)).shape[-1] == 16


@pytest.mark.parametrize("shape,factors", [((1, 1, 30, 32), [2, 2]), ((1, 1, 32, 36), [4, 2]),
                                           ((1, 1, 3, 16, 16), [2])])
def test_factors_that_do_not_divide_are_a_clear_error(shape, factors):
    pyr = LaplacianPyramid(len(factors) + 1, factors, [2] * len(factors) if len(shape) == 5 else None)
    with pytest.raises(DfmError, match="not divisible"):
        pyr.decompose(torch.zeros(shape))


def test_bad_construction_is_a_clear_error():
    with pytest.raises(DfmError, match="need 2 factors"):
        LaplacianPyramid(3, [2])
    with pytest.raises(DfmError, match="positive integers"):
        LaplacianPyramid(2, [0])
    with pytest.raises(DfmError, match="unknown decomposition"):
        build_decomposition("wavelet", 2)


def test_energy_shares_and_crop():
    pyr = LaplacianPyramid(3, [2, 2])
    x = crop_to_multiple(torch.randn(1, 3, 427, 641), pyr)
    assert x.shape[-2:] == (424, 640)
    shares = energy_shares(pyr.decompose(x))
    assert abs(sum(shares) - 1) < 1e-9 and all(s > 0 for s in shares)
