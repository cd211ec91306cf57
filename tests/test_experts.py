"""Per-stage experts (`model.specialize`, paper Table 1d): the parameter count, a fresh model
equal to the shared one, stages that never read each other's experts, and training through
the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, run_dfm

from dfm_cli.models.dit import DFMDiT, model_size
from dfm_cli.models.experts import StageLinear

SIZES = [(8, 8), (16, 16)]


def build(specialize: str) -> DFMDiT:
    torch.manual_seed(0)
    return DFMDiT(model_size("DFM-N/4"), SIZES, 3, 10, specialize_weights=specialize)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def inputs(stage: list[int]):
    g = torch.Generator().manual_seed(1)
    b = len(stage)
    return (
        [torch.randn(b, 3, 8, 8, generator=g), torch.randn(b, 3, 16, 16, generator=g)],
        torch.rand(b, 2, generator=g),
        torch.arange(b) % 10,
        torch.tensor(stage),
    )


@pytest.mark.parametrize("kind", ["mlp", "all"])
def test_parameter_count_follows_the_formula(kind):
    size, stages = model_size("DFM-N/4"), len(SIZES)
    h, m = size.hidden, int(size.hidden * size.mlp_ratio)
    mlp = 2 * h * m + m + h
    per_block = mlp if kind == "mlp" else mlp + (3 * h * h + 3 * h) + (h * h + h) + (6 * h * h + 6 * h)
    assert count(build(kind)) - count(build("none")) == stages * size.depth * per_block


@torch.no_grad()
@pytest.mark.parametrize("kind", ["mlp", "all"])
def test_a_fresh_specialized_model_computes_what_the_shared_one_does(kind):
    shared, special = build("none"), build(kind)
    for p in shared.parameters():  # non-zero everywhere, the same draw for both models
        p.normal_(0, 0.2)
    own = special.state_dict()
    for key, value in shared.state_dict().items():
        target = key if key in own else f"{key.rpartition('.')[0]}.base.{key.rpartition('.')[2]}"
        own[target] = value
    special.load_state_dict(own)
    for expert in special.experts:
        expert.sync()
    for stages, tol in (([1, 1, 1, 1], 1e-6), ([0, 1, 1, 0], 1e-3)):
        # (W + W) / 2 is W exactly: one stage is one matmul, the same as the shared model's; a
        # mixed batch splits the rows by stage, which only changes the summation order
        for a, b in zip(shared(*inputs(stages)), special(*inputs(stages))):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["mlp", "all"])
def test_a_stage_never_reads_another_stages_experts(kind):
    model = build(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for expert in model.experts:
            expert.expert_weight[1].fill_(float("nan"))  # stage 2's experts: poison
            expert.expert_bias[1].fill_(float("nan"))
    alone = model(*inputs([0, 0, 0]))
    assert all(torch.isfinite(o).all() for o in alone)
    mixed = model(*inputs([0, 1, 0]))
    assert all(torch.isfinite(o[[0, 2]]).all() and torch.isnan(o[1]).all() for o in mixed)
    for expert in model.experts:
        expert.expert_weight.grad = None
    sum(o.sum() for o in alone).backward()
    for expert in model.experts:
        assert expert.expert_weight.grad[0].abs().max() > 0 or not expert.base.weight.grad.abs().max() > 0
        assert expert.expert_weight.grad[1].abs().max() == 0


@pytest.mark.e2e
def test_experts_train_apart_through_the_cli(tmp_path):
    run_dfm("train", TINY, "--set", "model.specialize=mlp", "--set", "train.steps=4", "--out", tmp_path / "R")
    from dfm_cli.methods.factory import load_trained

    model, _, _ = load_trained(tmp_path / "R", ema=False)
    expert = next(e for e in model.experts if isinstance(e, StageLinear))
    assert (expert.expert_weight[0] - expert.expert_weight[1]).abs().max() > 0  # each stage learned its own
