"""8-bit optimizer states (issue 26, lowmem.optim.quantized_state) beyond AdamW: SCALE (and its SGD
family), Muon, Adam-mini and Stable-SPAM take `state_bits=8` and `stochastic_rounding` as AdamW does
(tests/test_quantized_state.py, whose tests these mirror).

- Quantized, for every matrix of >= 4096 elements: SCALE's and Muon's momentum (`momentum_buffer`, with
  a float32 `step` that seeds stochastic rounding), Adam-mini's `exp_avg`, Stable-SPAM's `exp_avg` and
  `exp_avg_sq`, and the Adam moments of the tensors SCALE and Muon leave to Adam; vectors, Adam-mini's
  per-block second moment and Stable-SPAM's scalars stay full precision.
- 20 steps with 8-bit states stay within a measured bound of full precision (the first step bitwise);
  the state is plain codes and scales that load with weights_only and train on bitwise; the update
  inside backward is bitwise the update after it; the memory estimate counts the state to the byte;
  resets (the contract's, the intervention's, Stable-SPAM's own) zero the quantized moments.
- Slow, distributed: 8-bit states saved by 2 FSDP2 processes resume at 1 and 3.
"""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch

import lowmem.optim
import lowmem.optim.quantized_state as qs
from lowmem.errors import ConfigError
from lowmem.models.llama import Llama
from lowmem.optim.state import reset_state
from lowmem.testing import TINY, train_steps

# Each method's hyperparameters for these tests (tests/test_optimizer_contract.py's, except where said):
# Muon's Newton-Schulz in fp32 (bf16's own rounding would blur the comparison); Adam-mini and Stable-SPAM
# at lr 1e-3, where the tiny random-token model is not chaotic (at 1e-2 a 1e-6 relative change of the
# initial weights already moves the weights after 20 steps by 0.6% (Adam-mini) and 8% (Stable-SPAM) of
# how far they moved); Stable-SPAM resets every 7 steps, twice in 20.
CASES = {
    "scale": ("scale", dict(lr=1e-3)),
    "scale-all": ("scale", dict(lr=1e-3, momentum_on="all")),  # every matrix keeps a momentum
    "muon": ("muon", dict(lr=0.02, adam_lr=1e-2, ns_dtype="float32")),
    "muon-all": ("muon-all", dict(lr=0.02, adam_lr=1e-2, ns_dtype="float32")),
    "adam-mini": ("adam-mini", dict(lr=1e-3, weight_decay=0.01)),
    "stable-spam": ("stable-spam", dict(lr=1e-3, update_gap=7, total_T=20, weight_decay=0.01)),
}
METHODS = ["scale", "muon", "muon-all", "adam-mini", "stable-spam"]

# The quantized moments of a TINY matrix, by method and role (every TINY matrix has >= 4096 elements);
# None: the matrix keeps no state (SCALE's hidden matrices and embedding).
QUANTIZED = {
    "scale": {"hidden": None, "embedding": None, "head": ("momentum_buffer",)},
    "scale-all": dict.fromkeys(("hidden", "embedding", "head"), ("momentum_buffer",)),
    "muon": {"hidden": ("momentum_buffer",), "embedding": ("exp_avg", "exp_avg_sq"), "head": ("exp_avg", "exp_avg_sq")},
    "muon-all": dict.fromkeys(("hidden", "embedding", "head"), ("momentum_buffer",)),
    "adam-mini": dict.fromkeys(("hidden", "embedding", "head"), ("exp_avg",)),
    "stable-spam": dict.fromkeys(("hidden", "embedding", "head"), ("exp_avg", "exp_avg_sq")),
}
# Measured worst |8-bit - full precision| / |full precision - start| over TINY's weights after 20 steps
# (see the test); the bounds are about twice these.
BOUNDS = {"scale": 4e-2, "scale-all": 4e-2, "muon": 0.25, "muon-all": 0.25, "adam-mini": 4e-2, "stable-spam": 0.1}


def _built(case: str, **hparams) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    name, defaults = CASES[case]
    torch.manual_seed(0)
    model = Llama(TINY)
    return model, lowmem.optim.build(name, model, **{**defaults, **hparams})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _role(name: str) -> str:
    return {"embed_tokens.weight": "embedding", "lm_head.weight": "head"}.get(name, "hidden")


