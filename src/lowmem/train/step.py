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
in place for the caller, which measures them, to zero). `InBackward` (`--gradient-release`) applies
each parameter's update inside backward, as soon as its gradient is complete, and frees the gradient:
the gradients held at once are one parameter's, not the model's.
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
from lowmem.errors import ConfigError, LowmemError
from lowmem.models import IGNORE_INDEX


@dataclass(frozen=True)
class StepResult:
    loss: float  # token-weighted mean loss over the global batch
    targets: int  # non-pad target tokens of the global batch
    updated: bool  # False when the loss was not finite: no update


class Update(Protocol):
    """Where a step's update happens: each micro-batch's backward goes through `backward` (`last`:
    the step's last micro-batch, whose backward completes the gradients), and `apply` follows once
    the step's loss is known to be finite; it returns False if it could not apply the whole update
    (None or True: applied)."""

    def backward(self, loss: torch.Tensor, last: bool) -> None: ...

    def apply(self, model: nn.Module, before_update: Callable[[], None] | None) -> bool | None: ...


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


class NonFiniteGradient(LowmemError):
    """A gradient was non-finite under the update inside backward, and its update was already applied."""


class InBackward:
    """The update inside backward (`--gradient-release`): each parameter's update runs in its
    post-accumulate-grad hook, as soon as backward has completed its gradient, through the optimizer's
    own `_step()` (LowmemOptimizer.step_parameter), and the gradient is freed right after it. Backward
    no longer needs a weight once its gradient is complete (every node that used it has run), so the
    updates are the step's own, bit for bit: the same weights as `AfterBackward`. The learning rate is
    the groups' `lr` when backward starts (the trainer sets it before the step).

    What it needs, which lowmem.train.trainer.check_gradient_release asks before a run starts: a method
    that declares `updates_per_parameter`; the step's whole gradient from one backward (one micro-batch,
    no accumulation); one process (DDP all-reduces gradients in buckets after the hooks have fired, and
    FSDP2 assigns sharded gradients after its reduce-scatter, so a hook would see a local gradient or
    none); no clipping (the global norm needs every gradient before any update); no intervention whose
    `before_step` reads gradients (`before_update()` runs after backward, every update applied).

    Non-finite values. The loss is checked before backward (one host sync): a non-finite loss skips
    backward and the step (`--skip-nonfinite` counts it). A finite loss can still give a non-finite
    gradient (an overflow in backward). Each hook records on the device whether its gradient's sum is
    finite (finite only if every entry is) and applies the update without waiting for the answer: a
    host sync per parameter would stall a GPU's backward hundreds of times a step. The flags are read
    once, in `apply`, after the step's loss (the device is done by then). If a gradient was non-finite,
    its update has already been applied — that parameter's weights and state may hold NaN/inf, every
    other parameter got its normal update, every gradient is freed — so the step cannot be skipped:
    `apply` raises NonFiniteGradient naming the first such parameter (also in `nonfinite`), and the run
    stops there before anything is saved (`--skip-nonfinite` covers non-finite losses only).
    (`AfterBackward` would apply it without a word.)

    `gradient_peak` is the most bytes of `.grad` tensors held at once, over every step so far: one
    parameter's gradient, the largest, while the update inside backward works as it should.
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module) -> None:
        if not getattr(optimizer, "updates_per_parameter", False):
            raise ConfigError(
                f"{type(optimizer).__name__} cannot update inside backward: it does not declare that a parameter's "
                "update needs that parameter's gradient alone (LowmemOptimizer.updates_per_parameter); train it "
                "without --gradient-release"
            )
        self.optimizer = optimizer
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.gradient_peak = 0
        self.nonfinite: str | None = None
        self._params: list[torch.Tensor] = []
        self._armed = False
        # Per hook, in backward's order: (parameter name, 0-dim bool on the device: its gradient finite).
        self._finite: list[tuple[str, torch.Tensor]] = []

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if not last:
            raise ConfigError("the update inside backward needs the step's whole gradient from one backward: "
                              "train with one micro-batch per step (--micro-batch-size equal to --batch-size)")
        self.nonfinite = None
        self._finite = []
        if not bool(torch.isfinite(loss)):  # the sync before backward: train_step then skips the step
            return
        self._hook_new_parameters()
        self.optimizer.zero_grad(set_to_none=True)  # so each hook's gradient is the only one present
        self._armed = True
        try:
            loss.backward()
        finally:
            self._armed = False

    def apply(self, model: nn.Module, before_update: Callable[[], None] | None) -> bool:
        """The updates ran in backward; `before_update()` runs now (interventions that read no gradients).
        Raises NonFiniteGradient if a gradient was non-finite (its update was applied; see the class)."""
        if self._finite:
            finite = torch.stack([flag for _, flag in self._finite]).tolist()  # the step's one read of them
            if not all(finite):
                self.nonfinite = self._finite[finite.index(False)][0]
                raise NonFiniteGradient(
                    f"non-finite gradient of {self.nonfinite} with a finite loss: under --gradient-release its "
                    "update was applied inside backward before the step could know (one check per step, not a "
                    "host sync per parameter), so the step cannot be skipped and that parameter's weights and "
                    "optimizer state may now be non-finite. Resume from the last checkpoint with a lower learning "
                    "rate (--skip-nonfinite covers non-finite losses only)")
        if before_update is not None:
            before_update()
        return True

    def _hook_new_parameters(self) -> None:
        # Every step, so a parameter that joined the optimizer since (add_param_group, a replaced
        # parameter) is updated too.
        hooked = {id(p) for p in self._params}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad and id(param) not in hooked:
                    param.register_post_accumulate_grad_hook(self._update_and_free)
                    self._params.append(param)
                    hooked.add(id(param))

    def _update_and_free(self, param: torch.Tensor) -> None:
        if not self._armed:  # a backward outside a training step (a test's, an intervention's): kept
            return
        # Every other gradient was freed by its own hook, so this one is what is held now (summing
        # over every parameter here made each step quadratic in the number of parameters).
        self.gradient_peak = max(self.gradient_peak, param.grad.numel() * param.grad.element_size())
        # Recorded on the device, read once after backward (apply): no host sync per parameter.
        self._finite.append((self.names.get(id(param), "a parameter"), torch.isfinite(param.grad.sum())))
        self.optimizer.step_parameter(param)
        param.grad = None


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
    updated = update.apply(model, before_update) is not False
    return StepResult(loss, int(global_targets), updated=updated)


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
