"""The base of lowmem's optimizers: `LowmemOptimizer` (the step/closure boilerplate and the one
validation hook, `_check_group`), the hyperparameter checks every method's hook uses, and the helpers
for FSDP2 (DTensor) parameters: the DTensor check, local parts, `full_matrix_op` (an operation that
needs the whole matrix of a maybe-sharded tensor), the batched all-reduce of partial sums over shards."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist

from lowmem.errors import check_choice

# --------------------------------------------------------------------------- hyperparameter checks
# Each raises ValueError naming the hyperparameter, its value and what is accepted; lowmem.optim.build
# turns it into a ConfigError naming the method.


def check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or value != value or value < 0:
        raise ValueError(f"invalid {name}: {value!r}; it must be a number >= 0")


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or value == float("inf"):
        raise ValueError(f"invalid {name}: {value!r}; it must be a finite number > 0")


def check_beta(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"invalid {name}: {value!r}; it must be in [0, 1)")


def check_betas(name: str, betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"invalid {name}: {betas!r}; it must be a pair (beta1, beta2), each in [0, 1)")
    check_beta(f"{name}[0]", betas[0])
    check_beta(f"{name}[1]", betas[1])


def as_pair(betas):
    """`betas` as a tuple when it is a sequence; anything else (a string from `--opt betas=hello`) stays
    whole, so check_betas shows it as written rather than as its characters."""
    return tuple(betas) if isinstance(betas, (tuple, list)) else betas


def check_adam_group(group: dict) -> None:
    """The hyperparameters every Adam-style group has: lr, betas, eps, weight_decay."""
    check_nonneg("lr", group["lr"])
    check_betas("betas", group["betas"])
    check_nonneg("eps", group["eps"])
    check_nonneg("weight_decay", group["weight_decay"])


def check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"invalid {name}: {value!r}; it must be an integer >= 1")


def check_nonneg_int(name: str, value: int, zero_means: str | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        meaning = f" (0: {zero_means})" if zero_means else ""
        raise ValueError(f"invalid {name}: {value!r}; it must be an integer >= 0{meaning}")


def check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"invalid {name}: {value!r}; it must be True or False")


# --------------------------------------------------------------------------- tensors


def check_grad(param: torch.Tensor) -> None:
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError(
            "lowmem optimizers do not support sparse gradients; build the embedding with sparse=False"
        )
    if torch.is_complex(grad):
        raise RuntimeError(
            "lowmem optimizers do not support complex parameters; view them as real with torch.view_as_real"
        )


def group_by_device_dtype(*tensor_lists: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], ...]]:
    """Split parallel tensor lists by (device, dtype) of the first list, for torch._foreach_* calls.

    Scalar step tensors (the last list, by lowmem's convention) live on the CPU and are not keyed.
    """
    buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[] for _ in tensor_lists])
    for items in zip(*tensor_lists):
        key = (items[0].device, items[0].dtype)
        for bucket, item in zip(buckets[key], items):
            bucket.append(item)
    return [tuple(lists) for lists in buckets.values()]


# Elements of the first list per `foreach_chunks` chunk: 64 MiB in fp32. A foreach call that makes
# temporaries (AdamW's sqrt(v), Stable-SPAM's clipped gradients) then holds one chunk's, not a
# model-sized copy (13.5 GB at 7B in bf16); at 7B every matrix is a chunk by itself, at 60M a few chunks.
FOREACH_CHUNK_ELEMENTS = 2**24


def foreach_chunks(*tensor_lists: list, max_elements: int | None = None) -> list[tuple[list, ...]]:
    """`group_by_device_dtype`'s buckets cut, in order, into runs of at most `max_elements` (default
    FOREACH_CHUNK_ELEMENTS) elements of the first list (a larger tensor alone). The other lists may hold
    anything parallel to the first."""
    max_elements = FOREACH_CHUNK_ELEMENTS if max_elements is None else max_elements
    chunks = []
    for bucket in group_by_device_dtype(*tensor_lists):
        start, total = 0, 0
        for i, t in enumerate(bucket[0]):
            if i > start and total + t.numel() > max_elements:
                chunks.append(tuple(items[start:i] for items in bucket))
                start, total = i, 0
            total += t.numel()
        chunks.append(tuple(items[start:] for items in bucket))
    return chunks


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is an FSDP2/DTensor shard (checked by name: importing DTensor is not free)."""
    return type(t).__name__ == "DTensor"


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: in-place updates reach the DTensor), else `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def rows_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of `full` (held whole by every rank) that this rank holds of row-sharded `like`: a local
    slice, no communication; `full` itself when `like` is not a DTensor."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    whole = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, like.placements).to_local()


def full_matrix_op(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], *,
                   local_rows: bool = True) -> torch.Tensor:
    """`fn` applied to the whole of `tensor` viewed as a matrix [size(0), -1], for what needs the whole
    matrix (Newton–Schulz, an SVD); returns this rank's part of the result as a plain tensor.

    A DTensor shard (FSDP2, rows on dim 0) is all-gathered first (`full_tensor()`: a transient
    full-size copy on every rank, each computing `fn` on the same matrix, so all hold the same result).
      local_rows=True   the result's dim 0 is the matrix's rows (an orthogonalized update, a left
                        projection basis): this rank's rows of it, those it holds of `tensor`; a
                        result shaped like the matrix comes back shaped like `tensor` (its local part)
      local_rows=False  the whole result, on every rank (a right projection basis)
    """
    whole = tensor.full_tensor() if is_dtensor(tensor) else tensor
    matrix = whole.reshape(whole.shape[0], -1)
    result = fn(matrix)
    if not local_rows:
        return result
    if result.shape == matrix.shape:
        result = result.reshape(whole.shape)
    return rows_of(result, tensor)


def sharded_groups(param: torch.Tensor) -> tuple:
    """Process groups over which `param`'s entries are split (its Shard mesh dims); () if whole."""
    if not is_dtensor(param):
        return ()
    mesh = param.device_mesh
    return tuple(mesh.get_group(i) for i, placement in enumerate(param.placements) if placement.is_shard())


def all_reduce_partials(partials: list[torch.Tensor], groups: list[tuple], op=dist.ReduceOp.SUM) -> None:
    """Complete per-tensor partial reductions in place: one flat all-reduce per distinct sharding
    (through lowmem.distributed.all_reduce, which runs it on the collective's device)."""
    from lowmem.distributed import all_reduce

    by_groups: dict[tuple, list[torch.Tensor]] = {}
    for partial, pgs in zip(partials, groups):
        if pgs:
            by_groups.setdefault(pgs, []).append(partial)
    for pgs, tensors in by_groups.items():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        for pg in pgs:
            all_reduce(flat, op=op, group=pg)
        torch._foreach_copy_([t.view(-1) for t in tensors], list(flat.split([t.numel() for t in tensors])))


def _as_saved(loaded: Any, saved: Any) -> Any:
    """`loaded` (torch's cast of the saved state `saved`) with every tensor whose dtype the cast changed
    taken again from `saved`: its dtype and values, on the device torch chose (a copy, as the cast's is)."""
    if isinstance(saved, torch.Tensor):
        return loaded if loaded.dtype == saved.dtype else saved.to(device=loaded.device, copy=True)
    if isinstance(saved, dict):
        return {key: _as_saved(loaded[key], value) for key, value in saved.items()}
    if isinstance(saved, (list, tuple)):
        return type(saved)(_as_saved(item, value) for item, value in zip(loaded, saved))
    return loaded


STATE_LAYOUTS = ("param", "replicated", "rank")
# A method's 8-bit state settings (lowmem.optim.quantized_state) as a group without them means them.
QUANTIZED_STATE_DEFAULTS = {"state_bits": None, "stochastic_rounding": False}
# The compiled Adam update's switch (lowmem.optim.adamw.AdamBatch) for the methods that take it: a group
# from before it (a checkpoint) ran the eager step.
COMPILED_DEFAULT = {"compiled": False}
ABSMAX_SUFFIX = "_absmax"  # an 8-bit moment's scales (lowmem.optim.quantized_state.ABSMAX)


def default_state_layout(param: torch.Tensor, key: str, value: torch.Tensor) -> str:
    """How a plain state tensor of `param` lies across ranks under FSDP2, for checkpoints (a DTensor
    state carries its own placements): `param` when it is shaped like the parameter's shard (sharded
    as the parameter is), `replicated` for a 0-dim value (a per-parameter counter, which every rank
    steps alike), else `rank` (this rank's own, tied to the number of processes). A method whose
    other state is the same on every rank, or sharded like its parameter, says so in `state_layout`."""
    if value.dim() == 0:
        return "replicated"
    if value.shape == local_tensor(param).shape:
        return "param"
    return "rank"


def default_whole_state_layout(param: torch.Tensor, key: str, shape: torch.Size) -> str | None:
    """How a state saved whole (global `shape`) by a run without DTensors lies over an FSDP2 run's ranks
    unless its method says otherwise (`LowmemOptimizer.whole_state_layout`): shaped like its parameter,
    split as the parameter (`param`), and so is an 8-bit moment's per-row scales (`<key>_absmax`,
    [rows, blocks per row]: blocks never cross a row, lowmem.optim.quantized_state); anything else whole
    on every rank as a plain tensor (None)."""
    if shape == param.shape:
        return "param"
    if key.endswith(ABSMAX_SUFFIX) and len(shape) == 2 and param.dim() >= 2 and shape[0] == param.shape[0]:
        return "param"
    return None


class LowmemOptimizer(torch.optim.Optimizer):
    """A torch Optimizer with lowmem's two seams for a method:

    `_check_group(group)` validates one param group's hyperparameters (the constructor's defaults
    already merged into it). It runs for every group however it arrives -- the constructor's groups
    and any later `add_param_group` -- and a group it refuses (ValueError) does not join. A method
    overrides it (calling super()) with the lowmem.optim.base checks of its own hyperparameters.

    `_step()` is the update: `step(closure)` evaluates the closure with grad enabled, then runs
    `_step()` under no_grad and returns the closure's loss (None without one).

    And one rule for every method's state: `load_state_dict` gives back each state tensor with the
    dtype (and values) it was saved with, where torch would cast it to its parameter's dtype.

    A method whose `_step()` updates each parameter from that parameter's gradient and state alone,
    skipping parameters without a gradient, declares `updates_per_parameter = True`: the update inside
    backward (`--gradient-release`, lowmem.train.step.InBackward) then runs it one parameter at a time
    with `step_parameter`, the method's own `_step()` while that parameter's gradient is the only one
    present, and the weights come out bit for bit as `step()`'s. A method that couples parameters in
    its update (a norm over all gradients, a step counted per call) leaves it False and is refused there.
    """

    updates_per_parameter: bool = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # torch's checks of params; the defaults merged in
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a checkpoint from before 8-bit states kept full-precision ones
            for key, value in {**QUANTIZED_STATE_DEFAULTS, **COMPILED_DEFAULT}.items():
                if key in self.defaults:
                    group.setdefault(key, value)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Refuse a bad hyperparameter of `group` (ValueError naming it, its value and what is accepted).
        Here: the 8-bit state settings, for every method that takes them (`state_bits`,
        `stochastic_rounding`: lowmem.optim.quantized_state), and `compiled` (the compiled Adam update)."""
        if "state_bits" in group:
            from lowmem.optim.quantized_state import check_state_bits  # it imports this module

            check_state_bits(group["state_bits"])
            check_bool("stochastic_rounding", group["stochastic_rounding"])
        if "compiled" in group:
            check_bool("compiled", group["compiled"])

    def state_layout(self, param: torch.Tensor, key: str, value: torch.Tensor) -> str:
        """How plain state tensor `key` of `param` lies across FSDP2 ranks: one of STATE_LAYOUTS (see
        `default_state_layout`, the rule unless a method overrides this). Checkpoints save `param`
        state as a DTensor with the parameter's placements and `replicated` state once, so both load
        at any number of processes; `rank` state only at the number that wrote it."""
        return default_state_layout(param, key, value)

    def whole_state_layout(self, param: torch.Tensor, key: str, shape: torch.Size) -> str | None:
        """How state `key` of `param`, saved whole (global `shape`) by a run without DTensors (one process,
        DDP), lies over the ranks of an FSDP2 run that resumes it: `param` (rows split as the parameter's),
        `replicated`, or None (loaded whole on every rank as a plain tensor, as such a run keeps it).
        `default_whole_state_layout` unless a method whose other state is a DTensor under FSDP2 (the
        projection methods' row-split moments and bases) says so here."""
        return default_whole_state_layout(param, key, shape)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, after which every state tensor has the dtype it was saved with, and its values.

        torch casts each state tensor but `step` to its parameter's dtype: beside bf16 weights a float32
        counter would stop at 256 (256 + 1 rounds to 256) and int32 counts would round. The devices
        stay torch's (the parameter's; `step` where it was), DTensors included; only the dtype is
        taken back from `state_dict` (as given: a load pre-hook that rewrites it is not followed)."""
        super().load_state_dict(state_dict)
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for index, param in zip(saved_ids, params):
            if index in state_dict["state"] and param in self.state:
                self.state[param] = _as_saved(self.state[param], state_dict["state"][index])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """`param`'s update as `step()` makes it, while `param.grad` is the only gradient present (the
        caller's guarantee: the update inside backward frees each gradient once it is applied): `_step()`
        passes over every parameter without a gradient. Only for `updates_per_parameter` methods."""
        if not self.updates_per_parameter:
            raise RuntimeError(f"{type(self).__name__} does not declare updates_per_parameter: its update of one "
                               "parameter may depend on the others' gradients")
        self._step()

    def _step(self) -> None:
        raise NotImplementedError


__all__ = [
    "LowmemOptimizer",
    "all_reduce_partials",
    "check_beta",
    "check_betas",
    "check_bool",
    "check_choice",
    "check_grad",
    "check_nonneg",
    "check_nonneg_int",
    "check_positive",
    "check_positive_int",
    "default_state_layout",
    "default_whole_state_layout",
    "full_matrix_op",
    "foreach_chunks",
    "group_by_device_dtype",
    "is_dtensor",
    "local_tensor",
    "rows_of",
    "sharded_groups",
]
