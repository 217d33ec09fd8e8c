"""Costs of the low-rank structures at llama-1b shapes (docs/results.md, "Low-rank structures (issue 11)").

    # refactorization: QR of B and A^T + an r x r SVD, against a full SVD of the out x in product
    python benchmarks/bench_lowrank.py refactor --out 2048 --in 5461 --rank 512
    # one SLTrain layer (rank 512, density 0.03) against a dense Linear: forward + backward peak, time
    python benchmarks/bench_lowrank.py sltrain --out 2048 --in 5461 --rank 512 --tokens 1024

fp32, one torch thread (set OMP_NUM_THREADS=1 for comparable figures). The memory figure is on the
CPU: each variant runs in its own process; `peak_bytes_without_inputs` is the process's peak RSS
minus its RSS before the layer was built, less the input, its gradient and the output gradient (the
same for both): the layer's weights, gradients and the transients of forward + backward.
`step_transient_bytes` is the peak over the steps after a warm-up minus the RSS just before them.
"""

from __future__ import annotations

import argparse
import json
import resource

from lowmem.bench.peak import report_to_parent, rss_bytes, run_child
from lowmem.bench.timing import step_seconds


def refactor(args: argparse.Namespace) -> dict:
    import torch

    from lowmem.structure.refactor import balanced_factors, balanced_factors_svd

    torch.manual_seed(0)
    a = torch.randn(args.rank, args.in_features) / args.in_features**0.5
    b = torch.randn(args.out, args.rank) / args.rank**0.5

    def timed(factors, repeats: int) -> tuple[float, tuple]:
        """The fastest of `repeats` calls, and the factors the last one returned."""
        results = []
        return min(step_seconds(lambda: results.append(factors(a, b)), repeats)), results[-1]

    qr_seconds, (qa, qb, qs) = timed(balanced_factors, args.repeats)
    svd_seconds, (sa, sb, ss) = timed(balanced_factors_svd, 1)
    product = b @ a
    return {
        "shape": f"B {args.out}x{args.rank}, A {args.rank}x{args.in_features}",
        "qr_route_seconds": qr_seconds, "full_svd_seconds": svd_seconds, "speedup": svd_seconds / qr_seconds,
        "product_max_abs_change": (qb @ qa - product).abs().max().item(),
        "product_max_abs": product.abs().max().item(),
        "singular_values_max_rel_difference": ((qs - ss).abs() / ss.abs().max()).max().item(),
    }


def _sltrain_worker(args: argparse.Namespace) -> dict:
    import torch
    from torch import nn

    from lowmem.structure.sltrain import SLTrainLinear

    torch.manual_seed(0)
    start_rss = rss_bytes()  # torch imported, nothing of the layer allocated yet
    if args.variant == "dense":
        layer = nn.Linear(args.in_features, args.out, bias=False)
    else:
        layer = SLTrainLinear(args.in_features, args.out, args.rank, 8.0, args.density)
    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    g = torch.randn(args.tokens, args.out)
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters()) + sum(
        b.numel() * b.element_size() for b in layer.buffers())

    def step() -> None:
        y = layer(x)
        y.backward(g)

    step()  # warm-up: gradient buffers exist from here on, as in training
    before = rss_bytes()
    times = step_seconds(step, args.repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    io_bytes = (x.numel() + x.grad.numel() + g.numel()) * 4
    return {"variant": args.variant, "weight_and_index_bytes": weight_bytes,
            "gradient_bytes": sum(p.grad.numel() * p.grad.element_size() for p in layer.parameters()),
            "step_transient_bytes": max(0, peak - before),
            "peak_bytes_without_inputs": peak - start_rss - io_bytes, "step_seconds": min(times)}


def sltrain(args: argparse.Namespace) -> list[dict]:
    return [run_child([__file__, "sltrain-worker", "--variant", variant, "--out", str(args.out),
                       "--in", str(args.in_features), "--rank", str(args.rank), "--density", str(args.density),
                       "--tokens", str(args.tokens), "--repeats", str(args.repeats)])
            for variant in ("dense", "sltrain")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["refactor", "sltrain", "sltrain-worker"])
    parser.add_argument("--out", type=int, default=2048)
    parser.add_argument("--in", dest="in_features", type=int, default=5461)
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["dense", "sltrain"], default="dense")
    args = parser.parse_args()
    if args.what == "refactor":
        print(json.dumps(refactor(args), indent=1))
    elif args.what == "sltrain":
        for row in sltrain(args):
            print(json.dumps(row))
    else:
        report_to_parent(_sltrain_worker(args))


if __name__ == "__main__":
    main()
