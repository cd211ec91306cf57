"""Messages that name what the user actually gave: the flag, the path, the package."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from conftest import TINY
from typer.testing import CliRunner

from dfm_cli.cli import app
from dfm_cli.errors import DfmError
from dfm_cli.method.sampler import SamplerSettings


def test_too_many_steps_name_steps_not_an_ungiven_stages_flag():
    keys = type("Keys", (), {"steps": [3, 2], "tau": [0.9], "cfg": 1.0, "guidance_interval": [0, 1], "solver": "euler"})
    with pytest.raises(DfmError) as refused:
        SamplerSettings.resolve(keys, 2, steps=[10, 10, 10])
    assert str(refused.value) == "--steps 10,10,10: the model has 2 levels; give 1..2 step counts"


def test_an_init_from_path_with_spaces_and_backslashes_reaches_the_recipe_as_it_is(tmp_path):
    odd = tmp_path / "sp ace" / "back\\slash fm"
    result = CliRunner().invoke(app, ["train", str(TINY), "--init-from", str(odd), "--dry-run"])
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads(result.output[result.output.index("[model]") :])
    assert resolved["train"]["init_from"] == str(odd)


def test_the_t5_hint_names_the_package_users_install(monkeypatch):
    from dfm_cli.data.text_encoders import _load_t5

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(DfmError, match=r'pip install "dfm-cli\[t5\]"'):
        _load_t5(Path("t5"))
