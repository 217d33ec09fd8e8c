"""The optimizer contract for changed parameters: reset some state, or move it to a new parameter.

Structures and interventions change parameters under a running optimizer: a momentum reset clears
every moment; a ReLoRA merge re-initializes two factors and must clear only theirs; a sparse
topology update regrows some entries of a weight and must clear only those; a refactorization
replaces the factors' values (and may rotate their moments into the new bases). Two calls cover it:

  reset_state(optimizer, params=None, masks=None)
      params None: every parameter; masks {param: bool tensor shaped like param}: only those
      entries. Whole parameters: every moment tensor is zeroed and the step counter set to 0, so the
      next update is a first step (bias correction restarted). Entries: the moments of those entries
      are zeroed, and so are per-entry step counters where the optimizer keeps them; a per-tensor
      step counter is left alone (that is what plain Adam does with regrown weights: the cold start
      SMET fixes). An optimizer with its own rule defines `reset_param_state(param, mask)` and is
      called instead.
  replace_parameter(optimizer, old, new, remap=None)
      `new` takes `old`'s place in its group; its state is `remap(old_state)` if given, else empty
      (the optimizer rebuilds it on the next step, as for a new parameter).
  prune_moments(optimizer, params, mode, ratio, generator)
      ReLoRA's form of a reset: zero a fraction of the entries of each Adam moment of `params` (at
      random, or the smallest in magnitude), keep the rest and the step counters.

State that is not a moment (projection bases, seeds, norm EMAs) is left to the optimizer. A masked
reset of a state tensor that is not shaped like its parameter (GaLore's projected moments) is
refused: its entries are not the parameter's.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from lowmem.errors import ConfigError, check_choice
from lowmem.optim import quantized_state
from lowmem.optim.base import is_dtensor, rows_of

# Moment tensors an Adam-family or momentum optimizer keeps per parameter.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
STEP_KEYS = ("step",)
# State a whole reset removes: the norm-growth limiter's previous norm (Fira/APOLLO,
# lowmem.optim.projection), which the reference's rebuilt optimizer does not have either.
DROPPED_KEYS = ("limiter_norm",)


def reset_whole(state: dict[str, Any]) -> None:
    """Zero one parameter's moments and step counter (and drop the limiter's state), in place."""
    for key in DROPPED_KEYS:
        state.pop(key, None)
    for key in MOMENT_KEYS:
        if isinstance(state.get(key), torch.Tensor):
            state[key].zero_()
        elif quantized_state.is_quantized(state, key):
            quantized_state.reset_quantized(state, key)
    for key in STEP_KEYS:
        step = state.get(key)
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            state[key] = type(step)(0)


def reset_entries(state: dict[str, Any], param: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the moments (and per-entry counters) of the `mask` entries of one parameter's state; a state
    not shaped like the parameter is refused before anything is zeroed."""
    quantized = [key for key in MOMENT_KEYS + STEP_KEYS if quantized_state.is_quantized(state, key)]
    plain = [key for key in MOMENT_KEYS + STEP_KEYS
             if isinstance(state.get(key), torch.Tensor) and state[key].dim() > 0]
    for key in quantized:
        _check_shaped_like(key, state[key + quantized_state.CODES], param)
    for key in plain:
        _check_shaped_like(key, state[key], param)
    for key in quantized:
        quantized_state.reset_quantized(state, key, mask)  # dequantize, zero, requantize
    for key in plain:
        state[key].masked_fill_(mask.to(state[key].device), 0)


def _check_shaped_like(key: str, value: torch.Tensor, param: torch.Tensor) -> None:
    if value.shape != param.shape:
        raise ConfigError(
            f"cannot reset entries of optimizer state {key!r} of shape {tuple(value.shape)}: it is not "
            f"shaped like its parameter {tuple(param.shape)} (a projected state); reset whole parameters instead"
        )


def reset_state(optimizer: Optimizer, params: Iterable[torch.Tensor] | None = None,
                masks: dict[torch.Tensor, torch.Tensor] | None = None) -> int:
    """Reset the state of `params` (all by default), or only the `masks` entries; return how many
    parameters had state reset."""
    if masks is not None:
        targets = list(masks)
    elif params is not None:
        targets = list(params)
    else:
        targets = [p for group in optimizer.param_groups for p in group["params"]]
    custom = getattr(optimizer, "reset_param_state", None)
    count = 0
    for param in targets:
        state = optimizer.state.get(param)
        if not state:
            continue
        mask = masks.get(param) if masks is not None else None
        if custom is not None:
            custom(param, mask)
        elif mask is None:
            reset_whole(state)
        else:
            reset_entries(state, param, mask)
        count += 1
    return count


