"""Issue 15: activation checkpointing and the chunked loss give the plain model's loss and gradients;
the assembly sets them from the config; bad settings are ConfigErrors naming the fix."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lowmem.assembly import assemble, configure_memory
from lowmem.config import RunConfig, load_config, results_affecting_differences
from lowmem.data import IGNORE_INDEX
from lowmem.distributed import DistInfo
from lowmem.errors import ConfigError
from lowmem.models import count_targets
from lowmem.models.chunked_loss import chunked_head_loss_sum, loss_chunk_for
from lowmem.models.llama import build_model
from lowmem.structure import build_structure
from lowmem.train.evaluate import evaluate
from lowmem.train.step import train_step

VOCAB = 300


def _batch(batch: int = 3, seq: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[0, -5:] = IGNORE_INDEX  # a padded tail
    return tokens[:, :-1], labels


def _grads(model, loss) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (loss * 0.37).backward()  # a scale, as train_step applies
    return [p.grad.detach().clone() for p in model.parameters()]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PyTorch's summed cross-entropy over the full logits in fp32: the plain loss, as a reference."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")


def _model_loss(model, ids, labels, autocast) -> torch.Tensor:
    with autocast:
        return model(ids, labels=labels)


@pytest.mark.parametrize("chunk", [0, 7])
def test_the_padding_the_data_layer_writes_is_never_scored(chunk):
    # Row 0's last 5 labels are lowmem.data.IGNORE_INDEX (a padded tail): the model's loss, plain or
    # chunked, is the loss of the rows without those positions (attention is causal, so cutting the
    # tail changes nothing before it).
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB)
    model.loss_chunk = chunk
    ids, labels = _batch()
    with torch.no_grad():
        padded = model(ids, labels=labels)
        cut = model(ids[:1, :-5], labels=labels[:1, :-5]) + model(ids[1:], labels=labels[1:])
    assert padded.item() == pytest.approx(cut.item(), rel=1e-6)
    assert count_targets(labels) == labels.numel() - 5


@pytest.mark.parametrize("chunk", [1, 7, 72, 1000])
def test_chunked_loss_equals_the_plain_loss_and_gradients_in_fp32(chunk):
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB)
    ids, labels = _batch()
    plain_loss = model(ids, labels=labels)
    plain = _grads(model, plain_loss)
    model.loss_chunk = chunk
    loss = model(ids, labels=labels)
    chunked = _grads(model, loss)
    assert abs(loss.item() - plain_loss.item()) <= 1e-6 * abs(plain_loss.item())
    for (name, _), a, b in zip(model.named_parameters(), chunked, plain):
        assert _relative(a, b) <= 1e-6, name


@pytest.mark.parametrize("precision", ["bf16-pure", "bf16-autocast"])
def test_chunked_loss_is_within_bf16_rounding(precision):
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB)
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
    ids, labels = _batch()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    plain_loss = _model_loss(model, ids, labels, autocast)
    plain = _grads(model, plain_loss)
    model.loss_chunk = 16
    loss = _model_loss(model, ids, labels, autocast)
    chunked = _grads(model, loss)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - plain_loss.item()) <= 1e-3 * abs(plain_loss.item())
    for (name, p), a, b in zip(model.named_parameters(), chunked, plain):
        assert a.dtype == p.dtype
        assert _relative(a, b) <= 2e-2, name  # bf16 keeps 8 bits: 2^-8 = 0.4% per rounding


def test_chunked_loss_without_gradients_equals_the_plain_loss():
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB)
    ids, labels = _batch()
    with torch.no_grad():
        plain = _cross_entropy_sum(model(ids), labels)
        model.loss_chunk = 5
        chunked = model(ids, labels=labels)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    # the functional form: hidden states and head weight in, sum out
    hidden = model(ids, return_hidden=True)
    direct = chunked_head_loss_sum(hidden, model.lm_head.weight, labels, chunk=9)
    assert direct.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["block", "selective"])
@pytest.mark.parametrize("structure", [None, "toy-factored"])
def test_checkpointing_gives_bitwise_equal_gradients_in_fp32(mode, structure):
    if structure:
        import toy_plugin  # noqa: F401  (registers the toy structures)
    torch.manual_seed(0)
    plain = build_model("cpu-tiny", vocab_size=VOCAB)
    if structure:
        build_structure({"name": structure, "rank": 4}).apply(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.set_activation_checkpointing(mode)
    assert ckpt.activation_checkpointing == mode
    ids, labels = _batch()
    loss_a = plain(ids, labels=labels)
    loss_b = ckpt(ids, labels=labels)
    assert torch.equal(loss_a, loss_b)
    for (name, _), a, b in zip(plain.named_parameters(), _grads(plain, loss_a), _grads(ckpt, loss_b)):
        assert torch.equal(a, b), name


def test_checkpointing_really_keeps_less_for_backward():
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB)
    ids, _ = _batch(4, 64)
    kept = {}
    for mode in ("none", "selective", "block"):
        model.set_activation_checkpointing(mode)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            model(ids).sum()
        kept[mode] = sum(saved)
    assert kept["block"] < kept["selective"] < kept["none"]


def test_evaluation_and_train_step_use_the_chunked_loss_with_the_same_result():
    def run(chunk: int):
        torch.manual_seed(0)
        model = build_model("cpu-tiny", vocab_size=VOCAB)
        model.loss_chunk = chunk
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ids, labels = _batch()
        batches = [{"input_ids": ids, "labels": labels}]
        before = evaluate(model, batches, torch.device("cpu"), torch.autocast("cpu", enabled=False), DistInfo())
        step = train_step(model, optimizer, batches, info=DistInfo())
        return before.loss, step.loss, [p.detach().clone() for p in model.parameters()]

    plain, chunked = run(0), run(10)
    assert chunked[0] == pytest.approx(plain[0], rel=1e-6)
    assert chunked[1] == pytest.approx(plain[1], rel=1e-6)
    for a, b in zip(chunked[2], plain[2]):
        assert _relative(a, b) <= 1e-6


def test_assembly_sets_checkpointing_and_the_loss_chunk_from_the_config():
    config = load_config(overrides={"model": "cpu-tiny", "train.activation_checkpointing": "selective",
                                    "train.chunked_loss": "on", "train.loss_chunk": 64})
    run = assemble(config, vocab_size=VOCAB, device="meta")
    assert run.core.activation_checkpointing == "selective" and run.core.loss_chunk == 64
    assert {b.checkpointing for b in run.core.layers} == {"selective"}
    default = assemble(load_config(overrides={"model": "cpu-tiny"}), vocab_size=VOCAB, device="meta")
    assert default.core.activation_checkpointing == "none" and default.core.loss_chunk == 0


def test_auto_turns_the_chunked_loss_on_only_for_large_logits():
    # the CPU main job (cpu-tiny, 16 x 128 tokens, the trained 8192-token BPE) keeps the plain loss
    assert loss_chunk_for("auto", 1024, 16 * 128, 8192) == 0
    # llama-60m at 16 x 256 (32000 vocab): 524 MB of fp32 logits
    assert loss_chunk_for("auto", 1024, 16 * 256, 32000) == 1024
    assert loss_chunk_for("on", 8, 4, 10) == 8 and loss_chunk_for("off", 8, 10**6, 32000) == 0


@pytest.mark.parametrize("overrides, fragment", [
    ({"train.activation_checkpointing": "layer"}, "unknown activation checkpointing mode 'layer'; choose one of"),
    ({"train.chunked_loss": "yes"}, "unknown chunked_loss mode 'yes'; choose one of"),
    ({"train.loss_chunk": 0}, "--loss-chunk"),
])
def test_bad_settings_are_config_errors_naming_the_fix(overrides, fragment):
    config = load_config(overrides={"model": "cpu-tiny", **overrides})
    with pytest.raises(ConfigError, match=fragment):
        assemble(config, vocab_size=VOCAB, device="meta")


def test_a_model_without_checkpointing_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="--activation-checkpointing none"):
        configure_memory(torch.nn.Linear(2, 2), "block")


def test_old_configs_resume_and_checkpointing_may_change_on_resume():
    new = RunConfig().to_dict()
    old = copy.deepcopy(new)
    for key in ("activation_checkpointing", "chunked_loss", "loss_chunk"):
        del old["train"][key]  # a config written before issue 15
    assert results_affecting_differences(old, new) == []
    changed = load_config(overrides={"train.activation_checkpointing": "block"}).to_dict()
    assert results_affecting_differences(new, changed) == []
    other_chunk = load_config(overrides={"train.loss_chunk": 7}).to_dict()
    assert results_affecting_differences(new, other_chunk) == ["train.loss_chunk: 1024 -> 7"]


def test_plain_forward_still_returns_logits_and_the_model_loss_is_pytorchs_cross_entropy():
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB)
    ids, labels = _batch()
    logits = model(ids)
    assert logits.shape == (*ids.shape, VOCAB)
    assert torch.equal(model(ids, labels=labels), _cross_entropy_sum(logits, labels))
    assert torch.equal(model.lm_head(model(ids, return_hidden=True)), logits)


# ---- the estimate against what the code allocates --------------------------------------------------

from lowmem.memory.estimate import activation_bytes, activation_peak_bytes, estimate_memory  # noqa: E402
from lowmem.memory.measure import TensorMemory  # noqa: E402
from lowmem.memory.plan import format_plan, parse_bytes, plan  # noqa: E402
from lowmem.models.llama import resolve_config  # noqa: E402

MEASURE_VOCAB = 2048


def _measured_activation_peak(precision: str, mode: str, chunk: int, batch: int = 4, seq: int = 128) -> int:
    """Most bytes of activations alive at once over one forward + backward (TensorMemory; the
    weights' gradients are allocated beforehand and left out, as are the weights and the batch)."""
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=MEASURE_VOCAB)
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
    model.set_activation_checkpointing(mode)
    model.loss_chunk = chunk
    tokens = torch.randint(0, MEASURE_VOCAB, (batch, seq + 1))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    owned = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()), ids, labels]
    with TensorMemory(exclude=owned) as mem:
        _model_loss(model, ids, labels, autocast).backward()
    return mem.peak


