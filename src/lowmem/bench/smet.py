"""SMET's grids read into figures: the loss spikes after topology updates, and the perplexity table.

SMET (sparse training with per-block moment handling) claims to remove the loss spike that naive
dynamic sparse training (SET/RigL growth under plain AdamW) shows after each topology update.

Spikes. For every run with a topology intervention and each update step u, the spike is the mean
training loss over steps u+1 .. u+20 minus the mean over u-19 .. u (metrics.jsonl, log_every 1). The
loss falls anyway, so the same windows of a dense AdamW run (no topology) are the trend, and
"excess" = spike - the trend. Two methods run with the same initialization and batches are paired
per update, so their common noise cancels: `pooled_pairs` gives, per seed both ran and per update,
the two spikes and the gap (first minus second) around it; `pooled_table` summarizes them with a
one-sided sign test, apart for the updates before and after the cold-start step. The first step of a
regrown weight under naive AdamW at tensor step t (m = v = 0 before it) is
lr * (1-b1)/(1-b1^t) / sqrt((1-b2)/(1-b2^t)) * sign(g), b1 = 0.9, b2 = 0.999 (`cold_start_factor`).

Table. One row per run of a finished configs/smet-cpu.yaml grid: density, optimizer, growth (SET =
random, RigL = gradient), SMET's density_lr, validation perplexity, its ratio to the dense AdamW run
(adamw-dense/lr0.001) and the optimizer state the run measured.
"""

from __future__ import annotations

import statistics
from math import comb
from pathlib import Path
from typing import Any

from lowmem.bench.report import collect
from lowmem.errors import DataError
from lowmem.train.log import read_metrics

WINDOW = 20
BETA1, BETA2 = 0.9, 0.999  # lowmem's AdamW defaults


def cold_start_factor(t: int) -> float:
    """A regrown weight's first AdamW step at tensor step t (m = v = 0 before it), in units of lr."""
    return (1 - BETA1) / (1 - BETA1**t) / ((1 - BETA2) / (1 - BETA2**t)) ** 0.5


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def learning_rates(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "lr" in r}


def updates(config: dict[str, Any]) -> list[int]:
    """The steps after which a run's topology intervention updates, with a full window on each side."""
    steps = config["train"]["steps"]
    for spec in config["optim"].get("interventions", []):
        if spec["name"] == "topology":
            return [s for s in range(spec["every"], steps, spec["every"]) if s + WINDOW <= steps and s - WINDOW >= 0]
    return []


def window_difference(curve: dict[int, float], u: int) -> float:
    after = [curve[s] for s in range(u + 1, u + WINDOW + 1)]
    before = [curve[s] for s in range(u - WINDOW + 1, u + 1)]
    return statistics.fmean(after) - statistics.fmean(before)


def seed_of(run_dir: Path) -> str:
    """'base' for the grid's base-seed run (lr<lr>), else the seed of lr<lr>-seed<s>."""
    return run_dir.name.split("-seed", 1)[1] if "-seed" in run_dir.name else "base"


