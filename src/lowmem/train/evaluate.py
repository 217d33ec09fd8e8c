"""Validation perplexity, token-weighted, and the papers' legacy figure beside it.

Token-weighted: exp(sum of token losses / number of non-pad target tokens), over a fixed list of
validation batches. Legacy (GaLore's evaluation code): exp(sum of per-batch mean losses / (batches +
1)), which understates perplexity by 1-4%; reported only for comparison with published cells.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from lowmem.distributed import DistInfo, all_reduce_sum
from lowmem.train.loss import count_targets, model_loss_sum


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    legacy_perplexity: float
    tokens: int


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
             autocast: AbstractContextManager, info: DistInfo) -> EvalResult:
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, sum of batch means
    # Every rank runs the same number of forward passes (FSDP2 gathers weights collectively), so a
    # rank with no batch left repeats its first one and discards the result.
    per_rank = math.ceil(len(batches) / info.world_size)
    for index in range(info.rank, per_rank * info.world_size, info.world_size):
        batch = batches[index] if index < len(batches) else batches[info.rank]
        labels = batch["labels"].to(device)
        loss = model_loss_sum(model, batch["input_ids"].to(device), labels, autocast)
        if index >= len(batches):
            continue
        loss_sum = loss.double().item()
        count = count_targets(labels)
        totals += torch.tensor([loss_sum, count, loss_sum / max(count, 1)], dtype=torch.float64)
    all_reduce_sum(totals, info)
    model.train(was_training)
    loss_sum, tokens, mean_sum = totals.tolist()
    loss = loss_sum / max(tokens, 1)
    batches_seen = len(batches)
    return EvalResult(loss=loss, perplexity=math.exp(loss),
                      legacy_perplexity=math.exp(mean_sum / (batches_seen + 1)), tokens=int(tokens))
