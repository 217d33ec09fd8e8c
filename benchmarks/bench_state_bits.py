"""Optimizer step time and state bytes of each method with 8-bit states (`state_bits=8`) beside
full-precision states, side by side (issue 26); and the memory table of every method at 1B and 7B.

The real model of the chosen preset (default llama-60m, fp32, CPU) with fixed random gradients; for
each method of `--methods` (default adamw; SMET on the sparse structure of `SMET_STRUCTURE`) both
contenders step the same parameters, each with its own state, taking turns round by round (order
rotated) so drift on a shared machine hits both alike. Reported: median ms/step of each, the median
of the per-round ratios, and each one's state bytes (lowmem.memory.measure.optimizer_state_bytes).
The 8-bit step dequantizes each matrix's moments to fp32, updates them, and requantizes (a bucketize
over the map per element): that work is the price of the smaller state. The machine's load average
is printed with the figures.

`--staleness N`: instead, N training steps of a small LLaMA (width 256, one block; random tokens) with
8-bit states, nearest and stochastic rounding, beside an fp32 shadow of each quantized moment fed the
same gradients: per reported step, the fraction of codes that requantized back to their old code
(stale: the step's change was smaller than the rounding), and how far the dequantized moments are
from the shadow (||deq - shadow|| / ||shadow|| over all quantized matrices).

`--memory`: instead, `lowmem memory`'s estimate (bf16-pure, micro-batch 1 x 256, the meta-step count)
of every method of `METHODS` at llama-1b and llama-7b with and without `state_bits=8`: states, peak and
the papers' GB (8-bit codes at 1 B each).

    python benchmarks/bench_state_bits.py [--model llama-60m] [--methods adamw,scale,...] [--rounds 7] [--steps 2] [--ns-dtype float32]
    python benchmarks/bench_state_bits.py --staleness 200 [--reset-every 30]
    python benchmarks/bench_state_bits.py --memory [--models llama-1b,llama-7b]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import lowmem.optim
import lowmem.optim.quantized_state as qs
from lowmem.bench.timing import interleaved, model_with_gradients, seconds_per_step
from lowmem.memory.estimate import accepted_hparams, estimate_memory
from lowmem.memory.measure import optimizer_state_bytes
from lowmem.models.llama import Llama, LlamaConfig
from lowmem.optim.adamw import ADAM_MOMENTS, AdamW
from lowmem.optim.reset import reset_moments

REPORT_AT = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Every method with moments (methods without, such as sgd-column, have nothing to quantize).
METHODS = ("adamw", "scale", "muon", "muon-all", "galore", "fira", "apollo", "apollo-mini", "adam-mini",
           "stable-spam", "smet")
SMET_STRUCTURE = {"name": "sparse", "density": 0.5, "block": 16, "storage": "compact"}


def _structure(method: str) -> dict | None:
    return SMET_STRUCTURE if method == "smet" else None


def memory_table(models: list[str]) -> None:
    print("| method | model | states, 16-bit | states, 8-bit | 8-bit / 16-bit | peak 16-bit -> 8-bit "
          "| papers' GB 16-bit -> 8-bit |")
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        for model in models:
            full, low = (estimate_memory(model, method, hparams, structure=_structure(method))
                         for hparams in ({}, {"state_bits": 8}))
            print(f"| {method} | {model} | {full.optimizer_states / 1e9:.2f} GB | {low.optimizer_states / 1e9:.2f} GB | "
                  f"{low.optimizer_states / full.optimizer_states:.3f} | {full.peak / 1e9:.2f} -> {low.peak / 1e9:.2f} GB | "
                  f"{full.paper_gb:.2f} -> {low.paper_gb:.2f} |", flush=True)


def step_times(preset: str, method: str, rounds: int, steps: int, ns_dtype: str) -> None:
    model, n = model_with_gradients(preset, structure=_structure(method))
    # Muon's Newton–Schulz in `ns_dtype`: this CPU has no bf16 matrix units, where a bf16 NS takes
    # minutes a step and would hide what the 8-bit state costs.
    hparams = {"ns_dtype": ns_dtype} if "ns_dtype" in accepted_hparams(method) else {}
    optimizers = {"full precision": lowmem.optim.build(method, model, lr=1e-3, **hparams),
                  "8-bit states": lowmem.optim.build(method, model, lr=1e-3, state_bits=8, **hparams)}
    times = interleaved({name: opt.step for name, opt in optimizers.items()}, rounds,
                        lambda step: seconds_per_step(step, steps))
    for name, optimizer in optimizers.items():
        print(f"{method:12s} {name:14s} {statistics.median(times[name]) * 1e3:8.1f} ms/step   "
              f"state {optimizer_state_bytes(optimizer):,} bytes")
    ratios = [a / b for a, b in zip(times["8-bit states"], times["full precision"])]
    print(f"{method:12s} ratio 8-bit / full: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}); load average after: {os.getloadavg()}")


def staleness(steps: int, stochastic_rounding: bool, reset_every: int = 0) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_heads=4, num_layers=1, vocab_size=96,
                         max_seq_len=32)
    model = Llama(config)
    optimizer = AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, state_bits=8,
                      stochastic_rounding=stochastic_rounding)
    matrices = [p for p in model.parameters() if qs.quantizes(p.shape, 8)]
    shadow = {id(p): {key: torch.zeros_like(p) for key in ADAM_MOMENTS} for p in matrices}
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    reset = f", momentum reset after every {reset_every} steps" if reset_every else ""
    print(f"rounding {'stochastic' if stochastic_rounding else 'nearest'}{reset}: step, stale codes m / v, "
          "||deq - fp32 shadow|| / ||shadow|| m / v")
    for step in range(1, steps + 1):
        tokens = torch.randint(0, config.vocab_size, (8, 17), generator=torch.Generator().manual_seed(1000 + step))
        (model(tokens[:, :-1], labels=tokens[:, 1:]) / (8 * 16)).backward()
        before = {(id(p), key): optimizer.state[p][key + qs.CODES].clone()
                  for p in matrices if optimizer.state[p] for key in ADAM_MOMENTS}
        for p in matrices:
            shadow[id(p)]["exp_avg"].lerp_(p.grad, 1 - beta1)
            shadow[id(p)]["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in REPORT_AT and before:
            _report(step, optimizer, matrices, before, shadow)
        if reset_every and step % reset_every == 0:  # as the momentum-reset intervention: after the step
            reset_moments(optimizer)
            for moments in shadow.values():
                for moment in moments.values():
                    moment.zero_()


def _report(step: int, optimizer: AdamW, matrices: list, before: dict, shadow: dict) -> None:
    stale, distance = [], []
    for key in ADAM_MOMENTS:
        same = sum(int((optimizer.state[p][key + qs.CODES] == before[(id(p), key)]).sum()) for p in matrices)
        stale.append(same / sum(p.numel() for p in matrices))
        err = sum(float((qs.dequantize_blockwise(optimizer.state[p][key + qs.CODES], optimizer.state[p][key + qs.ABSMAX],
                                                 qs.map_for(key)) - shadow[id(p)][key]).square().sum())
                  for p in matrices)
        norm = sum(float(shadow[id(p)][key].square().sum()) for p in matrices)
        distance.append((err / norm) ** 0.5)
    print(f"  {step:5d}   {stale[0]:.3f} / {stale[1]:.3f}   {distance[0]:.4f} / {distance[1]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per contender per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--staleness", type=int, default=0, help="measure staleness over this many steps instead")
    parser.add_argument("--reset-every", type=int, default=0, help="--staleness: also nearest rounding with a "
                        "momentum reset after every N steps (reported steps are not reset steps)")
    parser.add_argument("--methods", default="adamw", help=f"comma-separated, of: {','.join(METHODS)}")
    parser.add_argument("--ns-dtype", default="float32", help="Muon and muon-all: Newton–Schulz dtype")
    parser.add_argument("--memory", action="store_true", help="print the memory table instead")
    parser.add_argument("--models", default="llama-1b,llama-7b", help="--memory: the presets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.staleness:
        for stochastic_rounding in (False, True):
            staleness(args.staleness, stochastic_rounding)
        if args.reset_every:
            staleness(args.staleness, False, args.reset_every)
        return
    if args.memory:
        memory_table(args.models.split(","))
        return
    print(f"{args.model}, fp32, CPU, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps per "
          f"contender; load average before: {os.getloadavg()}")
    for method in args.methods.split(","):
        step_times(args.model, method, args.rounds, args.steps, args.ns_dtype)

if __name__ == "__main__":
    main()
