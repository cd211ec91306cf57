import pytest
import torch

from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import (
    BlockDCT,
    Decomposition,
    HaarWavelet,
    LaplacianPyramid,
    build_decomposition,
    dct_matrix,
)
from dfm_cli.method.level_report import crop_to_multiple, energy_shares

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


@pytest.mark.parametrize(
    "shape,factors", [((1, 1, 30, 32), [2, 2]), ((1, 1, 32, 36), [4, 2]), ((1, 1, 3, 16, 16), [2])]
)
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


# --------------------------------------------------------------------------- dwt / dct (paper Table 6)

SPATIAL_CASES = [
    (2, [2], (2, 3, 16, 16)),
    (3, [2, 2], (1, 4, 32, 48)),
    (4, [2, 2, 2], (2, 1, 64, 32)),
    (3, [4, 2], (1, 2, 64, 64)),
    (2, [2], (1, 3, 2, 16, 16)),
]


@pytest.mark.parametrize("name", ["dwt", "dct"])
@pytest.mark.parametrize("levels,factors,shape", SPATIAL_CASES)
def test_dwt_and_dct_recompose_exactly_with_the_laplacian_level_sizes(name, levels, factors, shape):
    dec = build_decomposition(name, levels, factors)
    assert isinstance(dec, Decomposition)
    x = torch.randn(shape) * 3
    bands = dec.decompose(x)
    assert [tuple(b.shape[2:]) for b in bands] == LaplacianPyramid(levels, factors).level_sizes(shape[2:])
    assert (dec.recompose(bands) - x).abs().max() <= 1e-5
    assert dec.upsample_to(dec.recompose(bands[:1]), shape[2:]).shape == x.shape


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_haar_coarse_level_is_pywavelets_approximation_up_to_its_normalisation(levels):
    pywt = pytest.importorskip("pywt")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    bands = HaarWavelet(levels, [2] * (levels - 1)).decompose(x)
    approx = pywt.wavedec2(x.numpy(), "haar", level=levels - 1, axes=(-2, -1))[0]
    # orthonormal Haar multiplies the block mean by 2 per 2-D step
    assert torch.allclose(bands[0] * 2 ** (levels - 1), torch.from_numpy(approx), atol=1e-10)


def test_haar_detail_level_is_the_inverse_transform_of_the_detail_coefficients():
    pywt = pytest.importorskip("pywt")
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    approx, details = pywt.dwt2(x.numpy(), "haar", axes=(-2, -1))
    only_details = pywt.idwt2((None, details), "haar", axes=(-2, -1))
    assert torch.allclose(HaarWavelet(2, [2]).decompose(x)[1], torch.from_numpy(only_details), atol=1e-10)


def test_dct_low_band_is_a_projection_on_low_frequencies():
    dec = BlockDCT(2, [2])
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64)
    low, high = dec.decompose(x)
    # the detail band holds no low frequency of any 8x8 block, and is orthogonal to the low band
    d = dct_matrix(8, torch.float64)
    coef = d @ high.reshape(2, 8, 2, 8).permute(0, 2, 1, 3) @ d.T
    assert coef[..., :4, :4].abs().max() < 1e-10
    assert abs(float((dec.recompose([low, torch.zeros_like(high)]) * high).sum())) < 1e-9


def test_dwt_and_dct_refuse_what_they_cannot_do():
    with pytest.raises(DfmError, match="powers of two"):
        build_decomposition("dwt", 2, [3])
    with pytest.raises(DfmError, match="temporal_factors"):
        build_decomposition("dct", 2, [2], [2])
    with pytest.raises(DfmError, match="flow.antialias"):
        build_decomposition("dwt", 2, [2], antialias=True)


# --------------------------------------------------------------------------- factor 4 (imagenet1024)


def test_factor_four_low_band_is_the_block_mean_not_the_centre_samples():
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    low = LaplacianPyramid(2, [4]).decompose(x)[0]
    assert torch.allclose(low, torch.nn.functional.avg_pool2d(x, 4), atol=1e-12)
    centre = x.reshape(1, 1, 8, 4, 8, 4)[:, :, :, 1:3, :, 1:3].mean((3, 5))  # what ×1/4 bilinear did
    assert not torch.allclose(low, centre, atol=1e-3)
    # a ×2 cascade of the factor-2 pyramid gives the same coarse level as one factor-4 step
    assert torch.allclose(low, LaplacianPyramid(3, [2, 2]).decompose(x)[0], atol=1e-12)
    # an odd factor is antialiased rather than sampled at the block centre
    y = torch.randn(1, 1, 27, 27, dtype=torch.float64)
    odd = LaplacianPyramid(2, [3]).decompose(y)[0]
    assert odd.shape[-1] == 9 and not torch.allclose(odd, y[:, :, 1::3, 1::3], atol=1e-3)


def test_level_report_writes_every_level_and_its_table(tmp_path):
    from dfm_cli.method.level_report import analyse, report_table, write_report

    x = torch.rand(1, 3, 32, 32) * 2 - 1
    report = analyse(x, build_decomposition("dwt", 3, [2, 2]), encode=lambda im: im[:, :2, ::2, ::2])
    assert report.error <= 1e-5 and len(report.latent_levels) == 3
    names = {p.name for p in write_report(report, tmp_path)}
    assert names == {
        "level_1.png",
        "level_2.png",
        "level_3.png",
        "recomposition.png",
        "levels.npz",
        "latent_level_1.png",
        "latent_level_2.png",
        "latent_level_3.png",
    }
    import numpy as np

    assert np.load(tmp_path / "levels.npz")["level_1"].shape == (3, 8, 8)
    assert report_table(report, "t").row_count == 3 and 0 <= report.equivariance <= 1
