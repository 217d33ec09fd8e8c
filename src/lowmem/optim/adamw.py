"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101).

  W *= 1 - lr*wd                      (decoupled decay, before the update)
  m  = beta1*m + (1-beta1)*g
  v  = beta2*v + (1-beta2)*g^2
  W -= lr * (m / (1-beta1^t)) / (sqrt(v / (1-beta2^t)) + eps)

`adamw_update` is the functional core every other lowmem optimizer calls for the parameters it leaves
to Adam (embedding, head, vectors); `AdamW` is the thin class over it and the baseline of every
comparison. The core has both placements of eps found in the methods' released codes:

  eps_placement="corrected"    (torch.optim.AdamW, the formula above; AdamW, Muon, Adam-mini, Stable-SPAM)
      W -= (lr / (1-beta1^t)) * m / (sqrt(v) / sqrt(1-beta2^t) + eps)
  eps_placement="uncorrected"  (Kingma & Ba's efficient form; GaLore, Fira, APOLLO and SCALE release this)
      W -= (lr * sqrt(1-beta2^t) / (1-beta1^t)) * m / (sqrt(v) + eps)

The two differ only through eps (the second's eps is sqrt(1-beta2^t) times larger relative to
sqrt(v_hat): 30x at t = 1 with beta2 0.999), which matters for tensors whose v is small (norm gains,
rare embedding rows). `decay="before"` (torch) or `"after"` (GaLore/Fira/APOLLO: `W *= 1 - lr*wd`
after the update) places the decoupled weight decay. State per parameter: `step` (a float32 scalar tensor, as in torch.optim, so checkpoints
load with weights_only=True and momentum resets can restart bias correction per tensor), `exp_avg`,
`exp_avg_sq`.

`state_bits=8` keeps the moments of every matrix of >= 4096 elements in blockwise 8-bit codes
(lowmem.optim.quantized_state: `exp_avg_codes`/`exp_avg_absmax` with the signed map, `exp_avg_sq_codes`/
`exp_avg_sq_absmax` with the unsigned map without zero); each such parameter is updated on its own:
its moments dequantized to fp32, the same AdamW update, the moments requantized, so at most one
parameter's fp32 moments exist at a time. `stochastic_rounding=True` requantizes with unbiased random
rounding, drawn from a generator seeded by the parameter's position and its step (the same draws
whatever order parameters are updated in: inside backward or after it).

`compiled=True` (issue 28, default off; `--opt compiled=true`) updates the full-precision moments of
each (device, dtype) bucket of a group in one torch.compile'd graph (`adamw_update(compiled=True)`, backend
`COMPILE_BACKEND`: inductor): the same math as the foreach path, both eps and both decay placements,
fused into one pass per tensor. What the schedule changes is a tensor: the lr arrives as a 0-dim
float64 tensor built from `group["lr"]` each step (the trainer writes a Python float there; a new lr
is a new value, not a new graph), and the bias corrections are computed inside from the step tensors
in float64 (no `.item()`, no graph break). One graph per bucket, traced at the first step and reused:
changing the lr, or stepping on, compiles nothing new. In fp32 it is the eager step within rounding
(tests/test_compiled_step.py: 20 steps within 1e-6 of how far each weight moved); bf16 weights round
once per fused pass rather than once per operation. Kept eager: 8-bit moments (`state_bits=8`, one
parameter at a time as above), DTensor (FSDP2) parameters, and meta tensors (the memory estimate's
step). The graphs of one process are at most `COMPILE_LIMIT` (64) buckets, then torch raises
FailOnRecompileLimitHit: reached only by many compiled models in one process (`--gradient-release`
makes each parameter's (shape, group) a bucket of its own: 5 graphs at llama-60m, 3 without, counted
with a counting backend).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from lowmem.compiled import compiled
from lowmem.optim import quantized_state
from lowmem.optim.base import (
    LowmemOptimizer,
    as_pair,
    check_adam_group,
    check_choice,
    check_grad,
    foreach_chunks,
    group_by_device_dtype,
    is_dtensor,
)
from lowmem.optim.state import ADAM_MOMENTS

EPS_PLACEMENTS = ("corrected", "uncorrected")
DECAY_PLACEMENTS = ("before", "after")
# The Adam form of the released GaLore, Fira and APOLLO codes, for the tensors they leave to Adam.
RELEASED_LOW_RANK_ADAM = {"eps_placement": "uncorrected", "decay": "after"}
# `compiled=True`: torch.compile's backend for the update (a test may swap in a counting or lighter one),
# and how many graphs (buckets: group x device x dtype, specialized on shapes) one process may compile.
COMPILE_BACKEND: Any = "inductor"
COMPILE_LIMIT = 64