def _values(state: dict, key: str) -> torch.Tensor:
    return qs.dequantize_blockwise(state[key + "_codes"], state[key + "_absmax"], qs.map_for(key))


# ----------------------------------------------------------------------------------------- against fp32

@pytest.mark.parametrize("case", sorted(CASES))
def test_8bit_states_stay_within_a_measured_bound_of_full_precision_over_20_steps(case):
    """Every weight after 20 steps, |8-bit - full precision| relative to how far full precision moved it.

    The first step is bitwise full precision's (moments start at 0, which the codes hold exactly, and the
    update uses the fp32 moments before they are requantized). From then on each step's moments carry
    the 8-bit dynamic map's rounding: about 1% of a moment's Frobenius norm (each entry within half a
    map gap of its row block's absmax), which changes that step's update by about as much and, through
    the next gradients, every weight. Measured: SCALE 0.017 (head momentum; 0.021 with every matrix's),
    Adam-mini 0.017, Stable-SPAM 0.054 (a norm gain, in full precision, moved by the matrices' changes:
    it moves little). Muon 0.110 (both variants, at v_proj): Newton-Schulz maps every singular value of
    the momentum to about 1, so the rounding, small against the large singular values, is amplified in
    the directions of the small ones (layers.0 v_proj's momentum at step 3 spans 6e-5 to 1 of its largest:
    a 1% rounding of it changes NS's output by 12%; bf16 Newton-Schulz in place of fp32 moves the same
    weights by 1.4%)."""
    first_fp32, first_8bit = _built(case), _built(case, state_bits=8)
    start = _weights(first_fp32[0])
    train_steps(*first_fp32, steps=1)
    train_steps(*first_8bit, steps=1)
    one_fp32, one_8bit = _weights(first_fp32[0]), _weights(first_8bit[0])
    assert all(torch.equal(one_fp32[n], one_8bit[n]) for n in start), "the first step differs"

    full, full_optimizer = _built(case)
    quantized, quantized_optimizer = _built(case, state_bits=8)
    train_steps(full, full_optimizer, steps=20)
    train_steps(quantized, quantized_optimizer, steps=20)
    a, b = _weights(quantized), _weights(full)
    assert any(qs.is_quantized(state, key) for state in quantized_optimizer.state.values() for key in
               ("momentum_buffer", "exp_avg"))
    worst = max(((a[n] - b[n]).norm() / (b[n] - start[n]).norm()).item() for n in start)
    assert worst < BOUNDS[case], worst


# ------------------------------------------------------------------------------------------------- state

@pytest.mark.parametrize("case", sorted(CASES))
def test_state_is_plain_codes_and_scales_that_load_with_weights_only_and_continue_the_same(case):
    model, optimizer = _built(case, state_bits=8, stochastic_rounding=True)
    train_steps(model, optimizer, steps=3)
    params = dict(model.named_parameters())
    for name, param in params.items():
        state = optimizer.state.get(param, {})
        codes = {key.removesuffix("_codes") for key in state if key.endswith("_codes")}
        if param.dim() < 2:  # a vector: full precision
            assert not codes and not any(key.endswith("_absmax") for key in state), name
            continue
        expected = QUANTIZED[case][_role(name)]
        assert codes == set(expected or ()), name
        for key in codes:
            assert key not in state and qs.quantizes(param.shape, 8)
            assert state[key + "_codes"].dtype == torch.uint8 and state[key + "_codes"].shape == param.shape
            absmax = state[key + "_absmax"]
            assert absmax.dtype == torch.float32 and absmax.shape == (param.shape[0], qs.blocks_per_row(param.shape))
            assert absmax.max() > 0  # trained: not the zero state
        if "momentum_buffer" in codes:  # its count of updates seeds stochastic rounding
            assert state["step"] == 3

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_optimizer = _built(case, state_bits=8, stochastic_rounding=True)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train_steps(model, optimizer, steps=3)
    train_steps(resumed, resumed_optimizer, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(resumed).values()))


