"""Low-Rank: every hidden matrix a trained product of two thin factors.

The benchmark paper's low-rank baseline (methods.md section 8; code OptimAI-Lab/Memory_Efficient_Pretraining,
`--peft_model low-rank`), after Kamalakara et al., "Exploring Low Rank Training of Deep Neural
Networks" (arXiv 2209.13569):

  y = (alpha / r) * B (A x)        A: r x in (kind factor-a), B: out x r (kind factor-b)
  A, B both random at the start (Kaiming-uniform, nn.Linear's default: U(+-1/sqrt(fan_in)) each),
  so the product is not zero; the dense W = (alpha / r) B A is never stored.
The embedding, the head and the norms stay dense (only role-`hidden` Linears are converted).

Rank and alpha default to the papers' scripts for the model size (`PAPER_PRESETS`: rank
128/256/256/512, alpha 32/16/16/8 at llama-60m/130m/350m/1b, from SLTrain's and the benchmark's
scripts; LoRA has its own table); any other model needs `rank=` (alpha then defaults to 32, the 60M
value). Shared by LoRA and SLTrain (lowmem.structure.lora, lowmem.structure.sltrain), which add a
frozen base or a sparse part.

From trained dense weights (`apply(model, pretrained=True)`, a run's --init-from): the best rank-r
approximation of each W (Eckart–Young), W_r = U_r S_r V_r^T from its SVD, split evenly between the
factors: B = U_r sqrt(S_r / scale), A = sqrt(S_r / scale) V_r^T, so scale * B A = W_r; the log gives
the mean relative error ||W - W_r|| / ||W|| over the layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowmem.errors import ConfigError
from lowmem.models.llama import PRESETS
from lowmem.registry import STRUCTURES
from lowmem.structure import Structure

# (rank, alpha) per model size: SLTrain's scripts/llm_pretrain/sltrain{60m,130m,350m,1b}.sh and the
# benchmark's scripts/60m_low_rank.sh (rank 128, lora_alpha 32 at 60M).
PAPER_PRESETS: dict[str, tuple[int, float]] = {
    "llama-60m": (128, 32.0),
    "llama-130m": (256, 16.0),
    "llama-350m": (256, 16.0),
    "llama-1b": (512, 8.0),
}
DEFAULT_ALPHA = 32.0


def paper_preset(model: nn.Module) -> str | None:
    """The name of the paper size whose shape `model` has (vocabulary aside), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    shape = (getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None),
             getattr(config, "num_heads", None), getattr(config, "num_layers", None))
    for name in PAPER_PRESETS:
        p = PRESETS[name]
        if shape == (p.hidden_size, p.intermediate_size, p.num_heads, p.num_layers):
            return name
    return None


