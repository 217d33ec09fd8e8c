"""Ranking vs budget (issues 17 and 29): each method's validation perplexity and its ratio to AdamW's,
per training budget, from finished `lowmem bench` grids that differ only in their step count.

A grid's entry per method is the report's (lowmem.bench.report.best_per_method: the best lr of its
sweep, the mean over its seeds there, a diverged run never the best), read from the grid's output
directory or from the report.json committed in its place (docs/data/); its budget is the most training
tokens a run of it saw. `ranking_table` gives per budget every method's perplexity, ratio to the
baseline's and the ranking; `tuned_table` gives per budget and method the best lr (so its drift with
the budget shows), whether the sweep bracketed it, the seeds' mean ± s.d. and range, and the ratio to
the baseline with its range (the seeds' extremes against each other) and the report's verdict (ranges
apart or a tie); the plot draws the ratios against training tokens, seeds' ranges as bars, each
point's best lr beside it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lowmem.bench.report import interval, load_best, verdict


@dataclass(frozen=True)
class BudgetPoint:
    """One grid: its training tokens, the best entry per method and the grid's seed noise."""

    tokens: int
    best: dict[str, dict[str, Any]]
    noise: float

    def perplexity(self) -> dict[str, float]:
        return {method: run["mean"] for method, run in self.best.items()}


def grid_point(source: str | Path) -> BudgetPoint:
    """The budget point of one grid: its output directory, or the report.json written there."""
    best, noise = load_best(source)
    return BudgetPoint(max((run["tokens"] for run in best.values()), default=0), best, noise)


def ranking(sources: Sequence[str | Path], methods: Sequence[str] | None = None) -> list[BudgetPoint]:
    """One point per budget, by training tokens (sources of one budget merged: `_merged`), with only
    `methods` (None: every method); a grid with no
    finished run of them yet (still running) is left out, not drawn at 0 tokens. A grid without seeds has
    no noise of its own: it takes the median noise of those that have (one seed's value is never read as
    exact)."""
    points = _merged([grid_point(s) for s in sources])
    if methods is not None:
        points = [replace(p, best={m: r for m, r in p.best.items() if m in methods}) for p in points]
    points = [p for p in points if p.best]
    measured = [p.noise for p in points if p.noise > 0]
    if measured:
        points = [p if p.noise > 0 else replace(p, noise=statistics.median(measured)) for p in points]
    return sorted(points, key=lambda point: point.tokens)


# Two sources whose token counts differ by less than this share are one budget (the same steps of a
# grid run in pieces: the count of non-pad tokens moves a little with the data a seed draws).
SAME_BUDGET = 0.01


def _merged(points: list[BudgetPoint]) -> list[BudgetPoint]:
    """Points of one budget (a grid finished in pieces: its first report.json and a later directory)
    as one, in the order given: a later source's method replaces an earlier one's, noise the larger."""
    merged: list[BudgetPoint] = []
    for point in points:
        same = next((i for i, m in enumerate(merged) if m.best and point.best
                     and abs(m.tokens - point.tokens) <= SAME_BUDGET * max(m.tokens, point.tokens)), None)
        if same is None:
            merged.append(point)
        else:
            first = merged[same]
            merged[same] = BudgetPoint(max(first.tokens, point.tokens), {**first.best, **point.best},
                                       max(first.noise, point.noise))
    return merged


def ratio_range(run: dict[str, Any], base: dict[str, Any], noise: float = 0.0) -> tuple[float, float, float]:
    """(mean / base mean, lowest, highest): the range puts each one's interval (its seeds' extremes,
    or one seed ± the grid's noise) against the other's."""
    (low, high), (base_low, base_high) = interval(run, noise), interval(base, noise)
    return run["mean"] / base["mean"], low / base_high, high / base_low


