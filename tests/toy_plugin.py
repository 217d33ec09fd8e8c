"""A structure and an intervention defined outside lowmem, registered through its public seams
(used by tests/test_assembly.py with `lowmem train --plugin tests/toy_plugin.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowmem.interventions import BaseIntervention
from lowmem.registry import INTERVENTIONS, STRUCTURES
from lowmem.structure import Structure


class ScaledLinear(nn.Module):
    """y = gain * W x, the gain a buffer: a structure whose state rides in the model's state dict."""

    def __init__(self, linear: nn.Linear, gain: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.register_buffer("toy_scale", torch.tensor(float(gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight) * self.toy_scale

    def dense_weight(self) -> torch.Tensor:
        return self.weight * self.toy_scale


class ToyScaled(Structure):
    name = "toy-scaled"

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = float(gain)
        self.converted = 0

    def convert(self, linear: nn.Linear, path: str) -> nn.Module:
        self.converted += 1
        return ScaledLinear(linear, self.gain)

    def state_dict(self) -> dict[str, Any]:
        return {"converted": self.converted, "gain": self.gain}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["gain"] == self.gain
        self.converted = state["converted"]


class FactoredLinear(nn.Module):
    param_kinds = {"a": "factor-a", "b": "factor-b"}

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, linear.in_features) * 0.02)
        self.b = nn.Parameter(torch.randn(linear.out_features, rank) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T @ self.b.T


class ToyFactored(Structure):
    name = "toy-factored"

    def __init__(self, rank: int = 2) -> None:
        self.rank = rank

    def convert(self, linear: nn.Linear, path: str) -> nn.Module:
        return FactoredLinear(linear, self.rank)


class GradientProbe(BaseIntervention):
    """Counts its calls and checks before each step that the gradients are alive."""

    name = "toy-gradient-probe"

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.calls = self.grad_norms_seen = self.after_calls = 0

    def before_step(self, step, model, optimizer) -> None:
        self.calls += 1
        grad = model.lm_head.weight.grad
        if grad is not None and grad.norm() > 0:
            self.grad_norms_seen += 1

    def after_step(self, step, model, optimizer) -> None:
        if step % self.every == 0:
            self.after_calls += 1

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "grad_norms_seen": self.grad_norms_seen, "after_calls": self.after_calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls, self.grad_norms_seen, self.after_calls = state["calls"], state["grad_norms_seen"], state["after_calls"]


STRUCTURES.register("toy-scaled", ToyScaled)
STRUCTURES.register("toy-factored", ToyFactored)
INTERVENTIONS.register("toy-gradient-probe", GradientProbe)
