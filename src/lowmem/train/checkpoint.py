"""Checkpoints that resume exactly and load with `torch.load(weights_only=True)` only.

A checkpoint is one file per rank, `<run>/checkpoints/step-XXXXXXXX/rank-R.pt`, holding the state of
each of the run's components by name (`components_state` / `load_components`): the model and the
optimizer (DTensor shards stored as their local tensors), the data loader's position, the
interventions, the structure, every RNG state, and the progress (step, tokens seen, skipped steps,
the first evaluation, kept at the top level as before), with the run config beside them. A new
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
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from lowmem.distributed import unwrap
from lowmem.errors import CheckpointError
from lowmem.optim.base import is_dtensor, local_tensor

FORMAT = "lowmem-checkpoint-1"
CHECKPOINT_DIR = "checkpoints"


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
            local = local_tensor(tensor)
            if local.shape != saved[name].shape:
                raise CheckpointError(
                    f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, the model's is "
                    f"{tuple(local.shape)}; resume with the same model and number of processes"
                )
            local.copy_(saved[name])


def gather_sharded_model_state(model: nn.Module, saved_by_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One process's model state from the ranks' parts of an FSDP2 checkpoint: a tensor saved as dim-0
    shards (FSDP2's Shard(0), torch.chunk's split, so a rank's part may be empty) is concatenated back;
    one saved whole on rank 0 (a buffer, or a weight too small to split) is taken from rank 0. Parts
    that do not join into the model's shape are joined anyway, for `load_model_state` to name."""
    full = unwrap(model).state_dict()
    return {name: first if name not in full or first.shape == full[name].shape
            else torch.cat([saved[name] for saved in saved_by_rank], dim=0)
            for name, first in saved_by_rank[0].items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return _local(optimizer.state_dict())


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
    """The model's weights and buffers (the unwrapped module's; DTensors saved as local shards)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return model_state(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_model_state(self.model, state)


class OptimizerComponent:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return optimizer_state(self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, state)


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
        set_rng_state(state)


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
    """Give each component its state from a loaded checkpoint. A component absent from the file
    (one that did not exist when it was written) is accepted only if it has no state to lose."""
    for name, component in components.items():
        if name in FLAT_COMPONENTS:
            component.load_state_dict(body)
        elif name in body:
            component.load_state_dict(body[name])
        elif component.state_dict():
            raise CheckpointError(f"the checkpoint holds no {name!r} state, which this run needs; resume with the run's own settings")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step-{step:08d}"


def save(run_dir: Path, step: int, payload: dict[str, Any], rank: int = 0, world_size: int = 1,
         keep: int = 2, any_failed: Callable[[bool], bool] | None = None) -> Path:
    """Write this rank's part of the checkpoint for `step` atomically; return the step directory.

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
            except (OSError, RuntimeError) as err:
                if isinstance(err, RuntimeError) and not _is_write_error(err):
                    raise
                error, failed = err, True
        if agree(failed):
            shutil.rmtree(staging, ignore_errors=True)
            if error is None:
                error = OSError(f"another process could not write its part of {staging.name}")
            raise _save_failed(run_dir, staging, step, body, error) from None

    def make_staging() -> None:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

    def write_part() -> None:
        part = staging / f"rank-{rank}.pt"
        torch.save(body, part.with_suffix(".pt.partial"))
        os.replace(part.with_suffix(".pt.partial"), part)

    def publish() -> None:
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(final.parent)

    stage(make_staging)
    stage(write_part)
    stage(publish)
    if rank == 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    agree(False)  # every rank returns once the step directory is published and pruned
    return final


def _is_write_error(err: RuntimeError) -> bool:
    """torch.save reports a failed write as a RuntimeError (`basic_ios::clear`, `PytorchStreamWriter
    failed writing file ...`)."""
    text = str(err)
    return any(word in text for word in ("basic_ios", "PytorchStreamWriter", "inline_container", "write", "No space", "Permission"))


def payload_bytes(value: Any) -> int:
    """About how many bytes a checkpoint of `value` takes (its tensors' storage)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
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
    if path.is_dir() and any(path.glob("rank-*.pt")):
        return path
    raise CheckpointError(
        f"{path} is neither a run directory with checkpoints nor a checkpoint; pass --resume with a run "
        "directory (its newest checkpoint is used) or a checkpoints/step-N directory"
    )


def _older_intact(step_directory: Path, rank: int) -> str:
    """Words naming the newest checkpoint older than `step_directory` whose file for `rank` loads."""
    run_dir = step_directory.parent.parent
    if step_directory.parent.name != CHECKPOINT_DIR:
        return "resume from an earlier checkpoint"
    for older in reversed([p for p in list_checkpoints(run_dir) if p.name < step_directory.name]):
        try:
            body = _load_weights_only(older / f"rank-{rank}.pt")
        except Exception:  # noqa: BLE001 - this one is broken too: try the next older
            continue
        if isinstance(body, dict) and body.get("format") == FORMAT:
            return f"the older checkpoint {older} is intact: resume with --resume {older}"
    return f"no older checkpoint in {run_dir / CHECKPOINT_DIR} loads either"


def _load_weights_only(path: Path) -> Any:
    """torch.load(weights_only=True), without torch's "Detected pickle protocol" warning: a file that is
    not one of torch's is refused by lowmem's own message, which must be the one a user reads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load(step_directory: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Load this rank's part of a checkpoint with weights_only=True, with errors that name the file."""
    part = Path(step_directory) / f"rank-{rank}.pt"
    if not part.is_file():
        present = sorted(p.name for p in Path(step_directory).glob("rank-*.pt"))
        raise CheckpointError(
            f"{part} is missing (the checkpoint holds {present}); resume with the same number of processes "
            "it was written with"
        )
    try:
        body = _load_weights_only(part)
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
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{part} is not a lowmem checkpoint (format {body.get('format') if isinstance(body, dict) else type(body).__name__})")
    if body["world_size"] != world_size:
        raise CheckpointError(
            f"{part} was written by {body['world_size']} process(es), this run has {world_size}; "
            "resume with the same number of processes"
        )
    return body