@pytest.mark.parametrize("chunk", [0, 128])
@pytest.mark.parametrize("mode", ["none", "block", "selective"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-pure"])
def test_activation_peak_is_estimated_within_ten_percent(precision, mode, chunk):
    measured = _measured_activation_peak(precision, mode, chunk)
    predicted = activation_peak_bytes(resolve_config("cpu-tiny", vocab_size=MEASURE_VOCAB), 4, 128, precision, mode, chunk)
    assert abs(predicted - measured) <= 0.10 * measured, (measured, predicted)


def test_checkpointing_and_the_chunked_loss_lower_the_measured_peak():
    peaks = {(mode, chunk): _measured_activation_peak("bf16-pure", mode, chunk)
             for mode in ("none", "selective", "block") for chunk in (0, 128)}
    assert peaks["block", 128] < peaks["selective", 128] < peaks["none", 128] < peaks["none", 0]
    assert peaks["block", 0] < peaks["none", 0]


def test_tensor_memory_counts_live_storages_once_and_frees_them():
    with TensorMemory() as mem:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:]  # a view: no new storage
        b = a + 1
        assert mem.live == 8000
        del b
        assert mem.live == 4000
    assert mem.peak == 8000 and view.numel() == 990


def test_estimate_memory_carries_the_modes_and_the_peak():
    plain = estimate_memory("llama-60m", "adamw", batch_size=16, chunked_loss="off")
    both = estimate_memory("llama-60m", "adamw", batch_size=16, activation_checkpointing="block", chunked_loss="on")
    auto = estimate_memory("llama-60m", "adamw", batch_size=16)
    assert (plain.activation_checkpointing, plain.loss_chunk) == ("none", 0)
    assert (both.activation_checkpointing, both.loss_chunk) == ("block", 1024)
    assert auto.loss_chunk == 1024  # 16 x 256 x 32000 fp32 logits: 524 MB, above the auto threshold
    # The plain loss's backward (the logits' gradient) is the step's worst moment, before any gradient.
    assert plain.peak_phase == "backward: the loss"
    assert plain.peak == plain.weights + plain.optimizer_states + plain.activation_peak
    assert both.activation_peak < plain.activation_peak / 4
    config = resolve_config("llama-60m")
    assert plain.activations == activation_bytes(config, 16, 256, "bf16-pure")
    with pytest.raises(ConfigError, match="unknown activation checkpointing mode"):
        estimate_memory("llama-60m", "adamw", activation_checkpointing="layers")


# ---- the planner -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("24GB", 24e9), ("24 GiB", 24 * 2**30), ("500MB", 5e8),
                                            ("1.5gb", 1.5e9), (1000, 1000)])
