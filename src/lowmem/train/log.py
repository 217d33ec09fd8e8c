"""What a run writes for people and tools: metrics.jsonl (and the same records to TensorBoard or
wandb, lowmem.train.sinks), summary.json, the loss-curve PNG, the final table, the progress display."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _lines(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each JSON record of metrics.jsonl text; a line that does not parse (the
    partial last line of a process killed while writing it) is skipped."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl; on resume, drops lines past the step
    (and a partial line left by a kill during a write). Each `sinks` entry (`write(record)`, `close()`)
    receives the same records."""

    def __init__(self, path: Path, resume_step: int | None = None, sinks: list[Any] | None = None) -> None:
        self.path = path
        self.sinks = list(sinks or [])
        if resume_step is not None and path.exists():
            kept = [line for line, r in _lines(path.read_text()) if r.get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class PlainProgress:
    """tqdm's interface for a log file: one plain line per `set_postfix` (the trainer calls it once per
    log interval), printed at the next `update`, instead of a bar redrawn in place."""

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", unit: str = "it", file=None) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.file = file
        self._postfix: dict[str, Any] | None = None

    def set_postfix(self, **values: Any) -> None:
        self._postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._postfix is not None:
            of = f"/{self.total:,}" if self.total else ""
            fields = " ".join(f"{k}={v}" for k, v in self._postfix.items())
            print(f"{self.desc} {self.unit} {self.n:,}{of} {fields}".strip(), file=self.file or sys.stdout, flush=True)
            self._postfix = None

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar when stdout and stderr are terminals, else a PlainProgress; None when not `enabled`."""
    if not enabled:
        return None
    if sys.stdout.isatty() and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return PlainProgress(total, initial=initial, desc=desc, unit=unit)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [record for _, record in _lines(path.read_text())]


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def plot_loss_curve(metrics_path: Path, out_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["val_perplexity"]) for r in records if "val_perplexity" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label="validation perplexity")
        ax2.set_ylabel("validation perplexity")
        ax2.set_yscale("log")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _rate_label(summary: dict[str, Any]) -> str:
    """What the summary's tokens/s covers: the steps after the warm-up ones, or every step."""
    steps = summary.get("tokens_per_second_steps")
    if not steps:  # a summary written before the warm-up steps were left out
        return "tokens/s"
    first, last = steps
    return f"tokens/s ({'steady, ' if summary.get('warmup_steps_excluded') else ''}steps {first}-{last})"


def summary_table(summary: dict[str, Any]) -> str:
    memory = summary.get("memory", {})
    rows = [
        ("validation perplexity", f"{summary['val_perplexity']:.2f}  (start {summary['initial_val_perplexity']:.2f})"),
    ]
    if summary.get("val_legacy_perplexity") is not None:
        rows.append(("legacy perplexity (papers' code)", f"{summary['val_legacy_perplexity']:.2f}"))
    rows += [
        ("tokens trained", f"{summary['tokens']:,}"),
        (_rate_label(summary), f"{summary['tokens_per_second']:,.0f}"),
        ("wall time (training steps)", f"{summary['wall_seconds']:.1f} s"),
    ]
    if summary.get("compiled"):
        rows.append(("first step (compiles blocks and loss)", f"{summary['first_step_seconds']:.1f} s"))
    if "parameter_bytes" in memory:
        rows.append(("weights", format_bytes(memory["parameter_bytes"])))
        rows.append(("optimizer state", format_bytes(memory["optimizer_state_bytes"])))
    if "peak_bytes" in memory:
        rows.append((f"peak memory ({memory.get('peak_measure', 'measured')})", format_bytes(memory["peak_bytes"])))
    if "estimate_paper_gb" in memory:
        rows.append(("papers' memory (2 B x (weights + states))", f"{memory['estimate_paper_gb']:.4f} GB"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{summary['model']} + {summary['optimizer']} on {summary['data']}"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
