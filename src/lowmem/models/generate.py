"""Greedy decoding with the model's own forward passes (no cache): the reference an export's
`transformers` generation is checked against."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: list[int] | torch.Tensor, max_new_tokens: int,
                    eos_id: int | None = None) -> list[int]:
    """The prompt's ids followed by up to `max_new_tokens` argmax tokens, stopping after `eos_id`;
    one full forward pass per new token over the whole sequence so far."""
    ids = [int(i) for i in (input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device))
        logits = getattr(logits, "logits", logits)
        ids.append(int(logits[0, -1].argmax()))
        if eos_id is not None and ids[-1] == eos_id:
            break
    model.train(was_training)
    return ids
