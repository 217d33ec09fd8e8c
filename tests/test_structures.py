"""Low-rank structures (lowrank, lora, sltrain) and their interventions (refactor, restarts, lora-merge)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run_overrides
from torch import nn

from lowmem.assembly import build_model, build_optimizer
from lowmem.config import load_config
from lowmem.errors import ConfigError
from lowmem.interventions import RunContext
from lowmem.memory.estimate import estimate_memory
from lowmem.memory.measure import optimizer_state_bytes
from lowmem.optim.reset import MomentumReset, restart_lr_factor
from lowmem.optim.roles import param_groups
from lowmem.structure import build_structure
from lowmem.structure.lora import LoRALinear, LoRAMerge
from lowmem.structure.lowrank import LowRankLinear, factor_modules
from lowmem.structure.refactor import Refactor, Restarts, balanced_factors, balanced_factors_svd, refactor_model
from lowmem.structure.sltrain import SLTrainLinear, SparseLowRankFunction
from lowmem.testing import TINY, _batch, _loss, max_relative_difference, train_steps
from lowmem.train import checkpoint
from lowmem.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("llama-60m", "llama-130m", "llama-350m", "llama-1b")


def _millions(model: nn.Module, trainable: bool = False) -> float:
    return round(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable) / 1e6, 2)


# ---- parameter counts and memory at the papers' ranks -------------------------------------------

@pytest.mark.parametrize("size,lowrank,sltrain", zip(SIZES, (42.77, 94.00, 185.22, 609.31), (43.53, 96.55, 194.29, 645.55)))
def test_parameter_counts_at_the_papers_ranks(size, lowrank, sltrain):
    assert _millions(build_model(size, structure={"name": "lowrank"}, device="meta")) == lowrank
    # SLTrain counts int(delta * in * out) sparse values per layer, as the reference does.
    assert _millions(build_model(size, structure={"name": "sltrain", "density": 0.03}, device="meta")) == sltrain


def test_lora_counts_frozen_and_trainable_weights():
    model = build_model("llama-60m", structure={"name": "lora"}, device="meta")
    assert _millions(model) == 68.07 and _millions(model, trainable=True) == 42.77
    base = model.layers[0].self_attn.q_proj
    assert isinstance(base, LoRALinear) and not base.weight.requires_grad
    assert all(p.requires_grad for g in param_groups(model) for p in g["params"])  # W0 in no group


@pytest.mark.parametrize("name,expected", [
    ("lowrank", (0.26, 0.56, 1.11, 3.66)),
    ("sltrain", (0.26, 0.58, 1.17, 3.87)),
    ("lora", (0.31, 0.60, 1.36, 3.92)),  # ReLoRA's r 128, alpha 32 at every size
])
def test_memory_in_the_papers_convention(name, expected):
    got = tuple(round(estimate_memory(size, "adamw", structure={"name": name}).paper_gb, 2) for size in SIZES)
    assert got == expected


def test_sltrain_indices_are_int32_and_reported_apart_from_the_papers_figure():
    est = estimate_memory("llama-60m", "adamw", structure={"name": "sltrain"})
    layer = build_model("llama-60m", structure={"name": "sltrain"}, device="meta").layers[0].mlp.up_proj
    assert layer.sparse_index.dtype == torch.int32 and layer.sparse_values.numel() == int(0.03 * 512 * 1376)
    nonzeros = sum(int(0.03 * i * o) for i, o in [(512, 512)] * 4 + [(512, 1376)] * 3) * 8
    assert est.index_bytes == 4 * nonzeros
    assert est.paper_bytes == 2 * (est.weight_elements + est.optimizer_state_elements)  # indices not in it
    assert est.total == est.weights + est.gradients + est.optimizer_states + est.activations + est.index_bytes


@pytest.mark.parametrize("name", ["lowrank", "sltrain", "lora"])
def test_measured_state_bytes_after_real_steps_equal_the_estimate(name):
    structure = {"name": name, "rank": 8}
    est = estimate_memory("cpu-tiny", "adamw", vocab_size=96, precision="fp32", structure=structure)
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=96, structure=structure)
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    train_steps(model, optimizer, 2)
    assert optimizer_state_bytes(optimizer) == est.optimizer_states
    assert est.gradients == 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_memory_command_takes_a_structure():
    proc = subprocess.run([sys.executable, "-m", "lowmem.cli", "memory", "--model", "llama-60m", "--optimizer", "adamw",
                           "--structure", "sltrain:density=0.03"], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "structure sltrain density=0.03" in proc.stdout
    assert "2 B x (weights + optimizer states): 0.26 GB" in proc.stdout
    assert "structure index bytes (SLTrain's sparse support): 3,035,552" in proc.stdout


# ---- the modules --------------------------------------------------------------------------------

def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="give the rank, e.g. --structure lowrank:rank=32"):
        build_model("cpu-tiny", vocab_size=64, structure={"name": "lowrank"})
    with pytest.raises(ConfigError, match="choose rank < 16"):
        build_model("cpu-micro", vocab_size=64, structure={"name": "lowrank", "rank": 16})
    with pytest.raises(ConfigError, match="density must be in"):
        build_structure({"name": "sltrain", "rank": 4, "density": 1.5})
    with pytest.raises(ConfigError, match="rank must be an integer"):
        build_structure({"name": "lora", "rank": 0})


def test_papers_presets_are_used_and_overridable():
    model = build_model("llama-1b", structure={"name": "lowrank"}, device="meta")
    layer = model.layers[0].mlp.down_proj
    assert (layer.rank, layer.alpha, layer.lora_A.shape, layer.lora_B.shape) == (512, 8.0, (512, 5461), (2048, 512))
    model = build_model("llama-60m", structure={"name": "lowrank", "rank": 64, "alpha": 16}, device="meta")
    assert model.layers[0].self_attn.q_proj.scale == 16 / 64
    assert model.embed_tokens.weight.shape == (32000, 512) and isinstance(model.lm_head, nn.Linear)


@pytest.mark.parametrize("name", ["lowrank", "lora", "sltrain"])
def test_forward_equals_the_dense_weight_and_merge_exports_a_dense_model(name):
    torch.manual_seed(0)
    structure = build_structure({"name": name, "rank": 8})
    model = build_model(TINY, structure=structure).double()
    with torch.no_grad():  # move B off zero so every part of W contributes
        for module in factor_modules(model):
            module.lora_B.normal_(0, 0.05)
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    model.eval()  # LoRA's dropout acts in training only
    layer = model.layers[0].mlp.up_proj
    x = torch.randn(3, 5, TINY.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().t())
    logits = model(ids)
    structure.merge(model)
    assert not factor_modules(model) and isinstance(model.layers[0].mlp.up_proj, nn.Linear)
    torch.testing.assert_close(model(ids), logits)


def test_initializations_follow_the_papers():
    torch.manual_seed(0)
    lowrank = LowRankLinear(64, 96, 8, 32)
    assert lowrank.lora_A.abs().max() <= 1 / 8 and lowrank.lora_B.abs().max() <= 1 / math.sqrt(8)
    assert lowrank.lora_B.abs().sum() > 0 and lowrank.lora_A.abs().sum() > 0  # both random, not zero
    dense = nn.Linear(64, 96, bias=False)
    lora = LoRALinear(dense, 8, 16)
    assert torch.equal(lora.weight, dense.weight) and torch.count_nonzero(lora.lora_B) == 0
    x = torch.randn(4, 64)
    torch.testing.assert_close(lora(x), dense(x))  # B = 0: the base model at the start
    sl = SLTrainLinear(64, 96, 8, 32, 0.03)
    assert sl.sparse_values.numel() == int(0.03 * 64 * 96) and sl.sparse_values.abs().max() <= 1 / 8
    assert torch.count_nonzero(sl.lora_B) == 0 and len(set(sl.sparse_index.tolist())) == sl.sparse_index.numel()
    assert torch.all(sl.sparse_index[1:] > sl.sparse_index[:-1])  # sorted, unique
    with pytest.warns(UserWarning, match="declares no get_input_embeddings"):  # a bare layer: the roles' fallback
        kinds = {g.get("kind", "dense") for g in param_groups(nn.ModuleList([sl]))}
    assert kinds == {"factor-a", "factor-b", "sparse-values"}


def test_sltrain_gradients_equal_a_dense_reference_and_save_no_dense_matrix():
    torch.manual_seed(0)
    layer = SLTrainLinear(48, 80, 6, 12.0, 0.1).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 7, 48, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 7, 80, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.numel()), t)[1], lambda t: t):
        y = layer(x)
    (y * weights).sum().backward()
    assert max(saved) < 48 * 80  # only x, the factors, the values and the support are kept
    got = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.sparse_values.grad]

    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    values = layer.sparse_values.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    sparse = torch.zeros(80 * 48, dtype=torch.float64).index_put((layer.sparse_index.long(),), values).view(80, 48)
    reference = F.linear(x2, layer.scale * b @ a + sparse)
    (reference * weights).sum().backward()
    torch.testing.assert_close(y, reference)
    for mine, theirs in zip(got, [x2.grad, a.grad, b.grad, values.grad]):
        torch.testing.assert_close(mine, theirs)
    assert torch.autograd.gradcheck(
        lambda xx, aa, bb, vv: SparseLowRankFunction.apply(xx, aa, bb, vv, layer.sparse_index, layer.scale),
        (x.detach()[:1, :2].requires_grad_(), a.detach().requires_grad_(), b.detach().requires_grad_(),
         values.detach().requires_grad_()))


# ---- optimizers on structured models ------------------------------------------------------------

def test_every_optimizer_trains_a_lowrank_model_or_refuses_it_clearly():
    import lowmem.optim

    trained, refused = [], []
    for name in lowmem.optim.available():
        torch.manual_seed(0)
        model = build_model(TINY, structure={"name": "lowrank", "rank": 8})
        try:
            optimizer = build_optimizer(name, model, hparams={"rank": 4} if "rank" in lowmem.optim.method(name).hyperparameters() and name != "apollo-mini" else None)
        except ConfigError as err:
            assert f"optimizer {name!r} cannot train 'factor-a' parameters" in str(err) and "adamw" in str(err)
            refused.append(name)
            continue
        before = model.layers[0].self_attn.q_proj.lora_A.detach().clone()
        train_steps(model, optimizer, 2)
        assert not torch.equal(model.layers[0].self_attn.q_proj.lora_A, before)
        trained.append(name)
    assert {"adamw", "stable-spam", "scale", "sgd", "sgd-column", "sgd-row", "sgd-sign", "sgd-singular",
            "adam-mini"} <= set(trained)
    assert {"muon", "muon-all", "galore", "fira", "apollo", "apollo-mini"} <= set(refused)


def test_the_kinds_table_is_what_every_method_registers():
    """lowmem.optim.kinds documents each built-in method's treatment of structured kinds; its table and
    the registrations are one thing (a method added without a row, or a row that drifted, fails here)."""
    import lowmem.optim
    from lowmem.optim.kinds import METHOD_KINDS

    built_in = [name for name in lowmem.optim.available()
                if lowmem.optim.method(name).target.startswith("lowmem.optim.")]
    assert set(built_in) == set(METHOD_KINDS)
    for name in built_in:
        assert set(lowmem.optim.method(name).kinds) == set(METHOD_KINDS[name]), name


@pytest.mark.parametrize("name", ["galore", "fira", "apollo", "apollo-mini"])
def test_projection_methods_refuse_factors_and_say_why(name):
    """A rank-r factor projected at rank >= r is a lossless rotation (Fira = GaLore there): refused, with
    adamw named, instead of silently running AdamW under the method's name."""
    from lowmem.optim.kinds import refusal

    model = build_model(TINY, structure={"name": "lowrank", "rank": 8})
    with pytest.raises(ConfigError, match=f"optimizer {name!r} cannot train 'factor-a'.*adamw") as refused:
        build_optimizer(name, model)
    assert "lossless rotation" in str(refused.value)
    assert "lossless rotation" in refusal(name, "factor-a") and "adamw" in refusal(name, "factor-b")
    assert refusal("muon", "factor-a") == "" and refusal(name, "sparse-values") == ""
    dense = build_optimizer(name, build_model(TINY), hparams={"rank": 4} if name != "apollo-mini" else None)
    assert dense.param_groups  # the dense model still trains


