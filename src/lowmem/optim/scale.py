"""SCALE and the minimalist SGD family it was distilled from.

Glentis, Li, Han, Hong, "A Minimalist Optimizer Design for LLM Pretraining" (SCALE: Stochastic
Column-normAlized Last-layer momEntum), arXiv 2506.16659, ICML 2026. Per step, for every matrix W with
gradient G at scheduled learning rate lr_t:

  W *= 1 - lr_t * wd                                   (decoupled weight decay, first; wd = 0 in the paper)
  D  = G                        hidden matrices and the embedding: no state at all
  m  = lerp(m, G, 1 - beta); D = m                     output head only (EMA, no Nesterov, no bias correction)
  W -= lr_t * D / clamp_min(rms(D, dim), 1e-8)         rms(x, dim) = sqrt(mean(x^2, dim)), so each vector has RMS 1

dim = 1 (each output unit's vector over its inputs) for nn.Linear weights [out, in] and the head
[vocab, hidden]; dim = 0 for the embedding [vocab, hidden] (each hidden unit's column over the
vocabulary). A weight stored [in, out] (GPT-2's Conv1D; its group carries input_dim 0, see
lowmem.optim.roles) is normalized over its dim 0, the inputs, so the rule means the same for every
orientation. Tensors with more than 2 dims are viewed as [size(0), -1]. 1-D parameters (norm gains)
get AdamW (betas (0.9, 0.999), eps 1e-8 added to the uncorrected sqrt(v), both bias corrections in
the step size, as the released code: lowmem.optim.adamw's eps_placement="uncorrected") at lr
`adam_lr * lr_t / lr_max`.
Optimizer state: the head's momentum plus Adam's (step, exp_avg, exp_avg_sq) of the 1-D parameters.

`state_bits=8` (issue 26, lowmem.optim.quantized_state; default None: full precision) keeps the momentum
of every matrix of >= 4096 elements (the head's, or whichever `momentum_on` names) as 8-bit codes
(`momentum_buffer_codes`/`momentum_buffer_absmax`, signed map) plus a float32 `step` (its count of
updates, which seeds `stochastic_rounding`), and the 1-D parameters' Adam moments go through
lowmem.optim.adamw.AdamBatch with the same setting (vectors stay full precision). Such a matrix is
updated on its own: its momentum dequantized to fp32, the same step as below, requantized.

`compiled=True` (issue 28, default off; `--opt compiled=true`): plain contiguous fp32 CPU matrices go
through lowmem.optim.scale_kernels, a few lines of C built once with the system's C compiler: the matrices
normalized within their rows (column/row normalization along dim 1: every hidden Linear and the head under
SCALE) in one pass per row (the momentum's EMA, the norm and the update, G and m read once), and the
embedding's norms across rows from one streamed pass (`kernel_norm_along`). Elsewhere (GPUs, bf16) the matrices normalized within
rows take their decay, norm and update in one torch.compile'd graph per (device, dtype) (`rows_rms_update`,
via lowmem.optim.adamw.compiled_function), where inductor fuses each row's norm with its multiply-add; the lr
is a 0-dim tensor, so a new lr compiles nothing; a momentum's EMA runs eagerly just before (inductor's CPU
code generation cannot build it into the graph: pytorch#196570), and the embedding stays eager. The 1-D
parameters take AdamW's compiled update. 8-bit momenta (but for their norms across rows), DTensors and meta
tensors stay eager. In fp32 the
eager step within rounding (tests/test_compiled_step.py, tests/test_scale_kernels.py).

The paper's ablations are the same class with two switches (registered as named variants below):

  normalization  "column"   the rule above (dim = 1 for Linear/head, dim = 0 for the embedding)
                 "row"      RMS over the other dim: dim = 0 for Linear/head (each input unit's vector
                            over the outputs), dim = 1 for the embedding (each token's row)
                 "sign"     D -> sign(D), elementwise (already RMS 1 where D has no zeros)
                 "singular" D -> NS(D) * sqrt(max(rows, cols)): Newton–Schulz orthogonalization as in
                            Muon (lowmem.optim.newton_schulz, `ns_steps` iterations in bf16), scaled so
                            that a semi-orthogonal update has RMS 1 like the other normalizations
                            (Muon's own sqrt(max(1, rows/cols)) would make its RMS 1/sqrt(cols) and
                            need a different learning rate); applied to the embedding and head too
                 "none"     D unchanged: plain SGD
  momentum_on    "none" | "head" | "embedding+head" | "all" (every matrix: hidden, embedding, head)

In every variant the 1-D parameters stay on AdamW at `adam_lr * lr_t / lr_max`, as in the paper's
ablations, which change only how the matrices are updated. A 1-D tensor is always treated as a vector,
whatever its group's role; a matrix in a group with role "vector" gets AdamW as asked.

Learning rates. `lr` is the matrices' rate. The trainer (and torch's LR schedulers) set
`group["lr"] = group["initial_lr"] * factor(t)` for every group; SCALE stores `initial_lr` (lr_max)
in each group at construction (setdefault, so a scheduler or trainer created later keeps it), and a
vector's rate is `adam_lr * group["lr"] / group["initial_lr"]`: `adam_lr` is the vectors' rate at the
peak, and the vectors follow the same warmup + cosine shape as the matrices, whatever code changes
`lr` and whether or not a group mixes matrices and vectors. (A group with initial_lr 0 gives its
vectors rate 0.) Decoupled weight decay applies to the vectors at their own rate (AdamW's rule).

FSDP2 (DTensor shards on dim 0). Column normalization of a hidden Linear or the head (dim = 1) is
local to each rank's rows: no communication. The embedding's per-column RMS (dim = 0, the sharded
dim) is a global reduction: DTensor returns the local norms as a partial, and `norm_along` all-reduces
them explicitly (Partial -> Replicate; one all-reduce of `hidden` floats per step). Row normalization
all-reduces the same way for every Linear (`in` floats each). Sign normalization is local. Singular
normalization needs the whole matrix: each rank all-gathers the gradient (or momentum) with
`full_tensor()` (a transient full-size copy per rank, rows x cols elements), runs Newton–Schulz
redundantly, and keeps its own rows of the result. tests/test_scale.py checks one process against two
gloo processes.

No step depends on tensor values through Python control flow, so `step()` also runs on a model built
on the meta device with meta gradients and creates state of the right shapes (the memory estimator).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from lowmem.optim import Method, quantized_state, register, scale_kernels
from lowmem.optim.adamw import AdamBatch, compiled_function, scheduled_adam_lr
from lowmem.optim.base import (
    LowmemOptimizer,
    as_pair,
    check_beta,
    check_betas,
    check_choice,
    check_grad,
    check_nonneg,
    check_positive_int,
    group_by_device_dtype,
    is_dtensor,
    local_tensor,
)
from lowmem.optim.kinds import FACTOR_KINDS
from lowmem.optim.newton_schulz import newton_schulz, ns_batches, orthogonalize
from lowmem.optim.quantized_state import MOMENTUM, dequantized_momentum, dequantized_momentum_rows, init_momentum
from lowmem.optim.roles import group_input_dim, group_role

NORMALIZATIONS = ("column", "row", "sign", "singular", "none")
MOMENTUM_PLACEMENTS = {
    "none": frozenset(),
    "head": frozenset({"head"}),
    "embedding+head": frozenset({"embedding", "head"}),
    "all": frozenset({"hidden", "embedding", "head"}),
}
RMS_FLOOR = 1e-8
# Elements of the matrices per chunk of the column/row-normalized step (`cache_sized_chunks`): 2 MiB of
# fp32 direction, as much of weights and momentum, so a chunk stays in the L3 between the step's passes
# over it while its few Python calls stay small against its work. At llama-60m, 2^19 beat 2^17, 2^18,
# 2^20 and 2^21 (docs/results.md, issue 28).
CHUNK_ELEMENTS = 2**19


def normalized_dim(role: str, normalization: str, input_dim: int = 1) -> int:
    """The dim (of the [size(0), -1] view) that column/row normalization reduces over; `input_dim` is
    the weight's input dim (0 for a Conv1D [in, out], lowmem.optim.roles.group_input_dim)."""
    column_dim = 0 if role == "embedding" else input_dim
    return column_dim if normalization == "column" else 1 - column_dim


