"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101).

  W *= 1 - lr*wd                      (decoupled decay, before the update)
  m  = beta1*m + (1-beta1)*g
  v  = beta2*v + (1-beta2)*g^2
  W -= lr * (m / (1-beta1^t)) / (sqrt(v / (1-beta2^t)) + eps)

`adamw_update` is the functional core every other lowmem optimizer calls for the parameters it leaves
to Adam (embedding, head, vectors); `AdamW` is the thin class over it and the baseline of every
comparison. State per parameter: `step` (a float32 scalar tensor, as in torch.optim, so checkpoints
load with weights_only=True and momentum resets can restart bias correction per tensor), `exp_avg`,
`exp_avg_sq`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from lowmem.optim.base import check_beta, check_grad, check_nonneg, group_by_device_dtype, is_dtensor


def init_adam_state(state: dict[str, Any], param: torch.Tensor) -> None:
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


class AdamBatch:
    """The parameters one optimizer step leaves to Adam, gathered for a single `adamw_update` call."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []

    def add(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        if not state:
            init_adam_state(state, param)
        self.params.append(param)
        self.grads.append(param.grad)
        self.exp_avgs.append(state["exp_avg"])
        self.exp_avg_sqs.append(state["exp_avg_sq"])
        self.steps.append(state["step"])

    def step(self, **hparams: Any) -> None:
        adamw_update(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps, **hparams)


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
) -> None:
    """One AdamW step over lists of tensors (steps are incremented here)."""
    if not params:
        return
    if foreach and not any(is_dtensor(p) for p in params):
        for group in group_by_device_dtype(params, grads, exp_avgs, exp_avg_sqs, steps):
            _adamw_foreach(*group, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        return
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        s += 1
        t = s.item()
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1 = 1 - beta1**t
        bias2_sqrt = (1 - beta2**t) ** 0.5
        denom = (v.sqrt() / bias2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias1)


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    torch._foreach_add_(steps, 1)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    # Step counts may differ per tensor (a momentum reset restarts some), so bias corrections are
    # per tensor; they are Python floats to keep the update off the autograd/scalar-tensor path.
    ts = [s.item() for s in steps]
    step_sizes = [-lr / (1 - beta1**t) for t in ts]
    bias2_sqrts = [(1 - beta2**t) ** 0.5 for t in ts]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias2_sqrts)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)



class AdamW(Optimizer):
    """AdamW over ordinary params or role groups (roles are accepted and ignored: every tensor is Adam's)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool = True,
    ) -> None:
        check_nonneg("lr", lr)
        check_beta("betas[0]", betas[0])
        check_beta("betas[1]", betas[1])
        check_nonneg("eps", eps)
        check_nonneg("weight_decay", weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            batch = AdamBatch()
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p)
                    batch.add(p, self.state[p])
            beta1, beta2 = group["betas"]
            batch.step(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], foreach=group["foreach"])
        return loss
