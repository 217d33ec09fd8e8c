"""The perplexity table of docs/results.md (SMET section) from a finished configs/smet-cpu.yaml grid.

    python benchmarks/smet_table.py runs/smet-cpu

One row per run: density, optimizer, growth (SET = random, RigL = gradient), SMET's density_lr, final
validation perplexity (token-weighted), its ratio to the dense AdamW run, and the optimizer state the
run measured (bytes of optimizer.state tensors). The analysis: lowmem.bench.smet.perplexity_table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowmem.bench.smet import perplexity_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="the output directory of a finished configs/smet-cpu.yaml grid")
    args = parser.parse_args()
    print(perplexity_table(args.grid))


if __name__ == "__main__":
    main()
