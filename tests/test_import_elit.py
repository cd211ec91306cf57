"""`dfm import elit`: the authors' released checkpoints (snap-research/elit) as run folders.

The fixtures in tests/fixtures/elit/ were written by their own code (make_fixtures.py there,
run by hand): their checkpoints of a small DFM-SiT and SiT, and what their forward passes and
samplers return. Our DFM-DiT, on the imported weights, must return the same.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_dfm
from safetensors.torch import load_file

from dfm_cli.config.recipe import load_recipe
from dfm_cli.method.sampler import guided_velocity, sample
from dfm_cli.methods.factory import load_trained
from dfm_cli.models.dit import DFMDiT, DiTSize
from dfm_cli.models.elit import convert, infer_arch
from dfm_cli.models.positions import sincos_embedding
from dfm_cli.sampling.elit_import import import_elit

FIXTURES = ROOT / "tests" / "fixtures" / "elit"
EXPECTED = load_file(FIXTURES / "expected.safetensors")


def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dfm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("elit") / "dfm"
    import_elit(FIXTURES / "dfm_tiny.pt", out)
    return out


@pytest.fixture(scope="module")
def sit_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("elit") / "sit"
    import_elit(FIXTURES / "sit_tiny.pt", out)
    return out


@pytest.fixture(scope="module")
def xl_model() -> torch.nn.Module:
    """One full-width DFM-SiT-XL block (depth 1: no registry size, so built here), its weights
    regenerated from the fixture's seed and converted as `dfm import elit` converts them."""
    spec = json.loads((FIXTURES / "xl_block.json").read_text())
    weights = _fixture_script().seeded_weights(spec["shapes"], spec["seed"])
    weights["pos_embed"] = EXPECTED["xl.pos_embed"][None]
    arch = infer_arch(weights)
    assert (arch.depth, arch.hidden, arch.patches) == (1, 1152, (1, 2))
    model = DFMDiT(DiTSize(1, 1152, 16, 2), [(2, 2), (4, 4)], 4, 1000, pos="sincos_wh", time_embed="sit")
    model.load_state_dict(convert(weights, arch).state)
    return model.eval()


def dfm_forward(model: torch.nn.Module, prefix: str) -> dict[str, float]:
    """Max abs difference to their forward pass, per stage, with labels and with the null label."""
    x0, x1, t, y = (EXPECTED[f"{prefix}.{k}"] for k in ("x0", "x1", "t", "y"))
    null = torch.full_like(y, model.num_classes)
    diffs = {}
    with torch.no_grad():
        for stage in range(2):
            ours_t = 1 - t  # their clock runs data → noise
            ours_t[:, stage + 1 :] = 0.0  # levels not started: pure noise, zeroed at the input
            xs = [x0, x1 if stage == 1 else torch.zeros_like(x1)]
            for name, labels in (("", y), (".null", null)):
                out = model(xs, ours_t, labels, torch.full((len(y),), stage))
                for s in range(2):
                    want = -EXPECTED[f"{prefix}.stage{stage}{name}.out{s}"]  # their velocity: noise − data
                    diffs[f"stage{stage}{name}.level{s}"] = float((out[s] - want).abs().max())
    return diffs


def test_position_table_is_theirs_value_for_value():
    ours = sincos_embedding((1, 2, 2), 1152, width_first=True)
    assert float((ours - EXPECTED["xl.pos_embed"]).abs().max()) < 1e-6
    assert float((sincos_embedding((1, 2, 2), 1152) - EXPECTED["xl.pos_embed"]).abs().max()) > 0.1  # our old order