def kaiming_uniform_(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init of a weight [out, in]: U(+-1/sqrt(in))."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LowRankLinear(nn.Module):
    """y = scale * B (A x), scale = alpha / r. Replaces a bias-free nn.Linear."""

    param_kinds = {"lora_A": "factor-a", "lora_B": "factor-b"}

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *,
                 device: torch.device | None = None, dtype: torch.dtype | None = None, zero_b: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, float(alpha)
        self.scale = self.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_factors(zero_b=zero_b)

    @torch.no_grad()
    def reset_factors(self, zero_b: bool = False) -> None:
        kaiming_uniform_(self.lora_A)
        if zero_b:
            self.lora_B.zero_()
        else:
            kaiming_uniform_(self.lora_B)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low_rank(x)

    def product(self) -> torch.Tensor:
        """scale * B A, the dense matrix the factors stand for."""
        return (self.lora_B @ self.lora_A) * self.scale

    def dense_weight(self) -> torch.Tensor:
        return self.product()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


@torch.no_grad()
def truncated_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error) with scale * B A the best rank-`rank` approximation of `weight` (out x in):
    the truncated SVD, sqrt(S) on each side. Computed in at least fp32; returned in `weight`'s dtype."""
    work = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    root = (s[:rank] / scale).sqrt()
    lora_b, lora_a = u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]
    total = s.square().sum()
    error = (s[rank:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return lora_a.to(weight.dtype), lora_b.to(weight.dtype), error


def factor_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of `model` that holds a factor pair (lora_A, lora_B): Low-Rank, LoRA, SLTrain layers."""
    return [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.Tensor)
            and isinstance(getattr(m, "lora_B", None), torch.Tensor)]


class RankedStructure(Structure):
    """A structure with a rank and an alpha, defaulting to the papers' values for the model size."""

    presets: dict[str, tuple[int, float]] = PAPER_PRESETS
    starts_from_dense = True

    def __init__(self, rank: int | None = None, alpha: float | None = None) -> None:
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise ConfigError(f"structure {self.name!r}: rank must be an integer >= 1, got {rank!r}; e.g. rank=128")
        if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0):
            raise ConfigError(f"structure {self.name!r}: alpha must be a number > 0, got {alpha!r}; e.g. alpha=32")
        self.requested = (rank, alpha)
        self.rank: int | None = rank
        self.alpha: float | None = float(alpha) if alpha is not None else None
        self.start_errors: list[float] = []  # relative error of each layer's start from dense weights

    def resolve(self, model: nn.Module) -> None:
        rank, alpha = self.requested
        preset = paper_preset(model)
        if preset is not None and preset in self.presets:
            paper_rank, paper_alpha = self.presets[preset]
            rank = paper_rank if rank is None else rank
            alpha = paper_alpha if alpha is None else alpha
        elif rank is None:
            raise ConfigError(
                f"structure {self.name!r} has published ranks only for {', '.join(self.presets)}; this model is "
                f"none of them: give the rank, e.g. --structure {self.name}:rank=32"
            )
        self.rank, self.alpha = rank, float(alpha if alpha is not None else DEFAULT_ALPHA)

    def apply(self, model: nn.Module, pretrained: bool = False) -> nn.Module:
        self.resolve(model)
        self.start_errors = []
        return super().apply(model, pretrained)

    def dense_start(self) -> str:
        mean = sum(self.start_errors) / max(1, len(self.start_errors))
        return (f"each hidden matrix replaced by its best rank-{self.rank} approximation (truncated SVD); "
                f"relative error ||W - W_r|| / ||W|| {mean:.4f} on average over {len(self.start_errors)} matrices")

    def start_factors(self, module: LowRankLinear, weight: torch.Tensor) -> torch.Tensor:
        """Set `module`'s factors to the truncated SVD of `weight`; return the residual W - scale B A."""
        lora_a, lora_b, error = truncated_factors(weight, self.rank, module.scale)
        with torch.no_grad():
            module.lora_A.copy_(lora_a)
            module.lora_B.copy_(lora_b)
        self.start_errors.append(error)
        return weight - module.product().detach()

    def check_linear(self, linear: nn.Linear, path: str) -> None:
        if linear.bias is not None:
            raise ConfigError(f"structure {self.name!r} converts bias-free Linears; {path} has a bias")
        if self.rank >= min(linear.in_features, linear.out_features):
            raise ConfigError(
                f"structure {self.name!r}: rank {self.rank} is not below the smaller side of {path} "
                f"({linear.out_features} x {linear.in_features}); choose rank < {min(linear.in_features, linear.out_features)}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rank") != self.rank or state.get("alpha") != self.alpha:
            raise ConfigError(
                f"the checkpoint's {self.name} structure has rank {state.get('rank')}, alpha {state.get('alpha')}; "
                f"this run builds rank {self.rank}, alpha {self.alpha}: resume with the checkpoint's settings"
            )


class LowRank(RankedStructure):
    """`--structure lowrank:rank=128,alpha=32`: each hidden Linear becomes a LowRankLinear."""

    name = "lowrank"

    def convert(self, linear: nn.Linear, path: str) -> nn.Module:
        self.check_linear(linear, path)
        module = LowRankLinear(linear.in_features, linear.out_features, self.rank, self.alpha,
                               device=linear.weight.device, dtype=linear.weight.dtype)
        if self.from_dense:
            self.start_factors(module, linear.weight.detach())
        return module


STRUCTURES.register("lowrank", LowRank)

__all__ = ["DEFAULT_ALPHA", "LowRank", "LowRankLinear", "PAPER_PRESETS", "RankedStructure", "factor_modules",
           "kaiming_uniform_", "paper_preset", "truncated_factors"]
