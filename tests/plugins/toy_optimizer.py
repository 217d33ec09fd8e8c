"""Signum, an optimizer written outside lowmem by the recipe of docs/architecture.md ("Add an
optimizer"): loaded with `lowmem train --plugin tests/plugins/toy_optimizer.py`, and by
tests/test_optimizer_contract.py, which loads every file of tests/plugins/ and so runs the contract
tests (validation, state round trips, meta step, FSDP2 = one process, a bench grid) on it unedited.

Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD: Compressed Optimisation for Non-Convex
Problems", ICML 2018, arXiv 1802.04434. Signum, per tensor W with gradient G at scheduled rate lr_t:

  W *= 1 - lr_t * weight_decay                (decoupled decay, first)
  m  = momentum * m + (1 - momentum) * G      (an EMA: lerp)
  W -= lr_t * sign(m)

Every role alike (the rule is elementwise, so FSDP2 shards need no communication); state: one
`momentum_buffer` per tensor, the name lowmem.optim.state's resets know.
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem.optim import Method, register
from lowmem.optim.base import LowmemOptimizer, check_beta, check_grad, check_nonneg


class Signum(LowmemOptimizer):
    """Signum; see the module docstring."""

    def __init__(self, params, lr: float = 1e-4, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_nonneg("lr", group["lr"])
        check_beta("momentum", group["momentum"])
        check_nonneg("weight_decay", group["weight_decay"])

    def _step(self) -> None:
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_grad(p)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                if weight_decay:
                    p.mul_(1 - lr * weight_decay)
                buffer.lerp_(p.grad, 1 - momentum)
                p.add_(buffer.sign(), alpha=-lr)


register("toy-signum", Method(f"{__name__}:Signum", "Signum (sign of an EMA of the gradient), a test plugin"))
