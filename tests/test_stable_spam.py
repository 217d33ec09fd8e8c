"""Stable-SPAM against a reference written from the released code's formulas, and its stale reset."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lowmem.models import build_model
from lowmem.optim.stable_spam import StableSPAM
from lowmem.testing import TINY, _batch, _loss, max_relative_difference

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, gamma1=0.85, gamma2=0.99999, theta=0.999,
          eta_min=0.5)


class ReferenceStableSPAM:
    """The released stablespam.py's formulas (methods.md section 7), one tensor at a time, Python scalars:

    - one counter k per tensor, incremented first and used by every bias correction (clipping EMA,
      norm EMAs, Adam); a reset sets it to 1;
    - spiking entries (|g| > M_hat) scaled by M_hat / max|g|;
    - the cosine factor (CosineAnnealingLR from 1 to eta_min with T_max = total_T + 1) multiplies beta1
      and gamma1;
    - decoupled weight decay first, torch's eps placement.

    `stale_reset=True` is the released reset exactly: on a reset step the update still uses the
    pre-reset moments (advanced by this step's gradient) with k = 1, and the state keeps zeros
    afterwards. `stale_reset=False` is lowmem's documented fix (the reset applies on its own step).
    Elementwise updates use the same torch primitives as lowmem (lerp for the EMA, torch's sqrt), so
    the two agree to the bit where the formulas agree.
    """

    def __init__(self, params, lr, betas, eps, weight_decay, gamma1, gamma2, theta, eta_min, update_gap, total_T,
                 stale_reset=False, old=None):
        # `old`: one formula of lowmem before issue 13, to show the comparison sees it: "global_counter"
        # (the EMAs' bias corrections use the global step), "saturate" (spikes -> sign(g)*M_hat),
        # "gamma1" (gamma1 without the cosine factor).
        self.old = old
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.gamma1, self.gamma2, self.theta, self.eta_min = gamma1, gamma2, theta, eta_min
        self.update_gap, self.total_T, self.stale_reset = update_gap, total_T, stale_reset
        self.T = 0
        self.state = [dict(M=0.0, N=0.0, V=0.0, k=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                      for p in self.params]
        self.param_groups = [{"lr": lr}]
        self.clipped = []  # per step: how many entries were scaled as spikes

    @torch.no_grad()
    def step(self):
        self.T += 1
        T = self.T
        c = self.eta_min + (1 - self.eta_min) * (1 + math.cos(math.pi * min(T, self.total_T) / (self.total_T + 1))) / 2
        beta1, beta2, gamma1 = self.beta1 * c, self.beta2, self.gamma1 * (1.0 if self.old == "gamma1" else c)
        reset = bool(self.update_gap) and T % self.update_gap == 0
        lr = self.param_groups[0]["lr"]
        self.processed = []  # this step's clipped and normalized gradients, for the tests
        clipped = 0
        for p, s in zip(self.params, self.state):
            p.mul_(1 - lr * self.wd)
            g = p.grad.clone()
            s["k"] += 1
            k = T if self.old == "global_counter" else s["k"]
            peak = g.abs().max().item()
            s["M"] = self.theta * s["M"] + (1 - self.theta) * peak
            limit = s["M"] / (1 - self.theta**k)
            spikes = g.abs() > limit
            clipped += int(spikes.sum())
            g = torch.where(spikes, g.sign() * limit if self.old == "saturate" else g * (limit / peak), g)
            n = g.norm().item()
            s["N"] = gamma1 * s["N"] + (1 - gamma1) * n
            s["V"] = self.gamma2 * s["V"] + (1 - self.gamma2) * n**2
            # torch's sqrt, as lowmem's 0-dim tensors take it: torch 2.13's AVX2 CPU kernel misrounds ~1%
            # of fp64 inputs by an ulp (math.sqrt does not), and this comparison is bitwise.
            v_hat = torch.tensor(s["V"] / (1 - self.gamma2**k), dtype=torch.float64)
            target = (s["N"] / (1 - gamma1**k)) / (v_hat.sqrt().item() + self.eps)
            if n > 0:
                g = g * (target / n)
            self.processed.append(g)
            m, v = s["m"], s["v"]
            if reset:
                s["k"] = 1
                s["m"], s["v"] = torch.zeros_like(p), torch.zeros_like(p)
                if not self.stale_reset:
                    m, v = s["m"], s["v"]
            k = s["k"]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / (1 - beta2**k) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**k))
        self.clipped.append(clipped)

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


GAP, TOTAL, STEPS = 6, 12, 15  # 2.5 reset periods: resets after steps 6 and 12; the cosine ends at step 12


def test_matches_reference_from_the_released_formulas():
    holder = {}

    def reference(m):
        holder["ref"] = ReferenceStableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL, **HP)
        return holder["ref"]

    ours = _trajectory(lambda m: StableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL, **HP), STEPS)
    ref = _trajectory(reference, STEPS)
    # Bitwise equal up to the first reset; from then on <= 1e-8: a first Adam step is ~lr*sign(g_hat),
    # whose slope 1/eps near g_hat = 0 magnifies fp64 rounding (a real error is >= 1e-4, see below).
    for step, (a, b) in enumerate(zip(ours, ref), start=1):
        if step < GAP:
            assert max_relative_difference(b, a) == 0.0, f"step {step}"
        else:
            assert max_relative_difference(b, a) <= 1e-8, f"step {step}"
    assert max_relative_difference(ours[-1], dict(_model().named_parameters())) > 1e-2
    # The comparison exercises the scaled clipping (before and after the first reset's k = 1).
    assert sum(holder["ref"].clipped[1:GAP]) > 0 and sum(holder["ref"].clipped[GAP:]) > 0, holder["ref"].clipped


@pytest.mark.parametrize("old", ["global_counter", "saturate", "gamma1"])
def test_each_released_formula_is_seen_by_the_comparison(old):
    """lowmem's formulas before issue 13, each put back into the reference alone, end far outside the
    comparison's tolerance: the test above checks every one of them."""
    ours = _trajectory(lambda m: StableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL, **HP), STEPS)
    ref = _trajectory(lambda m: ReferenceStableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL, old=old, **HP),
                      STEPS)
    assert max_relative_difference(ref[-1], ours[-1]) > 1e-6


