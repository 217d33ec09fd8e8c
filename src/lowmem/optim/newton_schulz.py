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

`orthogonalize` is the entry point of lowmem.optim.muon and lowmem.optim.scale (`sgd-singular`): the
whole matrix of a maybe-sharded tensor (lowmem.optim.base.full_matrix_op gathers an FSDP2 shard) in,
this rank's rows of NS out.
"""

from __future__ import annotations

import torch

from lowmem.optim.base import full_matrix_op

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7  # torch.optim.Muon's and Keller Jordan's


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
        B = torch.addmm(A, A, A, beta=b, alpha=c) if A.dim() == 2 else b * A + c * (A @ A)
        X = torch.addmm(X, B, X, beta=a) if X.dim() == 2 else a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def orthogonalize(tensor: torch.Tensor, *, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NS of `tensor` viewed as a matrix [size(0), -1], whole even when `tensor` is an FSDP2 shard;
    returns this rank's part (plain, shaped like its local tensor)."""
    return full_matrix_op(tensor, lambda matrix: newton_schulz(matrix, steps=steps, dtype=dtype))


__all__ = ["COEFFICIENTS", "newton_schulz", "orthogonalize"]
