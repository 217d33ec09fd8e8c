"""Wall-clock timing for the benchmarks: steps timed alone or as a block, contenders interleaved.

On a shared machine the load drifts while a benchmark runs, so contenders are not timed one after the
other: `interleaved` warms each up (optimizer state allocated, pages faulted in, kernels loaded), then
runs rounds in which every contender is measured once, the order rotated by one each round (two
contenders: alternated), so drift hits all of them alike and each round gives comparable figures (a
ratio per round, medians over rounds). On CUDA, pass the device so the clock reads after the queued
work has finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

Measured = TypeVar("Measured")


def synchronize(device: Any) -> None:
    """Wait for `device`'s queued work (CUDA); nothing on the CPU."""
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def seconds_per_step(step: Callable[[], object], steps: int, device: Any = None) -> float:
    """Mean wall seconds of `steps` consecutive calls of `step`, timed as one block."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def step_seconds(step: Callable[[], object], steps: int, device: Any = None) -> list[float]:
    """Wall seconds of each of `steps` consecutive calls of `step` (to tell a slow step from the rest)."""
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def interleaved(contenders: Mapping[str, Callable[[], object]], rounds: int,
                measure: Callable[[Callable[[], object]], Measured], *, warmup: int = 1,
                rotate: bool = True) -> dict[str, list[Measured]]:
    """{name: [measure(step) per round]}: each contender is called `warmup` times, then `rounds` rounds
    measure every contender once, in an order rotated by one per round (`rotate=False`: the given
    order every round)."""
    for step in contenders.values():
        for _ in range(warmup):
            step()
    names = list(contenders)
    results: dict[str, list[Measured]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            results[name].append(measure(contenders[name]))
    return results


def model_with_gradients(preset: str, scale: float = 1e-3, seed: int = 0,
                         structure: dict[str, Any] | None = None, device: Any = None,
                         vocab_size: int | None = None) -> tuple[Any, int]:
    """The optimizer-step benchmarks' subject: model `preset` (with `structure`, a structure spec, on its
    hidden matrices; on `device`, default the CPU; `vocab_size` for a preset without its own) whose every parameter holds a fixed random gradient
    (N(0, scale^2), from `seed`), so a step can be timed again and again; and its parameter count."""
    import torch

    from lowmem.assembly import build_model

    torch.manual_seed(seed)
    model = build_model(preset, structure=structure, vocab_size=vocab_size)
    if device is not None:
        model = model.to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model, sum(p.numel() for p in model.parameters())


def self_times(step: Callable[[], object], steps: int) -> list[tuple[str, float, int]]:
    """`step` run `steps` times under torch.profiler: (op, self CPU milliseconds per step, calls per step)
    for every op, the costliest first; the benchmarks' one per-op breakdown."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / steps / 1e3, e.count // steps) for e in rows]
