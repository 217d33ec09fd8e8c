"""Process groups, model wrapping and every collective lowmem issues, for `torchrun` runs; a no-op alone.

Under torchrun the trainer sets up one process group for both devices: on GPUs
`init_process_group("cpu:gloo,cuda:nccl", device_id=...)` after `torch.cuda.set_device` (NCCL binds
each rank's communicator to its GPU; gloo serves the CPU objects of object collectives), on CPUs
plain gloo. Each rank reads its own share of the data, and the model is wrapped in
DistributedDataParallel (gradients all-reduced, averaged) or sharded by FSDP2's `fully_shard` per
block and at the root (weights, gradients and optimizer states are DTensors sharded on dim 0;
lowmem's optimizers handle them; under bf16 autocast the all-gathers move bf16 and gradients are
reduced in fp32).

Every collective in lowmem goes through the functions below (`tests/test_collectives.py` refuses a
direct `torch.distributed` call elsewhere). Each puts its tensor on the collective's device, the
run's device (`DistInfo.device`), and writes the result back into the caller's tensor, so a CPU
tensor's all-reduce on a GPU run goes over NCCL instead of failing there (NCCL has no CPU
collectives). Code with no `DistInfo` at hand (optimizers, structures) passes none and gets
`current_info()`, read from the process group itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowmem.errors import ConfigError

ReduceOp = dist.ReduceOp


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # Launched by torchrun: a process group exists even for one process, so `torchrun --nproc-per-node 1`
    # runs the DDP/FSDP2 path and its collectives (NCCL on a GPU) as a larger run does.
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether this run has a process group (and so wraps its model and runs collectives)."""
        return self.world_size > 1 or self.launched


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


def launched_by_torchrun() -> bool:
    """Whether torchrun (torch.distributed.run) started this process: it sets these for every worker."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_command(nproc: int, max_restarts: int, argv: list[str]) -> list[str]:
    """The command that runs `lowmem <argv>` as `nproc` processes on this machine under torchrun's
    elastic agent, which restarts them all up to `max_restarts` times after a failure (each restart
    resumes from the run's newest checkpoint: `lowmem train` does so when TORCHELASTIC_RESTART_COUNT
    > 0). Several machines: run torchrun on each with its rendezvous flags (docs/architecture.md, Distributed)."""
    import sys

    if nproc < 1 or max_restarts < 0:
        raise ConfigError(f"--nproc must be at least 1 and --max-restarts at least 0; got {nproc} and {max_restarts}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "-m", "lowmem.cli", *argv]


def init_distributed(requested_device: str) -> DistInfo:
    """This process's place in the run: alone, or a rank of a torchrun group (created here, once)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: NCCL binds its communicator to the current device
    launched = launched_by_torchrun()
    if world_size == 1 and not launched:
        return DistInfo(device=device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, launched=launched)


def current_info() -> DistInfo:
    """The DistInfo of this process as its process group says (no group: one CPU process), for code
    handed no DistInfo; its device is the group's collective device (the current GPU under NCCL)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    nccl = "nccl" in str(dist.get_backend()).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device,
                    launched=True)


def wrap_model(model: nn.Module, info: DistInfo, mode: str, precision: str = "fp32") -> nn.Module:
    """DDP around `model`, or FSDP2 shards of it in place (`mode` "fsdp2"); alone, `model` itself.
    Under FSDP2 with `precision` "bf16-autocast", a MixedPrecisionPolicy gathers the weights in bf16
    (the dtype autocast computes in anyway: half the bytes moved) and reduces gradients in fp32."""
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "bf16-autocast":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper; any other model as it is (FSDP2 shards in place, no wrapper).
    What checkpoints, interventions and memory snapshots see; the forward goes through the wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _on_device(tensor: torch.Tensor, info: DistInfo, collective, **kwargs: Any) -> torch.Tensor:
    """Run the in-place `collective` on `tensor` moved to the collective's device (`info.device`),
    then write the result back into `tensor` (a no-op copy when it was there already)."""
    moved = tensor if tensor.device == info.device else tensor.to(info.device)
    collective(moved, **kwargs)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = ReduceOp.SUM, group: Any = None,
               info: DistInfo | None = None) -> torch.Tensor:
    """Reduce `tensor` in place over `group` (default: every rank) with `op`; return it."""
    info = info or current_info()
    if not info.enabled:
        return tensor
    return _on_device(tensor, info, dist.all_reduce, op=op, group=group)


def all_reduce_sum(value: torch.Tensor, info: DistInfo | None = None) -> torch.Tensor:
    """`value` summed over every rank, in place; returned."""
    return all_reduce(value, ReduceOp.SUM, info=info)


def any_rank(flag: bool, info: DistInfo | None = None) -> bool:
    """True on every rank if `flag` is true on any (a collective: every rank must call it)."""
    info = info or current_info()
    if not info.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([1 if flag else 0], device=info.device), info).item())


def broadcast(tensor: torch.Tensor, src: int = 0, group: Any = None, info: DistInfo | None = None) -> torch.Tensor:
    """`tensor` of global rank `src` copied into `tensor` on every rank of `group`, in place; returned."""
    info = info or current_info()
    if not info.enabled:
        return tensor
    return _on_device(tensor, info, dist.broadcast, src=src, group=group)


def broadcast_object(obj: Any, info: DistInfo | None = None, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj`, returned on every rank. torch picks the device: the CPU (gloo)
    in a cpu:gloo,cuda:nccl group, the current GPU in an NCCL-only one."""
    info = info or current_info()
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier(info: DistInfo | None = None) -> None:
    """Wait until every rank gets here."""
    info = info or current_info()
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo, clean: bool = True) -> None:
    """Destroy the process group; after a clean run, first wait for every rank (gloo can abort a
    peer that is still busy), after an error not (a rank that failed alone would hang the rest)."""
    if info.enabled and dist.is_initialized():
        if clean:
            barrier(info)
        dist.destroy_process_group()
