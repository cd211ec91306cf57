"""torch.distributed plumbing: one process per device under torchrun, or a single process.

`dfm train` reads torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`), so
`torchrun --nproc-per-node N -m dfm_cli train RECIPE` and multi-node launches work through
torchrun's usual flags. NCCL on CUDA, gloo on the CPU. Models are wrapped in DDP by default
or sharded with FSDP2 (`fully_shard`); checkpoints always hold full, unsharded tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn

from dfm_cli.errors import DfmError

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init() -> Context:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Context(rank, world, local_rank, device)


def shutdown(ctx: Context) -> None:
    """Leave the process group together: a rank that tears down while its peer is still
    finishing (rank 0 writing the grid) can make gloo abort the peer at exit."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_sum(ctx: Context, values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (statistics, non-finite flags)."""
    if ctx.distributed:
        values = values.to(ctx.device)
        dist.all_reduce(values)
    return values


def gather_objects(ctx: Context, obj: object) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def _fully_shard(model: nn.Module) -> nn.Module:
    """FSDP2 with one unit per transformer block, plus the root for the rest."""
    from torch.distributed.fsdp import fully_shard

    for block in cast(Iterable[nn.Module], model.blocks):
        fully_shard(block)
    # `fully_shard` swaps the module's class for a subclass of both its own and `FSDPModule`;
    # its stub returns only the latter.
    return cast(nn.Module, fully_shard(model))


def shard_like(ema: nn.Module, ctx: Context, parallel: str) -> nn.Module:
    """Shard the EMA copy the way `wrap` shards the model (FSDP2), so updates stay local."""
    return _fully_shard(ema) if ctx.distributed and parallel == "fsdp" else ema


def wrap(model: nn.Module, ctx: Context, parallel: str) -> nn.Module:
    """DDP (default) or FSDP2 for the training model; a no-op for a single process."""
    if parallel not in ("ddp", "fsdp"):
        raise DfmError(f"train.parallel = {parallel!r}: choose 'ddp' or 'fsdp'")
    if not ctx.distributed:
        return model
    if parallel == "fsdp":
        return _fully_shard(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # a stage missing from a rank's batch leaves its experts (model.specialize), or a cascade's idle
    # model, without gradient
    unused = bool(getattr(model, "experts", None)) or getattr(model, "unused_parameters", False)
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place and needs none)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        cast("FSDPModule", model).set_requires_gradient_sync(not skip)
    yield


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Full (unsharded) CPU state dicts of a plain, DDP or FSDP2 model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    module = unwrap(model)
    weights = get_model_state_dict(module, options=opts)
    if optimizer is None:
        return weights, None
    return weights, get_optimizer_state_dict(module, optimizer, options=opts)


def load_full_state(model: nn.Module, weights: dict, optimizer=None, optim_state=None) -> None:
    """Load full state dicts into a plain, DDP or FSDP2 model (each rank takes its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    module = unwrap(model)
    set_model_state_dict(module, weights, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, optim_state, options=opts)
