"""Resuming a run folder: the recipe may change only where it does not change what is learned."""

from __future__ import annotations

from pathlib import Path

from dfm_cli.config.method import method_class
from dfm_cli.config.recipe import Recipe, load_recipe
from dfm_cli.errors import DfmError


def check_resumable(run_dir: Path, recipe: Recipe, newest: Path | None = None) -> None:
    """Refuse to continue a run with a recipe that would change what it learns (`[sample]`
    only sets the final grid's sampler, and the method names the other keys that may
    change). The recipe is compared with the folder's `recipe.toml` and with the one inside
    the `newest` checkpoint, which is what its weights were trained with even if the
    folder's copy is gone."""
    new = recipe.to_dict()
    resumable = method_class(recipe.flow.method).resumable_changes
    for old_path in (run_dir / "recipe.toml", *([newest / "recipe.toml"] if newest else [])):
        if not old_path.is_file():
            continue
        old = load_recipe(old_path).to_dict()
        for section, body in new.items():
            for key, value in body.items():
                name = f"{section}.{key}"
                if section != "sample" and name not in resumable and old[section].get(key) != value:
                    raise DfmError(
                        f"{old_path.parent} was trained with {name} = {old[section].get(key)!r}, not {value!r}; "
                        "use a new --out folder, or the run's own recipe.toml to continue it"
                    )
