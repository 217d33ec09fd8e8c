"""lowmem's AdamW (the core every method reuses for the roles it leaves to Adam) against torch.optim.AdamW."""

from __future__ import annotations

import io

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


def test_state_dict_loads_with_weights_only():
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB)
    opt = lowmem.optim.build("adamw", model, lr=1e-3)
    _loss(model, 0).backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert len(state["state"]) == len(list(model.parameters()))


@pytest.mark.distributed
def test_fsdp2_matches_single_process():
    from lowmem.testing import fsdp_matches_single, max_relative_difference

    single, sharded = fsdp_matches_single("adamw", {"lr": 1e-3}, steps=20)
    assert max_relative_difference(single, sharded) <= 1e-6
