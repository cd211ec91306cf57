"""Every value is checked where the recipe or sweep is read, and a flag shares its key's rule:
non-finite floats anywhere in the schema, the ranges that used to fail only at run time, the
sweep's `[eval]` numbers, the sampler's `--cfg`, files with a UTF-8 BOM, and a one-line
error where diffusers is missing."""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path

import pytest
from conftest import ROOT, TINY

from dfm_cli.ablate import sweep as sweeps
from dfm_cli.ablate.sweep import EvalSpec, load_sweep
from dfm_cli.config.recipe import SECTIONS, load_recipe
from dfm_cli.errors import DfmError
from dfm_cli.method.sampler import SamplerSettings

PYRAMIDAL = ROOT / "recipes" / "tiny" / "pyramidal.toml"
CASCADED = ROOT / "recipes" / "tiny" / "cascaded.toml"


def float_keys() -> list[tuple[str, bool]]:
    """Every float key of the schema, and whether it takes a list."""
    out = []
    for section, cls in SECTIONS.items():
        for name, kind in typing.get_type_hints(cls).items():
            if kind is float or (typing.get_origin(kind) is list and typing.get_args(kind) == (float,)):
                out.append((f"{section}.{name}", kind is not float))
    return out


FLOAT_KEYS = float_keys()
# A recipe on which each key is read (list keys need their length: one value per stage, ...).
LENGTHS = {"flow.p_stage": 2, "flow.level_weights": 2, "sample.tau": 1, "sample.guidance_interval": 2}


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key, is_list", FLOAT_KEYS, ids=[k for k, _ in FLOAT_KEYS])
def test_every_float_key_refuses_nan_and_infinity(key, is_list, bad):
    length = LENGTHS.get(key, 2)
    value = f"[{', '.join([bad] + ['1.0'] * (length - 1))}]" if is_list else bad
    base = CASCADED if key.startswith(("flow.cascade", "sample.cond_noise")) else TINY
    base = PYRAMIDAL if key == "flow.gamma" else base
    with pytest.raises(DfmError, match=re.escape(f"{key} = ")):
        load_recipe(base, [f"{key}={value}"])


def test_the_float_walk_sees_the_list_keys():
    keys = dict(FLOAT_KEYS)
    for key in ("flow.cascade_aug", "flow.p_stage", "flow.level_weights", "sample.tau", "sample.guidance_interval"):
        assert keys[key] is True
    assert keys["train.betas"] is True and keys["flow.gamma"] is False


@pytest.mark.parametrize(
    "recipe, override, message",
    [
        (PYRAMIDAL, "flow.gamma=-1", r"flow.gamma = -1.0: must be in \(0, 1/\(f\^2 - 1\)\]"),
        (PYRAMIDAL, "flow.gamma=0.5", r"flow.gamma = 0.5: must be in \(0, 1/\(f\^2 - 1\)\] = \(0, 0.3333\]"),
        (TINY, "sample.cfg=-1", r"sample.cfg = -1.0: must be 0 or more"),
        (TINY, "sample.cfg=inf", r"sample.cfg = inf: must be a finite number"),
        (TINY, "data.classes=[3, 10]", r"data.classes = \[3, 10\]: \[10\] out of range: animal-mnist has 10 classes"),
        (TINY, "train.per_level_only_steps=100", r"train.per_level_only_steps = 100: .*set train.init_from"),
        (TINY, "flow.temporal_factors=[2]", r"flow.temporal_factors = \[2\]: applies to video"),
        (TINY, "model.temporal_patch=2", r"model.temporal_patch = 2: applies to video"),
        (TINY, "flow.gamma=0.2", r"flow.gamma = 0.2: is not used by flow.method = 'dfm'"),
        (TINY, "sample.cond_noise=0.1", r"sample.cond_noise = 0.1: is not used by flow.method = 'dfm'"),
        (PYRAMIDAL, "sample.tau=[0.5]", r"sample.tau = \[0.5\]: is not used by flow.method = 'pyramidal'"),
        (PYRAMIDAL, "sample.solver=heun", r"sample.solver = 'heun': is not used by flow.method = 'pyramidal'"),
        (PYRAMIDAL, "flow.t_shift=3.0", r"flow.t_shift = 3.0: is not used by flow.method = 'pyramidal'"),
        (CASCADED, "sample.shift=3.0", r"sample.shift = 3.0: is not used by flow.method = 'cascaded'"),
        (CASCADED, "flow.p_stage=[0.5, 0.5]", r"flow.p_stage = \[0.5, 0.5\]: is not used by flow.method = 'cascaded'"),
    ],
)
def test_run_time_ranges_are_recipe_checks(recipe, override, message):
    with pytest.raises(DfmError, match=message):
        load_recipe(recipe, [override])