@pytest.mark.parametrize("name", ["scale", "sgd-column"])
def test_scale_and_sgd_column_normalize_each_factor_along_its_input_dimension(name):
    torch.manual_seed(0)
    model = build_model(TINY, structure={"name": "lowrank", "rank": 8}).double()
    optimizer = build_optimizer(name, model, lr=1e-2)
    layer = model.layers[0].mlp.up_proj
    before_a, before_b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    train_steps(model, optimizer, 1, lr_schedule=False)
    for after, before in ((layer.lora_A, before_a), (layer.lora_B, before_b)):
        rms = (after.detach() - before).pow(2).mean(dim=1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 1e-2))


# ---- refactorization ----------------------------------------------------------------------------

def test_refactoring_keeps_logits_and_balances_the_factors():
    torch.manual_seed(0)
    model = build_model(TINY, structure={"name": "lowrank", "rank": 8})
    with torch.no_grad():
        for module in factor_modules(model):
            module.lora_B.mul_(7.0)  # unbalanced: B much larger than A
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    logits = model(ids).detach()
    refactor_model(model)
    assert (model(ids) - logits).abs().max() <= 1e-4
    for module in factor_modules(model):
        gram_b = module.lora_B.t() @ module.lora_B
        gram_a = module.lora_A @ module.lora_A.t()
        torch.testing.assert_close(gram_b, gram_a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gram_b, torch.diag(gram_b.diagonal()), atol=1e-4, rtol=1e-4)


