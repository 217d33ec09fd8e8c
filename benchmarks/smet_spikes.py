"""Loss spikes after topology updates, naive AdamW vs SMET, from a finished (or running) grid.

    PYTHONPATH=src python benchmarks/smet_spikes.py runs/smet-cpu --output docs/figures/smet_spikes.png
    PYTHONPATH=src python benchmarks/smet_spikes.py runs/smet-spikes --dense none
    PYTHONPATH=src python benchmarks/smet_spikes.py runs/smet-spikes-long --dense none \
        --output docs/figures/smet_spikes_long.png --gap-ylim 0.1

For every run of the grid with a topology intervention and each update step u: the spike is the mean
training loss over steps u+1 .. u+20 minus the mean over u-19 .. u (metrics.jsonl, log_every 1). The
loss falls anyway, so the same windows of the dense AdamW run (no topology) are printed beside it as
the trend, and "excess" = spike - dense AdamW's difference over the same windows. Writes a three-panel
plot: the training loss around the updates, the first two --plot runs' gap, and the excess per update.

A second table pairs the first two --plot methods per update (same initialization and batches, so
their common noise cancels): lr at the update, the first step of a regrown weight under naive AdamW
at that tensor step t = u + 1 (m = v = 0, so it is lr * (1-b1)/(1-b1^t) / sqrt((1-b2)/(1-b2^t)) * sign(g),
b1 = 0.9, b2 = 0.999), each run's spike, and the gap (first minus second) over the 20 steps before and after.
A third pools the pair over every seed and update (sign test), with its event-average plot beside
--output (`*_pooled.png`). The analysis: lowmem.bench.smet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowmem.bench.smet import spike_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--output", type=Path, default=Path("docs/figures/smet_spikes.png"))
    parser.add_argument("--dense", default="adamw-dense", help="the run whose same windows are the trend (none: no trend)")
    parser.add_argument("--plot", default="naive-set-d50,smet-none-set-d50",
                        help="methods drawn in the plot (the first two are also paired per update)")
    parser.add_argument("--gap-ylim", type=float, default=0.03,
                        help="y range (+-) of the middle panel, first minus second --plot method")
    parser.add_argument("--cold-from", type=int, default=1000,
                        help="updates at or after this step count as the cold-start regime in the pooled summary")
    args = parser.parse_args()
    text, written = spike_report(args.grid, args.output, dense=args.dense, plot=tuple(args.plot.split(",")),
                                 gap_ylim=args.gap_ylim, cold_from=args.cold_from)
    print(text)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
