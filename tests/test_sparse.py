"""The sparse structure and the topology intervention: storages agree, masks and topology updates do
what methods.md §9 says, naive AdamW shows the cold start, memory is counted to the byte, runs resume
bitwise across a topology update, and two DDP processes follow one with identical masks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_overrides
from torch import nn

from lowmem.assembly import build_model, build_optimizer
from lowmem.config import load_config
from lowmem.errors import ConfigError
from lowmem.interventions import RunContext, build_intervention
from lowmem.memory.estimate import estimate_memory
from lowmem.memory.measure import optimizer_state_bytes
from lowmem.optim.adamw import AdamW
from lowmem.optim.roles import named_roles
from lowmem.registry import INTERVENTIONS, STRUCTURES
from lowmem.structure import build_structure
from lowmem.structure.sparse import SparseLinear, TopologyUpdate, drop_fraction, erk_densities, sparse_layers
from lowmem.train import checkpoint
from lowmem.train.trainer import train

BETA1, BETA2 = 0.9, 0.999


def sparse_model(storage: str, density: float = 0.5, block: int = 4, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cpu-micro", vocab_size=64, structure={"name": "sparse", "density": density, "block": block,
                                                              "storage": storage}).to(dtype)


def one_layer(storage: str, density: float = 0.5, block: int = 1, out: int = 8, inp: int = 8) -> SparseLinear:
    torch.manual_seed(0)
    linear = nn.Linear(inp, out, bias=False, dtype=torch.float64)
    return SparseLinear(linear, density, block, storage, torch.Generator().manual_seed(0))


def group_of(layer: SparseLinear) -> dict:
    return {"params": [layer.sparse_param], "role": "hidden", "kind": layer.param_kinds[next(iter(layer.param_kinds))]}


def test_registered_and_built_from_specs():
    assert "sparse" in STRUCTURES.names() and "topology" in INTERVENTIONS.names()
    structure = build_structure({"name": "sparse", "density": 0.25, "block": 16, "storage": "compact"})
    assert (structure.density, structure.block, structure.storage) == (0.25, 16, "compact")
    assert build_intervention("topology", every=50, grow="gradient").every == 50


@pytest.mark.parametrize("spec, fragment", [
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"block": 0}, "block"),
    ({"storage": "csr"}, "storage"), ({"distribution": "normal"}, "distribution"), ({"block": 7}, "divide"),
])
def test_bad_structure_settings_are_config_errors_that_name_the_fix(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_model("cpu-micro", vocab_size=64, structure={"name": "sparse", **spec})


@pytest.mark.parametrize("settings, fragment", [
    ({"every": 0}, "every"), ({"drop": 1.2}, "drop"), ({"grow": "magnitude"}, "grow"),
    ({"grow": "gradient", "every": 1}, "every >= 2"),
])
def test_bad_topology_settings_are_config_errors(settings, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_intervention("topology", **settings)


def test_topology_on_a_dense_model_names_the_fix():
    model = build_model("cpu-micro", vocab_size=64)
    update = TopologyUpdate(every=2)
    update.setup(RunContext(total_steps=10))
    with pytest.raises(ConfigError, match="--structure sparse"):
        update.after_step(2, model, AdamW(model.parameters()))


@pytest.mark.parametrize("storage, kind", [("dense", "masked"), ("compact", "sparse-values")])
def test_masks_hold_density_in_contiguous_blocks_and_declare_their_kind(storage, kind):
    model = sparse_model(storage, density=0.25, block=8)
    layers = sparse_layers(model)
    assert len(layers) == 7  # q, k, v, o, gate, up, down of cpu-micro's one block
    for layer in layers:
        assert layer.n_active == round(0.25 * layer.n_blocks) and layer.block_index.dtype == torch.int32
        assert layer.param_kinds == {next(iter(layer.param_kinds)): kind}
        blocks = layer.dense_weight().view(-1, 8)
        nonzero = blocks.abs().sum(1) > 0
        assert torch.equal(nonzero, layer.block_mask())  # every active block holds its init, the rest 0
    roles = named_roles(model)
    assert all(roles[name] == "hidden" for name in roles if name.endswith(("q_proj.weight", "q_proj.values")))


def test_erk_gives_the_total_density_and_denser_small_layers():
    shapes = [(64, 64), (256, 64), (512, 512)]
    densities = erk_densities(shapes, 0.1)
    total = sum(d * o * i for d, (o, i) in zip(densities, shapes)) / sum(o * i for o, i in shapes)
    assert total == pytest.approx(0.1) and 1 > densities[0] > densities[1] > densities[2]
    capped = erk_densities([(4, 4), (512, 512)], 0.5)
    assert capped[0] == 1.0 and sum(d * o * i for d, (o, i) in zip(capped, [(4, 4), (512, 512)])) / (16 + 512 * 512) == pytest.approx(0.5)
    model = build_model("cpu-micro", vocab_size=64, structure={"name": "sparse", "density": 0.5, "distribution": "erk"})
    layers = sparse_layers(model)
    active = sum(layer.n_active for layer in layers) / sum(layer.n_blocks for layer in layers)
    assert active == pytest.approx(0.5, abs=0.01) and len({round(layer.density, 3) for layer in layers}) > 1


def test_dense_and_compact_storage_compute_the_same_and_compact_keeps_no_dense_gradient():
    dense, compact = sparse_model("dense"), sparse_model("compact")
    x = torch.randint(0, 64, (2, 16))
    for model in (dense, compact):
        model(x).pow(2).mean().backward()
    for a, b in zip(sparse_layers(dense), sparse_layers(compact)):
        assert torch.equal(a.block_index, b.block_index)
        assert torch.allclose(a.dense_weight(), b.dense_weight(), rtol=0, atol=0)
        assert b.values.grad.shape == (b.n_active * b.block_size,)  # compact: only the active entries
        assert a.weight.grad.shape == a.weight.shape
        active_grad = a.weight.grad.view(-1, a.block_size).index_select(0, a.block_index.long()).reshape(-1)
        assert torch.allclose(active_grad, b.values.grad, rtol=1e-12, atol=1e-15)
        inactive = ~a.block_mask()
        assert a.weight.grad.view(-1, a.block_size)[inactive].abs().sum() == 0  # masked in backward


def test_dropped_weights_stay_zero_under_adamw_with_dense_storage():
    model = sparse_model("dense")
    opt = build_optimizer("adamw", model, lr=1e-2)
    update = TopologyUpdate(every=3, drop=0.3)
    update.setup(RunContext(total_steps=20))
    for step in range(1, 10):
        model(torch.randint(0, 64, (2, 16))).pow(2).mean().backward()
        update.before_step(step, model, opt)
        opt.step()
        opt.zero_grad()
        update.after_step(step, model, opt)
        for layer in sparse_layers(model):
            assert layer.weight.detach().view(-1, layer.block_size)[~layer.block_mask()].abs().sum() == 0, step


def test_drop_fraction_is_cosine_annealed_from_p0_to_p_end():
    assert drop_fraction(0, 1000, 0.2, 0.005) == pytest.approx(0.2)
    assert drop_fraction(500, 1000, 0.2, 0.005) == pytest.approx((0.2 + 0.005) / 2)
    assert drop_fraction(1000, 1000, 0.2, 0.005) == pytest.approx(0.005)
    update = TopologyUpdate(every=100)
    update.setup(RunContext(total_steps=350))
    assert [s for s in range(1, 351) if update.is_update(s)] == [100, 200, 300]


@pytest.mark.parametrize("storage", ["dense", "compact"])
@pytest.mark.parametrize("grow", ["random", "gradient"])
def test_an_update_drops_the_smallest_blocks_and_grows_as_many_new_ones_at_zero(storage, grow):
    layer = one_layer(storage, density=0.5, block=2, out=8, inp=16)
    model = nn.Sequential(layer)
    opt = AdamW([group_of(layer)], lr=1e-3)
    update = TopologyUpdate(every=2, drop=0.25, drop_end=0.25, grow=grow)
    update.setup(RunContext(total_steps=10))
    x = torch.randn(5, 16, dtype=torch.float64)
    update.after_step(1, model, opt)  # arms the layers for step 2 (RigL keeps the dense gradient)
    layer(x).pow(2).sum().backward()
    before = layer.block_mask().clone()
    scores = layer.dense_weight().view(-1, 2).abs().sum(1)  # L1, the release's block score
    if grow == "gradient":
        dense_grad = layer.dense_grad.view(-1, 2).pow(2).sum(1).clone()
    update.before_step(2, model, opt)  # RigL updates here, with the step's gradient
    opt.zero_grad()
    update.after_step(2, model, opt)  # SET here, after the step
    after = layer.block_mask()
    dropped, grown = before & ~after, after & ~before
    n = layer.n_active - max(1, math.floor(layer.n_active * (1 - 0.25)))
    assert dropped.sum() == grown.sum() == n and after.sum() == before.sum()
    assert scores[dropped].max() <= scores[before & after].min()  # the smallest-magnitude active blocks
    assert layer.dense_weight().view(-1, 2)[grown].abs().sum() == 0  # grown weights start at 0
    if grow == "gradient":  # RigL: the largest dense-gradient blocks among the inactive ones
        assert dense_grad[grown].min() >= dense_grad[~before & ~grown].max()
        assert layer.dense_grad is None and not layer.capture  # dropped after use
    assert update.updates == 1 and update.history == [(2, 0.25, n)]


def adam_first_update(t: int) -> float:
    """|first update| / lr of an entry whose m, v are 0 under a tensor step t (constant gradient)."""
    return (1 - BETA1) / (1 - BETA1**t) / math.sqrt((1 - BETA2) / (1 - BETA2**t))


def run_linear(layer: SparseLinear, opt: torch.optim.Optimizer, update: TopologyUpdate, coeff: torch.Tensor,
               steps: range, on_step=None) -> None:
    """Train `layer` on the linear loss sum(W * coeff): the gradient is `coeff` on the active entries."""
    eye = torch.eye(layer.in_features, dtype=torch.float64)
    for step in steps:
        (layer(eye) * coeff.t()).sum().backward()
        update.before_step(step, nn.Sequential(layer), opt)
        before = layer.dense_weight()
        opt.step()
        opt.zero_grad()
        if on_step:
            on_step(step, before, layer.dense_weight())
        update.after_step(step, nn.Sequential(layer), opt)


@pytest.mark.parametrize("storage, t0", [("dense", 300), ("compact", 4000)])
def test_naive_adamw_gives_regrown_weights_the_cold_start(storage, t0):
    """After a topology update at step T0, a regrown weight's first update under AdamW is
    (1-beta1)/sqrt(1-beta2) ~ 3.16 x lr x sign(g): zero moments, the tensor's large step count."""
    lr = 1e-3
    layer = one_layer(storage)
    opt = AdamW([group_of(layer)], lr=lr, betas=(BETA1, BETA2), eps=1e-12)
    update = TopologyUpdate(every=t0, drop=0.2, drop_end=0.2, grow="random")
    update.setup(RunContext(total_steps=2 * t0))
    coeff = torch.randn(8, 8, dtype=torch.float64)
    run_linear(layer, opt, update, coeff, range(1, t0))
    before = layer.block_mask().clone()
    moves: list[torch.Tensor] = []
    run_linear(layer, opt, update, coeff, range(t0, t0 + 4), lambda s, b, a: moves.append(a - b))
    grown = (layer.block_mask() & ~before).view(8, 8)
    assert grown.sum() == 32 - math.floor(32 * (1 - 0.2))  # the release's count: 7 of 32 at p = 0.2
    assert moves[0][grown].abs().max() == 0  # SET updates after step T0: they were inactive in it
    first = moves[1][grown] / (-lr * coeff.sign()[grown])
    assert torch.allclose(first, torch.full_like(first, adam_first_update(t0 + 1)), rtol=1e-9)
    assert (1 - BETA1) / math.sqrt(1 - BETA2) == pytest.approx(3.162, abs=1e-3)
    if t0 >= 4000:  # bias corrections ~1: the first update is ~3.16 lr (1.6 lr at t = 300)
        assert adam_first_update(t0 + 1) == pytest.approx(3.162, rel=0.01) and first.min() > 3.1
    kept = (layer.block_mask() & before).view(8, 8)
    assert moves[1][kept].abs().max() == pytest.approx(lr, rel=1e-6)  # the steady step of the other weights


