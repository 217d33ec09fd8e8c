"""Weight refactorization and the benchmark paper's restarts, for factored layers (B A).

The benchmark paper's technique (methods.md section 8; code OptimAI-Lab/Memory_Efficient_Pretraining):
every N updates rewrite each factor pair so that the product is unchanged and the factors balanced,

  B = Q_b R_b  (QR, out x r),  A^T = Q_a R_a  (QR, in x r),  R_b R_a^T = U_m S V_m^T  (r x r SVD)
  so B A = (Q_b U_m) S (Q_a V_m)^T = U S V^T, the thin SVD of B A, at O((out + in) r^2) cost
  B <- U sqrt(S),  A <- sqrt(S) V^T                (B^T B = A A^T = S: equal norms per direction)

instead of an SVD of the out x in product. In the new coordinates B' = B G, A' = G^-1 A with
G = R_b^-1 U_m sqrt(S). What happens to the factors' optimizer state is an option:
  state="reset"   (default; the paper's, whose code rebuilds the optimizer) zero A's and B's moments
                  and step counters (lowmem.optim.state.reset_state)
  state="rotate"  carry them into the new bases: a gradient transforms as dL/dB' = dL/dB G^-T and
                  dL/dA' = G^T dL/dA, so exp_avg does exactly that; exp_avg_sq, a per-entry mean of
                  squares, is mapped as if entries were independent: v' = v (G^-T)^2 and G^T^2 v
                  (elementwise squares of the maps); step counters are kept. A pair whose R_a or R_b
                  is singular (B = 0 at SLTrain's start, say) falls back to a reset.
The default is the paper's because defaults compute what produced the published numbers; the CPU
comparison of both is in docs/results.md ("Low-rank structures (issue 11)").

A pair whose product is zero or rank-deficient (S_max = 0, or its smallest singular value at or below
eps * max(out, in) * S_max) is skipped: A, B and their state unchanged. Refactoring it would zero the
rows of A' and columns of B' of every zero singular value together, and a direction with both zero
gets no gradient again (dL/dA' = s B'^T d x^T, dL/dB' = s d (A' x)^T): B = 0 after a ReLoRA merge on
the same step would freeze the pair for good. Skipped pairs are counted in the interventions' state
and each call that skips some warns once.

`restarts` (`--intervention restarts:every=200`) is the paper's combination: on the same step a
refactorization and a momentum reset of every parameter (lowmem.optim.reset.reset_moments), with the
reference's learning-rate dip: the last update before the restart at lr_floor (0.1%) of the
scheduled rate, then a linear climb that reaches it on the (lr_ramp_steps - 1)-th update after (the
first fresh update at ~11%, the target by the 9th, for lr_ramp_steps = 10). `lowmem.optim.reset.restart_lr_factor`
is that timing (the same function momentum reset uses), a function of the step alone.

FSDP2: each pair (and, for rotate, its moments) is gathered whole (full_tensor, r x (in + out)
elements), refactored redundantly on every rank (the same inputs, so the same G everywhere), and each
rank keeps its rows. An optimizer that keeps a sharded factor's moments as plain local shards falls
back to a reset for that pair.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem.errors import ConfigError
from lowmem.interventions import BaseIntervention
from lowmem.optim import quantized_state
from lowmem.optim.base import check_choice, check_positive_int, is_dtensor, rows_of
from lowmem.optim.reset import reset_moments, restart_lr_factor
from lowmem.optim.state import reset_state
from lowmem.registry import INTERVENTIONS
from lowmem.structure.lowrank import factor_modules

STATE_MODES = ("reset", "rotate")


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _thin_svd(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(Q_a, R_a, Q_b, R_b, U_m, S, V_m^T): B = Q_b R_b, A^T = Q_a R_a, R_b R_a^T = U_m S V_m^T, in at
    least fp32, so B A = (Q_b U_m) S (Q_a V_m)^T."""
    dtype = _work_dtype(lora_A)
    a, b = lora_A.to(dtype), lora_B.to(dtype)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.t())
    u_m, s, vh_m = torch.linalg.svd(r_b @ r_a.t())
    return q_a, r_a, q_b, r_b, u_m, s, vh_m


def _balanced(q_a, q_b, u_m, s, vh_m) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.sqrt()
    return root.unsqueeze(1) * (vh_m @ q_a.t()), (q_b @ u_m) * root


def is_deficient(s: torch.Tensor, out_features: int, in_features: int) -> bool:
    """Whether singular values `s` of a product B A are all zero or include one at or below
    eps * max(out, in) * S_max: refactoring would leave a direction that never trains again."""
    largest = s.max()
    tolerance = torch.finfo(s.dtype).eps * max(out_features, in_features) * largest
    return bool(largest == 0 or s.min() <= tolerance)


