"""Learning-rate schedule of the papers: linear warmup, then cosine decay to a floor.

factor(s) for optimizer step s (0-based) of `total` steps, warmup W = round(warmup_ratio * total):
  s < W:  (s + 1) / W                      (the first step already moves; no wasted step at lr 0)
  else:   min + (1 - min) * (1 + cos(pi * (s - W) / (total - W))) / 2
A pure function of the step, so a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup_ratio: float = 0.1, min_ratio: float = 0.1) -> float:
    warmup = round(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
