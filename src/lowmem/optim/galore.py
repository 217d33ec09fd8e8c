"""GaLore and Fira: Adam in the gradient's top singular subspace, and Fira's full-rank residual.

GaLore -- Zhao, Zhang, Chen, Wang, Anandkumar, Tian, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", arXiv 2403.03507. For each hidden matrix W with gradient G:

  every update_proj_gap steps (and at the first): P = top-r singular vectors of G (fp32 SVD)
      m >= n: P = V[:, :r]^T, R = G P^T        m < n: P = U[:, :r], R = P^T G
  N = Adam(R) (bias-corrected, eps 1e-6; moments not rotated when P changes)
  W -= lr_t * scale * back(N)                  back(N) = N P or P N
  W *= 1 - lr_t * weight_decay

Fira -- Chen, Zhang, Xu, Liu, Zhang, Zhou, Xia, "Fira: Can We Achieve Full-rank Training of LLMs
Under Low-rank Constraint?", arXiv 2410.01623. GaLore plus the gradient outside the subspace:

  S   = G - scale * back(R)                                 the residual, as released (compat="official")
  phi = ||N||_c / ||R||_c   per channel c of the unprojected side (rows of W if m >= n, else columns)
  S   = phi * S;  if ||S_t|| > 1.01 ||S_{t-1}||: S_t *= 1.01 ||S_{t-1}|| / ||S_t||   (norm-growth limiter)
  W  -= lr_t * (scale * back(N) + S)

The released Fira code subtracts `scale * back(R)` (its project_back multiplies by scale), so for
scale < 1 part of the in-subspace gradient stays in the residual; every published Fira number comes
from that form, and it is the default. `compat="paper"` is the paper's `S = G - back(R)` (the
residual orthogonal to the subspace). Everything shared (projection, Adam form, schedule, FSDP2, meta,
state, the meaning of the shared constructor arguments) is in lowmem.optim.projection; Adam's bias correction is folded
into the step size there, so phi and the limiter see what the released code sees, and the embedding,
head and norm gains get the released codes' AdamW (eps added to the uncorrected sqrt(v)).

`state_bits=8` (with `stochastic_rounding`) keeps the r-side moments exp_avg / exp_avg_sq, and the
AdamW moments of the other parameters, in 8-bit blockwise codes (lowmem.optim.projection says how).

Defaults are the papers' 60M settings; registry presets give the per-size ones.
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem.optim import Method, register
from lowmem.optim.base import check_choice
from lowmem.optim.kinds import METHOD_KINDS
from lowmem.optim.projection import (
    RATIO_EPS,
    ProjectedAdam,
    add_project_back,
    channel_dim,
    norm_growth_limiter,
    sum_over_shards,
)

FIRA_COMPAT = ("official", "paper")


class GaLore(ProjectedAdam):
    """GaLore-AdamW; see the module docstring. Arguments: lowmem.optim.projection.ProjectedAdam's
    shared ones (the papers' 60M settings by default)."""

    method_name = "galore"

    def __init__(self, params, lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", svd: str = "exact", stagger: bool = False, foreach: bool = True,
                 state_bits: int | None = None, stochastic_rounding: bool = False, compiled: bool = False,
                 batch_elements: int | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd,
                                      stagger=stagger, foreach=foreach, state_bits=state_bits,
                                      stochastic_rounding=stochastic_rounding, compiled=compiled,
                                      batch_elements=batch_elements))

    def _apply_update(self, p, param, grad, low_rank, direction, projection, side, state, group, *, step_size):
        add_project_back(param, direction, projection, side, alpha=-step_size * group["scale"])


class Fira(ProjectedAdam):
    """Fira-AdamW: GaLore plus the norm-scaled, norm-limited residual; see the module docstring.

    Takes lowmem.optim.projection.ProjectedAdam's shared arguments (scale 0.25 at 60M-350M, 0.0625 at
    1B and 7B) and:
        compat: "official" (the released code's residual G - scale*back(R), the default) or "paper"
            (G - back(R)).
    """

    method_name = "fira"

    def __init__(self, params, lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", svd: str = "exact", stagger: bool = False, foreach: bool = True,
                 compat: str = "official", state_bits: int | None = None, stochastic_rounding: bool = False,
                 compiled: bool = False,
                 batch_elements: int | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd,
                                      stagger=stagger, foreach=foreach, compat=compat, state_bits=state_bits,
                                      stochastic_rounding=stochastic_rounding, compiled=compiled,
                                      batch_elements=batch_elements))

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_choice("compat", group["compat"], FIRA_COMPAT)

    def _apply_update(self, p, param, grad, low_rank, direction, projection, side, state, group, *, step_size):
        dim = channel_dim(side)
        phi = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
        phi /= torch.linalg.vector_norm(low_rank, dim=dim, keepdim=True) + RATIO_EPS
        in_subspace = group["scale"] if group["compat"] == "official" else 1.0
        residual = add_project_back(grad, low_rank, projection, side, alpha=-in_subspace, out_of_place=True)
        residual *= phi
        norm = sum_over_shards(torch.linalg.vector_norm(residual).square(), p).sqrt()
        limiter = norm_growth_limiter(norm, state, param.dtype)
        add_project_back(param, direction, projection, side, alpha=-step_size * group["scale"])
        param.addcmul_(residual, limiter.reciprocal(), value=-step_size)


_RANKS = {"llama-60m": 128, "llama-130m": 256, "llama-350m": 256, "llama-1b": 512}

register("galore", Method(
    "lowmem.optim.galore:GaLore",
    "GaLore: Adam on the SVD projection of each hidden matrix's gradient (rank r, refreshed every gap)",
    # GaLore's README/scripts: rank 128/256/256/512, gap 200, scale 0.25, lr 0.01 (60M-1B).
    presets={size: {"rank": rank} for size, rank in _RANKS.items()},
    kinds=METHOD_KINDS["galore"],  # factors refused (lowmem.optim.kinds says why)
))

register("fira", Method(
    "lowmem.optim.galore:Fira",
    "Fira: GaLore plus the norm-scaled, norm-growth-limited residual outside the subspace",
    # Fira's released scripts (pre_training_c4/scripts/llama_*.sh): lr 0.01, gap 200, alpha (our
    # scale) 0.25 at 60M-350M and 0.0625 at 1B; the 7B script uses lr 0.005, rank 64, gap 500.
    presets={
        **{size: {"rank": rank, "scale": 0.25} for size, rank in _RANKS.items() if size != "llama-1b"},
        "llama-1b": {"rank": 512, "scale": 0.0625},
        "llama-7b": {"rank": 64, "scale": 0.0625, "update_proj_gap": 500, "lr": 0.005},
    },
    kinds=METHOD_KINDS["fira"],  # factors refused (lowmem.optim.kinds says why)
))
