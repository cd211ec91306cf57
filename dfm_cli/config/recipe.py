"""Recipes: TOML files read into typed dataclasses, validated before anything runs.

A recipe is data. Every key has a type and a default here; an unknown key, a wrong type or
an inconsistent combination (levels that don't divide the resolution, a `p_stage` of the
wrong length) is a `DfmError` that names the file, the key and the value, and for unknown
keys suggests the nearest valid one. `--set section.key=value` overrides go through the
same checks. The resolved recipe is written next to every run so it can be re-read exactly.
"""

from __future__ import annotations

import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

from dfm_cli.config.checks import validate
from dfm_cli.config.method import method_class
from dfm_cli.config.schema import (  # noqa: F401  (the recipe's types, imported from here too)
    SECTIONS,
    AESection,
    DataSection,
    FlowSection,
    FluxSection,
    ModelSection,
    Recipe,
    SampleSection,
    TextSection,
    TrainSection,
)
from dfm_cli.errors import DfmError, reading, suggest

# --------------------------------------------------------------------------- parsing


def _check_type(where: str, value: Any, kind: Any) -> Any:
    """Return `value` converted to `kind`, or raise naming `where` and the expected type."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        values = value if isinstance(value, list) else [value]
        return [_check_type(where, v, item) for v in values]
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
    )
    if not ok:
        raise DfmError(f"{where} = {value!r} has the wrong type: expected {kind.__name__}")
    return float(value) if kind is float else value


def _line_of(text: str, section: str, key: str) -> str:
    current = ""
    for n, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[([^\]]+)\]", line)
        if header:
            current = header.group(1).strip()
        elif current == section and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return f" (line {n})"
    return ""


def _parse_value(text: str) -> Any:
    """A `--set` value in TOML syntax; bare words are strings (`--set data.name=folder`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_recipe(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe; `path=None` starts from the defaults."""
    source = str(path) if path else "<defaults>"
    text = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DfmError(f"recipe {source} not found; pass a TOML file such as recipes/quickstart.toml")
        with reading(p, "recipe (TOML, UTF-8)"):
            text = p.read_text(encoding="utf-8-sig")  # a BOM (some Windows editors write one) is dropped
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise DfmError(f"{source}: not valid TOML: {e}") from None
    else:
        raw = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2:
            raise DfmError(f"--set {item!r}: expected section.key=value, e.g. train.steps=100")
        raw.setdefault(parts[0], {})
        if isinstance(raw[parts[0]], dict):
            raw[parts[0]][parts[1]] = _parse_value(value.strip())
    sections = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise DfmError(
                f"{source}: unknown section [{name}]{suggest(name, SECTIONS)} (sections: {', '.join(SECTIONS)})"
            )
        if not isinstance(body, dict):
            raise DfmError(f"{source}: {name} must be a [{name}] table, got {body!r}")
        hints = typing.get_type_hints(SECTIONS[name])
        values = {}
        for key, value in body.items():
            where = f"{source}{_line_of(text, name, key)}: {name}.{key}"
            if key not in hints:
                raise DfmError(f"{where} is not a known key{suggest(key, hints)}")
            values[key] = _check_type(where, value, hints[key])
        sections[name] = SECTIONS[name](**values)
    recipe = Recipe(**sections)
    validate(recipe, source)
    return recipe


def load_run_recipe(path: str | Path) -> Recipe:
    """A run's or checkpoint's saved `recipe.toml`, as the run was trained: a key of its
    method's `earlier_defaults` that the file predates reads its earlier value (Pyramidal Flow
    drew each stage's time logit-normal before `flow.pyramid_time`)."""
    recipe = load_recipe(path)
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))
    earlier = [
        f"{key}={json.dumps(value)}"
        for key, value in method_class(recipe.flow.method).earlier_defaults.items()
        if key.split(".")[1] not in raw.get(key.split(".")[0], {})
    ]
    return load_recipe(path, earlier) if earlier else recipe


# --------------------------------------------------------------------------- validation
