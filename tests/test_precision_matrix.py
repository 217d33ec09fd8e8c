"""Every structure with every registered optimizer that trains its kinds, in every precision: two steps
of forward (under the precision's autocast), backward and update on a tiny model, with no dtype
error, a finite loss, and weights that moved.

The cells come from the registries (lowmem.registry.STRUCTURES, the optimizers of
tests/test_optimizer_contract.py's NAMES, plugins included, and lowmem.config.PRECISIONS); a new
structure or method joins with no edit here (a structure with a setting its tiny form needs gets a line
in STRUCTURE_SETTINGS). Each cell's id names it: structure-optimizer-precision.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_optimizer_contract import NAMES, contract

import lowmem.optim
from lowmem.assembly import autocast, build_model, build_optimizer, weight_dtype
from lowmem.config import PRECISIONS
from lowmem.registry import STRUCTURES
from lowmem.testing import TINY, _batch

# A structure's settings on TINY (64-wide matrices); a registered name not here runs with its defaults.
STRUCTURE_SETTINGS: dict[str, list[dict]] = {
    "lowrank": [{"rank": 8}],
    "lora": [{"rank": 8}],
    "sltrain": [{"rank": 8, "density": 0.1}],
    "sparse": [{"density": 0.5, "block": 4, "storage": "dense"}, {"density": 0.5, "block": 4, "storage": "compact"}],
}


def _structures() -> dict[str, dict | None]:
    """Cell name -> structure config (None: the dense model)."""
    out: dict[str, dict | None] = {"dense": None}
    for name in STRUCTURES.names():
        for settings in STRUCTURE_SETTINGS.get(name, [{}]):
            label = f"{name}-{settings['storage']}" if "storage" in settings else name
            out[label] = {"name": name, **settings}
    return out


def _trained_kinds(structure: dict | None) -> set[str]:
    model = build_model(TINY, structure=structure, device="meta")
    return {group.get("kind", "dense") for group in lowmem.optim.param_groups(model)}


STRUCTURE_CONFIGS = _structures()
CELLS = [
    pytest.param(label, name, precision, id=f"{label}-{name}-{precision}")
    for label, structure in STRUCTURE_CONFIGS.items()
    for name in NAMES
    if _trained_kinds(structure) <= set(lowmem.optim.method(name).kinds)
    for precision in PRECISIONS
]


def test_the_matrix_covers_every_structure_and_method():
    labels = {cell.values[0] for cell in CELLS}
    methods = {cell.values[1] for cell in CELLS}
    assert labels == set(STRUCTURE_CONFIGS) and {"sparse-dense", "sparse-compact"} <= labels
    assert methods == set(NAMES)


@pytest.mark.parametrize("label, name, precision", CELLS)
def test_two_steps_in_every_precision(label, name, precision):
    torch.manual_seed(0)
    model = build_model(TINY, structure=STRUCTURE_CONFIGS[label], dtype=weight_dtype(precision))
    optimizer = build_optimizer(name, model, hparams=contract(name).hparams)
    trained = {key: p.detach().clone() for key, p in model.named_parameters() if p.requires_grad}
    for step in range(2):  # the second step runs on the state the first one made
        tokens = _batch(step, 4, 16, TINY.vocab_size)
        with autocast(precision, "cpu"):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]) / tokens[:, 1:].numel()
        assert math.isfinite(loss.item()), f"step {step + 1}: loss {loss.item()}"
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    assert all(params[key].dtype == before.dtype for key, before in trained.items())
    # Matrices only: a bf16 norm weight of 1.0 has a spacing of 2^-7 there, more than a step of lr 1e-3.
    matrices = {key for key, before in trained.items() if before.dim() >= 2}
    moved = {key for key in matrices if not torch.equal(params[key].detach(), trained[key])}
    if precision == "bf16-pure":
        # bf16 weights drop an update under half their spacing (2^-9 to 2^-8 of the weight): SGD's second update of
        # LoRA's A (its gradient goes through B, which one step of lr 1e-2 moved from 0 to ~1e-5) is
        # ~1e-8 relative in fp32, and nothing in bf16. Most matrices move.
        assert len(moved) > len(matrices) / 2, sorted(matrices - moved)
    else:
        assert moved == matrices, sorted(matrices - moved)
