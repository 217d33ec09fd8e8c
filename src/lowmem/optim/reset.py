"""Momentum reset for any Adam-family optimizer (the benchmark paper's restarts, methods.md §8).

Every `every` optimizer steps, zero the optimizer's moments and restart Adam's bias correction:

  m = v = 0 (also an AMSGrad max and a momentum buffer, if kept);  step = 0
  so the next update is a first Adam step: m_hat = g, v_hat = g^2, |update| = lr per entry (up to eps).

The reference code rebuilds its optimizer at each restart and dips the LR to 0.1% of its target,
ramping back over 10 steps. `lr_ramp_steps` reproduces the ramp: the k-th update after a reset
(k = 1, 2, ...) runs at `lr_floor + (1 - lr_floor) * (k - 1) / lr_ramp_steps` times the scheduled LR
while k <= lr_ramp_steps (so the first update after a reset, the first one with fresh moments, runs
at lr_floor), and at the scheduled LR after that. lr_ramp_steps = 0 (the default) keeps the LR.

A user of the optimizer-state contract (lowmem.optim.state.reset_state on every parameter).
Works with every lowmem optimizer that keeps Adam's `exp_avg` / `exp_avg_sq` / `step` in its state
(AdamW, GaLore, Fira, APOLLO, Adam-mini, Stable-SPAM, the AdamW part of SCALE and Muon) and with
torch.optim's Adam/AdamW; other state (projectors, seeds, SPAM's norm EMAs) is left alone. An
optimizer without Adam moments is refused with a ValueError. FSDP2: moments are DTensor shards,
zeroed in place on every rank — no communication.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem.interventions import BaseIntervention
from lowmem.optim.base import check_positive_int
from lowmem.optim.state import reset_state
from lowmem.registry import INTERVENTIONS

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def reset_moments(optimizer: Optimizer) -> int:
    """Zero every moment tensor of `optimizer` and set its step counters to 0; return how many
    parameters had Adam moments. Raises ValueError if the optimizer has state but no Adam moments.
    """
    adam_params = sum(
        1 for state in optimizer.state.values()
        if isinstance(state, dict) and any(isinstance(state.get(key), torch.Tensor) for key in ADAM_MOMENTS)
    )
    if optimizer.state and adam_params == 0:
        raise ValueError(
            f"momentum reset needs an Adam-family optimizer (state with 'exp_avg'/'exp_avg_sq'); "
            f"{type(optimizer).__name__} keeps none"
        )
    reset_state(optimizer)
    return adam_params


class MomentumReset(BaseIntervention):
    """Intervention: reset the optimizer's moments every `every` steps, with an optional LR ramp.

    Args:
        every: reset after optimizer steps every, 2*every, ... (the reference: 200).
        lr_ramp_steps: updates after a reset over which the LR climbs back from lr_floor (the reference: 10).
        lr_floor: the LR factor of the first update after a reset (the reference: 0.001).
    """

    name = "momentum-reset"

    def __init__(self, every: int, lr_ramp_steps: int = 0, lr_floor: float = 0.001) -> None:
        check_positive_int("every", every)
        if not isinstance(lr_ramp_steps, int) or isinstance(lr_ramp_steps, bool) or lr_ramp_steps < 0:
            raise ValueError(f"invalid lr_ramp_steps: {lr_ramp_steps!r}; it must be an integer >= 0")
        if lr_ramp_steps > every:
            raise ValueError(f"invalid lr_ramp_steps: {lr_ramp_steps!r}; it must be at most every ({every})")
        if not isinstance(lr_floor, (int, float)) or not 0.0 <= lr_floor <= 1.0:
            raise ValueError(f"invalid lr_floor: {lr_floor!r}; it must be in [0, 1]")
        self.every = every
        self.lr_ramp_steps = lr_ramp_steps
        self.lr_floor = float(lr_floor)
        self.resets = 0
        self.last_reset_step = 0

    def after_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        if step % self.every == 0:
            reset_moments(optimizer)
            self.resets += 1
            self.last_reset_step = step

    def lr_factor(self, step: int) -> float:
        # A function of the step alone, so a resumed run ramps exactly as an uninterrupted one.
        since_reset = step - ((step - 1) // self.every) * self.every  # 1 for the first update after a reset
        if step <= self.every or since_reset > self.lr_ramp_steps:
            return 1.0
        return self.lr_floor + (1.0 - self.lr_floor) * (since_reset - 1) / self.lr_ramp_steps

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "lr_ramp_steps": self.lr_ramp_steps, "lr_floor": self.lr_floor,
                "resets": self.resets, "last_reset_step": self.last_reset_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The ramp settings come from this run's configuration; the schedule must not move.
        if state["every"] != self.every:
            raise ValueError(
                f"the checkpoint's momentum reset ran every {state['every']} steps, this run asks for every "
                f"{self.every}: resets would land on other steps; resume with every={state['every']}"
            )
        self.resets = state["resets"]
        self.last_reset_step = state["last_reset_step"]


INTERVENTIONS.register("momentum-reset", MomentumReset)
