"""Everything read from or written to disk: datasets, latent stores, autoencoders, caption
encoders, checkpoints and weight files."""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """`from dfm_cli.data import build_dataset`: the datasets module was `dfm_cli.data` before
    the package was layered, and its names are still found here."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("dfm_cli.data.datasets"), name)
