"""Ranking vs budget (issues 17 and 29): each method's validation perplexity and its ratio to AdamW's,
per training budget, from finished `lowmem bench` grids that differ only in their step count (an
output directory, or the report.json a grid's report wrote, as committed in docs/data/). Sources of one
budget (a grid finished in pieces: its committed report.json, then a directory with the rest) merge
into one point, a later source's method replacing an earlier one's.

    lowmem bench configs/budget/steps125.yaml --output runs/budget/steps125 --workers 2   # and 250, 500
    python benchmarks/budget_ranking.py runs/budget/steps125 runs/budget/steps250 runs/budget/steps500 \
        --plot docs/figures/ranking_vs_budget.png

Prints a markdown table (tokens, then per method: perplexity and ratio to AdamW) and the ranking at
each budget; with --tuned, the long table of each budget's best lr, bracketing, seeds and ratio range
(issue 29's tuned grids); with --plot, draws the ratios against training tokens. The analysis:
lowmem.bench.budget.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowmem.bench.budget import plot_ranking, ranking, ranking_table, tuned_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="+", type=Path)
    parser.add_argument("--baseline", default="adamw")
    parser.add_argument("--methods", help="comma-separated: only these methods (default: every one)")
    parser.add_argument("--tuned", action="store_true", help="also print the per-budget best lr, seeds and ranges")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else None
    points = ranking(args.grids, methods)
    empty = [str(grid) for grid in args.grids if not ranking([grid], methods)]
    if empty:
        print(f"no finished run of these methods yet, left out: {', '.join(empty)}\n")
    print(ranking_table(points, args.baseline))
    if args.tuned:
        print()
        print(tuned_table(points, args.baseline))
    if args.plot:
        print(f"plot: {plot_ranking(points, args.plot, args.baseline)}")


if __name__ == "__main__":
    main()
