"""The papers' claims, judged one by one from a finished `lowmem bench` grid (issue 17).

The claims are the SCALE paper's (within a few percent of AdamW at 35-45% of its memory; column
normalization far better than SGD, worse than SCALE; sign and row normalization worse than column),
Fira's and APOLLO's (at or below GaLore; APOLLO-Mini close to APOLLO), Stable-SPAM's (at or below
AdamW), low-rank training with restarts (better than without) and SMET's (removes naive dynamic
sparse training's loss spikes). Each is read from the grid's best lr per method with seeds pooled
(lowmem.bench.report; one-seed methods widened by the grid's seed noise) into a verdict:
"reproduced", "not reproduced", or "not resolvable at this budget" (the two ranges overlap where the
claim needs a difference). A method the grid has not run reads "not run". A verdict resting on a
sweep whose best lr is not bracketed is marked provisional. The SMET claim is judged on the paired
spike differences of a spike grid (lowmem.bench.smet): reproduced when SMET's spike is smaller in
most updates and the one-sided sign test gives p < 0.01, apart for the updates before and after the
cold-start step (1000).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowmem.bench.report import interval, load_best, verdict
from lowmem.bench.smet import pooled_pairs, runs_by_seed, sign_test_p

CLOSE = 0.05  # "within a few percent" / "close to": a ratio of mean perplexities within 5%


def fmt(run: dict[str, Any]) -> str:
    n = len(run["seeds"])
    return f"{run['mean']:.1f}" + (f" ± {run['sd']:.1f} ({n} seeds)" if n > 1 else " (1 seed)")


def claims(best: dict[str, dict[str, Any]], noise: float) -> list[tuple[str, str, str]]:
    """(claim, numbers, verdict) per claim, from the best run per method and the grid's seed noise."""
    rows = []

    def have(*methods: str) -> bool:
        return all(m in best for m in methods)

    def missing(*methods: str) -> str:
        return "not run: " + ", ".join(m for m in methods if m not in best)

    def provisional(*methods: str) -> str:
        """A verdict resting on a sweep whose best lr is not bracketed (an end point, or one lr) may move."""
        loose = [m for m in methods if best[m].get("bracketed") is not True]
        return f" (provisional: {', '.join(loose)} not bracketed)" if loose else ""

    def compare(claim: str, a: str, b: str, want: str, ties_count: bool) -> None:
        """`want`: 'better' (a below b) or 'worse'; ties_count: a tie satisfies the claim ("at or below")."""
        if not have(a, b):
            rows.append((claim, "", missing(a, b)))
            return
        v = verdict(best[a], best[b], noise)
        numbers = f"{a} {fmt(best[a])} vs {b} {fmt(best[b])}: ratio {best[a]['mean'] / best[b]['mean']:.3f}, {v}"
        if v == want or (ties_count and v == "tie"):
            result = "reproduced"
        elif v == "tie":
            result = "not resolvable at this budget"
        else:
            result = "not reproduced"
        rows.append((claim, numbers, result + provisional(a, b)))

    def close(claim: str, a: str, b: str) -> None:
        if not have(a, b):
            rows.append((claim, "", missing(a, b)))
            return
        ratio = best[a]["mean"] / best[b]["mean"]
        v = verdict(best[a], best[b], noise)
        numbers = f"{a} {fmt(best[a])} vs {b} {fmt(best[b])}: ratio {ratio:.3f}, {v}"
        ok = abs(ratio - 1) <= CLOSE or v == "tie"
        rows.append((claim, numbers, ("reproduced" if ok else f"not reproduced ({a} {'below' if ratio < 1 else 'above'})")
                     + provisional(a, b)))

    if have("scale", "adamw"):
        ratio = best["scale"]["mean"] / best["adamw"]["mean"]
        v = verdict(best["scale"], best["adamw"], noise)
        gb = best["scale"]["memory"]["estimate_paper_gb"] / best["adamw"]["memory"]["estimate_paper_gb"]
        numbers = (f"scale {fmt(best['scale'])} vs adamw {fmt(best['adamw'])}: ratio {ratio:.3f}, {v}; "
                   f"papers' memory {gb:.0%} of AdamW's")
        ok = abs(ratio - 1) <= CLOSE or v == "tie"
        why = "" if ok else (" (SCALE far below AdamW: a budget where AdamW lags)" if ratio < 1 else " (SCALE worse)")
        rows.append(("SCALE within a few percent of AdamW at 35–45% of its memory", numbers,
                     ("reproduced" if ok else "not reproduced") + why + "; memory: see the note"))
    else:
        rows.append(("SCALE within a few percent of AdamW at 35–45% of its memory", "", missing("scale", "adamw")))
    compare("column-normalized SGD far better than SGD", "sgd-column", "sgd", "better", False)
    compare("column-normalized SGD worse than SCALE", "sgd-column", "scale", "worse", False)
    compare("sign normalization worse than column", "sgd-sign", "sgd-column", "worse", False)
    compare("row normalization worse than column", "sgd-row", "sgd-column", "worse", False)
    compare("Fira at or below GaLore", "fira", "galore", "better", True)
    compare("APOLLO at or below GaLore", "apollo", "galore", "better", True)
    close("APOLLO-Mini close to APOLLO", "apollo-mini", "apollo")
    compare("Stable-SPAM at or below AdamW", "stable-spam", "adamw", "better", True)
    compare("restarts improve low-rank training", "lowrank-restarts", "lowrank", "better", False)
    return rows


