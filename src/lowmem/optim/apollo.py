"""APOLLO and APOLLO-Mini: Adam's per-channel (or per-tensor) scaling estimated in a random subspace.

Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang, Lee, "APOLLO: SGD-like Memory, AdamW-level
Performance", arXiv 2412.05270. For each hidden matrix W with gradient G:

  every update_proj_gap steps (and at the first): P = random Gaussian, entries N(0, 1/r), from a seed
      kept in the state (m >= n: P is r x n, R = G P^T;  m < n: P is m x r, R = P^T G)
  N = Adam(R) (bias-corrected, eps 1e-6; moments live in the r-dim space)
  s = ||N||_c / ||R||_c        per channel c of the unprojected side (APOLLO, scale_type "channel")
  s = ||N|| / ||R||            whole tensor (APOLLO-Mini, scale_type "tensor")
  U = G * s, then Fira's norm-growth limiter: if ||U_t|| > 1.01 ||U_{t-1}||, U_t *= 1.01 ||U_{t-1}|| / ||U_t||
  W -= lr_t * sqrt(scale) * U;  W *= 1 - lr_t * weight_decay

APOLLO: rank 256 (1/4 of the hidden size in the paper's 60M-1B runs), channel scaling, scale 1;
APOLLO-Mini: rank 1, tensor scaling, scale 128; gap 200, lr 0.01. `proj="svd"` uses GaLore's SVD
basis instead of a random one (the paper's "APOLLO w. SVD").

The random matrix and its seed chain reproduce the released code (see lowmem.optim.projection):
the parameter at position i starts from seed `seed + i` and each refresh advances it with next_seed.
apollo_torch numbers parameters 1, 2, ... over its groups in order, and the released training script
passes `[{"params": regular}, {"params": low-rank, "rank": ...}]`; lowmem's positions count every
parameter that is not hidden first, then the hidden matrices (ProjectedAdam._schedule), so
`lowmem.optim.build("apollo", model)` (role groups, hidden first) draws the same matrices as
apollo_torch given the released grouping (tests/test_apollo.py checks every parameter). sqrt(scale) multiplies after the limiter, as released by default (the limiter sees a
ratio, so the order only matters through its 1e-8). Norms of G * s are taken as
sqrt(sum_c s_c^2 ||G_c||^2), without a full-size temporary.

Everything shared (Adam form, schedule, stagger, FSDP2, meta, state) is in lowmem.optim.projection.
`state_bits=8` (with `stochastic_rounding`) keeps the r-side moments, and the AdamW moments of the other
parameters, in 8-bit blockwise codes (there; s is computed from this step's dequantized moments).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem.optim import Method, register
from lowmem.optim.base import check_choice, check_nonneg_int, local_tensor
from lowmem.optim.kinds import METHOD_KINDS
from lowmem.optim.projection import (
    RATIO_EPS,
    ProjectedAdam,
    channel_dim,
    gaussian_projection,
    matrix_shape,
    next_seed,
    norm_growth_limiter,
    sum_over_shards,
)

SCALE_TYPES = ("channel", "tensor")
PROJECTIONS = ("random", "svd")


class Apollo(ProjectedAdam):
    """APOLLO-AdamW (and APOLLO-Mini with rank=1, scale_type="tensor", scale=128); see the module docstring.

    Takes lowmem.optim.projection.ProjectedAdam's shared arguments (here rank 256 and scale 1 by
    default; the update is multiplied by sqrt(scale)) and:
        scale_type: "channel" (APOLLO) or "tensor" (APOLLO-Mini).
        proj: "random" (Gaussian, from a seed) or "svd" (GaLore's basis; then `svd` picks exact or randomized).
        seed: base of the per-parameter seeds (the hidden matrix at position i starts at seed + i, as
            released for seed=0; positions as in ProjectedAdam._schedule).
    """

    method_name = "apollo"

    def __init__(self, params, lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 256, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std", svd: str = "exact", stagger: bool = False, foreach: bool = True,
                 scale_type: str = "channel", proj: str = "random", seed: int = 0,
                 state_bits: int | None = None, stochastic_rounding: bool = False, compiled: bool = False,
                 batch_elements: int | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd,
                                      stagger=stagger, foreach=foreach, scale_type=scale_type, proj=proj, seed=seed,
                                      state_bits=state_bits, stochastic_rounding=stochastic_rounding,
                                      compiled=compiled,
                                      batch_elements=batch_elements))

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_choice("scale_type", group["scale_type"], SCALE_TYPES)
        check_choice("proj", group["proj"], PROJECTIONS)
        check_nonneg_int("seed", group["seed"])

    def _new_projection(self, p, state, group, side, position, step):
        if group["proj"] == "svd":
            return super()._new_projection(p, state, group, side, position, step)
        seed = state.get("seed", group["seed"] + position)
        rows, cols = matrix_shape(p)
        grad = local_tensor(p.grad)
        projection = gaussian_projection(rows, cols, group["rank"], side, seed, device=grad.device, dtype=grad.dtype)
        state["seed"] = next_seed(seed)
        return projection

    def _apply_update(self, p, param, grad, low_rank, direction, projection, side, state, group, *, step_size):
        dim = channel_dim(side)
        if group["scale_type"] == "channel":
            scaling = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
            scaling /= torch.linalg.vector_norm(low_rank, dim=dim, keepdim=True) + RATIO_EPS
            # ||G * s||^2 = sum over channels of s_c^2 ||G_c||^2; a column's norm is partial on a row shard.
            grad_norms_sq = torch.linalg.vector_norm(grad, dim=dim, keepdim=True).square_()
            update_norm_sq = sum_over_shards((grad_norms_sq * scaling.square()).sum(), p)
        else:
            norms = [torch.linalg.vector_norm(direction), torch.linalg.vector_norm(low_rank)]
            low_rank_norms_sq = torch.stack(norms).square_()
            if side == "right":  # R's rows are sharded like W's; a left R is whole on every rank
                low_rank_norms_sq = sum_over_shards(low_rank_norms_sq, p)
            direction_norm, low_rank_norm = low_rank_norms_sq.sqrt().unbind()
            scaling = direction_norm / (low_rank_norm + RATIO_EPS)
            update_norm_sq = sum_over_shards(torch.linalg.vector_norm(grad).square(), p) * scaling.square()
        limiter = norm_growth_limiter(update_norm_sq.sqrt(), state, param.dtype)
        param.addcmul_(grad, scaling / limiter, value=-step_size * math.sqrt(group["scale"]))


# The released pre-training scripts (scripts/pretrain_c4/llama_*_apollo.sh): rank 128 at 60M, 192 at 130M
# ("exact 1/4 of llama 130M model dimension"), 256 at 350M, 1B and 7B; channel scaling, scale 1, gap 200,
# lr 0.01. The presets follow the scripts, because they produced the published perplexities. The common
# memory table (methods.md section 10) prints GaLore's cells for APOLLO (ranks 256 at 130M and 512 at 1B):
# pass rank=256 / rank=512 to reproduce those memory figures.
_RANKS = {"llama-60m": 128, "llama-130m": 192, "llama-350m": 256, "llama-1b": 256, "llama-7b": 256}

register("apollo", Method(
    "lowmem.optim.apollo:Apollo",
    "APOLLO: channel-wise Adam scaling estimated in a random rank-r space, applied to the raw gradient",
    presets={size: {"rank": rank} for size, rank in _RANKS.items()},
    kinds=METHOD_KINDS["apollo"],  # factors refused (lowmem.optim.kinds says why)
))

register("apollo-mini", Method(
    "lowmem.optim.apollo:Apollo",
    "APOLLO-Mini: tensor-wise Adam scaling from a rank-1 random projection (SGD-like memory)",
    defaults={"rank": 1, "scale_type": "tensor", "scale": 128.0},
    kinds=METHOD_KINDS["apollo-mini"],  # factors refused (lowmem.optim.kinds says why)
))
