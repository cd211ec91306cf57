"""Resuming a run folder: the recipe may change only where it does not change what is learned."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dfm_cli.config.method import method_class
from dfm_cli.config.recipe import Recipe, load_run_recipe
from dfm_cli.data.checkpoints import same_source
from dfm_cli.errors import DfmError


def check_resumable(run_dir: Path, recipe: Recipe, newest: Path | None = None) -> None:
    """Refuse to continue a run with a recipe that would change what it learns (`[sample]`
    only sets the final grid's sampler, and the method names the other keys that may
    change). The recipe is compared with the folder's `recipe.toml` and with the one inside
    the `newest` checkpoint, which is what its weights were trained with even if the
    folder's copy is gone. `train.steps` may grow, never fall below the step reached, and
    `train.init_from` may name again the run whose checkpoint the run was pinned to."""
    if newest is not None:
        reached = int(newest.name.rpartition("-")[2])
        if recipe.train.steps < reached:
            raise DfmError(
                f"{run_dir} has reached step {reached} ({newest.name}), but train.steps = {recipe.train.steps} "
                f"is fewer; resume with train.steps of at least {reached}, or train into a new --out folder"
            )
    new = recipe.to_dict()
    resumable = method_class(recipe.flow.method).resumable_changes
    for old_path in (run_dir / "recipe.toml", *([newest / "recipe.toml"] if newest else [])):
        if not old_path.is_file():
            continue
        old = load_run_recipe(old_path).to_dict()
        for section, body in new.items():
            for key, value in body.items():
                name = f"{section}.{key}"
                if section != "sample" and name not in resumable and old[section].get(key) != value:
                    pinned = old[section].get(key)
                    if name == "train.init_from" and pinned and value and same_source(pinned, value):
                        continue
                    raise DfmError(
                        f"{old_path.parent} was trained with {name} = {old[section].get(key)!r}, not {value!r}; "
                        "use a new --out folder, or the run's own recipe.toml to continue it"
                    )


def as_trained(run_dir: Path, recipe: Recipe, newest: Path) -> Recipe:
    """`recipe` (which `check_resumable` accepted) with `train.init_from` as the run recorded it:
    the checkpoint it was pinned to when it started, where the user names that run again."""
    for old_path in (newest / "recipe.toml", run_dir / "recipe.toml"):
        if old_path.is_file():
            pinned = load_run_recipe(old_path).train.init_from
            if pinned == recipe.train.init_from:
                return recipe
            return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, init_from=pinned))
    return recipe
