"""Stable-SPAM against a reference written from methods.md §7, and the released code's stale reset."""

from __future__ import annotations

import io
import math

import pytest
import torch

import lowmem.optim
from lowmem.models import build_model
from lowmem.optim.stable_spam import StableSPAM
from lowmem.testing import TINY, _batch, _loss, fsdp_matches_single, max_relative_difference

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, gamma1=0.7, gamma2=0.999, theta=0.999, eta_min=0.5)


class ReferenceStableSPAM:
    """The formulas of methods.md §7, one tensor at a time with Python scalars.

    `stale_reset=True` is the released code's reset: on a reset step the update still uses the
    pre-reset moments (advanced by this step's gradient) with Adam's step counter set to 1, and the
    state keeps zeros afterwards.
    """

    def __init__(self, params, lr, betas, eps, gamma1, gamma2, theta, eta_min, update_gap, total_T,
                 stale_reset=False):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.gamma1, self.gamma2, self.theta, self.eta_min = gamma1, gamma2, theta, eta_min
        self.update_gap, self.total_T, self.stale_reset = update_gap, total_T, stale_reset
        self.t = 0
        self.state = [dict(spike=0.0, norm=0.0, norm_sq=0.0, k=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                      for p in self.params]
        self.param_groups = [{"lr": lr}]

    @torch.no_grad()
    def step(self):
        self.t += 1
        t = self.t
        decay = self.eta_min + (1 - self.eta_min) * (1 + math.cos(math.pi * min(t, self.total_T) / self.total_T)) / 2
        beta1, beta2 = self.beta1 * decay, self.beta2
        reset = t % self.update_gap == 0
        self.processed = []  # this step's clipped and normalized gradients, for the tests
        for p, s in zip(self.params, self.state):
            g = p.grad.clone()
            s["spike"] = self.theta * s["spike"] + (1 - self.theta) * g.abs().max().item()
            limit = s["spike"] / (1 - self.theta**t)
            g = torch.where(g.abs() > limit, g.sign() * limit, g)
            n = g.norm().item()
            s["norm"] = self.gamma1 * s["norm"] + (1 - self.gamma1) * n
            s["norm_sq"] = self.gamma2 * s["norm_sq"] + (1 - self.gamma2) * n * n
            g = g / n * (s["norm"] / (1 - self.gamma1**t)) / (math.sqrt(s["norm_sq"] / (1 - self.gamma2**t)) + self.eps)
            self.processed.append(g)
            if reset and not self.stale_reset:
                s["m"], s["v"], s["k"] = torch.zeros_like(p), torch.zeros_like(p), 0
            s["k"] = 1 if reset else s["k"] + 1
            m = beta1 * s["m"] + (1 - beta1) * g
            v = beta2 * s["v"] + (1 - beta2) * g * g
            k = s["k"]
            p -= self.param_groups[0]["lr"] * (m / (1 - beta1**k)) / ((v / (1 - beta2**k)).sqrt() + self.eps)
            s["m"], s["v"] = (torch.zeros_like(p), torch.zeros_like(p)) if reset and self.stale_reset else (m, v)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _model():
    torch.manual_seed(0)
    return build_model(TINY).double()


def _trajectory(make_optimizer, steps):
    """Parameters after each step (train_steps' data and loss), as a list of name -> tensor dicts."""
    model = _model()
    opt = make_optimizer(model)
    out = []
    for step in range(steps):
        _loss(model, _batch(step, 8, 16, TINY.vocab_size)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


GAP, TOTAL, STEPS = 5, 8, 12  # resets after steps 5 and 10; beta1's cosine ends at step 8


def test_matches_reference_from_the_formulas():
    ours = _trajectory(lambda m: StableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL, **HP), STEPS)
    ref = _trajectory(lambda m: ReferenceStableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL, **HP), STEPS)
    # Bitwise equal up to the first reset; from then on ~1e-9: a first Adam step is ~lr*sign(g_hat),
    # whose slope 1/eps near g_hat = 0 magnifies fp64 rounding (a real error is >= 1e-4, see below).
    for step, (a, b) in enumerate(zip(ours, ref), start=1):
        assert max_relative_difference(b, a) < (1e-14 if step < GAP else 1e-8), f"step {step}"
    assert max_relative_difference(ours[-1], dict(_model().named_parameters())) > 1e-2


