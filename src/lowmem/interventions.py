"""Periodic interventions: the protocol, and how a config names one.

An intervention acts on the model and optimizer at step boundaries: momentum reset
(lowmem.optim.reset), and whatever a structure brings (refactorization, merges, topology updates).
The trainer calls every intervention through this one protocol. Each owns its state and returns it
from `state_dict()` (tensors and plain numbers only), which checkpoints keep under the intervention's
`name`, so after a resume interventions land on the same steps as in an uninterrupted run.

Step numbering: `step` is the number of the optimizer step concerned (1-based).
  check_model(model)                  a classmethod, before it is built: refuses a model without its structure
  setup(context)                      once, before training: the run's length, rank, world size and
                                      its base lr schedule (`context.base_lr_factor(step)`)
  lr_factor(step)                     multiplies the scheduled lr of optimizer step `step`
  before_step(step, model, optimizer) after backward, before optimizer step `step`: gradients are alive
  after_step(step, model, optimizer)  right after optimizer step `step`, before the next forward pass
`model` is the unwrapped model (no DDP wrapper; FSDP2 shards are DTensors).

With the update inside backward (`--gradient-release`) there is no moment when the step's gradients
are all alive before the update: each parameter's update runs, and its gradient is freed, as soon as
backward completes it. `before_step` then runs after backward, the update already applied and the
gradients gone; an intervention whose `before_step` reads gradients or must precede the update says
so with `reads_gradients()` (by default: whether its class defines its own `before_step`), and such a
run is refused before it starts.

Registered in lowmem.registry.INTERVENTIONS by the module that defines each; built from a config
entry {"name": ..., key: value, ...} (on the command line `--intervention name:key=value,...`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn
from torch.optim import Optimizer

from lowmem.errors import ConfigError
from lowmem.registry import INTERVENTIONS


def schedule_factor(step: int, total: int, warmup_ratio: float = 0.1, min_ratio: float = 0.1,
                    kind: str = "cosine", decay_ratio: float = 0.2) -> float:
    """The learning-rate schedule for optimizer step `step` (0-based) of `total`: linear warmup over
    W = round(warmup_ratio * total) steps, (step + 1) / W, then
      cosine (the papers'): min + (1 - min) (1 + cos(pi (step - W) / (total - W))) / 2;
      wsd (warmup-stable-decay): 1 until the last D = round(decay_ratio * total) steps, then linearly
        to `min_ratio` at the last step, so a longer run's stable phase leaves its past unchanged.
    A pure function of the step, so a resumed run continues it exactly. Defined here, below every user
    (the trainer's schedule and the interventions whose lr follows it)."""
    warmup = round(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if kind == "wsd":
        decay = round(decay_ratio * total)
        into = step - (total - decay)
        if decay <= 0 or into < 0:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * min(1.0, (into + 1) / decay)
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RunContext:
    """What an intervention may need to know about the run it is part of: its length, rank and world
    size, and the base schedule the trainer multiplies every intervention's lr factor into (ReLoRA's
    restarts ramp to the scheduled value at the end of their ramp, so they need to see it)."""

    total_steps: int
    rank: int = 0
    world_size: int = 1
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    decay_ratio: float = 0.2
    # The run's unwrapped model, so each intervention can refuse at start-up a model without the
    # structure it acts on (check_model); None where a caller has no model (no check).
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def warmup_steps(self) -> int:
        """The schedule's first warmup, in optimizer steps."""
        return round(self.warmup_ratio * self.total_steps)

    def base_lr_factor(self, step: int) -> float:
        """The schedule's factor for optimizer step `step` (1-based), before any intervention's."""
        return schedule_factor(step - 1, self.total_steps, self.warmup_ratio, self.min_lr_ratio,
                               self.schedule, self.decay_ratio)


@runtime_checkable
class Intervention(Protocol):
    name: str

    def setup(self, context: RunContext) -> None: ...

    def before_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None: ...

    def after_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None: ...

    def lr_factor(self, step: int) -> float: ...

    def reads_gradients(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BaseIntervention:
    """No-op defaults for every hook, so an intervention defines only the ones it uses."""

    name = "intervention"

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Refuse (ConfigError naming the fix) a model without the structure this intervention acts on;
        called before the intervention is built, so a missing structure is named before any setting."""

    def setup(self, context: RunContext) -> None:
        pass

    def before_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        pass

    def after_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        pass

    def lr_factor(self, step: int) -> float:
        return 1.0

    def reads_gradients(self) -> bool:
        """Whether `before_step` needs the step's gradients before the update (this run's settings may
        decide it); an intervention that defines `before_step` is taken to, unless it says otherwise."""
        return type(self).before_step is not BaseIntervention.before_step

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_intervention(name: str, **settings: Any) -> Intervention:
    """The intervention registered as `name`, built with `settings`; bad settings raise ConfigError."""
    return INTERVENTIONS.build(name, **settings)


def build_interventions(specs: list[dict[str, Any]], context: RunContext) -> list[Intervention]:
    """Interventions from config entries, set up for the run."""
    interventions = []
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"an intervention entry must be a mapping with a 'name', got {spec!r}")
        check_model = getattr(INTERVENTIONS.get(spec["name"]), "check_model", None)
        if context.model is not None and check_model is not None:
            check_model(context.model)
        intervention = build_intervention(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
        intervention.setup(context)
        interventions.append(intervention)
    names = [i.name for i in interventions]
    if len(set(names)) != len(names):
        raise ConfigError(f"interventions {names} repeat a name; their states would collide in checkpoints")
    return interventions
