"""Momentum reset for any Adam-family optimizer (the benchmark paper's restarts, methods.md §8).

Every `every` optimizer steps, zero the optimizer's moments and restart Adam's bias correction:

  m = v = 0 (also an AMSGrad max and a momentum buffer, if kept);  step = 0
  so the next update is a first Adam step: m_hat = g, v_hat = g^2, |update| = lr per entry (up to eps).

The reference code (OptimAI-Lab/Memory_Efficient_Pretraining) rebuilds its optimizer at each restart,
with a jagged schedule that dips the LR to 0.1% of its target on the restart step and ramps it back.
`lr_ramp_steps` reproduces its timing: with r = step % every (0 on the step after which the reset
happens), the step runs at `lr_floor + (1 - lr_floor) * r / (lr_ramp_steps - 1)` times the scheduled
LR while r < lr_ramp_steps, and at the scheduled LR after that. With the reference's 10 steps and
0.001: the last step before a reset runs at 0.1%, the first step on fresh moments at 11.2%, and the
9th step after the reset at the target. lr_ramp_steps = 0 (the default) keeps the LR.

The rebuild also drops the state of Fira's and APOLLO's norm-growth limiter (`limiter_norm`), so
`reset_moments` removes it too: the first update after a reset only records its norm again.

A user of the optimizer-state contract (lowmem.optim.state.reset_state on every parameter).
Works with every lowmem optimizer that keeps Adam's `exp_avg` / `exp_avg_sq` / `step` in its state
(AdamW, GaLore, Fira, APOLLO, Adam-mini, Stable-SPAM, the AdamW part of SCALE and Muon) and with
torch.optim's Adam/AdamW; other state (projectors, seeds, SPAM's norm EMAs) is left alone, except the limiter's previous norm. An
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
from lowmem.optim.quantized_state import is_quantized
from lowmem.optim.state import ADAM_MOMENTS, reset_state
from lowmem.registry import INTERVENTIONS


def reset_moments(optimizer: Optimizer) -> int:
    """Zero every moment tensor of `optimizer`, set its step counters to 0 and drop the norm-growth
    limiter's state; return how many parameters had Adam moments. Raises ValueError if the optimizer has state but no Adam moments.
    """
    adam_params = sum(
        1 for state in optimizer.state.values()
        if isinstance(state, dict) and any(isinstance(state.get(key), torch.Tensor) or is_quantized(state, key)
                                           for key in ADAM_MOMENTS)
    )
    if optimizer.state and adam_params == 0:
        raise ValueError(
            f"momentum reset needs an Adam-family optimizer (state with 'exp_avg'/'exp_avg_sq'); "
            f"{type(optimizer).__name__} keeps none"
        )
    reset_state(optimizer)
    return adam_params


def restart_lr_factor(step: int, every: int, lr_ramp_steps: int, lr_floor: float) -> float:
    """The reference's LR around a reset after step N = every, 2*every, ...: step N (whose update
    precedes the reset) at lr_floor, step N + k at lr_floor + (1 - lr_floor) * k / (lr_ramp_steps - 1)
    for k < lr_ramp_steps, then 1. A function of the step alone, so a resumed run ramps exactly as an
    uninterrupted one. Shared by momentum reset and the low-rank restarts (lowmem.structure.refactor)."""
    if lr_ramp_steps <= 0 or step < every:
        return 1.0
    k = step % every  # 0 on a reset step (the reset follows its update)
    if k >= lr_ramp_steps:
        return 1.0
    if lr_ramp_steps == 1:
        return lr_floor
    return lr_floor + (1.0 - lr_floor) * k / (lr_ramp_steps - 1)


class MomentumReset(BaseIntervention):
    """Intervention: reset the optimizer's moments every `every` steps, with an optional LR ramp.

    Args:
        every: reset after optimizer steps every, 2*every, ... (the reference: 200).
        lr_ramp_steps: steps, from the one before a reset, over which the LR climbs back from lr_floor to
            the target (the reference: 10; see the module docstring).
        lr_floor: the LR factor of the step after which a reset happens (the reference: 0.001).
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
        return restart_lr_factor(step, self.every, self.lr_ramp_steps, self.lr_floor)

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
