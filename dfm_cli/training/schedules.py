"""What changes along a run at every step: the learning rate's warm-up and the EMA's decay,
shared by the generator's and the autoencoder's training loops."""

from __future__ import annotations

import torch


def lr_at(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate at `step` (0-based), linear warm-up over `warmup_steps`.

    >>> lr_at(1e-3, 4, 0), lr_at(1e-3, 4, 3), lr_at(1e-3, 0, 0)
    (0.00025, 0.001, 0.001)
    """
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def ema_decay_at(decay: float, since: int) -> float:
    """EMA decay `since` steps after its warm-up began, so that short runs are not dominated
    by the random initialization.

    >>> ema_decay_at(0.9999, 0), ema_decay_at(0.5, 100)
    (0.1, 0.5)
    """
    return min(decay, (1 + since) / (10 + since))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, frozen: tuple[str, ...] = ()) -> None:
    """Move `ema` towards `model` (the same parameters in the same order; `model` may be wrapped
    for DDP), except the parameters whose names in `ema` start with one of `frozen`.

    >>> ema, model = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    >>> _ = [torch.nn.init.zeros_(p) for p in ema.parameters()]
    >>> _ = [torch.nn.init.ones_(p) for p in model.parameters()]
    >>> update_ema(ema, model, 0.75, frozen=("bias",))
    >>> ema.weight.item(), ema.bias.item()
    (0.25, 0.0)
    """
    for (name, e), p in zip(ema.named_parameters(), model.parameters()):
        if not name.startswith(frozen):
            e.lerp_(p.detach(), 1 - decay)
