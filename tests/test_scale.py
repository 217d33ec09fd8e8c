"""SCALE and the minimalist SGD family (methods.md §1) against a reference written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowmem.optim
from lowmem.models import build_model
from lowmem.optim.newton_schulz import newton_schulz
from lowmem.optim.scale import SCALE

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machine's cores are shared: intra-op threads only oversubscribe them at these sizes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torch_newton_schulz():
    fn = getattr(getattr(torch.optim, "_muon", None), "_zeropower_via_newtonschulz", None)
    if fn is None:
        pytest.skip("torch.optim._muon._zeropower_via_newtonschulz (the oracle for Newton-Schulz) is missing")
    return lambda G: fn(G, (3.4445, -4.7750, 2.0315), 5, 1e-7)


# ----------------------------------------------------------------------------------------------------
# The reference: one tensor at a time, straight from methods.md §1.

def _rms(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.pow(2).mean(dim, keepdim=True).sqrt()


def reference_step(params, grads, roles, state, *, lr, lr_max, momentum=0.9, adam_lr=2e-2, weight_decay=0.0,
                   normalization="column", momentum_on="head", ns=None):
    momentum_roles = {"none": (), "head": ("head",), "embedding+head": ("embedding", "head"),
                      "all": ("hidden", "embedding", "head")}[momentum_on]
    for name, W in params.items():
        G, role = grads[name], roles[name]
        if W.dim() < 2:  # AdamW at adam_lr * lr_t / lr_max, in the released form (methods.md section 1):
            # eps added to the uncorrected sqrt(v), both bias corrections in the step size.
            vec_lr = adam_lr * lr / lr_max
            s = state.setdefault(name, {"t": 0, "m": torch.zeros_like(W), "v": torch.zeros_like(W)})
            s["t"] += 1
            W.mul_(1 - vec_lr * weight_decay)
            s["m"] = 0.9 * s["m"] + 0.1 * G
            s["v"] = 0.999 * s["v"] + 0.001 * G * G
            step_size = vec_lr * math.sqrt(1 - 0.999 ** s["t"]) / (1 - 0.9 ** s["t"])
            W.sub_(step_size * s["m"] / (s["v"].sqrt() + 1e-8))
            continue
        W.mul_(1 - lr * weight_decay)
        D = G
        if role in momentum_roles:
            m = state.setdefault(name, {"m": torch.zeros_like(W)})
            m["m"] = momentum * m["m"] + (1 - momentum) * G
            D = m["m"]
        D2 = D.reshape(D.shape[0], -1)
        if normalization == "column":
            U = D2 / _rms(D2, 0 if role == "embedding" else 1).clamp_min(1e-8)
        elif normalization == "row":
            U = D2 / _rms(D2, 1 if role == "embedding" else 0).clamp_min(1e-8)
        elif normalization == "sign":
            U = torch.sign(D2)
        elif normalization == "singular":
            U = ns(D2).to(D2.dtype) * math.sqrt(max(D2.shape))
        else:
            U = D2
        W.sub_(lr * U.reshape(W.shape))


def _loss(model, step):
    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (4, 17), generator=gen)
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _schedule(step, total=20):  # warmup then decay, so lr_t / lr_max varies
    return (step + 1) / 4 if step < 4 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 4) / (total - 4)))


CASES = [
    ("scale", {}),
    ("scale", {"weight_decay": 0.1}),
    ("scale", {"momentum_on": "none"}),
    ("scale", {"momentum_on": "embedding+head"}),
    ("scale", {"momentum_on": "all", "momentum": 0.5}),
    ("sgd", {}),
    ("sgd-column", {}),
    ("sgd-row", {}),
    ("sgd-sign", {}),
    ("sgd-singular", {}),
    ("sgd-row", {"momentum_on": "all"}),
]


@pytest.mark.parametrize("name,hparams", CASES, ids=[f"{n}-{h}" if h else n for n, h in CASES])
def test_matches_reference_over_20_steps(name, hparams):
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB).double()
    base_lr, adam_lr = 1e-2, 3e-3
    opt = lowmem.optim.build(name, model, lr=base_lr, adam_lr=adam_lr, **hparams)
    settings = dict(lowmem.optim.method(name).defaults, **hparams)
    ns = _torch_newton_schulz() if settings.get("normalization") == "singular" else None
    roles = lowmem.optim.named_roles(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_state: dict = {}
    for step in range(20):
        lr = base_lr * _schedule(step)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * _schedule(step)
        _loss(model, step).backward()
        # The reference steps its own copy of the weights with the same gradients: this compares the
        # update rules, not two trajectories that rounding could separate.
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        reference_step(ref_params, grads, roles, ref_state, lr=lr, lr_max=base_lr, adam_lr=adam_lr, ns=ns,
                       **settings)
    largest_error = moved = 0.0
    for n, p in model.named_parameters():
        ref = ref_params[n]
        err = (p.detach() - ref).norm() / ref.norm()
        assert err < 1e-10, f"{name} {hparams}: {n} ({roles[n]}) differs from the reference by {err:.2e}"
        largest_error = max(largest_error, ((p.detach() - ref).abs().max()).item())
        moved = max(moved, ((p.detach() - initial[n]).norm() / initial[n].norm()).item())
    assert largest_error < 1e-8
    # The comparison is not of two barely touched copies: some tensor moved by more than 1% of its norm
    # (plain SGD, the least: 1.5%; the normalized variants: 100% and more).
    assert moved > 1e-2


@pytest.mark.parametrize("name", ["scale", "sgd-row"])
def test_bf16_model_matches_fp32_formula_to_bf16_rounding(name):
    # The papers' protocol trains in bf16 (weights and states). The step must agree with the fp32
    # formula to bf16 rounding: within 2 ulps of the weight (2^-6 relative) plus the bf16 rounding of
    # the update itself (lr * max|u| * 2^-8, u the tensor's normalized update: 1.5e-5 for the hidden
    # matrices, 4e-5 for the embedding, whose columns over a vocabulary seen in 64 tokens have entries up
    # to 10 times their RMS), where a wrong normalization is off by lr * O(1) = 1e-3.
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB).to(torch.bfloat16)
    opt = lowmem.optim.build(name, model, lr=1e-3)
    settings = dict(lowmem.optim.method(name).defaults)
    roles = lowmem.optim.named_roles(model)
    _loss(model, 0).backward()
    ref = {n: p.detach().float() for n, p in model.named_parameters()}
    before = {n: w.clone() for n, w in ref.items()}
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    opt.step()
    reference_step(ref, grads, roles, {}, lr=1e-3, lr_max=1e-3, **settings)
    for n, p in model.named_parameters():
        largest_update = (before[n] - ref[n]).abs().max().item()  # lr * max|u| (vectors: their Adam step)
        torch.testing.assert_close(p.detach().float(), ref[n], rtol=2**-6, atol=largest_update * 2**-8, msg=n)


def test_reference_comparison_can_fail():
    # The reference test must be able to fail: a wrong normalization dim on the embedding is caught.
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB).double()
    opt = lowmem.optim.build("scale", model, lr=1e-2)
    roles = lowmem.optim.named_roles(model)
    wrong_roles = {n: ("hidden" if r == "embedding" else r) for n, r in roles.items()}
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, 0).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    reference_step(ref_params, grads, wrong_roles, {}, lr=1e-2, lr_max=1e-2)
    emb = "embed_tokens.weight"
    assert (model.embed_tokens.weight.detach() - ref_params[emb]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------
# Cache-sized chunks: the same bits as whole matrices.

@pytest.mark.parametrize("name,hparams,dtype,threads", [
    ("scale", {"weight_decay": 0.1}, torch.float32, 1),
    ("scale", {"momentum_on": "all"}, torch.bfloat16, 2),
    ("sgd-row", {"momentum_on": "embedding+head"}, torch.float32, 2),
])
def test_chunked_step_gives_the_bits_of_whole_matrices(monkeypatch, name, hparams, dtype, threads):
    # Blocks of 3-8 rows (chunks of 2^10 elements; cpu-tiny's rows are 128-352 long) against every
    # matrix whole in one chunk (the step before chunking: one foreach call per pass over all matrices).
    # A row's norm is reduced in the same order in a block as in its whole matrix, so 3 steps agree to
    # the bit, on one thread and on two (where torch reduces a whole matrix's rows in parallel).
    import lowmem.optim.scale as scale

    torch.set_num_threads(threads)
    models = []
    for chunk_elements in (2**10, 2**62):
        monkeypatch.setattr(scale, "CHUNK_ELEMENTS", chunk_elements)
        torch.manual_seed(0)
        model = build_model("cpu-tiny", vocab_size=VOCAB).to(dtype)
        opt = lowmem.optim.build(name, model, lr=1e-2, **hparams)
        for step in range(3):
            _loss(model, step).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        models.append(model)
    torch.set_num_threads(1)
    for (n, chunked), whole in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(chunked, whole), n


def test_chunks_cut_rows_of_plain_cpu_matrices_only():
    from lowmem.optim.scale import cache_sized_chunks

    rows = [torch.randn(40, 8) for _ in range(3)]  # dim 1: cut into blocks of >= 2 rows
    column = torch.randn(40, 8)  # dim 0, a norm across rows: whole
    strided = torch.randn(8, 40).t()  # not contiguous: whole, in the last chunk
    meta = torch.empty(40, 8, device="meta")
    params = [*rows, column, strided, meta]
    grads = [torch.randn_like(p) if p.device.type == "cpu" else torch.empty_like(p) for p in params]
    grads[4] = torch.randn(8, 40).t()
    buffers = [torch.zeros_like(rows[0]), None, None, None, None, None]
    chunks = cache_sized_chunks(params, grads, buffers, [1, 1, 1, 0, 1, 1], max_elements=64)
    *plain, last = chunks
    assert last[0] == [strided, meta] and last[3] == [1, 1]
    pieces = [piece for chunk in plain for piece in zip(*chunk)]
    assert all(sum(p.numel() for p in chunk[0]) <= 64 or len(chunk[0]) == 1 for chunk in plain)
    for i, matrix in enumerate(rows):
        blocks = [(p, g, m) for p, g, m, _ in pieces if p.untyped_storage().data_ptr() == matrix.untyped_storage().data_ptr()]
        assert len(blocks) == 5
        assert torch.equal(torch.cat([p for p, _, _ in blocks]), matrix)  # views covering every row once
        assert torch.equal(torch.cat([g for _, g, _ in blocks]), grads[i])
        assert all((m is not None) == (i == 0) for _, _, m in blocks)
        assert all(p._base is matrix for p, _, _ in blocks)
    assert [p for p, _, _, dim in pieces if dim == 0] == [column]


# ----------------------------------------------------------------------------------------------------
# State: exactly the head's momentum plus the vectors' Adam state.

def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.parametrize("name,expected", [("scale", 65_605_700), ("sgd-column", 69_700), ("sgd-singular", 69_700)])
def test_state_bytes_llama_60m_on_meta(name, expected):
    model = build_model("llama-60m", device="meta")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt = lowmem.optim.build(name, model, preset="llama-60m")
    opt.step()
    head = model.lm_head.weight
    vectors = [p for p in model.parameters() if p.dim() == 1]
    # head momentum 32000x512 fp32 + Adam m and v of 17 norm gains (512 each) + 17 fp32 step scalars.
    count = (head.numel() if name == "scale" else 0) + 2 * sum(p.numel() for p in vectors)
    assert count * 4 + 4 * len(vectors) == expected
    assert _state_bytes(opt) == expected
    for p in model.parameters():
        keys = set(opt.state[p]) if p in opt.state else set()
        if p.dim() == 1:
            assert keys == {"step", "exp_avg", "exp_avg_sq"}
            assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].dim() == 0
        elif p is head and name == "scale":
            assert keys == {"momentum_buffer"} and opt.state[p]["momentum_buffer"].shape == head.shape
        else:
            assert keys == set()


# ----------------------------------------------------------------------------------------------------
# Hyperparameters, gradients. (State round trips, weights-only loads, meta steps and FSDP2 = one
# process: tests/test_optimizer_contract.py, for every registered optimizer.)

@pytest.mark.parametrize("bad", [
    {"lr": -1e-3}, {"momentum": 1.0}, {"momentum": -0.1}, {"weight_decay": -0.1}, {"adam_lr": -1.0},
    {"adam_betas": (0.9, 1.0)}, {"adam_eps": -1e-8}, {"normalization": "l2"}, {"momentum_on": "hidden"},
    {"ns_steps": 0}, {"lr": float("nan")},
])
def test_bad_hyperparameters_raise(bad):
    model = nn.Linear(4, 4)
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key.split("_")[0]):
        SCALE(model.parameters(), **bad)
    with pytest.raises(ValueError):  # also per group
        SCALE([{"params": list(model.parameters()), **bad}])


def test_bad_hyperparameter_message_names_value_and_range():
    with pytest.raises(ValueError, match=r"momentum: 1\.5.*\[0, 1\)"):
        SCALE(nn.Linear(2, 2).parameters(), momentum=1.5)
    with pytest.raises(ValueError, match="column, row, sign, singular, none"):
        SCALE(nn.Linear(2, 2).parameters(), normalization="spectral")


def test_sparse_and_complex_gradients_raise():
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        SCALE(emb.parameters()).step()
    w = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    w.grad = torch.randn(3, 3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        SCALE([w]).step()


def test_parameters_without_grad_are_skipped():
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=VOCAB)
    opt = lowmem.optim.build("scale", model, lr=1e-2)
    _loss(model, 0).backward()
    model.lm_head.weight.grad = None
    model.norm.weight.grad = None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(after["norm.weight"], before["norm.weight"])
    assert model.lm_head.weight not in opt.state and model.norm.weight not in opt.state
    assert not torch.equal(after["embed_tokens.weight"], before["embed_tokens.weight"])


# ----------------------------------------------------------------------------------------------------
# Models without declared roles, >2-D tensors, LR schedulers.

def test_plain_sequential_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20))
    with pytest.warns(UserWarning, match="declares no get_input_embeddings"):
        opt = lowmem.optim.build("scale", model, lr=0.1)
    emb, head = model[0].weight, model[1].weight
    roles = {g["role"]: g["params"] for g in opt.param_groups}
    assert roles["embedding"] == [emb] and roles["head"] == [head] and roles["vector"] == [model[1].bias]
    model(torch.tensor([[1, 2, 3]])).logsumexp(-1).sum().backward()
    g = emb.grad.clone()
    w = emb.detach().clone()
    opt.step()
    expected = w - 0.1 * g / _rms(g, 0).clamp_min(1e-8)  # embedding: each hidden unit's column over the vocab
    torch.testing.assert_close(emb.detach(), expected)
    assert set(opt.state[head]) == {"momentum_buffer"} and set(opt.state[model[1].bias]) == {"step", "exp_avg", "exp_avg_sq"}
    assert emb not in opt.state


@pytest.mark.parametrize("normalization,dim", [("column", 1), ("row", 0)])
def test_conv_weights_are_viewed_as_matrices(normalization, dim):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, 2, 2))
    w.grad = torch.randn(4, 3, 2, 2)
    start = w.detach().clone()
    SCALE([{"params": [w], "role": "hidden"}], lr=0.1, normalization=normalization).step()
    G = w.grad.reshape(4, -1)
    expected = start.reshape(4, -1) - 0.1 * G / _rms(G, dim)
    torch.testing.assert_close(w.detach(), expected.reshape(4, 3, 2, 2))


def test_vectors_follow_the_schedule_of_a_torch_lr_scheduler():
    torch.manual_seed(0)
    gain = nn.Parameter(torch.ones(5))
    matrix = nn.Parameter(torch.randn(3, 5))
    opt = SCALE([{"params": [matrix], "role": "hidden"}, {"params": [gain], "role": "vector"}], lr=1e-3, adam_lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.25)
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    gain.grad = torch.ones(5)
    matrix.grad = torch.randn(3, 5)
    opt.step()
    # First Adam step moves by lr exactly (m_hat / sqrt(v_hat) = 1): 1e-2 * 0.25.
    torch.testing.assert_close(gain.detach(), torch.full((5,), 1 - 2.5e-3))
    del sched


def test_registered_names_and_presets():
    names = lowmem.optim.available()
    for name in ("scale", "sgd", "sgd-column", "sgd-row", "sgd-sign", "sgd-singular"):
        assert name in names
    model = build_model("cpu-tiny", vocab_size=VOCAB)
    for preset, lr, adam_lr in (("llama-60m", 1e-3, 2e-2), ("llama-350m", 1e-3, 2e-2), ("llama-1b", 2e-4, 1e-3),
                                ("llama-7b", 1e-4, 1e-3)):
        group = lowmem.optim.build("scale", model, preset=preset).param_groups[0]
        assert (group["lr"], group["adam_lr"], group["normalization"], group["momentum_on"]) == (lr, adam_lr, "column", "head")
    group = lowmem.optim.build("sgd-sign", model).param_groups[0]
    assert (group["normalization"], group["momentum_on"]) == ("sign", "none")


# ----------------------------------------------------------------------------------------------------
# Newton-Schulz (shared with Muon).

@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (3, 16, 8)])
def test_newton_schulz_matches_torch_muon_and_orthogonalizes(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    X = newton_schulz(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X.double())
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's band around 1, not exactly 1
    # A batch is each matrix's torch.optim.Muon NS to the bit (baddbmm rounds as addmm per matrix).
    for G_i, X_i in zip(G.reshape(-1, *shape[-2:]), X.reshape(-1, *shape[-2:])):
        torch.testing.assert_close(X_i, _torch_newton_schulz()(G_i).float(), rtol=0, atol=0)


@pytest.mark.parametrize("name,hparams", [("sgd-singular", {}), ("scale", {"normalization": "singular",
                                                                           "momentum_on": "all"})])
def test_batched_singular_normalization_gives_the_per_matrix_bits(name, hparams):
    # Batched NS is the default off the CPU only; forced here, 20 steps equal one matrix at a time.
    from lowmem.optim.newton_schulz import BATCH_ELEMENTS, ns_batches

    models, optimizers = [], []
    for ns_batch_elements in (BATCH_ELEMENTS, 0):
        torch.manual_seed(0)
        models.append(build_model("cpu-tiny", vocab_size=VOCAB))
        optimizers.append(lowmem.optim.build(name, models[-1], lr=1e-2, **hparams))
        optimizers[-1].ns_batch_elements = ns_batch_elements
    matrices = [p for p in models[0].parameters() if p.dim() >= 2]
    assert max(len(b) for b in ns_batches(matrices, max_elements=BATCH_ELEMENTS)) > 1
    initial = [p.detach().clone() for p in models[0].parameters()]
    for step in range(20):
        for model, opt in zip(models, optimizers):
            _loss(model, step).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for batched, single in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(batched, single)
    assert max((p.detach() - w).norm() / w.norm() for p, w in zip(models[0].parameters(), initial)) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_singular_normalization_does_not_depend_on_the_gradients_scale(dtype):
    # NS divides by max(||G||, eps), as torch.optim.Muon: the result is the same for a gradient 2^-20
    # (norm ~4e-5) or 2^10 times as large. Dividing by ||G|| + eps instead would shrink the small one's
    # input by 0.3% in fp32, and NS's steep slope near 0 would carry that into the result.
    G = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    reference = newton_schulz(G, dtype=dtype)
    for power in (-20, 10):
        assert torch.equal(newton_schulz(G * 2.0**power, dtype=dtype), reference), power


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(5))