def test_cosine_factor_is_the_released_cosine_annealing():
    from lowmem.optim.stable_spam import beta1_decay

    scheduler_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(scheduler_opt, TOTAL + 1, 0.5)
    for t in range(1, TOTAL + 1):
        scheduler_opt.step()
        cosine.step()
        assert beta1_decay(t, TOTAL, 0.5) == pytest.approx(scheduler_opt.param_groups[0]["lr"], rel=1e-12, abs=0)
    assert beta1_decay(TOTAL + 5, TOTAL, 0.5) == beta1_decay(TOTAL, TOTAL, 0.5)
    assert beta1_decay(7, None, 0.5) == 1.0


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
    torch.optim.AdamW(first, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], weight_decay=HP["weight_decay"]).step()
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


@pytest.mark.parametrize("state_bits", [None, 8])
def test_a_foreach_chunk_at_a_time_is_the_whole_step_to_the_bit(monkeypatch, state_bits):
    """Steps 2-4 run one foreach chunk at a time (lowmem.optim.base.foreach_chunks; each chunk's clipped
    gradients built once, for their norms and the update), not all at once: with chunks of one small
    tensor each, the trajectory is the one-chunk trajectory to the bit."""
    import lowmem.optim.base as base

    def run(chunk_elements):
        monkeypatch.setattr(base, "FOREACH_CHUNK_ELEMENTS", chunk_elements)
        return _trajectory(lambda m: StableSPAM(m.parameters(), update_gap=GAP, total_T=TOTAL, state_bits=state_bits,
                                                **HP), 8)

    whole, chunked = run(2**40), run(64)
    assert all(max_relative_difference(a, b) == 0.0 for a, b in zip(whole, chunked))
    assert max_relative_difference(whole[-1], dict(_model().named_parameters())) > 1e-2
