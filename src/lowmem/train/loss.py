"""The training objective: summed next-token cross-entropy over the non-pad targets, in fp32.

`model_loss_sum` is what train_step and evaluation call: the plain path (full logits, then
`token_loss_sum`) unless the model's `loss_chunk` is set, in which case the model computes the loss
itself through lowmem.models.chunked_loss (the head's matmul inside each chunk; the full logits never
exist). The model does it, not this module, so that under FSDP2 the head weight is used inside the
sharded root module's forward, where it is gathered.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lowmem.data import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE_INDEX (computed in fp32)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    """How many positions of `labels` are scored (not padding)."""
    return int((labels != IGNORE_INDEX).sum())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place and needs none)."""
    return model.module if hasattr(model, "module") else model


def loss_chunk_of(model: nn.Module) -> int:
    """Tokens per chunk of the model's chunked loss, 0 when it uses the plain loss."""
    return int(getattr(unwrap(model), "loss_chunk", 0) or 0)


def model_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Summed token loss of one micro-batch (fp32, 0-dim): forward under `autocast`, the loss outside it."""
    autocast = autocast or contextlib.nullcontext()
    if loss_chunk_of(model):
        with autocast:
            return model(input_ids, labels=labels)
    with autocast:
        logits = model(input_ids)
    return token_loss_sum(logits, labels)
