"""The public Python entry point: a run folder as one object a notebook can sample.

`load_run` takes any run folder or checkpoint, one `dfm train` wrote or one `dfm import elit`
wrote, and returns what `dfm sample` itself works with (`TrainedRun`): the model in eval mode,
its `recipe`, its `decomposition`, its sampling `settings` and `generate`/`decode`. So a
notebook samples exactly as the command does. docs/api.md shows it. It sits with the CLI at
the top of the layers (tests/test_imports.py), so `import dfm_cli` does not load it.
"""

from __future__ import annotations

from pathlib import Path

from dfm_cli.sampling.runs import TrainedRun, load_for_sampling

__all__ = ["TrainedRun", "load_run"]


def load_run(path: str | Path, ema: bool = True, verify: bool = True) -> TrainedRun:
    """The run at `path` (a run folder, its newest complete checkpoint, or one checkpoint),
    ready to sample: its EMA weights (`ema=False`: the raw ones), checked against the SHA-256
    recorded with them unless `verify=False`; one-line `DfmError`s as the commands give."""
    return load_for_sampling(Path(path).expanduser(), ema=ema, verify=verify)
