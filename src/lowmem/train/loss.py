"""The training objective: summed next-token cross-entropy over the non-pad targets, in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem.data import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE_INDEX (computed in fp32)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    """How many positions of `labels` are scored (not padding)."""
    return int((labels != IGNORE_INDEX).sum())