def test_the_class_count_of_built_in_data_is_known_without_loading_it():
    from dfm_cli.data.datasets import BUILTIN

    assert {name: len(b.class_names) for name, b in BUILTIN.items()} == {
        "animal-mnist": 10,
        "photo-crops": 2,
        "photo-crops-gray": 2,
        "sprites": 4,
    }
    load_recipe(TINY, ["data.classes=[0, 9]"])  # in range
    folder = load_recipe(TINY, ["data.name=folder", "data.path=somewhere", "data.classes=[50]"])
    assert folder.data.classes == [50]  # a folder's classes are known when it is read


def test_per_level_only_steps_goes_with_init_from():
    recipe = load_recipe(TINY, ["train.per_level_only_steps=4", "train.init_from=runs/fm"])
    assert recipe.train.per_level_only_steps == 4


def test_cfg_flag_and_key_share_one_rule():
    keys = load_recipe(TINY).sample
    with pytest.raises(DfmError, match=r"--cfg -1.0: the guidance scale must be a finite number, 0 or more"):
        SamplerSettings.resolve(keys, 2, cfg=-1.0)
    with pytest.raises(DfmError, match=r"--cfg nan"):
        SamplerSettings.resolve(keys, 2, cfg=float("nan"))
    assert SamplerSettings.resolve(keys, 2, cfg=0.0).cfg == 0.0
    with pytest.raises(DfmError, match="cfg"):
        SamplerSettings(steps=(3,), cfg=-2.0)


# ----------------------------------------------------------------- sweeps


def write_sweep(tmp_path: Path, eval_table: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(f'recipe = "{TINY}"\n[grid]\n"sample.cfg" = [1.0, 2.0]\n[eval]\n{eval_table}\n')
    return path


@pytest.mark.parametrize(
    "line", ["reference_num = -5", "grid_samples = -1", "grid_samples = 0", "num = 0", "swd_levels = 0", "seed = -1"]
)
def test_sweep_eval_numbers_are_range_checked_at_load(tmp_path, line):
    key, value = (x.strip() for x in line.split("="))
    least = getattr(sweeps, "EVAL_LEAST", {}).get(key, 0 if key in ("reference_num", "seed") else 1)
    with pytest.raises(DfmError, match=rf"eval.{key} = {value}: must be at least {least}"):
        load_sweep(write_sweep(tmp_path, line))


def test_every_number_of_the_eval_table_has_a_range():
    ints = {k for k, v in typing.get_type_hints(EvalSpec).items() if v is int}
    assert set(sweeps.EVAL_LEAST) == ints


def test_a_bom_is_accepted_in_recipes_and_sweeps(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(b"\xef\xbb\xbf" + TINY.read_bytes())
    assert load_recipe(recipe).model.name == load_recipe(TINY).model.name
    sweep = write_sweep(tmp_path, "")
    sweep.write_bytes(b"\xef\xbb\xbf" + sweep.read_bytes())
    assert len(load_sweep(sweep).cells) == 2


# ----------------------------------------------------------------- diffusers missing


@pytest.fixture
def no_diffusers(monkeypatch):
    """As if diffusers were not installed: importing it (or a submodule) raises ImportError."""
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "diffusers", None)


HINT = r'needs diffusers: pip install "dfm-cli\[diffusers\]"'


def test_training_an_autoencoder_without_diffusers_is_one_line(no_diffusers, tmp_path):
    from typer.testing import CliRunner

    from dfm_cli.cli import app

    result = CliRunner().invoke(
        app, ["train", str(ROOT / "recipes" / "tiny" / "ae.toml"), "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 2, result.output
    assert 'pip install "dfm-cli[diffusers]"' in result.output
    assert "Traceback" not in result.output and "ModuleNotFoundError" not in result.output


def test_every_diffusers_path_names_the_extra(no_diffusers):
    from dfm_cli.data.autoencoders import DiffusersAE
    from dfm_cli.models.flux import DFMFlux
    from dfm_cli.training.autoencoder import build_vae

    with pytest.raises(DfmError, match=rf"model.kind = 'autoencoder' {HINT}"):
        build_vae(load_recipe(ROOT / "recipes" / "tiny" / "ae.toml"), 1)
    with pytest.raises(DfmError, match=rf"model.kind = 'flux' {HINT}"):
        DFMFlux({}, [(8, 8), (16, 16)], 4)
    with pytest.raises(DfmError, match=rf"--ae kl {HINT}"):
        DiffusersAE("kl", "weights")


def test_no_module_imports_diffusers_around_the_helper():
    """Every import of diffusers in the package goes through `errors.import_diffusers` first."""
    for path in (ROOT / "dfm_cli").rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"^\s*(import diffusers|from diffusers\S* import)", text, re.M):
            before = text[: match.start()].rsplit("\ndef ", 1)[-1]
            assert "import_diffusers(" in before, f"{path.relative_to(ROOT)}: {match.group(0).strip()}"
