"""AdamW's opt-in compiled step (issue 28): `AdamW(compiled=True)` updates each (device, dtype) bucket
of a group in one torch.compile'd graph whose lr is a tensor and whose bias corrections come from the
step tensors, so it is the eager step within fp32 rounding and a new lr compiles nothing.

Inductor's C++ compilation takes 10-20 s per graph on this CPU, so the inductor cases use a small
module (one group, one bucket); the placements and the recompilation checks trace through dynamo
with a counting backend that runs the captured graph as it is (lowmem.optim.adamw.COMPILE_BACKEND)."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import lowmem.optim
from lowmem.config import parse_key_values
from lowmem.models import build_model
from lowmem.optim import adamw
from lowmem.optim.adamw import AdamW, adamw_update
from lowmem.optim.state import reset_state

STEPS = 20


@pytest.fixture(autouse=True)
def _one_thread_fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


@pytest.fixture
def compile_counter(monkeypatch) -> CompileCounter:
    """Compile with a backend that counts the graphs dynamo hands it and runs them as traced."""
    counter = CompileCounter()
    monkeypatch.setattr(adamw, "COMPILE_BACKEND", counter)
    return counter


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))


def _set_gradients(model: torch.nn.Module, step: int) -> None:
    """Fixed random gradients per step, the same for every copy (the update rules are compared, not
    two trajectories whose gradients would drift apart)."""
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _lr(step: int) -> float:
    return 1e-2 * (0.2 + 0.8 * (step + 1) / STEPS)  # a warmup-like ramp: a new lr every step


def _train(model, optimizer, steps: range) -> None:
    for step in steps:
        _set_gradients(model, step)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step)  # a Python float, as the trainer writes it
        optimizer.step()


def _moved_relative(ours: torch.nn.Module, theirs: torch.nn.Module, start: torch.nn.Module) -> dict[str, float]:
    """Per parameter: ||ours - theirs|| / ||theirs - start||, how far apart relative to how far they moved."""
    return {name: ((a.double() - b.double()).norm() / (b.double() - s.double()).norm()).item()
            for (name, a), b, s in zip(ours.named_parameters(), theirs.parameters(), start.parameters())}


def test_compiled_matches_eager_over_20_steps_and_a_new_lr_compiles_nothing():
    """Inductor itself: 20 fp32 steps at a new lr each, every parameter within 1e-6 of the eager one
    relative to how far it moved; one graph compiled at the first step, none after."""
    start = _module()
    eager, compiled = copy.deepcopy(start), copy.deepcopy(start)
    eager_opt = AdamW(eager.parameters(), weight_decay=0.1)
    compiled_opt = AdamW(compiled.parameters(), weight_decay=0.1, compiled=True)
    _train(eager, eager_opt, range(STEPS))
    _train(compiled, compiled_opt, range(1))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, dict(counters["stats"])
    _train(compiled, compiled_opt, range(1, STEPS))
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    differences = _moved_relative(compiled, eager, start)
    assert max(differences.values()) <= 1e-6, differences
    assert all(c["step"].item() == STEPS for c in compiled_opt.state.values())


def test_a_resumed_compiled_run_continues_identically(tmp_path):
    """10 steps, the state saved and loaded (weights_only) into a fresh model and optimizer, 10 more:
    bit for bit the 20 uninterrupted compiled steps (the same graph serves both)."""
    start = _module()
    whole = copy.deepcopy(start)
    whole_opt = AdamW(whole.parameters(), weight_decay=0.1, compiled=True)
    _train(whole, whole_opt, range(STEPS))

    first = copy.deepcopy(start)
    first_opt = AdamW(first.parameters(), weight_decay=0.1, compiled=True)
    _train(first, first_opt, range(STEPS // 2))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _module()
    resumed.load_state_dict(saved["model"])
    resumed_opt = AdamW(resumed.parameters(), weight_decay=0.1, compiled=True)
    resumed_opt.load_state_dict(saved["optimizer"])
    assert all(group["compiled"] for group in resumed_opt.param_groups)
    _train(resumed, resumed_opt, range(STEPS // 2, STEPS))
    for (name, a), b in zip(resumed.named_parameters(), whole.parameters()):
        assert torch.equal(a, b), name
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("backend", ["counter", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("eps_placement", adamw.EPS_PLACEMENTS)
@pytest.mark.parametrize("decay", adamw.DECAY_PLACEMENTS)
def test_every_placement_is_the_eager_update(eps_placement, decay, backend, monkeypatch):
    """The functional core, both eps and both decay placements, per-tensor step counts that differ
    (one tensor restarted, as after a momentum reset): 20 steps within 1e-6 of the eager foreach path.
    The counting backend checks the traced math; inductor's code for each placement (a graph each,
    ~40 s cold on two busy cores) runs with the slow tests."""
    if backend == "counter":
        monkeypatch.setattr(adamw, "COMPILE_BACKEND", CompileCounter())
    torch.manual_seed(1)
    shapes = [(24, 8), (8,), (5, 3, 2)]
    start = [torch.randn(shape) for shape in shapes]

    def run(update):
        params = [p.clone() for p in start]
        moments = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(float(i == 1) * 7) for i in range(len(params))]  # the second one started later
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(step)
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            update(params, grads, *moments, steps, lr=_lr(step), beta1=0.9, beta2=0.999, eps=1e-6,
                   weight_decay=0.1, eps_placement=eps_placement, decay=decay)
        return params, steps

    eager, eager_steps = run(adamw_update)
    compiled, compiled_steps = run(functools.partial(adamw_update, compiled=True))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert [s.item() for s in compiled_steps] == [s.item() for s in eager_steps] == [20.0, 27.0, 20.0]
    for a, b, s in zip(compiled, eager, start):
        assert ((a - b).norm() / (b - s).norm()).item() <= 1e-6


def test_a_changing_lr_and_a_momentum_reset_do_not_recompile(compile_counter):
    """cpu-tiny's four role groups, each one bucket: three graphs at the first step (the embedding's and
    the head's buckets are alike, one tensor of one shape: they share one), then none, whatever the lr
    does and however the step counters part (a reset restarts some)."""
    model = build_model("cpu-tiny", vocab_size=64)
    optimizer = lowmem.optim.build("adamw", model, compiled=True)
    assert len(optimizer.param_groups) == 4
    _train(model, optimizer, range(1))
    assert compile_counter.frame_count == 3
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(model, optimizer, range(1, 6))
        reset_state(optimizer, params=[next(model.parameters())])
        _train(model, optimizer, range(6, 10))
    assert compile_counter.frame_count == 3
    assert not counters["graph_break"], dict(counters["graph_break"])
    steps = sorted({state["step"].item() for state in optimizer.state.values()})
    assert steps == [4.0, 10.0]


def test_the_option_from_the_command_line_validated_and_absent_from_old_checkpoints():
    hparams = parse_key_values(["compiled=true"], "--opt")
    assert hparams == {"compiled": True}
    optimizer = lowmem.optim.build("adamw", build_model("cpu-tiny", vocab_size=64), **hparams)
    assert all(group["compiled"] for group in optimizer.param_groups)
    model = _module()
    with pytest.raises(ValueError, match="compiled"):
        AdamW(model.parameters(), compiled="yes")
    # A checkpoint from before the key: its groups lack it, and the loaded optimizer steps eagerly.
    old = AdamW(model.parameters())
    state = old.state_dict()
    for group in state["param_groups"]:
        del group["compiled"]
    loaded = AdamW(model.parameters(), compiled=True)
    loaded.load_state_dict(state)
    assert [group["compiled"] for group in loaded.param_groups] == [False]


def test_meta_parameters_and_8_bit_states_keep_the_eager_path(compile_counter):
    """The memory estimate steps on meta tensors: eager there, nothing compiled. With state_bits=8 the
    quantized matrix is updated eagerly, bit for bit as without `compiled`; the rest is compiled."""
    with torch.device("meta"):
        meta = _module()
    for p in meta.parameters():
        p.grad = torch.empty_like(p)
    AdamW(meta.parameters(), compiled=True).step()
    assert compile_counter.frame_count == 0

    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))  # 8192 elements: quantized
    results = []
    for compiled in (False, True):
        model = copy.deepcopy(start)
        optimizer = AdamW(model.parameters(), state_bits=8, compiled=compiled)
        _train(model, optimizer, range(3))
        assert "exp_avg_codes" in optimizer.state[model[0].weight]
        results.append(model)
    assert torch.equal(results[0][0].weight, results[1][0].weight)
    assert compile_counter.frame_count == 1
    differences = _moved_relative(results[1], results[0], start)
    assert max(differences.values()) <= 1e-6, differences


def test_inside_backward_the_compiled_step_gives_bitwise_the_weights_of_the_compiled_step_after_it():
    # --gradient-release runs the step one parameter at a time (a graph per bucket shape): the same
    # elementwise code per tensor, so the same bits as the whole step's graphs.
    from lowmem.distributed import DistInfo
    from lowmem.testing import TINY
    from lowmem.train.step import AfterBackward, InBackward, train_step

    def trained(release: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(TINY)
        optimizer = AdamW(model.parameters(), lr=1e-3, compiled=True)
        update = InBackward(optimizer, model) if release else AfterBackward(optimizer)
        for step in range(6):
            optimizer.param_groups[0]["lr"] = _lr(step)
            tokens = torch.randint(0, TINY.vocab_size, (8, 17), generator=torch.Generator().manual_seed(step))
            train_step(model, update, [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}], info=DistInfo())
            optimizer.zero_grad(set_to_none=True)
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    after, inside = trained(release=False), trained(release=True)
    torch.manual_seed(0)
    start = dict(build_model(TINY).named_parameters())
    assert all(not torch.equal(after[name], start[name]) for name in after)  # every weight moved
    assert [name for name in after if not torch.equal(after[name], inside[name])] == []


def _train_ten_steps(model: torch.nn.Module, optimizer, counter: CompileCounter | None) -> int | None:
    """Ten steps at a new lr each; with `counter` (a compiled optimizer), the graphs the first step
    compiled, checked to be all: steps 2-10 would raise on a recompilation."""
    _train(model, optimizer, range(1))
    if counter is None:
        _train(model, optimizer, range(1, 10))
        return None
    graphs = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(model, optimizer, range(1, 10))
    assert counter.frame_count == graphs
    return graphs


@pytest.mark.parametrize("method", ["galore", "fira", "apollo-mini", "muon", "smet"])
def test_other_methods_compile_the_tensors_they_leave_to_adamw(method, compile_counter):
    """`compiled=True` on a method with an AdamW part (the embedding, head and vectors of GaLore, Fira,
    APOLLO(-Mini), Muon; SMET's dense tensors once past their warm-up): those tensors take the compiled update, within 1e-6 of the eager one relative to
    how far they moved, with no recompilation as the lr changes; the method's own matrices stay eager,
    bit for bit. `--opt compiled=true` reaches it, and a checkpoint without the key steps eagerly."""
    hparams = {"muon": {"ns_dtype": "float32"}, "smet": {"warmup": 1}}.get(method, {"rank": 4, "update_proj_gap": 4})
    from lowmem.assembly import build_model as build_structured

    def fresh() -> torch.nn.Module:  # built again, not deep-copied: a sparse layout is not copied along
        torch.manual_seed(0)
        return build_structured("cpu-tiny", vocab_size=64, structure={"name": "sparse"} if method == "smet" else None)

    start = fresh()
    models, optimizers = [], []
    for compiled in (False, True):
        model = fresh()
        optimizer = lowmem.optim.build(method, model, lr=1e-2, compiled=compiled, **hparams)
        graphs = _train_ten_steps(model, optimizer, compile_counter if compiled else None)
        assert (graphs >= 1) if compiled else graphs is None
        models.append(model)
        optimizers.append(optimizer)
    eager, compiled = models
    hidden = {id(p) for g in optimizers[1].param_groups if g.get("role") == "hidden" for p in g["params"]}
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        if id(a) in hidden:
            assert torch.equal(a, b), name
    differences = _moved_relative(compiled, eager, start)
    assert max(differences.values()) <= 1e-6, differences

    from_cli = lowmem.optim.build(method, start, **parse_key_values(["compiled=true"], "--opt"), **hparams)
    assert all(group["compiled"] for group in from_cli.param_groups)
    state = optimizers[1].state_dict()
    for group in state["param_groups"]:
        del group["compiled"]
    loaded = lowmem.optim.build(method, fresh(), compiled=True, **hparams)
    loaded.load_state_dict(state)
    assert not any(group["compiled"] for group in loaded.param_groups)
    with pytest.raises(ValueError, match="compiled"):
        lowmem.optim.build(method, start, compiled="yes", **hparams)


@pytest.fixture
def inductor_rows(monkeypatch):
    """SCALE(compiled=True) without its fused CPU kernels: every row-normalized matrix through inductor's
    graph, as on a GPU or in bf16."""
    from lowmem.optim import scale_kernels

    monkeypatch.setattr(scale_kernels, "usable", lambda *tensors: False)


def test_scale_compiled_rows_match_eager_with_inductor_and_a_new_lr_compiles_nothing(inductor_rows):
    """SCALE(compiled=True) on plain Linear layers (role-less: every matrix hidden, normalized within its
    rows), through inductor (the kernels off): inductor's fused norm-and-update over 20 fp32 steps at a new
    lr each, with weight decay, within 1e-6 of the eager step relative to how far each weight moved; the
    graphs compiled at the first step, none after."""
    from lowmem.optim.scale import SCALE

    start = _module()
    eager, compiled = copy.deepcopy(start), copy.deepcopy(start)
    _train(eager, SCALE(eager.parameters(), weight_decay=0.1), range(STEPS))
    compiled_opt = SCALE(compiled.parameters(), weight_decay=0.1, compiled=True)
    _train(compiled, compiled_opt, range(1))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2, dict(counters["stats"])  # the matrices' rows, the vectors' AdamW
    _train(compiled, compiled_opt, range(1, STEPS))
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    differences = _moved_relative(compiled, eager, start)
    assert max(differences.values()) <= 1e-6, differences


def _name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


@pytest.mark.parametrize("kernels", [True, False], ids=["fused-kernels", "inductor"])
def test_scale_compiles_the_rows_and_keeps_the_embedding_eager(kernels, compile_counter, request):
    """On a model with roles, within 1e-6 of eager: in fp32 on the CPU the hidden matrices and the head
    (its momentum's EMA too) take the fused kernel, the embedding the kernel's column sums, and only the
    vectors' AdamW is a graph; without the kernels (GPUs, bf16) the hidden rows and the head's (its EMA
    eager) are graphs and the embedding (a norm across rows) stays eager, bit for bit. An ablation whose
    matrices are not normalized within rows compiles nothing of theirs. `--opt compiled=true` reaches it,
    and a checkpoint without the key steps eagerly."""
    from lowmem.testing import TINY

    if not kernels:
        request.getfixturevalue("inductor_rows")

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(TINY)

    start = fresh()
    models = []
    for compiled in (False, True):
        model = fresh()
        optimizer = lowmem.optim.build("scale", model, lr=1e-2, weight_decay=0.1, compiled=compiled)
        graphs = _train_ten_steps(model, optimizer, compile_counter if compiled else None)
        # kernels: the vectors' AdamW; inductor: the hidden rows, the head's (own group), the vectors' AdamW
        assert graphs == (None if not compiled else 1 if kernels else 3)
        models.append(model)
    eager, compiled = models
    assert torch.equal(compiled.embed_tokens.weight, eager.embed_tokens.weight) is not kernels
    for module in (compiled.lm_head, compiled.layers[0].mlp.up_proj):  # compiled: fp32 rounding of its own
        assert not torch.equal(module.weight, dict(eager.named_modules())[_name(compiled, module)].weight)
    differences = _moved_relative(compiled, eager, start)
    assert max(differences.values()) <= 1e-6, differences
    if not kernels:
        return

    torch._dynamo.reset()
    compile_counter.frame_count = 0
    model = fresh()
    _train(model, lowmem.optim.build("sgd-sign", model, compiled=True), range(2))
    assert compile_counter.frame_count == 1  # the vectors' AdamW only
    from_cli = lowmem.optim.build("scale", start, **parse_key_values(["compiled=true"], "--opt"))
    assert all(group["compiled"] for group in from_cli.param_groups)
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        del group["compiled"]
    loaded = lowmem.optim.build("scale", fresh(), compiled=True)
    loaded.load_state_dict(state)
    assert not any(group["compiled"] for group in loaded.param_groups)
    with pytest.raises(ValueError, match="compiled"):
        lowmem.optim.build("scale", start, compiled="yes")
