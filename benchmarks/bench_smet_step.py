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
import functools
import statistics

import torch

from lowmem.assembly import build_model, build_optimizer
from lowmem.bench.timing import interleaved, seconds_per_step


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

    def timed_pass(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[float, float]:
        """(forward + backward seconds, optimizer.step seconds) of one micro-batch."""
        opt.zero_grad(set_to_none=True)
        fwd_bwd = seconds_per_step(lambda: model(x).float().logsumexp(-1).mean().backward(), 1)
        return fwd_bwd, seconds_per_step(opt.step, 1)

    # Two warm-up passes each; then the configurations in the same order, repeat by repeat.
    passes = interleaved({name: functools.partial(timed_pass, *built[name]) for name in configs}, args.repeats,
                         lambda timed: timed(), warmup=2, rotate=False)
    times = {name: {"fwd+bwd": [p[0] for p in values], "step": [p[1] for p in values]} for name, values in passes.items()}
    print(f"{args.model}, d={args.density}, B={args.block}, micro-batch {args.batch} x {args.seq_len}, fp32, 1 thread; "
          f"medians of {args.repeats} (ms)")
    print("| configuration | forward+backward | optimizer.step |")
    print("|---|---|---|")
    for name in configs:
        fb, st = (statistics.median(times[name][k]) * 1e3 for k in ("fwd+bwd", "step"))
        print(f"| {name} | {fb:.1f} | {st:.2f} |")


if __name__ == "__main__":
    main()