def test_the_qr_route_equals_the_full_svd():
    torch.manual_seed(1)
    a, b = torch.randn(6, 40, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    qa, qb, qs = balanced_factors(a, b)
    sa, sb, ss = balanced_factors_svd(a, b)
    torch.testing.assert_close(qs, ss)
    torch.testing.assert_close(qb @ qa, b @ a)
    signs = torch.sign((qb * sb).sum(0))  # singular vectors are unique up to a sign per direction
    torch.testing.assert_close(qb * signs, sb)
    torch.testing.assert_close(qa * signs.unsqueeze(1), sa)


def test_rotated_first_moments_equal_the_moments_of_the_new_coordinates():
    torch.manual_seed(0)
    layer = LowRankLinear(20, 24, 4, 8.0).double()
    x, target = torch.randn(16, 20, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.0)  # lr 0: one step only fills the moments
    F.mse_loss(layer(x), target).backward()
    optimizer.step()
    refactor_model(nn.ModuleList([layer]), optimizer, state="rotate")
    layer.zero_grad()
    F.mse_loss(layer(x), target).backward()  # the gradient in the refactored coordinates
    for p in (layer.lora_A, layer.lora_B):
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], 0.1 * p.grad)
        assert float(optimizer.state[p]["step"]) == 1  # kept: no bias-correction restart


