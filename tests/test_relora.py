"""ReLoRA as released (Guitaricet/relora; issue 27): what a merge does to the optimizer state (the
factors' moments pruned, each tensor on its own, step counters kept, nothing else touched), the jagged
schedule around a restart against the release's formula written out here, LoRA's defaults and
dropout, and runs started before these forms resuming with what they started with."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowmem.assembly import build_model, build_optimizer
from lowmem.errors import ConfigError
from lowmem.interventions import RunContext, build_intervention
from lowmem.structure import build_structure
from lowmem.structure.lora import LoRALinear, LoRAMerge, lora_modules
from lowmem.testing import TINY, _batch, _loss
from lowmem.train.schedule import lr_factor as schedule_lr_factor
from lowmem.train.trainer import Trainer

EVERY = 5


def trained_lora(steps: int, merge: LoRAMerge) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """A small fp64 LoRA model after `steps` AdamW steps (the merge's hooks after each but the last);
    returns it, its optimizer and a snapshot of what the last step's merge will see."""
    torch.manual_seed(0)
    model = build_model(TINY, structure={"name": "lora", "rank": 8, "dropout": 0.0}).double()
    optimizer = build_optimizer("adamw", model, lr=3e-3)
    merge.setup(RunContext(total_steps=100, warmup_ratio=0.0))
    for step in range(1, steps + 1):
        _loss(model, _batch(step, 8, 16, TINY.vocab_size)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step < steps:
            merge.after_step(step, model, optimizer)
    factors = [p for m in lora_modules(model) for p in (m.lora_A, m.lora_B)]
    snapshot = {"state": copy.deepcopy(optimizer.state_dict()), "factors": factors,
                "w0": [m.weight.detach().clone() for m in lora_modules(model)],
                "product": [m.product().detach().clone() for m in lora_modules(model)],
                "a": [m.lora_A.detach().clone() for m in lora_modules(model)]}
    return model, optimizer, snapshot


def moments(optimizer, params, key) -> torch.Tensor:
    return torch.cat([optimizer.state[p][key].reshape(-1) for p in params])


def test_a_random_prune_zeroes_each_moment_independently_and_keeps_the_steps():
    merge = LoRAMerge(every=EVERY, ramp_steps=2, prune="random", prune_ratio=0.5)
    model, optimizer, before = trained_lora(EVERY + 1, merge)
    factors = before["factors"]
    old_m, old_v = moments(optimizer, factors, "exp_avg").clone(), moments(optimizer, factors, "exp_avg_sq").clone()
    others = {p: copy.deepcopy(optimizer.state[p]) for p in model.parameters() if p.requires_grad and
              all(p is not f for f in factors)}
    merge.after_step(EVERY + 1, model, optimizer)
    assert merge.merges == 1
    new_m, new_v = moments(optimizer, factors, "exp_avg"), moments(optimizer, factors, "exp_avg_sq")
    assert old_m.ne(0).all() and old_v.ne(0).all()
    for new, old in ((new_m, old_m), (new_v, old_v)):
        assert ((new == 0) | (new == old)).all()  # pruned entries exactly 0, the rest unchanged
    n = new_m.numel()
    assert n >= 10_000
    kept_m, kept_v = (new_m != 0).double(), (new_v != 0).double()
    for fraction, p in ((kept_m.mean(), 0.5), (kept_v.mean(), 0.5), ((kept_m * kept_v).mean(), 0.25)):
        assert abs(fraction.item() - p) <= 5 * math.sqrt(p * (1 - p) / n), (fraction, p)  # independent masks
    assert all(float(optimizer.state[p]["step"]) == EVERY + 1 for p in factors)  # steps kept
    for p, state in others.items():  # nothing else's state changes
        for key, value in state.items():
            assert torch.equal(optimizer.state[p][key], value), key
    # The merge itself: W0 += s B A, B = 0, A redrawn within nn.Linear's init bound.
    for module, w0, product, a in zip(lora_modules(model), before["w0"], before["product"], before["a"]):
        torch.testing.assert_close(module.weight, w0 + product, rtol=0, atol=1e-12)
        assert torch.count_nonzero(module.lora_B) == 0 and not torch.equal(module.lora_A, a)
        assert module.lora_A.abs().max() <= 1 / math.sqrt(module.in_features)


def test_the_default_prunes_99_9_percent_and_a_resumed_run_draws_the_same_masks():
    merge = LoRAMerge(every=EVERY, ramp_steps=2)
    assert (merge.prune, merge.prune_ratio, merge.ramp_steps) == ("random", 0.999, 2)
    model, optimizer, before = trained_lora(EVERY + 1, merge)
    resumed = LoRAMerge(every=EVERY, ramp_steps=2)
    resumed.load_state_dict(merge.state_dict())
    twin_optimizer = build_optimizer("adamw", model, lr=3e-3)
    twin_optimizer.load_state_dict(copy.deepcopy(before["state"]))
    merge.after_step(EVERY + 1, model, optimizer)
    resumed.after_step(EVERY + 1, model, twin_optimizer)
    factors = before["factors"]
    for key in ("exp_avg", "exp_avg_sq"):
        kept = moments(optimizer, factors, key).ne(0).double().mean().item()
        assert kept <= 0.01  # 0.1% expected
        assert torch.equal(moments(optimizer, factors, key), moments(twin_optimizer, factors, key))


def test_a_magnitude_prune_keeps_the_entries_above_the_tensors_quantile():
    merge = LoRAMerge(every=EVERY, ramp_steps=2, prune="magnitude")
    assert merge.prune_ratio == 0.9  # ReLoRA's 1B config
    model, optimizer, before = trained_lora(EVERY + 1, merge)
    expected = {}
    for p in before["factors"]:
        for key in ("exp_avg", "exp_avg_sq"):
            x = optimizer.state[p][key]
            threshold = torch.quantile(x.abs().flatten().to(torch.float32), 0.9).to(x.dtype)
            expected[p, key] = x * (x.abs() > threshold).to(x.dtype)
    merge.after_step(EVERY + 1, model, optimizer)
    for (p, key), value in expected.items():
        assert torch.equal(optimizer.state[p][key], value)
        assert float(optimizer.state[p]["step"]) == EVERY + 1


def test_prune_reset_zeroes_moments_and_steps():
    merge = LoRAMerge(every=EVERY, ramp_steps=2, prune="reset")
    model, optimizer, before = trained_lora(EVERY + 1, merge)
    merge.after_step(EVERY + 1, model, optimizer)
    for p in before["factors"]:
        state = optimizer.state[p]
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_an_optimizer_without_adam_moments_is_refused_at_a_prune():
    torch.manual_seed(0)
    model = build_model(TINY, structure={"name": "lora", "rank": 8})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    merge = LoRAMerge(every=1, ramp_steps=0)
    _loss(model, _batch(0, 8, 16, TINY.vocab_size)).backward()
    optimizer.step()
    with pytest.raises(ConfigError, match="no Adam moments.*lora-merge:prune=reset"):
        merge.after_step(2, model, optimizer)


def released_lambda(c: int, total: int, first_warmup: int, restart_every: int, restart_warmup: int,
                    min_lr_ratio: float) -> float:
    """ReLoRA's _get_cosine_schedule_with_multiple_warmups_lambda (final form, adjust_step 0) at step c."""
    if c < first_warmup:
        return c / max(1, first_warmup)

    def cosine(x: float) -> float:
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * (x - first_warmup) / (total - first_warmup)))

    into, cycle = c % restart_every, c // restart_every
    if into < restart_warmup and c >= restart_every:
        return into / restart_warmup * cosine(cycle * restart_every + restart_warmup)
    return cosine(c)


