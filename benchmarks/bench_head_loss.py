"""The loss's step, eager vs compiled (issue 28): `lowmem.models.llama.head_loss_sum` (the head's
matmul, fp32 cast, summed cross-entropy) forward and backward, against `compiled_head_loss()`, the
graph `--compile` runs. With --chunk N the chunked loss instead (lowmem.models.chunked_loss, N tokens a
chunk), eager against its per-chunk graph (`compile_backend="inductor"`, as under `--compile`). Default
shapes are cpu-small's at batch 8 x 256 (2,048 tokens, hidden 256, vocab 8192), fp32, CPU; the two
alternate round by round, and the median ratio is printed.

    OMP_NUM_THREADS=1 python benchmarks/bench_head_loss.py [--tokens 2048] [--hidden 256] [--vocab 8192]
        [--chunk 0] [--bf16] [--rounds 9] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from lowmem.bench.timing import interleaved, seconds_per_step
from lowmem.models.chunked_loss import chunked_head_loss_sum
from lowmem.models.llama import compiled_head_loss, head_loss_sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=0, help="tokens per chunk of the chunked loss (0: the plain loss)")
    parser.add_argument("--bf16", action="store_true", help="bf16 hidden states and head weight")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="steps per contender per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen)

    def step_of(loss_fn):
        def step() -> None:
            loss_fn(hidden, weight, labels).backward()
            hidden.grad = weight.grad = None
        return step

    if args.chunk:
        eager = functools.partial(chunked_head_loss_sum, chunk=args.chunk)
        compiled = functools.partial(chunked_head_loss_sum, chunk=args.chunk, compile_backend="inductor")
    else:
        eager, compiled = head_loss_sum, compiled_head_loss()
    start = time.perf_counter()
    step_of(compiled)()
    print(f"first compiled step (the compilation) {time.perf_counter() - start:.1f} s")
    contenders = {"eager": step_of(eager), "compiled": step_of(compiled)}
    times = interleaved(contenders, args.rounds, lambda step: seconds_per_step(step, args.steps), warmup=1)
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    loss = f"chunked loss ({args.chunk} tokens a chunk)" if args.chunk else "plain loss"
    print(f"{loss}, {args.tokens} tokens x {args.hidden} -> {args.vocab}, {dtype}, {args.threads} thread(s): eager "
          f"{statistics.median(times['eager']) * 1e3:.1f} ms, compiled {statistics.median(times['compiled']) * 1e3:.1f} ms "
          f"per forward + backward; compiled / eager median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