def test_budgets_parse(text, expected):
    assert parse_bytes(text) == int(expected)


@pytest.mark.parametrize("text", ["lots", "24 parsecs", "-3GB", "0"])
def test_bad_budgets_are_config_errors(text):
    with pytest.raises(ConfigError, match="budget"):
        parse_bytes(text)


def test_plan_gives_the_largest_micro_batch_that_fits_and_the_accumulation():
    rows = plan("llama-60m", "scale", budget="4GB", seq_len=256, global_batch=512)
    by = {row.setting: row for row in rows}
    assert len(rows) == 6
    config = resolve_config("llama-60m")
    for row in rows:
        chunk = 1024 if row.chunked else 0
        peak = lambda b: row.fixed + activation_peak_bytes(config, b, 256, "bf16-pure", row.checkpointing, chunk)
        assert peak(row.micro_batch) <= 4e9 < peak(row.micro_batch + 1), row.setting
        assert row.global_micro_batch * row.accumulation == 512 and row.global_micro_batch <= row.micro_batch
    assert by["block / chunked"].micro_batch > by["selective / chunked"].micro_batch > by["none / chunked"].micro_batch
    assert by["none / chunked"].micro_batch > by["none / plain"].micro_batch
    nothing = plan("llama-60m", "adamw", budget="0.5GB", seq_len=256)
    assert nothing[0].micro_batch == 0 and "none fits" in format_plan(
        nothing, model="llama-60m", optimizer="adamw", budget=int(5e8), seq_len=256, precision="bf16-pure")


