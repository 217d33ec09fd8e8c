"""8-bit optimizer states (issue 26, lowmem.optim.quantized_state) for the projection methods (GaLore,
Fira, APOLLO, APOLLO-Mini: their r-side moments and the AdamW moments of the parameters they leave to
Adam) and SMET (the compact moments of the active weights, and AdamW's of the dense parameters); the
AdamW tests in tests/test_quantized_state.py, mirrored.

On cpu-tiny at rank 32 every projected moment quantizes: right projections' [rows, 32] (q, k, v, o:
[128, 32]; gate, up: [352, 32]; one block per row) and left projections' [32, 352] (down; two blocks
per row); SMET's compact moments (k*B = 8192 or 22528 active entries) as one row each. APOLLO-Mini's
rank-1 moments stay in full precision at these sizes ([rows, 1]: rows of one element never quantize;
[1, cols] below 4096 elements), so its case checks the parameters it leaves to AdamW.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest
import torch

import lowmem.optim.quantized_state as qs
from lowmem.assembly import build_model, build_optimizer
from lowmem.errors import ConfigError
from lowmem.interventions import RunContext
from lowmem.optim import projection
from lowmem.optim.state import reset_state
from lowmem.structure.sparse import TopologyUpdate, sparse_layers
from lowmem.testing import train_steps

SPARSE = {"name": "sparse", "density": 0.5, "block": 4, "storage": "compact"}
# Rank 32 < cpu-tiny's 128-wide matrices, large enough for every moment to reach 4096 elements; a
# refresh every 4 steps; lr 1e-3 (at the methods' 0.01 the tiny random-token model is chaotic: a 1e-4
# change of the lr moves GaLore's weights by as much as they moved).
PROJECTED = dict(rank=32, update_proj_gap=4, lr=1e-3)
HPARAMS: dict[str, dict[str, Any]] = {
    "galore": PROJECTED, "fira": PROJECTED, "apollo": PROJECTED,
    "apollo-mini": dict(update_proj_gap=4, lr=1e-3),
    "smet": dict(lr=1e-3, warmup=3),
}
METHODS = sorted(HPARAMS)
PROJECTION_METHODS = [name for name in METHODS if name != "smet"]


def _structure(name: str) -> dict[str, Any] | None:
    return SPARSE if name == "smet" else None


def _built(name: str, seed: int = 0, **hparams: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = build_model("cpu-tiny", vocab_size=320, structure=_structure(name))
    return model, build_optimizer(name, model, hparams={**HPARAMS[name], **hparams})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _canonical_svd(matrix: torch.Tensor, rank: int, side: str, _svd=projection.svd_projection) -> torch.Tensor:
    """tests/test_dcp.py's canonical SVD signs (each basis vector's largest entry made positive): an fp32
    SVD's signs flip at rounding level, and a flipped vector meets its unrotated moments with the other
    sign, so without it a 1e-4 change of the lr moves GaLore's weights as far as they moved."""
    basis = _svd(matrix, rank, side)
    vectors = basis if side == "right" else basis.T
    pivot = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    vectors.mul_(torch.where(pivot < 0, -1.0, 1.0).to(vectors.dtype))
    return basis


@pytest.fixture
def canonical_svd_signs(monkeypatch):
    monkeypatch.setattr(projection, "svd_projection", _canonical_svd)


def _moment(state: dict[str, Any], key: str) -> torch.Tensor:
    return qs.dequantize_blockwise(state[key + "_codes"], state[key + "_absmax"], qs.map_for(key))


def _quantized_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for p, state in optimizer.state.items() if qs.is_quantized(state, "exp_avg")]


# --------------------------------------------------------------------------------- against full precision

# Every weight after 20 steps, |8-bit - fp32| / |fp32 - start| (nearest rounding), the worst per method,
# measured 2026-12-03; in brackets the same for an fp32 run with a 1% larger lr (a control: how far this
# run goes for a perturbation of that size): galore 0.224 (0.237), fira 0.102 (0.117), apollo 0.024
# (0.013), apollo-mini 0.023 (0.016), smet 0.032 (0.028); AdamW's own in test_quantized_state, 0.026.
# APOLLO, APOLLO-Mini and SMET are at AdamW's level. GaLore's and Fira's hidden matrices differ ~10x
# more, and so does their fp32 run with the lr 1% off: at each refresh the SVD basis of a gradient that
# differs by a percent turns within close singular values while the moments are not rotated (as
# released), so a percent-level difference at step 4 becomes a 10-20% one by step 20, whatever caused
# it. Stochastic rounding measured 0.281, 0.128, 0.029, 0.029, 0.032. Bounds: ~1.5x nearest's figures.
BOUNDS = {"galore": 0.35, "fira": 0.15, "apollo": 0.04, "apollo-mini": 0.04, "smet": 0.05}


