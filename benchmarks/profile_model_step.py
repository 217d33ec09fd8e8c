"""Where one training step of a lowmem model goes on the CPU (torch.profiler, self time per op):
the ceiling on what compiling the model can gain, since a compiler fuses the elementwise work around
the matrix products but does not make `aten::mm` faster (issue 28).

    OMP_NUM_THREADS=1 python benchmarks/profile_model_step.py [--model cpu-small] [--vocab-size 8192]
        [--batch 8] [--seq-len 256] [--rows 14] [--compiled]

Forward with labels (the model's own loss), backward, AdamW(foreach); two warm-up steps, three profiled.
Prints ms per step under the profiler, each op's self time, and the share of the matrix products.
--compiled profiles the model as `--compile` trains it (blocks and loss compiled; the warm-up steps
compile), to see what is left beside the matrix products once the elementwise work is fused.
"""

from __future__ import annotations

import argparse

import torch

from lowmem.bench.timing import self_times
from lowmem.models import build_model

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cpu-small")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compiled", action="store_true", help="blocks and loss through torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.model, vocab_size=args.vocab_size)
    if args.compiled:
        model.compile_blocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    tokens = torch.randint(0, args.vocab_size, (args.batch, args.seq_len + 1))

    def step() -> None:
        model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    rows = self_times(step, 3)
    total = sum(ms for _, ms, _ in rows)
    matmul = sum(ms for op, ms, _ in rows if op in MATMULS)
    print(f"{args.model}{' compiled' if args.compiled else ''}, vocab {args.vocab_size}, batch {args.batch} x "
          f"{args.seq_len}, fp32, {args.threads} "
          f"thread(s): {total:.0f} ms/step under the profiler; matrix products {matmul:.0f} ms ({matmul / total:.0%})")
    for op, ms, calls in rows[:args.rows]:
        print(f"  {op:>58}: {ms:7.1f} ms  ({calls} calls)")


if __name__ == "__main__":
    main()
