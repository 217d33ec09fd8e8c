"""Tests of lowmem.memory.estimate and `lowmem memory`: the papers' memory cells (methods.md §10), the
activation formula against what autograd really saves, and the command's output and errors."""

from __future__ import annotations

import argparse
import contextlib
import functools
import time

import pytest
import torch
import torch.nn.functional as F

import lowmem.optim
import lowmem.registry
from lowmem.errors import ConfigError
from lowmem.memory.cli import add_parser
from lowmem.memory.estimate import activation_bytes, compare, estimate_memory, hparams_for
from lowmem.memory.plan import plan
from lowmem.models.llama import build_model, resolve_config
from lowmem.optim.quantized_state import quantizes

SIZES = ("llama-60m", "llama-130m", "llama-350m", "llama-1b")
LOW_RANK = dict(zip(SIZES, (128, 256, 256, 512)))  # GaLore's ranks, used by the table for GaLore, Fira, APOLLO

# The README table of the SCALE paper (methods.md §10): 2 bytes x (weights + optimizer-state elements), GB = 1e9.
PAPER_GB = {
    "adamw": (0.35, 0.81, 2.21, 8.04),
    "stable-spam": (0.35, 0.81, 2.21, 8.04),
    "muon": (0.23, 0.54, 1.47, 5.36),
    "galore": (0.28, 0.61, 1.59, 4.76),
    "fira": (0.28, 0.61, 1.59, 4.76),
    "apollo": (0.28, 0.61, 1.59, 4.76),
    "apollo-mini": (0.25, 0.46, 1.00, 3.20),
    "scale": (0.15, 0.32, 0.80, 2.81),
}
PAPER_GB_7B = {"scale": 13.74, "apollo-mini": 14.53, "muon": 26.95, "adamw": 40.43}

# The Adam and Stable-SPAM rows at 60M-1B are the only cells that need another vocabulary: with the
# preset's 32000 they give 0.35 / 0.80 / 2.21 / 8.03, with 32100 (len of the t5-base tokenizer:
# 32000 + 100 sentinel ids, what a model sized by len(tokenizer) gets) all four cells agree. Every
# other row, and Adam at 7B (40.43, 40.44 with 32100), is reproduced at 32000 and would break at
# 32100 (GaLore 1B: 4.77, APOLLO-Mini 130M: 0.47). See docs/results.d/memory.md.
T5_LEN_VOCAB = 32100
VOCAB_OF_ROW = {"adamw": T5_LEN_VOCAB, "stable-spam": T5_LEN_VOCAB}

# Cells that cannot be reproduced from lowmem's implementation, with the reason found.
KNOWN_DISCREPANCIES = {
    ("galore", "llama-350m"): "rank 256 gives 1.39 GB, not 1.59 (the digit-swapped figure is copied to Fira and "
                              "APOLLO); no rank-256 accounting reaches 1.59",
    ("fira", "llama-350m"): "the table copies GaLore's 350M figure: rank 256 gives 1.39 GB, not 1.59",
    ("apollo", "llama-350m"): "the table copies GaLore's 350M figure: rank 256 gives 1.39 GB, not 1.59",
    ("apollo-mini", "llama-130m"): "the table counts no state for APOLLO-Mini's hidden matrices (its row equals "
                                   "SWAN's, which keeps none); lowmem's rank-1 moments and projection give 0.4655 GB",
    ("apollo-mini", "llama-1b"): "the table counts no state for APOLLO-Mini's hidden matrices (its row equals "
                                 "SWAN's, which keeps none); lowmem's rank-1 moments and projection give 3.2059 GB",
}


MUON_REASON = ("the table counts one buffer per parameter for Muon (2 B x 2 x weights); lowmem's Muon, as "
               "methods.md §5 specifies, keeps AdamW's two moments for embedding and head; the variant `muon-all` "
               "(one buffer for every matrix) reproduces the row, see tests/test_muon.py")
