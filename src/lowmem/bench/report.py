"""Many runs → the papers' kind of table and plots.

For each method, the learning rate with the lowest validation perplexity over its sweep (the runs at
the grid's base seed) is kept; every seed run at that lr is pooled into mean ± s.d. and [min, max].
Against AdamW a method is "better" or "worse" only when the two seed ranges do not overlap, else a
"tie". A one-seed method's range is its value ± the grid's seed noise: the median relative
half-range of the methods that ran several seeds; when none did, one seed against one seed has no
verdict ("n/a"). The table gives that, every lr tried and
whether the best is bracketed (a point on each side), memory (optimizer-state bytes measured in the
run, the papers' 2 bytes × (weights + states), peak memory) and speed (step time, tokens/s).
Plots: perplexity against optimizer-state memory with the seed range as error bars and the Pareto
front, and the best runs' training-loss curves (smoothed; seeded and one-seed methods in two panels).
`report.json` holds the same numbers for scripts. `collect` is the one reader of a grid's run
directories (`<output>/<method>/<run>`), for the claims, SMET and budget analyses too; `load_best`
reads either a grid or the report.json written there.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lowmem.train.log import format_bytes, read_metrics


def run_dirs(root: str | Path, *, unfinished: bool = False) -> list[Path]:
    """The run directories of a grid (`<root>/<method>/<run>`), sorted: the finished ones (summary.json
    written), or with `unfinished` also those still running (metrics.jsonl so far, no summary yet)."""
    markers = ("summary.json", "metrics.jsonl") if unfinished else ("summary.json",)
    return sorted({path.parent for marker in markers for path in Path(root).glob(f"*/*/{marker}")})


def collect(root: str | Path, *, unfinished: bool = False) -> list[dict[str, Any]]:
    """Every finished run under `root` (a directory holding summary.json and config.yaml): its method
    (the parent directory's name), lr, seed, whether it is an extra seed, `dir`, `config` and the
    summary's fields. With `unfinished`, runs still in progress too, without summary fields."""
    from lowmem.config import load_yaml

    runs = []
    for run_dir in run_dirs(root, unfinished=unfinished):
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        config = load_yaml((run_dir / "config.yaml").read_text())
        runs.append({"method": run_dir.parent.name, "lr": config["optim"]["lr"],
                     "seed": config["train"]["seed"], "extra_seed": "-seed" in run_dir.name,
                     "dir": run_dir, "config": config, **summary})
    return runs


def _ppl(run: dict[str, Any]) -> float:
    value = run["val_perplexity"]
    return value if value is not None and math.isfinite(value) else math.inf


def best_per_method(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: its best sweep run, with `sweep`, `seeds` (perplexities at the best lr, every seed),
    `mean`, `sd`, `low`, `high` and `bracketed` (None for a one-point sweep)."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    best = {}
    for method, group in by_method.items():
        sweep = [r for r in group if not r["extra_seed"]] or group
        chosen = min(sweep, key=_ppl)
        at_best = [_ppl(r) for r in group if r["lr"] == chosen["lr"]]
        lrs = sorted(r["lr"] for r in sweep if r["lr"] is not None)
        finite = [p for p in at_best if math.isfinite(p)] or at_best
        best[method] = {
            **chosen,
            "sweep": sorted((r["lr"], r["val_perplexity"]) for r in sweep if r["lr"] is not None),
            "seeds": at_best,
            "mean": statistics.fmean(finite),
            "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "low": min(finite), "high": max(finite),
            "bracketed": None if len(lrs) < 2 or chosen["lr"] is None else lrs[0] < chosen["lr"] < lrs[-1],
        }
    return best


def load_best(source: str | Path) -> tuple[dict[str, dict[str, Any]], float]:
    """The best run per method and the grid's seed noise, from a grid's output directory or from the
    report.json a report wrote there (as committed in docs/data/, where runs/ is not)."""
    source = Path(source)
    if source.is_file():
        data = json.loads(source.read_text())
        return {method: run for method, run in data.items() if not method.startswith("_")}, data["_seed_noise"]
    best = best_per_method(collect(source))
    return best, seed_noise(best)


def seed_noise(best: dict[str, dict[str, Any]]) -> float:
    """The median relative half-range ((high - low) / 2 / mean) of the methods with several seeds."""
    spreads = [(r["high"] - r["low"]) / 2 / r["mean"] for r in best.values()
               if len(r["seeds"]) > 1 and math.isfinite(r["mean"]) and r["mean"] > 0]
    return statistics.median(spreads) if spreads else 0.0


def interval(run: dict[str, Any], noise: float = 0.0) -> tuple[float, float]:
    """A method's perplexity range: its seeds' [min, max], or one seed's value ± noise (relative)."""
    if len(run["seeds"]) > 1:
        return run["low"], run["high"]
    return run["mean"] * (1 - noise), run["mean"] * (1 + noise)


def verdict(a: dict[str, Any], b: dict[str, Any], noise: float = 0.0) -> str:
    """'better' / 'worse' (lower / higher perplexity) when a's and b's ranges are apart, else 'tie'."""
    (a_low, a_high), (b_low, b_high) = interval(a, noise), interval(b, noise)
    if a_high < b_low:
        return "better"
    if a_low > b_high:
        return "worse"
    return "tie"


def step_seconds(run: dict[str, Any]) -> float:
    return run["tokens"] / run["tokens_per_second"] / max(run["steps"], 1)


def markdown_table(best: dict[str, dict[str, Any]], baseline: str = "adamw") -> str:
    reference = best.get(baseline)
    base_state = reference.get("memory", {}).get("optimizer_state_bytes") if reference else None
    noise = seed_noise(best)

    def ratio(value: float | None, base: float | None) -> str:
        return f"{value / base:.3f}" if value is not None and base else "–"

    lines = [
        "| method | val ppl (mean ± s.d., n) | vs AdamW | verdict | best lr | bracketed | sweep (lr: ppl) "
        "| optimizer state | vs AdamW | papers' GB | peak memory | step time | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    unjudged = False  # a one-seed pair with no seed noise to judge it by
    for method, run in sorted(best.items(), key=lambda kv: kv[1]["mean"]):
        memory = run.get("memory", {})
        state = memory.get("optimizer_state_bytes")
        sweep = ", ".join(f"{lr:g}: {ppl:.2f}" for lr, ppl in run["sweep"]) or "default"
        spread = f"{run['mean']:.2f} ± {run['sd']:.2f} ({len(run['seeds'])})" if len(run["seeds"]) > 1 \
            else f"{run['mean']:.2f} (1)"
        judged = method != baseline and reference is not None
        one_seed_pair = judged and not noise and len(run["seeds"]) == 1 and len(reference["seeds"]) == 1
        unjudged |= one_seed_pair
        cells = [
            method, spread,
            ratio(run["mean"], reference["mean"] if reference else None),
            "—" if not judged else "n/a" if one_seed_pair else verdict(run, reference, noise),
            "default" if run["lr"] is None else f"{run['lr']:g}",
            {None: "—", True: "yes", False: "**no**"}[run["bracketed"]],
            sweep,
            format_bytes(state) if state is not None else "–",
            ratio(state, base_state),
            f"{memory.get('estimate_paper_gb', float('nan')):.4f}",
            format_bytes(memory["peak_bytes"]) if memory.get("peak_bytes") else "–",
            f"{step_seconds(run) * 1e3:.0f} ms",
            f"{run['tokens_per_second']:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"verdict: better / worse than {baseline} when the perplexity ranges do not overlap, else tie; "
                 f"a range is the seeds' [min, max], or one seed's value ± {noise:.1%} (the median relative "
                 "half-range of the methods with several seeds)")
    if unjudged:
        lines.append("n/a: one seed on each side and no seed noise measured (no method's seeds differ), so "
                     "nothing to judge the difference by; give the grid `seeds` to compare")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (memory, perplexity) points no other point beats on both (lower or equal memory and ppl)."""
    front, best_ppl = [], math.inf
    for memory, ppl in sorted(points):
        if ppl < best_ppl:
            front.append((memory, ppl))
            best_ppl = ppl
    return front


def spread_labels(points: list[tuple[float, float]], min_gap: float, x_tolerance: float) -> list[float]:
    """Heights for the points' labels, in the points' own units: a label is pushed up, never down, until
    it is at least `min_gap` from every lower label whose point is within `x_tolerance` in x, so close
    points (fira and apollo, column and sign SGD) get readable labels in their order of height."""
    heights: dict[int, float] = {}
    for i in sorted(range(len(points)), key=lambda k: points[k][1]):
        x, y = points[i]
        moved = True
        while moved:
            moved = False
            for j, h in heights.items():
                # `y < h + min_gap` against the very sum a push assigns, not `abs(h - y) < min_gap`:
                # float rounding can leave that a hair under min_gap, and the label would push forever.
                if abs(points[j][0] - x) < x_tolerance and h - min_gap < y < h + min_gap:
                    y, moved = h + min_gap, True
        heights[i] = y
    return [heights[i] for i in range(len(points))]


def _styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """One colour and marker / line style per method: ten colours, then the next marker and dash, so
    twenty-odd methods stay distinguishable (tab20's pairs of pale and dark shades did not)."""
    import matplotlib.pyplot as plt

    markers, dashes = "osD^v", ["-", "--", ":", "-.", (0, (5, 1, 1, 1))]
    return {m: {"color": plt.cm.tab10(i % 10), "marker": markers[i // 10 % 5], "linestyle": dashes[i // 10 % 5]}
            for i, m in enumerate(sorted(methods))}


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points, so per-step noise does not hide the gaps between methods."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(best: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    styles = _styles(list(best))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    shown = [(m, r) for m, r in best.items() if math.isfinite(r["mean"])]
    points = [(r.get("memory", {}).get("optimizer_state_bytes", 0) / 2**20, r["mean"]) for _, r in shown]
    for (method, run), (state, mean) in zip(shown, points):
        ax.errorbar(state, mean, yerr=[[mean - run["low"]], [run["high"] - mean]], fmt=styles[method]["marker"],
                    ms=5, capsize=3, color=styles[method]["color"])
    front = pareto_front(points)
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="grey", linewidth=0.8, linestyle="--", label="Pareto front")
        ax.legend(fontsize=7)
    if points:
        (x_low, x_high), (y_low, y_high) = ax.get_xlim(), ax.get_ylim()
        heights = spread_labels(points, min_gap=0.032 * (y_high - y_low), x_tolerance=0.14 * (x_high - x_low))
        for (method, _), (state, mean), height in zip(shown, points, heights):
            ax.annotate(method, (state, mean), xytext=(state + 0.012 * (x_high - x_low), height), fontsize=7,
                        va="center", arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5} if height != mean else None)
        ax.set_ylim(y_low, max(y_high, max(heights) + 0.03 * (y_high - y_low)))
    ax.set_xlabel("optimizer state (MiB, measured)")
    ax.set_ylabel("validation perplexity (best lr; bars: seed range)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "perplexity_vs_memory.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Methods with several seeds (a grid's headline ones) and the one-seed rest in two panels, when
    # both kinds exist: twenty curves in one panel cannot be told apart.
    seeded = sorted(m for m, r in best.items() if len(r["seeds"]) > 1)
    single = sorted(m for m in best if m not in seeded)
    panels = [(f"methods with {max(len(best[m]['seeds']) for m in seeded)} seeds (base seed shown)", seeded),
              ("one-seed methods", single)] if seeded and single else [("", sorted(best))]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), sharey=True, squeeze=False)
    window = 10
    for ax, (title, methods) in zip(axes[0], panels):
        for method in methods:
            records = [r for r in read_metrics(Path(best[method]["dir"]) / "metrics.jsonl") if "loss" in r]
            if records:
                style = styles[method]
                ax.plot([r["step"] for r in records], _smoothed([r["loss"] for r in records], window),
                        label=method, linewidth=1.0, color=style["color"], linestyle=style["linestyle"])
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"training loss, mean of the last {window} logged steps (best lr)")
    axes[0][0].set_ylim(top=min(axes[0][0].get_ylim()[1], 8))
    fig.tight_layout()
    paths.append(out_dir / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def grid_cost(root: str | Path, method: str | None = None) -> dict[str, float]:
    """The CPU and wall seconds the bench recorded for the grid's runs, or for one method's (grid-run.json;
    runs written before it was recorded count by their training wall time, summary.json's wall_seconds)."""
    cost = {"runs": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0, "runs_without_cpu_time": 0}
    for run_dir in run_dirs(root):
        if method is not None and run_dir.parent.name != method:
            continue
        cost["runs"] += 1
        record = run_dir / "grid-run.json"
        if record.is_file():
            data = json.loads(record.read_text())
            cost["cpu_seconds"] += data["cpu_seconds"]
            cost["wall_seconds"] += data["wall_seconds"]
        else:
            cost["runs_without_cpu_time"] += 1
            cost["wall_seconds"] += json.loads((run_dir / "summary.json").read_text())["wall_seconds"]
    return cost


def report(root: str | Path) -> str:
    root = Path(root)
    runs = collect(root)
    if not runs:
        return f"no finished runs under {root}"
    best = best_per_method(runs)
    cost = grid_cost(root)
    table = markdown_table(best) + (
        f"\n{cost['runs']} runs; recorded CPU time {cost['cpu_seconds'] / 3600:.2f} h, run wall time "
        f"{cost['wall_seconds'] / 3600:.2f} h" + (f" ({cost['runs_without_cpu_time']} runs without a CPU-time record, "
                                                 "counted by their training wall time only)" if cost["runs_without_cpu_time"] else ""))
    (root / "report.md").write_text(table + "\n")
    keep = ("lr", "sweep", "seeds", "mean", "sd", "low", "high", "bracketed", "memory", "tokens",
            "tokens_per_second", "steps", "wall_seconds")
    noise = seed_noise(best)
    (root / "report.json").write_text(json.dumps(
        {m: {k: r.get(k) for k in keep} | {"step_seconds": step_seconds(r), "interval": interval(r, noise)}
         for m, r in best.items()} | {"_seed_noise": noise, "_grid_cost": cost},
        indent=1, default=str, allow_nan=True) + "\n")
    plot(best, root)
    return table
