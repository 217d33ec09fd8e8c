"""Momentum reset: moments zeroed, a first Adam step after it, the LR ramp, resets surviving a resume."""

from __future__ import annotations

import io

import pytest
import torch

import lowmem.optim
from lowmem.interventions import build_intervention
from lowmem.models import build_model
from lowmem.optim.reset import MomentumReset, reset_moments
from lowmem.testing import TINY, _batch, _loss, max_relative_difference

LR = 1e-2


def _model():
    torch.manual_seed(0)
    return build_model(TINY).double()


def _run(model, optimizer, reset, start, stop):
    """The trainer's protocol: lr_factor before step `step`, after_step right after it."""
    for step in range(start + 1, stop + 1):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * reset.lr_factor(step)
        _loss(model, _batch(step, 8, 16, TINY.vocab_size)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reset.after_step(step, model, optimizer)


def _build(name, model, **hp):
    opt = lowmem.optim.build(name, model, lr=LR, **hp)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


def test_registered_as_an_intervention():
    reset = build_intervention("momentum-reset", every=200, lr_ramp_steps=10)
    assert isinstance(reset, MomentumReset) and reset.name == "momentum-reset"


@pytest.mark.parametrize("name", ["adamw", "adam-mini", "stable-spam", "muon", "muon-all", "galore", "fira", "apollo",
                                  "scale"])
def test_reset_zeroes_moments_and_steps_of_every_adam_family_optimizer(name):
    model = _model()
    accepted = lowmem.optim.method(name).hyperparameters()
    opt = _build(name, model, **({"rank": 8} if "rank" in accepted else {}))  # small enough to project TINY's matrices
    reset = MomentumReset(every=3)
    _run(model, opt, reset, 0, 3)
    moments = 0
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state:
                assert torch.count_nonzero(state[key]) == 0, key
                moments += 1
        if "exp_avg" in state:
            assert float(state["step"]) == 0.0
    assert moments > 0 and reset.resets == 1 and reset.last_reset_step == 3


@pytest.mark.parametrize("make", [
    lambda params: lowmem.optim.adamw.AdamW(params, lr=LR),
    lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0),
], ids=["lowmem-adamw", "torch-adamw"])
def test_update_after_a_reset_is_a_first_adam_step(make):
    model = _model()
    opt = make(model.parameters())
    for step in range(1, 4):
        _loss(model, _batch(step, 8, 16, TINY.vocab_size)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert reset_moments(opt) == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, _batch(4, 8, 16, TINY.vocab_size)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        moved, g = p.detach() - before[name], grads[name]
        # m_hat = g, v_hat = g^2: each entry moves by lr * |g| / (|g| + eps) against its gradient.
        torch.testing.assert_close(moved, -LR * g / (g.abs() + 1e-8), rtol=1e-9, atol=1e-15)
        big = g.abs() > 1e-4
        assert torch.allclose(moved[big].abs(), torch.full_like(moved[big], LR), rtol=1e-3)


def test_lr_dip_and_ramp_follow_the_reference_timing():
    """The reference (OptimAI-Lab/Memory_Efficient_Pretraining, 10 steps from 0.001): the last step
    before a reset at 0.1%, the first step on fresh moments at ~11%, the target by the 9th."""
    reset = MomentumReset(every=10, lr_ramp_steps=10, lr_floor=0.001)
    factors = {step: reset.lr_factor(step) for step in range(1, 32)}
    assert [factors[s] for s in range(1, 10)] == [1.0] * 9
    assert factors[10] == pytest.approx(0.001)  # its update is the last one on the old moments
    assert factors[11] == pytest.approx(0.001 + 0.999 / 9) and 0.11 < factors[11] < 0.12
    assert [factors[s] for s in range(11, 20)] == pytest.approx([0.001 + 0.999 * k / 9 for k in range(1, 10)])
    assert factors[19] == 1.0 and factors[20] == pytest.approx(0.001) and factors[29] == 1.0
    short = MomentumReset(every=10, lr_ramp_steps=4, lr_floor=0.001)
    assert [short.lr_factor(s) for s in range(9, 16)] == pytest.approx([1.0, 0.001, 0.334, 0.667, 1.0, 1.0, 1.0])
    assert [MomentumReset(every=5, lr_ramp_steps=1).lr_factor(s) for s in (4, 5, 6)] == [1.0, 0.001, 1.0]
    assert all(MomentumReset(every=10).lr_factor(step) == 1.0 for step in range(1, 40))


@pytest.mark.parametrize("name", ["fira", "apollo", "apollo-mini"])
def test_reset_drops_the_norm_growth_limiter_state(name):
    """The reference rebuilds its optimizer, which forgets the limiter's previous norm: so does a reset,
    and the first update after it is not limited by the pre-reset norm."""
    model = _model()
    opt = _build(name, model, **({} if name == "apollo-mini" else {"rank": 8}))
    reset = MomentumReset(every=3)
    _run(model, opt, reset, 0, 2)
    assert any("limiter_norm" in state for state in opt.state.values())
    _run(model, opt, reset, 2, 3)
    assert not any("limiter_norm" in state for state in opt.state.values())
    assert any("projection" in state for state in opt.state.values())  # the projections are kept
    _run(model, opt, reset, 3, 4)
    assert any("limiter_norm" in state for state in opt.state.values())


def test_resets_land_on_the_same_steps_after_a_resume():
    hp = dict(every=4, lr_ramp_steps=2, lr_floor=0.001)
    model = _model()
    opt, reset = _build("adamw", model), MomentumReset(**hp)
    _run(model, opt, reset, 0, 10)

    resumed_model = _model()
    opt2, reset2 = _build("adamw", resumed_model), MomentumReset(**hp)
    _run(resumed_model, opt2, reset2, 0, 6)  # stop between the resets at 4 and 8
    buffer = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "optim": opt2.state_dict(), "reset": reset2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = _model()
    resumed_model.load_state_dict(saved["model"])
    opt3, reset3 = _build("adamw", resumed_model), MomentumReset(**hp)
    opt3.load_state_dict(saved["optim"])
    reset3.load_state_dict(saved["reset"])
    _run(resumed_model, opt3, reset3, 6, 10)

    assert reset3.state_dict() == reset.state_dict() == {**hp, "lr_floor": 0.001, "resets": 2, "last_reset_step": 8}
    assert max_relative_difference(dict(model.named_parameters()), dict(resumed_model.named_parameters())) == 0.0
    for a, b in zip(opt.state.values(), opt3.state.values()):
        assert float(a["step"]) == float(b["step"]) == 2.0  # steps 9 and 10 since the reset at 8


def test_refuses_a_different_schedule_on_resume():
    with pytest.raises(ValueError, match="every=4"):
        MomentumReset(every=5).load_state_dict(MomentumReset(every=4).state_dict())


def test_refuses_optimizers_without_adam_moments():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    _loss(model, _batch(0, 8, 16, TINY.vocab_size)).backward()
    opt.step()
    with pytest.raises(ValueError, match="Adam-family optimizer.*SGD keeps none"):
        MomentumReset(every=1).after_step(1, model, opt)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="every"):
        MomentumReset(every=0)
    with pytest.raises(ValueError, match="lr_ramp_steps"):
        MomentumReset(every=10, lr_ramp_steps=-1)
    with pytest.raises(ValueError, match="lr_ramp_steps"):
        MomentumReset(every=10, lr_ramp_steps=11)
    with pytest.raises(ValueError, match="lr_floor"):
        MomentumReset(every=10, lr_floor=2.0)


def test_a_refused_masked_reset_changes_nothing():
    """Adam-mini's second moment is one value per block, so a masked reset is refused; its first moment,
    checked first, used to be zeroed already by then."""
    from lowmem.errors import ConfigError
    from lowmem.optim.adam_mini import AdamMini
    from lowmem.optim.state import reset_state

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8, bias=False)
    optimizer = AdamMini([layer.weight], lr=1e-3)
    layer(torch.randn(4, 8)).square().sum().backward()
    optimizer.step()
    before = optimizer.state[layer.weight]["exp_avg"].clone()
    with pytest.raises(ConfigError, match="exp_avg_sq"):
        reset_state(optimizer, masks={layer.weight: torch.ones(8, 8, dtype=torch.bool)})
    assert torch.equal(optimizer.state[layer.weight]["exp_avg"], before)
