"""Checkpoints that resume exactly, at any number of processes, and load without unpickling code.

A checkpoint is a directory `<run>/checkpoints/step-XXXXXXXX/` written by torch.distributed.checkpoint
(DCP): its tensors in DCP's files (`__R_0.distcp`, one per rank, and `.metadata`), which DCP
reshards when a run of another size loads them, and beside them `values-rank-R.pt`, each rank's
tree of everything else (numbers, strings, the config) with a placeholder for each tensor
(`torch.load(weights_only=True)`). It holds the state of each of the run's components by name
(`components_state` / `load_components`): the model and the optimizer (DTensors as DTensors, so
their shards are placed again by the loading run's layout), the data loader's position, the
interventions, the structure, every RNG state, and the progress (step, tokens seen, skipped steps,
the first evaluation, kept at the top level as before), with the run config beside them. A plain
tensor that may differ between ranks (the RNG states, an optimizer state whose layout is `"rank"`,
see `LowmemOptimizer.state_layout`) is saved under a per-rank name (`rank-R/...`): DCP keeps one copy
of a plain tensor whatever each rank holds. DCP's `.metadata` is a pickle; it is read by an
unpickler that admits only DCP's own metadata classes. Checkpoints of the format before DCP
(`rank-R.pt`, one file per rank) still resume, at their own number of processes. A new
component adds its state by giving the Trainer one more entry (`Trainer._components`); nothing else changes. The step directory
is written under a temporary name and renamed when every rank has finished, so a checkpoint either
exists whole or not at all; the newest K are kept. A save that fails on any rank (a full disk, an
unwritable directory) removes its partial directory, keeps the previous checkpoint and raises
CheckpointError on every rank, naming the directory, the bytes needed and the last good checkpoint. lowmem never unpickles
arbitrary objects: a file that needs `weights_only=False` is refused with the reason; a truncated
one is refused naming the newest older checkpoint that loads.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed import ReduceOp
from torch.distributed.checkpoint.api import CheckpointException

from lowmem.distributed import all_reduce, any_rank, broadcast, broadcast_object, current_info, unwrap
from lowmem.errors import CheckpointError
from lowmem.optim.base import default_state_layout, default_whole_state_layout, is_dtensor, local_tensor

FORMAT = "lowmem-checkpoint-2"  # DCP's files + each rank's values file
LEGACY_FORMAT = "lowmem-checkpoint-1"  # one torch.save file per rank, resumable at its own world size only
CHECKPOINT_DIR = "checkpoints"
DCP_METADATA = ".metadata"
VALUES_FILE = "values-rank-{rank}.pt"
# A tensor's place in a values file: {TENSOR_KEY: its name in DCP's files}.
TENSOR_KEY = "__dcp_tensor__"
# Components whose tensors may differ between ranks (saved under each rank's own names), and the key
# under which a component puts the part of its state that is its rank's own.
RANK_LOCAL_COMPONENTS = ("loader", "rng")
RANK_LOCAL = "rank-local"


def _local(value: Any) -> Any:
    """Replace DTensors by their local shards, recursively (the saved form)."""
    if is_dtensor(value):
        return value.to_local().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v) for v in value)
    return value


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": _python_rng_to_tensor(),
        "numpy": _numpy_rng_to_plain(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), None if gauss is None else float(gauss)))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_to_tensor() -> tuple:
    version, internal, gauss = random.getstate()
    return (version, torch.tensor(internal, dtype=torch.int64), gauss)


def _numpy_rng_to_plain() -> tuple:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: _local(p) for name, p in unwrap(model).state_dict().items()}


def load_model_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    target = unwrap(model)
    current = target.state_dict()
    missing = set(current) - set(saved)
    unexpected = set(saved) - set(current)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
            "resume with the model config the checkpoint was written with"
        )
    with torch.no_grad():
        for name, tensor in current.items():
            local, source = local_tensor(tensor), local_tensor(saved[name])
            if source.data_ptr() == local.data_ptr() and source.shape == local.shape:
                continue  # DCP loaded it in place
            if local.shape != source.shape:
                raise CheckpointError(
                    f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, the model's is "
                    f"{tuple(local.shape)}; resume with the same model and number of processes"
                )
            local.copy_(source)


def gather_sharded_model_state(model: nn.Module, saved_by_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One process's model state from the ranks' parts of an FSDP2 checkpoint: a tensor saved as dim-0
    shards (FSDP2's Shard(0), torch.chunk's split, so a rank's part may be empty) is concatenated back;
    one saved whole on rank 0 (a buffer, or a weight too small to split) is taken from rank 0. Parts
    that do not join into the model's shape are joined anyway, for `load_model_state` to name."""
    full = unwrap(model).state_dict()
    return {name: first if name not in full or first.shape == full[name].shape
            else torch.cat([saved[name] for saved in saved_by_rank], dim=0)
            for name, first in saved_by_rank[0].items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a saved optimizer state; state tensors shaped like a DTensor parameter's shard become
    DTensors again with that parameter's mesh and placements."""
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_dtensor(param) or param not in optimizer.state:
                continue
            from torch.distributed.tensor import DTensor

            state = optimizer.state[param]
            local_shape = param.to_local().shape
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not is_dtensor(value) and value.shape == local_shape and value.dim() > 0:
                    state[key] = DTensor.from_local(
                        value.to(param.to_local().device), param.device_mesh, param.placements,
                        shape=param.shape, stride=param.stride(),
                    )


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelComponent:
    """The model's weights and buffers (the unwrapped module's; DTensors as DTensors, for DCP to
    reshard). A DCP load reads straight into them (`dcp_template`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return dict(unwrap(self.model).state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_model_state(self.model, state)

    def dcp_template(self, name: str, size: torch.Size, dtype: torch.dtype, saved: dict[str, Any]) -> torch.Tensor | None:
        live = unwrap(self.model).state_dict().get(name)
        return live if live is not None and live.shape == size and live.dtype == dtype else None


class OptimizerComponent:
    """The optimizer's state, laid out across ranks so that DCP can reshard it. A DTensor state keeps
    its placements and its layout is recorded (`PLACEMENTS`: "param", its parameter's placements, or
    "replicated"), so a run of any size reads it back with the same layout over its own ranks. A
    plain state tensor is placed as the optimizer's `state_layout` says
    (lowmem.optim.base.default_state_layout for one that says nothing): `param` tensors become
    DTensors with their parameter's placements, `replicated` ones stay plain (saved once), `rank`
    ones go under RANK_LOCAL, which ties the checkpoint to its number of processes."""

    PLACEMENTS = "placements"

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def _params(self) -> list[torch.Tensor]:
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        saved = self.optimizer.state_dict()
        layout = getattr(self.optimizer, "state_layout", None) or default_state_layout
        params, state, own, placements = self._params(), {}, {}, {}
        for index, entries in saved["state"].items():
            param, kept = params[index], {}
            for key, value in entries.items():
                if is_dtensor(value):
                    placements.setdefault(index, {})[key] = _dtensor_layout(value, param)
                elif isinstance(value, torch.Tensor) and is_dtensor(param):
                    where = layout(param, key, value)
                    if where == "param":
                        value = _as_param_dtensor(value, param)
                        placements.setdefault(index, {})[key] = "param"
                    elif where == "rank":
                        own.setdefault(index, {})[key] = value
                        continue
                kept[key] = value
            state[index] = kept
        return {"state": state, "param_groups": saved["param_groups"], RANK_LOCAL: own, self.PLACEMENTS: placements}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        merged = {index: dict(entries) for index, entries in state["state"].items()}
        for index, entries in state.get(RANK_LOCAL, {}).items():
            merged.setdefault(index, {}).update(entries)
        load_optimizer_state(self.optimizer, {"state": merged, "param_groups": state["param_groups"]})

    def dcp_template(self, name: str, size: torch.Size, dtype: torch.dtype, saved: dict[str, Any]) -> torch.Tensor | None:
        """A state tensor saved as a DTensor is read as a DTensor laid out over this run's ranks as it
        was over the saving run's, so DCP reads this rank's part of it whatever wrote it; one saved whole
        by a run without DTensors is laid out as the optimizer's `whole_state_layout` says (by default:
        shaped like its parameter, as the parameter)."""
        parts = name.split("/")
        if len(parts) != 3 or parts[0] != "state":
            return None
        index = int(parts[1])
        param = self._params()[index]
        if not is_dtensor(param):
            return None
        from torch.distributed.tensor import Replicate, zeros

        layout = saved.get(self.PLACEMENTS, {}).get(index, {}).get(parts[2])
        if layout is None:  # saved whole, by a run without DTensors: the method says how it lies here
            whole_layout = getattr(self.optimizer, "whole_state_layout", None) or default_whole_state_layout
            layout = whole_layout(param, parts[2], size)
        if layout is None:
            return None
        placements = param.placements if layout == "param" else [Replicate()] * param.device_mesh.ndim
        return zeros(size, dtype=dtype, device_mesh=param.device_mesh, placements=placements)


def _dtensor_layout(value: torch.Tensor, param: torch.Tensor) -> str:
    if is_dtensor(param) and tuple(value.placements) == tuple(param.placements):
        return "param"
    if all(placement.is_replicate() for placement in value.placements):
        return "replicated"
    raise CheckpointError(f"an optimizer state DTensor has placements {value.placements}, neither its parameter's "
                          "nor replicated; lowmem checkpoints lay state out one of those two ways")


def _as_param_dtensor(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


class NamedComponents:
    """Several components (the interventions) under one key, each by its own `name`."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def state_dict(self) -> dict[str, Any]:
        return {item.name: item.state_dict() for item in self.items}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for item in self.items:
            if item.name not in state:
                raise CheckpointError(
                    f"the checkpoint has no state for {item.name!r} (it has {sorted(state)}); resume with the "
                    "interventions the run was started with"
                )
            item.load_state_dict(state[item.name])


