"""dfm: Decomposable Flow Matching (arXiv 2506.19839) as a library and the `dfm` command.

The package is layered into folders (docs/architecture.md). Modules that lived at the top
level before keep their old import paths: `import dfm_cli.model` gives `dfm_cli.models.dit`,
`from dfm_cli.train import train` still works, and so on (`MOVED` lists them).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

__version__ = "0.1.0"

# old module (dfm_cli.<key>) -> where it lives now (dfm_cli.<value>)
MOVED = {
    "text_cond": "method.cond",
    "decompose": "method.decompose",
    "flow": "method.flow",
    "sampler": "method.sampler",
    "level_stats": "method.level_stats",
    "level_report": "method.level_report",
    "model": "models.dit",
    "positions": "models.positions",
    "experts": "models.experts",
    "flux": "models.flux",
    "init_from": "models.conversion",
    "pyramidal": "baselines.pyramidal",
    "cascaded": "baselines.cascaded",
    "latent_store": "data.store",
    "store": "data.encode",
    "sources": "data.sources",
    "autoencoders": "data.autoencoders",
    "text": "data.text_encoders",
    "captioned": "data.captions",
    "checkpoint": "data.checkpoints",
    "features": "evaluation.features",
    "metrics": "evaluation.metrics",
    "evaluate": "evaluation.evaluate",
    "gates": "evaluation.gates",
    "recipe": "config.recipe",
    "recipe_checks": "config.checks",
    "factory": "methods.factory",
    "runs": "sampling.runs",
    "sample_set": "sampling.sample_set",
    "train": "training.loop",
    "batches": "training.batches",
    "stats": "training.stats",
    "perf": "training.perf",
    "train_eval": "training.periodic_eval",
    "ae_train": "training.autoencoder",
    "ae_losses": "training.autoencoder_losses",
}  # `dfm_cli.data` (the datasets module before) is now a package that forwards its names


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module path with the module at its new path (the same object)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        old = name.removeprefix(__name__ + ".")
        return importlib.util.spec_from_loader(name, self) if old in MOVED and old != name else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.removeprefix(__name__ + '.')]}")

    def exec_module(self, module: ModuleType) -> None:
        """The module is already executed at its new path."""


sys.meta_path.append(_MovedModules())