def test_the_lr_around_restarts_is_the_releases_jagged_schedule():
    """T = 1200, warmup 120, restarts every 300 with 100-step ramps: optimizer step s runs at the
    release's lambda(s - 1) (its LambdaLR steps after each optimizer step) for every step past the
    first warmup (lowmem's first warmup is (s + 1) / W by design), through the trainer's composition."""
    total, every = 1200, 300
    merge = build_intervention("lora-merge", every=every)  # ramp_steps 100, the scripts'
    context = RunContext(total_steps=total, warmup_ratio=0.1, min_lr_ratio=0.1)
    merge.setup(context)
    group = {"initial_lr": 1.0, "lr": 0.0}
    trainer = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(steps=total, warmup_ratio=0.1, min_lr_ratio=0.1,
                                                                                 schedule="cosine", decay_ratio=0.2)),
                              run=SimpleNamespace(interventions=[merge], optimizer=SimpleNamespace(param_groups=[group])))
    lrs = {s: Trainer._set_lr(trainer, s) for s in range(1, total + 1)}
    assert group["lr"] == lrs[total]  # the trainer set it on the group
    for s in range(121, total + 1):
        expected = released_lambda(s - 1, total, 120, every, 100, 0.1)
        assert lrs[s] == pytest.approx(expected, rel=1e-12, abs=1e-15), s
    assert lrs[301] == lrs[601] == lrs[901] == 0.0  # the lr-0 step before each merge
    assert [s for s in range(1, total + 1) if merge.is_merge(s)] == [301, 601, 901]
    cosine = {s: schedule_lr_factor(s - 1, total, 0.1, 0.1) for s in (400, 401, 700)}
    assert lrs[302] == pytest.approx(cosine[401] / 100) and lrs[400] == pytest.approx(99 / 100 * cosine[401])
    assert lrs[401] == cosine[401] and lrs[700] < lrs[701]  # back on the cosine after the ramp
    # A resumed run (a fresh intervention given the checkpoint's state) ramps the same.
    resumed = LoRAMerge(every=every)
    resumed.setup(context)
    resumed.load_state_dict(merge.state_dict())
    assert all(resumed.lr_factor(s) == merge.lr_factor(s) for s in range(590, 720))