class RngComponent:
    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # From a run of another size: rank 0's, as every rank is seeded alike and draws alike.
        set_rng_state(state["saved_ranks"][0] if "saved_ranks" in state else state)


# Components whose entries sit at the top level of the file (the layout before components existed).
FLAT_COMPONENTS = ("progress",)


def components_state(components: dict[str, Stateful]) -> dict[str, Any]:
    """The checkpoint payload of `components`: each one's state under its name."""
    payload: dict[str, Any] = {}
    for name, component in components.items():
        state = component.state_dict()
        if name in FLAT_COMPONENTS:
            payload.update(state)
        else:
            payload[name] = state
    return payload


def load_components(components: dict[str, Stateful], body: dict[str, Any]) -> None:
    """Give each component its state from a loaded checkpoint (for DCP, its tensors read first, each
    into the template its component offers: the model's own tensors, DTensors shaped like their
    parameters). A component absent from the file (one that did not exist when it was written) is
    accepted only if it has no state to lose."""
    loaded_dcp = isinstance(body, DcpBody)
    body = with_tensors(components, body)
    for name, component in components.items():
        if name in FLAT_COMPONENTS:
            component.load_state_dict(body)
        elif name in body:
            component.load_state_dict(body[name])
        elif component.state_dict():
            raise CheckpointError(f"the checkpoint holds no {name!r} state, which this run needs; resume with the run's own settings")
    if loaded_dcp and "optimizer" in components:
        check_same_state_keys(components["optimizer"].optimizer)


