"""Everything read from or written to disk: datasets, latent stores, autoencoders, caption
encoders, checkpoints and weight files."""

from typing import Any


def __getattr__(name: str) -> Any:
    """`from dfm_cli.data import build_dataset`: the datasets module was `dfm_cli.data` before
    the package was layered, and its names are still found here."""
    from dfm_cli.data import datasets

    return getattr(datasets, name)
