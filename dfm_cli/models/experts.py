"""Per-stage experts (paper Table 1d, `model.specialize`): each stage gets its own copy of the
chosen weights, averaged with the shared ones while that stage is generated.

The paper's best variant specializes every transformer weight ("all"; FID 26.63 against 28.37
for none), and the MLPs alone ("mlp") recover part of that. Averaging keeps the shared weights
in every stage's computation, so all stages still train them; the experts start as copies of
the shared weights, so a fresh (or converted) model computes exactly what the shared one does.

`StageLinear` wraps a block's `nn.Linear`. The model tells every wrapper the batch's stages
before its blocks run (it sets their `stage`); each sample's rows go through its own stage's weight
`(W + W_k) / 2`, and a stage absent from the batch is never read.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

SPECIALIZE = ("none", "mlp", "all")


class StageLinear(nn.Module):
    """`base` with one expert copy of its weight and bias per stage."""

    def __init__(self, base: nn.Linear, stages: int) -> None:
        super().__init__()
        self.base = base
        self.expert_weight = nn.Parameter(base.weight.detach().clone().repeat(stages, 1, 1))
        self.expert_bias = nn.Parameter(base.bias.detach().clone().repeat(stages, 1))
        self.stage: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.base.weight + self.expert_weight[k]) / 2, (self.base.bias + self.expert_bias[k]) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stage = self.stage
        if stage is None:
            raise RuntimeError("StageLinear needs the batch's stages (its `stage`) before it runs")
        present = stage.unique().tolist()
        if len(present) == 1:  # sampling, or a per-batch stage: one matmul
            return F.linear(x, *self.weights(present[0]))
        out = x.new_empty(*x.shape[:-1], self.base.out_features)
        for k in present:
            rows = stage == k
            out[rows] = F.linear(x[rows], *self.weights(k))
        return out

    @torch.no_grad()
    def sync(self) -> None:
        """Experts equal to the shared weights again (after loading pretrained shared weights)."""
        self.expert_weight.copy_(self.base.weight.expand_as(self.expert_weight))
        self.expert_bias.copy_(self.base.bias.expand_as(self.expert_bias))


def specialize(blocks: nn.ModuleList, kind: str, stages: int) -> list[StageLinear]:
    """Wrap the chosen linear layers of `blocks` in place: the MLPs' (`mlp`) or every one
    (`all`: attention, MLP, adaLN modulation, cross-attention). Returns the wrappers."""
    if kind not in SPECIALIZE:
        raise ValueError(f"model.specialize must be one of {SPECIALIZE}, got {kind!r}")
    wrapped: list[StageLinear] = []
    if kind == "none":
        return wrapped
    for block in blocks:
        scope = cast(nn.Module, block.mlp) if kind == "mlp" else block
        for name, module in list(scope.named_modules()):
            if isinstance(module, nn.Linear):
                parent = scope.get_submodule(name.rpartition(".")[0]) if "." in name else scope
                stage_linear = StageLinear(module, stages)
                setattr(parent, name.rpartition(".")[2], stage_linear)
                wrapped.append(stage_linear)
    return wrapped


def expert_parameters(wrapped: list[StageLinear]) -> int:
    """How many parameters the experts add: stages × (weights + biases) of every wrapped layer."""
    return sum(w.expert_weight.numel() + w.expert_bias.numel() for w in wrapped)