PRUNE_MODES = ("random", "magnitude")
# The Adam family's moments, by their state keys (8-bit states keep them as <key>_codes/<key>_absmax).
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


@torch.no_grad()
def prune_moments(optimizer: Optimizer, params: Iterable[torch.Tensor], mode: str, ratio: float,
                  generator: torch.Generator) -> float:
    """Zero a fraction `ratio` of the entries of each Adam moment (exp_avg, exp_avg_sq) of `params`, each
    tensor on its own, and keep the other entries and every step counter (bias correction goes on);
    return the fraction of those moments' entries that are 0 afterwards.

      random     keep an entry where U > ratio, U ~ U[0, 1) drawn from `generator` for each tensor in
                 turn (the first and second moments get independent masks)
      magnitude  keep an entry where |x| > quantile(|x| in fp32, ratio) (torch.quantile, linear
                 interpolation) of its own tensor

    ReLoRA's `optimizer_reset` (Guitaricet/relora, peft_pretraining/training_utils.py). A sharded
    moment (an FSDP2 DTensor) is pruned as the whole tensor would be: the draw is made at the whole
    shape on every rank from the same generator state and each rank keeps its rows; the quantile is
    taken over the gathered tensor. Parameters without state are skipped; a parameter whose state holds
    no Adam moment is refused (ConfigError): there is nothing to prune. The fraction returned counts
    this rank's entries."""
    check_choice("moment pruning", mode, PRUNE_MODES, ConfigError)
    zeros = total = 0
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue
        keys = [key for key in ADAM_MOMENTS if isinstance(state.get(key), torch.Tensor)]
        quantized = [key for key in ADAM_MOMENTS if quantized_state.is_quantized(state, key)]
        if not keys and not quantized:
            raise ConfigError(
                f"{type(optimizer).__name__} keeps no Adam moments ({', '.join(ADAM_MOMENTS)}) to prune "
                f"(its state holds {sorted(state)}); use lora-merge:prune=reset, or an Adam-family optimizer"
            )
        for key in keys:
            zeros, total = _prune(state[key], state[key], mode, ratio, generator, zeros, total)
        if quantized:  # 8-bit moments: pruned in fp32 and requantized, as their update does
            with quantized_state.dequantized(state, tuple(quantized)) as values:
                for key, value in zip(quantized, values):
                    zeros, total = _prune(state[key + quantized_state.CODES], value, mode, ratio, generator, zeros, total)
    return zeros / total if total else 0.0


def _prune(like: torch.Tensor, local: torch.Tensor, mode: str, ratio: float, generator: torch.Generator,
           zeros: int, total: int) -> tuple[int, int]:
    """Prune this rank's values `local` of a moment laid out like `like` (its global shape, its shards)."""
    local = local.to_local() if is_dtensor(local) else local
    if mode == "random":
        draw = torch.rand(tuple(like.shape), generator=generator, dtype=torch.float32)
        keep = rows_of(draw.to(local.device), like) > ratio
    else:
        whole = _gathered(local, like) if is_dtensor(like) else local
        threshold = torch.quantile(whole.abs().flatten().to(torch.float32), ratio).to(local.dtype)
        keep = local.abs() > threshold
    local.mul_(keep.to(local.dtype))
    return zeros + int((local == 0).sum()), total + local.numel()


def _gathered(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which `local` is this rank's dim-0 shard, laid out like DTensor `like`."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def replace_parameter(optimizer: Optimizer, old: torch.Tensor, new: torch.Tensor,
                      remap: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Put `new` where `old` is in the optimizer's groups, with `remap(old_state)` as its state."""
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if param is old:
                group["params"][i] = new
                old_state = optimizer.state.pop(old, None)
                if remap is not None and old_state:
                    optimizer.state[new] = remap(old_state)
                return
    raise ValueError("replace_parameter: the old parameter is in none of the optimizer's groups")
