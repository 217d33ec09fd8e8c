"""Validation perplexity, token-weighted, and the papers' legacy figure beside it.

Token-weighted: exp(sum of token losses / number of non-pad target tokens), over a fixed list of
validation batches. Legacy (GaLore's evaluation code): exp(sum of per-batch mean losses / (batches +
1)), which understates perplexity by 1-4%; reported only for comparison with published cells.

`EvalTotals` is the one accumulation of those sums: the trainer's `evaluate` (over a run's validation
batches, split across ranks) and `lowmem eval` (`trained.evaluate_source`, streamed) both add each
batch's summed loss to it, so the two report the same figure for the same batches.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from lowmem.distributed import DistInfo, all_reduce_sum
from lowmem.train.step import target_count


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    legacy_perplexity: float
    tokens: int


class EvalTotals:
    """Running sums of an evaluation (float64): token loss, scored tokens, per-batch mean losses,
    batches; kept on the device of the losses added, so adding a batch never waits for it."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, loss_sum: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: its summed token loss (the model's) and its labels."""
        loss = loss_sum.detach().double().to(self.sums.device)
        count = target_count(labels.to(self.sums.device)).double()
        self.sums += torch.stack([loss, count, loss / count.clamp_min(1), torch.ones_like(loss)])

    def all_reduce(self, info: DistInfo) -> None:
        all_reduce_sum(self.sums, info)

    @property
    def tokens(self) -> int:
        return int(self.sums[1].item())

    @property
    def batches(self) -> int:
        return int(self.sums[3].item())

    @property
    def mean_loss(self) -> float:
        """Loss per scored token so far (nats)."""
        loss_sum, tokens, _, _ = self.sums.tolist()
        return loss_sum / max(tokens, 1)

    def result(self) -> EvalResult:
        _, tokens, mean_sum, batches = self.sums.tolist()
        loss = self.mean_loss
        return EvalResult(loss=loss, perplexity=math.exp(loss), legacy_perplexity=math.exp(mean_sum / (batches + 1)),
                          tokens=int(tokens))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
             autocast: AbstractContextManager, info: DistInfo) -> EvalResult:
    was_training = model.training
    model.eval()
    totals = EvalTotals(device)
    # Every rank runs the same number of forward passes (FSDP2 gathers weights collectively), so a
    # rank with no batch left repeats its first one and discards the result.
    per_rank = math.ceil(len(batches) / info.world_size)
    for index in range(info.rank, per_rank * info.world_size, info.world_size):
        batch = batches[index] if index < len(batches) else batches[info.rank]
        labels = batch["labels"].to(device)
        with autocast:
            loss = model(batch["input_ids"].to(device), labels=labels)
        if index < len(batches):
            totals.add(loss, labels)
    totals.all_reduce(info)
    model.train(was_training)
    return totals.result()
