"""8-bit vs full-precision optimizer states at the loss level (issue 26): from a finished grid of
configs/state_bits/quality-2m.yaml (each method and its `-8bit` twin, 3 seeds at the method's tuned lr;
AdamW 8-bit also with the momentum reset, `adamw-8bit-reset`), per pair the seeds' mean ± s.d., the
relative difference of the means, and the report's verdict (seed ranges apart or a tie).

    lowmem bench configs/state_bits/quality-2m.yaml --output runs/state-bits-quality --workers 2
    python benchmarks/state_bits_quality.py runs/state-bits-quality

The runs' CPU seconds per 1M tokens are printed too (grid-run.json): the 8-bit quantizer's cost in a
real run, not only in an optimizer step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowmem.bench.report import best_per_method, collect, grid_cost, verdict

VARIANTS = ("-8bit", "-8bit-reset")


def cpu_seconds_per_million(grid: Path, method: str, runs: list[dict]) -> float | None:
    """The method's recorded CPU seconds over its runs' training tokens, per 1M (None: no record)."""
    cost = grid_cost(grid, method)
    tokens = sum(run["tokens"] for run in runs if run["method"] == method)
    return cost["cpu_seconds"] / tokens * 1e6 if tokens and not cost["runs_without_cpu_time"] else None


def pair_table(grid: Path) -> str:
    runs = collect(grid)
    best = best_per_method(runs)
    lines = ["| method | states | lr | val ppl (mean ± s.d., n) | seeds | vs full precision | verdict "
             "| CPU-s per 1M tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for method in sorted(m for m in best if not m.endswith(VARIANTS)):
        full = best[method]
        for variant in ("", *VARIANTS):
            run = best.get(method + variant)
            if run is None:
                continue
            n = len(run["seeds"])
            seeds = ", ".join(f"{p:.2f}" for p in run["seeds"])
            diff = "–" if not variant else f"{run['mean'] / full['mean'] - 1:+.2%}"
            judged = "–" if not variant else verdict(run, full)
            cost = cpu_seconds_per_million(grid, method + variant, runs)
            lines.append(f"| {method} | {variant.lstrip('-') or 'full'} | {run['lr']:g} | {run['mean']:.2f} ± "
                         f"{run['sd']:.2f} ({n}) | {seeds} | {diff} | {judged} | "
                         f"{'–' if cost is None else f'{cost:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path)
    print(pair_table(parser.parse_args().grid))


if __name__ == "__main__":
    main()
