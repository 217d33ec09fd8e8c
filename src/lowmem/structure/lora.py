"""LoRA for pretraining, and ReLoRA's merges (the `lora-merge` intervention).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685); Lialin et al.,
"ReLoRA: High-Rank Training Through Low-Rank Updates" (arXiv 2307.05695); methods.md section 8.

  y = W0 x + (alpha / r) B (A x)     W0: out x in, frozen (kind frozen, requires_grad False)
  at the start: W0 the dense model's initial weight, B = 0, A Kaiming-uniform (so y = W0 x)

ReLoRA (`--intervention lora-merge:every=N`): after every N-th optimizer step
  W0 += (alpha / r) B A;  A re-initialized (Kaiming), B = 0      (the model's function is unchanged)
  the optimizer state of A and B (and of nothing else) reset via lowmem.optim.state.reset_state
  the learning rate restarts: the k-th update after a merge runs at k / (ramp_steps + 1) of the
  scheduled rate for k <= ramp_steps (ReLoRA's jagged cosine; its scripts use a 50-100 step warm restart)
The benchmark's reference code ships ReLoRA with A and B both zero and never merges; here the factors
move and each merge changes W0, under FSDP2 too (each rank merges its rows of W0). Frozen W0 stays in the model's state dict, so checkpoints carry it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from lowmem.interventions import BaseIntervention
from lowmem.optim.base import check_positive_int, is_dtensor
from lowmem.optim.state import reset_state
from lowmem.registry import INTERVENTIONS, STRUCTURES
from lowmem.structure.lowrank import LowRankLinear, RankedStructure, kaiming_uniform_


class LoRALinear(LowRankLinear):
    """y = W0 x + scale * B (A x), W0 frozen."""

    param_kinds = {"weight": "frozen", "lora_A": "factor-a", "lora_B": "factor-b"}

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(linear.in_features, linear.out_features, rank, alpha, device=linear.weight.device,
                         dtype=linear.weight.dtype, zero_b=True)
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.low_rank(x)

    def dense_weight(self) -> torch.Tensor:
        return self.weight + self.product()

    @torch.no_grad()
    def merge_and_reinit(self) -> None:
        """W0 += scale * B A; A re-initialized, B = 0 (the layer's output is unchanged).

        FSDP2 (W0, A, B row-sharded DTensors): A and B are gathered whole (r x (in + out)), each rank
        adds its own rows of scale * B A to its shard of W0, and the new A is drawn on rank 0 and
        broadcast, so every rank holds its rows of the same matrix."""
        if not is_dtensor(self.lora_A):
            self.weight.add_(self.product())
            self.reset_factors(zero_b=True)
            return
        import torch.distributed as dist

        from lowmem.optim.base import rows_of

        a, b = self.lora_A.full_tensor(), self.lora_B.full_tensor()
        w0 = self.weight.to_local()
        w0.add_((rows_of(b, self.weight) @ a * self.scale).to(w0.dtype))
        new_a = kaiming_uniform_(torch.empty_like(a))
        group = self.lora_A.device_mesh.get_group()
        dist.broadcast(new_a, src=dist.get_global_rank(group, 0), group=group)
        self.lora_A.to_local().copy_(rows_of(new_a, self.lora_A))
        self.lora_B.to_local().zero_()


class LoRA(RankedStructure):
    """`--structure lora:rank=128,alpha=32`: W0 frozen plus a trained rank-r update."""

    name = "lora"

    def convert(self, linear: nn.Linear, path: str) -> nn.Module:
        self.check_linear(linear, path)
        return LoRALinear(linear, self.rank, self.alpha)


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


class LoRAMerge(BaseIntervention):
    """ReLoRA's restarts: merge, re-initialize, reset the factors' state, re-warm the LR.

    Args:
        every: merge after optimizer steps every, 2*every, ... (ReLoRA's scripts: 5000 at 250M-1.3B).
        ramp_steps: updates after a merge over which the LR climbs back linearly (0: no ramp).
            Default 10 here; ReLoRA's scripts use 50-100 of 20000+ steps.
    """

    name = "lora-merge"

    def __init__(self, every: int, ramp_steps: int = 10) -> None:
        check_positive_int("every", every)
        if not isinstance(ramp_steps, int) or isinstance(ramp_steps, bool) or not 0 <= ramp_steps <= every:
            raise ValueError(f"invalid ramp_steps: {ramp_steps!r}; it must be an integer in [0, every={every}]")
        self.every, self.ramp_steps = every, ramp_steps
        self.merges = 0

    def after_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        if step % self.every:
            return
        modules = lora_modules(model)
        if not modules:
            raise ValueError("lora-merge needs a model with the lora structure (--structure lora:rank=...)")
        for module in modules:
            module.merge_and_reinit()
        reset_state(optimizer, params=[p for m in modules for p in (m.lora_A, m.lora_B)])
        self.merges += 1

    def lr_factor(self, step: int) -> float:
        since = step - ((step - 1) // self.every) * self.every  # 1 for the first update after a merge
        if step <= self.every or since > self.ramp_steps:
            return 1.0
        return since / (self.ramp_steps + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "ramp_steps": self.ramp_steps, "merges": self.merges}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["every"] != self.every:
            raise ValueError(f"the checkpoint merged every {state['every']} steps, this run asks every {self.every}; "
                             f"resume with every={state['every']}")
        self.merges = state["merges"]


STRUCTURES.register("lora", LoRA)
INTERVENTIONS.register("lora-merge", LoRAMerge)

__all__ = ["LoRA", "LoRALinear", "LoRAMerge", "lora_modules"]