def test_rotated_8bit_moments_are_the_moments_of_the_new_coordinates_within_their_rounding():
    """8-bit moments are dequantized, rotated and requantized (they were left unrotated before): after
    one step at lr 0, m = 0.1 g in the refactored coordinates, within a code gap of each block's absmax."""
    from lowmem.optim.adamw import AdamW
    from lowmem.optim.quantized_state import SIGNED_MAP, dequantize_blockwise

    torch.manual_seed(0)
    layer = LowRankLinear(512, 512, 16, 8.0).double()  # factors of 8192 elements: 8-bit moments
    x, target = torch.randn(16, 512, dtype=torch.float64), torch.randn(16, 512, dtype=torch.float64)
    optimizer = AdamW(layer.parameters(), lr=1e-30, state_bits=8)  # a step that fills the moments only
    F.mse_loss(layer(x), target).backward()
    optimizer.step()
    refactor_model(nn.ModuleList([layer]), optimizer, state="rotate")
    layer.zero_grad()
    F.mse_loss(layer(x), target).backward()
    for p in (layer.lora_A, layer.lora_B):
        state = optimizer.state[p]
        m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], SIGNED_MAP).double()
        expected = 0.1 * p.grad
        assert (m - expected).abs().max() <= 0.02 * expected.abs().max()
        assert float(state["step"]) == 1