def with_tensors(components: dict[str, Stateful], body: dict[str, Any]) -> dict[str, Any]:
    """`body` with its tensors: a DcpBody's read from DCP's files (a collective under torchrun), each
    into the template its component offers (`dcp_template`: the model's own tensors, optimizer state
    as DTensors laid out as saved); any other body as it is."""
    if not isinstance(body, DcpBody):
        return body
    templates = _templates(components, body, current_info().world_size)
    return _fill_tensors(dict(body), read_dcp_tensors(body, templates))


def state_keys(optimizer: torch.optim.Optimizer) -> list[tuple[int, str]]:
    """(parameter index, state key) of every state entry of `optimizer`."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return sorted((index, key) for index, param in enumerate(params) for key in optimizer.state.get(param, {}))


def check_same_state_keys(optimizer: torch.optim.Optimizer) -> None:
    """CheckpointError on every rank unless every rank holds the same optimizer state keys (a
    collective under torchrun): a rank without a key would take different steps from the others."""
    mine = state_keys(optimizer)
    first = broadcast_object(mine)
    if any_rank(mine != first):
        missing = sorted(set(first) ^ set(mine))[:5]
        raise CheckpointError(f"after loading, the processes hold different optimizer state keys (e.g. {missing}); "
                              "the checkpoint's state does not cover every rank: resume with the number of "
                              "processes it was written with")


def check_replicated_state_agrees(optimizer: torch.optim.Optimizer) -> None:
    """CheckpointError on every rank unless each plain state tensor of an FSDP2 (DTensor) parameter
    laid out `replicated` (LowmemOptimizer.state_layout; by default every 0-dim value) holds the same
    values on every rank (a collective under torchrun; nothing to do without DTensor parameters).
    A checkpoint saves such a tensor once, so one that differed per rank would load as one rank's copy
    on every rank, silently (DCP's own behaviour): the save refuses it instead, naming it."""
    info = current_info()
    params = [param for group in optimizer.param_groups for param in group["params"]]
    if not info.enabled or not any(is_dtensor(param) for param in params):
        return
    layout = getattr(optimizer, "state_layout", None) or default_state_layout
    names, values = [], []
    for index, param in enumerate(params):
        if not is_dtensor(param):
            continue
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and not is_dtensor(value) and layout(param, key, value) == "replicated":
                names.append(f"state {index} ({tuple(param.shape)}) {key!r}")
                values.append(value.detach().reshape(-1).to(info.device, torch.float64))
    sizes = [v.numel() for v in values]
    if any_rank(broadcast_object(sizes) != sizes, info):
        raise CheckpointError("the processes hold differently shaped 'replicated' optimizer state, which a "
                              "checkpoint saves once; the method must lay such state out as 'rank' "
                              "(LowmemOptimizer.state_layout)")
    if not values:
        return
    mine = torch.cat(values)
    first = broadcast(mine.clone(), src=0, info=info)
    differs = torch.stack([(a != b).any() for a, b in zip(mine.split(sizes), first.split(sizes))]).to(torch.int64)
    all_reduce(differs, ReduceOp.MAX, info=info)
    if differs.any():
        name = names[int(differs.argmax())]
        raise CheckpointError(
            f"optimizer {name} differs between the processes, but its layout is 'replicated', which a checkpoint "
            "saves once (one process's copy would come back on every process). The optimizer must declare it "
            "'rank' in its state_layout (tied to the number of processes) or keep it equal on every process")


def _templates(components: dict[str, Stateful], body: DcpBody, world_size: int) -> dict[str, torch.Tensor | None]:
    """Each tensor of `body` by name, with the tensor its component reads it into (None: a new one)."""
    saved = body.metadata.state_dict_metadata
    templates: dict[str, torch.Tensor | None] = {}
    for name in _tensor_names(dict(body)):
        parts = name.split("/")
        if parts[0].startswith("rank-"):
            parts = parts[1:]
            if body.saved_world_size != world_size and parts[0] not in RANK_LOCAL_COMPONENTS:
                raise CheckpointError(
                    f"{body.directory} was written by {body.saved_world_size} process(es) and its {parts[0]} state "
                    f"{'/'.join(parts[1:])!r} is each process's own (its layout is 'rank': see "
                    f"LowmemOptimizer.state_layout), so it cannot be split over {world_size}; resume with "
                    f"{body.saved_world_size} processes")
        make = getattr(components.get(parts[0]), "dcp_template", None)
        meta = saved.get(name)
        templates[name] = (make("/".join(parts[1:]), meta.size, meta.properties.dtype, body.get(parts[0]) or {})
                           if make and meta else None)
    return templates


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step-{step:08d}"


def save(run_dir: Path, step: int, payload: dict[str, Any], rank: int = 0, world_size: int = 1,
         keep: int = 2, any_failed: Callable[[bool], bool] | None = None) -> Path:
    """Write this rank's part of the checkpoint for `step` atomically (its values file and, with every
    rank, DCP's files); return the step directory.

    With several processes, `any_failed(failed)` (true on every rank if it is true on any) follows
    each stage, so a write that fails on one rank stops every rank with the same CheckpointError
    instead of leaving the others waiting at a barrier."""
    final = step_dir(run_dir, step)
    staging = final.with_name(final.name + ".tmp")
    body = {"format": FORMAT, "rank": rank, "world_size": world_size, **payload}
    agree = any_failed or (lambda failed: failed)
    error: BaseException | None = None

    def stage(action: Callable[[], None]) -> None:
        nonlocal error
        failed = False
        if error is None:
            try:
                action()
            except (OSError, RuntimeError, CheckpointException) as err:
                cause = _dcp_cause(err, rank)
                if isinstance(cause, RuntimeError) and not _is_write_error(cause):
                    raise
                error, failed = cause, True
        if agree(failed):
            shutil.rmtree(staging, ignore_errors=True)
            if error is None:
                error = OSError(f"another process could not write its part of {staging.name}")
            raise _save_failed(run_dir, staging, step, body, error) from None

    def make_staging() -> None:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

    values, tensors = split_tensors(body, rank)

    def write_values() -> None:
        part = staging / VALUES_FILE.format(rank=rank)
        torch.save(values, part.with_suffix(".pt.partial"))
        os.replace(part.with_suffix(".pt.partial"), part)

    def write_tensors() -> None:  # a collective under torchrun: every rank reaches it or none does
        _dcp_save(tensors, staging)

    def publish() -> None:
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(final.parent)

    stage(make_staging)
    stage(write_values)
    stage(write_tensors)
    stage(publish)
    if rank == 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    agree(False)  # every rank returns once the step directory is published and pruned
    return final


def split_tensors(tree: Any, rank: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """`tree` without its tensors, each replaced by {TENSOR_KEY: name}, and the tensors by name (their
    path of keys joined by "/", under `rank-R/` when they are the rank's own: RANK_LOCAL_COMPONENTS
    and RANK_LOCAL subtrees)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: tuple[str, ...], own: bool) -> Any:
        if isinstance(value, torch.Tensor):
            name = "/".join(((f"rank-{rank}",) if own else ()) + path)
            tensors[name] = value if is_dtensor(value) else value.detach()
            return {TENSOR_KEY: name}
        if isinstance(value, dict):
            return {key: walk(item, (*path, str(key)), own or key == RANK_LOCAL
                              or (not path and key in RANK_LOCAL_COMPONENTS))
                    for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(item, (*path, str(i)), own) for i, item in enumerate(value))
        return value

    return walk(tree, (), False), tensors


def _tensor_names(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        if set(tree) == {TENSOR_KEY}:
            return [tree[TENSOR_KEY]]
        return [name for item in tree.values() for name in _tensor_names(item)]
    if isinstance(tree, (list, tuple)):
        return [name for item in tree for name in _tensor_names(item)]
    return []


def _fill_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {TENSOR_KEY}:
            return tensors[tree[TENSOR_KEY]]
        return {key: _fill_tensors(item, tensors) for key, item in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_fill_tensors(item, tensors) for item in tree)
    return tree


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _dcp_save(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(directory), no_dist=not _distributed())


def _dcp_cause(err: BaseException, rank: int) -> BaseException:
    """The error behind DCP's CheckpointException (which gathers every rank's failures): this rank's
    own, or an OSError saying another rank failed, with its reason."""
    if not isinstance(err, CheckpointException):
        return err
    # failures: rank -> (exception, its traceback)
    failures = {r: f[0] if isinstance(f, tuple) else f for r, f in (getattr(err, "failures", {}) or {}).items()}
    if rank in failures:
        return failures[rank]
    if failures:
        other = next(iter(failures.values()))
        return OSError(f"another process could not write its part ({getattr(other, 'strerror', None) or other})")
    return RuntimeError(str(err))


def _is_write_error(err: RuntimeError) -> bool:
    """torch.save reports a failed write as a RuntimeError (`basic_ios::clear`, `PytorchStreamWriter
    failed writing file ...`)."""
    text = str(err)
    return any(word in text for word in ("basic_ios", "PytorchStreamWriter", "inline_container", "write", "No space", "Permission"))


def payload_bytes(value: Any) -> int:
    """About how many bytes a checkpoint of `value` takes (its tensors' storage)."""
    if isinstance(value, torch.Tensor):
        return local_tensor(value).numel() * value.element_size()  # this process's part of a DTensor
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    return 0


def _save_failed(run_dir: Path, staging: Path, step: int, body: dict[str, Any], err: BaseException) -> CheckpointError:
    directory = staging.parent
    try:
        free = f"{shutil.disk_usage(directory if directory.exists() else run_dir).free:,} bytes are free"
    except OSError:
        free = "the free space is unknown"
    previous = list_checkpoints(run_dir)
    last = f"the last good checkpoint is {previous[-1]}" if previous else "no earlier checkpoint exists"
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
    # The order that makes a crash safe (the new checkpoint whole before the old one goes) needs room.
    both = (f" The disk must hold two checkpoints at once (about {2 * payload_bytes(body):,} bytes per process): "
            "the new one is written whole before the old one is removed, so a crash always leaves one; "
            "--keep-checkpoints K holds K, plus the one being written." if previous else "")
    return CheckpointError(
        f"could not write the checkpoint of step {step} in {directory} ({reason}); it needs about "
        f"{payload_bytes(body):,} bytes per process and {free}.{both} The partial {staging.name} was removed and "
        f"{last}. Free space or make the directory writable, then resume with: lowmem train --resume {run_dir}"
    )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp"))


def resolve(path_or_run: str | Path) -> Path:
    """A checkpoint step directory from a run directory (its newest), a step directory or a rank file."""
    path = Path(path_or_run)
    if path.is_file():
        path = path.parent
    if (path / CHECKPOINT_DIR).is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"run directory {path} holds no complete checkpoint to resume from")
        return found[-1]
    if path.is_dir() and ((path / DCP_METADATA).is_file() or any(path.glob("rank-*.pt"))):
        return path
    raise CheckpointError(
        f"{path} is neither a run directory with checkpoints nor a checkpoint; pass --resume with a run "
        "directory (its newest checkpoint is used) or a checkpoints/step-N directory"
    )


def _older_intact(step_directory: Path, rank: int) -> str:
    """Words naming the newest checkpoint older than `step_directory` whose values (and, for DCP, whose
    metadata) load."""
    run_dir = step_directory.parent.parent
    if step_directory.parent.name != CHECKPOINT_DIR:
        return "resume from an earlier checkpoint"
    for older in reversed([p for p in list_checkpoints(run_dir) if p.name < step_directory.name]):
        try:
            if (older / DCP_METADATA).is_file():
                read_metadata(older)
                body = _load_weights_only(older / VALUES_FILE.format(rank=0))
            else:
                body = _load_weights_only(older / f"rank-{rank}.pt")
        except Exception:  # noqa: BLE001 - this one is broken too: try the next older
            continue
        if isinstance(body, dict) and body.get("format") in (FORMAT, LEGACY_FORMAT):
            return f"the older checkpoint {older} is intact: resume with --resume {older}"
    return f"no older checkpoint in {run_dir / CHECKPOINT_DIR} loads either"


_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle of its Metadata: this admits DCP's metadata classes, torch's
    Size, dtypes and layouts and paths, and refuses anything else (code a pickle could run)."""

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if module in (*_METADATA_MODULES, "torch", "torch.serialization", "pathlib") else None
        allowed = (module in _METADATA_MODULES and isinstance(found, type)
                   or module == "torch" and (name == "Size" or isinstance(found, torch.dtype))
                   or (module, name) == ("torch.serialization", "_get_layout")
                   or module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")
        return found


def read_metadata(step_directory: Path) -> Any:
    """DCP's metadata of a checkpoint (the saved tensors' names, shapes, dtypes and chunks), unpickled
    safely (`_MetadataUnpickler`); CheckpointError naming the file if it does not read."""
    path = Path(step_directory) / DCP_METADATA
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds more than DCP's metadata ({err}); lowmem refuses to unpickle it") from None
    except Exception as err:  # noqa: BLE001 - every failure is reported with the file's name
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}); "
                              + _older_intact(Path(step_directory), 0)) from None
    return metadata


class _SafeReader:
    """DCP's FileSystemReader with `read_metadata` through `_MetadataUnpickler`."""

    @staticmethod
    def make(directory: Path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import StorageMeta

        class Reader(dcp.FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any):
                metadata = read_metadata(Path(self.path))
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                return metadata

        return Reader(directory)


class DcpBody(dict):
    """A DCP checkpoint's values as `load` returns them: a dict (config, progress, ...) whose tensors
    are still placeholders, read by `load_components` into the loading run's own layout."""

    def __init__(self, values: dict[str, Any], directory: Path, metadata: Any, world_size: int) -> None:
        super().__init__(values)
        self.directory, self.metadata, self.saved_world_size = directory, metadata, world_size

    def __or__(self, other: dict[str, Any]) -> DcpBody:  # `body | {...}` stays a DcpBody
        return DcpBody({**self, **other}, self.directory, self.metadata, self.saved_world_size)


def _saved_world_size(step_directory: Path) -> int:
    return len(list(Path(step_directory).glob(VALUES_FILE.format(rank="*"))))


def _read_values(step_directory: Path, rank: int) -> dict[str, Any]:
    part = Path(step_directory) / VALUES_FILE.format(rank=rank)
    if not part.is_file():
        raise CheckpointError(f"{part} is missing: {step_directory} is not a whole checkpoint; "
                              + _older_intact(Path(step_directory), rank))
    return _checked_body(part, _load_or_refuse(part, step_directory, rank), FORMAT)


def load_dcp(step_directory: Path, rank: int = 0, world_size: int = 1) -> DcpBody:
    """The values of a DCP checkpoint for rank `rank` of `world_size` (its own values file at the
    saved number of processes, rank 0's at another), tensors still to be read by `load_components`."""
    step_directory = Path(step_directory)
    metadata = read_metadata(step_directory)
    saved = _saved_world_size(step_directory)
    values = _read_values(step_directory, rank if saved == world_size else 0)
    if saved != world_size:  # each rank's own state, for the components to continue together
        by_rank = [values] + [_read_values(step_directory, r) for r in range(1, saved)]
        for name in RANK_LOCAL_COMPONENTS:
            if name in values:
                values[name] = {"saved_ranks": [part[name] for part in by_rank]}
    return DcpBody(values, step_directory, metadata, saved)


def read_dcp_tensors(body: DcpBody, templates: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Read the named tensors of `body`'s checkpoint (a collective under torchrun: every rank calls
    it), each into its template (a DTensor gets this rank's part of the saved whole, whatever layout
    wrote it) or, where the template is None, into a new tensor of the saved shape and dtype."""
    import torch.distributed.checkpoint as dcp

    saved = body.metadata.state_dict_metadata
    missing = sorted(name for name in templates if name not in saved)
    if missing:
        raise CheckpointError(f"{body.directory} holds no tensor {missing[0]!r} (and {len(missing) - 1} more) "
                              "that this run needs; resume with the settings the run was written with")
    filled = {name: template if template is not None else torch.empty(saved[name].size, dtype=saved[name].properties.dtype)
              for name, template in templates.items()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.load(filled, storage_reader=_SafeReader.make(body.directory), no_dist=not _distributed())
    except (CheckpointException, RuntimeError, OSError) as err:
        raise CheckpointError(f"{body.directory} is truncated or corrupt ({str(err).splitlines()[0]}); "
                              + _older_intact(body.directory, 0)) from None
    return filled


def load_whole(step_directory: Path) -> dict[str, Any]:
    """A checkpoint as one process sees it, every tensor whole and plain (rank 0's own state for what
    is per-rank): for `lowmem eval`/`export` and for reading a checkpoint's contents. Old-format
    checkpoints: rank 0's file."""
    step_directory = Path(step_directory)
    if not (step_directory / DCP_METADATA).is_file():
        return load(step_directory, 0, _legacy_world_size(step_directory))
    body = load_dcp(step_directory, 0, 1)
    names = _tensor_names(dict(body))
    tensors = _read_whole(body, names)
    return _fill_tensors(dict(body), tensors)


def _read_whole(body: DcpBody, names: list[str]) -> dict[str, torch.Tensor]:
    """Plain whole tensors, read in this process alone (no collective, even under torchrun)."""
    import torch.distributed.checkpoint as dcp

    saved = body.metadata.state_dict_metadata
    filled = {name: torch.empty(saved[name].size, dtype=saved[name].properties.dtype) for name in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(filled, storage_reader=_SafeReader.make(body.directory), no_dist=True)
    return filled


def _legacy_world_size(step_directory: Path) -> int:
    return max(1, len(list(Path(step_directory).glob("rank-*.pt"))))


def _load_weights_only(path: Path) -> Any:
    """torch.load(weights_only=True), without torch's "Detected pickle protocol" warning: a file that is
    not one of torch's is refused by lowmem's own message, which must be the one a user reads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load(step_directory: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """This rank's part of the checkpoint at `step_directory`: for DCP, a `DcpBody` (the values;
    `load_components` reads the tensors); for the format before DCP, its `rank-R.pt` read with
    weights_only=True (which must match `world_size`). Errors name the file."""
    if (Path(step_directory) / DCP_METADATA).is_file():
        return load_dcp(step_directory, rank, world_size)
    part = Path(step_directory) / f"rank-{rank}.pt"
    if not part.is_file():
        present = sorted(p.name for p in Path(step_directory).glob("rank-*.pt"))
        raise CheckpointError(
            f"{part} is missing (the checkpoint holds {present}); resume with the same number of processes "
            "it was written with"
        )
    body = _checked_body(part, _load_or_refuse(part, step_directory, rank), LEGACY_FORMAT)
    if body["world_size"] != world_size:
        raise CheckpointError(
            f"{part} was written by {body['world_size']} process(es), this run has {world_size}; "
            "resume with the same number of processes (checkpoints of this older format do not reshard)"
        )
    return body


def _load_or_refuse(part: Path, step_directory: Path, rank: int) -> Any:
    try:
        return _load_weights_only(part)
    except Exception as err:  # noqa: BLE001 - every failure is reported with the file's name
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            raise CheckpointError(
                f"{part} needs torch.load(weights_only=False), which lowmem refuses: it would execute "
                "arbitrary pickled code. Only checkpoints of plain tensors and numbers are loaded."
            ) from None
        raise CheckpointError(
            f"{part} is truncated or corrupt ({type(err).__name__}: {text.splitlines()[0] if text else ''}); "
            + _older_intact(Path(step_directory), rank)
        ) from None


def _checked_body(part: Path, body: Any, expected_format: str) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("format") != expected_format:
        raise CheckpointError(f"{part} is not a lowmem checkpoint (format {body.get('format') if isinstance(body, dict) else type(body).__name__})")
    return body
