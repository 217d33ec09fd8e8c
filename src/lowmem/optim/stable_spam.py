"""Stable-SPAM (Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
arXiv 2502.17055).

Per tensor, at its step t (1, 2, ...; never reset):

  1. spike clipping     M   = theta*M + (1-theta)*max|g|;   M_hat = M / (1-theta^t)
                        g   = clamp(g, -M_hat, M_hat)        (|g_i| > M_hat -> sign(g_i)*M_hat)
  2. norm normalization n   = ||g||;  N = gamma1*N + (1-gamma1)*n;  V = gamma2*V + (1-gamma2)*n^2
                        g   = g/n * (N/(1-gamma1^t)) / (sqrt(V/(1-gamma2^t)) + eps)
  3. momentum reset     if t % update_gap == 0: m = v = 0 and Adam's step k = 0, *before* this
                        step's update, so the reset step is a first Adam step (k = 1)
  4. AdamW              beta1_t = beta1 * (eta_min + (1-eta_min) * (1 + cos(pi*min(t, total_T)/total_T))/2)
                        k += 1;  m = beta1_t*m + (1-beta1_t)*g;  v = beta2*v + (1-beta2)*g^2
                        W *= 1 - lr*wd;  W -= lr * (m/(1-beta1_t^k)) / (sqrt(v/(1-beta2^k)) + eps)

`total_T` is the run length (the trainer passes its step count); `total_T=None` keeps beta1 fixed.
The cosine reaches eta_min at t = total_T and stays there if the run goes on. `update_gap=0` never
resets.

Where this differs from the released code (TianjinYellow/StableSPAM), on purpose:
  - on a reset step the released code updates and applies the *pre-reset* moments (it holds them in
    local variables while putting zeros into the state): here the reset takes effect on that step
    (tests/test_stable_spam.py shows the two diverge exactly there);
  - the released code keeps one counter per tensor that the reset sets back to 1, which also
    restarts the bias correction of the clipping and norm EMAs; here those use the tensor's step t,
    and only Adam's k restarts;
  - clipped entries become sign(g)*M_hat (methods.md §7); the released code scales them by
    M_hat/max|g|;
  - the released code also multiplies gamma1 by the cosine factor; methods.md decays beta1 only.

State per tensor, all tensors so a resume resets on the same steps: `step` (Adam's k, float32 scalar,
restarted by resets — also by lowmem.optim.reset), `global_step` (t), `exp_avg`, `exp_avg_sq`, and the
scalars `max_abs_avg` (M), `norm_avg` (N), `norm_sq_avg` (V).

FSDP2 (DTensor shards): max|g| and ||g||^2 are reductions over the whole tensor, so each rank reduces
its shard and two all-reduces per step (a max, then a sum; each one flat tensor holding one float per
parameter tensor) complete them; everything else is elementwise on the local shard. No gather.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from lowmem.optim import Method, register
from lowmem.optim.kinds import ELEMENTWISE_KINDS
from lowmem.optim.adamw import adamw_update
from lowmem.optim.base import all_reduce_partials, check_beta, check_betas, check_grad, check_nonneg, sharded_groups


def beta1_decay(t: int, total_T: int | None, eta_min: float) -> float:
    """The cosine factor on beta1 at step t: 1 at t = 0, eta_min from t = total_T on."""
    if total_T is None:
        return 1.0
    return eta_min + (1 - eta_min) * 0.5 * (1 + math.cos(math.pi * min(t, total_T) / total_T))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def _check_settings(group: dict[str, Any]) -> None:
    check_nonneg("lr", group["lr"])
    check_betas("betas", group["betas"])
    check_nonneg("eps", group["eps"])
    check_nonneg("weight_decay", group["weight_decay"])
    for name in ("gamma1", "gamma2", "theta"):
        check_beta(name, group[name])
    if not isinstance(group["eta_min"], (int, float)) or not 0.0 <= group["eta_min"] <= 1.0:
        raise ValueError(f"invalid eta_min: {group['eta_min']!r}; it must be in [0, 1]")
    gap = group["update_gap"]
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 0:
        raise ValueError(f"invalid update_gap: {gap!r}; it must be an integer >= 0 (0: never reset)")
    total = group["total_T"]
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 1):
        raise ValueError(f"invalid total_T: {total!r}; it must be an integer >= 1 (the run's steps) or None")


class StableSPAM(Optimizer):
    """Stable-SPAM: AdamW on spike-clipped, norm-normalized gradients with periodic momentum resets.

    Args:
        params: parameters or param groups (roles are accepted and ignored: every tensor is treated alike).
        lr, betas, eps, weight_decay: AdamW's (decoupled decay); eps also guards the norm normalization.
        gamma1, gamma2: EMA coefficients of ||g|| and ||g||^2 (methods.md: 0.7, 0.999; scripts use gamma1 0.85).
        theta: EMA coefficient of max|g| for spike clipping.
        eta_min: beta1's final cosine factor.
        update_gap: reset Adam's moments every this many steps (0: never).
        total_T: steps over which beta1's factor decays from 1 to eta_min (the run length); None: no decay.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma1: float = 0.7,
        gamma2: float = 0.999,
        theta: float = 0.999,
        eta_min: float = 0.5,
        update_gap: int = 500,
        total_T: int | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, gamma1=gamma1,
                        gamma2=gamma2, theta=theta, eta_min=eta_min, update_gap=update_gap, total_T=total_T)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_settings(self.param_groups[-1])

    def _init_state(self, state: dict[str, Any], param: torch.Tensor) -> None:
        local = _local(param)
        scalar = dict(dtype=torch.promote_types(param.dtype, torch.float32), device=local.device)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["global_step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["max_abs_avg"] = torch.zeros((), **scalar)
        state["norm_avg"] = torch.zeros((), **scalar)
        state["norm_sq_avg"] = torch.zeros((), **scalar)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, shardings = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_grad(p)
                state = self.state[p]
                if not state:
                    self._init_state(state, p)
                state["global_step"] += 1
                work.append((group, p, state, _local(p.grad)))
                shardings.append(sharded_groups(p))
        if not work:
            return loss

        # 1. Spike clipping against the bias-corrected EMA of max|g| (max over all shards).
        max_abs = [g.abs().amax().to(state["max_abs_avg"].dtype) for _, _, state, g in work]
        all_reduce_partials(max_abs, shardings, op=dist.ReduceOp.MAX)
        clipped = []
        for (group, _, state, grad), peak in zip(work, max_abs):
            theta, t = group["theta"], state["global_step"].item()
            state["max_abs_avg"].mul_(theta).add_(peak, alpha=1 - theta)
            limit = (state["max_abs_avg"] / (1 - theta**t)).to(grad.dtype)
            clipped.append(torch.clamp(grad, min=-limit, max=limit))

        # 2. Norm normalization with the bias-corrected EMAs of ||g|| and ||g||^2 (sum over all shards).
        # In at least fp32: a bf16 norm keeps 3 significant digits.
        sum_sq = [torch.linalg.vector_norm(g, dtype=state["norm_avg"].dtype).square() for (_, _, state, _), g in zip(work, clipped)]
        all_reduce_partials(sum_sq, shardings)
        buckets: dict[tuple[int, float], list[list[torch.Tensor]]] = {}
        for (group, p, state, _), grad, sq in zip(work, clipped, sum_sq):
            gamma1, gamma2, t = group["gamma1"], group["gamma2"], state["global_step"].item()
            norm = sq.sqrt()
            state["norm_avg"].mul_(gamma1).add_(norm, alpha=1 - gamma1)
            state["norm_sq_avg"].mul_(gamma2).add_(sq, alpha=1 - gamma2)
            target = (state["norm_avg"] / (1 - gamma1**t)) / ((state["norm_sq_avg"] / (1 - gamma2**t)).sqrt() + group["eps"])
            # A zero gradient stays zero (0 / tiny), with no data-dependent branch.
            grad.mul_((target / norm.clamp_min(torch.finfo(norm.dtype).tiny)).to(grad.dtype))

            # 3. Momentum reset, effective on this very step.
            gap = group["update_gap"]
            if gap and int(t) % gap == 0:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()
                state["step"].zero_()

            beta1 = group["betas"][0] * beta1_decay(int(t), group["total_T"], group["eta_min"])
            lists = buckets.setdefault((id(group), beta1), [[], [], [], [], [], group])
            for items, tensor in zip(lists, (_local(p), grad, _local(state["exp_avg"]), _local(state["exp_avg_sq"]), state["step"])):
                items.append(tensor)

        # 4. AdamW with the decayed beta1 (one bucket per group and beta1: normally one per group).
        for (_, beta1), (params, grads, exp_avgs, exp_avg_sqs, steps, group) in buckets.items():
            adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1,
                         beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"])
        return loss


register(
    "stable-spam",
    Method("lowmem.optim.stable_spam:StableSPAM",
           "Stable-SPAM: AdamW on spike-clipped, norm-normalized gradients, momentum reset every update_gap steps",
           from_run={"total_T": "steps"},  # its beta1 decay spans the run
           # Elementwise (AdamW on clipped, normalized gradients): factors and sparse values are
           # ordinary tensors to it (lowmem.optim.kinds).
           kinds=ELEMENTWISE_KINDS),
)
