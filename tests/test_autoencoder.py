"""The autoencoder that `dfm train` trains (`model.kind = "autoencoder"`): it saves as a diffusers
folder that `dfm encode --ae kl` loads, its latent statistics are the data's, it resumes
exactly, and its scale-equivariance loss means what it says."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_dfm
from rich.console import Console
from safetensors.torch import load_file

from dfm_cli.config.recipe import load_recipe
from dfm_cli.data.autoencoders import build_autoencoder
from dfm_cli.data.datasets import build_dataset
from dfm_cli.errors import DfmError
from dfm_cli.training.autoencoder import EXPORT, build_vae, evenly_spaced_images, train_autoencoder
from dfm_cli.training.autoencoder_losses import downsample, pyramid_l1, scale_equivariance_loss

TINY_AE = ROOT / "recipes" / "tiny" / "ae.toml"
QUIET = Console(quiet=True)


def tiny(*overrides: str):
    return load_recipe(TINY_AE, ["ae.stats_num=64", *overrides])


@pytest.mark.e2e  # a whole autoencoder training in-process (about 15 s on 2 cores)
def test_trained_autoencoder_reloads_through_the_encode_path_with_the_same_latents(tmp_path):
    recipe = tiny("train.steps=3", "train.checkpoint_every=3")
    report = train_autoencoder(recipe, tmp_path / "A", QUIET)
    folder = tmp_path / "A" / EXPORT
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()

    # the trained (EMA) weights, rebuilt by hand, against what `dfm encode --ae kl` loads
    ema = build_vae(recipe, 1)
    ema.load_state_dict(load_file(tmp_path / "A" / "checkpoints" / "step-000000003" / "ema.safetensors"))
    coder = build_autoencoder("kl", str(folder))
    x = evenly_spaced_images(build_dataset("animal-mnist", "", 32), 64)
    with torch.no_grad():
        raw = ema.encode(x).latent_dist.mean
    torch.testing.assert_close(coder.encode(x), (raw - coder.shift) * coder.scale, rtol=0, atol=1e-6)
    # the stored scale and shift are the data's: on the images they were measured on,
    # normalized latents have mean 0 and std 1
    z = coder.encode(x)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    assert coder.spatial_factor == 2 and report["latent_shape"] == [4, 16, 16]
    assert 0 < report["equivariance"] <= 1 and report["psnr"] > 0
    assert json.loads((tmp_path / "A" / "report.json").read_text()) == report


@pytest.mark.e2e  # three autoencoder trainings in-process (about 45 s on 2 cores)
def test_autoencoder_resume_equals_an_uninterrupted_run(tmp_path):
    full = tiny("train.steps=4", "train.checkpoint_every=2", "ae.scale_equivariance=true")
    train_autoencoder(full, tmp_path / "full", QUIET)
    train_autoencoder(
        tiny("train.steps=2", "train.checkpoint_every=2", "ae.scale_equivariance=true"), tmp_path / "cut", QUIET
    )
    train_autoencoder(full, tmp_path / "cut", QUIET)  # the same command again: resumes at step 2
    a = load_file(tmp_path / "full" / "checkpoints" / "step-000000004" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-000000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and "se" in rows[0]


def test_finetune_starts_from_the_trained_weights_and_refuses_another_architecture(tmp_path):
    train_autoencoder(tiny("train.steps=1"), tmp_path / "A", QUIET)
    start = build_vae(tiny(f"train.init_from={tmp_path / 'A'}"), 1)
    exported = build_autoencoder("kl", str(tmp_path / "A" / EXPORT)).vae
    for (name, p), q in zip(start.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(DfmError, match="block_out_channels"):
        build_vae(tiny(f"train.init_from={tmp_path / 'A'}", "ae.block_out_channels=[8, 8]"), 1)
    with pytest.raises(DfmError, match="no autoencoder there"):
        build_vae(tiny(f"train.init_from={tmp_path / 'nothing'}"), 1)


class Pointwise(torch.nn.Module):
    """An "autoencoder" that mixes channels per pixel: linear and local, so it commutes with
    box downsampling by construction."""

    def __init__(self):
        super().__init__()
        self.mix = torch.randn(4, 3) + 2 * torch.eye(4, 3)

    def encode(self, x):
        return torch.einsum("lc,bchw->blhw", self.mix, x)

    def decode(self, z):
        return torch.einsum("cl,blhw->bchw", torch.linalg.pinv(self.mix), z)


@pytest.mark.parametrize("factor", [2, 4])
def test_scale_equivariance_loss_is_zero_for_equivariant_coders_and_positive_for_a_random_one(factor):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    identity = scale_equivariance_loss(lambda v: v, lambda v: v, x, factor, pyramid_weight=1.0)
    pointwise = Pointwise()
    assert float(identity) == 0.0
    assert float(scale_equivariance_loss(pointwise.encode, pointwise.decode, x, factor, 1.0)) < 1e-5
    vae = build_vae(load_recipe(TINY_AE, ["ae.block_out_channels=[8, 16, 16]", "ae.se_factors=[2]"]), 3)
    with torch.no_grad():
        random = scale_equivariance_loss(
            lambda v: vae.encode(v).latent_dist.mean, lambda v: vae.decode(v).sample, x, factor
        )
    assert float(random) > 0.05


def test_pyramid_l1_weights_every_octave():
    """A detail-only error and a flat offset of the same L1 size score differently only through
    the pyramid: the loss sees which band the error lives in."""
    x = torch.zeros(1, 1, 16, 16)
    checker = (torch.arange(16)[:, None] + torch.arange(16)).remainder(2).float()[None, None] * 2 - 1
    assert float(pyramid_l1(x + 0.1 * checker, x)) > 0
    assert float(pyramid_l1(x + 0.1, x)) > 0
    assert float((downsample(checker, 2)).abs().max()) == 0.0  # box filter removes the finest band


def test_autoencoder_recipes_validate_and_refuse_bad_sizes():
    with pytest.raises(DfmError, match="divisible by the autoencoder's factor 4"):
        load_recipe(TINY_AE, ["ae.block_out_channels=[8, 16, 16]", "data.resolution=30"])
    with pytest.raises(DfmError, match="ae.se_factors"):
        load_recipe(TINY_AE, ["ae.se_factors=[3]"])
    with pytest.raises(DfmError, match="model.kind"):
        load_recipe(TINY_AE, ["model.kind=vae"])
    for path in (ROOT / "recipes" / "ae").glob("*.toml"):
        if "recipe" not in path.read_text().split("[", 1)[0]:  # sweeps are checked in test_recipes
            assert load_recipe(path).model.kind == "autoencoder" or path.name.startswith("table5")


@pytest.mark.e2e
def test_cli_autoencoder_to_store_to_dfm_samples(tmp_path):
    """The acceptance path: train the tiny autoencoder, encode built-in data with it, train DFM
    on the store, sample (decoded by the same autoencoder); an autoencoder run is not sampled."""
    run_dfm("train", TINY_AE, "--out", tmp_path / "A", "--set", "ae.stats_num=64")
    run_dfm(
        "encode",
        "animal-mnist",
        "--ae",
        "kl",
        "--ae-weights",
        tmp_path / "A" / EXPORT,
        "--resolution",
        "32",
        "--num-clips",
        "40",
        "--batch",
        "40",
        "--out",
        tmp_path / "S",
    )
    index = json.loads((tmp_path / "S" / "index.json").read_text())
    assert index["shape"] == [4, 16, 16] and index["autoencoder"]["weights"] == str((tmp_path / "A" / EXPORT).resolve())
    run_dfm(
        "train",
        ROOT / "recipes" / "tiny.toml",
        "--set",
        "data.name=store",
        "--set",
        f"data.path={tmp_path / 'S'}",
        "--set",
        "train.steps=2",
        "--out",
        tmp_path / "R",
    )
    run_dfm("sample", tmp_path / "R", "--num", "4", "--out", tmp_path / "samples")
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4
    refused = run_dfm("sample", tmp_path / "A", "--out", tmp_path / "x.png", check=False)
    assert refused.returncode != 0 and "is an autoencoder run" in refused.stderr and "Traceback" not in refused.stderr
