"""Optimizer step time of lowmem's GaLore, Fira, APOLLO and APOLLO-Mini vs the official packages.

    python benchmarks/bench_projection_step.py                      # everything (several minutes)
    python benchmarks/bench_projection_step.py --methods galore --rounds 3
    python benchmarks/bench_projection_step.py --agreement           # distance to the official weights

On llama-60m's parameter shapes (every tensor of the model, fp32, random fixed gradients), with the
same hyperparameters on both sides (the llama-60m presets: rank 128, scale 0.25 for GaLore/Fira;
rank 128 channel scaling for APOLLO; rank 1 tensor scaling, scale 128 for APOLLO-Mini). Non-hidden
tensors (embedding, head, norms) get each side's AdamW. One process, one thread, the contenders
alternating (order flipped every round), each round a block of `--gap` consecutive steps per
contender, which holds exactly one projection refresh. Reported per method, medians over rounds:

  regular   median time of a step without a refresh
  refresh   time of the step that recomputes every projection (SVD or random matrix)
  gap G     the block's mean step time: (refresh + (G-1) regular) / G, measured
  gap 200   the same amortization at the papers' gap, from the measured refresh and regular medians

and ours / official ratios (< 1: lowmem is faster). The stagger part runs lowmem's GaLore for
`--stagger-gap` steps after its first step with and without stagger=True, and reports the slowest
step over the median step. Last, the time to compute every rank-128 basis with the exact and with the
randomized SVD (lowmem's svd="randomized"), and how much of the gradient's energy the randomized
bases capture relative to the exact ones.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from lowmem.assembly import build_model, build_optimizer
from lowmem.bench.timing import interleaved, seconds_per_step, step_seconds
from lowmem.optim.projection import projection_side, randomized_svd_projection, svd_projection
from lowmem.optim.roles import assign_roles

METHODS = ("galore", "fira", "apollo", "apollo-mini")


def official_optimizer(name: str, hidden: list[torch.Tensor], others: list[torch.Tensor], gap: int):
    if name == "galore":
        from galore_torch import GaLoreAdamW

        group = {"rank": 128, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
        return GaLoreAdamW([{"params": others}, {"params": hidden, **group}], lr=0.01, no_deprecation_warning=True)
    if name == "fira":
        from fira import FiraAdamW

        group = {"rank": 128, "update_proj_gap": gap, "alpha": 0.25, "proj_type": "std"}
        return FiraAdamW([{"params": others}, {"params": hidden, **group}], lr=0.01, no_deprecation_warning=True)
    from apollo_torch import APOLLOAdamW

    if name == "apollo":
        group = {"rank": 128, "scale": 1.0, "scale_type": "channel"}
    else:
        group = {"rank": 1, "scale": 128.0, "scale_type": "tensor"}
    group.update(update_proj_gap=gap, proj="random", proj_type="std")
    return APOLLOAdamW([{"params": others}, {"params": hidden, **group}], lr=0.01)


def ours_optimizer(name: str, model: torch.nn.Module, gap: int, **extra):
    hparams = {"update_proj_gap": gap, **extra}
    if name == "fira":
        hparams["compat"] = "official"  # the same arithmetic as the released code
    return build_optimizer(name, model, preset="llama-60m", hparams=hparams)


def model_with_grads(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("llama-60m")
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return model


def compare(name: str, gap: int, rounds: int) -> dict[str, float]:
    ours_model, theirs_model = model_with_grads(), model_with_grads()
    roles = assign_roles(theirs_model)
    hidden = [p for p in theirs_model.parameters() if roles[p] == "hidden"]
    others = [p for p in theirs_model.parameters() if roles[p] != "hidden"]
    contenders = {"ours": ours_optimizer(name, ours_model, gap).step,
                  "official": official_optimizer(name, hidden, others, gap).step}
    # The warm-up step allocates the state and computes the first projections; then blocks alternate.
    blocks = interleaved(contenders, rounds, lambda step: step_seconds(step, gap))
    # Steps 2.. run in blocks of `gap`; the refresh is the step whose 0-based count is a multiple of gap.
    refresh_index = gap - 1  # block k holds 0-based counts 1 + k*gap ... (k+1)*gap
    figures = {}
    for key, key_blocks in blocks.items():
        refresh = [b[refresh_index] for b in key_blocks]
        regular = [t for b in key_blocks for i, t in enumerate(b) if i != refresh_index]
        figures[f"{key}_regular"] = statistics.median(regular)
        figures[f"{key}_refresh"] = statistics.median(refresh)
        figures[f"{key}_block"] = statistics.median(sum(b) / gap for b in key_blocks)
    ratios_block = [sum(a) / sum(b) for a, b in zip(blocks["ours"], blocks["official"])]
    figures["ratio_block"] = statistics.median(ratios_block)
    figures["ratio_regular"] = figures["ours_regular"] / figures["official_regular"]
    figures["ratio_refresh"] = figures["ours_refresh"] / figures["official_refresh"]
    for key in contenders:
        figures[f"{key}_gap200"] = (figures[f"{key}_refresh"] + 199 * figures[f"{key}_regular"]) / 200
    figures["ratio_gap200"] = figures["ours_gap200"] / figures["official_gap200"]
    return figures


def stagger_spikes(gap: int, svd: str) -> dict[str, float]:
    figures = {}
    for stagger in (False, True):
        model = model_with_grads()
        optimizer = ours_optimizer("galore", model, gap, stagger=stagger, svd=svd)
        optimizer.step()  # the first step computes every projection in both cases
        times = step_seconds(optimizer.step, gap)
        label = "stagger" if stagger else "plain"
        figures[f"{label}_max"] = max(times)
        figures[f"{label}_median"] = statistics.median(times)
        figures[f"{label}_ratio"] = max(times) / statistics.median(times)
    return figures


def refresh_cost(rounds: int) -> dict[str, float]:
    """Seconds to compute rank-128 bases for every hidden matrix of llama-60m, exact vs randomized SVD,
    alternating; and the fraction of the optimal (exact) captured energy the randomized bases keep."""
    model = model_with_grads()
    roles = assign_roles(model)
    grads = [p.grad for p in model.parameters() if roles[p] == "hidden"]
    sides = [projection_side(g.shape[0], g.shape[1], "std") for g in grads]

    def exact_bases() -> None:
        for g, side in zip(grads, sides):
            svd_projection(g, 128, side)

    def randomized_bases() -> None:
        for i, (g, side) in enumerate(zip(grads, sides)):
            randomized_svd_projection(g, 128, side, seed=i)

    times = interleaved({"exact": exact_bases, "randomized": randomized_bases}, rounds,
                        lambda bases: seconds_per_step(bases, 1), warmup=0)
    captured = []
    for i, (g, side) in enumerate(zip(grads, sides)):
        exact, approx = svd_projection(g, 128, side), randomized_svd_projection(g, 128, side, seed=i)
        energy = [(g @ b.T if side == "right" else b.T @ g).square().sum().item() for b in (exact, approx)]
        captured.append(energy[1] / energy[0])
    return {"exact": statistics.median(times["exact"]), "randomized": statistics.median(times["randomized"]),
            "captured_min": min(captured), "captured_median": statistics.median(captured)}


def agreement(steps: int = 30, gap: int = 10, rank: int = 4) -> list[tuple[str, tuple[int, int], float, float]]:
    """Relative distance between lowmem's and the official weights after `steps` identical gradients
    (fp32, tall and wide matrix, refreshes at steps 1, 11, 21): ||ours - theirs|| / ||theirs|| and the
    same over the distance travelled ||theirs - initial||. The tests assert both <= 1e-5."""
    from apollo_torch import APOLLOAdamW
    from fira import FiraAdamW
    from galore_torch import GaLoreAdamW

    from lowmem.optim.apollo import Apollo
    from lowmem.optim.galore import Fira, GaLore

    low = {"rank": rank, "update_proj_gap": gap, "proj_type": "std"}
    cases = {
        "galore": (lambda p: GaLore([{"params": p, "role": "hidden"}], **low),
                   lambda p: GaLoreAdamW([{"params": p, "scale": 0.25, **low}], lr=0.01, no_deprecation_warning=True)),
        "fira compat=official": (lambda p: Fira([{"params": p, "role": "hidden"}], compat="official", **low),
                                 lambda p: FiraAdamW([{"params": p, "alpha": 0.25, **low}], lr=0.01,
                                                     no_deprecation_warning=True)),
        "fira (paper)": (lambda p: Fira([{"params": p, "role": "hidden"}], **low),
                         lambda p: FiraAdamW([{"params": p, "alpha": 0.25, **low}], lr=0.01, no_deprecation_warning=True)),
        "apollo": (lambda p: Apollo([{"params": p, "role": "hidden"}], **low),
                   lambda p: APOLLOAdamW([{"params": p, "scale": 1.0, "scale_type": "channel", "proj": "random",
                                           **low}], lr=0.01)),
        "apollo-mini": (lambda p: Apollo([{"params": p, "role": "hidden"}], scale=128.0, scale_type="tensor",
                                         **{**low, "rank": 1}),
                        lambda p: APOLLOAdamW([{"params": p, "scale": 128.0, "scale_type": "tensor", "proj": "random",
                                                **{**low, "rank": 1}}], lr=0.01)),
    }
    rows = []
    for name, (make_ours, make_theirs) in cases.items():
        for shape in ((48, 20), (20, 48)):
            gen = torch.Generator().manual_seed(0)
            initial = torch.randn(shape, generator=gen)
            persistent = torch.randn(shape, generator=gen)
            ours, theirs = torch.nn.Parameter(initial.clone()), torch.nn.Parameter(initial.clone())
            opt_ours, opt_theirs = make_ours([ours]), make_theirs([theirs])
            for _ in range(steps):
                grad = persistent + 0.5 * torch.randn(shape, generator=gen)
                ours.grad, theirs.grad = grad.clone(), grad.clone()
                opt_ours.step()
                opt_theirs.step()
            distance = (ours - theirs).norm()
            rows.append((name, shape, (distance / theirs.norm()).item(), (distance / (theirs - initial).norm()).item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--gap", type=int, default=20, help="update_proj_gap of the side-by-side blocks")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--stagger-gap", type=int, default=200, help="0 skips the stagger measurement")
    parser.add_argument("--svd", default="exact", choices=("exact", "randomized"), help="lowmem's SVD in the stagger part")
    parser.add_argument("--agreement", action="store_true",
                        help="only print how far lowmem's weights are from the official ones after 30 steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.agreement:
        print("30 identical fp32 gradients, gap 10, rank 4 (1 for apollo-mini): |ours - official| / |official|, "
              "and / |official - initial|")
        for name, shape, relative, relative_to_update in agreement():
            print(f"  {name:22s} {str(shape):9s} {relative:8.1e} {relative_to_update:8.1e}")
        return
    print(f"llama-60m, fp32, 1 thread, gap {args.gap} blocks, {args.rounds} rounds; times in ms per step")
    print(f"{'method':12s} {'side':9s} {'regular':>9s} {'refresh':>9s} {f'gap {args.gap}':>9s} {'gap 200':>9s}")
    for name in args.methods:
        f = compare(name, args.gap, args.rounds)
        for key in ("ours", "official"):
            print(f"{name:12s} {key:9s} {1e3 * f[f'{key}_regular']:9.1f} {1e3 * f[f'{key}_refresh']:9.1f} "
                  f"{1e3 * f[f'{key}_block']:9.1f} {1e3 * f[f'{key}_gap200']:9.1f}")
        print(f"{name:12s} {'ratio':9s} {f['ratio_regular']:9.2f} {f['ratio_refresh']:9.2f} "
              f"{f['ratio_block']:9.2f} {f['ratio_gap200']:9.2f}   (ours / official)")
    f = refresh_cost(args.rounds)
    print(f"\nrank-128 bases of llama-60m's 56 hidden matrices (random gradients: a flat spectrum, the hard case):"
          f"\n  exact SVD {1e3 * f['exact']:.0f} ms, randomized {1e3 * f['randomized']:.0f} ms "
          f"(ratio {f['randomized'] / f['exact']:.2f}); randomized keeps {f['captured_median']:.3f} (median), "
          f"{f['captured_min']:.3f} (worst) of the exact basis' captured energy ||R||^2")
    if args.stagger_gap:
        f = stagger_spikes(args.stagger_gap, args.svd)
        print(f"\nlowmem galore ({args.svd} SVD), {args.stagger_gap} steps after the first, gap {args.stagger_gap}: "
              "slowest step / median step")
        for label in ("plain", "stagger"):
            print(f"  {label:8s} max {1e3 * f[f'{label}_max']:8.1f} ms  median {1e3 * f[f'{label}_median']:7.1f} ms  "
                  f"ratio {f[f'{label}_ratio']:6.2f}")


if __name__ == "__main__":
    main()
