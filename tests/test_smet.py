"""SMET's options and bookkeeping: the paper's step-size ramp (warmup_form=step_ramp: regrown weights
start with a step of at most lr/W that reaches the steady level after W steps, and the update equals a
dense masked Adam with per-entry step counters written here), the density-aware lr rules, state only
for active weights, and the registry's bad-input errors. The released form (the defaults) is checked
against the release's formulas in test_smet_released."""

from __future__ import annotations

import math

import pytest
import torch
from test_sparse import adam_first_update, group_of, one_layer, run_linear
from torch import nn

import lowmem.optim
from lowmem.assembly import build_model, build_optimizer
from lowmem.errors import ConfigError
from lowmem.interventions import RunContext
from lowmem.optim.smet import SMET, density_factor
from lowmem.structure.sparse import TopologyUpdate, sparse_layers

BETA1, BETA2 = 0.9, 0.999


def test_registered_with_the_papers_presets_and_sparse_kinds():
    entry = lowmem.optim.method("smet")
    assert {"masked", "sparse-values", "dense"} <= set(entry.kinds)
    assert entry.settings("llama-130m")["lr"] == 2e-3 and entry.settings("llama-350m")["lr"] == 2e-3
    assert entry.settings("llama-1b")["lr"] == 1e-3


@pytest.mark.parametrize("hparams, fragment", [({"warmup": -1}, "warmup"), ({"density_lr": "log"}, "density_lr"),
                                               ({"warmup_form": "ramp"}, "warmup_form"),
                                               ({"rank": 4}, "no hyperparameter")])
def test_bad_hyperparameters_are_refused(hparams, fragment):
    model = build_model("cpu-micro", vocab_size=64, structure={"name": "sparse"})
    with pytest.raises((ConfigError, ValueError), match=fragment):
        build_optimizer("smet", model, hparams=hparams)


def test_density_lr_rules():
    assert density_factor("inverse", 0.25) == 4.0
    assert density_factor("inverse_sqrt", 0.25) == 2.0
    assert density_factor("none", 0.25) == 1.0


@pytest.mark.parametrize("storage", ["dense", "compact"])
@pytest.mark.parametrize("warmup", [10, 100])
def test_regrown_weights_start_at_most_lr_over_w_and_reach_the_steady_step_after_w(storage, warmup):
    """The same run as test_sparse's cold start, with SMET: a regrown weight's s-th update is
    lr min(1, s/W) (constant gradient), where naive AdamW's first is ~3.16 lr (at t=300: 1.61 lr)."""
    lr, t0 = 1e-3, 300
    layer = one_layer(storage)
    opt = SMET([group_of(layer)], lr=lr, betas=(BETA1, BETA2), eps=1e-12, warmup=warmup, warmup_form="step_ramp")
    update = TopologyUpdate(every=t0, drop=0.2, drop_end=0.2, grow="random")
    update.setup(RunContext(total_steps=10 * t0))
    coeff = torch.randn(8, 8, dtype=torch.float64)
    run_linear(layer, opt, update, coeff, range(1, t0))
    before = layer.block_mask().clone()
    moves: list[torch.Tensor] = []
    run_linear(layer, opt, update, coeff, range(t0, t0 + warmup + 5), lambda s, b, a: moves.append(a - b))
    grown = (layer.block_mask() & ~before).view(8, 8)
    kept = (layer.block_mask() & before).view(8, 8)
    assert grown.sum() == 32 - math.floor(32 * (1 - 0.2))
    assert moves[0][grown].abs().max() == 0  # SET updates after step T0: they were inactive in it
    sign = -coeff.sign()
    for s in range(1, warmup + 5):
        step = moves[s][grown] / (lr * sign[grown])
        assert torch.allclose(step, torch.full_like(step, min(1.0, s / warmup)), rtol=1e-9), s
        assert torch.allclose(moves[s][kept] / (lr * sign[kept]), torch.ones_like(moves[s][kept]), rtol=1e-9)
    assert moves[1][grown].abs().max() <= lr / warmup * (1 + 1e-12)  # the first update: at most lr / W
    assert adam_first_update(t0 + 1) > 1.6  # naive AdamW at the same point (test_sparse measures it)
    state = opt.state[layer.sparse_param]
    assert state["exp_avg"].numel() == layer.n_active and state["block_step"].numel() == layer.n_active


