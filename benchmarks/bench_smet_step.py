"""Step time of `smet` vs `adamw` on the same sparse model, and what compact storage's scatter costs.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_smet_step.py [--model cpu-small] [--repeats 15]

One process, one thread, fp32. For each storage (dense: masked dense weight; compact: values + block
index, the dense weight built per layer in forward and again in backward) and each optimizer, the
median over `repeats` of: forward + backward of one micro-batch, and `optimizer.step()` alone. The
unstructured model with AdamW is the reference row. Configurations are interleaved, repeat by repeat,
so a change in the machine's load hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lowmem.assembly import build_model, build_optimizer


def setup(model_name: str, vocab: int, structure: dict | None, optimizer: str):
    torch.manual_seed(0)
    model = build_model(model_name, vocab_size=vocab, structure=structure)
    return model, build_optimizer(optimizer, model, lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cpu-small")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = {"dense model / adamw": (None, "adamw")}
    for storage in ("dense", "compact"):
        structure = {"name": "sparse", "density": args.density, "block": args.block, "storage": storage}
        for optimizer in ("adamw", "smet"):
            configs[f"{storage} storage / {optimizer}"] = (structure, optimizer)
    built = {name: setup(args.model, args.vocab_size, s, o) for name, (s, o) in configs.items()}
    x = torch.randint(0, args.vocab_size, (args.batch, args.seq_len))
    times = {name: {"fwd+bwd": [], "step": []} for name in configs}
    for repeat in range(args.repeats + 2):  # two warm-up rounds
        for name, (model, opt) in built.items():
            opt.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(x).float().logsumexp(-1).mean().backward()
            mid = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            if repeat >= 2:
                times[name]["fwd+bwd"].append(mid - start)
                times[name]["step"].append(end - mid)
    print(f"{args.model}, d={args.density}, B={args.block}, micro-batch {args.batch} x {args.seq_len}, fp32, 1 thread; "
          f"medians of {args.repeats} (ms)")
    print("| configuration | forward+backward | optimizer.step |")
    print("|---|---|---|")
    for name in configs:
        fb, st = (statistics.median(times[name][k]) * 1e3 for k in ("fwd+bwd", "step"))
        print(f"| {name} | {fb:.1f} | {st:.2f} |")


if __name__ == "__main__":
    main()
