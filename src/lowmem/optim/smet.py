"""SMET, "Sparse Memory-Efficient Training" (arXiv 2606.00888, ICML 2026): Adam for dynamic sparse
training, with state only for the active weights and no cold start for regrown ones.

For each sparse layer (kinds `sparse-values` and `masked`, made by lowmem.structure.sparse), with k
active blocks of B entries, g the gradient of the active entries (compact, k*B), t the tensor's step
and s_b the local step of block b:
  s_b += 1; m = beta1 m + (1-beta1) g; v = beta2 v + (1-beta2) g^2      (m, v: k*B; s: k int32)
  w_b = min(1, s_b / W) if the block was regrown (s_b < t) else 1        (linear warm-up over W steps)
  lr_l = lr / d_l (density_lr=inverse), lr / sqrt(d_l) (inverse_sqrt, the default: it beat inverse at
         d = 0.5 and 0.25 on the CPU protocol, docs/results.md) or lr (none); d_l = k B / (in out)
  W_active -= lr_l w_b (m / (1 - beta1^s_b)) / (sqrt(v / (1 - beta2^s_b)) + eps)   (decay: W *= 1 - lr_l wd)
A topology update (lowmem.structure.sparse's `topology`) calls `reset_param_state(param, mask)` for
the regrown blocks: their moments become 0 and s_b = 0, so their first update is lr_l g / |g| / W
(at most lr_l / W) instead of plain Adam's (1-beta1)/sqrt(1-beta2) ~ 3.16 lr. Block slots keep
their place in the layer's index across an update, so the compact state is never permuted.
Every other parameter (embedding, head, norm gains; kind dense) gets plain AdamW
(lowmem.optim.adamw's core). With compact storage the parameter itself is compact, so its gradient
is; with dense (masked) storage the gradient autograd gives is dense and SMET reads its active
entries.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem.optim import Method, register
from lowmem.optim.adamw import AdamBatch
from lowmem.optim.base import (
    LowmemOptimizer,
    check_betas,
    check_choice,
    check_grad,
    check_nonneg,
    check_nonneg_int,
    is_dtensor,
)
from lowmem.optim.roles import group_kind
from lowmem.optim.state import reset_entries, reset_whole

SPARSE_KINDS = ("masked", "sparse-values")
DENSITY_LR = ("inverse", "inverse_sqrt", "none")


def sparse_layout(param: torch.Tensor) -> Any:
    """The sparse layer a `masked` / `sparse-values` parameter belongs to (its index, block, density)."""
    layout = getattr(param, "_lowmem_sparse", None)
    if layout is None:
        raise ValueError("SMET: a parameter of a sparse kind carries no sparse layout; build the model with "
                         "--structure sparse:density=... (lowmem.structure.sparse)")
    return layout


def density_factor(rule: str, density: float) -> float:
    if rule == "inverse":
        return 1.0 / density
    if rule == "inverse_sqrt":
        return 1.0 / math.sqrt(density)
    return 1.0


class SMET(LowmemOptimizer):
    """SMET over role/kind groups (see the module docstring); `warmup` is W, `density_lr` the rule."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup: int = 100, density_lr: str = "inverse_sqrt",
                 foreach: bool = True) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, warmup=warmup,
                        density_lr=density_lr, foreach=foreach)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_nonneg_int("warmup", group["warmup"], zero_means="no warm-up")
        check_choice("density_lr", group["density_lr"], DENSITY_LR)

    def _step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            if group_kind(group) in SPARSE_KINDS:
                for p in group["params"]:
                    if p.grad is not None:
                        check_grad(p)
                        self._sparse_step(p, group, beta1, beta2)
                continue
            batch = AdamBatch()
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p)
                    batch.add(p, self.state[p])
            batch.step(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], foreach=group["foreach"])

    def _sparse_step(self, p: torch.Tensor, group: dict[str, Any], beta1: float, beta2: float) -> None:
        if is_dtensor(p):
            raise ValueError("SMET's sparse layers are not sharded (their block index is per layer); "
                             "train a sparse model with --distributed ddp, not fsdp2")
        layout = sparse_layout(p)
        block, index = layout.block_size, layout.block_index.long()
        k = index.numel()
        compact = layout.storage == "compact"
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros(k * block, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(k * block, dtype=p.dtype, device=p.device)
            state["block_step"] = torch.zeros(k, dtype=torch.int32, device=p.device)
        grad = p.grad if compact else p.grad.view(-1, block).index_select(0, index).reshape(-1)
        m, v, local = state["exp_avg"], state["exp_avg_sq"], state["block_step"]
        state["step"] += 1
        t = state["step"].item()
        local += 1
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        s = local.to(compute)
        lr = group["lr"] * density_factor(group["density_lr"], layout.density)
        scale = lr / (1 - torch.pow(beta1, s))
        if group["warmup"]:
            scale = scale * torch.where(s < t, (s / group["warmup"]).clamp(max=1.0), torch.ones_like(s))
        bias2_sqrt = (1 - torch.pow(beta2, s)).sqrt()
        denom = (v.view(k, block).sqrt() / bias2_sqrt.unsqueeze(1).to(v.dtype)).add_(group["eps"])
        update = (m.view(k, block) / denom).mul_(scale.unsqueeze(1).to(v.dtype))
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        if compact:
            p.view(k, block).sub_(update)
        else:
            p.view(-1, block).index_add_(0, index, update, alpha=-1)

    def reset_param_state(self, param: torch.Tensor, mask: torch.Tensor | None) -> None:
        """lowmem.optim.state's contract: zero the moments and local steps of the blocks `mask` touches
        (shaped like the parameter; None: everything, tensor step included)."""
        state = self.state.get(param)
        if not state:
            return
        if "block_step" not in state:  # a dense parameter: Adam's state, the generic rule
            reset_whole(state) if mask is None else reset_entries(state, param, mask)
            return
        if mask is None:
            reset_whole(state)
            state["block_step"].zero_()
            return
        layout = sparse_layout(param)
        block = layout.block_size
        mask = mask.to(param.device).reshape(-1, block)
        if layout.storage != "compact":
            mask = mask.index_select(0, layout.block_index.long())
        blocks = mask.any(1)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].view(-1, block).masked_fill_(blocks.unsqueeze(1), 0)
        state["block_step"].masked_fill_(blocks, 0)


# The paper's runs at d = 0.5 (LLaMA 130M / 350M / 1B on C4, the GaLore recipe).
register("smet", Method(
    "lowmem.optim.smet:SMET",
    "SMET: Adam over the active weights of a sparse model, per-block local steps, warm-up of regrown blocks",
    presets={"llama-130m": {"lr": 2e-3}, "llama-350m": {"lr": 2e-3}, "llama-1b": {"lr": 1e-3}},
    kinds=("dense",) + SPARSE_KINDS,
))