def test_the_base_schedule_interventions_see_is_the_trainers():
    for total, warmup, floor in ((1200, 0.1, 0.1), (250, 0.05, 0.0), (37, 0.3, 0.2)):
        context = RunContext(total_steps=total, warmup_ratio=warmup, min_lr_ratio=floor)
        assert all(context.base_lr_factor(s) == schedule_lr_factor(s - 1, total, warmup, floor)
                   for s in range(1, total + 1))


def test_ramp_steps_must_be_below_every_and_the_message_names_the_fix():
    with pytest.raises(ConfigError, match=r"ramp.*\[0, 50\).*ramp_steps=10"):
        build_intervention("lora-merge", every=50)
    with pytest.raises(ConfigError, match="prune"):
        build_intervention("lora-merge", every=500, prune="half")
    with pytest.raises(ConfigError, match="prune_ratio"):
        build_intervention("lora-merge", every=500, prune="reset", prune_ratio=0.5)
    assert build_intervention("lora-merge", every=50, ramp_steps=10).ramp_steps == 10


def test_a_run_started_before_the_released_form_resumes_with_its_own():
    """A checkpoint's lora-merge state without `timing` (written before): merges after N, 2N, ..., the
    k-th update after at k / (ramp_steps + 1), moments and steps zeroed; its LoRA ran without dropout."""
    merge = LoRAMerge(every=50, ramp_steps=10)
    merge.setup(RunContext(total_steps=200))
    merge.load_state_dict({"every": 50, "ramp_steps": 10, "merges": 1})
    assert merge.timing == "lowmem-v1" and merge.prune == "reset"
    assert [s for s in range(1, 201) if merge.is_merge(s)] == [50, 100, 150, 200]
    assert merge.lr_factor(51) == pytest.approx(1 / 11) and merge.lr_factor(61) == 1.0
    structure = build_structure({"name": "lora", "rank": 8})
    model = build_model(TINY, structure=structure)
    assert all(layer.dropout == 0.1 for layer in lora_modules(model))
    structure.load_state_dict({"rank": 8, "alpha": 32.0})
    assert structure.dropout == 0.0 and all(layer.dropout == 0.0 for layer in lora_modules(model))


def test_lora_defaults_are_relora_s_and_dropout_acts_on_the_branch_input_in_training():
    model = build_model("llama-1b", structure={"name": "lora"}, device="meta")
    layer = model.layers[0].mlp.down_proj
    assert (layer.rank, layer.alpha, layer.dropout) == (128, 32.0, 0.1)  # the same at every size
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(16, 12, bias=False, dtype=torch.float64), 4, 8.0, dropout=0.1)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.manual_seed(1)
    y = lora(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.1, training=True)
    torch.testing.assert_close(y, x @ lora.weight.t() + lora.scale * dropped @ lora.lora_A.t() @ lora.lora_B.t())
    lora.eval()
    torch.testing.assert_close(lora(x), x @ lora.dense_weight().t())
    with pytest.raises(ConfigError, match="dropout"):
        build_structure({"name": "lora", "dropout": 1.0})
