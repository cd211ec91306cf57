"""DFM-FLUX (`dfm_cli.models.flux`): a one-level model is the diffusers FLUX transformer itself, a
conversion to more levels keeps the pretrained velocity at step 0, and the model trains and
samples with the repo's own objective and sampler. Tiny random configs, CPU, seconds."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_dfm, tiny_flux
from diffusers import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dfm_cli.errors import DfmError
from dfm_cli.method.cond import TextCond
from dfm_cli.method.decompose import LaplacianPyramid
from dfm_cli.method.flow import FlowObjective
from dfm_cli.method.sampler import SamplerSettings, generate
from dfm_cli.models.conversion import convert_single_level
from dfm_cli.models.flux import DFMFlux, flux_single_level_state, load_flux_transformer

C, TEXT = 4, (6, 32, 16)  # latent channels; (max tokens, token width, pooled width)


def config(guidance: bool = False, layers: int = 1) -> dict:
    return tiny_flux(32, guidance, layers)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random and non-zero, as in a trained model, so that no zero init hides a bug."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def captions(b: int) -> TextCond:
    return TextCond(torch.randn(b, TEXT[0], TEXT[1]), torch.ones(b, TEXT[0], dtype=torch.bool), torch.randn(b, TEXT[2]))


@pytest.mark.parametrize("guidance", [False, True])
def test_one_level_model_is_the_flux_transformer_in_our_time_and_sign(guidance):
    flux = randomized(FluxTransformer2DModel(**config(guidance), in_channels=C * 4, patch_size=1))
    model = DFMFlux(config(guidance), [(16, 16)], C, patch=2, text_dims=TEXT, guidance=3.5).eval()
    convert_single_level(model, flux_single_level_state(flux.state_dict()))
    b = 3
    x, t, y = torch.randn(b, C, 16, 16), torch.rand(b, 1), captions(b)
    with torch.no_grad():  # FLUX as its pipeline calls it: packed 2x2 patches, sigma = 1 - t, predicts noise - data
        ref = flux(
            hidden_states=FluxPipeline._pack_latents(x, b, C, 16, 16),
            encoder_hidden_states=y.tokens,
            pooled_projections=y.pooled,
            timestep=1 - t[:, 0],
            img_ids=FluxPipeline._prepare_latent_image_ids(b, 8, 8, "cpu", torch.float32),
            txt_ids=torch.zeros(TEXT[0], 3),
            guidance=torch.full((b,), 3.5) if guidance else None,
        ).sample
        out = model([x], t, y, torch.zeros(b, dtype=torch.long))[0]
    expected = -FluxPipeline._unpack_latents(ref, 16, 16, 1)
    assert out.shape == x.shape and expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# (level sizes, where the pretrained layers go, the pretrained model's size and patch)
PLACEMENTS = {
    "finest": ([(8, 8), (16, 16)], None, (16, 16), 2),
    "coarse": ([(8, 8), (16, 16)], 0, (8, 8), 1),
    "coarse-upsampled": ([(16, 16), (16, 16)], 0, (16, 16), 2),  # flow.upsample_coarse: the paper's FLUX finetune
}


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_converted_model_keeps_the_pretrained_velocity_at_step_0(placement, guidance):
    sizes, level, fm_size, fm_patch = PLACEMENTS[placement]
    fm = randomized(DFMFlux(config(guidance), [fm_size], C, patch=fm_patch, text_dims=TEXT))
    dfm = DFMFlux(config(guidance), sizes, C, patch=2, text_dims=TEXT).eval()
    convert_single_level(dfm, fm.state_dict(), level)
    kept = dfm.levels - 1 if level is None else level
    b = 3
    x, t, y = torch.randn(b, C, *fm_size), torch.rand(b, 1), captions(b)
    with torch.no_grad():
        expected = fm([x], t, y, torch.zeros(b, dtype=torch.long))[0]
        for stage in range(dfm.levels):
            inputs = [x if s == kept else torch.randn(b, C, *size) for s, size in enumerate(sizes)]
            times = torch.rand(b, dfm.levels)
            times[:, kept] = t[:, 0]
            out = dfm(inputs, times, y, torch.full((b,), stage, dtype=torch.long))
            torch.testing.assert_close(out[kept], expected, rtol=0, atol=1e-6)
            assert all(float(o.abs().max()) == 0 for s, o in enumerate(out) if s != kept)  # new heads start at 0
    assert expected.abs().max() > 0.1


def test_trains_with_the_flow_objective_and_samples_progressively():
    pyramid = LaplacianPyramid(2, [2])
    sizes = pyramid.level_sizes((16, 16))
    model = DFMFlux(config(guidance=True), sizes, C, patch=2, text_dims=TEXT)
    objective = FlowObjective(p_stage=(0.5, 0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = 4
    for step in range(2):
        x1 = pyramid.decompose(torch.randn(b, C, 16, 16))
        draws = objective.draw([v.shape[1:] for v in x1], range(step * b, (step + 1) * b), step, label_dropout=0.5)
        loss = objective.loss(model, x1, captions(b), draws, null=model.null_condition(b))["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for name in (
        "patch_embeds.1.weight",
        "t_embedders.0.mlp.2.weight",
        "level_heads.0.weight",
        "stage_embedder.weight",
        "transformer_blocks.0.attn.to_q.weight",
        "single_transformer_blocks.0.proj_out.weight",
        "guidance_embedder.linear_1.weight",
        "context_embedder.weight",
    ):
        assert not torch.equal(before[name], after[name]), name

    settings = SamplerSettings(steps=(2, 2), tau=(0.5,), cfg=2.0)  # CFG against the model's null caption
    result = generate(model.eval(), captions(2), pyramid, settings, seed=0, previews=True)
    assert result.x.shape == (2, C, 16, 16) and torch.isfinite(result.x).all()
    assert result.nfe == result.guided_nfe == 4 and len(result.previews) == 2


def test_text_dims_must_fit_the_config():
    with pytest.raises(DfmError, match="joint_attention_dim = 32"):
        DFMFlux(config(), [(16, 16)], C, text_dims=(6, 64, 16))
    with pytest.raises(DfmError, match="pooled_projection_dim = 16"):
        DFMFlux(config(), [(16, 16)], C, text_dims=(6, 32, 8))
    with pytest.raises(DfmError, match="not a FluxTransformer2DModel config.*num_layer"):
        DFMFlux({**config(), "num_layer": 2}, [(16, 16)], C, text_dims=TEXT)
    with pytest.raises(DfmError, match="in_channels = 64"):  # FLUX's 16-channel packing, 4-channel data
        DFMFlux({**config(), "in_channels": 64}, [(16, 16)], C, text_dims=TEXT)


def test_load_flux_transformer_reads_a_diffusers_folder_and_names_a_missing_one(tmp_path):
    missing = tmp_path / "FLUX.1-dev" / "transformer"
    with pytest.raises(DfmError, match=f"{missing}.*huggingface-cli download black-forest-labs/FLUX.1-dev"):
        load_flux_transformer(missing)
    flux = randomized(FluxTransformer2DModel(**config(), in_channels=C * 4))
    flux.save_pretrained(tmp_path / "flux")
    weights = load_flux_transformer(tmp_path / "flux")
    assert weights.keys() == flux.state_dict().keys()
    model = DFMFlux(json.loads((tmp_path / "flux" / "config.json").read_text()), [(16, 16)], C, text_dims=TEXT)
    convert_single_level(model, flux_single_level_state(weights))  # config.json as it is builds the model
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(DfmError, match="AutoencoderKL, not a FluxTransformer2DModel"):
        load_flux_transformer(tmp_path / "vae")


@pytest.mark.parametrize("sizes", [[(16, 16)], [(8, 8), (16, 16)]])
def test_flops_per_sample_counts_what_the_forward_multiplies(sizes):
    model = DFMFlux(config(guidance=True), sizes, C, patch=2, text_dims=TEXT).eval()
    levels, y = [torch.randn(1, C, *s) for s in sizes], captions(1)
    t, stage = torch.rand(1, len(sizes)), torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(levels, t, y, stage)  # the math attention is plain matmuls, which the counter sees
    assert model.flops_per_sample() == counter.get_total_flops() > 0
    deeper = DFMFlux(config(guidance=True, layers=2), sizes, C, patch=2, text_dims=TEXT)
    n, d = 8 * 8 + TEXT[0], 16  # tokens, width: one more double-stream block adds its hand count
    block = 2 * (2 * d * 6 * d) + 4 * n * n * d + 2 * n * (4 * d * d + 2 * d * 4 * d)
    assert deeper.flops_per_sample() - model.flops_per_sample() == block


@pytest.mark.e2e
def test_tiny_flux_recipe_trains_2_steps_and_samples_from_a_prompt(tiny_text, tmp_path):
    """`recipes/tiny/flux.toml` through the CLI: a captioned folder, CLIP captions encoded once
    into the run, a random FLUX-style DFM trained 2 steps, then a grid from a prompt."""
    run_dfm("train", ROOT / "recipes" / "tiny" / "flux.toml", "--out", tmp_path / "R", cwd=tiny_text)
    assert (tmp_path / "R" / "captions.safetensors").is_file() and (tmp_path / "R" / "samples" / "grid.png").is_file()
    run_dfm(
        "sample", tmp_path / "R", "--prompt", "a red square", "--n", "2", "--out", tmp_path / "g.png", cwd=tiny_text
    )
    assert (tmp_path / "g.png").is_file()


@pytest.mark.e2e
def test_flux_init_from_a_diffusers_folder_starts_at_the_pretrained_velocity(tiny_text):
    """`train.init_from` = a FLUX transformer folder (the paper's placement): at step 0 the DFM
    model's coarse level predicts what the pretrained FLUX predicts on the upsampled input."""
    from dfm_cli.config.recipe import load_recipe
    from dfm_cli.data.store import LatentStore
    from dfm_cli.methods.factory import build_model, load_single_level

    root = tiny_text / "tiny-text"
    recipe = load_recipe(
        ROOT / "recipes" / "tiny" / "flux_finetune.toml",
        [f"flux.config={root / 'flux'}", f"data.path={root / 'store'}"],
    )
    store = LatentStore(root / "store")
    model = build_model(recipe, store.shape, 0, text=store.text)
    convert_single_level(model, load_single_level(root / "flux", None, "flux"), 0)
    flux = FluxTransformer2DModel.from_pretrained(root / "flux").eval()
    x, y = store.__getitems__([0, 1, 2])
    t, b = torch.rand(3, 2), 3
    with torch.no_grad():
        out = model.eval()([x, torch.zeros_like(x)], t, y, torch.zeros(b, dtype=torch.long))
        ref = flux(
            hidden_states=FluxPipeline._pack_latents(x, b, 3, 16, 16),
            encoder_hidden_states=y.tokens,
            pooled_projections=y.pooled,
            timestep=1 - t[:, 0],
            img_ids=FluxPipeline._prepare_latent_image_ids(b, 8, 8, "cpu", torch.float32),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.full((b,), 1.0),
        ).sample
    torch.testing.assert_close(out[0], -FluxPipeline._unpack_latents(ref, 16, 16, 1), rtol=0, atol=1e-5)
    assert out[1].abs().max() == 0