def test_refactor_resets_only_the_factors_state_by_default():
    torch.manual_seed(0)
    model = build_model(TINY, structure={"name": "lowrank", "rank": 8})
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    train_steps(model, optimizer, 2)
    head = optimizer.state[model.lm_head.weight]["exp_avg"].clone()
    Refactor(every=2).after_step(2, model, optimizer)
    a = model.layers[0].self_attn.q_proj.lora_A
    assert float(optimizer.state[a]["step"]) == 0 and torch.count_nonzero(optimizer.state[a]["exp_avg"]) == 0
    assert torch.equal(optimizer.state[model.lm_head.weight]["exp_avg"], head)


def test_refactor_skips_a_zero_or_rank_deficient_pair_warns_and_counts_it():
    """A lora-merge and a refactor on the same step: B = 0, so refactoring would set A' = B' = 0 and the
    pair would never train again. The pair is skipped (factors and state as they were) and counted."""
    torch.manual_seed(0)
    model = build_model(TINY, structure={"name": "lora", "rank": 8, "dropout": 0.0})
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    merge = LoRAMerge(every=2, ramp_steps=0, prune="reset")
    refactor = Refactor(every=3)
    with pytest.warns(UserWarning, match="skipped 14 of 14 factor pairs"):
        train_steps(model, optimizer, 3, interventions=[merge, refactor])  # both act after step 3
    assert merge.merges == 1 and refactor.skipped == 14
    layer = model.layers[0].self_attn.q_proj
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0
    with pytest.warns(UserWarning, match="skipped 14 of 14 factor pairs"):
        count = refactor_model(model, optimizer)
    assert count.skipped == 14 and torch.equal(layer.lora_A, a) and torch.equal(layer.lora_B, b)
    with pytest.warns(UserWarning, match="skipped"):
        refactor.after_step(6, model, optimizer)
    assert refactor.state_dict()["skipped"] == 28 and refactor.refactors == 2  # after steps 3 and 6
    train_steps(model, optimizer, 1)
    assert torch.count_nonzero(layer.lora_B) > 0  # the pair trains on
    deficient = LowRankLinear(20, 24, 4, 8.0).double()
    with torch.no_grad():
        deficient.lora_B[:, 1] = 0
        deficient.lora_A[1] = 0
    before = deficient.lora_A.detach().clone()
    with pytest.warns(UserWarning, match="rank-deficient"):
        assert refactor_model(nn.ModuleList([deficient])).skipped == 1
    assert torch.equal(deficient.lora_A, before)
    assert refactor_model(nn.ModuleList([LowRankLinear(20, 24, 4, 8.0)])).skipped == 0  # full rank: refactored


