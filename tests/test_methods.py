"""The `Method` interface: nothing outside the implementations branches on the method, a new
method is one module plus its registration (the worked example of docs/method.md, trained
and sampled here), and each method refuses the keys it does not use."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY
from rich.console import Console

from dfm_cli.config.method import METHODS, Method, method_class, method_of, register
from dfm_cli.config.recipe import load_recipe
from dfm_cli.errors import DfmError

PACKAGE = ROOT / "dfm_cli"
IMPLEMENTATIONS = {PACKAGE / "config" / "method.py", *(PACKAGE / "methods").glob("*.py")}


def method_branches(source: str) -> list[int]:
    """Lines that test a method by name: a comparison or membership test involving an
    attribute called `method` or a registered method's name, or a `hasattr(..., "generate")`
    probe (how the sampler used to tell the baselines apart)."""
    names = set(METHODS)
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "method" for s in sides) or any(
                isinstance(s, ast.Constant) and s.value in names for s in sides
            ):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr":
            if len(node.args) == 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "generate":
                lines.append(node.lineno)
        elif isinstance(node, ast.Match) and isinstance(node.subject, ast.Attribute) and node.subject.attr == "method":
            lines.append(node.lineno)
    return lines


def test_nothing_outside_the_method_implementations_branches_on_the_method():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path not in IMPLEMENTATIONS:
            found += [f"{path.relative_to(ROOT)}:{line}" for line in method_branches(path.read_text())]
    assert not found, "branches on the method outside dfm_cli/methods/: " + ", ".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "if recipe.flow.method == 'cascaded':\n    pass\n",
        "x = f.method in ('pyramidal', 'cascaded')\n",
        "if name != 'pyramidal':\n    pass\n",
        "if hasattr(decomposition, 'generate'):\n    pass\n",
        "match recipe.flow.method:\n    case 'dfm':\n        pass\n",
    ],
)
def test_the_branch_counter_sees_every_form_of_branch(source):
    assert method_branches(source) == [1]


def test_the_branch_counter_passes_code_that_asks_the_method():
    assert (
        method_branches("method_of(recipe).generate(model, labels, d, s, seed=0)\nkey = (recipe.flow.method,)\n") == []
    )


def test_every_registered_method_implements_the_interface():
    for name in METHODS:
        cls = method_class(name)
        assert issubclass(cls, Method) and cls.name == name and not cls.__abstractmethods__


def test_an_unknown_method_is_refused_with_the_choices():
    with pytest.raises(DfmError, match=r"flow.method = 'cascade': choose 'dfm' .* or 'cascaded'; did you mean"):
        load_recipe(TINY, ["flow.method=cascade"])


@pytest.mark.parametrize(
    "method, key",
    [
        ("pyramidal", "flow.level_weights=[1.0, 2.0]"),
        ("pyramidal", "flow.tied_timesteps=true"),
        ("pyramidal", "flow.prev_t_loc=0.5"),
        ("pyramidal", "flow.mask_input=false"),
        ("cascaded", "flow.per_batch_stage=true"),
        ("cascaded", "flow.level_weights=[1.0, 2.0]"),
    ],
)
def test_a_method_refuses_the_keys_it_does_not_use(method, key):
    """An ablation over such a key would measure nothing: the loss ignores it."""
    name = key.split("=")[0]
    with pytest.raises(DfmError, match=rf"{re.escape(name)} = .*: is not used by flow.method = '{method}'"):
        load_recipe(TINY, [f"flow.method={method}", key])


def example_module(tmp_path: Path) -> Path:
    """The worked example of docs/method.md §8.1, as the module a user would save."""
    text = (ROOT / "docs" / "method.md").read_text()
    block = text.split("<!-- method-example -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_methods.py").write_text(block)
    return tmp_path


def test_the_documented_fourth_method_is_one_module_and_one_registration(tmp_path, monkeypatch):
    from dfm_cli.training.loop import train

    monkeypatch.syspath_prepend(str(example_module(tmp_path)))
    monkeypatch.setitem(METHODS, "uniform", "")  # undone after the test
    register("uniform", "my_methods:UniformFM")
    recipe = load_recipe(TINY, ["flow.method=uniform", "train.steps=2", "sample.n=4"])

    # its draws: the active level's time is uniform (Kolmogorov-Smirnov), later levels are at 0
    method = method_of(recipe)
    draws = method.objective().draw([(1, 8, 8), (1, 16, 16)], range(4000), 0)
    active = draws.t[torch.arange(4000), draws.stage].sort().values.double()
    assert (active - torch.arange(1, 4001, dtype=torch.float64) / 4000).abs().max() < 0.03
    assert (draws.t[draws.stage == 0, 1] == 0).all()

    # the training loop, the sampler and the compute accounting take it as they are
    last = train(recipe, tmp_path / "run", console=Console(quiet=True))
    assert last["step"] == 2 and math.isfinite(last["loss"])
    assert (tmp_path / "run" / "samples" / "grid.png").is_file()
    from dfm_cli.ablate.compute import forward_flops_of

    assert forward_flops_of(recipe) == forward_flops_of(load_recipe(TINY, ["train.steps=2", "sample.n=4"]))


@pytest.mark.parametrize("method", ["pyramidal", "cascaded"])
@pytest.mark.parametrize(
    "flags, message",
    [({"tau": [0.7]}, "--tau 0.7: is not used"), ({"solver": "heun"}, "--solver heun"), ({"shift": 3.0}, "--shift 3")],
)
def test_the_baselines_refuse_the_progressive_samplers_flags(method, flags, message):
    """`dfm sample --tau/--solver` on a baseline run is refused, not silently ignored."""
    recipe = load_recipe(ROOT / "recipes" / "tiny" / f"{method}.toml")
    m = method_of(recipe)
    model = m.build_model((1, 16, 16), 10)
    settings = recipe.sampler_settings(**flags)
    with pytest.raises(DfmError, match=re.escape(message)):
        m.generate(model, torch.zeros(2, dtype=torch.long), m.decomposition(), settings, seed=0)
    assert m.generate(model, torch.zeros(2, dtype=torch.long), m.decomposition(), recipe.sampler_settings(), seed=0).nfe


@pytest.mark.parametrize("method", ["dfm", "pyramidal"])
def test_only_the_cascade_takes_a_conditioning_noise(method):
    """`dfm sample --cond-noise` sets the cascade's conditioning noise; the others refuse it."""
    recipe = load_recipe(TINY if method == "dfm" else ROOT / "recipes" / "tiny" / f"{method}.toml")
    m = method_of(recipe)
    model = m.build_model((1, 16, 16), 10)
    with pytest.raises(DfmError, match=rf"^--cond-noise 0.1: is not used by flow.method = '{method}'"):
        m.generate(
            model, torch.zeros(2, dtype=torch.long), m.decomposition(), recipe.sampler_settings(cond_noise=0.1), seed=0
        )


def test_the_cascades_conditioning_noise_flag_equals_the_recipe_key():
    cascaded = ROOT / "recipes" / "tiny" / "cascaded.toml"
    recipe, keyed = load_recipe(cascaded), load_recipe(cascaded, ["sample.cond_noise=0.3"])
    m = method_of(recipe)
    torch.manual_seed(0)
    model = m.build_model((1, 16, 16), 10)
    for p in model.parameters():  # away from the zero init, so the conditioning reaches the output
        torch.nn.init.normal_(p, std=0.05)
    labels = torch.zeros(2, dtype=torch.long)

    def images(method, settings):
        return method.generate(model, labels, method.decomposition(), settings, seed=0).x

    flagged = images(m, recipe.sampler_settings(cond_noise=0.3))
    assert torch.equal(flagged, images(method_of(keyed), keyed.sampler_settings()))
    assert not torch.equal(flagged, images(m, recipe.sampler_settings()))
    with pytest.raises(DfmError, match=r"^--cond-noise 1.0: the conditioning's noise level must lie in \[0, 1\)"):
        recipe.sampler_settings(cond_noise=1.0)
