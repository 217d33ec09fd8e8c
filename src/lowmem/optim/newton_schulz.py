"""Approximate orthogonalization by a quintic Newton–Schulz iteration (Keller Jordan's Muon, 2024).

Given G = U S V^T, return approximately U V^T (every singular value pushed towards 1) without an SVD:

  X = G / max(||G||_F, eps)                    (singular values now in [0, 1]; a zero G stays zero)
  repeat `steps` times:
      A = X X^T
      X = a X + (b A + c A A) X               (p(s) = a s + b s^3 + c s^5 applied to each singular value)

The coefficients (a, b, c) = (3.4445, -4.7750, 2.0315) make p rise steeply near 0, so small singular
values grow fast; the result's singular values land roughly in [0.7, 1.2] rather than exactly at 1,
which is what Muon uses and what SCALE's "singular-value normalization" ablation means. Working on the
wide orientation (rows <= cols) keeps A = X X^T the smaller square. The cast to `dtype` comes first and
the Frobenius normalization is computed there, dividing by max(||G||, eps) -- torch.optim.Muon's
`_zeropower_via_newtonschulz` exactly (tests/test_scale.py checks bitwise equality in bf16), and
invariant to the scale of G down to ||G|| = eps (a "+ eps" in the denominator would not be: for a
small gradient, ||G|| ~ 1e-4, it shrinks the input by 1e-3 in fp32).

`orthogonalize` is the entry point of lowmem.optim.muon and lowmem.optim.scale (`sgd-singular`) for
one matrix: the whole matrix of a maybe-sharded tensor (lowmem.optim.base.full_matrix_op gathers an
FSDP2 shard) in, this rank's rows of NS out. `ns_batches` groups their plain matrices by shape so
that each group is one batched `newton_schulz` call on a stack: the same ~25 kernels for a group as
for one matrix (llama-60m's 56 hidden matrices are 3 shapes). The batched iteration runs the same
fused multiply-adds per matrix (baddbmm where one matrix takes addmm): on the CPU the result is
bitwise the per-matrix one, in bf16 and fp32 (tests/test_muon.py checks it over 20 steps). Batching
is the default off the CPU only (`default_batch_elements` says why).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from lowmem.optim.base import full_matrix_op, is_dtensor

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7  # torch.optim.Muon's and Keller Jordan's
# A batch's stack holds at most this many elements (64 MiB in fp32, plus NS's bf16 iterates), so
# batching bounds the step's transient memory whatever the model: llama-60m's groups are one batch
# each (at most 11.3M elements), from 4096 x 4096 (7B) on a batch is one matrix, as without batching.
BATCH_ELEMENTS = 2**24


def default_batch_elements(device: torch.device) -> int:
    """`ns_batches`' cap when the caller sets none: BATCH_ELEMENTS, except 0 (one matrix at a time) on the
    CPU. Measured on the CPU (llama-60m, fp32 NS, one thread; docs/results.md, issue 28) a batched Muon
    step took 1.33x the per-matrix one (1.11-1.43 over rounds): the CPU's bmm is no faster than its
    mm per matrix and the stack is a larger working set, and there is no launch cost to save. A GPU
    step is ~25 small kernel launches per matrix, which batching makes ~25 per shape; its time is not
    yet measured (benchmarks/bench_baselines_step.py --pairs muon-batched on a GPU)."""
    return 0 if device.type == "cpu" else BATCH_ELEMENTS


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = COEFFICIENTS,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = EPS,
) -> torch.Tensor:
    """Approximately orthogonalize the last two dims of `G`; computed in `dtype`, returned in G's dtype.

    `G` has shape [..., rows, cols] (leading dims are a batch). bf16 is Muon's choice: the iteration
    is self-correcting, so low precision costs little accuracy and halves the matmul cost on GPUs.
    """
    if G.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix (or a batch of matrices); got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / torch.linalg.matrix_norm(X, keepdim=True).clamp_min(eps)
    for _ in range(steps):
        A = X @ X.mT
        # baddbmm is addmm per matrix: a batch rounds as its matrices would one at a time.
        if A.dim() == 2:
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
        elif A.dim() == 3:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
        else:
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def orthogonalize(tensor: torch.Tensor, *, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NS of `tensor` viewed as a matrix [size(0), -1], whole even when `tensor` is an FSDP2 shard;
    returns this rank's part (plain, shaped like its local tensor)."""
    return full_matrix_op(tensor, lambda matrix: newton_schulz(matrix, steps=steps, dtype=dtype))


def ns_batches(tensors: Sequence[torch.Tensor], keys: Sequence[Hashable] | None = None, *,
               max_elements: int | None = None) -> list[list[int]]:
    """Indices of `tensors` grouped for one batched `newton_schulz` call each: the same shape, dtype,
    device and key (`keys[i]`, a caller's further condition such as Muon's input dim), at most
    `max_elements` in a batch (a larger tensor alone; 0: every tensor alone, the per-matrix path;
    None: `default_batch_elements` of the tensors' device). A DTensor is always alone: its NS needs
    the gathered whole matrix (`orthogonalize`)."""
    if max_elements is None:
        max_elements = default_batch_elements(tensors[0].device) if tensors else 0
    batches: list[list[int]] = []
    open_batches: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if is_dtensor(t):
            batches.append([i])
            continue
        key = (tuple(t.shape), t.dtype, t.device, None if keys is None else keys[i])
        batch = open_batches.get(key)
        if batch is None or (len(batch) + 1) * t.numel() > max_elements:
            batch = open_batches[key] = []
            batches.append(batch)
        batch.append(i)
    return batches


__all__ = ["BATCH_ELEMENTS", "COEFFICIENTS", "default_batch_elements", "newton_schulz", "ns_batches", "orthogonalize"]