def test_a_planned_micro_batch_stays_under_its_budget_when_it_runs():
    # a small model and a small budget, measured over whole optimizer steps (weights, gradients,
    # states, activations, the optimizer's temporaries: every storage an op creates)
    vocab, seq, budget = 4096, 64, 40e6
    for mode, chunked in (("none", False), ("block", True), ("selective", True)):
        row = next(r for r in plan("cpu-tiny", "adamw", vocab_size=vocab, budget=budget, seq_len=seq,
                                   precision="fp32") if (r.checkpointing, r.chunked) == (mode, chunked))
        assert row.micro_batch >= 2
        torch.manual_seed(0)
        with TensorMemory() as mem:
            config = load_config(overrides={"model": "cpu-tiny", "data.seq_len": seq,
                                            "train.micro_batch_size": row.micro_batch,
                                            "train.activation_checkpointing": mode,
                                            "train.chunked_loss": "on" if chunked else "off"})
            run = assemble(config, vocab_size=vocab)
            for _ in range(2):
                tokens = torch.randint(0, vocab, (row.micro_batch, seq + 1))
                train_step(run.model, run.optimizer, [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}],
                           info=DistInfo())
                run.optimizer.zero_grad(set_to_none=True)
        assert mem.peak <= budget, (mode, chunked, row.micro_batch, mem.peak)
        # and the plan is not loose: it counts the gradients at the activations' high-water mark (as under
        # accumulation), which a step without accumulation reaches only in backward
        assert mem.peak >= 0.7 * row.peak, (mode, chunked, mem.peak, row.peak)


def _memory_cli(argv: list[str], capsys) -> str:
    import argparse

    from lowmem.memory.cli import add_parser

    parser = argparse.ArgumentParser(prog="lowmem")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_budget_prints_a_micro_batch_per_setting(capsys):
    out = _memory_cli(["--model", "llama-1b", "--optimizer", "scale", "--budget", "24GB", "--seq-len", "256",
                       "--global-batch", "512"], capsys)
    for setting in ("none / plain", "none / chunked", "block / plain", "block / chunked",
                    "selective / plain", "selective / chunked"):
        assert setting in out
    assert "budget 24.00 GB" in out and "accumulation" in out
    out = _memory_cli(["--model", "llama-60m", "--optimizer", "scale", "--batch-size", "64",
                       "--activation-checkpointing", "--chunked-loss", "on"], capsys)
    assert "activation checkpointing block, chunked loss (1024 tokens per chunk)" in out
    assert "peak" in out


def test_cli_global_batch_needs_a_budget(capsys):
    import argparse

    from lowmem.memory.cli import add_parser

    parser = argparse.ArgumentParser(prog="lowmem")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory", "--model", "llama-60m", "--optimizer", "scale", "--global-batch", "64"])
    with pytest.raises(ConfigError, match="--budget"):
        args.func(args)


# ---- under DDP and FSDP2 ---------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_checkpointed_runs_equal_the_plain_one_under_two_processes(mode, tiny_corpus, token_cache, tmp_path):
    from test_distributed_train import _config, _losses, _run

    runs = {
        "plain": {},
        "selective": {"train.activation_checkpointing": "selective"},
        "block-chunked": {"train.activation_checkpointing": "block", "train.chunked_loss": "on", "train.loss_chunk": 50},
    }
    for name, extra in runs.items():
        _run(_config(tmp_path, name, tiny_corpus, token_cache, **{"train.distributed": mode, **extra}), 2)
    plain = _losses(tmp_path / "plain")
    assert sorted(plain) == list(range(1, 7))
    assert _losses(tmp_path / "selective") == plain  # recomputation: the same numbers
    chunked = _losses(tmp_path / "block-chunked")
    for step in plain:
        assert chunked[step] == pytest.approx(plain[step], rel=1e-5), step
