"""SMET, "Sparse Memory-Efficient Training" (arXiv 2606.00888, ICML 2026): Adam for dynamic sparse
training, with state only for the active weights and no cold start for regrown ones. The defaults are
what the released code computes (QiaoXiao7282/SMET, sparselearning/optimizer_dst.py, Adam_block),
which produced the published numbers; methods.md section 9.

For each sparse layer (kinds `sparse-values` and `masked`, made by lowmem.structure.sparse), with k
active blocks of B entries, g the gradient of the active entries (compact, k*B) and s_b the local
step of block b (int32, one per block); for every other parameter (embedding, head, norm gains; kind
dense) the same with one step per tensor:
  s_b += 1; m = beta1 m + (1-beta1) g; v = beta2 v + (1-beta2) g^2      (m, v: k*B)
  warmup_form="moment_decay" (default, the release's): m_b *= min(1, s_b / W), in place, so it
         compounds, for every block and tensor while s_b < W: all of them during training's first W
         steps, regrown blocks after each topology update (W = `warmup`, the release's op_decay_steps,
         100; 0 or 1: none)
  warmup_form="step_ramp" (the paper's text, lowmem's earlier form): the step of a regrown block
         (s_b < the tensor's step t) is scaled by min(1, s_b / W); m is not changed; dense tensors
         get plain AdamW
  lr_l = lr (density_lr="none", the default: the release never scales its lr by density; its scripts
         set the run's lr per density), lr / d_l (inverse) or lr / sqrt(d_l) (inverse_sqrt);
         d_l = k B / (in out)
  W_active -= lr_l (m / (1 - beta1^s_b)) / (sqrt(v / (1 - beta2^s_b)) + eps)   (decay: W *= 1 - lr_l wd)
A topology update (lowmem.structure.sparse's `topology`) calls `reset_param_state(param, mask)` for
the regrown blocks: their moments become 0 and s_b = 1 under moment_decay (the release's: their first
update uses s = 2, bias corrections 0.19 and 0.002, decay 2/W) or 0 under step_ramp. Block slots keep
their place in the layer's index across an update, so the compact state is never permuted. Weight
decay is decoupled here; the release adds wd * w to the gradient (its scripts use wd = 0). Its int16
step counter saturates at 32765, lowmem's int32 one does not (the same values below that).
With compact storage the parameter itself is compact, so its gradient is; with dense (masked) storage
the gradient autograd gives is dense and SMET reads its active entries. A checkpoint written before
`warmup_form` existed resumes with the step ramp it ran with (the group settings, density_lr
included, come back from the checkpoint).

`compiled=True` (issue 28, default off) gives the dense tensors past their warm-up AdamW's compiled update
(lowmem.optim.adamw); the sparse layers stay eager.

`state_bits=8` (with `stochastic_rounding`; lowmem.optim.quantized_state) keeps each sparse layer's
compact m and v in 8-bit codes when k*B >= 4096, held as one row [1, k*B] (`compact_rows`) cut into
blocks of 256 that run across SMET's blocks: B is small (1 by default), and a row per SMET block would
pay a 4-byte scale per B entries. No row needs to align with a shard: the compact vectors are never
sharded (FSDP2 is refused, DDP keeps them whole and alike on every rank), so codes and scales are
plain tensors saved and resumed whole, at any number of processes, as the compact vectors are. A step
and a topology update's reset of regrown blocks dequantize, update or zero, and requantize through
`quantized_state.dequantized` (slots keep their place: nothing is permuted); the dense parameters'
AdamW moments are AdamW's 8-bit moments.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem.optim import Method, quantized_state, register
from lowmem.optim.adamw import AdamBatch, init_adam_state
from lowmem.optim.base import (
    LowmemOptimizer,
    as_pair,
    check_adam_group,
    check_choice,
    check_grad,
    check_nonneg_int,
    is_dtensor,
)
from lowmem.optim.kinds import METHOD_KINDS
from lowmem.optim.roles import group_kind
from lowmem.optim.state import ADAM_MOMENTS, reset_entries, reset_whole

SPARSE_KINDS = ("masked", "sparse-values")
DENSITY_LR = ("inverse", "inverse_sqrt", "none")
WARMUP_FORMS = ("moment_decay", "step_ramp")


def sparse_layout(param: torch.Tensor) -> Any:
    """The sparse layer a `masked` / `sparse-values` parameter belongs to (its index, block, density)."""
    layout = getattr(param, "_lowmem_sparse", None)
    if layout is None:
        raise ValueError("SMET: a parameter of a sparse kind carries no sparse layout; build the model with "
                         "--structure sparse:density=... (lowmem.structure.sparse)")
    return layout


def compact_rows(k: int, block: int) -> tuple[int, int]:
    """The shape an 8-bit compact moment of k blocks of `block` entries is held in: one row, so its blocks
    of quantized_state.BLOCK (256) entries run across SMET's blocks (see the module docstring)."""
    return (1, k * block)


