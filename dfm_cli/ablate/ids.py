"""Run and cell ids: what a trained run and a cell's sample set depend on, as a digest that
names their folders, so that a sweep reuses every run whose settings it already trained and
keeps the ids of published sweeps when later versions add recipe keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dfm_cli.config.method import method_class
from dfm_cli.config.recipe import Recipe


def settings_hash(settings: Any) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


# Keys added after sweeps were first run: left out of a run's id at the value runs had before
# them (the default, or the method's `earlier_defaults` where the default changed what it
# trains) and where the method does not use them, so that adding them left the ids of earlier
# runs unchanged. A pyramidal run at the new default `flow.pyramid_time` (uniform, where it was
# logit-normal) trains something else, and gets a new id.
LATER_KEYS = (
    ("model", "kind"),
    ("data", "classes"),
    ("data", "captions"),
    ("flow", "upsample_coarse"),
    ("flow", "method"),
    ("flow", "gamma"),
    ("flow", "cascade_split"),
    ("flow", "cascade_aug"),
    ("train", "init_from"),
    ("train", "per_level_only_steps"),
    ("flow", "pyramid_time"),
    ("flow", "t_shift"),
    ("flow", "cascade_condition"),
    ("flow", "cascade_upsample"),
    ("sample", "shift"),
    ("model", "time_embed"),
)
# Keys that never change what a run learns or samples, only where its statistics also go:
# never part of a run's id, so that adding a mirror to a sweep reuses its finished runs.
NOT_IN_ID = (("train", "log_to"),)


def run_settings(recipe: Recipe) -> dict:
    """What a trained run depends on: every recipe section but `sample`, and `ae`, `flux`,
    `text` and the `LATER_KEYS` only where they are used, so that adding them left the ids of
    earlier runs unchanged; never the `NOT_IN_ID` keys."""
    skip = (
        {"sample"}
        | ({"ae"} if recipe.model.kind != "autoencoder" else set())
        | ({"flux"} if recipe.model.kind != "flux" else set())
        | ({"text"} if not recipe.data.captions else set())
    )
    settings = {k: v for k, v in recipe.to_dict().items() if k not in skip}
    defaults = Recipe().to_dict()
    method = method_class(recipe.flow.method)
    for section, key in NOT_IN_ID:
        del settings[section][key]
    for section, key in LATER_KEYS:
        if section not in settings:
            continue
        name = f"{section}.{key}"
        earlier = method.earlier_defaults.get(name, defaults[section][key])
        if settings[section][key] == earlier or name in method.unused_keys:
            del settings[section][key]
    return settings


def cell_manifest_settings(recipe: Recipe, num: int, seed: int) -> dict:
    """What a cell's sample set of `num` samples from noise seed `seed` depends on (its scoring
    is tracked separately)."""
    sample, defaults = recipe.to_dict()["sample"], Recipe().to_dict()["sample"]
    for section, key in LATER_KEYS:  # sampler keys added later, left out at their defaults
        if section == "sample" and sample[key] == defaults[key]:
            del sample[key]
    return {"run": run_settings(recipe), "sample": sample, "num": num, "seed": seed}
