"""Memory: predicted before a run (estimate), measured during it (measure).

    from lowmem.memory import estimate_memory, snapshot
    estimate_memory("llama-7b", "scale").paper_gb     # 13.74, the papers' convention
    snapshot(model, optimizer)                        # bytes held now + the peak, named
"""

from lowmem.memory.estimate import MemoryEstimate, activation_bytes, activation_peak_bytes, compare, estimate_memory
from lowmem.memory.measure import (
    TensorMemory,
    gradient_bytes,
    optimizer_state_bytes,
    parameter_bytes,
    peak_memory,
    reset_peak_memory,
    snapshot,
    tensor_bytes,
)

__all__ = [
    "MemoryEstimate",
    "TensorMemory",
    "activation_bytes",
    "activation_peak_bytes",
    "compare",
    "estimate_memory",
    "gradient_bytes",
    "optimizer_state_bytes",
    "parameter_bytes",
    "peak_memory",
    "reset_peak_memory",
    "snapshot",
    "tensor_bytes",
]
