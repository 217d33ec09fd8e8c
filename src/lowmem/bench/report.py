"""Many runs → the papers' kind of table and plots.

For each method, the run with the lowest validation perplexity over its learning-rate sweep is
kept; the table gives its perplexity, the ratio to AdamW's best, every LR tried, throughput and
memory (optimizer-state bytes measured in the run, and the papers' 2 bytes × (weights + states)).
Plots: perplexity against optimizer-state memory, and the best runs' training-loss curves.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from lowmem.train.log import format_bytes, read_metrics


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Every finished run under `root` (a directory holding summary.json and grid-config.yaml)."""
    from lowmem.config import load_yaml

    runs = []
    for summary_path in sorted(Path(root).glob("*/*/summary.json")):
        summary = json.loads(summary_path.read_text())
        config = load_yaml((summary_path.parent / "config.yaml").read_text())
        runs.append({"method": summary_path.parent.parent.name, "lr": config["optim"]["lr"],
                     "dir": summary_path.parent, **summary})
    return runs


def best_per_method(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    best = {}
    for method, group in by_method.items():
        finite = [r for r in group if r["val_perplexity"] == r["val_perplexity"]]
        chosen = min(finite or group, key=lambda r: r["val_perplexity"])
        best[method] = {**chosen, "sweep": sorted((r["lr"], r["val_perplexity"]) for r in group if r["lr"] is not None)}
    return best


def markdown_table(best: dict[str, dict[str, Any]], baseline: str = "adamw") -> str:
    reference = best.get(baseline)

    def ratio(value: float | None, base: float | None) -> str:
        return f"{value / base:.3f}" if value is not None and base else "–"

    lines = [
        "| method | val ppl | vs AdamW | best lr | sweep (lr: ppl) | tokens/s | optimizer state | vs AdamW | papers' GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, run in sorted(best.items(), key=lambda kv: kv[1]["val_perplexity"]):
        state = run.get("memory", {}).get("optimizer_state_bytes")
        base_state = reference.get("memory", {}).get("optimizer_state_bytes") if reference else None
        sweep = ", ".join(f"{lr:g}: {ppl:.2f}" for lr, ppl in run["sweep"]) or "default"
        cells = [
            method,
            f"{run['val_perplexity']:.2f}",
            ratio(run["val_perplexity"], reference["val_perplexity"] if reference else None),
            "default" if run["lr"] is None else f"{run['lr']:g}",
            sweep,
            f"{run['tokens_per_second']:,.0f}",
            format_bytes(state) if state is not None else "–",
            ratio(state, base_state),
            f"{run.get('memory', {}).get('estimate_paper_gb', float('nan')):.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(best: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # One colour per method in both plots (the default cycle repeats after ten).
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(sorted(best))}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, run in best.items():
        state = run.get("memory", {}).get("optimizer_state_bytes", 0)
        ax.scatter(state / 2**20, run["val_perplexity"], s=40, color=colours[method])
        ax.annotate(method, (state / 2**20, run["val_perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("optimizer state (MiB, measured)")
    ax.set_ylabel("validation perplexity (best lr)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "perplexity_vs_memory.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, run in sorted(best.items()):
        records = [r for r in read_metrics(Path(run["dir"]) / "metrics.jsonl") if "loss" in r]
        if records:
            ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=method, linewidth=1,
                    color=colours[method])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], 8))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def report(root: str | Path) -> str:
    root = Path(root)
    runs = collect(root)
    if not runs:
        return f"no finished runs under {root}"
    best = best_per_method(runs)
    table = markdown_table(best)
    (root / "report.md").write_text(table + "\n")
    plot(best, root)
    return table
