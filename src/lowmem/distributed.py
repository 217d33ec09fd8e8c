"""Process-group setup and model wrapping for `torchrun` runs (DDP or FSDP2); a no-op alone.

Under torchrun (WORLD_SIZE > 1) the trainer initializes NCCL on GPUs or gloo on CPUs, each rank
reads its own share of the data, and the model is wrapped in DistributedDataParallel (gradients
all-reduced, averaged) or sharded by FSDP2's `fully_shard` per block and at the root (weights,
gradients and optimizer states are DTensors sharded on dim 0; lowmem's optimizers handle them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lowmem.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but no CUDA device is available; use --device cpu")
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {requested!r}; choose auto, cpu or cuda")


def init_distributed(requested_device: str) -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size == 1:
        return DistInfo(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(dist.get_rank(), world_size, local_rank, device)


def wrap_model(model: nn.Module, info: DistInfo, mode: str) -> nn.Module:
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper; any other model as it is (FSDP2 shards in place, no wrapper).
    What checkpoints, interventions and memory snapshots see; the forward goes through the wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any (a collective: every rank must call it)."""
    return bool(all_reduce_sum(torch.tensor([1 if flag else 0], device=info.device), info).item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo, clean: bool = True) -> None:
    """Destroy the process group; after a clean run, first wait for every rank (gloo can abort a
    peer that is still busy), after an error not (a rank that failed alone would hang the rest)."""
    if info.enabled and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
