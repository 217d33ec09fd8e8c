"""Low-rank gradient projections shared by GaLore, Fira, APOLLO and APOLLO-Mini.

For an m x n gradient G (a tensor of more dims is viewed as [size(0), -1]) a projection P of rank r
works on one side of G:

  right  P is r x n,  R = G P^T (m x r),  back(N) = N P     proj_type "std" when m >= n
  left   P is m x r,  R = P^T G (r x n),  back(N) = P N     proj_type "std" when m <  n

so under "std" the rank is taken from the smaller side and the moments are r x max(m, n). The bases:

  svd_projection          top-r singular vectors of G (torch.linalg.svd, in at least fp32, then cast
                          to G's dtype): right -> V[:, :r]^T, left -> U[:, :r]   (GaLore, Fira)
  randomized_svd_projection   the same subspace from Halko, Martinsson & Tropp's range finder
                          (arXiv 0909.4061): sketch with r + oversample Gaussian columns, power
                          iterations with QR in between, then the SVD of a small matrix. O(mnr)
                          instead of O(mn min(m, n)); for large matrices.
  gaussian_projection     entries N(0, 1/r), drawn from a seed (APOLLO). The seed chain and the
                          generator reproduce the released APOLLO code: the matrix is
                          randn(shape, generator=Generator(device).manual_seed(seed)) / sqrt(r) in
                          fp32, then cast; the next refresh uses next_seed(seed), the 15th draw of
                          randint(0, 2^63 - 1) from a CPU generator seeded with `seed`.

`ProjectedAdam` is the optimizer skeleton the four methods share. Per parameter of role "hidden":

  at the first step, and whenever (step + offset) % update_proj_gap == 0 (step counted from 0):
      P = new projection (offset = 0, or spread over the gap with stagger=True so that no single
          step recomputes every SVD)
  R = project(G);  m = beta1 m + (1-beta1) R;  v = beta2 v + (1-beta2) R^2
  N = m / (sqrt(v) + eps);  step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  W -= step_size * method_update(G, R, N, P)       (GaLore: scale * back(N); Fira, APOLLO: see theirs)
  W *= 1 - lr * weight_decay                         (decoupled, after the update, as released)

The matrices of a group are stepped a batch at a time (the `batch_elements` hyperparameter, default
`default_projected_batch_elements`: PROJECTED_BATCH_ELEMENTS off the CPU, one matrix at a time on it):
each is refreshed and projected, then the batch's r-side Adam runs as one foreach call per operation
(a GPU launches a few kernels for the batch instead of about ten per matrix), then each matrix's update.
Per element it is the same arithmetic; on the CPU the same bits (tests/test_projection.py).

Adam is in Kingma & Ba's efficient form (bias correction folded into the step size, eps added to the
uncorrected sqrt(v)), as in all three released codes, so Fira's and APOLLO's scaling factors and the
norm-growth limiter see exactly the quantities the published runs saw. Moments are not rotated when
the subspace changes. Parameters of other roles (embedding, head, norm gains) get AdamW through
lowmem.optim.adamw.adamw_update in the same optimizer, in the released codes' form too
(`eps_placement="uncorrected"`, weight decay after the update): tests/test_galore_fira.py and
tests/test_apollo.py check every parameter of a model against the official packages. A hidden-role (or role-less) parameter that cannot be projected -- fewer than two
dims, or rank >= its smaller side -- gets AdamW too, with one warning per param group.

State per projected parameter (tensors and plain numbers only, so `torch.load(weights_only=True)`
reads a checkpoint): `step` (float32 scalar tensor), `exp_avg` / `exp_avg_sq` (r-side moments, the
names a generic momentum reset zeroes; a reset also sets step to 0, which refreshes an unstaggered
projection at the next step), `projection` (the basis, or APOLLO's random matrix, in the parameter's
dtype), `limiter_norm` (Fira, APOLLO: the norm-growth limiter's previous norm), `seed` (APOLLO: a
Python int, the seed of the next refresh; an int because load_state_dict casts tensors to the
parameter's dtype, which would round a 63-bit seed).

`state_bits=8` (lowmem.optim.quantized_state) keeps the r-side moments in 8-bit codes, as
`exp_avg_codes`/`exp_avg_absmax` and `exp_avg_sq_codes`/`exp_avg_sq_absmax`: blocks of 256 within
the moment's own rows ([rows, r]: one block per row at r <= 256; [r, cols]), decided from the
moment's global shape (>= 4096 elements, and not rows of one element: APOLLO-Mini's rank-1 right-side
moments stay fp32), laid out as the moment is (below). A step dequantizes them to fp32, runs Adam and
the method's update on them, and requantizes (`stochastic_rounding`: unbiased, seeded by the
parameter's position and step). The parameters left to AdamW take the same setting (AdamBatch).

Meta device (the memory estimator steps optimizers on meta tensors): SVD and random generation
cannot run there, so a projection on meta is an empty tensor of the right shape and dtype; every
other operation runs on meta as usual, so the state has its real shapes and dtypes.

FSDP2 (DTensor parameters sharded on dim 0, i.e. rows; replicated mesh dims are also accepted):
  - SVD bases need the whole gradient. At a refresh each rank all-gathers it with `full_tensor()`
    (m*n elements per matrix, once per update_proj_gap steps, a transient full-size copy) and
    computes the same SVD redundantly (the SVD time is not divided among ranks). The distributed
    alternative -- the right basis from the all-reduced n x n Gram matrix G^T G -- costs less
    communication but squares the condition number, so in fp32 its basis differs from the SVD's
    and sharded training would no longer equal unsharded training; it is not used.
  - APOLLO's random matrix is generated whole on every rank from the shared seed; no communication.
  - Right projections (P is r x n, replicated) keep R, the moments and the update row-local: no
    communication per step. Left projections (P is m x r, row-sharded like W) all-reduce the r x n
    projected gradient every step and keep replicated r x n moments, computed redundantly.
  - Whole-tensor norms (the limiter, APOLLO-Mini's tensor scaling) all-reduce a scalar per step.
  State that is row-sharded (right-side moments, left-side bases) is a DTensor with the parameter's
  placements and state that every rank holds whole is a replicated DTensor, so distributed
  checkpointing sees the layout; an 8-bit moment's codes and scales are laid out as the moment (its
  blocks lie within its rows, so a rank's rows are whole blocks), and `whole_state_layout` places them
  so when a one-process checkpoint resumes under FSDP2.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import torch

from lowmem.optim import quantized_state
from lowmem.optim.adamw import RELEASED_LOW_RANK_ADAM, AdamBatch
from lowmem.optim.base import (
    LowmemOptimizer,
    check_adam_group,
    check_bool,
    check_choice,
    check_grad,
    check_nonneg_int,
    check_positive,
    check_positive_int,
    foreach_chunks,
    full_matrix_op,
    group_by_device_dtype,
    is_dtensor,
    local_tensor,
    rows_of,
)
from lowmem.optim.kinds import projects
from lowmem.optim.roles import group_role
from lowmem.optim.state import ADAM_MOMENTS

PROJ_TYPES = ("std", "reverse_std", "left", "right")
SVD_METHODS = ("exact", "randomized")
# Fira's norm-growth limiter (also used by APOLLO): an update's norm may grow by at most 1%/step.
NORM_GROWTH_LIMIT = 1.01
# Added to denominators of norm ratios and to the limiter's previous norm, as in the released codes.
RATIO_EPS = 1e-8
# APOLLO's next_seed: the seed of the next refresh is the 15th draw of a generator seeded with this one.
_SEED_DRAWS = 15
_RANDOMIZED_OVERSAMPLE = 8
_RANDOMIZED_POWER_ITERATIONS = 2
# Elements of the projected matrices (m x n) per batch of a step off the CPU: the r-side Adam of a batch
# runs as one foreach call per operation, so a GPU launches a few kernels per batch rather than per
# matrix (about ten per matrix before: 56 matrices at 60M), while the batch's low-rank temporaries (R,
# sqrt(v) + eps, N: each at most r / min(m, n) of the batch's size, 16 MiB in fp32 at most) stay small
# beside one matrix's. A larger matrix is a batch by itself (at 7B every one). At 60M about seven batches.
PROJECTED_BATCH_ELEMENTS = 2**22


def default_projected_batch_elements(device: torch.device) -> int:
    """`ProjectedAdam.batch_elements` when unset: PROJECTED_BATCH_ELEMENTS, except 0 (one matrix at a
    time) on the CPU, where foreach runs the same per-tensor kernels and there is no launch to save: at
    llama-60m on a quiet CPU a batched step took 1.01x the per-matrix one (GaLore and APOLLO-Mini alike),
    no gain for a batch's larger low-rank temporaries (docs/results.md, issue 28)."""
    return 0 if torch.device(device).type == "cpu" else PROJECTED_BATCH_ELEMENTS


