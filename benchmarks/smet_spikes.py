"""Loss spikes after topology updates, naive AdamW vs SMET, from a finished (or running) grid.

    PYTHONPATH=src python benchmarks/smet_spikes.py runs/smet-cpu --output docs/figures/smet_spikes.png
    PYTHONPATH=src python benchmarks/smet_spikes.py runs/smet-spikes --dense none
    PYTHONPATH=src python benchmarks/smet_spikes.py runs/smet-spikes-long --dense none \
        --output docs/figures/smet_spikes_long.png --gap-ylim 0.1

For every run of the grid with a topology intervention and each update step u: the spike is the mean
training loss over steps u+1 .. u+20 minus the mean over u-19 .. u (metrics.jsonl, log_every 1). The
loss falls anyway, so the same windows of the dense AdamW run (no topology) are printed beside it as
the trend, and "excess" = spike - dense AdamW's difference over the same windows. Writes a two-panel
plot: the training loss around the updates, and the excess per update.

A second table pairs the first two --plot methods per update (same initialization and batches, so
their common noise cancels): lr at the update, the first step of a regrown weight under naive AdamW
at that tensor step t = u + 1 (m = v = 0, so it is lr * (1-b1)/(1-b1^t) / sqrt((1-b2)/(1-b2^t)) * sign(g),
b1 = 0.9, b2 = 0.999), each run's spike, and the gap (first minus second) over the 20 steps before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

WINDOW = 20
BETA1, BETA2 = 0.9, 0.999  # lowmem's AdamW defaults


def cold_start_factor(t: int) -> float:
    """A regrown weight's first AdamW step at tensor step t (m = v = 0 before it), in units of lr."""
    return (1 - BETA1) / (1 - BETA1**t) / ((1 - BETA2) / (1 - BETA2**t)) ** 0.5


def losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def learning_rates(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def updates(run: Path) -> list[int]:
    config = yaml.safe_load((run / "config.yaml").read_text())
    steps = config["train"]["steps"]
    for spec in config["optim"].get("interventions", []):
        if spec["name"] == "topology":
            return [s for s in range(spec["every"], steps, spec["every"]) if s + WINDOW <= steps and s - WINDOW >= 0]
    return []


def window_difference(curve: dict[int, float], u: int) -> float:
    after = [curve[s] for s in range(u + 1, u + WINDOW + 1)]
    before = [curve[s] for s in range(u - WINDOW + 1, u + 1)]
    return statistics.fmean(after) - statistics.fmean(before)


def seed_of(run: Path) -> str:
    """'base' for the grid's base-seed run (lr<lr>), else the seed of lr<lr>-seed<s>."""
    return run.name.split("-seed", 1)[1] if "-seed" in run.name else "base"


def pooled_pairs(seeds: dict[str, dict[str, Path]], pair: list[str]) -> list[dict[str, float]]:
    """Per seed both methods ran and per update both passed: the two spikes and the paired gap around
    the update (first minus second method, per step, steps u-20 .. u+100 where logged)."""
    first, second = pair
    rows = []
    for seed in sorted(set(seeds[first]) & set(seeds[second])):
        a, b = losses(seeds[first][seed]), losses(seeds[second][seed])
        for u in updates(seeds[first][seed]):
            if u + WINDOW not in a or u + WINDOW not in b:
                continue
            gap = {k: a[u + k] - b[u + k] for k in range(-WINDOW + 1, 101) if u + k in a and u + k in b}
            rows.append({"seed": seed, "u": u, "first": window_difference(a, u), "second": window_difference(b, u),
                         "gap": gap})
    return rows


def sign_test_p(wins: int, n: int) -> float:
    """One-sided binomial p of at least `wins` of `n` under a fair coin."""
    from math import comb

    return sum(comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def print_pooled(rows: list[dict[str, float]], pair: list[str], cold_from: int) -> None:
    first, second = pair
    print()
    print(f"| updates | seeds | pairs | {first} spike (mean) | {second} spike (mean) | difference mean ± s.e. "
          f"| {second} smaller in | sign test p (one-sided) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, chosen in ((f"all", rows), (f"u >= {cold_from} (cold start)", [r for r in rows if r["u"] >= cold_from]),
                          (f"u < {cold_from}", [r for r in rows if r["u"] < cold_from])):
        if not chosen:
            continue
        diffs = [r["first"] - r["second"] for r in chosen]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        wins = sum(d > 0 for d in diffs)
        print(f"| {label} | {len({r['seed'] for r in chosen})} | {len(chosen)} | "
              f"{statistics.fmean(r['first'] for r in chosen):+.4f} | {statistics.fmean(r['second'] for r in chosen):+.4f} | "
              f"{statistics.fmean(diffs):+.4f} ± {se:.4f} | {wins} of {len(chosen)} | {sign_test_p(wins, len(chosen)):.2g} |")


def plot_event_average(rows: list[dict[str, float]], pair: list[str], cold_from: int, path: Path) -> None:
    """The paired gap around an update, averaged over every (seed, update) of the cold-start regime."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, chosen, colour in ((f"updates at u >= {cold_from}", [r for r in rows if r["u"] >= cold_from], "C3"),
                                  (f"updates at u < {cold_from}", [r for r in rows if r["u"] < cold_from], "C0")):
        offsets = sorted(set.intersection(*(set(r["gap"]) for r in chosen))) if chosen else []
        if not offsets:
            continue
        # each update's gap relative to its own 20 steps before, so the slow drift between updates cancels
        centred = [{k: r["gap"][k] - statistics.fmean(r["gap"][j] for j in range(-WINDOW + 1, 1)) for k in offsets}
                   for r in chosen]
        mean = [statistics.fmean(c[k] for c in centred) for k in offsets]
        se = [statistics.stdev(c[k] for c in centred) / len(centred) ** 0.5 if len(centred) > 1 else 0 for k in offsets]
        ax.plot(offsets, mean, color=colour, lw=1.2, label=f"{label} ({len(chosen)} seed x update pairs)")
        ax.fill_between(offsets, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)], color=colour, alpha=0.2)
    ax.axvline(0, color="k", ls=":", lw=0.8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("steps after the topology update")
    ax.set_ylabel(f"loss, {pair[0]} minus {pair[1]} (vs its 20 steps before)")
    ax.set_title("paired gap around an update, mean ± s.e. over seeds and updates", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--output", type=Path, default=Path("docs/figures/smet_spikes.png"))
    parser.add_argument("--dense", default="adamw-dense", help="the run whose same windows are the trend (none: no trend)")
    parser.add_argument("--plot", default="naive-set-d50,smet-none-set-d50",
                        help="methods drawn in the plot (the first two are also paired per update)")
    parser.add_argument("--gap-ylim", type=float, default=0.03,
                        help="y range (+-) of the middle panel, first minus second --plot method")
    parser.add_argument("--cold-from", type=int, default=1000,
                        help="updates at or after this step count as the cold-start regime in the pooled summary")
    args = parser.parse_args()
    # Runs still in progress count too (their metrics.jsonl so far), for the updates they have passed.
    # The base seed's run ("lr<lr>", sorting before "lr<lr>-seed<s>") stands for its method in the
    # single-seed tables and the plot; every seed is paired in the pooled table.
    seeds: dict[str, dict[str, Path]] = {}
    for path in sorted(args.grid.glob("*/lr*/metrics.jsonl")):
        seeds.setdefault(path.parent.parent.name, {})[seed_of(path.parent)] = path.parent
    runs = {method: by_seed[min(by_seed, key=lambda k: (k != "base", k))] for method, by_seed in seeds.items()}
    dense = losses(runs[args.dense]) if args.dense in runs else {}
    table = {}
    print(f"| run | updates | spike per update (after 20 - before 20) | mean spike | dense AdamW, same windows | mean excess |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        steps = updates(run)
        curve = losses(run)
        steps = [u for u in steps if u + WINDOW in curve]
        if not steps:
            continue
        spikes = [window_difference(curve, u) for u in steps]
        trend = [window_difference(dense, u) if dense else 0.0 for u in steps]
        excess = [s - t for s, t in zip(spikes, trend)]
        table[name] = (steps, excess, curve)
        print(f"| {name} | {', '.join(map(str, steps))} | {', '.join(f'{s:+.3f}' for s in spikes)} | "
              f"{statistics.fmean(spikes):+.3f} | {statistics.fmean(trend):+.3f} | {statistics.fmean(excess):+.3f} |")

    chosen = [m for m in args.plot.split(",") if m in table]
    if len(chosen) >= 2:
        (first, second), lr = chosen[:2], learning_rates(runs[chosen[0]])
        a, b = table[first][2], table[second][2]
        print()
        print(f"| update after step u | lr at u+1 | naive AdamW's first step of a regrown weight at t = u+1 (x lr) | "
              f"{first} spike | {second} spike | spike difference | gap {first} - {second}, 20 before / 20 after |")
        print("|---|---|---|---|---|---|---|")
        for u in table[first][0]:
            if u not in table[second][0]:
                continue
            sa, sb = window_difference(a, u), window_difference(b, u)
            before = statistics.fmean(a[s] - b[s] for s in range(u - WINDOW + 1, u + 1))
            after = statistics.fmean(a[s] - b[s] for s in range(u + 1, u + WINDOW + 1))
            print(f"| {u} | {lr.get(u + 1, float('nan')):.2e} | {cold_start_factor(u + 1):.2f} | {sa:+.3f} | {sb:+.3f} | "
                  f"{sa - sb:+.3f} | {before:+.4f} / {after:+.4f} |")

    pooled = pooled_pairs(seeds, chosen[:2]) if len(chosen) >= 2 else None
    if pooled:
        print_pooled(pooled, chosen[:2], args.cold_from)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if pooled:
        plot_event_average(pooled, chosen[:2], args.cold_from, args.output.with_name(args.output.stem + "_pooled.png"))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 4.5))
    if dense:
        left.plot(sorted(dense), [dense[s] for s in sorted(dense)], color="gray", lw=1, label=f"{args.dense} (no topology)")
    for name in chosen:
        steps, _, curve = table[name]
        left.plot(sorted(curve), [curve[s] for s in sorted(curve)], lw=1, label=name)
    for u in table[chosen[0]][0] if chosen else []:
        left.axvline(u, color="k", ls=":", lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_ylim(top=min(8.5, left.get_ylim()[1]))
    left.set_title("training loss; dotted: topology updates")
    left.legend(fontsize=8)
    if len(chosen) >= 2:  # the gap between the first two runs: same init and batches, so common noise cancels
        a, b = table[chosen[0]][2], table[chosen[1]][2]
        steps = sorted(set(a) & set(b))
        gap = [a[s] - b[s] for s in steps]
        smooth = [sum(gap[max(0, i - 9):i + 1]) / len(gap[max(0, i - 9):i + 1]) for i in range(len(gap))]
        middle.plot(steps, gap, color="lightgray", lw=0.8, label="per step")
        middle.plot(steps, smooth, color="C3", lw=1.5, label="10-step mean")
        for u in table[chosen[0]][0]:
            middle.axvline(u, color="k", ls=":", lw=0.8)
        middle.axhline(0, color="k", lw=0.8)
        middle.set_ylim(-args.gap_ylim, args.gap_ylim)
        middle.set_xlabel("step")
        middle.set_ylabel("training loss difference")
        middle.set_title(f"{chosen[0]} minus {chosen[1]}")
        middle.legend(fontsize=8)
    width = 0.8 / max(len(chosen), 1)
    for i, name in enumerate(chosen):
        steps, excess, _ = table[name]
        right.bar([k + i * width for k in range(len(steps))], excess, width=width, label=name)
    if chosen:
        every = max(1, len(table[chosen[0]][0]) // 10)  # at most ~10 labels, so they stay readable
        right.set_xticks([k + width * (len(chosen) - 1) / 2 for k in range(0, len(table[chosen[0]][0]), every)],
                         [str(u) for u in table[chosen[0]][0][::every]])
    right.axhline(0, color="k", lw=0.8)
    right.set_xlabel("topology update at step")
    right.set_ylabel("spike minus dense AdamW's trend (loss)" if dense else "spike (loss)")
    right.set_title(f"mean loss {WINDOW} steps after minus {WINDOW} before")
    right.legend(fontsize=8)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