@pytest.mark.parametrize("name", METHODS)
def test_8bit_states_follow_full_precision_over_20_steps(name, canonical_svd_signs):
    """Every parameter after 20 steps (refreshes at steps 5, 9, 13, 17) relative to how far the fp32 run
    moved it, within BOUNDS (measured above, with why)."""
    runs = {}
    for bits in (None, 8):
        model, optimizer = _built(name, state_bits=bits)
        start = _weights(model)
        train_steps(model, optimizer, steps=20, batch=4, seq=16)
        runs[bits] = _weights(model)
        if bits == 8:
            assert _quantized_params(optimizer)  # something was quantized
    worst = max(((runs[8][n] - runs[None][n]).norm() / (runs[None][n] - start[n]).norm()).item() for n in start)
    assert worst < BOUNDS[name]


# ------------------------------------------------------------------------------------------- the state

def _expected_layout(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The codes and scales of one hidden matrix's moments, as the module docstrings say."""
    layer = model.layers[0].mlp
    if name == "smet":
        param = sparse_layers(model)[0].sparse_param
        k_b = param.numel()
        codes, scales = (1, k_b), (1, -(-k_b // qs.BLOCK))
    elif name == "apollo-mini":
        param = model.embed_tokens.weight  # left to AdamW: codes shaped like it
        codes, scales = tuple(param.shape), (param.shape[0], 1)
    else:
        right = optimizer.state[layer.up_proj.weight]
        assert right["exp_avg_codes"].shape == (352, 32) and right["exp_avg_absmax"].shape == (352, 1)
        param = layer.down_proj.weight
        codes, scales = (32, 352), (32, 2)
    state = optimizer.state[param]
    for key in ("exp_avg", "exp_avg_sq"):
        assert key not in state
        assert state[key + "_codes"].dtype == torch.uint8 and tuple(state[key + "_codes"].shape) == codes
        assert state[key + "_absmax"].dtype == torch.float32 and tuple(state[key + "_absmax"].shape) == scales
    assert set(optimizer.state[model.norm.weight]) == {"step", "exp_avg", "exp_avg_sq"}  # a vector: fp32


@pytest.mark.parametrize("name", METHODS)
def test_state_is_plain_codes_and_scales_that_load_with_weights_only_and_continue_the_same(name):
    model, optimizer = _built(name, state_bits=8)
    train_steps(model, optimizer, steps=3, batch=4, seq=16, lr_schedule=False)
    _expected_layout(name, model, optimizer)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_optimizer = _built(name, seed=1, state_bits=8)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert len(_quantized_params(resumed_optimizer)) == len(_quantized_params(optimizer))
    for run, opt in ((model, optimizer), (resumed, resumed_optimizer)):  # across a refresh (step 5)
        train_steps(run, opt, steps=3, batch=4, seq=16, lr_schedule=False)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(resumed).values()))


def test_state_bits_and_stochastic_rounding_are_validated():
    model = build_model("cpu-tiny", vocab_size=320)
    sparse = build_model("cpu-micro", vocab_size=64, structure=SPARSE)
    for name in METHODS:
        target = sparse if name == "smet" else model
        for bits in (None, 32, 8):
            build_optimizer(name, target, hparams={**HPARAMS[name], "state_bits": bits})
        for bad in (4, 16, "8", 8.0, True):
            with pytest.raises(ConfigError, match="state_bits"):
                build_optimizer(name, target, hparams={**HPARAMS[name], "state_bits": bad})
        with pytest.raises(ConfigError, match="stochastic_rounding"):
            build_optimizer(name, target, hparams={**HPARAMS[name], "state_bits": 8, "stochastic_rounding": "yes"})


def test_which_state_tensors_quantize():
    assert qs.quantizes_state((128, 32), 8) and qs.quantizes_state((32, 352), 8) and qs.quantizes_state((1, 8192), 8)
    assert not qs.quantizes_state((127, 32), 8)  # below 4096 elements
    assert not qs.quantizes_state((11008, 1), 8)  # rows of one element: 5 bytes each instead of 4
    assert qs.quantizes_state((2048, 2), 8) and qs.quantizes_state((1, 11008), 8)  # APOLLO-Mini at 7B: left
    assert not qs.quantizes_state((128, 32), None) and not qs.quantizes_state((128, 32), 32)


# ------------------------------------------------------------------------------- the rest of the contract

@pytest.mark.parametrize("name", METHODS)
def test_the_update_inside_backward_is_bitwise_the_update_after_it(name, monkeypatch):
    """On lowmem.testing.TINY (width 64): rank 32 quantizes the MLP's moments ([160, 32], [32, 160]) and
    leaves the attention's ([64, 32]) in fp32; SMET's MLP layers quantize. Stochastic rounding, whose
    draws are seeded by each parameter's position and step, whatever order the updates run in."""
    import test_gradient_release

    hparams = {**HPARAMS[name], "state_bits": 8, "stochastic_rounding": True}
    case = dataclasses.replace(test_gradient_release.contract(name), hparams=hparams)
    monkeypatch.setattr(test_gradient_release, "contract", lambda _: case)
    test_gradient_release._assert_same_training(name)


def _moment_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes of the codes and scales, those bytes as the moments' shapes say they are)."""
    held = expected = 0
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if qs.is_quantized(state, key):
                codes = state[key + "_codes"]
                held += codes.numel() + 4 * state[key + "_absmax"].numel()
                expected += codes.numel() + 4 * codes.shape[0] * qs.blocks_per_row(codes.shape)
    return held, expected


@pytest.mark.parametrize("name", METHODS)
def test_the_memory_estimate_counts_codes_and_scales_to_the_byte(name):
    from lowmem.memory.estimate import estimate_memory
    from lowmem.memory.measure import optimizer_state_bytes

    hparams = {**HPARAMS[name], "state_bits": 8}
    estimate = estimate_memory("cpu-tiny", name, hparams, vocab_size=320, precision="fp32",
                               structure=_structure(name)).optimizer_states
    model, optimizer = _built(name, state_bits=8)
    train_steps(model, optimizer, steps=2, batch=4, seq=16)
    assert optimizer_state_bytes(optimizer) == estimate
    held, expected = _moment_bytes(optimizer)
    assert held == expected > 0
    full = estimate_memory("cpu-tiny", name, {**hparams, "state_bits": None}, vocab_size=320, precision="fp32",
                           structure=_structure(name)).optimizer_states
    assert estimate < full


@pytest.mark.parametrize("name", PROJECTION_METHODS)
def test_a_momentum_reset_zeroes_quantized_projected_moments(name):
    from lowmem.optim.reset import reset_moments

    model, optimizer = _built(name, state_bits=8)
    train_steps(model, optimizer, steps=3, batch=4, seq=16)
    quantized = _quantized_params(optimizer)
    projected = [p for p in quantized if "projection" in optimizer.state[p]]
    weight = (projected or quantized)[0]  # APOLLO-Mini: its embedding (left to AdamW)
    assert any(_moment(optimizer.state[p], "exp_avg").abs().max() > 0 for p in quantized)
    if projected:  # refused as in full precision: a projected moment's entries are not the weight's
        with pytest.raises(ConfigError, match="not shaped like its parameter"):
            reset_state(optimizer, masks={weight: torch.ones_like(weight, dtype=torch.bool)})
    assert reset_state(optimizer, params=[weight]) == 1
    state = optimizer.state[weight]
    assert state["step"] == 0 and all(torch.all(_moment(state, key) == 0) for key in ("exp_avg", "exp_avg_sq"))
    assert reset_moments(optimizer) == len(optimizer.state)
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all((_moment(state, key) if qs.is_quantized(state, key) else state[key]) == 0)
    train_steps(model, optimizer, steps=1, batch=4, seq=16)  # and it trains on
    assert optimizer.state[weight]["step"] == 1 and _moment(optimizer.state[weight], "exp_avg").abs().max() > 0


def test_smets_topology_update_zeroes_the_regrown_blocks_8bit_moments_and_keeps_the_others():
    model, optimizer = _built("smet", state_bits=8)
    update = TopologyUpdate(every=3, drop=0.3, drop_end=0.3)
    update.setup(RunContext(total_steps=100))
    train_steps(model, optimizer, steps=3, batch=4, seq=16)
    layer = sparse_layers(model)[0]
    state = optimizer.state[layer.sparse_param]
    before = {key: _moment(state, key).view(-1, layer.block_size) for key in ("exp_avg", "exp_avg_sq")}
    slots_before = layer.block_index.clone()
    assert update.update(3, model, optimizer) > 0
    regrown = layer.block_index != slots_before  # a grown block takes a dropped block's slot
    assert regrown.any() and (~regrown).any()
    for key in ("exp_avg", "exp_avg_sq"):
        after = _moment(state, key).view(-1, layer.block_size)
        if key == "exp_avg":
            assert torch.all(after[regrown] == 0)
        else:  # the unsigned map has no zero: a block of 256 that keeps other entries gives its least value
            assert torch.all(after[regrown] <= qs.UNSIGNED_MAP[0] * state["exp_avg_sq_absmax"].max())
        kept = before[key][~regrown]
        # Requantized with the regrown entries at 0: a block's scale may shrink, so the kept entries
        # come back within a code gap of the coarser of the two grids (1.4% of the old block's absmax).
        assert torch.allclose(after[~regrown], kept, rtol=0.02, atol=0.015 * kept.abs().max().item())
    assert torch.all(state["block_step"][regrown] == 1) and torch.all(state["block_step"][~regrown] == 3)
    reset_state(optimizer)  # whole: every moment and step to 0
    assert all(torch.all(_moment(state, key) == 0) for key in ("exp_avg", "exp_avg_sq"))
    assert torch.all(state["block_step"] == 0) and state["step"] == 0
    train_steps(model, optimizer, steps=1, batch=4, seq=16)
    assert _moment(state, "exp_avg").abs().max() > 0


# -------------------------------------------------------------------------------------- distributed (slow)

# test_dcp.METHODS' cases at rank 32 (every moment quantized; the methods' lr, 0.01) with 8-bit states.
DISTRIBUTED = {name: {"rank": 32, "update_proj_gap": 3, "state_bits": 8} for name in ("galore", "fira", "apollo")}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(DISTRIBUTED))
def test_8bit_projected_states_saved_by_2_fsdp2_processes_resume_at_1_and_3(name, tiny_corpus, token_cache, tmp_path):
    """Right-side codes and scales are DTensors row-sharded like the parameter, left-side ones replicated:
    DCP reads each rank's rows at another world size; the losses after the resume are the 2-process
    run's within test_dcp.RELATIVE (the SVD's signs fixed for galore and fira, as test_dcp's cases)."""
    from test_dcp import _plugins, assert_resumes_at

    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", name, DISTRIBUTED[name], (1, 3),
                      plugins=_plugins(tmp_path, name))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(DISTRIBUTED))
def test_8bit_projected_states_saved_by_1_process_resume_under_fsdp2_at_2(name, tiny_corpus, token_cache, tmp_path):
    """Saved whole, codes and scales are placed as their moment by ProjectedAdam.whole_state_layout."""
    from test_dcp import _plugins, assert_resumes_at

    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", name, DISTRIBUTED[name], (2,),
                      plugins=_plugins(tmp_path, name), saved_at=1)


@pytest.mark.slow
@pytest.mark.distributed
def test_8bit_smet_states_saved_by_2_ddp_processes_resume_at_1(tiny_corpus, token_cache, tmp_path):
    """SMET's sparse layers train under DDP (FSDP2 refuses them): their one-row codes are whole on every
    rank, saved once, and resume at another world size as the compact vectors do; across topology updates."""
    from test_dcp import assert_resumes_at

    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "ddp", "smet", {"warmup": 3, "state_bits": 8}, (1,), **{
        "model": {"preset": "cpu-tiny", "structure": SPARSE},
        "optim.interventions": [{"name": "topology", "every": 3, "drop": 0.3}]})
