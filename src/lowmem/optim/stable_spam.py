"""Stable-SPAM (Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
arXiv 2502.17055), as the released code (TianjinYellow/StableSPAM, stablespam.py) computes it.

Per tensor, with its own step counter k (1, 2, ...; each momentum reset sets it back to 1) and the
global step T (the optimizer's step count, which schedules resets and the cosine):

  0. cosine factor      c = eta_min + (1-eta_min) * (1 + cos(pi*min(T, total_T)/(total_T+1)))/2
                        (torch's CosineAnnealingLR with T_max = total_T + 1, as released; c = 1 without total_T)
  1. spike clipping     M   = theta*M + (1-theta)*max|g|;   M_hat = M / (1-theta^k)
                        |g_i| > M_hat  ->  g_i * M_hat / max|g|   (every spiking entry by the same factor)
  2. norm normalization n   = ||g||;  g1 = gamma1*c
                        N = g1*N + (1-g1)*n;  V = gamma2*V + (1-gamma2)*n^2
                        g   = g/n * (N/(1-g1^k)) / (sqrt(V/(1-gamma2^k)) + eps)     (g unchanged if n = 0)
  3. momentum reset     if update_gap and T % update_gap == 0: m = v = 0 and k = 1
  4. AdamW              beta1_t = beta1 * c;  W *= 1 - lr*wd;
                        m = beta1_t*m + (1-beta1_t)*g;  v = beta2*v + (1-beta2)*g^2
                        W -= lr * (m/(1-beta1_t^k)) / (sqrt(v/(1-beta2^k)) + eps)   (torch's eps placement)

`total_T` is the run length (the trainer passes its step count); `total_T=None` keeps beta1 and gamma1
fixed. `update_gap=0` never resets. Defaults are the released BF16 script's (LLaMA-130M: lr 8e-4,
gamma1 0.85, gamma2 0.99999, theta 0.999, update_gap 1000, 20k steps; the registry preset
"llama-130m" sets its lr); the benchmark paper (OptimAI-Lab/Memory_Efficient_Pretraining) found
update_gap 200 good: pass update_gap=200 for that alternative.

One deliberate difference from the released code: on a reset step the released code zeroes the state
but still updates and applies the *pre-reset* moments (it holds them in local variables) with k = 1,
a large stale step; here the reset takes effect on its own step, which is a first Adam step on fresh
moments (tests/test_stable_spam.py shows the two diverge exactly there, and agree before).

State per tensor, all tensors so a resume resets on the same steps: `step` (k, float32 scalar; reset
here and by lowmem.optim.reset, which restarts every bias correction above), `global_step` (T,
float32), `exp_avg`, `exp_avg_sq`, and the scalars `max_abs_avg` (M), `norm_avg` (N), `norm_sq_avg` (V),
in at least float32 (a bf16 T would stop at 256; LowmemOptimizer.load_state_dict keeps these dtypes
across a resume, where torch would cast them to the weights' bf16).

`state_bits=8` (issue 26, lowmem.optim.quantized_state; default None: full precision) keeps `exp_avg` and
`exp_avg_sq` of every tensor of >= 2 dims and >= 4096 elements as 8-bit codes (`<key>_codes`/`<key>_absmax`;
the signed map for exp_avg, the unsigned one without zero for exp_avg_sq), dequantized to fp32 for step 4
one tensor at a time and requantized (`stochastic_rounding` seeded by the tensor's position and T); the
reset of step 3 zeroes them through their scales (lowmem.optim.state.reset_whole). The scalars stay fp32.

FSDP2 (DTensor shards): max|g| and ||g||^2 are reductions over the whole tensor, so each rank reduces
its shard and all-reduces complete them: one max per step over every tensor, then one sum per chunk of
steps 2-4 (each a flat tensor holding one float per parameter tensor; the chunks, at most 2^24 elements
each, are cut by global sizes so every rank runs the same ones); everything else is elementwise on the
local shard. No gather.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from lowmem.optim import Method, quantized_state, register
from lowmem.optim.adamw import adamw_update, quantized_adamw_update
from lowmem.optim.base import (
    LowmemOptimizer,
    all_reduce_partials,
    as_pair,
    check_adam_group,
    check_beta,
    check_grad,
    check_nonneg_int,
    check_positive_int,
    foreach_chunks,
    local_tensor,
    sharded_groups,
)
from lowmem.optim.kinds import ELEMENTWISE_KINDS
from lowmem.optim.state import ADAM_MOMENTS, reset_whole


def beta1_decay(t: int, total_T: int | None, eta_min: float) -> float:
    """The cosine factor on beta1 and gamma1 at global step t (the released CosineDecay: torch's
    CosineAnnealingLR from 1 to eta_min with T_max = total_T + 1, held from t = total_T on)."""
    if total_T is None:
        return 1.0
    return eta_min + (1 - eta_min) * 0.5 * (1 + math.cos(math.pi * min(t, total_T) / (total_T + 1)))


class StableSPAM(LowmemOptimizer):
    """Stable-SPAM: AdamW on spike-clipped, norm-normalized gradients with periodic momentum resets.

    Args:
        params: parameters or param groups (roles are accepted and ignored: every tensor is treated alike).
        lr, betas, eps, weight_decay: AdamW's (decoupled decay, first); eps also guards the norm normalization.
        gamma1, gamma2: EMA coefficients of ||g|| and ||g||^2 (the released script: 0.85, 0.99999).
        theta: EMA coefficient of max|g| for spike clipping (0.999).
        eta_min: final cosine factor of beta1 and gamma1.
        update_gap: reset Adam's moments every this many steps (the released script: 1000; the benchmark
            paper: 200; 0: never).
        total_T: steps over which the cosine factor decays from 1 to eta_min (the run length); None: no decay.
        state_bits: 8 keeps the matrices' exp_avg and exp_avg_sq in 8-bit codes; None or 32: full precision.
        stochastic_rounding: requantize 8-bit states with unbiased random rounding.
    """

    # Even the global step T is counted per tensor (`global_step` in its state), so a tensor's update
    # needs its own gradient only.
    updates_per_parameter = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma1: float = 0.85,
        gamma2: float = 0.99999,
        theta: float = 0.999,
        eta_min: float = 0.5,
        update_gap: int = 1000,
        total_T: int | None = None,
        state_bits: int | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        betas = as_pair(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma1=gamma1,
                        gamma2=gamma2, theta=theta, eta_min=eta_min, update_gap=update_gap, total_T=total_T,
                        state_bits=state_bits, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_adam_group(group)
        for name in ("gamma1", "gamma2", "theta"):
            check_beta(name, group[name])
        if not isinstance(group["eta_min"], (int, float)) or not 0.0 <= group["eta_min"] <= 1.0:
            raise ValueError(f"invalid eta_min: {group['eta_min']!r}; it must be in [0, 1]")
        check_nonneg_int("update_gap", group["update_gap"], zero_means="never reset")
        if group["total_T"] is not None:  # None: no decay
            check_positive_int("total_T", group["total_T"])

    def _init_state(self, state: dict[str, Any], param: torch.Tensor, state_bits: int | None) -> None:
        local = local_tensor(param)
        scalar = dict(dtype=torch.promote_types(param.dtype, torch.float32), device=local.device)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["global_step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in ADAM_MOMENTS:
            quantized_state.init_moment(state, key, param, state_bits)
        state["max_abs_avg"] = torch.zeros((), **scalar)
        state["norm_avg"] = torch.zeros((), **scalar)
        state["norm_sq_avg"] = torch.zeros((), **scalar)

    def _step(self) -> None:
        work, shardings, positions = [], [], []
        position = 0  # each parameter's place in the optimizer: seeds its stochastic rounding
        for group in self.param_groups:
            for p in group["params"]:
                position += 1
                if p.grad is None:
                    continue
                check_grad(p)
                state = self.state[p]
                if not state:
                    self._init_state(state, p, group["state_bits"])
                state["global_step"] += 1
                # k: this step's count of the tensor's own counter (adamw_update increments `step` later).
                k = int(state["step"].item()) + 1
                cosine = beta1_decay(int(state["global_step"].item()), group["total_T"], group["eta_min"])
                work.append((group, p, state, local_tensor(p.grad), k, cosine))
                shardings.append(sharded_groups(p))
                positions.append(position)
        if not work:
            return

        # 1. Spike clipping against the bias-corrected EMA of max|g| (max over all shards): the entries
        # above the threshold are scaled by threshold / max|g|, one factor for the tensor.
        max_abs = [g.abs().amax().to(state["max_abs_avg"].dtype) for _, _, state, g, _, _ in work]
        all_reduce_partials(max_abs, shardings, op=dist.ReduceOp.MAX)
        clippings = []  # (limit, factor) per tensor: its chunk builds the clipped gradient
        for (group, _, state, grad, k, _), peak in zip(work, max_abs):
            theta = group["theta"]
            # theta*M + (1-theta)*peak as written (an in-place add with alpha may fuse into one FMA).
            state["max_abs_avg"].copy_(theta * state["max_abs_avg"] + (1 - theta) * peak)
            limit = state["max_abs_avg"] / (1 - theta**k)
            # max|g| = 0 means no entry exceeds the (non-negative) limit: the factor is never used.
            factor = (limit / peak.clamp_min(torch.finfo(peak.dtype).tiny)).to(grad.dtype)
            clippings.append((limit.to(grad.dtype), factor))

        # Steps 2-4 one foreach chunk at a time (cut by the global element count, so every rank cuts alike
        # and runs the same all-reduces): the chunk's clipped gradients are built once, give their norms,
        # are scaled in place and update. Holding every tensor's clipped copy at once would be a
        # model-sized copy of the gradients (13.5 GB at 7B in bf16), more than the whole 8-bit state.
        params = [p for _, p, *_ in work]
        for _, *chunk in foreach_chunks(params, work, clippings, shardings, positions):
            self._normalize_and_update(*chunk)

    def _normalize_and_update(self, work: list, clippings: list, shardings: list, positions: list) -> None:
        """Steps 2-4 for one chunk of tensors: `work` holds (group, param, state, local grad, k, cosine)."""
        # 2. Norm normalization with the bias-corrected EMAs of ||g|| (coefficient gamma1 times the
        # cosine factor) and ||g||^2 (sum over all shards). In at least fp32: a bf16 norm keeps 3 digits.
        clipped = [_clipped(grad, *clipping) for (_, _, _, grad, _, _), clipping in zip(work, clippings)]
        norms = [torch.linalg.vector_norm(g, dtype=state["norm_avg"].dtype)
                 for (_, _, state, _, _, _), g in zip(work, clipped)]
        sum_sq = [n.square() for n in norms]
        all_reduce_partials(sum_sq, shardings)
        buckets: dict[tuple[int, float], list] = {}
        quantized = []  # (group, beta1, param, state, gradient, position): 8-bit moments, one at a time
        for (group, p, state, _, k, cosine), gradient, local_norm, sq, pgs, position in zip(
                work, clipped, norms, sum_sq, shardings, positions):
            gamma1, gamma2 = group["gamma1"] * cosine, group["gamma2"]
            norm = sq.sqrt() if pgs else local_norm  # a whole tensor's norm, not sqrt(norm^2) (one rounding less)
            state["norm_avg"].copy_(gamma1 * state["norm_avg"] + (1 - gamma1) * norm)
            state["norm_sq_avg"].copy_(gamma2 * state["norm_sq_avg"] + (1 - gamma2) * sq)
            target = (state["norm_avg"] / (1 - gamma1**k)) / ((state["norm_sq_avg"] / (1 - gamma2**k)).sqrt() + group["eps"])
            # A zero gradient stays zero (0 / tiny), with no data-dependent branch.
            gradient.mul_((target / norm.clamp_min(torch.finfo(norm.dtype).tiny)).to(gradient.dtype))

            # 3. Momentum reset, effective on this very step (lowmem's fix; see the module docstring):
            # the counter goes to 0 and adamw_update's increment makes this step k = 1.
            gap = group["update_gap"]
            if gap and int(state["global_step"].item()) % gap == 0:
                reset_whole(state)  # exp_avg, exp_avg_sq (through their codes' scales if 8-bit) and step to 0

            beta1 = group["betas"][0] * cosine
            if quantized_state.is_quantized(state, "exp_avg"):
                quantized.append((group, beta1, p, state, gradient, position))
                continue
            lists = buckets.setdefault((id(group), beta1), [[], [], [], [], [], group])
            for items, item in zip(lists, (local_tensor(p), gradient, local_tensor(state["exp_avg"]),
                                           local_tensor(state["exp_avg_sq"]), state["step"])):
                items.append(item)

        # 4. AdamW with the decayed beta1 (one bucket per group and beta1: normally one per group).
        for (_, beta1), (params, gradients, exp_avgs, exp_avg_sqs, steps, group) in buckets.items():
            adamw_update(params, gradients, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1,
                         beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"])
        for group, beta1, p, state, gradient, position in quantized:
            # Seeded by T, which goes on through resets (k restarts at each).
            generator = quantized_state.rounding_generator(group["stochastic_rounding"], position,
                                                           state["global_step"] - 1, p)
            quantized_adamw_update(p, state, generator, gradient, lr=group["lr"], beta1=beta1,
                                   beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"])


def _clipped(grad: torch.Tensor, limit: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The gradient with every entry above `limit` in magnitude scaled by `factor` (a new tensor)."""
    return torch.where(grad.abs() > limit, grad * factor, grad)


register(
    "stable-spam",
    Method("lowmem.optim.stable_spam:StableSPAM",
           "Stable-SPAM: AdamW on spike-clipped, norm-normalized gradients, momentum reset every update_gap steps",
           # The released BF16 script (LLaMA-130M, 20k steps): lr 8e-4 with the class defaults above.
           presets={"llama-130m": {"lr": 8e-4}},
           from_run={"total_T": "steps"},  # its beta1 decay spans the run
           # Elementwise (AdamW on clipped, normalized gradients): factors and sparse values are
           # ordinary tensors to it (lowmem.optim.kinds).
           kinds=ELEMENTWISE_KINDS),
)
