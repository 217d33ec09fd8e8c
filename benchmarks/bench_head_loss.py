"""The plain loss's step, eager vs compiled (issue 28): `lowmem.models.llama.head_loss_sum` (the head's
matmul, fp32 cast, summed cross-entropy) forward and backward, against `compiled_head_loss()`, the
graph `--compile` runs. Default shapes are cpu-small's at batch 8 x 256 (2,048 tokens, hidden 256,
vocab 8192), fp32, CPU; the two alternate round by round, and the median ratio is printed.

    OMP_NUM_THREADS=1 python benchmarks/bench_head_loss.py [--tokens 2048] [--hidden 256] [--vocab 8192]
        [--rounds 9] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lowmem.bench.timing import interleaved, seconds_per_step
from lowmem.models.llama import compiled_head_loss, head_loss_sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="steps per contender per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen)

    def step_of(loss_fn):
        def step() -> None:
            loss_fn(hidden, weight, labels).backward()
            hidden.grad = weight.grad = None
        return step

    start = time.perf_counter()
    step_of(compiled_head_loss())()
    print(f"first compiled step (the compilation) {time.perf_counter() - start:.1f} s")
    contenders = {"eager": step_of(head_loss_sum), "compiled": step_of(compiled_head_loss())}
    times = interleaved(contenders, args.rounds, lambda step: seconds_per_step(step, args.steps), warmup=1)
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    print(f"{args.tokens} tokens x {args.hidden} -> {args.vocab}, fp32, {args.threads} thread(s): eager "
          f"{statistics.median(times['eager']) * 1e3:.1f} ms, compiled {statistics.median(times['compiled']) * 1e3:.1f} ms "
          f"per forward + backward; compiled / eager median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
