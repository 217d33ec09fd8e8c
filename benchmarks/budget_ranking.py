"""Ranking vs budget (issue 17): each method's validation perplexity and its ratio to AdamW's, per
training budget, from finished `lowmem bench` grids that differ only in their step count.

    lowmem bench configs/budget/steps125.yaml --output runs/budget/steps125 --workers 2   # and 250, 500
    python benchmarks/budget_ranking.py runs/budget/steps125 runs/budget/steps250 runs/budget/steps500 \
        --plot docs/figures/ranking_vs_budget.png

Prints a markdown table (tokens, then per method: perplexity and ratio to AdamW) and the ranking at
each budget; with --plot, draws the ratios against training tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def best_per_method(grid_dir: Path) -> tuple[int, dict[str, float]]:
    """(training tokens of the grid's runs, {method: best validation perplexity}) of one grid."""
    best: dict[str, float] = {}
    tokens = 0
    for summary_path in sorted(grid_dir.glob("*/*/summary.json")):
        summary = json.loads(summary_path.read_text())
        method = summary_path.parent.parent.name
        tokens = max(tokens, summary["tokens"])
        best[method] = min(best.get(method, float("inf")), summary["val_perplexity"])
    return tokens, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="+", type=Path)
    parser.add_argument("--baseline", default="adamw")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    rows = sorted((best_per_method(g) for g in args.grids), key=lambda r: r[0])
    methods = sorted({m for _, best in rows for m in best})
    print("| training tokens | " + " | ".join(f"{m} ppl (/ {args.baseline})" for m in methods) + " | ranking |")
    print("|---|" + "---|" * (len(methods) + 1))
    for tokens, best in rows:
        base = best.get(args.baseline)
        cells = [f"{best[m]:.1f} ({best[m] / base:.3f})" if m in best and base else "—" for m in methods]
        ranking = " < ".join(sorted(best, key=best.get))
        print(f"| {tokens:,} | " + " | ".join(cells) + f" | {ranking} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m in methods:
            points = [(t, b[m] / b[args.baseline]) for t, b in rows if m in b and args.baseline in b]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"validation perplexity / {args.baseline}'s")
        ax.axhline(1.0, color="grey", lw=0.8)
        # Log scale: one unstable run (plain SGD stuck on the plateau, ratio ~6) would flatten the rest.
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_title("ranking vs budget\n(cpu-tiny, batch 32 x 128, best of the listed lrs, one seed)", fontsize=10)
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