# --------------------------------------------------------------------------- sides and shapes


def matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """(m, n) of the [size(0), -1] view of a tensor of at least two dims (global shape for DTensors)."""
    rows = param.shape[0]
    return rows, param.numel() // rows if rows else 0


def projection_side(rows: int, cols: int, proj_type: str) -> str:
    """"right" (P is r x cols, R = G P^T) or "left" (P is rows x r, R = P^T G)."""
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    check_choice("proj_type", proj_type, PROJ_TYPES)
    return proj_type  # "left" or "right"


def projection_shape(rows: int, cols: int, rank: int, side: str) -> tuple[int, int]:
    return (rank, cols) if side == "right" else (rows, rank)


def project(grad: torch.Tensor, projection: torch.Tensor, side: str) -> torch.Tensor:
    return grad @ projection.T if side == "right" else projection.T @ grad


def add_project_back(base: torch.Tensor, low_rank: torch.Tensor, projection: torch.Tensor, side: str, *,
                     alpha: float, out_of_place: bool = False) -> torch.Tensor:
    """base + alpha * back(low_rank) in one fused matmul-add; in place unless `out_of_place`."""
    factors = (low_rank, projection) if side == "right" else (projection, low_rank)
    if out_of_place:
        return torch.addmm(base, *factors, alpha=alpha)
    return base.addmm_(*factors, alpha=alpha)