def reference_run(storage: str, grow: str, rule: str, steps: int = 30) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """SMET on one sparse layer vs a dense masked Adam with per-entry step counters (written here),
    both in fp64, through topology updates at steps 10 and 20; returns both weight histories."""
    lr, eps, warmup = 1e-2, 1e-8, 4
    layer = one_layer(storage, density=0.5, block=2, out=8, inp=12)
    model = nn.Sequential(layer)
    opt = SMET([group_of(layer)], lr=lr, betas=(BETA1, BETA2), eps=eps, warmup=warmup, warmup_form="step_ramp",
               density_lr=rule)
    update = TopologyUpdate(every=10, drop=0.3, drop_end=0.1, grow=grow)
    update.setup(RunContext(total_steps=steps))
    density = layer.density
    factor = {"inverse": 1 / density, "inverse_sqrt": 1 / math.sqrt(density), "none": 1.0}[rule]
    # The reference: dense tensors, every entry its own step counter.
    w = layer.dense_weight().clone()
    mask = layer.block_mask().repeat_interleave(2).view(8, 12)
    m, v, te = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)
    t = 0
    gen = torch.Generator().manual_seed(3)
    ours, ref = [], []
    for step in range(1, steps + 1):
        x, y = torch.randn(6, 12, dtype=torch.float64, generator=gen), torch.randn(6, 8, dtype=torch.float64, generator=gen)
        ((layer(x) - y) ** 2).sum().backward()
        update.before_step(step, model, opt)
        mask_before = layer.block_mask().repeat_interleave(2).view(8, 12)  # RigL changed it here
        opt.step()
        opt.zero_grad()
        update.after_step(step, model, opt)
        mask_after = layer.block_mask().repeat_interleave(2).view(8, 12)  # SET changed it here
        ours.append(layer.dense_weight())
        # Reference step: the gradient of the same loss at the reference weights, dense.
        wr = w.clone().requires_grad_(True)
        ((x @ wr.t() - y) ** 2).sum().backward()
        g = wr.grad
        grown, dropped = mask_before & ~mask, mask & ~mask_before
        w[dropped] = 0
        m[grown], v[grown], te[grown] = 0, 0, 0
        # Entries active before and after keep their gradient; grown ones use it (RigL's update).
        g = g * (mask_before & mask) + g * grown
        mask = mask_before
        t += 1
        te[mask] += 1
        m[mask] = BETA1 * m[mask] + (1 - BETA1) * g[mask]
        v[mask] = BETA2 * v[mask] + (1 - BETA2) * g[mask] ** 2
        s = te[mask]
        warm = torch.where(s < t, (s / warmup).clamp(max=1.0), torch.ones_like(s))
        w[mask] -= lr * factor * warm * (m[mask] / (1 - BETA1**s)) / ((v[mask] / (1 - BETA2**s)).sqrt() + eps)
        grown, dropped = mask_after & ~mask, mask & ~mask_after
        w[dropped] = 0
        m[grown], v[grown], te[grown] = 0, 0, 0
        mask = mask_after
        ref.append(w.clone())
    assert update.updates == 2 and [h[0] for h in update.history] == [10, 20]
    return ours, ref


@pytest.mark.parametrize("storage", ["dense", "compact"])
@pytest.mark.parametrize("grow, rule", [("random", "inverse"), ("gradient", "inverse_sqrt"), ("random", "none")])
def test_update_equals_a_dense_masked_adam_with_per_entry_steps(storage, grow, rule):
    ours, ref = reference_run(storage, grow, rule)
    for step, (a, b) in enumerate(zip(ours, ref), start=1):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6, step
    assert not torch.equal(ref[0], ref[-1])


def test_dense_parameters_get_plain_adamw_under_the_step_ramp():
    torch.manual_seed(0)
    model = build_model("cpu-micro", vocab_size=64, structure={"name": "sparse", "storage": "compact"}).double()
    twin = build_model("cpu-micro", vocab_size=64, structure={"name": "sparse", "storage": "compact"}).double()
    twin.load_state_dict(model.state_dict())
    smet = build_optimizer("smet", model, lr=1e-3, hparams={"warmup_form": "step_ramp", "density_lr": "inverse_sqrt"})
    adamw = build_optimizer("adamw", twin, lr=1e-3)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(1):  # one step: after it the sparse layers differ (density lr), and so would later gradients
        for mdl, opt in ((model, smet), (twin, adamw)):
            mdl(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        if not name.endswith("values"):
            assert torch.allclose(a, b, rtol=1e-12, atol=0), name
    assert not torch.allclose(model.layers[0].mlp.up_proj.values, twin.layers[0].mlp.up_proj.values)


@pytest.mark.parametrize("storage", ["dense", "compact"])
def test_state_is_kept_only_for_active_weights_and_resets_per_block(storage):
    torch.manual_seed(0)
    model = build_model("cpu-micro", vocab_size=64, structure={"name": "sparse", "density": 0.25, "block": 4,
                                                              "storage": storage})
    opt = build_optimizer("smet", model, lr=1e-3)
    model(torch.randint(0, 64, (2, 16))).pow(2).mean().backward()
    opt.step()
    for layer in sparse_layers(model):
        state = opt.state[layer.sparse_param]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (layer.n_active * 4,)
        assert state["block_step"].dtype == torch.int32 and state["block_step"].shape == (layer.n_active,)
    layer = sparse_layers(model)[0]
    mask = torch.zeros_like(layer.sparse_param, dtype=torch.bool)
    if storage == "compact":
        mask[:4] = True  # slot 0
    else:
        mask.view(-1, 4)[layer.block_index[0].long()] = True
    opt.reset_param_state(layer.sparse_param, mask)
    state = opt.state[layer.sparse_param]
    # The regrown block restarts at local step 1 (the release's: its first update uses step 2); the others
    # are at 1 after one step too, so the moments tell them apart.
    assert (state["block_step"] == 1).all()
    assert (state["exp_avg"][:4] == 0).all() and (state["exp_avg"][4:] != 0).any()
    assert state["step"].item() == 1  # the tensor's counter stays
    for group in opt.param_groups:
        group["warmup_form"] = "step_ramp"  # the paper's form restarts at 0
    opt.reset_param_state(layer.sparse_param, mask)
    assert state["block_step"][0] == 0 and (state["block_step"][1:] == 1).all()


def test_a_sparse_kind_without_its_layer_is_refused():
    param = nn.Parameter(torch.zeros(8))
    opt = SMET([{"params": [param], "kind": "sparse-values"}])
    param.grad = torch.zeros(8)
    with pytest.raises(ValueError, match="--structure sparse"):
        opt.step()