def runs_by_seed(grid: str | Path, *, unfinished: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """{method: {seed: run}} of a grid's runs (lowmem.bench.report.collect's records)."""
    seeds: dict[str, dict[str, dict[str, Any]]] = {}
    for run in collect(grid, unfinished=unfinished):
        seeds.setdefault(run["method"], {})[seed_of(run["dir"])] = run
    return seeds


def pooled_pairs(seeds: dict[str, dict[str, dict[str, Any]]], pair: list[str]) -> list[dict[str, Any]]:
    """Per seed both methods ran and per update both passed: the two spikes and the paired gap around
    the update (first minus second method, per step, steps u-20 .. u+100 where logged)."""
    first, second = pair
    rows = []
    for seed in sorted(set(seeds[first]) & set(seeds[second])):
        a, b = losses(seeds[first][seed]["dir"]), losses(seeds[second][seed]["dir"])
        for u in updates(seeds[first][seed]["config"]):
            if u + WINDOW not in a or u + WINDOW not in b:
                continue
            gap = {k: a[u + k] - b[u + k] for k in range(-WINDOW + 1, 101) if u + k in a and u + k in b}
            rows.append({"seed": seed, "u": u, "first": window_difference(a, u), "second": window_difference(b, u),
                         "gap": gap})
    return rows


def sign_test_p(wins: int, n: int) -> float:
    """One-sided binomial p of at least `wins` of `n` under a fair coin."""
    return sum(comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def pooled_table(rows: list[dict[str, Any]], pair: list[str], cold_from: int) -> str:
    """The paired spikes pooled over seeds and updates: all, the cold-start regime and before it."""
    first, second = pair
    lines = [f"| updates | seeds | pairs | {first} spike (mean) | {second} spike (mean) | difference mean ± s.e. "
             f"| {second} smaller in | sign test p (one-sided) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, chosen in (("all", rows), (f"u >= {cold_from} (cold start)", [r for r in rows if r["u"] >= cold_from]),
                          (f"u < {cold_from}", [r for r in rows if r["u"] < cold_from])):
        if not chosen:
            continue
        diffs = [r["first"] - r["second"] for r in chosen]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        wins = sum(d > 0 for d in diffs)
        lines.append(f"| {label} | {len({r['seed'] for r in chosen})} | {len(chosen)} | "
                     f"{statistics.fmean(r['first'] for r in chosen):+.4f} | "
                     f"{statistics.fmean(r['second'] for r in chosen):+.4f} | "
                     f"{statistics.fmean(diffs):+.4f} ± {se:.4f} | {wins} of {len(chosen)} | "
                     f"{sign_test_p(wins, len(chosen)):.2g} |")
    return "\n".join(lines)


def plot_event_average(rows: list[dict[str, Any]], pair: list[str], cold_from: int, path: Path) -> Path:
    """The paired gap around an update, averaged over every (seed, update) of the cold-start regime."""
    import matplotlib

    matplotlib.use("Agg")
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
    plt.close(fig)
    return path


def spike_report(grid: str | Path, output: Path, dense: str = "adamw-dense",
                 plot: tuple[str, ...] = ("naive-set-d50", "smet-none-set-d50"), gap_ylim: float = 0.03,
                 cold_from: int = 1000) -> tuple[str, list[Path]]:
    """The spike tables of a grid (finished or still running) and the plots written: the pooled
    event average (when the first two `plot` methods share seeds) and the three-panel `output`."""
    # Runs still in progress count too (their metrics.jsonl so far), for the updates they have passed.
    # The base seed's run ("lr<lr>", sorting before "lr<lr>-seed<s>") stands for its method in the
    # single-seed tables and the plot; every seed is paired in the pooled table.
    seeds = runs_by_seed(grid, unfinished=True)
    runs = {method: by_seed[min(by_seed, key=lambda k: (k != "base", k))] for method, by_seed in seeds.items()}
    trend = losses(runs[dense]["dir"]) if dense in runs else {}
    table = {}
    lines = ["| run | updates | spike per update (after 20 - before 20) | mean spike | dense AdamW, same windows "
             "| mean excess |",
             "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        curve = losses(run["dir"])
        steps = [u for u in updates(run["config"]) if u + WINDOW in curve]
        if not steps:
            continue
        spikes = [window_difference(curve, u) for u in steps]
        same_windows = [window_difference(trend, u) if trend else 0.0 for u in steps]
        excess = [s - t for s, t in zip(spikes, same_windows)]
        table[name] = (steps, excess, curve)
        lines.append(f"| {name} | {', '.join(map(str, steps))} | {', '.join(f'{s:+.3f}' for s in spikes)} | "
                     f"{statistics.fmean(spikes):+.3f} | {statistics.fmean(same_windows):+.3f} | "
                     f"{statistics.fmean(excess):+.3f} |")

    chosen = [m for m in plot if m in table]
    if len(chosen) >= 2:
        (first, second), lr = chosen[:2], learning_rates(runs[chosen[0]]["dir"])
        a, b = table[first][2], table[second][2]
        lines += ["", f"| update after step u | lr at u+1 | naive AdamW's first step of a regrown weight at t = u+1 "
                      f"(x lr) | {first} spike | {second} spike | spike difference | gap {first} - {second}, "
                      "20 before / 20 after |",
                  "|---|---|---|---|---|---|---|"]
        for u in table[first][0]:
            if u not in table[second][0]:
                continue
            sa, sb = window_difference(a, u), window_difference(b, u)
            before = statistics.fmean(a[s] - b[s] for s in range(u - WINDOW + 1, u + 1))
            after = statistics.fmean(a[s] - b[s] for s in range(u + 1, u + WINDOW + 1))
            lines.append(f"| {u} | {lr.get(u + 1, float('nan')):.2e} | {cold_start_factor(u + 1):.2f} | {sa:+.3f} | "
                         f"{sb:+.3f} | {sa - sb:+.3f} | {before:+.4f} / {after:+.4f} |")

    pooled = pooled_pairs(seeds, chosen[:2]) if len(chosen) >= 2 else None
    written = []
    if pooled:
        lines += ["", pooled_table(pooled, chosen[:2], cold_from)]
        written.append(plot_event_average(pooled, chosen[:2], cold_from, output.with_name(output.stem + "_pooled.png")))
    written.append(_plot_spikes(table, chosen, trend, dense, gap_ylim, output))
    return "\n".join(lines), written


def _plot_spikes(table: dict[str, tuple[list[int], list[float], dict[int, float]]], chosen: list[str],
                 trend: dict[int, float], dense: str, gap_ylim: float, output: Path) -> Path:
    """Three panels: the training loss around the updates, the first two runs' gap, the excess per update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 4.5))
    if trend:
        left.plot(sorted(trend), [trend[s] for s in sorted(trend)], color="gray", lw=1, label=f"{dense} (no topology)")
    for name in chosen:
        _, _, curve = table[name]
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
        middle.set_ylim(-gap_ylim, gap_ylim)
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
    right.set_ylabel("spike minus dense AdamW's trend (loss)" if trend else "spike (loss)")
    right.set_title(f"mean loss {WINDOW} steps after minus {WINDOW} before")
    right.legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def perplexity_table(grid: str | Path) -> str:
    """The SMET section's table of docs/results.md from a finished configs/smet-cpu.yaml grid."""
    runs = collect(grid)
    reference = [r for r in runs if r["method"] == "adamw-dense" and r["dir"].name == "lr0.001"]
    if not reference:
        raise DataError(f"no finished adamw-dense/lr0.001 run under {grid}: the table's ratios are to that run "
                        "(configs/smet-cpu.yaml runs it)")
    dense = reference[0]["val_perplexity"]
    rows = []
    for run in runs:
        config = run["config"]
        model = config["model"]
        structure = model.get("structure") if isinstance(model, dict) else None
        density = structure["density"] if structure else 1.0
        topology = [i for i in config["optim"].get("interventions", []) if i["name"] == "topology"]
        growth = {"random": "SET", "gradient": "RigL"}[topology[0]["grow"]] if topology else "—"
        rule = config["optim"]["hparams"].get("density_lr", "—")
        rows.append((density, run["method"], config["optim"]["name"], growth, rule, run["val_perplexity"],
                     run["memory"]["optimizer_state_bytes"], run["tokens"]))
    rows.sort(key=lambda r: (-r[0], r[5]))
    lines = ["| run | d | optimizer | growth | density_lr | val ppl | vs dense AdamW | optimizer state (measured) |",
             "|---|---|---|---|---|---|---|---|"]
    for density, name, optimizer, growth, rule, ppl, state, _ in rows:
        lines.append(f"| {name} | {density} | {optimizer} | {growth} | {rule} | {ppl:.2f} | {ppl / dense:.3f} | "
                     f"{state / 2**20:.2f} MiB |")
    lines.append(f"\ntokens per run: {sorted({r[7] for r in rows})}")
    return "\n".join(lines)