for _preset in (*SIZES, "llama-7b"):
    KNOWN_DISCREPANCIES["muon", _preset] = MUON_REASON


def _paper_estimate(preset: str, name: str, rank: int | None = None, vocab_size: int | None = None):
    """Estimates at the papers' settings, shared by the tests (a meta step of a 7B takes seconds)."""
    return _cached_estimate(preset, name, rank, vocab_size)


@functools.lru_cache(maxsize=None)
def _cached_estimate(preset, name, rank, vocab_size):
    return estimate_memory(preset, name, {"rank": rank} if rank else {}, vocab_size=vocab_size)


def _cells():
    for name, row in PAPER_GB.items():
        for preset, gb in zip(SIZES, row):
            rank = LOW_RANK[preset] if name in ("galore", "fira", "apollo") else None
            marks = ()
            if (name, preset) in KNOWN_DISCREPANCIES:
                marks = pytest.mark.xfail(reason=KNOWN_DISCREPANCIES[name, preset], strict=True)
            yield pytest.param(name, preset, rank, VOCAB_OF_ROW.get(name), gb, marks=marks, id=f"{name}-{preset}")
    for name, gb in PAPER_GB_7B.items():
        marks = ()
        if (name, "llama-7b") in KNOWN_DISCREPANCIES:
            marks = pytest.mark.xfail(reason=KNOWN_DISCREPANCIES[name, "llama-7b"], strict=True)
        yield pytest.param(name, "llama-7b", None, None, gb, marks=marks, id=f"{name}-llama-7b")


@pytest.mark.parametrize("name, preset, rank, vocab_size, paper_gb", list(_cells()))
def test_paper_memory_cell(name, preset, rank, vocab_size, paper_gb):
    est = _paper_estimate(preset, name, rank, vocab_size)
    assert round(est.paper_gb, 2) == paper_gb, f"{name} at {preset}: {est.paper_gb:.4f} GB"


def test_adam_row_needs_the_t5_vocabulary_at_130m_and_1b():
    at_preset_vocab = [round(_paper_estimate(p, "adamw").paper_gb, 2) for p in SIZES]
    assert at_preset_vocab == [0.35, 0.80, 2.21, 8.03]


def test_apollo_mini_row_is_reproduced_without_its_rank_one_hidden_state():
    # Pins the explanation of the two APOLLO-Mini discrepancies: leave out the hidden matrices' rank-1
    # moments and projection and every cell of the row is reproduced.
    for preset, paper_gb in [*zip(SIZES, PAPER_GB["apollo-mini"]), ("llama-7b", PAPER_GB_7B["apollo-mini"])]:
        est = _paper_estimate(preset, "apollo-mini")
        hidden = est.state_elements_by_role["hidden"]
        assert 0 < hidden < 1e-2 * est.weight_elements  # "negligible": under 1% of the weights
        assert round(2 * (est.weight_elements + est.optimizer_state_elements - hidden) / 1e9, 2) == paper_gb


def test_muon_row_is_one_buffer_per_parameter_while_lowmem_gives_embedding_and_head_adam():
    # Pins the explanation of the Muon discrepancies: the table's row is exactly 2 B x (weights + one
    # buffer of every parameter's size); lowmem's Muon has one buffer per hidden matrix and two (AdamW)
    # for every other tensor.
    for preset, paper_gb in [*zip(SIZES, PAPER_GB["muon"]), ("llama-7b", PAPER_GB_7B["muon"])]:
        est = _paper_estimate(preset, "muon")
        assert round(2 * 2 * est.weight_elements / 1e9, 2) == paper_gb
        roles = est.state_elements_by_role
        assert roles["hidden"] + (roles["embedding"] + roles["head"] + roles["vector"]) / 2 == est.weight_elements


