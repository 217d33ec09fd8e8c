"""One optimizer step of training, apart from the loop around it.

    result = train_step(model, AfterBackward(optimizer, clip_grad_norm=1.0), micro_batches, info=info,
                        autocast=autocast, before_update=hook)

Runs this rank's micro-batches (forward with the labels, which returns the summed token loss, plain
or chunked as the model is set; backward; gradient accumulation), each micro-batch's summed token
loss scaled by world_size / (non-pad targets of the whole global batch), so the gradient is the
token-weighted mean over the global batch whatever the accumulation and the number of ranks (DDP and
FSDP average over ranks, hence the factor world_size). The target count, the scale and the loss sum
stay on the device (float64 sums, as the host's were: the same bits on CPU), and the step waits for
the device once, at its end, to read its loss. If the loss is finite, the update is applied;
otherwise nothing is (`StepResult.updated` False).

Where the update happens is the `Update` passed in, not a branch here: `AfterBackward` is
torch.optim's way (gradients accumulate over the micro-batches; then `before_update()`, the hook
interventions use to see live gradients, optional clipping, `optimizer.step()`; gradients are left
in place for the caller, which measures them, to zero). An update applied inside backward, per
parameter as its gradient completes, is another `Update` whose `backward` arms it on the last
micro-batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem.distributed import DistInfo, all_reduce_sum
from lowmem.models import IGNORE_INDEX


@dataclass(frozen=True)
class StepResult:
    loss: float  # token-weighted mean loss over the global batch
    targets: int  # non-pad target tokens of the global batch
    updated: bool  # False when the loss was not finite and the update was not applied


class Update(Protocol):
    """Where a step's update happens: each micro-batch's backward goes through `backward` (`last`:
    the step's last micro-batch, whose backward completes the gradients), and `apply` follows once
    the step's loss is known to be finite."""

    def backward(self, loss: torch.Tensor, last: bool) -> None: ...

    def apply(self, model: nn.Module, before_update: Callable[[], None] | None) -> None: ...


class AfterBackward:
    """The update after the step's whole backward, as torch.optim does it: `before_update()` sees the
    accumulated gradients, then they are clipped to `clip_grad_norm` (0: not clipped), then
    `optimizer.step()`."""

    def __init__(self, optimizer: Optimizer, clip_grad_norm: float = 0.0) -> None:
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def apply(self, model: nn.Module, before_update: Callable[[], None] | None) -> None:
        if before_update is not None:
            before_update()
        if self.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm)
        self.optimizer.step()


def train_step(model: nn.Module, update: Update | Optimizer, micro_batches: list[dict[str, torch.Tensor]], *,
               info: DistInfo, autocast: contextlib.AbstractContextManager | None = None,
               before_update: Callable[[], None] | None = None, distributed: str = "ddp",
               while_computing: Callable[[], None] | None = None) -> StepResult:
    """One optimizer step over `micro_batches` (this rank's, on any device: moved to `info.device`);
    `update` is an `Update`, or an optimizer (`AfterBackward(optimizer)`). `model` is what the run
    calls: a DDP wrapper's forward syncs gradients. `while_computing()` runs once every forward and
    backward is launched, before the step waits for its loss: on a GPU, still computing then, what
    it does (the next step's batch copies) overlaps the step."""
    update = AfterBackward(update) if isinstance(update, Optimizer) else update
    autocast = autocast or contextlib.nullcontext()
    batches = [{key: mb[key].to(info.device) for key in ("input_ids", "labels")} for mb in micro_batches]
    # Counts and sums stay on the device until the step's one host sync at its end.
    targets = all_reduce_sum(sum(target_count(mb["labels"]) for mb in batches), info)
    scale = torch.full((), info.world_size, dtype=torch.float64, device=info.device) / targets.clamp_min(1).double()
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    for i, mb in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext()
        if info.enabled and distributed == "ddp" and not last:
            sync = model.no_sync()  # all-reduce once, after the last micro-batch
        with sync:
            with autocast:
                micro_loss = model(mb["input_ids"], labels=mb["labels"])
            update.backward(scaled(micro_loss, scale), last)
        loss_sum += micro_loss.detach().double()
    if while_computing is not None:
        while_computing()
    loss_total, global_targets = torch.stack([all_reduce_sum(loss_sum, info), targets.double()]).tolist()
    loss = loss_total / max(global_targets, 1)
    if not math.isfinite(loss):
        return StepResult(loss, int(global_targets), updated=False)
    update.apply(model, before_update)
    return StepResult(loss, int(global_targets), updated=True)


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """`count_targets` kept on the labels' device (a 0-dim int64 tensor): counting on the host
    would wait for the device."""
    return labels.ne(IGNORE_INDEX).sum()


def scaled(loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`loss * scale` for a float64 0-dim `scale`, computed as `loss * float(scale)` would be: in the
    precision torch multiplies a Python number in (fp32 for fp32/bf16/fp16 losses, fp64 for fp64),
    in the loss's dtype, so results are bitwise those of the host-side scale it replaces."""
    compute = torch.promote_types(loss.dtype, torch.float32)
    return (loss.to(compute) * scale.to(compute)).to(loss.dtype)