def test_restarts_refactor_reset_every_moment_and_dip_the_lr_like_the_reference():
    factors = [restart_lr_factor(step, 50, 10, 0.001) for step in range(48, 62)]
    assert factors[:2] == [1.0, 1.0]  # steps 48, 49
    assert factors[2] == 0.001  # step 50: the last update before the restart
    assert factors[3] == pytest.approx(0.001 + 0.999 / 9) and 0.11 < factors[3] < 0.12  # step 51: first fresh, ~11%
    assert factors[11] == 1.0 and factors[10] < 1.0  # step 59 (the 9th after the restart) back at the target
    assert restart_lr_factor(10, 50, 10, 0.001) == 1.0  # nothing before the first restart
    # Restarts and a plain momentum reset with the same ramp dip on the same steps by the same factors.
    reset, restarts = MomentumReset(every=50, lr_ramp_steps=10), Restarts(every=50)
    assert [reset.lr_factor(s) for s in range(1, 160)] == [restarts.lr_factor(s) for s in range(1, 160)]
    torch.manual_seed(0)
    model = build_model(TINY, structure={"name": "sltrain", "rank": 8})
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    train_steps(model, optimizer, 3)
    product = [m.dense_weight().detach().clone() for m in factor_modules(model)]
    Restarts(every=3, lr_ramp_steps=2).after_step(3, model, optimizer)
    assert all(float(s["step"]) == 0 and torch.count_nonzero(s["exp_avg"]) == 0 for s in optimizer.state.values())
    for module, before in zip(factor_modules(model), product):
        torch.testing.assert_close(module.dense_weight(), before, atol=1e-5, rtol=1e-4)


# ---- ReLoRA -------------------------------------------------------------------------------------

def test_lora_merge_changes_w0_reinitializes_the_factors_prunes_only_their_state_and_training_continues():
    torch.manual_seed(0)
    model = build_model(TINY, structure={"name": "lora", "rank": 8})
    optimizer = build_optimizer("adamw", model, lr=3e-3)
    merge = LoRAMerge(every=5, ramp_steps=2)
    merge.setup(RunContext(total_steps=20, warmup_ratio=0.0))
    losses = []

    def step_losses(n: int, first: int) -> None:
        for step in range(first, first + n):
            for g in optimizer.param_groups:
                g["lr"] = 3e-3 * merge.lr_factor(step)
            loss = _loss(model, _batch(step % 3, 8, 16, TINY.vocab_size))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            merge.after_step(step, model, optimizer)

    layer = model.layers[0].mlp.up_proj
    saved = {}

    def snapshot() -> None:
        saved.update(w0=layer.weight.detach().clone(), a=layer.lora_A.detach().clone())

    step_losses(5, 1)
    assert merge.merges == 0  # the first cycle is every + 1 steps, as released
    snapshot()
    assert merge.lr_factor(6) == 0.0  # the step before the merge runs at lr 0
    step_losses(1, 6)  # step 6 merges
    assert merge.merges == 1
    assert not torch.equal(layer.weight, saved["w0"])  # W0 absorbed the update
    assert torch.count_nonzero(layer.lora_B) == 0 and not torch.equal(layer.lora_A, saved["a"])
    state_a = optimizer.state[layer.lora_A]
    assert float(state_a["step"]) == 6 and torch.count_nonzero(state_a["exp_avg"]) <= 0.01 * state_a["exp_avg"].numel()
    assert float(optimizer.state[model.lm_head.weight]["step"]) == 6
    assert merge.lr_factor(7) == pytest.approx(0.5 * RunContext(20, warmup_ratio=0.0).base_lr_factor(8)
                                               / RunContext(20, warmup_ratio=0.0).base_lr_factor(7))
    assert merge.lr_factor(8) == 1.0
    step_losses(10, 7)
    assert merge.merges == 3  # after steps 6, 11, 16
    assert sum(losses[-3:]) < sum(losses[:3])  # training continues to lower loss


def test_a_merge_keeps_the_model_function():
    torch.manual_seed(0)
    model = build_model(TINY, structure={"name": "lora", "rank": 8}).eval()
    with torch.no_grad():
        for module in factor_modules(model):
            module.lora_B.normal_(0, 0.05)
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    before = model(ids).detach()
    w0 = model.layers[0].self_attn.v_proj.weight.detach().clone()
    delta = model.layers[0].self_attn.v_proj.product().detach()
    for module in factor_modules(model):
        module.merge_and_reinit()
    torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.layers[0].self_attn.v_proj.weight, w0 + delta)


