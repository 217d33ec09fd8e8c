"""Optimizer step time and state bytes of AdamW with 8-bit states (`state_bits=8`) beside full-precision
states, side by side (issue 26).

The real model of the chosen preset (default llama-60m, fp32, CPU) with fixed random gradients; both
contenders step the same parameters, each with its own state, taking turns round by round (order
rotated) so drift on a shared machine hits both alike. Reported: median ms/step of each, the median
of the per-round ratios, and each one's state bytes (lowmem.memory.measure.optimizer_state_bytes).
The 8-bit step dequantizes each matrix's moments to fp32, updates them, and requantizes (a bucketize
over the map per element): that work is the price of the smaller state. The machine's load average
is printed with the figures.

    python benchmarks/bench_state_bits.py [--model llama-60m] [--rounds 7] [--steps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from lowmem.assembly import build_model
from lowmem.bench.timing import interleaved, seconds_per_step
from lowmem.memory.measure import optimizer_state_bytes
from lowmem.optim.adamw import AdamW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per contender per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model(args.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n / 1e6:.2f}M parameters, fp32, CPU, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps per contender; load average before: {os.getloadavg()}")

    optimizers = {"fp32 states": AdamW(model.parameters(), lr=1e-3),
                  "8-bit states": AdamW(model.parameters(), lr=1e-3, state_bits=8)}
    times = interleaved({name: opt.step for name, opt in optimizers.items()}, args.rounds,
                        lambda step: seconds_per_step(step, args.steps))
    for name, optimizer in optimizers.items():
        print(f"{name:13s} {statistics.median(times[name]) * 1e3:8.1f} ms/step   "
              f"state {optimizer_state_bytes(optimizer):,} bytes")
    ratios = [a / b for a, b in zip(times["8-bit states"], times["fp32 states"])]
    print(f"ratio 8-bit / fp32: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
