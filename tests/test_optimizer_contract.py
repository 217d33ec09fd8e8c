"""The optimizer contract (docs/architecture.md, "Optimizers"), checked for every registered optimizer:
bad hyperparameters refused by the one validation hook, state dicts that load with weights_only=True
and resume bitwise, a step on a meta-device model, two FSDP2 processes equal to one, and a bench grid
that plans and configures it.

Parametrized over `lowmem.optim.available()` after loading every file of tests/plugins/ (as
`lowmem train --plugin` would), so an optimizer registered in lowmem or in a plugin gets these tests
with no edit here. Each method's small hyperparameters for the tiny model are in CONTRACTS; a name
not there (a new method, a plugin's) runs with DEFAULT. Numerics against the official packages stay
in each method's own test file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import lowmem.optim
from lowmem.assembly import build_model, build_optimizer
from lowmem.errors import ConfigError
from lowmem.registry import load_plugins
from lowmem.testing import TINY, _full_state, fsdp_matches_single_many, max_relative_difference, train_steps

PLUGINS = sorted(str(path) for path in (Path(__file__).parent / "plugins").glob("*.py"))
load_plugins(PLUGINS)


@dataclass(frozen=True)
class Contract:
    """How the contract tests run one method on lowmem.testing.TINY."""

    hparams: dict[str, Any] = field(default_factory=dict)
    structure: dict[str, Any] | None = None  # the model's structure, for a method that trains one
    fsdp_structure: dict[str, Any] | None = None  # under FSDP2 (SMET's sparse layers are not sharded)
    fsdp_steps: int = 20
    # Largest relative difference (float64) between two FSDP2 processes and one: a correct sharded
    # method agrees to ~1e-15 here (summation order alone); a missing all-reduce shows as ~1e-2.
    fsdp_tolerance: float = 1e-10


# The paper's lr 1e-3 for the SCALE family: at 1e-2 the tiny model's training turns chaotic within
# 20 steps and normalization amplifies the rounding of cancelling q/k gradients (one process with the
# batch split in two accumulated halves drifts by 1e-5 from the unsplit batch).
_SCALE = dict(lr=1e-3)
# Rank 8 < TINY's 64-wide matrices; a refresh every 4 steps happens inside every test's run.
_PROJECTED = dict(rank=8, update_proj_gap=4)
CONTRACTS: dict[str, Contract] = {
    "adamw": Contract(dict(lr=1e-3)),
    "scale": Contract(_SCALE),  # the embedding's column RMS all-reduced across shards
    "sgd": Contract(dict(lr=1e-2)),  # plain SGD: no normalization to amplify rounding
    "sgd-column": Contract(_SCALE),
    "sgd-row": Contract(dict(_SCALE, momentum_on="embedding+head")),  # every Linear's RMS all-reduced
    "sgd-sign": Contract(_SCALE),
    "sgd-singular": Contract(_SCALE),  # whole matrices gathered for Newton-Schulz
    # Newton-Schulz in float64, so that bf16 rounding does not hide (or fake) a sharding error.
    "muon": Contract(dict(lr=0.02, adam_lr=1e-2, weight_decay=0.01, ns_dtype="float64"), fsdp_steps=10),
    "muon-all": Contract(dict(lr=0.02, adam_lr=1e-2, ns_dtype="float64"), fsdp_steps=10),
    # Batched low-rank Adam (the default off the CPU) under FSDP2 too; the others step per matrix here.
    "galore": Contract(dict(_PROJECTED, weight_decay=0.01, batch_elements=2**22), fsdp_steps=30),
    "fira": Contract(dict(_PROJECTED, stagger=True), fsdp_steps=30),
    "apollo": Contract(_PROJECTED, fsdp_steps=30),
    # lr 1e-3: at APOLLO-Mini's lr 0.01 with scale 128 the tiny random-token model is chaotic (a 1e-15
    # difference between one process and two grows ~4x per step), which no implementation could pass.
    "apollo-mini": Contract(dict(update_proj_gap=4, lr=1e-3, weight_decay=0.01, stagger=True), fsdp_steps=30),
    "adam-mini": Contract(dict(lr=1e-2, weight_decay=0.01), fsdp_steps=10),
    # ~1e-12, not 1e-15: the first Adam steps after each reset magnify fp64 rounding.
    "stable-spam": Contract(dict(lr=1e-2, update_gap=4, total_T=8, weight_decay=0.01), fsdp_steps=10,
                            fsdp_tolerance=1e-8),
    # SMET trains sparse layers (its dense parameters get AdamW); they are not sharded, so under FSDP2
    # it runs on the dense model.
    "smet": Contract(dict(lr=1e-3, warmup=2), structure={"name": "sparse", "density": 0.5, "block": 4, "storage": "compact"}),
}
DEFAULT = Contract()
NAMES = lowmem.optim.available()


def contract(name: str) -> Contract:
    return CONTRACTS.get(name, DEFAULT)


def _built(name: str, dtype: torch.dtype = torch.float32, **hparams: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    case = contract(name)
    torch.manual_seed(0)
    model = build_model(TINY, structure=case.structure).to(dtype)
    return model, build_optimizer(name, model, hparams={**case.hparams, **hparams})


def _without_params(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in groups]


def _saved_and_loaded(value: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("name", NAMES)
def test_a_negative_lr_is_refused_at_construction_and_by_add_param_group(name):
    """The one validation hook (LowmemOptimizer._check_group) sees every group, however it arrives."""
    with pytest.raises(ConfigError, match=rf"optimizer {name!r} refused its settings.*invalid lr: -1\.0"):
        _built(name, lr=-1.0)
    _, optimizer = _built(name)
    groups = len(optimizer.param_groups)
    late = {"params": [torch.nn.Parameter(torch.zeros(8, 8))], "role": "hidden", "lr": -1.0}
    with pytest.raises(ValueError, match=r"invalid lr: -1\.0"):
        optimizer.add_param_group(late)
    assert len(optimizer.param_groups) == groups  # the refused group did not join


# ---------------------------------------------------------------------------------------------- state

@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_state_dict_loads_with_weights_only(name):
    model, optimizer = _built(name)
    train_steps(model, optimizer, 3)
    state = optimizer.state_dict()
    assert state["state"], "three steps left no state to check"
    loaded = _saved_and_loaded(state)
    assert _without_params(loaded["param_groups"]) == _without_params(state["param_groups"])
    assert loaded["state"].keys() == state["state"].keys()
    for index, entries in state["state"].items():
        assert loaded["state"][index].keys() == entries.keys()
        for key, value in entries.items():
            same = torch.equal(loaded["state"][index][key], value) if torch.is_tensor(value) else loaded["state"][index][key] == value
            assert same, (index, key)


@pytest.mark.parametrize("name", NAMES)
def test_a_loaded_state_resumes_bitwise(name):
    """Save after 5 steps, load (weights_only) into a fresh model and optimizer built with another lr,
    train both 7 more steps (past a projection refresh, a reset, ...): the same weights, bit for bit,
    and the checkpoint's group settings, not the new lr."""
    model, optimizer = _built(name)
    train_steps(model, optimizer, 5, lr_schedule=False)
    checkpoint = _saved_and_loaded({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    resumed_model, resumed = _built(name, **({"lr": 0.5} if "lr" in lowmem.optim.method(name).hyperparameters() else {}))
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert _without_params(resumed.param_groups) == _without_params(optimizer.param_groups)
    train_steps(model, optimizer, 7, lr_schedule=False)
    train_steps(resumed_model, resumed, 7, lr_schedule=False)
    for (key, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", NAMES)
def test_a_step_on_the_meta_device_creates_state_there(name):
    """What the memory estimate relies on: `step()` runs on a model built on the meta device."""
    case = contract(name)
    model = build_model(TINY, structure=case.structure, device="meta")
    optimizer = build_optimizer(name, model, hparams=case.hparams)
    for _ in range(2):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.empty_like(p)
        optimizer.step()
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    assert tensors, "two steps on meta created no state"
    # Per-tensor step counters are CPU scalars by convention; every other state tensor is on meta.
    assert all(t.device.type == "meta" or t.dim() == 0 for t in tensors)


# ---------------------------------------------------------------------------------------------- FSDP2

def _fsdp_case(name: str) -> dict[str, Any]:
    case = contract(name)
    return dict(name=name, hparams=case.hparams, steps=case.fsdp_steps, structure=case.fsdp_structure)


@pytest.fixture(scope="module")
def fsdp_runs(request) -> dict[str, tuple[dict, dict]]:
    """(one process, two FSDP2 processes) for every name whose FSDP2 test is selected, the sharded runs
    in a single pair of processes: starting them costs seconds, the runs take little."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_two_fsdp2_processes_match_one"
                and item.module is request.module]
    results = fsdp_matches_single_many([_fsdp_case(name) for name in selected], plugins=PLUGINS)
    return dict(zip(selected, results))


@pytest.mark.distributed
@pytest.mark.parametrize("name", NAMES)
def test_two_fsdp2_processes_match_one(name, fsdp_runs):
    single, sharded = fsdp_runs[name]
    assert max_relative_difference(single, sharded) <= contract(name).fsdp_tolerance
    torch.manual_seed(0)
    initial = _full_state(build_model(TINY, structure=contract(name).fsdp_structure).double())
    assert max_relative_difference(single, initial) > 1e-2  # the comparison is not of untouched weights


# ---------------------------------------------------------------------------------------------- the bench

@pytest.mark.parametrize("name", NAMES)
def test_a_bench_grid_plans_and_configures_it(name, tmp_path):
    from lowmem.assembly import assemble
    from lowmem.bench.run import load_grid
    from lowmem.config import RunConfig

    case = contract(name)
    method = {"optimizer": name, "lr": [1e-3], "hparams": {k: v for k, v in case.hparams.items() if k != "lr"}}
    if case.structure:
        method["structure"] = case.structure
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": {"model": "cpu-micro", "data": {"seq_len": 32}, "train": {"steps": 2}},
                                         "methods": {"only": method}}))
    grid = load_grid(grid_file, tmp_path / "runs")
    assert [(run.method, run.optimizer, run.lr) for run in grid] == [("only", name, 1e-3)]
    run = assemble(RunConfig.from_dict(grid[0].config), vocab_size=64, device="meta")
    assert type(run.optimizer) is lowmem.optim.method(name).load()