@pytest.mark.parametrize("name", METHODS)
def test_state_bits_accepts_8_and_full_precision_only(name):
    torch.manual_seed(0)
    model = Llama(TINY)
    for bits in (None, 32, 8):
        lowmem.optim.build(name, model, state_bits=bits)
    for bad in (4, 16, "8", 8.0, True):
        with pytest.raises(ConfigError, match="state_bits"):
            lowmem.optim.build(name, model, state_bits=bad)
    with pytest.raises(ConfigError, match="stochastic_rounding"):
        lowmem.optim.build(name, model, state_bits=8, stochastic_rounding="yes")


# ------------------------------------------------------------------------------- the rest of the contract

@pytest.mark.parametrize("name", METHODS)
def test_the_update_inside_backward_is_bitwise_the_update_after_it(name, monkeypatch):
    """With stochastic rounding: each parameter's draws are seeded by its position and its own count."""
    import test_gradient_release

    base = test_gradient_release.contract(name)
    case = dataclasses.replace(base, hparams={**base.hparams, "state_bits": 8, "stochastic_rounding": True})
    monkeypatch.setattr(test_gradient_release, "contract", lambda _: case)
    test_gradient_release._assert_same_training(name)


@pytest.mark.parametrize("name", METHODS)
def test_the_memory_estimate_counts_codes_and_scales_to_the_byte(name):
    """cpu-tiny (vocab 320), fp32: the estimate's meta step builds the same state as a real 2-step run.
    Seen: SCALE 47,384 bytes (168,980 in full precision), Muon 587,348 (2,266,140), Muon-all 502,868
    (1,938,452), Adam-mini 511,656 (1,947,304), Stable-SPAM 1,000,868 (3,872,164)."""
    from lowmem.assembly import build_model
    from lowmem.memory.estimate import estimate_memory
    from lowmem.memory.measure import optimizer_state_bytes

    est = estimate_memory("cpu-tiny", name, {"state_bits": 8}, vocab_size=320, precision="fp32")
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=320)
    optimizer = lowmem.optim.build(name, model, state_bits=8)
    train_steps(model, optimizer, steps=2, batch=4, seq=16)
    assert optimizer_state_bytes(optimizer) == est.optimizer_states
    assert any(qs.is_quantized(state, key) for state in optimizer.state.values() for key in ("momentum_buffer", "exp_avg"))
    full = estimate_memory("cpu-tiny", name, {}, vocab_size=320, precision="fp32").optimizer_states
    assert est.optimizer_states < 0.3 * full  # 1 + 4/128 (or 8/352) bytes per quantized element instead of 4


@pytest.mark.parametrize("case", ["scale-all", "muon", "adam-mini", "stable-spam"])
def test_a_momentum_reset_zeroes_quantized_moments_whole_or_by_entries(case):
    from lowmem.optim.reset import reset_moments

    model, optimizer = _built(case, state_bits=8)
    train_steps(model, optimizer, steps=2)
    weight = model.layers[0].mlp.up_proj.weight
    state = optimizer.state[weight]
    keys = [key for key in ("momentum_buffer", "exp_avg", "exp_avg_sq") if qs.is_quantized(state, key)]
    assert keys
    if case != "adam-mini":  # whose per-block exp_avg_sq has no entries to reset (refused, as in full precision)
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[:10] = True
        kept = {key: _values(state, key)[~mask] for key in keys}
        assert reset_state(optimizer, masks={weight: mask}) == 1
        for key in keys:
            assert torch.all(_values(state, key)[mask] == 0)
            assert torch.allclose(_values(state, key)[~mask], kept[key], rtol=0.05, atol=1e-3 * kept[key].abs().max())
        assert state["step"] == 2  # a masked reset keeps the tensor's counter

    reset_moments(optimizer)  # the intervention: every parameter, whole
    for param_state in optimizer.state.values():
        assert param_state["step"] == 0
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if qs.is_quantized(param_state, key):
                assert torch.all(_values(param_state, key) == 0)
            elif key in param_state and param_state[key].dim() > 0:
                assert torch.all(param_state[key] == 0)
    train_steps(model, optimizer, steps=1)  # and it trains on
    assert state["step"] == 1 and _values(state, keys[0]).abs().max() > 0


