"""Muon (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024,
https://kellerjordan.github.io/posts/muon/; `torch.optim.Muon` since PyTorch 2.9).

Hidden matrices (role "hidden"; a tensor of more than 2 dims is viewed [size(0), -1]), at scheduled
learning rate lr_t, exactly as torch.optim.Muon's code:

  B  = momentum*B + (1-momentum)*G             (the momentum buffer is an EMA: lerp)
  U  = (1-momentum)*G + momentum*B             Nesterov (nesterov=True); U = B otherwise
  O  = NS(U)                                   `ns_steps` quintic Newton–Schulz iterations in `ns_dtype`
                                               (lowmem.optim.newton_schulz: (3.4445, -4.7750, 2.0315))
  W *= 1 - lr_t*weight_decay                   decoupled decay at the unadjusted rate, then
  W -= lr_t * adjust(rows, cols) * O           "original": sqrt(max(1, rows/cols))
                                               "match_rms_adamw": 0.2*sqrt(max(rows, cols))

(torch.optim.Muon's docstring writes B = momentum*B + G; its code, followed here, uses the EMA. The
two differ by the factor 1/(1-momentum), which the Frobenius normalization inside NS removes.)

`matrices="all"` (registered as `muon-all`) also runs Muon on the embedding and the head, viewed
[vocab, hidden], with the same adjust_lr rule: the configuration the SCALE paper's Muon memory figures
imply (one state element per parameter). Otherwise the embedding, head and vectors (1-D tensors
always, whatever their group's role) get AdamW (lowmem's
core: bias-corrected, eps added to sqrt(v), decoupled decay at their own rate) at
`adam_lr * lr_t / lr_max`: as in lowmem.optim.scale, each group records `initial_lr` (lr_max) at
construction and the trainer or a torch scheduler rescales `lr`, so `adam_lr` is the Adam rate at the
schedule's peak and follows the same warmup + cosine shape. State: `momentum_buffer` per hidden
matrix; `step`, `exp_avg`, `exp_avg_sq` per Adam tensor.

`state_bits=8` (issue 26, lowmem.optim.quantized_state; default None: full precision) keeps the momentum
of every Muon matrix of >= 4096 elements as 8-bit codes (`momentum_buffer_codes`/`momentum_buffer_absmax`,
signed map) plus a float32 `step` (its count of updates, which seeds `stochastic_rounding`), and the Adam
tensors' moments through lowmem.optim.adamw.AdamBatch with the same setting (vectors stay full
precision). Those matrices are updated batch by batch as below: each batch's momenta dequantized to
fp32, the same `muon_update`, requantized, so at most one batch's fp32 momenta exist.

FSDP2 (DTensor shards on dim 0): the momentum update is elementwise on the local shard; NS needs the
whole matrix, so every rank all-gathers U, runs NS on the full matrix, and keeps its own rows
(lowmem.optim.newton_schulz.orthogonalize, through lowmem.optim.base.full_matrix_op). Cost per hidden matrix and step: one all-gather
of rows*cols elements (each rank receives (world-1)/world of it — the same volume as FSDP's own
parameter all-gather in the forward pass), a transient full-size copy of U and O on every rank, and
NS computed redundantly on every rank (per-rank NS time equals the unsharded time; total FLOPs are
world x). Distributing whole matrices round-robin would divide the NS work by world at the price of a
scatter of the results; not done here. Unsharded matrices of one shape share one batched NS call
(`muon_update`); a DTensor's NS stays one matrix at a time.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

import torch

from lowmem.optim import Method, quantized_state, register
from lowmem.optim.adamw import AdamBatch, scheduled_adam_lr
from lowmem.optim.base import (
    LowmemOptimizer,
    as_pair,
    check_beta,
    check_betas,
    check_bool,
    check_choice,
    check_grad,
    check_nonneg,
    check_positive_int,
    local_tensor,
)
from lowmem.optim.newton_schulz import newton_schulz, ns_batches, orthogonalize
from lowmem.optim.quantized_state import MOMENTUM, dequantized_momentum, init_momentum
from lowmem.optim.roles import group_input_dim, group_role

ADJUST_LR = ("original", "match_rms_adamw")
# Which matrices get Muon: "hidden" (Keller Jordan's and torch's), or "all" (embedding and head too).
MATRICES = {"hidden": frozenset({"hidden"}), "all": frozenset({"hidden", "embedding", "head"})}
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def adjusted_lr(lr: float, rows: int, cols: int, adjust_lr: str) -> float:
    """The rate of an orthogonalized update of a rows x cols matrix (see the module docstring)."""
    check_choice("adjust_lr", adjust_lr, ADJUST_LR)
    if adjust_lr == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))  # match_rms_adamw


def muon_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    adjust_lr: str,
    ns_steps: int,
    ns_dtype: torch.dtype,
    input_dims: list[int] | None = None,
    ns_batch_elements: int | None = None,
) -> None:
    """One Muon step over hidden matrices (the functional core of `Muon`); `input_dims[i]` 0 marks a
    weight stored [in, out] (Conv1D), whose shape factor takes rows = size(1).

    Matrices of one shape are orthogonalized together, one batched Newton–Schulz call per batch of at
    most `ns_batch_elements` (lowmem.optim.newton_schulz.ns_batches; 0: one matrix at a time; None:
    batched off the CPU, one at a time on it, where batching measured slower: default_batch_elements).
    On the CPU both give the same bits.
    """
    if not params:
        return
    torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    input_dims = input_dims if input_dims is not None else [1] * len(params)
    for batch in ns_batches(params, input_dims, max_elements=ns_batch_elements):
        first = params[batch[0]]
        rows = first.size(1) if input_dims[batch[0]] == 0 else first.size(0)  # output units
        alpha = -adjusted_lr(lr, rows, first.numel() // rows, adjust_lr)
        if len(batch) == 1:  # a DTensor, or a shape of its own: the transient U is one matrix
            buffer = momentum_buffers[batch[0]]
            update = grads[batch[0]].lerp(buffer, momentum) if nesterov else buffer
            local_tensor(first).add_(orthogonalize(update, steps=ns_steps, dtype=ns_dtype), alpha=alpha)
            continue
        stack = first.new_empty((len(batch), first.size(0), first.numel() // first.size(0)))
        for slot, i in zip(stack, batch):  # U written straight into the stack: no second copy
            buffer = momentum_buffers[i].reshape(slot.shape)
            if nesterov:
                torch.lerp(grads[i].reshape(slot.shape), buffer, momentum, out=slot)
            else:
                slot.copy_(buffer)
        ortho = newton_schulz(stack, steps=ns_steps, dtype=ns_dtype)
        torch._foreach_add_([params[i] for i in batch], [o.view_as(params[i]) for o, i in zip(ortho, batch)],
                            alpha=alpha)


def quantized_muon_update(params: list[torch.Tensor], states: list[dict[str, Any]], positions: list[int], *,
                          stochastic_rounding: bool, input_dims: list[int], ns_batch_elements: int | None = None,
                          **hparams: Any) -> None:
    """`muon_update` of matrices whose momenta are 8-bit codes (`states[i]`, the state of `params[i]` at
    `positions[i]` in its optimizer): batched by `ns_batches` as `muon_update` would batch them, each
    batch's momenta dequantized to fp32 (weights and gradients in at least fp32), updated by one
    `muon_update` and requantized before the next batch's are dequantized."""
    for batch in ns_batches(params, input_dims, max_elements=ns_batch_elements):
        with ExitStack() as stack:
            work = [stack.enter_context(dequantized_momentum(params[i], states[i], stochastic_rounding, positions[i]))
                    for i in batch]
            weights, grads, buffers = (list(column) for column in zip(*work))
            muon_update(weights, grads, buffers, input_dims=[input_dims[i] for i in batch],
                        ns_batch_elements=ns_batch_elements, **hparams)


