"""LoRA for pretraining, and ReLoRA's merges (the `lora-merge` intervention).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685); Lialin et al.,
"ReLoRA: High-Rank Training Through Low-Rank Updates" (arXiv 2307.05695; code Guitaricet/relora);
methods.md section 8.

  y = W0 x + (alpha / r) B (A dropout(x))     W0: out x in, frozen (kind frozen, requires_grad False)
  at the start: W0 the dense model's weight, B = 0, A Kaiming-uniform (so y = W0 x)
  rank 128, alpha 32 at every paper size and dropout 0.1 on the LoRA branch's input (ReLoRA's released
  defaults, `LORA_PRESETS`); the released ReLoRaModel zeroes A too when it keeps the original weights,
  so its first cycle trains no factor: a quirk not reproduced here.
Starting from a trained dense model (ReLoRA's full-rank warm start, 25% of the steps in its 250M
recipe) is two runs: a dense run, `lowmem export` of it, then the LoRA run with `--init-from` the
export (W0 = its weights; the default is no warm start: W0 = a fresh init).

ReLoRA (`--intervention lora-merge:every=N`) as the released code runs it (`torchrun_main.py`,
`training_utils.py`), with the schedule's step c = s - 1 for optimizer step s:
  after optimizer steps s = N+1, 2N+1, ... (c a multiple of N, past the first cycle):
    W0 += (alpha / r) B A;  A re-initialized (Kaiming), B = 0       (the model's function is unchanged)
    the factors' Adam moments pruned (lowmem.optim.state.prune_moments), each tensor on its own:
    `prune=random` (default) zeroes a random `prune_ratio` (0.999) of the entries — the release's
    "reset" — `magnitude` the smallest (its 1B config: 0.9); the step counters are kept;
    `prune=reset` zeroes moments and steps (lowmem's earlier form). Nothing else's state changes.
  the jagged schedule: the step just before each merge (s = nN + 1) runs at lr 0, the next ramp_steps
  - 1 rise linearly, the j-th at (j / ramp_steps) of the base schedule's value at the ramp's end
  (step nN + ramp_steps + 1), after which the base schedule resumes; ramp_steps = 100 (the scripts'
  restart_warmup_steps) must be below N. During the run's first warmup the base schedule wins.
A checkpoint written before these forms resumes with what it started with (merges after nN, moments
and steps zeroed, its ramp). Under FSDP2 each rank merges its rows of W0 and prunes its rows of the
moments with masks drawn at the whole shape (the same on every rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from lowmem.errors import ConfigError, check_choice
from lowmem.interventions import BaseIntervention, RunContext
from lowmem.optim.base import check_positive_int, is_dtensor
from lowmem.optim.state import prune_moments, reset_state
from lowmem.registry import INTERVENTIONS, STRUCTURES
from lowmem.structure.lowrank import PAPER_PRESETS, LowRankLinear, RankedStructure, kaiming_uniform_

# ReLoRA's --lora_r 128 and --lora_alpha 32, which no script changes with the model size.
LORA_PRESETS: dict[str, tuple[int, float]] = {size: (128, 32.0) for size in PAPER_PRESETS}
DEFAULT_DROPOUT = 0.1  # hard-coded in the released ReLoRaModel
PRUNE = ("random", "magnitude", "reset")
PRUNE_RATIO = {"random": 0.999, "magnitude": 0.9}
DEFAULT_RAMP_STEPS = 100
# How merges and the lr around them are timed: as released, or as lowmem did before (merges after
# N, 2N, ...; the k-th update after at k / (ramp_steps + 1) of the schedule; moments and steps zeroed),
# which only a checkpoint written then selects.
TIMINGS = ("released", "lowmem-v1")


class LoRALinear(LowRankLinear):
    """y = W0 x + scale * B (A dropout(x)), W0 frozen."""

    param_kinds = {"weight": "frozen", "lora_A": "factor-a", "lora_B": "factor-b"}

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(linear.in_features, linear.out_features, rank, alpha, device=linear.weight.device,
                         dtype=linear.weight.dtype, zero_b=True)
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return F.linear(x, self.weight) + self.low_rank(branch)

    def dense_weight(self) -> torch.Tensor:
        return self.weight + self.product()

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", dropout={self.dropout:g}" if self.dropout else "")

    @torch.no_grad()
    def merge_and_reinit(self) -> None:
        """W0 += scale * B A; A re-initialized, B = 0 (the layer's output is unchanged).

        FSDP2 (W0, A, B row-sharded DTensors): A and B are gathered whole (r x (in + out)), each rank
        adds its own rows of scale * B A to its shard of W0, and the new A is drawn on rank 0 and
        broadcast, so every rank holds its rows of the same matrix."""
        if not is_dtensor(self.lora_A):
            self.weight.add_(self.product())
            self.reset_factors(zero_b=True)
            return
        import torch.distributed as dist

        from lowmem.distributed import broadcast
        from lowmem.optim.base import rows_of

        a, b = self.lora_A.full_tensor(), self.lora_B.full_tensor()
        w0 = self.weight.to_local()
        w0.add_((rows_of(b, self.weight) @ a * self.scale).to(w0.dtype))
        new_a = kaiming_uniform_(torch.empty_like(a))
        group = self.lora_A.device_mesh.get_group()
        broadcast(new_a, src=dist.get_global_rank(group, 0), group=group)
        self.lora_A.to_local().copy_(rows_of(new_a, self.lora_A))
        self.lora_B.to_local().zero_()


class LoRA(RankedStructure):
    """`--structure lora:rank=128,alpha=32,dropout=0.1`: W0 frozen plus a trained rank-r update."""

    name = "lora"
    presets = LORA_PRESETS

    def __init__(self, rank: int | None = None, alpha: float | None = None, dropout: float = DEFAULT_DROPOUT) -> None:
        super().__init__(rank, alpha)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"structure 'lora': dropout must be in [0, 1), got {dropout!r}; e.g. dropout=0.1 "
                              "(ReLoRA's) or 0 (none)")
        self.dropout = float(dropout)
        self.layers: list[LoRALinear] = []

    def apply(self, model: nn.Module, pretrained: bool = False) -> nn.Module:
        self.layers = []
        return super().apply(model, pretrained)

    def convert(self, linear: nn.Linear, path: str) -> nn.Module:
        self.check_linear(linear, path)
        layer = LoRALinear(linear, self.rank, self.alpha, self.dropout)
        self.layers.append(layer)
        return layer

    def dense_start(self) -> str:
        return "W0 = the trained weight, B = 0 (the model computes what the dense one did)"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "dropout": self.dropout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # A checkpoint written before dropout existed ran without it; a run resumes as it started.
        self.dropout = float(state.get("dropout", 0.0))
        for layer in self.layers:
            layer.dropout = self.dropout


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


class LoRAMerge(BaseIntervention):
    """ReLoRA's restarts: merge, re-initialize, prune the factors' moments, re-warm the LR (module docstring).

    Args:
        every: N, the cycle: merges after steps N+1, 2N+1, ... (ReLoRA's scripts: 2000-5320).
        ramp_steps: the restart's lr ramp, below `every` (default 100, the scripts'; 0: no dip, no ramp).
        prune: random (default) | magnitude | reset, what a merge does to the factors' optimizer state.
        prune_ratio: the fraction of moment entries zeroed (default 0.999 random, 0.9 magnitude).
        seed: of the random pruning's draws (one generator per merge, so a resumed run prunes the same).
    """

    name = "lora-merge"

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        if not lora_modules(model):
            raise ConfigError("intervention 'lora-merge' needs a model with the lora structure; "
                              "add --structure lora:rank=128 (or drop the intervention)")

    def __init__(self, every: int, ramp_steps: int = DEFAULT_RAMP_STEPS, prune: str = "random",
                 prune_ratio: float | None = None, seed: int = 0) -> None:
        check_positive_int("every", every)
        if not isinstance(ramp_steps, int) or isinstance(ramp_steps, bool) or not 0 <= ramp_steps < every:
            raise ValueError(
                f"invalid ramp_steps: {ramp_steps!r}; the restart's lr ramp must be an integer in [0, every) = "
                f"[0, {every}) (default {DEFAULT_RAMP_STEPS}, ReLoRA's restart_warmup_steps); with every={every} "
                f"pass a shorter one, e.g. lora-merge:every={every},ramp_steps={every // 5}"
            )
        check_choice("prune", prune, PRUNE)
        if prune == "reset" and prune_ratio is not None:
            raise ValueError("prune_ratio applies to prune=random or prune=magnitude, not to prune=reset")
        ratio = PRUNE_RATIO.get(prune) if prune_ratio is None else prune_ratio
        if prune != "reset" and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= 1):
            raise ValueError(f"invalid prune_ratio: {ratio!r}; it must be a fraction in [0, 1], e.g. 0.999")
        self.every, self.ramp_steps, self.prune, self.seed = every, ramp_steps, prune, int(seed)
        self.prune_ratio = float(ratio) if ratio is not None else None
        self.timing = "released"
        self.context: RunContext | None = None
        self.merges = 0

    def setup(self, context: RunContext) -> None:
        self.context = context

    def is_merge(self, step: int) -> bool:
        if self.timing == "lowmem-v1":
            return step % self.every == 0
        return step > self.every and (step - 1) % self.every == 0

    def after_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        if not self.is_merge(step):
            return
        modules = lora_modules(model)
        if not modules:
            raise ValueError("lora-merge needs a model with the lora structure (--structure lora:rank=...)")
        for module in modules:
            module.merge_and_reinit()
        factors = [p for m in modules for p in (m.lora_A, m.lora_B)]
        if self.prune == "reset":
            reset_state(optimizer, params=factors)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.merges)
            prune_moments(optimizer, factors, self.prune, self.prune_ratio, generator)
        self.merges += 1

    def lr_factor(self, step: int) -> float:
        if self.timing == "lowmem-v1":
            since = step - ((step - 1) // self.every) * self.every  # 1 for the first update after a merge
            if step <= self.every or since > self.ramp_steps:
                return 1.0
            return since / (self.ramp_steps + 1)
        # The release's multiple-warmups schedule at c = step - 1, as a factor on the base schedule.
        context = self.context
        if context is None:
            raise ValueError("lora-merge's lr needs the run's schedule: call setup(RunContext(...)) first "
                             "(lowmem.interventions.build_interventions does)")
        c = step - 1
        into, cycle = c % self.every, c // self.every
        if c < self.every or into >= self.ramp_steps or c < context.warmup_steps:
            return 1.0
        base = context.base_lr_factor(step)
        ramp_end = context.base_lr_factor(cycle * self.every + self.ramp_steps + 1)
        return into / self.ramp_steps * ramp_end / base if base else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "ramp_steps": self.ramp_steps, "prune": self.prune,
                "prune_ratio": self.prune_ratio if self.prune_ratio is not None else -1.0, "seed": self.seed,
                "timing": self.timing, "merges": self.merges}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["every"] != self.every:
            raise ValueError(f"the checkpoint merged every {state['every']} steps, this run asks every {self.every}; "
                             f"resume with every={state['every']}")
        # The run goes on as it started, whatever this version's defaults: the checkpoint's settings.
        self.timing = state.get("timing", "lowmem-v1")
        check_choice("the checkpoint's lora-merge timing", self.timing, TIMINGS)
        self.ramp_steps = int(state["ramp_steps"])
        self.prune = state.get("prune", "reset")
        ratio = float(state.get("prune_ratio", -1.0))
        self.prune_ratio = ratio if ratio >= 0 else None
        self.seed = int(state.get("seed", self.seed))
        self.merges = state["merges"]


STRUCTURES.register("lora", LoRA)
INTERVENTIONS.register("lora-merge", LoRAMerge)

__all__ = ["LORA_PRESETS", "LoRA", "LoRALinear", "LoRAMerge", "lora_modules"]