def spike_claim(grid: str | Path, cold_from: int = 1000) -> tuple[str, str, str]:
    """The SMET claim on one spike grid's finished runs, judged apart for the updates before and after
    `cold_from` (early: large drop fractions and lr; late: the first-step arithmetic's 2.5-3x regime)."""
    seeds = runs_by_seed(grid)
    naive = next((m for m in seeds if m.startswith("naive")), None)
    smet = next((m for m in seeds if m.startswith("smet")), None)
    claim = f"SMET removes the loss spikes of naive DST ({Path(grid).name})"
    if not naive or not smet:
        return claim, "", f"not run: no finished naive/smet runs under {grid}"
    rows = pooled_pairs(seeds, [naive, smet])
    parts, holds = [], []
    for label, chosen in ((f"u < {cold_from}", [r for r in rows if r["u"] < cold_from]),
                          (f"u >= {cold_from}", [r for r in rows if r["u"] >= cold_from])):
        diffs = [r["first"] - r["second"] for r in chosen]
        if not diffs:
            continue
        wins = sum(d > 0 for d in diffs)
        p = sign_test_p(wins, len(diffs))
        holds.append((label, wins > len(diffs) / 2 and p < 0.01))
        parts.append(f"{label}: naive − SMET {statistics.fmean(diffs):+.4f}, SMET smaller in {wins} of {len(diffs)} (p = {p:.2g})")
    numbers = f"{len({r['seed'] for r in rows})} seeds; " + "; ".join(parts)
    if all(ok for _, ok in holds):
        verdict_text = "reproduced"
    elif any(ok for _, ok in holds):
        verdict_text = "reproduced for " + ", ".join(label for label, ok in holds if ok) + " only"
    else:
        verdict_text = "not reproduced"
    return claim, numbers, verdict_text


def claims_report(grid: str | Path | Sequence[str | Path], spike_grids: Sequence[str | Path] = ()) -> str:
    """The grid's seed noise and ranges, then a markdown table of every claim; `grid` is a grid's
    output directory or its report.json, or several of one budget (a grid run in pieces: a later
    source's method replaces an earlier one's, the noise is the largest)."""
    best, noise = {}, 0.0
    for source in [grid] if isinstance(grid, (str, Path)) else grid:
        more, more_noise = load_best(source)
        best.update(more)
        noise = max(noise, more_noise)
    rows = claims(best, noise)
    rows.extend(spike_claim(spikes) for spikes in spike_grids)
    ranges = ", ".join(f"{m} [{lo:.1f}, {hi:.1f}]" for m, (lo, hi) in sorted((m, interval(r, noise)) for m, r in best.items()))
    lines = [f"seed noise (median relative half-range of the seeded methods): {noise:.2%}; ranges: {ranges}", "",
             "| claim | numbers (validation perplexity, best lr) | verdict |",
             "|---|---|---|"]
    lines += [f"| {claim} | {numbers} | {result} |" for claim, numbers, result in rows]
    return "\n".join(lines)
