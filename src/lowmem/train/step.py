"""One optimizer step of training, apart from the loop around it.

    result = train_step(model, optimizer, micro_batches, info=info, autocast=autocast,
                        before_update=lambda: ..., clip_grad_norm=0.0, distributed="ddp")

Runs this rank's micro-batches (forward, token loss, backward; gradient accumulation; the loss is
the chunked one when the model's `loss_chunk` is set, see lowmem.train.loss.model_loss_sum), each
micro-batch's summed token loss scaled by world_size / (non-pad targets of the whole global batch),
so the gradient is the token-weighted mean over the global batch whatever the accumulation and the
number of ranks (DDP and FSDP average over ranks, hence the factor world_size). Then, if the loss is
finite: `before_update()` (the hook interventions use to see live gradients), optional clipping,
`optimizer.step()`. Gradients are left in place for the caller (which measures them) to zero.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem.distributed import DistInfo, all_reduce_sum
from lowmem.train.loss import count_targets, model_loss_sum


@dataclass(frozen=True)
class StepResult:
    loss: float  # token-weighted mean loss over the global batch
    targets: int  # non-pad target tokens of the global batch
    updated: bool  # False when the loss was not finite and the update was not applied


def train_step(model: nn.Module, optimizer: Optimizer, micro_batches: list[dict[str, torch.Tensor]], *,
               info: DistInfo, autocast: contextlib.AbstractContextManager | None = None,
               before_update: Callable[[], None] | None = None, clip_grad_norm: float = 0.0,
               distributed: str = "ddp") -> StepResult:
    autocast = autocast or contextlib.nullcontext()
    local_targets = sum(count_targets(mb["labels"]) for mb in micro_batches)
    global_targets = int(all_reduce_sum(torch.tensor([local_targets], dtype=torch.int64), info).item())
    scale = info.world_size / max(global_targets, 1)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        sync = contextlib.nullcontext()
        if info.enabled and distributed == "ddp" and i < len(micro_batches) - 1:
            sync = model.no_sync()  # all-reduce once, after the last micro-batch
        with sync:
            micro_loss = model_loss_sum(model, mb["input_ids"].to(info.device), mb["labels"].to(info.device), autocast)
            (micro_loss * scale).backward()
        loss_sum += micro_loss.detach().double().cpu()
    loss = all_reduce_sum(loss_sum, info).item() / max(global_targets, 1)
    if not math.isfinite(loss):
        return StepResult(loss, global_targets, updated=False)
    if before_update is not None:
        before_update()
    if clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    return StepResult(loss, global_targets, updated=True)
