"""Adam-mini (Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", arXiv 2406.16793).

Adam with one second-moment scalar per block of a tensor instead of one per entry:

  W  *= 1 - lr*wd                                        (decoupled decay, first)
  m   = beta1*m + (1-beta1)*g                            (per entry, as Adam)
  v_b = beta2*v_b + (1-beta2)*mean_{i in b}(g_i^2)       (one scalar per block b)
  W_i -= lr * (m_i/(1-beta1^t)) / (sqrt(v_b/(1-beta2^t)) + eps)

Blocks follow the paper's Hessian-structure partition. A tensor is viewed as [size(0), -1] (a 1-D
tensor as [n, 1]) and a block is `rows_per_block` consecutive rows:

  q and k projections   one block per attention head      rows_per_block = head_dim
  v, o, MLP matrices    one block per output neuron       rows_per_block = 1
  embedding, head       one block per token (a vocab row) rows_per_block = 1
  1-D (norm gains)      one block for the whole tensor    rows_per_block = size(0)

How the blocks are chosen. A param group may carry `rows_per_block` (an int dividing size(0) of
every tensor of the group); without it (the default, and every group of
`lowmem.optim.param_groups(model)`) a tensor of >= 2 dims gets one block per row and a 1-D tensor
one block in all — so plain `AdamMini(model.parameters())` and role groups are per-row / per-tensor.
Heads are structure, not roles: `adam_mini_param_groups(model)` returns the role groups with each
attention module's q and k weights moved into a group with `rows_per_block = head_dim`. It finds
attention modules by structure (a module with an integer `head_dim` and nn.Linear children
`q_proj`, `k_proj`: lowmem's LLaMA and Hugging Face's), never by parameter-name substrings.
The registry entry names `adam_mini_param_groups` as its group builder, so
`lowmem.optim.build("adam-mini", model)` gives q and k one block per head (the paper's partition);
`AdamMini(lowmem.optim.param_groups(model))` gives them per-row blocks.

State per tensor: `step` (float32 scalar), `exp_avg` (the tensor's shape), `exp_avg_sq` (shape
[n_blocks]). `state_bits=8` (issue 26, lowmem.optim.quantized_state; default None: full precision)
keeps `exp_avg` of every tensor of >= 2 dims and >= 4096 elements as 8-bit codes (`exp_avg_codes`/
`exp_avg_absmax`, signed map; dequantized to fp32 for its update, requantized after, a block of rows at a
time once the blocks' second moments are known (`quantized_state.dequantized_rows`); `stochastic_rounding`
as AdamW's); `exp_avg_sq`, one float per block, stays in full precision. The official package (adam-mini 1.1.1) partitions by parameter names with `dim` and
`n_heads` arguments into the same blocks; tests/test_adam_mini.py checks equality with it.

FSDP2 (DTensor shards). `exp_avg` is sharded like the parameter; `exp_avg_sq` is kept whole on every
rank (n_blocks floats per tensor, e.g. 32000 for a 32000-row embedding: < 0.2% of the tensor's
entries), because a block may straddle two ranks' rows (a head split by an uneven shard) and a 1-D
tensor's single block always does. Each rank sums g^2 over its local rows into per-block partial
sums, and one all-reduce per step (of all tensors' partial sums together, sum_t n_blocks floats)
completes them; every rank then updates its own rows. No gather of any tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowmem.optim import Method, quantized_state, register
from lowmem.optim.base import (
    LowmemOptimizer,
    all_reduce_partials,
    as_pair,
    check_adam_group,
    check_grad,
    check_positive_int,
    is_dtensor,
    sharded_groups,
)
from lowmem.optim.kinds import FACTOR_KINDS
from lowmem.optim.roles import group_input_dim, param_groups


def adam_mini_param_groups(model: nn.Module, **per_role: dict[str, Any]) -> list[dict[str, Any]]:
    """`param_groups(model, **per_role)` with attention q/k weights in per-head groups (see module doc)."""
    groups = param_groups(model, **per_role)
    head_dims: dict[int, int] = {}  # id(weight) -> head_dim
    for module in model.modules():
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or isinstance(head_dim, bool):
            continue
        for child in ("q_proj", "k_proj"):
            linear = getattr(module, child, None)
            if isinstance(linear, nn.Linear) and linear.weight.requires_grad:
                head_dims[id(linear.weight)] = head_dim
    out = []
    for group in groups:
        if group["role"] != "hidden":
            out.append(group)
            continue
        rest = [p for p in group["params"] if id(p) not in head_dims]
        if rest:
            out.append({**group, "params": rest})
        for head_dim in sorted(set(head_dims.values())):
            heads = [p for p in group["params"] if head_dims.get(id(p)) == head_dim]
            if heads:
                out.append({**group, "params": heads, "rows_per_block": head_dim})
    return out


def _rows(t: torch.Tensor) -> int:
    return t.size(0) if t.dim() > 0 else 1


def block_rows(param: torch.Tensor, rows_per_block: int | None) -> int:
    """Rows per block of `param`: the group's setting, else 1 for matrices and all rows for vectors."""
    if rows_per_block is not None:
        return rows_per_block
    return 1 if param.dim() >= 2 else _rows(param)