def test_stable_spams_periodic_reset_zeroes_its_8bit_moments():
    """Step 3 of update_gap 3 resets the moments before its update: whatever the 8-bit moments held, the
    step gives the same weights and moments; step 2, no reset, does not."""
    def scrambled_twin(model, optimizer):
        twin, twin_optimizer = _built("stable-spam", state_bits=8, update_gap=3)
        twin.load_state_dict(model.state_dict())
        twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for state in twin_optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if qs.is_quantized(state, key):
                    state[key + "_codes"].copy_(torch.randint_like(state[key + "_codes"], 256))
                    state[key + "_absmax"].add_(1.0)
        return twin, twin_optimizer

    def one_step(model, optimizer, step):
        torch.manual_seed(step)
        tokens = torch.randint(0, TINY.vocab_size, (8, 17))
        (model(tokens[:, :-1], labels=tokens[:, 1:]) / (8 * 16)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model, optimizer = _built("stable-spam", state_bits=8, update_gap=3)
    one_step(model, optimizer, 0)
    twin, twin_optimizer = scrambled_twin(model, optimizer)
    one_step(model, optimizer, 1)
    one_step(twin, twin_optimizer, 1)
    assert not torch.equal(model.layers[0].mlp.up_proj.weight, twin.layers[0].mlp.up_proj.weight)

    twin, twin_optimizer = scrambled_twin(model, optimizer)
    one_step(model, optimizer, 2)  # global step 3: a reset
    one_step(twin, twin_optimizer, 2)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(twin).values()))
    for param, twin_param in zip(model.parameters(), twin.parameters()):
        state, twin_state = optimizer.state[param], twin_optimizer.state[twin_param]
        assert state["step"] == 1
        assert all(torch.equal(state[key], twin_state[key]) for key in state)


# ------------------------------------------------------------------------------------------- distributed

@pytest.mark.distributed
def test_two_fsdp2_processes_with_8bit_states_train_as_one():
    """float64, 6 steps, every matrix quantized (the decision is from the global shape): the momentum's
    DTensor-shaped fp32 values go through each method's sharded path as a full-precision momentum does:
    the embedding's column norm all-reduced (momentum_on=all), SCALE's singular normalization and Muon's
    Newton-Schulz gathered, Adam-mini's block sums and Stable-SPAM's norms all-reduced. Each rank
    quantizes its own rows, the same blocks as one process's. Measured: at most 3.8e-15 (Stable-SPAM),
    fp64 summation order; a sharding error, or one code rounded otherwise, would show as ~1e-3."""
    from lowmem.testing import fsdp_matches_single_many, max_relative_difference

    common = {"state_bits": 8}  # nearest rounding: stochastic draws are each rank's own, not one process's
    cases = [
        dict(name="scale", hparams={"lr": 1e-3, "momentum_on": "all", **common}, steps=6),
        dict(name="sgd-singular", hparams={"lr": 1e-3, "momentum_on": "all", "ns_steps": 5, **common}, steps=6),
        dict(name="muon-all", hparams={"lr": 0.02, "adam_lr": 1e-2, "ns_dtype": "float64", **common}, steps=6),
        dict(name="muon", hparams={"lr": 0.02, "adam_lr": 1e-2, "ns_dtype": "float64", **common}, steps=6),
        dict(name="adam-mini", hparams={"lr": 1e-3, **common}, steps=6),
        dict(name="stable-spam", hparams={"lr": 1e-3, "update_gap": 4, **common}, steps=6),
    ]
    for case, (single, sharded) in zip(cases, fsdp_matches_single_many(cases)):
        assert max_relative_difference(single, sharded) < 1e-10, case["name"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", METHODS)
def test_8bit_states_saved_by_2_fsdp2_processes_resume_at_1_and_3(name, tiny_corpus, token_cache, tmp_path):
    """Codes and scales are DTensors with their parameter's placements; DCP reads each rank's rows of
    them at another world size (SCALE's head normalization and Muon's Newton-Schulz work on the fp32
    values of this rank's rows, gathered or all-reduced as in full precision). The hyperparameters are
    test_dcp's (Muon's Newton-Schulz in fp32)."""
    from test_dcp import METHODS as DCP_METHODS
    from test_dcp import MORE_METHODS, assert_resumes_at

    hparams = {**{**DCP_METHODS, **MORE_METHODS}[name], "state_bits": 8}
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", name, hparams, (1, 3))
