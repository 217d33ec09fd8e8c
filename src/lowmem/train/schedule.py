"""The run's learning-rate schedule, for optimizer step s (0-based) of `total` steps, warmup
W = round(warmup_ratio * total):
  s < W:  (s + 1) / W                      (the first step already moves; no wasted step at lr 0)
  cosine (default, the papers'): min + (1 - min) * (1 + cos(pi * (s - W) / (total - W))) / 2
  wsd (warmup-stable-decay): 1, then linearly to min over the last round(decay_ratio * total) steps
A pure function of the step, so a resumed run continues the schedule exactly. One formula, defined in
lowmem.interventions (below the interventions whose lr follows it, ReLoRA's ramp) and used here.
"""

from __future__ import annotations

from lowmem.config import SCHEDULES
from lowmem.interventions import schedule_factor as lr_factor

__all__ = ["SCHEDULES", "lr_factor"]
