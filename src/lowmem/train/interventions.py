"""Periodic interventions: momentum reset, weight refactorization, ReLoRA merge, sparse topology update.

The trainer calls every intervention at step boundaries through this one small protocol. Each owns
its state and returns it from `state_dict()` (tensors and plain numbers only), which the trainer
stores in checkpoints under the intervention's `name`, so that after a resume interventions land on
the same steps as in an uninterrupted run.

Step numbering: `step` is the number of optimizer steps completed so far. `after_step(step, ...)` runs
right after optimizer step number `step` (1-based) and before the next forward pass; `lr_factor(step)`
multiplies the scheduled learning rate of the optimizer step that will become step number `step`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn
from torch.optim import Optimizer


@runtime_checkable
class Intervention(Protocol):
    name: str

    def after_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None: ...

    def lr_factor(self, step: int) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# name -> "module:Class"; each class takes its hyperparameters as keyword arguments.
INTERVENTIONS: dict[str, str] = {}


def register_intervention(name: str, target: str) -> None:
    INTERVENTIONS[name] = target


def build_intervention(name: str, **kwargs: Any) -> Intervention:
    import importlib

    for module in ("lowmem.optim.reset",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r}; choose one of: {', '.join(sorted(INTERVENTIONS)) or '(none)'}")
    module, cls = INTERVENTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