def test_scale_cell_is_weights_plus_head_momentum_plus_adam_of_gains():
    # The §10 definition, with no step counters: it pins down the papers' convention.
    config = resolve_config("llama-7b")
    est = _paper_estimate("llama-7b", "scale")
    weights = est.weight_elements
    head = config.vocab_size * config.hidden_size
    gains = (2 * config.num_layers + 1) * config.hidden_size
    assert est.paper_bytes == 2 * (weights + head + 2 * gains)
    assert est.state_elements_by_role == {"head": head, "vector": 2 * gains}
    assert est.bookkeeping_elements == 2 * config.num_layers + 1  # one step counter per gain


def test_step_counters_are_bookkeeping_not_state_elements():
    est = estimate_memory("llama-60m", "adamw")
    n_tensors = sum(1 for _ in build_model("llama-60m", device="meta").parameters())
    assert est.optimizer_state_elements == 2 * est.weight_elements
    assert est.bookkeeping_elements == n_tensors
    # the full figure does count them: bf16 moments + fp32 step counters
    assert est.optimizer_states == 2 * 2 * est.weight_elements + 4 * n_tensors


def test_papers_convention_counts_8bit_codes_at_one_byte():
    # The 8-bit optimizer papers count a uint8 code as 1 byte; its block's scale counts as any state
    # element (2 B in the convention): AdamW's m and v at 8 bits are (1 + 2/256) B per weight each.
    full = estimate_memory("llama-60m", "adamw")
    quantized = estimate_memory("llama-60m", "adamw", {"state_bits": 8})
    weights, codes = quantized.weight_elements, quantized.state_code_elements
    matrices = sum(p.numel() for p in build_model("llama-60m", device="meta").parameters()
                   if quantizes(p.shape, 8))
    assert codes == 2 * matrices  # m and v of every quantized matrix
    scales = quantized.optimizer_state_elements - codes
    assert quantized.paper_bytes == 2 * weights + codes + 2 * scales
    assert full.state_code_elements == 0 and full.paper_bytes == 2 * (weights + 2 * weights)
    assert 0.5 < (quantized.paper_bytes - 2 * weights) / (full.paper_bytes - 2 * weights) < 0.52


def test_precision_changes_the_full_figure_not_the_papers():
    pure = estimate_memory("llama-60m", "adamw", precision="bf16-pure")
    fp32 = estimate_memory("llama-60m", "adamw", precision="fp32")
    mixed = estimate_memory("llama-60m", "adamw", precision="bf16-autocast")
    assert pure.paper_gb == fp32.paper_gb == mixed.paper_gb
    assert fp32.weights == 2 * pure.weights == 4 * pure.weight_elements
    assert fp32.gradients == 2 * pure.gradients
    assert mixed.optimizer_states == fp32.optimizer_states
    assert fp32.activations > pure.activations and mixed.activations > pure.activations
    assert pure.total == pure.weights + pure.gradients + pure.optimizer_states + pure.activations


