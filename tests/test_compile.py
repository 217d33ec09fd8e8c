"""`--compile` (issue 28): each transformer block through torch.compile trains what eager trains.

The fast tests lower the traced graphs with the "aot_eager" backend: dynamo's tracing of every block,
structure and checkpointing mode, and AOTAutograd's backward, without inductor's C++ code generation
(minutes on two cores). The slow test runs inductor itself; `make bench-tests` runs it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_run_overrides

from lowmem.config import load_config
from lowmem.models import llama
from lowmem.models.chunked_loss import IGNORE_INDEX
from lowmem.train.trainer import train


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def _run(tiny_corpus, token_cache, output, **extra) -> dict:
    overrides = {"train.steps": 5, "train.warmup_ratio": 0.4, **extra}
    return train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, output, **overrides)))


def _assert_compiled_trains_as_eager(tiny_corpus, token_cache, tmp_path, **setting) -> dict:
    _run(tiny_corpus, token_cache, tmp_path / "eager", **setting)
    torch._dynamo.reset()
    summary = _run(tiny_corpus, token_cache, tmp_path / "compiled", **setting, **{"train.compile": True})
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(compiled) == len(eager) == 5
    # fp32: the same operations, fused or reordered at most; the tolerance of fp32 rounding.
    assert compiled == pytest.approx(eager, rel=1e-6), (compiled, eager)
    assert summary["compiled"] and summary["first_step_seconds"] > 0
    return summary


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(llama, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


SLOW = pytest.mark.slow


@pytest.mark.parametrize("setting", [
    {},
    {"model.structure": {"name": "lora", "rank": 4}, "train.activation_checkpointing": "block",
     "train.chunked_loss": "on", "train.loss_chunk": 64},
    {"model.structure": {"name": "sparse", "density": 0.5, "block": 4, "storage": "compact"}, "optim.name": "smet",
     "train.gradient_release": True},
    pytest.param({"train.activation_checkpointing": "selective"}, marks=SLOW),
    pytest.param({"model.structure": {"name": "lowrank", "rank": 8}}, marks=SLOW),
    pytest.param({"optim.name": "scale", "train.gradient_release": True}, marks=SLOW),
    pytest.param({"train.precision": "bf16-autocast"}, marks=SLOW),
], ids=["dense", "lora-block-ckpt-chunked", "sparse-smet-release", "selective", "lowrank", "scale-release",
        "bf16-autocast"])
def test_compiled_blocks_train_what_eager_blocks_train(setting, aot_eager, tiny_corpus, token_cache, tmp_path):
    if setting.get("train.precision") == "bf16-autocast":
        # bf16 rounds differently once ops are reordered: compare at bf16's precision.
        _run(tiny_corpus, token_cache, tmp_path / "eager", **setting)
        torch._dynamo.reset()
        _run(tiny_corpus, token_cache, tmp_path / "compiled", **setting, **{"train.compile": True})
        assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-2)
        return
    _assert_compiled_trains_as_eager(tiny_corpus, token_cache, tmp_path, **setting)


def test_a_changing_lr_does_not_recompile(aot_eager, tiny_corpus, token_cache, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    # The warmup and cosine change the lr at every one of the 8 steps; the blocks are traced for training
    # and for evaluation (no grad), then reused: no frame is compiled again after the first steps.
    _run(tiny_corpus, token_cache, tmp_path / "run", **{"train.steps": 8, "train.compile": True})
    traced = sum(counters["frames"].values()) if "frames" in counters else None
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "nothing was compiled"
    counters.clear()
    _run(tiny_corpus, token_cache, tmp_path / "longer", **{"train.steps": 16, "train.compile": True,
                                                            "optim.lr": 1e-3})
    # Twice the steps at another lr: the same compiled graphs serve it, nothing new is traced.
    assert counters["stats"]["unique_graphs"] == 0, (traced, dict(counters["stats"]))


def test_compile_is_a_results_affecting_setting_on_resume():
    from lowmem.config import HARMLESS

    # Fused kernels may round differently from eager ones: a resume that switches compile on or off
    # would not continue bit for bit, so it is refused like any results-affecting change.
    assert "train.compile" not in HARMLESS


@pytest.mark.slow
def test_inductor_compiled_blocks_train_what_eager_blocks_train(tiny_corpus, token_cache, tmp_path):
    torch._dynamo.reset()
    summary = _assert_compiled_trains_as_eager(tiny_corpus, token_cache, tmp_path)
    assert summary["first_step_seconds"] > summary["wall_seconds"] / 10  # the compilation is in the first step


def test_the_plain_loss_is_compiled_with_the_blocks_and_equals_eager(monkeypatch):
    """`compile_blocks` compiles the plain loss of a bias-free linear head too (the head's matmul with its
    softmax: one graph besides the block's), and the chunked loss chunk by chunk (one more graph, and one
    for a shorter last chunk). Loss and gradients equal eager's to fp32 rounding."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from lowmem.models import build_model
    from lowmem.testing import TINY

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(llama, "COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    tokens = torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(TINY)
        if compiled:
            model.compile_blocks()
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert counter.frame_count == 2  # the block (one graph for every block) and the loss
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-7)

    chunked = []
    labels = tokens[:, 1:].clone()
    labels[0, :3] = IGNORE_INDEX
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(TINY)
        model.loss_chunk = 12  # 32 tokens: chunks of 12, 12 and 8
        if compiled:
            model.compile_blocks()
        frames = counter.frame_count
        loss = model(tokens[:, :-1], labels=labels)
        loss.backward()
        chunked.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert counter.frame_count == frames + 2  # the chunk's graph, and again for the shorter last chunk
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = chunked
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_inductor_builds_the_chunked_loss_and_it_equals_eager(dtype, tolerance):
    """The chunk's graph through inductor itself (its C++ code, the gradient written over the logits):
    the loss and both gradients as the eager chunked loss, to fp32 rounding (to bf16's in bf16), with
    ignored rows and a shorter last chunk."""
    from lowmem.models.chunked_loss import chunked_head_loss_sum

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=gen).to(dtype)
    weight = (torch.randn(96, 16, generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, 96, (40,), generator=gen)
    labels[5:9] = IGNORE_INDEX
    torch._dynamo.reset()
    results = []
    for backend in (None, "inductor"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = chunked_head_loss_sum(h, w, labels, chunk=16, compile_backend=backend)
        loss.backward()
        results.append((loss.detach(), h.grad.float(), w.grad.float()))
    torch._dynamo.reset()
    for eager, compiled in zip(*results):
        assert ((compiled - eager).norm() / eager.norm()).item() <= tolerance