def rows_independent(normalization: str, dim: int) -> bool:
    """Whether the update of a matrix normalized along `dim` treats each row of its [size(0), -1] view
    on its own, so that it can run a block of rows at a time."""
    return normalization in ("none", "sign") or (normalization in ("column", "row") and dim == 1)


def norm_along(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm of a 2-D tensor along `dim` (keepdim), without a full-size temporary.

    On a DTensor sharded along `dim` (the embedding's dim 0 under FSDP2) the local norms are combined
    by an explicit all-reduce (redistribute Partial -> Replicate). On the CPU a reduction over dim 0
    of a contiguous matrix is ~15x slower than over dim 1 (32000x512 fp32, one thread: 75 ms vs 3-5 ms),
    so plain CPU tensors accumulate squares block by block instead (4.5-5.5 ms).
    """
    if is_dtensor(matrix):
        from torch.distributed.tensor import Replicate

        norm = torch.linalg.vector_norm(matrix, 2, dim=dim, keepdim=True)
        if any(p.is_partial() for p in norm.placements):
            norm = norm.redistribute(norm.device_mesh, [Replicate() if p.is_partial() else p for p in norm.placements])
        return norm
    if dim == 0 and matrix.device.type == "cpu" and matrix.is_contiguous():
        return _column_sum_of_squares(matrix).sqrt_().to(matrix.dtype)
    return torch.linalg.vector_norm(matrix, 2, dim=dim, keepdim=True)


def _column_sum_of_squares(matrix: torch.Tensor, block_elements: int = 2**18) -> torch.Tensor:
    # Rows are added into a cache-sized [block, cols] accumulator (1 MiB in fp32; at least fp32, so
    # bf16 gradients do not lose the sum), which is then reduced once.
    block = max(1, block_elements // max(1, matrix.size(1)))
    acc = torch.zeros(min(block, matrix.size(0)), matrix.size(1), device=matrix.device,
                      dtype=torch.promote_types(matrix.dtype, torch.float32))
    for start in range(0, matrix.size(0), block):
        rows = matrix[start:start + block]
        acc[:rows.size(0)].addcmul_(rows, rows)
    return acc.sum(0, keepdim=True)


def rms_normalized_step_(params: list[torch.Tensor], directions: list[torch.Tensor], dims: list[int], *,
                         lr: float, norm_of: Callable[[torch.Tensor, int], torch.Tensor] = norm_along) -> None:
    """`p -= lr * d / clamp_min(rms(d, dim), 1e-8)` for each (p, d, dim); column and row normalization.

    With rms = norm / sqrt(n) this is `p += (-lr * sqrt(n)) * d * (1 / clamp_min(norm, 1e-8 * sqrt(n)))`:
    each matrix takes one reduction pass and one multiply-add pass, and the arithmetic on the small
    norm tensors is batched with foreach calls. `norm_of(matrix, dim)`: the norms of a [size(0), -1] view.
    """
    factors, sqrt_ns = [], []
    for d, dim in zip(directions, dims):
        matrix = d if d.dim() == 2 else d.reshape(d.size(0), -1)  # >2-D tensors: [size(0), -1]
        norm = norm_of(matrix, dim)
        if d.dim() > 2:  # back to a shape that broadcasts against d
            norm = norm.view((-1,) + (1,) * (d.dim() - 1) if dim == 1 else (1,) + tuple(d.shape[1:]))
        factors.append(norm)
        sqrt_ns.append(math.sqrt(matrix.size(dim)))
    torch._foreach_clamp_min_(factors, [RMS_FLOOR * s for s in sqrt_ns])
    torch._foreach_reciprocal_(factors)
    # The scalar -lr * sqrt(n) rides on addcmul's `value`: a separate mul of the small factors costs
    # more (a wrapped-scalar tensor per call) than the clamp and reciprocal together.
    torch._foreach_addcmul_(params, directions, factors, [-lr * s for s in sqrt_ns])


def singular_step_(params: list[torch.Tensor], directions: list[torch.Tensor], *, lr: float, ns_steps: int,
                   ns_batch_elements: int | None = None) -> None:
    """`param -= lr * sqrt(max(rows, cols)) * NS(direction)` for each pair, NS on the whole matrix
    (gathered if sharded), matrices of one shape in one batched call off the CPU (newton_schulz.ns_batches,
    as for Muon: the per-matrix bits).

    NS is exactly Muon's (the same lowmem.optim.newton_schulz.orthogonalize Muon calls): cast to bf16,
    divide by max(||D||_F, 1e-7), five quintic iterations -- torch.optim.Muon's normalization to the
    bit. That is the paper's variant ("Newton–Schulz, as in Muon"), and no normalization beyond it is
    right: NS's own Frobenius division puts every singular value in [0, 1], so the iteration cannot
    diverge however large D is, and max(||D||, eps) makes the update independent of D's scale, as the
    column, row and sign normalizations are. (lowmem's Muon used to divide by the norm once more, in the
    input's precision before the cast, to make up for an NS that divided by ||D|| + eps; with max()
    inside NS that extra division only changed bf16 rounding, so Muon dropped it and both run this.)
    """
    for batch in ns_batches(directions, max_elements=ns_batch_elements):
        first = directions[batch[0]]
        rows = first.size(0)
        alpha = -lr * math.sqrt(max(rows, first.numel() // max(1, rows)))
        if len(batch) == 1:
            local_tensor(params[batch[0]]).add_(orthogonalize(first, steps=ns_steps), alpha=alpha)  # this rank's rows
            continue
        ortho = newton_schulz(torch.stack([directions[i].reshape(rows, -1) for i in batch]), steps=ns_steps)
        torch._foreach_add_([params[i] for i in batch], [o.view_as(params[i]) for o, i in zip(ortho, batch)],
                            alpha=alpha)


def compiles_rows(param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None, dim: int,
                  normalization: str) -> bool:
    """Whether `compiled=True` updates this matrix in `rows_rms_update`: normalized within rows, a plain
    contiguous tensor (not a DTensor, not meta), as its direction (the momentum buffer, else the gradient)."""
    direction = grad if buffer is None else buffer
    return (normalization in ("column", "row") and dim == 1 and not is_dtensor(param) and not param.is_meta
            and param.is_contiguous() and direction.is_contiguous())


def rows_rms_update(params: list[torch.Tensor], grads: list[torch.Tensor], lr: torch.Tensor, *,
                    weight_decay: float) -> None:
    """The weight decay and `rms_normalized_step_` along dim 1 of each (param, direction) in `params`,
    `grads` (a direction: the gradient, or the momentum after its EMA), written for one compiled graph
    (lowmem.optim.adamw.compiled_function): `lr` a 0-dim tensor; each matrix as its [size(0), -1] view,
    so inductor fuses a row's norm with its update."""
    for p, g in zip(params, grads):
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        weights, direction = p.view(p.size(0), -1), g.view(g.size(0), -1)
        sqrt_n = math.sqrt(direction.size(1))
        norm = torch.linalg.vector_norm(direction, 2, dim=1, keepdim=True)
        weights.sub_(direction * norm.clamp_min(RMS_FLOOR * sqrt_n).reciprocal() * (lr * sqrt_n))


def compiled_rows_update(params: list[torch.Tensor], grads: list[torch.Tensor],
                         momentum_buffers: list[torch.Tensor | None], *, lr: float, momentum: float,
                         weight_decay: float) -> None:
    """`scale_update` of matrices normalized within rows (`compiles_rows`) under `compiled=True`. Plain fp32
    CPU tensors: one pass of lowmem.optim.scale_kernels.scale_rows_ (EMA, norm and update per row). The
    rest: the momentum's EMA eager (inductor cannot compile it with its norm: pytorch#196570), then decay,
    norm and update in `rows_rms_update`'s compiled graph, one per device and dtype."""
    native = [scale_kernels.usable(p, g, m) for p, g, m in zip(params, grads, momentum_buffers)]
    if any(native):
        scale_kernels.scale_rows_(*([t for t, n in zip(ts, native) if n] for ts in (params, grads, momentum_buffers)),
                                  lr=lr, momentum=momentum, weight_decay=weight_decay, rms_floor=RMS_FLOOR)
        params, grads, momentum_buffers = ([t for t, n in zip(ts, native) if not n]
                                           for ts in (params, grads, momentum_buffers))
    if not params:
        return
    directions = decay_and_momentum_(params, grads, momentum_buffers, lr=lr, momentum=momentum, weight_decay=0.0)
    lr_tensor, update = torch.tensor(float(lr), dtype=torch.float64), compiled_function(rows_rms_update)
    for bucket in group_by_device_dtype(params, directions):
        update(*bucket, lr_tensor, weight_decay=weight_decay)


def kernel_norm_along(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """`norm_along` under `compiled=True`: a plain contiguous fp32 CPU matrix's norms across rows (the
    embedding's, under SCALE) from lowmem.optim.scale_kernels.column_sum_of_squares, which reads the
    direction in one stream (about a quarter less time than the blocked eager sum)."""
    if dim == 0 and scale_kernels.usable(matrix):
        return scale_kernels.column_sum_of_squares(matrix).sqrt_()
    return norm_along(matrix, dim)


def cache_sized_chunks(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    dims: list[int],
    max_elements: int | None = None,
) -> list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None], list[int]]]:
    """The matrices as chunks of about `max_elements` (default CHUNK_ELEMENTS) elements, each (params,
    grads, buffers, dims).

    A step that passes over each chunk in turn (decay, momentum, norm, multiply-add) reads its tensors
    from DRAM once, not once per pass. A plain contiguous CPU matrix normalized along dim 1 (its rows
    independent) is cut into blocks of rows, as 2-D views of its [size(0), -1] view: torch reduces a
    row in the same order in a block as in the whole matrix, so the bits do not change (tests). Whole
    matrices share a chunk up to the limit. A norm across rows (dim 0) needs the whole matrix, so such a
    matrix stays whole. DTensors and other devices (meta, CUDA: one foreach call over every tensor is
    what counts there) form one last chunk, unchanged.
    """
    max_elements = CHUNK_ELEMENTS if max_elements is None else max_elements
    pieces, rest = [], []
    for p, g, m, dim in zip(params, grads, momentum_buffers, dims):
        tensors = [p, g] if m is None else [p, g, m]
        if any(is_dtensor(t) or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            rest.append((p, g, m, dim))
            continue
        rows = p.size(0)
        blocks = min(rows, -(-p.numel() // max_elements)) if dim == 1 else 1
        if blocks <= 1:
            pieces.append((p, g, m, dim))
            continue
        split = [t.view(rows, -1).tensor_split(blocks) for t in tensors]
        if m is None:
            split.append([None] * blocks)
        pieces.extend((pb, gb, mb, dim) for pb, gb, mb in zip(*split))
    chunks, size = [], 0
    for piece in pieces:
        if not chunks or size + piece[0].numel() > max_elements:
            chunks.append(([], [], [], []))
            size = 0
        for column, value in zip(chunks[-1], piece):
            column.append(value)
        size += piece[0].numel()
    if rest:
        chunks.append(tuple(list(column) for column in zip(*rest)))
    return chunks


def decay_and_momentum_(params: list[torch.Tensor], grads: list[torch.Tensor],
                        momentum_buffers: list[torch.Tensor | None], *, lr: float, momentum: float,
                        weight_decay: float) -> list[torch.Tensor]:
    """Decoupled weight decay of `params` and the EMA of the momentum buffers, in place; returns the
    directions to normalize: each buffer, or the raw gradient where the buffer is `None`."""
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    with_momentum = [(m, g) for m, g in zip(momentum_buffers, grads) if m is not None]
    if with_momentum:
        buffers, buffer_grads = (list(t) for t in zip(*with_momentum))
        torch._foreach_lerp_(buffers, buffer_grads, 1 - momentum)
    return [g if m is None else m for g, m in zip(grads, momentum_buffers)]


def scale_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    dims: list[int],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    normalization: str,
    ns_steps: int = 5,
    ns_batch_elements: int | None = None,
    norm_of: Callable[[torch.Tensor, int], torch.Tensor] = norm_along,
) -> None:
    """One SCALE step over matrices (any normalization); a `None` momentum buffer: use the raw gradient.

    `dims[i]` is the dim of the [size(0), -1] view that column/row normalization reduces over. Column
    and row normalization run chunk by chunk (`cache_sized_chunks`), so the norm and the multiply-add
    read a direction that the momentum's lerp (or the norm) has just brought into cache: the same
    arithmetic on every element as over whole matrices, with about one DRAM read of each tensor.
    """
    if not params:
        return
    if normalization in ("column", "row"):
        for chunk_params, chunk_grads, chunk_buffers, chunk_dims in cache_sized_chunks(
                params, grads, momentum_buffers, dims):
            directions = decay_and_momentum_(chunk_params, chunk_grads, chunk_buffers, lr=lr, momentum=momentum,
                                             weight_decay=weight_decay)
            rms_normalized_step_(chunk_params, directions, chunk_dims, lr=lr, norm_of=norm_of)
        return
    directions = decay_and_momentum_(params, grads, momentum_buffers, lr=lr, momentum=momentum,
                                     weight_decay=weight_decay)
    if normalization == "none":
        torch._foreach_add_(params, directions, alpha=-lr)
    elif normalization == "sign":
        for p, d in zip(params, directions):  # one temporary at a time, not a model-sized list
            p.add_(d.sign(), alpha=-lr)
    elif normalization == "singular":
        singular_step_(params, directions, lr=lr, ns_steps=ns_steps, ns_batch_elements=ns_batch_elements)
    else:
        check_choice("normalization", normalization, NORMALIZATIONS)


class SCALE(LowmemOptimizer):
    """SCALE (column normalization + head momentum) and its ablations; see the module docstring.

    Args:
        params: parameters or param groups, ideally with roles from `lowmem.optim.param_groups(model)`
            (a group without a role: 1-D tensors are vectors, others hidden).
        lr: matrices' learning rate (the paper: 1e-3 at 60M–350M, 2e-4 at 1B, 1e-4 at 7B).
        momentum: EMA coefficient beta of the momentum buffers, in [0, 1).
        adam_lr: vectors' AdamW learning rate at the schedule's peak (2e-2 at 60M–350M, 1e-3 at 1B/7B).
        adam_betas, adam_eps: the vectors' AdamW betas and eps.
        weight_decay: decoupled, `W *= 1 - rate * weight_decay` before each update.
        normalization: "column" (SCALE), "row", "sign", "singular" or "none".
        momentum_on: which matrices keep momentum: "head" (SCALE), "none", "embedding+head", "all".
        ns_steps: Newton–Schulz iterations of the "singular" normalization.
        state_bits: 8 keeps the matrices' momenta (and the vectors' Adam moments, where large enough)
            in 8-bit codes; None or 32: full precision (see the module docstring).
        stochastic_rounding: requantize 8-bit states with unbiased random rounding.
        compiled: the matrices' updates in fused CPU kernels or compiled graphs, the vectors' AdamW in a
            compiled graph (see the module docstring).
    """

    # Every normalization is of one matrix (its columns, rows, signs or singular values), momentum and
    # Adam are per tensor: the update of a parameter needs its own gradient only.
    updates_per_parameter = True
    # "singular": elements per batched Newton–Schulz call, None for newton_schulz.default_batch_elements
    # (batched on GPUs, one matrix at a time on the CPU), as Muon's.
    ns_batch_elements: int | None = None

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        adam_lr: float = 2e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        normalization: str = "column",
        momentum_on: str = "head",
        ns_steps: int = 5,
        state_bits: int | None = None,
        stochastic_rounding: bool = False,
        compiled: bool = False,
    ) -> None:
        adam_betas = as_pair(adam_betas)
        defaults = dict(lr=lr, momentum=momentum, adam_lr=adam_lr, adam_betas=adam_betas, adam_eps=adam_eps,
                        weight_decay=weight_decay, normalization=normalization, momentum_on=momentum_on,
                        ns_steps=ns_steps, state_bits=state_bits, stochastic_rounding=stochastic_rounding,
                        compiled=compiled)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_nonneg("lr", group["lr"])
        check_beta("momentum", group["momentum"])
        check_nonneg("adam_lr", group["adam_lr"])
        check_betas("adam_betas", group["adam_betas"])
        check_nonneg("adam_eps", group["adam_eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_choice("normalization", group["normalization"], NORMALIZATIONS)
        check_choice("momentum_on", group["momentum_on"], MOMENTUM_PLACEMENTS)
        check_positive_int("ns_steps", group["ns_steps"])

    def _step(self) -> None:
        position = 0  # each parameter's place in the optimizer: seeds its stochastic rounding
        for group in self.param_groups:
            self._step_group(group, position)
            position += len(group["params"])

    def _step_group(self, group: dict[str, Any], position: int) -> None:
        momentum_roles = MOMENTUM_PLACEMENTS[group["momentum_on"]]
        normalization = group["normalization"]
        params, grads, buffers, dims = [], [], [], []
        rows = ([], [], [])  # (params, grads, buffers) of the matrices `compiled=True` updates in one graph
        quantized = []  # (position, param, state, dim) of the matrices whose momentum is 8-bit codes
        adam = AdamBatch(group["state_bits"], group["stochastic_rounding"], group["compiled"])
        for p in group["params"]:
            position += 1
            if p.grad is None:
                continue
            check_grad(p)
            role = "vector" if p.dim() < 2 else group_role(group, p)
            if role == "vector":
                adam.add(p, self.state[p], position)
                continue
            dim = normalized_dim(role, normalization, group_input_dim(group, p))
            if role in momentum_roles:  # the only matrices with state: the rest leave self.state untouched
                state = self.state[p]
                if MOMENTUM not in state and not quantized_state.is_quantized(state, MOMENTUM):
                    init_momentum(state, p, group["state_bits"])
                if quantized_state.is_quantized(state, MOMENTUM):
                    quantized.append((position, p, state, dim))
                    continue
                buffer = state[MOMENTUM]
            else:
                buffer = None
            if group["compiled"] and compiles_rows(p, p.grad, buffer, dim, normalization):
                for column, value in zip(rows, (p, p.grad, buffer)):
                    column.append(value)
                continue
            params.append(p)
            grads.append(p.grad)
            buffers.append(buffer)
            dims.append(dim)

        compiled_rows_update(*rows, lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"])
        hparams = dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                       normalization=normalization, ns_steps=group["ns_steps"], ns_batch_elements=self.ns_batch_elements,
                       norm_of=kernel_norm_along if group["compiled"] else norm_along)
        scale_update(params, grads, buffers, dims, **hparams)
        for p_position, p, state, dim in quantized:  # one at a time: one matrix's fp32 momentum at most
            if rows_independent(normalization, dim):  # and then a block of its rows at a time
                for weights, grad, buffer in dequantized_momentum_rows(p, state, group["stochastic_rounding"],
                                                                       p_position):
                    scale_update([weights], [grad], [buffer], [dim], **hparams)
                continue
            with dequantized_momentum(p, state, group["stochastic_rounding"], p_position) as (weights, grad, buffer):
                scale_update([weights], [grad], [buffer], [dim], **hparams)
        beta1, beta2 = group["adam_betas"]
        adam.step(lr=scheduled_adam_lr(group["adam_lr"], group), beta1=beta1, beta2=beta2,
                  eps=group["adam_eps"], weight_decay=group["weight_decay"], eps_placement="uncorrected")


# The papers' released scripts, per model size. The ablation variants reuse them: methods.md gives
# no separately tuned learning rates for the variants (sweep `lr` for them).
_PRESETS = {
    "llama-60m": {"lr": 1e-3, "adam_lr": 2e-2},
    "llama-130m": {"lr": 1e-3, "adam_lr": 2e-2},
    "llama-350m": {"lr": 1e-3, "adam_lr": 2e-2},
    "llama-1b": {"lr": 2e-4, "adam_lr": 1e-3},
    "llama-7b": {"lr": 1e-4, "adam_lr": 1e-3},
}
_TARGET = "lowmem.optim.scale:SCALE"

register("scale", Method(_TARGET, "SCALE: column-normalized SGD, EMA momentum on the head only, AdamW on 1-D gains",
                         presets=_PRESETS, kinds=FACTOR_KINDS))
register("sgd", Method(_TARGET, "plain SGD on matrices (no normalization, no momentum), AdamW on 1-D gains",
                       presets=_PRESETS, defaults={"normalization": "none", "momentum_on": "none"}, kinds=FACTOR_KINDS))
for _norm, _what in (("column", "column-wise RMS"), ("row", "row-wise RMS (over the output dim)"),
                     ("sign", "sign"), ("singular", "singular-value (Newton–Schulz)")):
    register(f"sgd-{_norm}", Method(_TARGET, f"SGD with {_what} normalization, no momentum; AdamW on 1-D gains",
                                    presets=_PRESETS, defaults={"normalization": _norm, "momentum_on": "none"},
                                    kinds=FACTOR_KINDS))