def channel_dim(side: str) -> int:
    """The dim of R along which Fira and APOLLO take norms: the rank dim, one norm per channel of the
    unprojected side (rows of W for right projections, columns for left ones)."""
    return 1 if side == "right" else 0


# --------------------------------------------------------------------------- bases


def svd_projection(matrix: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-`rank` singular vectors of `matrix` on `side`, computed in at least fp32, in its dtype."""
    rows, cols = matrix.shape
    if matrix.device.type == "meta":
        return torch.empty(projection_shape(rows, cols, rank, side), dtype=matrix.dtype, device="meta")
    work = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    left, _, right_t = torch.linalg.svd(work, full_matrices=False)
    basis = right_t[:rank] if side == "right" else left[:, :rank]
    return basis.to(matrix.dtype).contiguous()


def randomized_svd_projection(matrix: torch.Tensor, rank: int, side: str, seed: int,
                              oversample: int = _RANDOMIZED_OVERSAMPLE,
                              power_iterations: int = _RANDOMIZED_POWER_ITERATIONS) -> torch.Tensor:
    """The top-`rank` singular subspace of `matrix` on `side` by a randomized range finder.

    Deterministic for a given `seed`, so every rank of a sharded run finds the same basis.
    """
    rows, cols = matrix.shape
    if matrix.device.type == "meta":
        return torch.empty(projection_shape(rows, cols, rank, side), dtype=matrix.dtype, device="meta")
    work = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    # Find the column space of A, where A's columns span the side we need: G^T's for a right basis.
    a = work.T if side == "right" else work
    sketch_size = min(rank + oversample, min(a.shape))
    generator = torch.Generator(device=a.device).manual_seed(seed)
    sketch = torch.randn(a.shape[1], sketch_size, generator=generator, device=a.device, dtype=a.dtype)
    basis, _ = torch.linalg.qr(a @ sketch)
    for _ in range(power_iterations):  # sharpen the spectrum; QR keeps the columns independent
        basis, _ = torch.linalg.qr(a.T @ basis)
        basis, _ = torch.linalg.qr(a @ basis)
    small_left, _, _ = torch.linalg.svd(basis.T @ a, full_matrices=False)
    vectors = (basis @ small_left[:, :rank]).to(matrix.dtype)
    return vectors.T.contiguous() if side == "right" else vectors.contiguous()


def gaussian_projection(rows: int, cols: int, rank: int, side: str, seed: int, *, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """APOLLO's random projection: entries N(0, 1/rank) from `seed` (fp32, then cast to `dtype`)."""
    shape = projection_shape(rows, cols, rank, side)
    if torch.device(device).type == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    generator = torch.Generator(device=device).manual_seed(seed)
    matrix = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) / math.sqrt(rank)
    return matrix.to(dtype)


