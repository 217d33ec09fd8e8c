"""What a training run measures about its memory: bytes of weights, gradients and optimizer state,
and the process's peak, each named for what it is.

    snapshot(model, optimizer)
    -> {"parameter_bytes": ..., "gradient_bytes": ..., "optimizer_state_bytes": ...,
        "peak_bytes": ..., "peak_measure": "cuda_max_allocated" | "cpu_peak_rss"}

Byte counts are numel * element_size of the tensors themselves (no allocator rounding, no padding).
Under FSDP2 a parameter, gradient or state tensor is a DTensor: its *local shard* is counted, so
every figure is per rank, which is what that rank's memory holds.

The peak is a different quantity from the sums above: on CUDA it is
`torch.cuda.max_memory_allocated()` (every tensor the caching allocator handed out, activations and
temporaries included, since the last `reset_peak_memory()`); on CPU it is the process's peak
resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`): the Python interpreter, torch's libraries
and every buffer included, and it cannot be reset, so comparing two methods on CPU takes one
process per method.
"""

from __future__ import annotations

import resource
import sys
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem.optim.base import is_dtensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # A DTensor's numel() is the global size; the rank holds only its shard.
    return tensor.to_local() if is_dtensor(tensor) else tensor


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the given tensors (each counted once; DTensor: the local shard)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        local = _local(tensor)
        total += local.numel() * local.element_size()
    return total


def parameter_bytes(model: nn.Module) -> int:
    return tensor_bytes(model.parameters())


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients currently held (0 after `zero_grad(set_to_none=True)`)."""
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def iter_state_tensors(optimizer: Optimizer) -> Iterator[tuple[torch.Tensor, str, torch.Tensor]]:
    """(parameter, state key, tensor) for every tensor in `optimizer.state`; plain numbers are skipped."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield param, key, value


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor in `optimizer.state` (step counters included; DTensor: the local shard)."""
    return tensor_bytes(tensor for _, _, tensor in iter_state_tensors(optimizer))


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_peak_memory() -> None:
    """Restart the CUDA peak; the CPU peak RSS cannot be reset (one process per measurement)."""
    if _cuda_in_use():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, int | str]:
    """The peak so far: `{"peak_bytes": int, "peak_measure": name}`.

    "cuda_max_allocated" when this process has initialized CUDA (the current device's
    `torch.cuda.max_memory_allocated()`), else "cpu_peak_rss" (the process's peak resident set size).
    """
    if _cuda_in_use():
        return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "peak_measure": "cuda_max_allocated"}
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    peak = maxrss if sys.platform == "darwin" else maxrss * 1024
    return {"peak_bytes": int(peak), "peak_measure": "cpu_peak_rss"}


def snapshot(model: nn.Module, optimizer: Optimizer) -> dict[str, int | str]:
    """What the trainer records in metrics.jsonl and summary.json (bytes; per rank under FSDP2)."""
    return {
        "parameter_bytes": parameter_bytes(model),
        "gradient_bytes": gradient_bytes(model),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        **peak_memory(),
    }
