"""How lowmem's optimizers treat the parameter kinds a structure makes (lowmem.optim.roles.KINDS).

One place for the per-method treatments, so each method file only names the kinds it trains:

  adamw, stable-spam     elementwise: a factor, a sparse-values vector or a masked weight is an
                         ordinary tensor (every kind but frozen)
  scale, sgd-*           a factor (A: r x in, B: out x r) is a hidden matrix: its update is
                         normalized along its own input dimension (dim 1: each row of A over the
                         layer's inputs, each row of B over the r bottleneck units), as any Linear
  adam-mini              a factor gets one second-moment block per row (A: one per bottleneck unit,
                         B: one per output unit); q/k per-head blocks apply to dense q/k only
  galore, fira, apollo,  a rank-r factor is not projected again (its gradient is already thin):
  apollo-mini            factors get the method's AdamW path (`projects(group)` is False for them)
  muon, sgd, sgd-column  ... and every method not listed: refuse structured kinds (Method.kinds's
                         default, dense only), with a message naming adamw
Frozen parameters (LoRA's W0) are in no optimizer group (requires_grad False).
"""

from __future__ import annotations

from typing import Any

from lowmem.optim.roles import group_kind

# Kinds of a factored layer (Low-Rank, LoRA's trained part).
FACTOR_KINDS = ("dense", "factor-a", "factor-b")
# Every kind an elementwise method trains.
ELEMENTWISE_KINDS = ("dense", "factor-a", "factor-b", "sparse-values", "masked")


def projects(group: dict[str, Any]) -> bool:
    """Whether a projection method (GaLore, Fira, APOLLO) may project this group's matrices: dense only."""
    return group_kind(group) == "dense"


__all__ = ["ELEMENTWISE_KINDS", "FACTOR_KINDS", "projects"]