def next_seed(seed: int) -> int:
    """The seed of APOLLO's next random projection (the released code's chain)."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (_SEED_DRAWS,), generator=generator)[-1])


# --------------------------------------------------------------------------- low-rank Adam and the limiter


def low_rank_adam(low_rank_grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                  *, beta1: float, beta2: float, eps: float) -> list[torch.Tensor]:
    """Update the moments in place and return the directions m / (sqrt(v) + eps), one foreach call per
    operation over lists of one device and dtype (on a GPU a handful of kernels for many matrices; on the
    CPU the same per-tensor operations, bit for bit)."""
    torch._foreach_lerp_(exp_avgs, low_rank_grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, low_rank_grads, low_rank_grads, value=1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, eps)
    return torch._foreach_div(exp_avgs, denominators)


def adam_step_scale(step: int, beta1: float, beta2: float) -> float:
    """The bias corrections folded into the step size: sqrt(1 - beta2^t) / (1 - beta1^t)."""
    return math.sqrt(1 - beta2**step) / (1 - beta1**step)


def norm_growth_limiter(norm: torch.Tensor, state: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """Fira's limiter: the factor (>= 1, a 0-dim tensor) to divide an update of norm `norm` by so that it
    is at most NORM_GROWTH_LIMIT times the previous (limited) one. The first call only records the norm.

    Kept as tensors (no .item()), so a GPU step does not wait for the host.
    """
    previous = state.get("limiter_norm")
    if previous is None:
        factor = torch.ones_like(norm)
    else:
        factor = (norm / (previous.to(norm.dtype) + RATIO_EPS)).clamp_min(NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
    state["limiter_norm"] = (norm / factor).to(dtype)
    return factor


# --------------------------------------------------------------------------- FSDP2 (DTensor) helpers


def check_row_sharding(param: torch.Tensor) -> None:
    if not is_dtensor(param):
        return
    for placement in param.placements:
        if not (placement.is_replicate() or (placement.is_shard() and placement.dim == 0)):
            raise NotImplementedError(
                f"low-rank projections support DTensor parameters sharded on dim 0 (FSDP2's fully_shard) "
                f"or replicated; got placements {param.placements}"
            )


def sum_over_shards(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum this rank's partial result of a reduction over `like`'s rows across the ranks sharing them."""
    if not is_dtensor(like):
        return partial
    from torch.distributed.tensor import DTensor, Partial, Replicate

    placements = [Partial() if p.is_shard() else Replicate() for p in like.placements]
    return DTensor.from_local(partial, like.device_mesh, placements, run_check=False).full_tensor()


def state_like(local: torch.Tensor, like: torch.Tensor, global_shape: tuple[int, ...],
               row_sharded: bool) -> torch.Tensor:
    """Wrap this rank's state tensor as a DTensor laid out like parameter `like` (plain tensors pass through)."""
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    placements = like.placements if row_sharded else [Replicate()] * mesh.ndim
    stride = tuple(math.prod(global_shape[i + 1:]) for i in range(len(global_shape)))
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(global_shape), stride=stride)


# --------------------------------------------------------------------------- the shared optimizer


class _Projected(NamedTuple):
    """A projected matrix's tensors for one step: `param`, `grad` as [rows, cols] views of this rank's
    part, the projected gradient R, the basis, its side, the state, and the step count after this step."""

    p: torch.Tensor
    param: torch.Tensor
    grad: torch.Tensor
    low_rank: torch.Tensor
    projection: torch.Tensor
    side: str
    state: dict[str, Any]
    step: int