def ranking_table(points: list[BudgetPoint], baseline: str = "adamw") -> str:
    methods = sorted({m for point in points for m in point.best})
    lines = ["| training tokens | " + " | ".join(f"{m} ppl (/ {baseline})" for m in methods) + " | ranking |",
             "|---|" + "---|" * (len(methods) + 1)]
    for point in points:
        ppl = point.perplexity()
        base = ppl.get(baseline)
        cells = [f"{ppl[m]:.1f} ({ppl[m] / base:.3f})" if m in ppl and base else "—" for m in methods]
        order = " < ".join(sorted(ppl, key=ppl.get))
        lines.append(f"| {point.tokens:,} | " + " | ".join(cells) + f" | {order} |")
    return "\n".join(lines)


def tuned_table(points: list[BudgetPoint], baseline: str = "adamw") -> str:
    lines = [f"| training tokens | method | best lr | bracketed | sweep (lr: ppl) | val ppl (mean ± s.d., n) "
             f"| / {baseline} [range] | vs {baseline} |",
             "|---|---|---|---|---|---|---|---|"]
    for point in points:
        base = point.best.get(baseline)
        for method, run in sorted(point.best.items(), key=lambda kv: kv[1]["mean"]):
            n = len(run["seeds"])
            ppl = f"{run['mean']:.2f} ± {run['sd']:.2f} ({n})" if n > 1 else f"{run['mean']:.2f} (1)"
            sweep = ", ".join(f"{lr:g}: {p:.1f}" for lr, p in run["sweep"])
            bracketed = {None: "–", True: "yes", False: "**no**"}[run["bracketed"]]
            if base is None or method == baseline:
                against = judged = "–"
            else:
                mean, low, high = ratio_range(run, base, point.noise)
                against, judged = f"{mean:.3f} [{low:.3f}, {high:.3f}]", verdict(run, base, point.noise)
            lines.append(f"| {point.tokens:,} | {method} | {run['lr']:g} | {bracketed} | {sweep} | {ppl} "
                         f"| {against} | {judged} |")
    return "\n".join(lines)


def plot_ranking(points: list[BudgetPoint], path: Path, baseline: str = "adamw", title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for method in sorted({m for point in points for m in point.best}):
        shown = [p for p in points if method in p.best and baseline in p.best]
        if not shown:
            continue
        # The baseline's own bar is its seeds' range about its mean, not that range against itself.
        ratios = [ratio_range(p.best[method], p.best[baseline], p.noise) if method != baseline else
                  (1.0, p.best[method]["low"] / p.best[method]["mean"], p.best[method]["high"] / p.best[method]["mean"])
                  for p in shown]
        tokens = [p.tokens for p in shown]
        seeded = [len(p.best[method]["seeds"]) > 1 and len(p.best[baseline]["seeds"]) > 1 for p in shown]
        line, = ax.plot(tokens, [r[0] for r in ratios], marker="o", label=method)
        for t, (mean, low, high), has_seeds in zip(tokens, ratios, seeded):
            if has_seeds:  # one-seed points would only draw the grid's noise
                ax.errorbar([t], [mean], yerr=[[mean - low], [high - mean]], color=line.get_color(), capsize=3)
        if method != baseline:
            for t, point, (mean, _, _) in zip(tokens, shown, ratios):
                ax.annotate(f"{point.best[method]['lr']:g}", (t, mean), textcoords="offset points", xytext=(4, 3),
                            fontsize=7, color=line.get_color())
    for point in points:  # the baseline's own best lr, along the 1.0 line
        if baseline in point.best:
            ax.annotate(f"{point.best[baseline]['lr']:g}", (point.tokens, 1.0), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"validation perplexity / {baseline}'s")
    ax.axhline(1.0, color="grey", lw=0.8)
    # Log scale: one unstable run (plain SGD stuck on the plateau, ratio ~6) would flatten the rest.
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_title(title or "ranking vs budget\n(cpu-tiny, batch 32 x 128; numbers: each point's best lr; "
                 "bars: seeds' range)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
