"""The papers' claims, checked one by one against a finished `lowmem bench` grid (issue 17).

    lowmem bench configs/grid/cpu-1m.yaml --output runs/grid-1m --workers 2
    PYTHONPATH=src python benchmarks/claims.py runs/grid-1m --spikes runs/smet-spikes-seeds --spikes runs/smet-spikes-lr3e-3
    PYTHONPATH=src python benchmarks/claims.py docs/data/grid-1m-report.json   # the committed report, no runs/
    PYTHONPATH=src python benchmarks/claims.py docs/data/budget-tuned-steps1000-report.json \
        docs/data/budget-tuned-steps1000-rest-report.json   # one budget's grid in two pieces, merged

Prints the grid's seed noise and ranges, then a markdown table: each claim, the numbers, and a
verdict — "reproduced", "not reproduced", or "not resolvable at this budget" (the rules:
lowmem.bench.claims). With --spikes, the SMET claim is judged on the paired spike differences of
that grid (lowmem.bench.smet), apart for the updates before and after step 1000.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowmem.bench.claims import claims_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, nargs="+",
                        help="a grid's output directory, or the report.json written there; several of one budget "
                             "are merged (a later one's methods replace an earlier one's)")
    parser.add_argument("--spikes", type=Path, action="append", default=[],
                        help="a finished spike grid (configs/smet-spikes-seeds.yaml); repeat for several")
    args = parser.parse_args()
    print(claims_report(args.grid, args.spikes))


if __name__ == "__main__":
    main()
