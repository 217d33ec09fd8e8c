"""lowmem's AdamW (the core every method reuses for the roles it leaves to Adam) against torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowmem.optim
from lowmem.models import build_model

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loss(model, step):
    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (4, 17), generator=gen)
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("foreach", [True, False])
# weight_decay named in both cases: torch's AdamW defaults to 0.01, lowmem's to 0 (the papers' protocol).
@pytest.mark.parametrize("hparams", [{"weight_decay": 0.0}, {"weight_decay": 0.1, "betas": (0.8, 0.95), "eps": 1e-6}])
def test_matches_torch_adamw_over_20_steps(foreach, hparams):
    torch.manual_seed(0)
    ours = build_model("cpu-tiny", vocab_size=VOCAB).double()
    theirs = build_model("cpu-tiny", vocab_size=VOCAB).double()
    theirs.load_state_dict(ours.state_dict())
    opt = lowmem.optim.build("adamw", ours, lr=3e-3, foreach=foreach, **hparams)
    ref = torch.optim.AdamW(theirs.parameters(), lr=3e-3, foreach=foreach, **hparams)
    for step in range(20):
        factor = 0.5 + 0.5 * (step + 1) / 20
        for group in opt.param_groups:
            group["lr"] = 3e-3 * factor
        for group in ref.param_groups:
            group["lr"] = 3e-3 * factor
        _loss(ours, step).backward()
        # Same gradients on both sides: compare the update rules, not two trajectories.
        for a, b in zip(ours.parameters(), theirs.parameters()):
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-12, f"{name}: {err:.2e}"
    a0 = next(iter(opt.state.values()))
    assert set(a0) == {"step", "exp_avg", "exp_avg_sq"} and a0["step"].dtype == torch.float32


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("decay", ["before", "after"])
def test_uncorrected_eps_placement_is_the_released_form(foreach, decay):
    """eps_placement="uncorrected": step size lr*sqrt(1-beta2^t)/(1-beta1^t), denominator sqrt(v)+eps,
    written out here in float64 over 12 steps (eps 1e-3 so that its placement matters)."""
    from lowmem.optim.adamw import adamw_update

    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    expected = [p.clone() for p in params]
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    ref_m, ref_v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0), torch.tensor(3.0)]  # the second tensor as if restarted at another count
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-3, 0.1
    for _ in range(12):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        counts = [s.item() + 1 for s in steps]
        adamw_update(params, grads, ms, vs, steps, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                     foreach=foreach, eps_placement="uncorrected", decay=decay)
        for i, (g, t) in enumerate(zip(grads, counts)):
            if decay == "before":
                expected[i] = expected[i] * (1 - lr * wd)
            ref_m[i] = b1 * ref_m[i] + (1 - b1) * g
            ref_v[i] = b2 * ref_v[i] + (1 - b2) * g * g
            expected[i] = expected[i] - lr * (1 - b2**t) ** 0.5 / (1 - b1**t) * ref_m[i] / (ref_v[i].sqrt() + eps)
            if decay == "after":
                expected[i] = expected[i] * (1 - lr * wd)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)
    # ... and it is not torch's form: the same run with eps on sqrt(v_hat) ends elsewhere.
    corrected = [torch.randn(s, generator=torch.Generator().manual_seed(0), dtype=torch.float64) for s in shapes[:1]]
    other = corrected[0].clone()
    g = torch.full(shapes[0], 1e-3, dtype=torch.float64)
    for placement, target in (("corrected", corrected[0]), ("uncorrected", other)):
        adamw_update([target], [g], [torch.zeros_like(g)], [torch.zeros_like(g)], [torch.tensor(0.0)], lr=lr,
                     beta1=b1, beta2=b2, eps=eps, weight_decay=0.0, eps_placement=placement)
    assert (corrected[0] - other).abs().max() > 1e-4


def test_foreach_chunks_are_the_whole_foreach_step_to_the_bit(monkeypatch):
    """The foreach update runs a chunk of tensors at a time (lowmem.optim.base.foreach_chunks), so its
    sqrt(v) temporaries are a chunk's, not the model's: with chunks of about one small tensor the
    weights are the one-chunk weights to the bit after 5 steps."""
    import lowmem.optim.base as base

    def run(chunk_elements):
        monkeypatch.setattr(base, "FOREACH_CHUNK_ELEMENTS", chunk_elements)
        torch.manual_seed(0)
        model = build_model("cpu-tiny", vocab_size=VOCAB)
        opt = lowmem.optim.build("adamw", model, lr=3e-3, weight_decay=0.1)
        for step in range(5):
            _loss(model, step).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    whole, chunked = run(2**40), run(256)
    assert len(base.foreach_chunks(whole, max_elements=256)) > len(whole) // 2  # the chunks are that small
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
