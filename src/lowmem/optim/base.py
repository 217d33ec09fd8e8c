"""Small helpers shared by lowmem's optimizers: hyperparameter checks, tensor grouping, the DTensor
check, and `LowmemOptimizer`, the base class that owns the step/closure boilerplate."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


def check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or value != value or value < 0:
        raise ValueError(f"invalid {name}: {value!r}; it must be a number >= 0")


def check_beta(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"invalid {name}: {value!r}; it must be in [0, 1)")


def check_betas(name: str, betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"invalid {name}: {betas!r}; it must be a pair (beta1, beta2), each in [0, 1)")
    check_beta(f"{name}[0]", betas[0])
    check_beta(f"{name}[1]", betas[1])


def check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"invalid {name}: {value!r}; it must be an integer >= 1")


def check_grad(param: torch.Tensor) -> None:
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError(
            "lowmem optimizers do not support sparse gradients; build the embedding with sparse=False"
        )
    if torch.is_complex(grad):
        raise RuntimeError(
            "lowmem optimizers do not support complex parameters; view them as real with torch.view_as_real"
        )


def group_by_device_dtype(*tensor_lists: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], ...]]:
    """Split parallel tensor lists by (device, dtype) of the first list, for torch._foreach_* calls.

    Scalar step tensors (the last list, by lowmem's convention) live on the CPU and are not keyed.
    """
    buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[] for _ in tensor_lists])
    for items in zip(*tensor_lists):
        key = (items[0].device, items[0].dtype)
        for bucket, item in zip(buckets[key], items):
            bucket.append(item)
    return [tuple(lists) for lists in buckets.values()]


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is an FSDP2/DTensor shard (checked by name: importing DTensor is not free)."""
    return type(t).__name__ == "DTensor"


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: in-place updates reach the DTensor), else `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def sharded_groups(param: torch.Tensor) -> tuple:
    """Process groups over which `param`'s entries are split (its Shard mesh dims); () if whole."""
    if not is_dtensor(param):
        return ()
    mesh = param.device_mesh
    return tuple(mesh.get_group(i) for i, placement in enumerate(param.placements) if placement.is_shard())


def all_reduce_partials(partials: list[torch.Tensor], groups: list[tuple], op=dist.ReduceOp.SUM) -> None:
    """Complete per-tensor partial reductions in place: one flat all-reduce per distinct sharding."""
    by_groups: dict[tuple, list[torch.Tensor]] = {}
    for partial, pgs in zip(partials, groups):
        if pgs:
            by_groups.setdefault(pgs, []).append(partial)
    for pgs, tensors in by_groups.items():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        for pg in pgs:
            dist.all_reduce(flat, op=op, group=pg)
        torch._foreach_copy_([t.view(-1) for t in tensors], list(flat.split([t.numel() for t in tensors])))


class LowmemOptimizer(torch.optim.Optimizer):
    """A torch Optimizer whose `step(closure)` evaluates the closure with grad enabled, then runs the
    subclass's `_step()` under no_grad and returns the closure's loss (None without one)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss

    def _step(self) -> None:
        raise NotImplementedError
