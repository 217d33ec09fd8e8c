"""benchmarks/claims.py turns a grid's best runs into verdicts; the verdict rules, on made-up runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "claims.py")
claims = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims)


def _run(*ppl: float, gb: float = 0.01) -> dict:
    mean = sum(ppl) / len(ppl)
    return {"seeds": list(ppl), "mean": mean, "sd": 0.0, "low": min(ppl), "high": max(ppl),
            "memory": {"estimate_paper_gb": gb}}


def _verdicts(best: dict, noise: float = 0.0) -> dict[str, str]:
    return {claim: result for claim, _, result in claims.claims(best, noise)}


def test_strict_claims_need_ranges_apart_and_at_or_below_claims_accept_ties():
    best = {"adamw": _run(100, 104, 102), "scale": _run(101, 103, 105, gb=0.004), "sgd": _run(300),
            "sgd-column": _run(150), "sgd-sign": _run(149), "sgd-row": _run(200),
            "galore": _run(120, 124), "fira": _run(123, 126), "apollo": _run(130, 131),
            "apollo-mini": _run(133), "stable-spam": _run(103, 106), "lowrank-restarts": _run(140, 142),
            "lowrank": _run(141, 143)}
    v = _verdicts(best)
    assert v["SCALE within a few percent of AdamW at 35–45% of its memory"].startswith("reproduced")
    assert v["column-normalized SGD far better than SGD"] == "reproduced"
    assert v["column-normalized SGD worse than SCALE"] == "reproduced"
    assert v["sign normalization worse than column"] == "not reproduced"  # 149 < 150, one seed each, no noise
    assert v["row normalization worse than column"] == "reproduced"
    assert v["Fira at or below GaLore"] == "reproduced"  # overlapping ranges: a tie satisfies "at or below"
    assert v["APOLLO at or below GaLore"] == "not reproduced"
    assert v["APOLLO-Mini close to APOLLO"] == "reproduced"
    assert v["Stable-SPAM at or below AdamW"] == "reproduced"
    assert v["restarts improve low-rank training"] == "not resolvable at this budget"
    # with seed noise, a one-seed difference of 1% becomes a tie
    assert _verdicts(best, noise=0.02)["sign normalization worse than column"] == "not resolvable at this budget"


def test_a_method_the_grid_has_not_run_reads_not_run_and_scale_far_below_adamw_is_not_matching():
    v = _verdicts({"adamw": _run(200), "scale": _run(120, gb=0.004)})
    assert v["SCALE within a few percent of AdamW at 35–45% of its memory"].startswith("not reproduced (SCALE far below")
    assert v["Fira at or below GaLore"] == "not run: fira, galore"
