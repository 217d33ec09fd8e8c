"""How lowmem's optimizers treat the parameter kinds a structure makes (lowmem.optim.roles.KINDS).

One table, `METHOD_KINDS`, of the kinds each built-in method trains (its registration's `kinds`
reads it; tests/test_structures.py checks every registered method against it), with each treatment:

  adamw, stable-spam     elementwise: a factor, a sparse-values vector or a masked weight is an
                         ordinary tensor (every kind but frozen)
  smet                   dense tensors and sparse layers (masked, sparse-values); not factors
  scale, sgd, sgd-column, a factor (A: r x in, B: out x r) is a hidden matrix: its update is
  sgd-row, sgd-sign,     normalized as the variant normalizes any Linear, along the factor's own
  sgd-singular           input dimension for the column norm (dim 1: each row of A over the layer's
                         inputs, each row of B over the r bottleneck units)
  adam-mini              a factor gets one second-moment block per row (A: one per bottleneck unit,
                         B: one per output unit); q/k per-head blocks apply to dense q/k only
  galore, fira, apollo,  refuse factors (`REFUSALS` says why): a rank-r factor projected at rank
  apollo-mini            >= r, as the benchmark's code configures it, is a lossless rotation of the
                         gradient, so Fira's residual is 0 and Fira equals GaLore there, and at a
                         smaller rank the product loses rank it never gets back; use adamw for factors
  muon, muon-all         refuse structured kinds (Method.kinds's default, dense only)
Frozen parameters (LoRA's W0) are in no optimizer group (requires_grad False).
"""

from __future__ import annotations

from typing import Any

from lowmem.optim.roles import group_kind

DENSE_KINDS = ("dense",)
# Kinds of a factored layer (Low-Rank, LoRA's trained part).
FACTOR_KINDS = ("dense", "factor-a", "factor-b")
# Every kind an elementwise method trains.
ELEMENTWISE_KINDS = ("dense", "factor-a", "factor-b", "sparse-values", "masked")
# Kinds of a dynamic-sparse model (SMET).
DST_KINDS = ("dense", "masked", "sparse-values")

METHOD_KINDS: dict[str, tuple[str, ...]] = {
    "adamw": ELEMENTWISE_KINDS,
    "stable-spam": ELEMENTWISE_KINDS,
    "smet": DST_KINDS,
    **{name: FACTOR_KINDS for name in ("scale", "sgd", "sgd-column", "sgd-row", "sgd-sign", "sgd-singular")},
    "adam-mini": FACTOR_KINDS,
    **{name: DENSE_KINDS for name in ("galore", "fira", "apollo", "apollo-mini", "muon", "muon-all")},
}

_PROJECTION_REFUSAL = (
    "a projection method does not train low-rank factors: projected at a rank >= the factor's rank r (the "
    "benchmark code's setting) the projection is a lossless rotation of an r x r gradient (Fira's residual is "
    "then 0, so Fira equals GaLore), and at a lower rank the product would lose rank for good; train the factors "
    "with adamw, or the dense model with this method"
)
REFUSALS: dict[str, str] = {name: _PROJECTION_REFUSAL for name in ("galore", "fira", "apollo", "apollo-mini")}


def refusal(method: str, kind: str) -> str:
    """Why `method` refuses parameters of `kind`, where the table says more than "not supported" ("" else)."""
    return REFUSALS.get(method, "") if kind in ("factor-a", "factor-b") else ""


def projects(group: dict[str, Any]) -> bool:
    """Whether a projection method (GaLore, Fira, APOLLO) may project this group's matrices: dense only."""
    return group_kind(group) == "dense"


__all__ = ["DENSE_KINDS", "DST_KINDS", "ELEMENTWISE_KINDS", "FACTOR_KINDS", "METHOD_KINDS", "REFUSALS", "projects",
           "refusal"]