def test_released_stale_reset_differs_exactly_from_the_first_reset_step():
    fresh = _trajectory(lambda m: ReferenceStableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL, **HP), GAP + 1)
    stale = _trajectory(lambda m: ReferenceStableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL,
                                                      stale_reset=True, **HP), GAP + 1)
    for step in range(1, GAP):
        assert max_relative_difference(fresh[step - 1], stale[step - 1]) == 0.0, f"step {step}"
    assert max_relative_difference(fresh[GAP - 1], stale[GAP - 1]) > 1e-4


def test_reset_step_is_a_first_adam_step():
    model, stale_model = _model(), _model()
    opt = StableSPAM(model.parameters(), update_gap=GAP, total_T=TOTAL, **HP)
    stale = ReferenceStableSPAM(stale_model.parameters(), update_gap=GAP, total_T=TOTAL, stale_reset=True, **HP)
    for step in range(GAP):
        before = [p.detach().clone() for p in model.parameters()]
        for m in (model, stale_model):
            _loss(m, _batch(step, 8, 16, TINY.vocab_size)).backward()
        opt.step()
        stale.step()
        opt.zero_grad(set_to_none=True)
        stale.zero_grad()
    for state in opt.state.values():
        assert state["step"].item() == 1.0 and state["global_step"].item() == GAP
    # A first step of a fresh torch.optim.Adam on the reset step's clipped and normalized gradient
    # (the stale run equals ours bitwise before this step, so its processed gradient is ours too).
    first = [torch.nn.Parameter(b.clone()) for b in before]
    for p, g in zip(first, stale.processed):
        p.grad = g
    torch.optim.Adam(first, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"]).step()
    first_step = {n: p.detach() for (n, _), p in zip(model.named_parameters(), first)}
    assert max_relative_difference(first_step, dict(model.named_parameters())) < 1e-10  # fp64; a first Adam step (~lr*sign) amplifies rounding
    # The released code's reset step is not a first Adam step.
    assert max_relative_difference(first_step, dict(stale_model.named_parameters())) > 1e-4
    # A first Adam step moves every entry with a gradient by lr (up to eps), against the gradient.
    moved = model.lm_head.weight.detach() - before[list(dict(model.named_parameters())).index("lm_head.weight")]
    torch.testing.assert_close(moved.abs().median(), torch.tensor(HP["lr"], dtype=moved.dtype), rtol=1e-3, atol=0)


def test_counters_survive_a_resume():
    full = _trajectory(lambda m: StableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL, **HP), STEPS)
    model = _model()
    opt = StableSPAM(model.parameters(), update_gap=GAP, total_T=TOTAL, **HP)
    for step in range(STEPS):
        if step == 7:  # resume between the two resets
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt = StableSPAM(model.parameters(), update_gap=GAP, total_T=TOTAL, **HP)
            opt.load_state_dict(torch.load(buffer, weights_only=True))
        _loss(model, _batch(step, 8, 16, TINY.vocab_size)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert max_relative_difference(full[-1], dict(model.named_parameters())) == 0.0


def test_does_not_modify_the_gradient():
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    p.grad[0, 0] = 100.0
    grad = p.grad.clone()
    opt = StableSPAM([p], theta=0.5)
    opt.step()
    opt.step()
    assert torch.equal(p.grad, grad)


def test_rejects_bad_hyperparameters():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="update_gap"):
        StableSPAM([p], update_gap=-1)
    with pytest.raises(ValueError, match="total_T"):
        StableSPAM([p], total_T=0)
    with pytest.raises(ValueError, match="gamma2"):
        StableSPAM([p], gamma2=1.0)
    with pytest.raises(ValueError, match="eta_min"):
        StableSPAM([p], eta_min=1.5)


def test_step_on_meta_model_creates_state():
    model = build_model(TINY, device="meta")
    opt = lowmem.optim.build("stable-spam", model, total_T=100)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    state = opt.state[model.lm_head.weight]
    assert state["exp_avg"].shape == model.lm_head.weight.shape and state["exp_avg"].device.type == "meta"


def test_fsdp2_two_processes_match_one():
    single, sharded = fsdp_matches_single("stable-spam", {"lr": 1e-2, "update_gap": 4, "total_T": 8,
                                                          "weight_decay": 0.01}, steps=10)
    # ~1e-9, not 1e-12: the first Adam steps after resets magnify fp64 rounding (see the reference
    # test); leaving out the all-reduces gives ~1e-2.
    assert max_relative_difference(single, sharded) < 1e-8
    # The comparison is not vacuous: the run moved the weights.
    assert max_relative_difference(single, dict(_model().named_parameters())) > 1e-2