def _dtype_name(dtype: str | torch.dtype) -> str:
    # Groups store the name, so configs, logs and state_dicts hold a plain string.
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


class Muon(LowmemOptimizer):
    """Muon on hidden matrices, AdamW on the embedding, head and vectors; see the module docstring.

    Args:
        params: parameters or param groups, ideally with roles from `lowmem.optim.param_groups(model)`
            (a group without a role: 1-D tensors are vectors, others hidden).
        lr: hidden matrices' learning rate (Keller Jordan's 0.02 with adjust_lr="original").
        momentum: beta of the momentum EMA, in [0, 1) (0.95).
        nesterov: Nesterov's look-ahead U = lerp(G, B, momentum) instead of U = B.
        weight_decay: decoupled, `W *= 1 - rate * weight_decay` before each update, every role.
        adjust_lr: "original" (sqrt(max(1, rows/cols))) or "match_rms_adamw" (0.2*sqrt(max(rows, cols))).
        ns_steps: Newton–Schulz iterations (5).
        ns_dtype: "bfloat16" (Muon's choice) or "float32" / "float64" (or the torch.dtype).
        adam_lr: AdamW's rate for the other roles at the schedule's peak.
        adam_betas, adam_eps: AdamW's betas and eps for the other roles.
        matrices: "hidden" (Muon on hidden matrices only) or "all" (also the embedding and head, which
            then keep one momentum buffer each instead of Adam's two moments; see `muon-all`).
        state_bits: 8 keeps the momenta (and the Adam tensors' moments, where large enough) in 8-bit
            codes; None or 32: full precision (see the module docstring).
        stochastic_rounding: requantize 8-bit states with unbiased random rounding.
        compiled: the tensors left to AdamW take the compiled update (lowmem.optim.adamw, `compiled`);
            momentum and Newton–Schulz stay eager.
    """

    updates_per_parameter = True  # Newton–Schulz orthogonalizes one matrix; momentum and Adam are per tensor
    # Elements per batched Newton–Schulz call (muon_update); 0 runs one matrix at a time, the same bits;
    # None: newton_schulz.default_batch_elements (batched on GPUs, one at a time on the CPU).
    ns_batch_elements: int | None = None

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        adjust_lr: str = "original",
        ns_steps: int = 5,
        ns_dtype: str | torch.dtype = "bfloat16",
        adam_lr: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        matrices: str = "hidden",
        state_bits: int | None = None,
        stochastic_rounding: bool = False,
        compiled: bool = False,
    ) -> None:
        adam_betas = as_pair(adam_betas)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, adjust_lr=adjust_lr,
                        ns_steps=ns_steps, ns_dtype=_dtype_name(ns_dtype), adam_lr=adam_lr,
                        adam_betas=adam_betas, adam_eps=adam_eps, matrices=matrices, state_bits=state_bits,
                        stochastic_rounding=stochastic_rounding, compiled=compiled)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "ns_dtype" in param_group:
            param_group["ns_dtype"] = _dtype_name(param_group["ns_dtype"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_nonneg("lr", group["lr"])
        check_beta("momentum", group["momentum"])
        check_bool("nesterov", group["nesterov"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_nonneg("adam_lr", group["adam_lr"])
        check_betas("adam_betas", group["adam_betas"])
        check_nonneg("adam_eps", group["adam_eps"])
        check_positive_int("ns_steps", group["ns_steps"])
        check_choice("ns_dtype", group["ns_dtype"], NS_DTYPES)
        check_choice("matrices", group["matrices"], MATRICES)
        check_choice("adjust_lr", group["adjust_lr"], ADJUST_LR)

    def _step(self) -> None:
        position = 0  # each parameter's place in the optimizer: seeds its stochastic rounding
        for group in self.param_groups:
            self._step_group(group, position)
            position += len(group["params"])

    def _step_group(self, group: dict[str, Any], position: int) -> None:
        matrices, matrix_grads, buffers, input_dims = [], [], [], []
        quantized: tuple[list, list, list, list] = ([], [], [], [])  # params, states, positions, input dims
        adam = AdamBatch(group["state_bits"], group["stochastic_rounding"], group["compiled"])
        muon_roles = MATRICES[group["matrices"]]
        for p in group["params"]:
            position += 1
            if p.grad is None:
                continue
            check_grad(p)
            state = self.state[p]
            if p.dim() >= 2 and group_role(group, p) in muon_roles:
                if MOMENTUM not in state and not quantized_state.is_quantized(state, MOMENTUM):
                    init_momentum(state, p, group["state_bits"])
                if quantized_state.is_quantized(state, MOMENTUM):
                    for column, value in zip(quantized, (p, state, position, group_input_dim(group, p))):
                        column.append(value)
                    continue
                matrices.append(p)
                matrix_grads.append(p.grad)
                buffers.append(state[MOMENTUM])
                input_dims.append(group_input_dim(group, p))
                continue
            adam.add(p, state, position)

        hparams = dict(lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
                       weight_decay=group["weight_decay"], adjust_lr=group["adjust_lr"], ns_steps=group["ns_steps"],
                       ns_dtype=NS_DTYPES[group["ns_dtype"]], ns_batch_elements=self.ns_batch_elements)
        muon_update(matrices, matrix_grads, buffers, input_dims=input_dims, **hparams)
        params, states, positions, quantized_dims = quantized
        quantized_muon_update(params, states, positions, stochastic_rounding=group["stochastic_rounding"],
                              input_dims=quantized_dims, **hparams)
        beta1, beta2 = group["adam_betas"]
        adam.step(lr=scheduled_adam_lr(group["adam_lr"], group), beta1=beta1, beta2=beta2,
                  eps=group["adam_eps"], weight_decay=group["weight_decay"])


register(
    "muon",
    Method("lowmem.optim.muon:Muon",
           "Muon: Nesterov momentum + Newton–Schulz orthogonalization on hidden matrices, AdamW on the rest"),
)

# The SCALE paper's Muon rows (methods.md section 10: 0.23 / 0.54 / 1.47 / 5.36 GB at 60M-1B, 26.95 GB at
# 7B) are exactly 2 bytes x (weights + one state element per parameter), embedding and head included:
# the configuration that memory implies is Muon's momentum + Newton–Schulz on every matrix, with Adam
# (two moments) only for the 1-D norm gains. `muon` (embedding and head on Adam) would need 3 elements
# per embedding/head entry and does not reproduce those cells.
register(
    "muon-all",
    Method("lowmem.optim.muon:Muon",
           "Muon on every matrix (embedding and head included), AdamW only on 1-D gains: the SCALE "
           "paper's Muon memory (one state element per parameter)",
           defaults={"matrices": "all"}),
)
