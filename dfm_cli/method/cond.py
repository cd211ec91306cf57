"""What a text-conditioned model is conditioned on: one caption's encoder output per sample.

A class-conditional model takes a `B` tensor of labels; a text-conditioned one takes a
`TextCond`, a batch of encoded captions. Both go wherever "the condition" goes (the training
batch, classifier-free guidance, the sampler), so `TextCond` supports the few tensor
operations those need: row selection, concatenation, moving to a device, and replacing
dropped rows by the null (empty-caption) condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn


@dataclass
class TextCond:
    """`tokens` `B L D` (the encoder's last hidden states), `mask` `B L` (True on real tokens)
    and `pooled` `B P` (one vector per caption: CLIP's projected end token, or a masked mean)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> TextCond:
        return TextCond(self.tokens[rows], self.mask[rows], self.pooled[rows])

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextCond:
        return TextCond(*(v.to(device, non_blocking=non_blocking) for v in (self.tokens, self.mask, self.pooled)))

    def pin_memory(self) -> TextCond:
        return TextCond(self.tokens.pin_memory(), self.mask.pin_memory(), self.pooled.pin_memory())

    def expand(self, n: int) -> TextCond:
        """A one-row condition repeated for `n` samples (the null condition for a batch)."""
        return TextCond(*(v.expand(n, *v.shape[1:]) for v in (self.tokens, self.mask, self.pooled)))


Cond = torch.Tensor | TextCond


def cat_cond(parts: Sequence[Cond]) -> Cond:
    """Concatenate conditions along the batch (the guided and unguided halves of CFG)."""
    if isinstance(parts[0], TextCond):
        return TextCond(*(torch.cat([getattr(p, k) for p in parts]) for k in ("tokens", "mask", "pooled")))
    # A batch's conditions are all of one kind: labels here.
    return torch.cat(cast("list[torch.Tensor]", list(parts)))


def where_dropped(drop: torch.Tensor, null: int | Cond, y: Cond) -> Cond:
    """`y` with the rows in `drop` replaced by `null` (label dropout for classifier-free guidance):
    the null class (an int or a tensor of labels) for labels, the empty caption's `TextCond` for text."""
    if isinstance(y, TextCond):
        assert isinstance(null, TextCond), "the null condition is of the same kind as y"

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(drop.reshape(-1, *([1] * (a.ndim - 1))), a.to(b.dtype), b)

        return TextCond(pick(null.tokens, y.tokens), pick(null.mask, y.mask), pick(null.pooled, y.pooled))
    assert not isinstance(null, TextCond), "the null condition is of the same kind as y"
    return torch.where(drop, null, y)


class NullText(nn.Module):
    """The empty caption's encoding, the null condition of classifier-free guidance.

    It is a buffer, so the checkpoint carries it: caption dropout in training and the
    unguided half of CFG at sampling see exactly the same null. Training sets it from the
    store's `null_text` before the first step."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __init__(self, max_tokens: int, token_dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.register_buffer("tokens", torch.zeros(1, max_tokens, token_dim))
        self.register_buffer("mask", torch.zeros(1, max_tokens, dtype=torch.bool))
        self.register_buffer("pooled", torch.zeros(1, pooled_dim))

    @torch.no_grad()
    def set(self, null: TextCond) -> None:
        for key in ("tokens", "mask", "pooled"):
            getattr(self, key).copy_(getattr(null, key).reshape(getattr(self, key).shape))

    def forward(self, n: int) -> TextCond:
        return TextCond(self.tokens, self.mask, self.pooled).expand(n)