# ---- runs: exact resume across a refactor and a merge, checkpoints carry the structure -----------

@pytest.mark.parametrize("structure,interventions", [
    ({"name": "lowrank", "rank": 8, "alpha": 8}, [{"name": "restarts", "every": 3, "lr_ramp_steps": 2}]),
    ({"name": "sltrain", "rank": 8, "alpha": 8}, [{"name": "refactor", "every": 3, "state": "rotate"}]),
    ({"name": "lora", "rank": 8, "alpha": 8}, [{"name": "lora-merge", "every": 3, "ramp_steps": 1}]),
])
def test_exact_resume_across_refactor_and_merge_steps(structure, interventions, tiny_corpus, token_cache, tmp_path):
    common = {"train.steps": 8, "model.structure": structure, "optim.interventions": interventions}
    whole = train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "whole", **common)))
    first = load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "split", **common,
                                                     **{"train.checkpoint_every": 4, "train.keep_checkpoints": 5}))
    train(first)
    step4 = checkpoint.step_dir(tmp_path / "split", 4)  # between interventions (3 and 6; ReLoRA's merges: 4 and 7)
    body = checkpoint.load_whole(step4)
    assert any(k.endswith("lora_A") for k in body["model"]) and body["structure"]["rank"] == 8
    if structure["name"] == "sltrain":
        assert any(k.endswith("sparse_index") for k in body["model"])
    if structure["name"] == "lora":
        assert any(k.endswith("q_proj.weight") for k in body["model"])  # the frozen W0 is carried too
    resumed = train(first, resume=step4)

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert resumed["val_perplexity"] == whole["val_perplexity"]
    assert whole["trainable_parameters"] <= whole["parameters"]


# ---- FSDP2 --------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("structure", [{"name": "lowrank", "rank": 8, "alpha": 8},
                                       {"name": "sltrain", "rank": 8, "alpha": 8, "density": 0.05}])
def test_fsdp2_on_two_processes_matches_one(structure):
    from lowmem.testing import fsdp_matches_single

    # float64, the harness default: in fp32 Adam amplifies the reduce-scatter's other summation order.
    single, sharded = fsdp_matches_single("adamw", {"lr": 3e-3}, steps=20, structure=structure)
    assert set(single) == set(sharded) and any("lora_A" in k for k in single)
    difference = max_relative_difference(single, sharded)
    assert difference <= 1e-5, difference


@pytest.mark.distributed
def test_relora_merges_under_fsdp2_and_two_processes_match_one():
    from lowmem.testing import fsdp_matches_single_many

    # merges after steps 6, 11, 16: W0 moves, A is redrawn (rank 0's draw, broadcast), B restarts at 0, the
    # moments are pruned, at random with masks drawn at the whole shape on every rank or by magnitude over
    # the whole tensor (no dropout: its masks would differ between one process and two)
    cases = [dict(name="adamw", hparams={"lr": 3e-3}, steps=17, structure={"name": "lora", "rank": 8, "dropout": 0.0},
                  interventions=[{"name": "lora-merge", "every": 5, "ramp_steps": 0, "prune": prune}])
             for prune in ("random", "magnitude")]
    for single, sharded in fsdp_matches_single_many(cases):
        assert set(single) == set(sharded) and any(k.endswith("lora_A") for k in single)
        difference = max_relative_difference(single, sharded)
        assert difference <= 1e-5, difference


@pytest.mark.distributed
def test_refactor_rotates_the_moments_under_fsdp2_and_two_processes_match_one():
    from lowmem.testing import fsdp_matches_single

    single, sharded = fsdp_matches_single("adamw", {"lr": 3e-3}, steps=12, structure={"name": "lowrank", "rank": 8, "alpha": 8},
                                          interventions=[{"name": "refactor", "every": 4, "state": "rotate"}])
    difference = max_relative_difference(single, sharded)
    assert difference <= 1e-5, difference
