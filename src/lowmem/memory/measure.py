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
and every buffer included. `reset_peak_memory()` restarts it from the current resident size on
Linux (/proc/self/clear_refs), which the trainer does once the run is assembled, so a run's peak is
its training's, not its model loading's; the interpreter and libraries stay in it, so comparing two
methods on CPU still takes one process per method.
"""

from __future__ import annotations

import resource
import sys
import weakref
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowmem.optim.base import local_tensor


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the given tensors (each counted once; DTensor: the local shard)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        local = local_tensor(tensor)  # a DTensor's numel() is the global size; the rank holds only its shard
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
    """Restart the peak from what is in use now: the CUDA peak when this process uses CUDA, else the
    peak RSS (Linux; elsewhere, or where /proc refuses it, the CPU peak stays the process's)."""
    if _cuda_in_use():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one (proc(5))
    except OSError:
        pass


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


class TensorMemory(TorchDispatchMode):
    """Bytes of tensor storages that ops create while this mode is active, live and peak: the CPU
    counterpart of torch.cuda.memory_allocated / max_memory_allocated, for tests and benchmarks.

        with TensorMemory(exclude=model.parameters()) as mem:
            loss = model(ids, labels=labels)
            kept = mem.live          # what the forward left for backward
            loss.backward()
        mem.peak                     # the most that was alive at once

    Every storage is counted once, from its creation by an op until it is freed (a weak reference
    to the storage fires then); storages that existed before (parameters, buffers, `exclude`) are
    never counted, views of them neither. It sees tensors, not the allocator: no rounding, no
    caching, no interpreter — so on CPU it measures what the estimate predicts, unlike the peak RSS.
    Autograd's backward runs under the mode too (its thread-local state is propagated). Meta tensors
    count as well (a storage is keyed by its identity, not its address, which meta storages lack):
    that is how the estimate measures an optimizer step's temporaries without memory.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        # The excluded storages are held while the mode lives: one freed during the measured code (a
        # state tensor an optimizer replaces) would otherwise leave its identity to a new storage,
        # which would then go uncounted (the estimate's peak moved by MBs from run to run).
        self._held = [t.untyped_storage() for t in exclude]
        # A storage's own identity (a meta storage has no address; views share their base's storage).
        self._excluded = {storage._cdata for storage in self._held}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if nbytes == 0 or key in self._sizes or key in self._excluded:
                continue
            self._sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out