def init_adam_state(state: dict[str, Any], param: torch.Tensor, state_bits: int | None = None) -> None:
    """Zero moments and step; in 8-bit codes when `state_bits` quantizes a parameter of this global shape."""
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    for key in ADAM_MOMENTS:
        quantized_state.init_moment(state, key, param, state_bits)


class AdamBatch:
    """The parameters one optimizer step leaves to Adam: those in full precision gathered for a single
    `adamw_update` call, those with 8-bit moments (`state_bits=8`) updated one at a time."""

    def __init__(self, state_bits: int | None = None, stochastic_rounding: bool = False, compiled: bool = False) -> None:
        """`compiled`: the full-precision tensors go to `adamw_update(compiled=True)`."""
        self.state_bits, self.stochastic_rounding, self.compiled = state_bits, stochastic_rounding, compiled
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []
        self.quantized: list[tuple[int, torch.Tensor, dict[str, Any]]] = []

    def add(self, param: torch.Tensor, state: dict[str, Any], position: int = 0) -> None:
        """`position`: the parameter's place in its optimizer (seeds its stochastic rounding)."""
        if not state:
            init_adam_state(state, param, self.state_bits)
        if quantized_state.is_quantized(state, "exp_avg"):
            self.quantized.append((position, param, state))
            return
        self.params.append(param)
        self.grads.append(param.grad)
        self.exp_avgs.append(state["exp_avg"])
        self.exp_avg_sqs.append(state["exp_avg_sq"])
        self.steps.append(state["step"])

    def step(self, **hparams: Any) -> None:
        """One `adamw_update` over the gathered tensors (hparams: its keyword arguments), compiled when
        `self.compiled`."""
        adamw_update(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps, compiled=self.compiled,
                     **hparams)
        for position, param, state in self.quantized:
            quantized_adamw_update(param, state, self._rounding(position, param, state), **hparams)

    def _rounding(self, position: int, param: torch.Tensor, state: dict[str, Any]) -> torch.Generator | None:
        """Stochastic rounding's generator, seeded by the parameter's position and the step about to be
        taken; on the parameter's device (the CPU for a meta parameter). Under FSDP2 each rank draws
        for its own rows, so two processes round alike in distribution, not bit for bit like one."""
        return quantized_state.rounding_generator(self.stochastic_rounding, position, state["step"], param)


def quantized_adamw_update(param: torch.Tensor, state: dict[str, Any], generator: torch.Generator | None,
                           grad: torch.Tensor | None = None, **hparams: Any) -> None:
    """`adamw_update` of one parameter whose moments are 8-bit codes, from `grad` (else its gradient): in
    fp32 (fp64 beside fp64 weights) on this rank's part (blocks lie within rows, so a shard needs nobody
    else's), a block of rows at a time, then requantized (quantized_state.dequantized_rows: elementwise,
    so blocks of rows are the whole update's result; each takes the step about to be counted)."""
    step = state["step"]
    for weights, grad_rows, (exp_avg, exp_avg_sq) in quantized_state.dequantized_rows(
            param, state, ADAM_MOMENTS, generator, grad):
        adamw_update([weights], [grad_rows], [exp_avg], [exp_avg_sq], [step.clone()], **hparams)
    step += 1


def scheduled_adam_lr(adam_lr: float, group: dict[str, Any]) -> float:
    """`adam_lr` at the group's current point of the schedule: adam_lr * lr / initial_lr, so tensors
    left to Adam by SCALE or Muon follow the same warmup and cosine as the rest (0 at a zero peak)."""
    peak = group["initial_lr"]
    return adam_lr * group["lr"] / peak if peak else 0.0


def adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    foreach: bool = True,
    eps_placement: str = "corrected",
    decay: str = "before",
    compiled: bool = False,
) -> None:
    """One AdamW step over lists of tensors (steps are incremented here); see the module docstring
    for `eps_placement` ("corrected" | "uncorrected") and `decay` ("before" | "after").

    `compiled`: each (device, dtype) bucket in one torch.compile'd graph (`_adamw_tensor_core`): the lr
    goes in as a 0-dim float64 tensor, the bias corrections come from the step tensors inside, so neither
    a new lr nor a new step compiles anything. DTensor and meta parameters take the eager path."""
    check_choice("eps_placement", eps_placement, EPS_PLACEMENTS)
    check_choice("decay", decay, DECAY_PLACEMENTS)
    if not params:
        return
    corrected, decay_first = eps_placement == "corrected", decay == "before"
    if compiled and not any(is_dtensor(p) or p.is_meta for p in params):
        core, lr_tensor = compiled_function(_adamw_tensor_core), torch.tensor(float(lr), dtype=torch.float64)
        for bucket in group_by_device_dtype(params, grads, exp_avgs, exp_avg_sqs, steps):
            core(*bucket, lr_tensor, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 corrected=corrected, decay_first=decay_first)
        return
    if foreach and not any(is_dtensor(p) for p in params):
        for group in foreach_chunks(params, grads, exp_avgs, exp_avg_sqs, steps):
            _adamw_foreach(*group, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                           corrected=corrected, decay_first=decay_first)
        return
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        s += 1
        t = s.item()
        if weight_decay and decay_first:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1 = 1 - beta1**t
        bias2_sqrt = (1 - beta2**t) ** 0.5
        if corrected:
            p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-lr / bias1)
        else:
            p.addcdiv_(m, v.sqrt().add_(eps), value=-lr * bias2_sqrt / bias1)
        if weight_decay and not decay_first:
            p.mul_(1 - lr * weight_decay)


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                   corrected, decay_first) -> None:
    torch._foreach_add_(steps, 1)
    if weight_decay and decay_first:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    # Step counts may differ per tensor (a momentum reset restarts some), so bias corrections are
    # per tensor; they are Python floats to keep the update off the autograd/scalar-tensor path.
    ts = [s.item() for s in steps]
    bias2_sqrts = [(1 - beta2**t) ** 0.5 for t in ts]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    if corrected:
        step_sizes = [-lr / (1 - beta1**t) for t in ts]
        torch._foreach_div_(denoms, bias2_sqrts)
    else:
        step_sizes = [-lr * b2 / (1 - beta1**t) for t, b2 in zip(ts, bias2_sqrts)]
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
    if weight_decay and not decay_first:
        torch._foreach_mul_(params, 1 - lr * weight_decay)


def compiled_function(function: Callable[..., None]) -> Callable[..., None]:
    """`function` (an update over lists of tensors) compiled for an optimizer step (lowmem.compiled's
    cache, `COMPILE_BACKEND`): the whole list in one graph, shapes static (a bucket's tensors keep
    theirs), at most `COMPILE_LIMIT` graphs. The compiled steps of every method go through here."""
    return compiled(function, COMPILE_BACKEND, fullgraph=True, dynamic=False, recompile_limit=COMPILE_LIMIT)


def _adamw_tensor_core(params, grads, exp_avgs, exp_avg_sqs, steps, lr, *, beta1, beta2, eps, weight_decay,
                       corrected, decay_first) -> None:
    """`_adamw_foreach`'s update with the lr a 0-dim tensor and the bias corrections computed from the
    step tensors, in float64 as eager's Python floats (1 - beta2^t in float32 would lose digits: 6e-5
    relative at t = 1; -expm1(t log beta) is 1 - beta^t without the cancellation); each tensor's
    operations in the order of the eager ones, which the compiler fuses into one pass.

    A tensor's two scalars (the step size, the denominator's bias scale) are stacked and each read out
    of the stack: a value read twice is computed once, before the loop over elements, where a scalar read
    once is recomputed inside it (inductor on the CPU: two expm1 per 8 elements, a fused step as slow
    as the eager one at llama-60m)."""
    decay_factor = 1 - lr * weight_decay
    log_beta1, log_beta2 = math.log(beta1) if beta1 else -math.inf, math.log(beta2) if beta2 else -math.inf
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        s.add_(1)
        t = s.to(torch.float64)
        bias1 = -torch.expm1(t * log_beta1)
        bias2_sqrt = (-torch.expm1(t * log_beta2)).sqrt()
        scalars = torch.stack([-lr / bias1, bias2_sqrt])
        if weight_decay and decay_first:
            p.mul_(decay_factor)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if corrected:
            step_size, denom = scalars[0], v.sqrt() / scalars[1] + eps
        else:
            step_size, denom = scalars[0] * scalars[1], v.sqrt() + eps
        p.add_(step_size * m / denom)
        if weight_decay and not decay_first:
            p.mul_(decay_factor)


class AdamW(LowmemOptimizer):
    """AdamW over ordinary params or role groups (roles are accepted and ignored: every tensor is Adam's)."""

    updates_per_parameter = True  # Adam is per tensor (lowmem.optim.base.LowmemOptimizer)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool = True,
        state_bits: int | None = None,
        stochastic_rounding: bool = False,
        compiled: bool = False,
    ) -> None:
        betas = as_pair(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
                        state_bits=state_bits, stochastic_rounding=stochastic_rounding, compiled=compiled)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_adam_group(group)

    def _step(self) -> None:
        position = 0
        for group in self.param_groups:
            batch = AdamBatch(group["state_bits"], group["stochastic_rounding"], group["compiled"])
            for p in group["params"]:
                position += 1
                if p.grad is not None:
                    check_grad(p)
                    batch.add(p, self.state[p], position)
            beta1, beta2 = group["betas"]
            batch.step(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], foreach=group["foreach"])
