"""Local weight files: read as tensors only, never as pickled code, with a message that says
how to get a missing file (nothing is downloaded at run time)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dfm_cli.errors import DfmError


def load_weights(path: Path, what: str, how: str) -> dict[str, torch.Tensor]:
    """A plain state dict from `.safetensors` or a tensors-only `.pt/.pth` (never pickled code)."""
    if not path.is_file():
        raise DfmError(f"{what} weights not found at {path}; {how}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors all mean "not a weights file"
        raise DfmError(f"{path}: not a readable {what} weights file ({str(e).splitlines()[0][:120]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DfmError(f"{path}: expected a state dict of tensors for {what}")
    return state


def load_open_clip(model: str, weights: Path, flag: str) -> tuple[torch.nn.Module, Callable]:
    """An open_clip model (an architecture name, or a config JSON for custom sizes) with local
    weights, frozen in eval mode, and its tokenizer (whose vocabulary ships with open_clip)."""
    import open_clip

    if model.endswith(".json"):
        open_clip.add_model_config(model)
        model = Path(model).stem
    if model not in open_clip.list_models():
        raise DfmError(f"{flag} {model!r} is not an open_clip architecture (e.g. ViT-L-14) or config JSON")
    net = open_clip.create_model(model, pretrained=None)
    net.load_state_dict(load_weights(weights, "CLIP", f"pass the open_clip checkpoint for {flag} {model}"))
    return net.eval().requires_grad_(False), open_clip.get_tokenizer(model)
