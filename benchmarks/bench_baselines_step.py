"""Optimizer step time of lowmem's Muon and Adam-mini against their reference implementations.

  muon       lowmem Muon (bf16 Newton–Schulz, AdamW core on embedding/head/vectors)
             vs torch.optim.Muon on the hidden matrices + torch.optim.AdamW(foreach=True) on the rest
  adam-mini  lowmem AdamMini(adam_mini_param_groups(model)) vs the official adam_mini.Adam_mini

The real model of the chosen preset (default llama-60m, fp32, CPU) with fixed random gradients; all
contenders step the same parameters, each with its own state. Within each round the contenders of
a pair take turns (order alternated per round) so drift on a shared machine hits both alike; each
round gives the ratio lowmem / reference, and the median ratio over rounds is reported.

    python benchmarks/bench_baselines_step.py [--model llama-60m] [--rounds 7] [--steps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import lowmem.optim
from lowmem.assembly import build_model
from lowmem.bench.timing import interleaved, seconds_per_step
from lowmem.optim.adam_mini import AdamMini, adam_mini_param_groups
from lowmem.optim.muon import Muon


def _muon_pair(model):
    groups = {g["role"]: g["params"] for g in lowmem.optim.param_groups(model)}
    ours = Muon(lowmem.optim.param_groups(model), lr=0.02, adam_lr=1e-3)
    torch_muon = torch.optim.Muon(groups["hidden"], lr=0.02, weight_decay=0.0)
    torch_adamw = torch.optim.AdamW([p for r in ("embedding", "head", "vector") for p in groups[r]], lr=1e-3,
                                    weight_decay=0.0, foreach=True)

    def reference() -> None:
        torch_muon.step()
        torch_adamw.step()

    return ours.step, reference


def _adam_mini_pair(model):
    import adam_mini

    config = model.config
    ours = AdamMini(adam_mini_param_groups(model), lr=1e-3)
    official = adam_mini.Adam_mini(model.named_parameters(), lr=1e-3, dim=config.hidden_size,
                                   n_heads=config.num_heads, verbose=False)
    return ours.step, official.step


PAIRS = {"muon": _muon_pair, "adam-mini": _adam_mini_pair}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
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
          f"{args.rounds} rounds x {args.steps} steps per contender")

    for name in args.pairs:
        ours, reference = PAIRS[name](model)
        # One warm-up step each (allocate state, fault in pages), then the two alternate round by round.
        times = interleaved({"lowmem": ours, "reference": reference}, args.rounds,
                            lambda step: seconds_per_step(step, args.steps))
        ratios = [a / b for a, b in zip(times["lowmem"], times["reference"])]
        print(f"{name:10s} lowmem {statistics.median(times['lowmem']) * 1e3:8.1f} ms/step   "
              f"reference {statistics.median(times['reference']) * 1e3:8.1f} ms/step   "
              f"ratio lowmem/reference: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
