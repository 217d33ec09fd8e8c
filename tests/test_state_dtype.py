"""Optimizer state comes back from `load_state_dict` with the dtype it was saved with (and, for integer
tensors, the values): lowmem.optim.base.LowmemOptimizer's one rule for every method.

torch.optim.Optimizer.load_state_dict casts every state tensor but `step` to its parameter's dtype. In
a bf16-pure run that made Stable-SPAM's float32 global step a bf16 number, which stops counting at
256 (256 + 1 rounds to 256), so its momentum resets and beta1 decay stopped after a resume; and
SMET's int32 per-block steps bf16 numbers (257 comes back as 256). Device placement stays torch's.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from test_optimizer_contract import NAMES, contract
from torch import nn

from lowmem.assembly import build_model, build_optimizer
from lowmem.optim.stable_spam import StableSPAM
from lowmem.testing import TINY, train_steps


def _saved_and_loaded(value: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _state_tensors(optimizer: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    """(parameter index, key) -> state tensor, the indices of `optimizer.state_dict()`."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {(i, key): value for i, p in enumerate(params) for key, value in optimizer.state.get(p, {}).items()
            if torch.is_tensor(value)}


# ---------------------------------------------------------------------------------------- Stable-SPAM

def _stable_spam_layer(seed: int = 0) -> tuple[nn.Linear, StableSPAM]:
    torch.manual_seed(seed)
    layer = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    # update_gap 258: the first momentum reset falls on the second step after the resume below.
    return layer, StableSPAM(layer.parameters(), lr=1e-3, weight_decay=0.01, update_gap=258, total_T=400)


def _step(layer: nn.Linear, optimizer: torch.optim.Optimizer, t: int) -> None:
    layer.weight.grad = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16)
    optimizer.step()


def test_stable_spam_counts_on_past_256_after_a_bf16_resume_and_resets_on_schedule():
    """The reproduction of issue 23: 257 steps of a bf16 layer, saved, loaded into a fresh optimizer: the
    global step counts 258, 259 (float32, as saved), the reset due at 258 happens, and the resumed
    run equals the uninterrupted one bit for bit (the float32 clipping and norm EMAs kept too)."""
    layer, optimizer = _stable_spam_layer()
    for t in range(1, 258):
        _step(layer, optimizer, t)
    saved = _saved_and_loaded({"model": layer.state_dict(), "optimizer": optimizer.state_dict()})
    assert saved["optimizer"]["state"][0]["global_step"].item() == 257

    resumed_layer, resumed = _stable_spam_layer(seed=1)
    resumed_layer.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])
    for key, value in saved["optimizer"]["state"][0].items():
        assert resumed.state[resumed_layer.weight][key].dtype == value.dtype, key
    for t in (258, 259):
        _step(layer, optimizer, t)
        _step(resumed_layer, resumed, t)
    state = resumed.state[resumed_layer.weight]
    assert state["global_step"].item() == 259 and state["global_step"].dtype == torch.float32
    assert state["step"].item() == 2  # reset at global step 258 (k = 1), then one step more
    assert torch.equal(resumed_layer.weight, layer.weight)


# ---------------------------------------------------------------------------------------- SMET

@pytest.mark.parametrize("storage", ["dense", "compact"])
def test_smet_block_steps_stay_int32_with_their_values_across_a_bf16_load(storage):
    torch.manual_seed(0)
    structure = {"name": "sparse", "density": 0.5, "block": 4, "storage": storage}
    model = build_model(TINY, structure=structure, dtype=torch.bfloat16)
    optimizer = build_optimizer("smet", model, hparams={"lr": 1e-3, "warmup": 2})
    train_steps(model, optimizer, 2)
    block_steps = {key: t for key, t in _state_tensors(optimizer).items() if key[1] == "block_step"}
    assert block_steps, "two steps left no per-block step to check"
    for t in block_steps.values():  # as a long run has them: counts bf16 cannot hold (257 -> 256)
        t.copy_(torch.arange(257, 257 + t.numel(), dtype=torch.int32))
    saved = _saved_and_loaded(optimizer.state_dict())

    torch.manual_seed(0)
    fresh = build_model(TINY, structure=structure, dtype=torch.bfloat16)
    resumed = build_optimizer("smet", fresh, hparams={"lr": 1e-3, "warmup": 2})
    resumed.load_state_dict(saved)
    loaded = _state_tensors(resumed)
    for key, before in block_steps.items():
        assert loaded[key].dtype == torch.int32, key
        assert torch.equal(loaded[key], before), key
    train_steps(fresh, resumed, 1)  # the int32 counters step on from their saved values
    stepped = _state_tensors(resumed)
    for key, before in block_steps.items():
        assert stepped[key].dtype == torch.int32, key
        assert bool((stepped[key] >= before).all()) and bool((stepped[key] > before).any()), key


# ---------------------------------------------------------------------------------------- every method

@pytest.mark.parametrize("name", NAMES)
def test_a_bf16_load_gives_back_every_state_tensor_as_saved(name):
    """Whatever a method keeps in float32 or as integers beside bf16 weights comes back unchanged."""
    case = contract(name)
    torch.manual_seed(0)
    model = build_model(TINY, structure=case.structure, dtype=torch.bfloat16)
    optimizer = build_optimizer(name, model, hparams=case.hparams)
    train_steps(model, optimizer, 3)
    saved = _saved_and_loaded(optimizer.state_dict())
    before = _state_tensors(optimizer)
    assert before, "three steps left no state to check"

    torch.manual_seed(0)
    fresh = build_model(TINY, structure=case.structure, dtype=torch.bfloat16)
    resumed = build_optimizer(name, fresh, hparams=case.hparams)
    resumed.load_state_dict(saved)
    after = _state_tensors(resumed)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key


def test_devices_stay_torchs_only_the_dtype_is_restored():
    """A state saved on the CPU and loaded for parameters on the meta device goes where torch puts it
    (the parameter's device; `step` stays where it was) with its saved dtype."""
    layer, optimizer = _stable_spam_layer()
    _step(layer, optimizer, 1)
    saved = _saved_and_loaded(optimizer.state_dict())
    meta_layer = nn.Linear(16, 8, bias=False, device="meta", dtype=torch.bfloat16)
    resumed = StableSPAM(meta_layer.parameters(), update_gap=258)
    resumed.load_state_dict(saved)
    state = resumed.state[meta_layer.weight]
    for key, value in saved["state"][0].items():
        assert state[key].dtype == value.dtype, key
        assert state[key].device.type == ("cpu" if key == "step" else "meta"), key