def _saved_activation_bytes(precision: str, batch: int, seq: int, checkpointing: bool = False) -> int:
    """Bytes autograd saves in one forward + fp32 cross-entropy (storages counted once, parameters and
    buffers excluded), plus the logits the training loop holds."""
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=256)
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, 256, (batch, seq + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256).float(), tokens[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    saved.setdefault(logits.untyped_storage().data_ptr(), logits.untyped_storage().nbytes())
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-pure"])
def test_activation_formula_matches_what_autograd_saves(precision):
    batch, seq = 2, 32
    measured = _saved_activation_bytes(precision, batch, seq)
    config = resolve_config("cpu-tiny", vocab_size=256)
    predicted = activation_bytes(config, batch, seq, precision)
    # exact up to the few scalars cross-entropy saves (20 bytes measured)
    assert 0 <= measured - predicted <= 64, (measured, predicted)


def test_activation_checkpointing_keeps_block_inputs_plus_one_block():
    config = resolve_config("llama-60m")
    full = activation_bytes(config, 8, 256, "bf16-pure")
    ckpt = activation_bytes(config, 8, 256, "bf16-pure", activation_checkpointing=True)
    one_layer = activation_bytes(resolve_config("llama-60m", num_layers=1), 8, 256, "bf16-pure")
    head = activation_bytes(resolve_config("llama-60m", num_layers=0), 8, 256, "bf16-pure")
    per_block = one_layer - head
    assert full == head + config.num_layers * per_block
    assert ckpt == head + per_block + config.num_layers * 8 * 256 * config.hidden_size * 2


def test_activations_grow_linearly_with_tokens():
    config = resolve_config("llama-130m")
    base = activation_bytes(config, 1, 256, "bf16-pure")
    assert activation_bytes(config, 4, 256, "bf16-pure") == 4 * base
    assert activation_bytes(config, 2, 128, "bf16-pure") == base


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(model="llama-9m", optimizer="adamw"), "unknown model preset 'llama-9m'"),
    (dict(model="llama-60m", optimizer="adamz"), "unknown optimizer 'adamz'"),
    (dict(model="llama-60m", optimizer="adamw", hparams={"rank": 4}), "has no hyperparameter"),
    (dict(model="cpu-tiny", optimizer="adamw"), "--vocab-size"),
    (dict(model="llama-60m", optimizer="adamw", precision="fp16"), "unknown precision 'fp16'"),
    (dict(model="llama-60m", optimizer="adamw", seq_len=4096), "maximum sequence length"),
])
def test_bad_input_is_a_config_error_naming_the_fix(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        estimate_memory(**kwargs)


def test_compare_passes_each_optimizer_only_the_hparams_it_accepts():
    ests = compare("llama-60m", ["adamw", "scale"], {"weight_decay": 0.0, "adam_lr": 0.01})
    assert [e.optimizer for e in ests] == ["adamw", "scale"]
    assert ests[0].hparams == {"weight_decay": 0.0}
    assert ests[1].hparams["adam_lr"] == 0.01
    with pytest.raises(ConfigError, match="unknown optimizer"):
        compare("llama-60m", ["adamw", "nope"])


def test_shared_rank_reaches_low_rank_methods_but_not_what_a_variant_fixes():
    shared = {"rank": 64, "galore.scale": 0.5}
    assert hparams_for("adamw", shared, shared=True) == {}
    assert hparams_for("galore", shared, shared=True) == {"rank": 64, "scale": 0.5}
    assert hparams_for("apollo-mini", shared, shared=True) == {}  # its rank 1 defines it
    assert hparams_for("apollo-mini", {"apollo-mini.rank": 2}, shared=True) == {"rank": 2}
    assert hparams_for("galore", {"rank": 64}) == {"rank": 64}
    with pytest.raises(ConfigError, match="scoped to optimizer 'galore'"):
        hparams_for("apollo", {"galore.rank": 3})


def _run_cli(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser(prog="lowmem")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_llama_7b_scale_answers_in_seconds(capsys):
    start = time.perf_counter()
    out = _run_cli(["--model", "llama-7b", "--optimizer", "scale"], capsys)
    elapsed = time.perf_counter() - start
    rows = {row: [line for line in out.splitlines() if line.startswith(row + " ")]
            for row in ("weights", "gradients", "optimizer states", "activations", "total")}
    assert all(len(lines) == 1 for lines in rows.values()), out
    assert rows["weights"][0].split()[1:] == ["6,738,415,616", "13.48", "GB"]
    assert rows["optimizer states"][0].split()[2:] == ["131,604,480", "0.26", "GB"]
    assert "papers' convention, 2 B x (weights + optimizer states): 13.74 GB" in out
    assert "optimizer state counted from: meta step" in out
    assert elapsed < 60, f"lowmem memory took {elapsed:.1f} s on meta"  # loose: the CPU is shared


def test_cli_hparam_parsing_and_errors(capsys):
    out = _run_cli(["--model", "cpu-tiny", "--vocab-size", "256", "--optimizer", "adamw",
                    "--hparam", "betas=(0.9, 0.95)", "--lr", "0.01", "--precision", "fp32"], capsys)
    assert "betas=(0.9, 0.95)" in out and "lr=0.01" in out and "precision fp32" in out
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _run_cli(["--model", "llama-60m", "--optimizer", "adamw", "--hparam", "rank"], capsys)
    with pytest.raises(ConfigError, match="--optimizer NAME or --compare"):
        _run_cli(["--model", "llama-60m"], capsys)


def test_cli_compare_rows_and_ratio_to_adamw(capsys):
    out = _run_cli(["--model", "llama-1b", "--compare", "adamw,scale,galore", "--rank", "512"], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in
            ("adamw", "scale", "galore")}
    assert set(rows) == {"adamw", "scale", "galore"}
    # columns: name, state elements, paper GB, ratio, total GB, ratio, source
    assert rows["adamw"][2:4] == ["8.03", "1.00"]
    assert rows["scale"][2] == "2.81" and rows["galore"][2] == "4.76"
    assert float(rows["scale"][3]) == pytest.approx(2.81 / 8.03, abs=0.01)


class _MetaUnsafeMomentum(torch.optim.Optimizer):
    """A momentum method whose step reads a value back (`.item()`), which the meta device cannot do."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                if state["momentum"].norm().item() > 1e6:
                    state["momentum"].zero_()
                state["momentum"].lerp_(p.grad, 0.1)
                p.add_(state["momentum"], alpha=-group["lr"])


class _LocalMethod(lowmem.optim.Method):
    def load(self):
        return _MetaUnsafeMomentum


def test_a_method_that_cannot_step_on_meta_uses_its_declared_formula_and_says_so(monkeypatch):
    from lowmem.memory import estimate as estimate_module

    monkeypatch.setitem(lowmem.registry.OPTIMIZERS, "meta-unsafe", _LocalMethod("unused:Unused", "test double"))
    with pytest.raises(RuntimeError, match="'meta-unsafe' cannot step on the meta device"):
        estimate_memory("llama-60m", "meta-unsafe")

    def formula(model, optimizer):
        return [("all", tuple(p.shape), p.dtype) for p in model.parameters()]

    monkeypatch.setitem(estimate_module.STATE_FORMULAS, "meta-unsafe", formula)
    est = estimate_memory("llama-60m", "meta-unsafe")
    assert est.state_source.startswith("formula (its step fails on the meta device")
    assert est.optimizer_state_elements == est.weight_elements
    assert est.optimizer_states == 2 * est.weight_elements
    assert est.notes


def test_gradient_release_counts_the_largest_gradient_and_7b_scale_fits_16_gb():
    common = dict(batch_size=1, seq_len=256, activation_checkpointing="block", chunked_loss="on")
    held = estimate_memory("llama-7b", "scale", **common)
    released = estimate_memory("llama-7b", "scale", gradient_release=True, **common)
    config = resolve_config("llama-7b")
    head = config.vocab_size * config.hidden_size * 2  # the largest matrix, in bf16
    assert released.gradients == head and held.gradients == held.weights
    # Without release the peak is every gradient and SCALE's step; with it, the loss's forward.
    assert (held.peak_phase, released.peak_phase) == ("the update", "forward")
    assert released.peak <= 16e9 < 27e9 < held.peak


def test_the_planner_with_gradient_release_never_accumulates():
    rows = plan("llama-60m", "scale", budget="80GB", seq_len=256, global_batch=512, gradient_release=True)
    assert all(row.global_micro_batch in (None, 512) and row.accumulation in (None, 1) for row in rows)
    held = plan("llama-60m", "scale", budget="2GB", seq_len=256, global_batch=512)
    assert any(row.accumulation and row.accumulation > 1 for row in held)


# ---- the step's timeline: the peak of a whole step, with and without gradient release ----------------

STEP_CASE = dict(model="cpu-small", vocab_size=4096, batch_size=4, seq_len=128, precision="fp32",
                 activation_checkpointing="block", chunked_loss="on", loss_chunk=64)


def _measured_step_peak(optimizer_name: str, release: bool, **case) -> int:
    """Weights + optimizer state + every storage a training step creates, at its peak (the second
    step: the state exists by then), as benchmarks/bench_gradient_release.py measures it."""
    from lowmem.assembly import build_model as build_run_model
    from lowmem.assembly import build_optimizer, configure_memory
    from lowmem.distributed import DistInfo
    from lowmem.memory import TensorMemory
    from lowmem.memory.measure import iter_state_tensors, optimizer_state_bytes, parameter_bytes
    from lowmem.train.step import AfterBackward, InBackward, train_step

    case = {**STEP_CASE, **case}
    torch.manual_seed(0)
    model = build_run_model(case["model"], vocab_size=case["vocab_size"])
    configure_memory(model, case["activation_checkpointing"], case["chunked_loss"], case["loss_chunk"],
                     tokens=case["batch_size"] * case["seq_len"])
    optimizer = build_optimizer(optimizer_name, model, preset=case["model"])
    update = InBackward(optimizer, model) if release else AfterBackward(optimizer)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        ids = torch.randint(0, case["vocab_size"], (case["batch_size"], case["seq_len"] + 1), generator=generator)
        train_step(model, update, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}], info=DistInfo())
        optimizer.zero_grad(set_to_none=True)

    step()
    existing = [*model.parameters(), *model.buffers(), *(t for _, _, t in iter_state_tensors(optimizer))]
    with TensorMemory(exclude=existing) as mem:
        step()
    return parameter_bytes(model) + optimizer_state_bytes(optimizer) + mem.peak


def _estimated(optimizer_name: str, release: bool, **case):
    case = {**STEP_CASE, **case}
    return estimate_memory(case.pop("model"), optimizer_name, gradient_release=release, **case)


@pytest.mark.parametrize("optimizer_name", ["adamw", "scale"])
def test_the_step_peak_is_estimated_within_ten_percent_with_and_without_release(optimizer_name):
    """Gradients accumulate in backward while the activations are freed, so they never peak together:
    the old estimate (weights + every gradient + states + the activations' high-water mark) was 13-23%
    high without release at cpu-base. The saving release measures is at least 90% of what the
    estimate says it frees (its peak without release - with it)."""
    measured = {release: _measured_step_peak(optimizer_name, release) for release in (False, True)}
    estimated = {release: _estimated(optimizer_name, release) for release in (False, True)}
    for release in (False, True):
        ratio = estimated[release].peak / measured[release]
        assert 0.9 <= ratio <= 1.1, (optimizer_name, release, ratio, estimated[release].phases)
    # The old count, every gradient on top of the activations' high-water mark, fails this wherever
    # backward (not the update after it) holds the peak: SCALE's, 1.15 x the measured peak here.
    old_way = estimated[False]
    old_peak = old_way.weights + old_way.gradients + old_way.optimizer_states + old_way.activation_peak
    if old_way.peak_phase.startswith("backward"):
        assert old_peak / measured[False] > 1.1
    freed = estimated[False].peak - estimated[True].peak
    saving = measured[False] - measured[True]
    assert freed > 0 and saving >= 0.9 * freed, (saving, freed)


@pytest.mark.parametrize("optimizer_name", ["adamw", "stable-spam"])
def test_the_adam_update_makes_a_chunk_of_temporaries_not_a_copy_of_the_gradients(optimizer_name):
    """AdamW's sqrt(v) and Stable-SPAM's clipped, normalized gradients are made one foreach chunk at a time
    (lowmem.optim.base.foreach_chunks): at llama-350m the update's temporaries stay under a quarter of the
    gradients (all at once they were as large as the gradients, and twice as large for Stable-SPAM)."""
    estimate = estimate_memory("llama-350m", optimizer_name)
    assert 0 < estimate.update_temporaries <= 0.25 * estimate.gradients