def balanced_factors(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A', B', S) with B' A' = B A, B' = U sqrt(S), A' = sqrt(S) V^T (QR of B and A^T, then an r x r SVD).

    Computed in at least fp32; returned in that precision (the caller casts)."""
    q_a, _, q_b, _, u_m, s, vh_m = _thin_svd(lora_A, lora_B)
    new_a, new_b = _balanced(q_a, q_b, u_m, s, vh_m)
    return new_a, new_b, s


def balanced_factors_svd(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same through a full SVD of the out x in product (the expensive route; tests and benchmarks)."""
    dtype = _work_dtype(lora_A)
    r = lora_A.shape[0]
    u, s, vh = torch.linalg.svd(lora_B.to(dtype) @ lora_A.to(dtype), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    root = s.sqrt()
    return root.unsqueeze(1) * vh, u * root, s


def _rotation(thin: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(G, G^-1) with B' = B G and A' = G^-1 A for the decomposition `thin` (`_thin_svd`), or None
    when R_a or R_b is singular."""
    q_a, r_a, q_b, r_b, u_m, s, vh_m = thin
    tiny = torch.finfo(s.dtype).eps * 1e3
    for r in (r_a, r_b):
        d = r.diagonal().abs()
        if d.min() <= tiny * d.max().clamp_min(torch.finfo(s.dtype).tiny):
            return None
    root = s.sqrt()
    if root.min() <= tiny * root.max():
        return None
    g = torch.linalg.solve_triangular(r_b, u_m * root, upper=True)  # R_b^-1 U_m sqrt(S)
    # G^-1 = sqrt(S)^-1 U_m^T R_b, and A' = G^-1 A equals sqrt(S) V_m^T Q_a^T.
    g_inv = (u_m.t() @ r_b) / root.unsqueeze(1)
    return g, g_inv


MOMENTS = (("exp_avg", False), ("exp_avg_sq", True))


def _rotatable(state: dict[str, Any], param: torch.Tensor) -> bool:
    """Whether the moments of `param` can be rotated: held whole, or sharded like the parameter
    (DTensors); a plain local shard of a sharded parameter cannot take a map that mixes its rows."""
    if is_dtensor(param) and any(quantized_state.is_quantized(state, key) for key, _ in MOMENTS):
        return False  # 8-bit codes hold this rank's rows only; the map mixes rows: reset instead
    return all(not is_dtensor(param) or is_dtensor(state[key]) for key, _ in MOMENTS
               if isinstance(state.get(key), torch.Tensor) and state[key].dim() == 2)


def _rotate_state(state: dict[str, Any], left: torch.Tensor | None, right: torch.Tensor | None) -> None:
    """m -> left @ m @ right (whichever is given); v -> left^2 @ v @ right^2 (elementwise squares of the maps).
    Sharded moments are gathered whole, mapped, and each rank keeps its rows; 8-bit moments (one
    process) are dequantized, mapped in their values' dtype and requantized."""
    for key, square in MOMENTS:
        if quantized_state.is_quantized(state, key):
            dtype = left.dtype if left is not None else right.dtype
            with quantized_state.dequantized(state, (key,), dtype=dtype) as (value,):
                value.copy_(_mapped(value, left, right, square))
            continue
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            continue
        _write(value, _mapped(_whole(value).to(left.dtype if left is not None else right.dtype), left, right, square))


def _mapped(work: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, square: bool) -> torch.Tensor:
    if left is not None:
        work = (left.square() if square else left) @ work
    if right is not None:
        work = work @ (right.square() if square else right)
    return work.clamp_min(0) if square else work


def _write(param: torch.Tensor, full: torch.Tensor) -> None:
    local = rows_of(full.to(param.dtype), param)
    (param.to_local() if is_dtensor(param) else param).copy_(local)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


class RefactorCount(NamedTuple):
    """What one `refactor_model` call did besides refactoring."""

    fallbacks: int  # pairs that fell back from rotate to reset (a singular R_a or R_b)
    skipped: int  # pairs left as they were (a zero or rank-deficient product)


@torch.no_grad()
def refactor_model(model: nn.Module, optimizer: Optimizer | None = None, state: str = "reset") -> RefactorCount:
    """Refactor every factor pair of `model` (B A = U S V^T; B = U sqrt(S), A = sqrt(S) V^T) and treat
    their optimizer state per `state`; pairs whose product is zero or rank-deficient are skipped (see
    the module docstring). Returns (fallbacks from rotate to reset, skipped pairs)."""
    check_choice("state", state, STATE_MODES)
    modules = factor_modules(model)
    if not modules:
        raise ValueError("refactorization needs a model with factored layers (--structure lowrank/lora/sltrain)")
    fallbacks = skipped = 0
    for module in modules:
        a, b = module.lora_A, module.lora_B
        thin = _thin_svd(_whole(a), _whole(b))
        if is_deficient(thin[5], b.shape[0], a.shape[1]):  # a DTensor's shape is the whole one
            skipped += 1
            continue
        new_a, new_b = _balanced(thin[0], thin[2], *thin[4:])
        rotate = state == "rotate" and optimizer is not None and all(
            _rotatable(optimizer.state.get(p) or {}, p) for p in (a, b))
        rotation = _rotation(thin) if rotate else None
        if rotation is not None:
            g, g_inv = rotation
            # dL/dB' = dL/dB G^-T, dL/dA' = G^T dL/dA.
            if optimizer.state.get(b):
                _rotate_state(optimizer.state[b], None, g_inv.t())
            if optimizer.state.get(a):
                _rotate_state(optimizer.state[a], g.t(), None)
        else:
            fallbacks += int(state == "rotate" and optimizer is not None)
            if optimizer is not None:
                reset_state(optimizer, params=[a, b])
        _write(a, new_a)
        _write(b, new_b)
    if skipped:
        warnings.warn(
            f"refactorization skipped {skipped} of {len(modules)} factor pairs whose product B A is zero or "
            "rank-deficient (after a lora-merge on the same step B = 0, say); they keep their factors and "
            "optimizer state, since refactoring them would stop those directions from training",
            stacklevel=3,  # the caller of refactor_model (no_grad's wrapper is in between)
        )
    return RefactorCount(fallbacks, skipped)


def _check_factored(model: nn.Module, name: str) -> None:
    if not factor_modules(model):
        raise ConfigError(f"intervention {name!r} needs a model with factored layers; add --structure "
                          "lowrank:rank=128 (or lora / sltrain), or drop the intervention")


def _check_ramp(lr_ramp_steps: int, lr_floor: float, every: int) -> None:
    if not isinstance(lr_ramp_steps, int) or isinstance(lr_ramp_steps, bool) or not 0 <= lr_ramp_steps <= every:
        raise ValueError(f"invalid lr_ramp_steps: {lr_ramp_steps!r}; it must be an integer in [0, every={every}]")
    if not isinstance(lr_floor, (int, float)) or not 0.0 <= lr_floor <= 1.0:
        raise ValueError(f"invalid lr_floor: {lr_floor!r}; it must be in [0, 1]")


class Refactor(BaseIntervention):
    """`--intervention refactor:every=200,state=reset`: refactor every factor pair after steps
    every, 2*every, ...; the factors' state reset (default, the paper's) or rotated."""

    name = "refactor"

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        _check_factored(model, cls.name)

    def __init__(self, every: int, state: str = "reset") -> None:
        check_positive_int("every", every)
        check_choice("state", state, STATE_MODES)
        self.every, self.state = every, state
        self.refactors = self.fallbacks = self.skipped = 0

    def after_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        if step % self.every == 0:
            count = refactor_model(model, optimizer, self.state)
            self.fallbacks += count.fallbacks
            self.skipped += count.skipped
            self.refactors += 1

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "state": self.state, "refactors": self.refactors, "fallbacks": self.fallbacks,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["every"] != self.every or state["state"] != self.state:
            raise ValueError(f"the checkpoint refactored every {state['every']} steps with state={state['state']}; "
                             f"resume with every={state['every']},state={state['state']}")
        self.refactors, self.fallbacks = state["refactors"], state["fallbacks"]
        self.skipped = state.get("skipped", 0)


class Restarts(BaseIntervention):
    """`--intervention restarts:every=200`: the paper's refactorization + momentum reset on one step,
    with its LR dip (lr_floor 0.001, lr_ramp_steps 10: see restart_lr_factor)."""

    name = "restarts"

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        _check_factored(model, cls.name)

    def __init__(self, every: int, lr_ramp_steps: int = 10, lr_floor: float = 0.001) -> None:
        check_positive_int("every", every)
        _check_ramp(lr_ramp_steps, lr_floor, every)
        self.every, self.lr_ramp_steps, self.lr_floor = every, lr_ramp_steps, float(lr_floor)
        self.restarts = self.skipped = 0

    def after_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        if step % self.every == 0:
            self.skipped += refactor_model(model, None).skipped
            reset_moments(optimizer)
            self.restarts += 1

    def lr_factor(self, step: int) -> float:
        return restart_lr_factor(step, self.every, self.lr_ramp_steps, self.lr_floor)

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "restarts": self.restarts, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["every"] != self.every:
            raise ValueError(f"the checkpoint restarted every {state['every']} steps; resume with every={state['every']}")
        self.restarts = state["restarts"]
        self.skipped = state.get("skipped", 0)


INTERVENTIONS.register("refactor", Refactor)
INTERVENTIONS.register("restarts", Restarts)

__all__ = ["RefactorCount", "Refactor", "Restarts", "STATE_MODES", "balanced_factors", "balanced_factors_svd",
           "is_deficient", "refactor_model"]