@pytest.mark.parametrize("prefix", ["dfm", "xl"])
def test_forward_matches_theirs_at_every_stage_and_with_the_null_label(prefix, dfm_run, xl_model):
    diffs = dfm_forward(load_trained(dfm_run)[0] if prefix == "dfm" else xl_model, prefix)
    print(prefix, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-5, diffs


def test_sit_forward_matches_theirs(sit_run):
    model, recipe, _ = load_trained(sit_run)
    assert recipe.flow.levels == 1 and recipe.model.name == "DFM-N/2"
    x, t, y = EXPECTED["sit.x"], EXPECTED["sit.t"], EXPECTED["sit.y"]
    with torch.no_grad():
        for name, labels in (("", y), (".null", torch.full_like(y, 1000))):
            out = model([x], (1 - t)[:, None], labels, torch.zeros(3, dtype=torch.long))[0]
            diff = float((out + EXPECTED[f"sit{name}.out"]).abs().max())
            print(f"sit{name}", f"{diff:.2e}")
            assert diff <= 1e-5


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("kind", ["dfm", "sit"])
def test_sampling_matches_their_sampler(kind, cfg, dfm_run, sit_run):
    """Their settings (40 + 10 steps, threshold 0.1 for DFM; 50 steps for SiT), the same noise."""
    model, recipe, _ = load_trained(dfm_run if kind == "dfm" else sit_run)
    settings = recipe.sampler_settings(cfg=cfg)
    noise = [EXPECTED["dfm.noise0"], EXPECTED["dfm.noise1"]] if kind == "dfm" else [EXPECTED["sit.noise"]]
    result = sample(
        guided_velocity(model, settings),
        noise,
        EXPECTED["sample.y"],
        settings.schedule(),
        load_recipe_decomposition(recipe),
    )
    diff = float((result.x - EXPECTED[f"{kind}.cfg{cfg:g}.image"]).abs().max())
    print(kind, cfg, f"{diff:.2e}")
    assert diff <= 1e-4


def load_recipe_decomposition(recipe):
    from dfm_cli.config.method import method_of

    return method_of(recipe).decomposition(None).recompose


def test_imported_recipes_match_the_shipped_ones(dfm_run, sit_run):
    for run, shipped in ((dfm_run, "dfm_sit_xl2_512.toml"), (sit_run, "sit_xl2_512.toml")):
        ours = load_recipe(run / "recipe.toml")
        theirs = load_recipe(ROOT / "recipes" / "imported" / shipped)
        for section in ("flow", "sample"):
            assert getattr(ours, section) == getattr(theirs, section), section
        assert (ours.model.pos, ours.model.time_embed) == (theirs.model.pos, theirs.model.time_embed)


def _refused(*args: str) -> str:
    r = run_dfm("import", "elit", *args, check=False)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


class Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.e2e
def test_import_refuses_bad_inputs_in_one_line(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "not a PyTorch checkpoint" in _refused(str(text), "--out", str(tmp_path / "a"))
    cut = tmp_path / "cut.pt"
    cut.write_bytes((FIXTURES / "dfm_tiny.pt").read_bytes()[:200_000])
    assert "truncated" in _refused(str(cut), "--out", str(tmp_path / "b"))
    evil = tmp_path / "evil.pt"
    torch.save({"ema": {}, "args": Evil()}, evil)
    assert "getcwd" in _refused(str(evil), "--out", str(tmp_path / "c"))
    err = _refused(str(FIXTURES / "dfm_tiny.pt"), "--out", str(tmp_path / "d"), "--model", "DFM-SiT-XL/2")
    assert "pos_embed is [1, 16, 64] in the checkpoint, [1, 16, 1152] in DFM-SiT-XL/2" in err
    err = _refused(str(FIXTURES / "sit_tiny.pt"), "--out", str(tmp_path / "e"), "--model", "DFM-SiT-B/2")
    assert "pos_embed is [1, 16, 64] in the checkpoint, [1, 16, 768] in DFM-SiT-B/2" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "not empty" in _refused(str(FIXTURES / "sit_tiny.pt"), "--out", str(tmp_path / "full"))


@pytest.mark.e2e
def test_import_reports_what_it_leaves_out(tmp_path):
    r = run_dfm("import", "elit", str(FIXTURES / "dfm_tiny.pt"), "--out", str(tmp_path / "run"))
    assert "as DFM-N/2" in r.stdout
    assert "left out (training only): REPA projectors (6 tensors), the model weights, 'opt'" in r.stdout