def _local_rows(tensor: torch.Tensor, transposed: bool = False) -> tuple[torch.Tensor, int]:
    """This rank's part of `tensor` as a [local_rows, -1] view (writes reach the tensor), and the
    global index of its first row. `transposed`: a 2-D weight stored [in, out] (Conv1D), viewed
    [out, in] so that a row is an output neuron (not sharded: lowmem shards only its own LLaMA)."""
    if transposed:
        return tensor.t(), 0
    if not is_dtensor(tensor):
        return tensor.view(_rows(tensor), -1), 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return local.view(_rows(local), -1), (offset[0] if offset else 0)


class AdamMini(LowmemOptimizer):
    """Adam-mini: Adam with one second moment per block; see the module docstring for the blocks.

    Args:
        params: parameters or param groups; `adam_mini_param_groups(model)` gives the paper's partition.
            A group may set `rows_per_block` (consecutive rows sharing one second moment).
        lr, betas, eps: as Adam (eps added to the bias-corrected sqrt(v)).
        weight_decay: decoupled, `W *= 1 - lr * weight_decay` before the update.
        state_bits: 8 keeps `exp_avg` of the matrices in 8-bit codes; None or 32: full precision.
        stochastic_rounding: requantize 8-bit states with unbiased random rounding.
    """

    # A block is rows of one tensor, so its second moment needs that tensor's gradient only (the one
    # all-reduce of partial sums batches tensors together only under FSDP2).
    updates_per_parameter = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_bits: int | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        betas = as_pair(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rows_per_block=None,
                        state_bits=state_bits, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    def state_layout(self, param: torch.Tensor, key: str, value: torch.Tensor) -> str:
        # exp_avg_sq is whole on every rank, completed by the all-reduce of the blocks' partial sums.
        return "replicated" if key == "exp_avg_sq" else super().state_layout(param, key, value)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_adam_group(group)
        rows_per_block = group["rows_per_block"]
        if rows_per_block is None:  # the default blocks: rows of a matrix, a whole vector
            return
        check_positive_int("rows_per_block", rows_per_block)
        for p in group["params"]:
            if _rows(p) % rows_per_block:
                raise ValueError(
                    f"rows_per_block {rows_per_block} does not divide the {_rows(p)} rows of a parameter of shape "
                    f"{tuple(p.shape)}; a block must be whole rows of one tensor"
                )

    def _block_of_row(self, first_row: int, rows: int, rows_per_block: int, n_blocks: int,
                      device: torch.device) -> torch.Tensor | None:
        """The block of each of this rank's `rows` local rows (from global row `first_row`), or None when
        each row is its own block (rows_per_block 1, all rows here). Kept across steps: the layout of a
        tensor's rows does not change, and an index made per step was one arange per tensor and step."""
        if rows_per_block == 1 and first_row == 0 and rows == n_blocks:
            return None
        cache = self.__dict__.setdefault("_block_indices", {})  # not state: derived from shapes, rebuilt after a load
        key = (first_row, rows, rows_per_block, device)
        if key not in cache:
            cache[key] = torch.arange(first_row, first_row + rows, device=device) // rows_per_block
        return cache[key]

    def _step(self) -> None:
        # Pass 1: per-block partial sums of g^2 over local rows; then one all-reduce completes them.
        work, partials, shardings = [], [], []
        position = 0  # each parameter's place in the optimizer: seeds its stochastic rounding
        for group in self.param_groups:
            for p in group["params"]:
                position += 1
                if p.grad is None:
                    continue
                check_grad(p)
                transposed = group_input_dim(group, p) == 0  # [in, out]: blocks are columns
                rows_per_block = block_rows(p, group["rows_per_block"])
                n_blocks = (p.size(1) if transposed else _rows(p)) // rows_per_block
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    quantized_state.init_moment(state, "exp_avg", p, group["state_bits"])
                    state["exp_avg_sq"] = torch.zeros(n_blocks, dtype=p.dtype, device=_local_rows(p)[0].device)
                grad, first_row = _local_rows(p.grad, transposed)
                row_sq = torch.linalg.vector_norm(grad, dim=1).square_()
                block_of_row = self._block_of_row(first_row, grad.size(0), rows_per_block, n_blocks, grad.device)
                if block_of_row is None:  # each row its own block: the row sums are the partial sums
                    partial = row_sq
                else:
                    partial = torch.zeros(n_blocks, dtype=row_sq.dtype, device=grad.device).index_add_(0, block_of_row, row_sq)
                work.append((group, p, grad, block_of_row, rows_per_block * (p.numel() // n_blocks // rows_per_block),
                             transposed, position))
                partials.append(partial)
                shardings.append(sharded_groups(p))
        all_reduce_partials(partials, shardings)
        # Pass 2: the Adam-mini update of each rank's own rows.
        for (group, p, grad, block_of_row, block_numel, transposed, position), block_sq in zip(work, partials):
            state = self.state[p]
            quantized = quantized_state.is_quantized(state, "exp_avg")
            generator = (quantized_state.rounding_generator(group["stochastic_rounding"], position, state["step"], p)
                         if quantized else None)
            row_denom, step_size = _second_moment_step(group, state, block_sq, block_of_row, block_numel)
            if not quantized:
                param, _ = _local_rows(p, transposed)
                exp_avg, _ = _local_rows(state["exp_avg"], transposed)
                _first_moment_step(group, param, grad, exp_avg, row_denom, step_size)
                continue
            # 8-bit exp_avg: this rank's rows dequantized, the same update in at least fp32, requantized; with
            # the blocks' denominators known each row is independent, so a block of rows at a time (no fp32
            # copy of a whole 7B embedding alive), but a transposed [in, out] weight, whose rows are columns.
            first = 0
            for weights, grad_rows, (values,) in quantized_state.dequantized_rows(p, state, ("exp_avg",), generator,
                                                                                 grad, whole=transposed):
                rows, exp_avg = _local_rows(weights, transposed)[0], _local_rows(values, transposed)[0]
                _first_moment_step(group, rows, grad_rows, exp_avg, row_denom[first:first + rows.size(0)], step_size)
                first += rows.size(0)


def _second_moment_step(group: dict[str, Any], state: dict[str, Any], block_sq: torch.Tensor,
                        block_of_row: torch.Tensor | None, block_numel: int) -> tuple[torch.Tensor, float]:
    """Steps the tensor's counter and its blocks' second moments from their completed sums of g^2
    `block_sq`; returns each local row's denominator (its block's) and the step size -lr / (1 - beta1^t)."""
    beta1, beta2 = group["betas"]
    state["step"] += 1
    t = state["step"].item()
    exp_avg_sq = state["exp_avg_sq"]
    exp_avg_sq.mul_(beta2).add_(block_sq, alpha=(1 - beta2) / block_numel)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
    return (denom if block_of_row is None else denom[block_of_row]), -group["lr"] / (1 - beta1**t)


def _first_moment_step(group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                       row_denom: torch.Tensor, step_size: float) -> None:
    """Decay, the first moment's EMA and the update of the rows `param` ([rows, -1] views, as `grad` and
    `exp_avg`), each row divided by its `row_denom`."""
    if group["weight_decay"]:
        param.mul_(1 - group["lr"] * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - group["betas"][0])
    param.addcdiv_(exp_avg, row_denom.unsqueeze(1), value=step_size)


register(
    "adam-mini",
    Method("lowmem.optim.adam_mini:AdamMini",
           "Adam-mini: Adam with one second moment per block (attention heads for q/k, rows elsewhere)",
           groups="lowmem.optim.adam_mini:adam_mini_param_groups",
           kinds=FACTOR_KINDS),  # a factor: one block per row (lowmem.optim.kinds)
)
