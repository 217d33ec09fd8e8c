"""What fits in a memory budget: the largest micro-batch for each way of keeping activations.

    rows = plan("llama-1b", "scale", budget=24e9, seq_len=256)
    rows[0].setting, rows[0].micro_batch, rows[0].peak   # e.g. "none / plain", 3, 2.3e10

For a model, optimizer (+ hyperparameters), structure, precision and sequence length, each of the six
settings (activation checkpointing none / block / selective x the plain or the chunked loss) gets the
largest micro-batch whose predicted peak — weights + optimizer states + the worst moment of the step
(lowmem.memory.estimate.step_phases: activations, gradients and the update's temporaries alive
together) — stays within the budget, and, given a global batch, the largest micro-batch that divides it
and the gradient accumulation that reaches it (the trainer needs global batch = micro-batch x
accumulation x processes). Without gradient release the peak assumes accumulation: every gradient held
through the next micro-batch's forward and backward, which a step of one micro-batch stays under.

The optimizer state and its update's temporaries are counted once, on the meta device; the activations
are a formula, so the search takes milliseconds. What the peak leaves out (the allocator's rounding and
fragmentation, CUDA's context and workspaces) is why a budget should sit a little under the device's
memory; benchmarks/bench_memory_peak.py --budget checks a planned micro-batch against a measured peak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lowmem.errors import ConfigError
from lowmem.memory.estimate import GB, _config, estimate_memory, step_phases
from lowmem.models.chunked_loss import DEFAULT_CHUNK
from lowmem.models.llama import CHECKPOINTING_MODES

MAX_MICRO_BATCH = 1 << 20
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """Bytes from "24GB" (1e9, the project's GB), "24GiB" (2^30), "500MB", or a plain number."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"memory budget {text!r} is not a size; write e.g. 24GB, 80GiB or 500MB")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ConfigError(f"memory budget {text!r} must be above zero; write e.g. 24GB")
    return int(value * _UNITS[unit])


@dataclass(frozen=True)
class PlanRow:
    checkpointing: str  # none | selective | block
    chunked: bool  # the chunked loss (else the plain loss over full logits)
    micro_batch: int  # largest that fits; 0 when not even one sequence does
    peak: int  # predicted peak bytes at that micro-batch (at 1 when nothing fits)
    fixed: int  # weights + gradients + optimizer states
    global_micro_batch: int | None = None  # largest micro-batch dividing the global batch, that fits
    accumulation: int | None = None  # global batch / (global_micro_batch x processes)

    @property
    def setting(self) -> str:
        return f"{self.checkpointing} / {'chunked' if self.chunked else 'plain'}"


def _largest_fitting(fits) -> int:
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_MICRO_BATCH and fits(high):
        low, high = high, high * 2
    high = min(high, MAX_MICRO_BATCH + 1)
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def plan(model: str, optimizer: str, hparams: dict[str, Any] | None = None, *, budget: int | float | str,
         vocab_size: int | None = None, seq_len: int = 256, precision: str = "bf16-pure",
         structure: dict[str, Any] | None = None, loss_chunk: int = DEFAULT_CHUNK,
         global_batch: int | None = None, processes: int = 1, gradient_release: bool = False) -> list[PlanRow]:
    """The six rows described in the module docstring, plain loss first within each checkpointing mode.
    With `gradient_release` the gradients count as their high-water mark, and a global batch needs one
    micro-batch per process (an update inside backward cannot accumulate micro-batches)."""
    budget_bytes = parse_bytes(budget)
    if global_batch is not None and (not isinstance(global_batch, int) or global_batch < 1):
        raise ConfigError(f"--global-batch must be a positive number of sequences, got {global_batch!r}")
    if processes < 1:
        raise ConfigError(f"processes must be >= 1, got {processes}")
    base = estimate_memory(model, optimizer, hparams, vocab_size=vocab_size, batch_size=1, seq_len=seq_len,
                           precision=precision, structure=structure, chunked_loss="off",
                           gradient_release=gradient_release)
    config = _config(model, vocab_size)
    fixed = base.weights + base.gradients + base.optimizer_states
    kept = base.weights + base.optimizer_states + base.index_bytes
    # Without release, gradients are counted as under accumulation (see the docstring): any count above 1.
    counted_accumulation = 1 if gradient_release else 2
    rows = []
    for mode in CHECKPOINTING_MODES:
        for chunked in (False, True):
            def peak(batch: int) -> int:
                phases = step_phases(config, batch, seq_len, precision, mode, loss_chunk if chunked else 0,
                                     base.gradient_pieces, base.update_temporaries, gradient_release,
                                     counted_accumulation)
                return kept + max(phases.values())

            best = _largest_fitting(lambda b: peak(b) <= budget_bytes)
            micro = accumulation = None
            if global_batch is not None:
                per_process, remainder = divmod(global_batch, processes)
                if remainder:
                    raise ConfigError(f"--global-batch {global_batch} is not divisible by {processes} processes; "
                                      f"choose a multiple of {processes}")
                divisors = [d for d in range(1, min(best, per_process) + 1) if per_process % d == 0
                            and (not gradient_release or d == per_process)]
                if divisors:
                    micro = divisors[-1]
                    accumulation = per_process // micro
            rows.append(PlanRow(mode, chunked, best, peak(max(best, 1)), fixed, micro, accumulation))
    return rows


def format_plan(rows: list[PlanRow], *, model: str, optimizer: str, budget: int, seq_len: int, precision: str,
                global_batch: int | None = None, processes: int = 1) -> str:
    fixed = rows[0].fixed
    lines = [
        f"model {model}, optimizer {optimizer}, precision {precision}, sequence length {seq_len}; "
        f"budget {budget / GB:.2f} GB (GB = 1e9 bytes)",
        f"weights + gradients + optimizer states: {fixed / GB:.2f} GB; the rest holds activations",
        "",
    ]
    header = f"{'checkpointing / loss':<24}{'micro-batch':>12}{'tokens':>10}{'peak GB':>10}"
    if global_batch is not None:
        header += f"{'micro for ' + str(global_batch):>16}{'accumulation':>14}"
    lines.append(header)
    for row in rows:
        micro = str(row.micro_batch) if row.micro_batch else "none fits"
        line = f"{row.setting:<24}{micro:>12}{row.micro_batch * seq_len:>10,}{row.peak / GB:>10.2f}"
        if global_batch is not None:
            if row.global_micro_batch:
                line += f"{row.global_micro_batch:>16}{row.accumulation:>14}"
            else:
                line += f"{'-':>16}{'-':>14}"
        lines.append(line)
    lines += ["", "peak = weights + optimizer states + the step's worst moment (activations, gradients and the "
              "update's temporaries together; gradients held as under accumulation unless released); not counted: "
              "allocator overhead, the CUDA context"]
    if global_batch is not None:
        lines.append(f"global batch {global_batch} = micro-batch x accumulation x {processes} process(es)")
    return "\n".join(lines)
