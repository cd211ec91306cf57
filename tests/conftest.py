"""Shared helpers: run the real `dfm` command in a subprocess, and a tiny recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.toml"


def run_dfm(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m dfm_cli ARGS` as a user would run it; returns the finished process."""
    proc = subprocess.run([sys.executable, "-m", "dfm_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"dfm {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