def _measured(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    params = [p for p in model.parameters()]
    return {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer_states": optimizer_state_bytes(opt),
        "index_bytes": sum(b.numel() * b.element_size() for layer in sparse_layers(model) for b in layer.buffers()),
    }


@pytest.mark.parametrize("storage", ["dense", "compact"])
@pytest.mark.parametrize("optimizer", ["adamw", "smet"])
@pytest.mark.parametrize("block", [1, 16])
def test_lowmem_memory_equals_the_measured_bytes(storage, optimizer, block):
    structure = {"name": "sparse", "density": 0.25, "block": block, "storage": storage}
    torch.manual_seed(0)
    model = build_model("cpu-micro", vocab_size=64, structure=structure)
    opt = build_optimizer(optimizer, model, lr=1e-3)
    update = TopologyUpdate(every=2)
    update.setup(RunContext(total_steps=10))
    for step in (1, 2):
        model(torch.randint(0, 64, (2, 16))).pow(2).mean().backward()
        update.before_step(step, model, opt)
        opt.step()
    measured = _measured(model, opt)
    est = estimate_memory("cpu-micro", optimizer, {"lr": 1e-3}, vocab_size=64, precision="fp32", seq_len=64,
                          structure=structure)
    assert {k: getattr(est, k) for k in measured} == measured
    layers = sparse_layers(model)
    if storage == "compact":  # gradients of the sparse layers: k*B entries each, not out*in
        assert sum(l.values.grad.numel() for l in layers) == sum(l.n_active for l in layers) * block


def test_lowmem_memory_command_takes_a_structure(capsys):
    from lowmem.cli import main

    code = main(["memory", "--model", "cpu-micro", "--vocab-size", "64", "--optimizer", "smet", "--precision", "fp32",
                 "--seq-len", "64", "--structure", "sparse:density=0.5,block=16,storage=compact"])
    out = capsys.readouterr().out
    est = estimate_memory("cpu-micro", "smet", {}, vocab_size=64, precision="fp32", seq_len=64,
                          structure={"name": "sparse", "density": 0.5, "block": 16, "storage": "compact"})
    assert code == 0 and "structure indices" in out and f"{est.weight_elements:,}" in out
    dense = estimate_memory("cpu-micro", "smet", {}, vocab_size=64, precision="fp32", seq_len=64)
    assert est.weights < dense.weights and est.optimizer_states < dense.optimizer_states


def _losses(run_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _overrides(corpus, cache, output, grow="gradient", **extra):
    return tiny_run_overrides(corpus, cache, output, **{
        "model": {"preset": "cpu-micro", "structure": {"name": "sparse", "density": 0.5, "block": 4, "storage": "compact"}},
        "data.vocab_size": 300, "optim.name": "smet", "optim.hparams": {"warmup": 3},
        "optim.interventions": [{"name": "topology", "every": 4, "drop": 0.3, "grow": grow}],
        "train.steps": 10, **extra})


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_a_run_resumes_bitwise_across_a_topology_update_and_checkpoints_carry_it(grow, tiny_corpus, token_cache, tmp_path):
    whole = tmp_path / "whole"
    train(load_config(overrides=_overrides(tiny_corpus, token_cache, whole, grow)))
    split = tmp_path / "split"
    train(load_config(overrides=_overrides(tiny_corpus, token_cache, split, grow, **{
        "train.checkpoint_every": 3, "train.keep_checkpoints": 5})))
    step3 = split / "checkpoints" / "step-00000003"
    body = checkpoint.load_whole(step3)
    assert any(k.endswith("block_index") for k in body["model"])
    assert body["structure"]["capture"].all() == (grow == "gradient")  # armed for the update at step 4
    assert body["interventions"]["topology"]["updates"] == 0
    step6 = checkpoint.load_whole(split / "checkpoints" / "step-00000006")
    topo = step6["interventions"]["topology"]
    assert topo["updates"] == 1 and topo["history"][0, 0] == 4 and topo["total_steps"] == 10
    states = step6["optimizer"]["state"].values()
    block_steps = [s["block_step"] for s in states if "block_step" in s]
    assert block_steps and any((b < 6).any() for b in block_steps)  # regrown blocks restarted their local step
    index3 = {k: v for k, v in body["model"].items() if k.endswith("block_index")}
    assert any(not torch.equal(index3[k], step6["model"][k]) for k in index3)  # the update moved blocks
    train(load_config(overrides=_overrides(tiny_corpus, token_cache, split, grow, **{
        "train.checkpoint_every": 3, "train.keep_checkpoints": 5})), resume=step3)
    assert _losses(split) == _losses(whole)  # bitwise, through the updates at 4 and 8


@pytest.mark.distributed
def test_two_ddp_processes_follow_one_with_identical_masks(tiny_corpus, token_cache, tmp_path):
    paths = {}
    for name, extra in (("single", {}), ("ddp", {"train.distributed": "ddp"})):
        overrides = _overrides(tiny_corpus, token_cache, tmp_path / name, "gradient", **{
            "train.steps": 6, "train.batch_size": 4, "train.micro_batch_size": 2, **extra})
        overrides["optim.interventions"][0]["every"] = 3
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(load_config(overrides=overrides).to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, nproc in (("single", 1), ("ddp", 2)):
        command = [sys.executable, "-m", "lowmem.cli", "train", "--config", str(paths[name])]
        if nproc > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *command[1:]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    final = tmp_path / "ddp" / "checkpoints" / "step-00000006"
    ddp = checkpoint.load_whole(final)["model"]  # DCP keeps one copy of what every DDP rank holds
    single = checkpoint.load_whole(tmp_path / "single" / "checkpoints" / "step-00000006")["model"]
    indices = [k for k in single if k.endswith("block_index")]
    assert indices
    for key in indices:
        assert torch.equal(ddp[key], single[key])


@pytest.mark.parametrize("storage", ["dense", "compact"])
def test_bf16_autocast_trains_a_sparse_model_with_gradients_in_the_parameters_dtype(storage):
    """Issue 23: under bf16 autocast backward multiplied a bf16 gradient by the fp32 weight ("expected
    m1 and m2 to have the same dtype"). The layer now computes in bf16 as an nn.Linear would, and its
    gradients match an fp32 run to bf16's precision."""
    model = sparse_model(storage, dtype=torch.float32)
    twin = sparse_model(storage, dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids).float().pow(2).mean()
    loss.backward()
    twin(ids).pow(2).mean().backward()
    for a, b in zip(sparse_layers(model), sparse_layers(twin)):
        grad, reference = a.sparse_param.grad, b.sparse_param.grad
        assert grad.dtype == torch.float32 and grad.shape == reference.shape
        assert ((grad - reference).norm() / reference.norm()).item() < 3e-2
    opt = build_optimizer("smet", model, lr=1e-3)
    opt.step()  # the update takes the fp32 gradients
    assert all(torch.isfinite(p).all() for p in model.parameters())
