"""The CPU protocol end to end (slow: ~40 min on 2 cores; `make bench-tests`, not CI).

Runs configs/cpu-protocol.yaml on the review corpus and checks the claims docs/results.md makes:
every method lowers validation perplexity far below its start and lands in (or beyond) AdamW's band,
SCALE is at least as good as AdamW to within 5%, column-normalized SGD without momentum is clearly
worse than SCALE, and plain SGD far worse.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lowmem.bench.report import best_per_method, collect
from lowmem.bench.run import load_grid, run_grid

pytestmark = pytest.mark.slow
GRID = Path(__file__).resolve().parents[1] / "configs" / "cpu-protocol.yaml"


def test_cpu_protocol_ranking(reviews, tmp_path, monkeypatch):
    monkeypatch.chdir(GRID.parents[1])  # the grid names ../shared/data/reviews relative to the repository
    run_grid(load_grid(GRID, tmp_path), workers=2, progress=False)
    best = {m: r["val_perplexity"] for m, r in best_per_method(collect(tmp_path)).items()}
    starts = {r["method"]: r["initial_val_perplexity"] for r in collect(tmp_path)}
    adamw, scale = best["adamw"], best["scale"]
    for method, ppl in best.items():
        assert ppl < 0.2 * starts[method], method
        if method not in ("sgd", "sgd-column"):
            assert ppl < 1.5 * adamw, method  # in AdamW's band or better
    assert scale <= 1.05 * adamw
    assert best["sgd-column"] > 1.2 * scale
    assert best["sgd"] > 2.0 * scale