class ProjectedAdam(LowmemOptimizer):
    """Adam on low-rank projections of the hidden matrices, AdamW on everything else.

    The skeleton of GaLore, Fira and APOLLO (see the module docstring); a subclass supplies
    `__init__` (every hyperparameter an explicit keyword argument -- the shared ones below, under these
    names, then its own -- handed on as `super().__init__(params, defaults)`; lowmem.optim.Method reads
    the signature), `_apply_update` (how N becomes a weight update), and may replace `_new_projection`
    (the SVD basis by default) and extend `_check_group`.

    The shared hyperparameters:
        params: parameters or param groups, ideally with roles from `lowmem.optim.param_groups(model)`.
            Role "hidden" matrices are projected; other roles get AdamW (released form) with the same
            lr, betas, eps and weight_decay.
        lr: learning rate (0.01 in the papers' scripts).
        betas, eps, weight_decay: Adam's (eps 1e-6 as released); decoupled weight decay, after the update.
        rank: projection rank r; a matrix whose smaller side is <= r gets AdamW (with a warning).
        update_proj_gap: steps between projection refreshes (200).
        scale: multiplies the projected update (GaLore, Fira) or, as sqrt(scale), APOLLO's update.
        proj_type: "std" (project the smaller side), "reverse_std", "left" or "right".
        svd: "exact" (torch.linalg.svd) or "randomized" (range finder with power iterations; faster
            on large matrices, the same subspace up to its approximation error).
        stagger: spread refreshes over the gap (parameter i refreshes when (step + offset_i) % gap == 0)
            so that no single step recomputes every projection.
        foreach: use the multi-tensor AdamW path for the parameters left to AdamW.
        state_bits: None or 32 (full precision) or 8 (the moments, projected and AdamW's, in 8-bit codes).
        stochastic_rounding: requantize 8-bit moments with unbiased random rounding instead of nearest.
        compiled: the parameters left to AdamW take the compiled update (lowmem.optim.adamw, `compiled`);
            the projected matrices stay eager.
        batch_elements: weight elements per batch of projected matrices whose low-rank Adam runs as one
            foreach call per operation; None: `default_projected_batch_elements` of their device (batched
            off the CPU); 0: one matrix at a time (the same bits on the CPU).
    """

    method_name = "projected adam"
    # A projection is refreshed from its own matrix's gradient on its own step count; the schedule
    # (positions, stagger offsets) depends on the groups, not on which gradients are present.
    updates_per_parameter = True
    _schedule_cache: dict[torch.Tensor, tuple[int, int]] | None = None

    # -- hyperparameters and the fallback warning

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_adam_group(group)
        check_positive_int("rank", group["rank"])
        check_positive_int("update_proj_gap", group["update_proj_gap"])
        check_positive("scale", group["scale"])
        check_choice("proj_type", group["proj_type"], PROJ_TYPES)
        check_choice("svd", group["svd"], SVD_METHODS)
        check_bool("stagger", group["stagger"])
        if group.get("batch_elements") is not None:
            check_nonneg_int("batch_elements", group["batch_elements"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._schedule_cache = None
        if group.get("role") in (None, "hidden") and projects(group):
            unprojectable = [p for p in group["params"] if not self._projectable(group, p)]
            if unprojectable:
                shapes = ", ".join(str(tuple(p.shape)) for p in unprojectable[:8])
                more = f" and {len(unprojectable) - 8} more" if len(unprojectable) > 8 else ""
                warnings.warn(
                    f"{self.method_name}: {len(unprojectable)} parameter(s) cannot be projected at rank "
                    f"{group['rank']} (fewer than 2 dims, or rank >= the smaller side of the matrix): "
                    f"{shapes}{more}; they get AdamW instead",
                    stacklevel=3,
                )

    def whole_state_layout(self, param: torch.Tensor, key: str, shape: torch.Size) -> str | None:
        # Under FSDP2 (state_like): the [rows, r] moments of a right projection and the [rows, r] basis of
        # a left one are split by rows as the parameter is; the other side's tensors are whole on every rank.
        # An 8-bit moment's codes and scales ([rows, blocks per row]) lie as the moment does.
        group = next((g for g in self.param_groups if any(p is param for p in g["params"])), None)
        name = key.removesuffix(quantized_state.CODES).removesuffix(quantized_state.ABSMAX)
        if group is None or name not in ("exp_avg", "exp_avg_sq", "projection") or not self._projectable(group, param):
            return super().whole_state_layout(param, key, shape)
        side = projection_side(*matrix_shape(param), group["proj_type"])
        row_split = side == "right" if name != "projection" else side == "left"
        return "param" if row_split else "replicated"

    @staticmethod
    def _projectable(group: dict[str, Any], param: torch.Tensor) -> bool:
        if param.dim() < 2 or group_role(group, param) != "hidden" or not projects(group):  # factors: AdamW (lowmem.optim.kinds)
            return False
        return group["rank"] < min(matrix_shape(param))

    # -- refresh schedule: positions (APOLLO's seeds) and stagger offsets

    def _schedule(self) -> dict[torch.Tensor, tuple[int, int]]:
        """param -> (1-based position, refresh offset).

        Positions follow the released scripts' grouping (`[{"params": regular}, {"params": low-rank,
        "rank": ...}]`: every parameter that is not hidden first, then the hidden ones), each part in
        the order of the groups, so that lowmem.optim.build's role groups (hidden first) and the
        released grouping give every hidden matrix the same position, hence the same APOLLO seed.
        """
        if self._schedule_cache is None:
            staggered = [(p, g) for g in self.param_groups if g["stagger"]
                         for p in g["params"] if self._projectable(g, p)]
            offsets = {p: (i * g["update_proj_gap"]) // len(staggered) for i, (p, g) in enumerate(staggered)}
            pairs = [(p, g) for g in self.param_groups for p in g["params"]]
            hidden = [p for p, g in pairs if p.dim() >= 2 and group_role(g, p) == "hidden"]
            hidden_ids = {id(p) for p in hidden}
            ordered = [p for p, _ in pairs if id(p) not in hidden_ids] + hidden
            self._schedule_cache = {p: (i + 1, offsets.get(p, 0)) for i, p in enumerate(ordered)}
        return self._schedule_cache

    # -- the step

    def _step(self) -> None:
        schedule = self._schedule()
        for group in self.param_groups:
            adam = AdamBatch(group["state_bits"], group["stochastic_rounding"], group["compiled"])
            projected = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_grad(p)
                if self._projectable(group, p):
                    projected.append(p)
                else:
                    adam.add(p, self.state[p], schedule[p][0])
            limit = group.get("batch_elements")  # absent from a checkpoint saved before it: the default
            if limit is None and projected:
                limit = default_projected_batch_elements(projected[0].device)
            for (batch,) in foreach_chunks(projected, max_elements=limit):
                self._projected_batch(batch, group, schedule)
            beta1, beta2 = group["betas"]
            adam.step(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], foreach=group["foreach"], **RELEASED_LOW_RANK_ADAM)

    def _projected_batch(self, params: list[torch.Tensor], group: dict[str, Any],
                         schedule: dict[torch.Tensor, tuple[int, int]]) -> None:
        """One step of the projected matrices `params` (one device and dtype, at most `batch_elements`
        elements together, or one matrix): each refreshed and projected; then Adam on the r-side moments
        of all of them at once where the moments are full precision (one foreach call per operation), or
        one matrix at a time through its dequantized moments; then each matrix's update and weight decay."""
        plain = []  # the matrices with full-precision moments: their Adam runs over the whole batch
        for p in params:
            state = self.state[p]
            work = self._project(p, state, group, *schedule[p])
            if not quantized_state.is_quantized(state, "exp_avg"):
                plain.append(work)
                continue
            # This step's moments in fp32 (fp64 beside fp64 weights) for Adam and the method's update
            # (Fira's and APOLLO's scaling read them), requantized on leaving.
            dtype = torch.promote_types(work.low_rank.dtype, torch.float32)
            generator = quantized_state.rounding_generator(group["stochastic_rounding"], schedule[p][0],
                                                           work.step - 1, p)
            with quantized_state.dequantized(state, ADAM_MOMENTS, generator=generator, dtype=dtype) as moments:
                self._adam_and_update([work], [moments[0]], [moments[1]], group)
        for exp_avgs, exp_avg_sqs, works in group_by_device_dtype(
                [local_tensor(w.state["exp_avg"]) for w in plain], [local_tensor(w.state["exp_avg_sq"]) for w in plain],
                plain):
            self._adam_and_update(works, exp_avgs, exp_avg_sqs, group)
        if group["weight_decay"] and params:
            torch._foreach_mul_([local_tensor(p) for p in params], 1 - group["lr"] * group["weight_decay"])

    def _project(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], position: int,
                 offset: int) -> _Projected:
        """Refresh p's projection when due, project its gradient, create its moments on the first step and
        count the step."""
        check_row_sharding(p)
        rows, cols = matrix_shape(p)
        side = projection_side(rows, cols, group["proj_type"])
        # Viewed with the global column count: a rank's shard may have no rows at all.
        param = local_tensor(p)
        param = param.view(param.shape[0], cols)
        grad = local_tensor(p.grad)
        grad = grad.reshape(grad.shape[0], cols)
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        step = int(state["step"].item())
        if "projection" not in state or (step + offset) % group["update_proj_gap"] == 0:
            full = self._new_projection(p, state, group, side, position, step)
            local = rows_of(full, p) if side == "left" else full
            if "projection" in state:
                local_tensor(state["projection"]).copy_(local)
            else:
                state["projection"] = state_like(local, p, tuple(full.shape), row_sharded=side == "left")
        projection = local_tensor(state["projection"])
        low_rank = project(grad, projection, side)
        if side == "left":
            low_rank = sum_over_shards(low_rank, p)
        if "exp_avg" not in state and not quantized_state.is_quantized(state, "exp_avg"):
            self._init_moments(p, state, group, side, low_rank)
        state["step"] += 1
        return _Projected(p, param, grad, low_rank, projection, side, state, step + 1)

    def _adam_and_update(self, works: list[_Projected], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                         group: dict[str, Any]) -> None:
        """Adam on the r-side moments (one device and dtype: the gradient's, or fp32 dequantized from codes),
        then each matrix's update by the method with N in the gradient's dtype."""
        beta1, beta2 = group["betas"]
        low_ranks = [w.low_rank.to(m.dtype) for w, m in zip(works, exp_avgs)]
        directions = low_rank_adam(low_ranks, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, eps=group["eps"])
        for w, direction in zip(works, directions):
            self._apply_update(w.p, w.param, w.grad, w.low_rank, direction.to(w.low_rank.dtype), w.projection, w.side,
                               w.state, group, step_size=group["lr"] * adam_step_scale(w.step, beta1, beta2))

    @staticmethod
    def _init_moments(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], side: str,
                      low_rank: torch.Tensor) -> None:
        """Zero r-side moments shaped like `low_rank` (this rank's part) and laid out as `state_like` lays
        them: in 8-bit codes when `state_bits` quantizes a moment of their global shape."""
        rows, cols = matrix_shape(p)
        moment_shape = (rows, group["rank"]) if side == "right" else (group["rank"], cols)

        def layout(local: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            return state_like(local, p, shape, row_sharded=side == "right")

        for key in ADAM_MOMENTS:
            if quantized_state.quantizes_state(moment_shape, group["state_bits"]):
                quantized_state.init_quantized_state(state, key, moment_shape, low_rank.shape[0], low_rank.device,
                                                     layout)
            else:
                state[key] = layout(torch.zeros_like(low_rank), moment_shape)

    def _new_projection(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], side: str,
                        position: int, step: int) -> torch.Tensor:
        """The whole projection at a refresh: the SVD basis of p's whole gradient (all-gathered when
        sharded), exact or randomized (seeded by position and step, so every rank finds the same)."""
        if group["svd"] == "randomized":
            basis = functools.partial(randomized_svd_projection, rank=group["rank"], side=side,
                                      seed=position * 1_000_003 + step)
        else:
            basis = functools.partial(svd_projection, rank=group["rank"], side=side)
        return full_matrix_op(p.grad, basis, local_rows=False)

    def _apply_update(self, p: torch.Tensor, param: torch.Tensor, grad: torch.Tensor, low_rank: torch.Tensor,
                      direction: torch.Tensor, projection: torch.Tensor, side: str, state: dict[str, Any],
                      group: dict[str, Any], *, step_size: float) -> None:
        raise NotImplementedError


__all__ = [
    "NORM_GROWTH_LIMIT",
    "PROJ_TYPES",
    "ProjectedAdam",
    "channel_dim",
    "gaussian_projection",
    "low_rank_adam",
    "next_seed",
    "norm_growth_limiter",
    "project",
    "PROJECTED_BATCH_ELEMENTS",
    "default_projected_batch_elements",
    "adam_step_scale",
    "add_project_back",
    "projection_side",
    "randomized_svd_projection",
    "svd_projection",
]
