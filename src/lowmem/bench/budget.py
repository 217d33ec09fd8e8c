"""Ranking vs budget (issue 17): each method's validation perplexity and its ratio to AdamW's, per
training budget, from finished `lowmem bench` grids that differ only in their step count.

A grid's perplexity per method is the report's (lowmem.bench.report.best_per_method: the best lr of
its sweep, the mean over its seeds there, a diverged run never the best); its budget is the most
training tokens a run of it saw. The table gives, per budget, every method's perplexity and ratio to
the baseline's and the ranking; the plot draws the ratios against training tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lowmem.bench.report import best_per_method, collect


def grid_point(grid: str | Path) -> tuple[int, dict[str, float]]:
    """(training tokens of the grid's runs, {method: validation perplexity at its best lr}) of one grid."""
    runs = collect(grid)
    return max((run["tokens"] for run in runs), default=0), {m: r["mean"] for m, r in best_per_method(runs).items()}


def ranking(grids: Sequence[str | Path]) -> list[tuple[int, dict[str, float]]]:
    """One grid point per grid, by training tokens."""
    return sorted((grid_point(g) for g in grids), key=lambda point: point[0])


def ranking_table(points: list[tuple[int, dict[str, float]]], baseline: str = "adamw") -> str:
    methods = sorted({m for _, best in points for m in best})
    lines = ["| training tokens | " + " | ".join(f"{m} ppl (/ {baseline})" for m in methods) + " | ranking |",
             "|---|" + "---|" * (len(methods) + 1)]
    for tokens, best in points:
        base = best.get(baseline)
        cells = [f"{best[m]:.1f} ({best[m] / base:.3f})" if m in best and base else "—" for m in methods]
        order = " < ".join(sorted(best, key=best.get))
        lines.append(f"| {tokens:,} | " + " | ".join(cells) + f" | {order} |")
    return "\n".join(lines)


def plot_ranking(points: list[tuple[int, dict[str, float]]], path: Path, baseline: str = "adamw") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in sorted({m for _, best in points for m in best}):
        ratios = [(t, b[m] / b[baseline]) for t, b in points if m in b and baseline in b]
        ax.plot([p[0] for p in ratios], [p[1] for p in ratios], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"validation perplexity / {baseline}'s")
    ax.axhline(1.0, color="grey", lw=0.8)
    # Log scale: one unstable run (plain SGD stuck on the plateau, ratio ~6) would flatten the rest.
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_title("ranking vs budget\n(cpu-tiny, batch 32 x 128, best of the listed lrs, one seed)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