def density_factor(rule: str, density: float) -> float:
    if rule == "inverse":
        return 1.0 / density
    if rule == "inverse_sqrt":
        return 1.0 / math.sqrt(density)
    return 1.0


class SMET(LowmemOptimizer):
    """SMET over role/kind groups (see the module docstring); `warmup` is W, `warmup_form` how it acts,
    `density_lr` the lr rule of the sparse layers."""

    updates_per_parameter = True  # block steps and moments are per tensor; dense tensors get AdamW

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup: int = 100, warmup_form: str = "moment_decay",
                 density_lr: str = "none", foreach: bool = True, state_bits: int | None = None,
                 stochastic_rounding: bool = False, compiled: bool = False) -> None:
        betas = as_pair(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup=warmup,
                        warmup_form=warmup_form, density_lr=density_lr, foreach=foreach, state_bits=state_bits,
                        stochastic_rounding=stochastic_rounding, compiled=compiled)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("warmup_form", "step_ramp")  # a checkpoint from before the key ran the ramp

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_adam_group(group)
        check_nonneg_int("warmup", group["warmup"], zero_means="no warm-up")
        check_choice("density_lr", group["density_lr"], DENSITY_LR)
        check_choice("warmup_form", group["warmup_form"], WARMUP_FORMS)

    def _step(self) -> None:
        position = 0  # each parameter's place in the optimizer: seeds its stochastic rounding
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            if group_kind(group) in SPARSE_KINDS:
                for p in group["params"]:
                    position += 1
                    if p.grad is not None:
                        check_grad(p)
                        self._sparse_step(p, group, beta1, beta2, position)
                continue
            decay = group["warmup"] if group["warmup_form"] == "moment_decay" else 0
            batch = AdamBatch(group["state_bits"], group["stochastic_rounding"], group["compiled"])
            for p in group["params"]:
                position += 1
                if p.grad is None:
                    continue
                check_grad(p)
                state = self.state[p]
                if decay > 1 and (float(state["step"]) if state else 0.0) + 1 < decay:
                    self._decayed_dense_step(p, state, group, beta1, beta2, position)
                else:
                    batch.add(p, state, position)
            batch.step(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], foreach=group["foreach"])

    def _decayed_dense_step(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], beta1: float,
                            beta2: float, position: int) -> None:
        """AdamW (lowmem.optim.adamw's corrected form) with the stored first moment decayed by t / W after
        its update: a dense tensor's first W - 1 steps under moment_decay (from step W on the factor is 1,
        and the tensor goes through the AdamW batch). 8-bit moments: in fp32 on this rank's part, requantized."""
        if not state:
            init_adam_state(state, p, group["state_bits"])
        if not quantized_state.is_quantized(state, "exp_avg"):
            self._decayed_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state, group, beta1, beta2)
            return
        generator = quantized_state.rounding_generator(group["stochastic_rounding"], position, state["step"], p)
        with quantized_state.dequantized_step(p, state, ADAM_MOMENTS, generator) as (weights, grad, (m, v)):
            self._decayed_update(weights, grad, m, v, state, group, beta1, beta2)

    @staticmethod
    def _decayed_update(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, state: dict[str, Any],
                        group: dict[str, Any], beta1: float, beta2: float) -> None:
        state["step"] += 1
        t = state["step"].item()
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m.mul_(t / group["warmup"])
        p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"]), value=-lr / (1 - beta1**t))

    def _sparse_step(self, p: torch.Tensor, group: dict[str, Any], beta1: float, beta2: float, position: int) -> None:
        if is_dtensor(p):
            raise ValueError("SMET's sparse layers are not sharded (their block index is per layer); "
                             "train a sparse model with --distributed ddp, not fsdp2")
        layout = sparse_layout(p)
        block, index = layout.block_size, layout.block_index.long()
        k = index.numel()
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in ADAM_MOMENTS:
                if quantized_state.quantizes_state(compact_rows(k, block), group["state_bits"]):
                    quantized_state.init_quantized_state(state, key, compact_rows(k, block), 1, p.device)
                else:
                    state[key] = torch.zeros(k * block, dtype=p.dtype, device=p.device)
            state["block_step"] = torch.zeros(k, dtype=torch.int32, device=p.device)
        grad = p.grad if layout.storage == "compact" else p.grad.view(-1, block).index_select(0, index).reshape(-1)
        if not quantized_state.is_quantized(state, "exp_avg"):
            self._sparse_update(p, grad, state["exp_avg"], state["exp_avg_sq"], state, group, beta1, beta2)
            return
        # 8-bit compact moments: updated in fp32 (fp64 beside fp64 weights) as one row, then requantized.
        work = torch.promote_types(p.dtype, torch.float32)
        generator = quantized_state.rounding_generator(group["stochastic_rounding"], position, state["step"], p)
        with quantized_state.dequantized(state, ADAM_MOMENTS, generator=generator, dtype=work) as (m, v):
            self._sparse_update(p, grad.to(work), m.view(-1), v.view(-1), state, group, beta1, beta2)

    @staticmethod
    def _sparse_update(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, state: dict[str, Any],
                       group: dict[str, Any], beta1: float, beta2: float) -> None:
        """One SMET step of sparse parameter `p` from the active entries' gradient `grad` and compact
        moments `m`, `v` (k*B, in the dtype the update is computed in)."""
        layout = sparse_layout(p)
        block, index = layout.block_size, layout.block_index.long()
        k = index.numel()
        compact = layout.storage == "compact"
        local = state["block_step"]
        state["step"] += 1
        t = state["step"].item()
        local += 1
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        s = local.to(compute)
        lr = group["lr"] * density_factor(group["density_lr"], layout.density)
        scale = lr / (1 - torch.pow(beta1, s))
        warmup = group["warmup"]
        if group["warmup_form"] == "moment_decay" and warmup > 1:
            m.view(k, block).mul_((s / warmup).clamp(max=1.0).unsqueeze(1).to(m.dtype))
        elif group["warmup_form"] == "step_ramp" and warmup:
            scale = scale * torch.where(s < t, (s / warmup).clamp(max=1.0), torch.ones_like(s))
        bias2_sqrt = (1 - torch.pow(beta2, s)).sqrt()
        denom = (v.view(k, block).sqrt() / bias2_sqrt.unsqueeze(1).to(v.dtype)).add_(group["eps"])
        update = (m.view(k, block) / denom).mul_(scale.unsqueeze(1).to(v.dtype)).to(p.dtype)
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        if compact:
            p.view(k, block).sub_(update)
        else:
            p.view(-1, block).index_add_(0, index, update, alpha=-1)

    def reset_param_state(self, param: torch.Tensor, mask: torch.Tensor | None) -> None:
        """lowmem.optim.state's contract: zero the moments of the blocks `mask` touches (shaped like the
        parameter) and restart their local steps (at 1 under moment_decay, the release's, else 0);
        mask None: everything, every step to 0."""
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
        for key in ADAM_MOMENTS:
            if quantized_state.is_quantized(state, key):  # dequantized, zeroed, requantized
                entries = blocks.unsqueeze(1).expand(-1, block).reshape(state[key + quantized_state.CODES].shape)
                quantized_state.reset_quantized(state, key, entries)
            else:
                state[key].view(-1, block).masked_fill_(blocks.unsqueeze(1), 0)
        restart = 1 if self._group_of(param)["warmup_form"] == "moment_decay" else 0
        state["block_step"].masked_fill_(blocks, restart)

    def _group_of(self, param: torch.Tensor) -> dict[str, Any]:
        return next(group for group in self.param_groups if any(p is param for p in group["params"]))


# The released scripts at d = 0.5 (LLaMA 130M / 350M / 1B on C4): one lr for every parameter. Their 1B
# density sweep (1e-3 / 2e-3 / 5e-3 at d = 0.5 / 0.3 / 0.1) and 5% warmup: configs/smet-paper-1b.yaml.
register("smet", Method(
    "lowmem.optim.smet:SMET",
    "SMET: Adam over the active weights of a sparse model, per-block local steps, decayed first moment of new blocks",
    presets={"llama-130m": {"lr": 2e-3}, "llama-350m": {"lr": 2e-3}, "llama-1b": {"lr": 1e-3}},
    kinds=METHOD_KINDS["smet"],
))
