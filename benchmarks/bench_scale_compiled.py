"""Whether torch.compile brings SCALE's column-normalized update nearer the `add_` floor (issue 28), part
by part: llama-60m's hidden matrices (dim-1 norms, no momentum), its embedding (a dim-0 norm across
32,000 rows) and its head (dim-1 norms of the momentum, updated in place first).

For each part three contenders step the same tensors, interleaved round by round
(lowmem.bench.timing.interleaved): `eager` (lowmem.optim.scale.scale_update, cache-sized chunks),
`compiled` (the update of every matrix of the part in one inductor graph, the lr a 0-dim tensor,
weights and momentum updated in place) and `floor` (one `_foreach_add_` over the part's weights).
Printed: median ms per step and the medians of the per-round ratios to the floor, or the compiler's
error where inductor cannot build the part's graph.

    python benchmarks/bench_scale_compiled.py [--model llama-60m] [--rounds 7] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

import lowmem.optim
from lowmem.bench.timing import interleaved, seconds_per_step
from lowmem.models import build_model
from lowmem.optim.roles import group_input_dim, group_role
from lowmem.optim.scale import RMS_FLOOR, normalized_dim, scale_update

MOMENTUM = 0.9


def compiled_update(params, grads, buffers, dims, lr):
    """SCALE's column/row update of each matrix with the lr a tensor: the eager arithmetic, one graph."""
    for p, g, m, dim in zip(params, grads, buffers, dims):
        d = g if m is None else m.lerp_(g, 1 - MOMENTUM)
        sqrt_n = math.sqrt(d.size(dim))
        norm = torch.linalg.vector_norm(d, 2, dim=dim, keepdim=True)
        p.sub_((lr * sqrt_n) * d / norm.clamp_min(RMS_FLOOR * sqrt_n))


def parts(model: torch.nn.Module) -> dict[str, tuple[list, list, list, list]]:
    """(params, grads, momentum buffers or None, dims) of the hidden matrices, the embedding and the head,
    by the roles and normalized dims SCALE itself uses (lowmem.optim.param_groups, scale.normalized_dim)."""
    found: dict[str, tuple[list, list, list, list]] = {}
    for group in lowmem.optim.param_groups(model):
        for p in group["params"]:
            role = "vector" if p.dim() < 2 else group_role(group, p)
            if role == "vector":
                continue
            params, grads, buffers, dims = found.setdefault(role, ([], [], [], []))
            params.append(p)
            grads.append(p.grad)
            buffers.append(torch.zeros_like(p) if role == "head" else None)  # SCALE's momentum: the head's only
            dims.append(normalized_dim(role, "column", group_input_dim(group, p)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per contender per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    lr = torch.tensor(1e-3, dtype=torch.float64)
    print(f"{args.model}, fp32, CPU, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps; "
          f"torch {torch.__version__}")
    for part, (params, grads, buffers, dims) in parts(model).items():
        elements = sum(p.numel() for p in params)
        graph = torch.compile(compiled_update, fullgraph=True, dynamic=False)

        @torch.no_grad()
        def compiled(params=params, grads=grads, buffers=buffers, dims=dims, graph=graph):
            graph(params, grads, buffers, dims, lr)

        @torch.no_grad()
        def eager(params=params, grads=grads, buffers=buffers, dims=dims):
            scale_update(params, grads, buffers, dims, lr=1e-3, momentum=MOMENTUM, weight_decay=0.0,
                         normalization="column")

        @torch.no_grad()
        def floor(params=params, grads=grads):
            torch._foreach_add_(params, grads, alpha=-1e-6)

        contenders = {"eager": eager, "floor": floor}
        start = time.perf_counter()
        try:
            compiled()
            contenders["compiled"] = compiled
            compile_note = f"compiled in {time.perf_counter() - start:.1f} s"
        except Exception as error:  # inductor's own failure is the finding, not a crash of the benchmark
            compile_note = f"inductor cannot compile it: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
        times = interleaved(contenders, args.rounds, lambda step: seconds_per_step(step, args.steps), warmup=1)
        figures = ", ".join(f"{name} {statistics.median(times[name]) * 1e3:.1f} ms" for name in contenders)
        ratios = ", ".join(
            f"{name}/floor {statistics.median(t / f for t, f in zip(times[name], times['floor'])):.2f}"
            for name in contenders if name != "floor")
        print(f"  {part} ({len(params)} matrices, {elements / 1e6:.1f}M elements): {figures}; {ratios}; {compile_note}")
    print(f"  load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
