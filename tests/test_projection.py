"""The shared projection module: bases, sides, schedule (stagger), fallback, checks, meta device."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowmem.optim
from lowmem.config import parse_key_values
from lowmem.models import build_model
from lowmem.optim.apollo import Apollo
from lowmem.optim.galore import Fira, GaLore
from lowmem.optim.projection import (
    projection_side,
    randomized_svd_projection,
    svd_projection,
)
from lowmem.optim.reset import reset_moments
from lowmem.testing import TINY

CLASSES = [GaLore, Fira, Apollo]
METHODS = ["galore", "fira", "apollo", "apollo-mini"]


def low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    left, right = torch.randn(rows, rank, generator=gen), torch.randn(rank, cols, generator=gen)
    strengths = torch.linspace(3.0, 1.0, rank)
    return (left * strengths) @ right + noise * torch.randn(rows, cols, generator=gen)


@pytest.mark.parametrize("rows,cols", [(40, 24), (24, 40)])
def test_svd_projection_is_the_top_singular_subspace(rows, cols):
    matrix = low_rank_plus_noise(rows, cols, 6)
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    right = svd_projection(matrix, 4, "right")
    left = svd_projection(matrix, 4, "left")
    assert right.shape == (4, cols) and left.shape == (rows, 4)
    torch.testing.assert_close(right, vh[:4])
    torch.testing.assert_close(left, u[:, :4])
    torch.testing.assert_close(right @ right.T, torch.eye(4), atol=1e-5, rtol=0)


def test_svd_projection_of_bf16_is_computed_in_fp32():
    matrix = low_rank_plus_noise(64, 32, 8).bfloat16()
    basis = svd_projection(matrix, 8, "right")
    assert basis.dtype == torch.bfloat16
    expected = torch.linalg.svd(matrix.float(), full_matrices=False)[2][:8].bfloat16()
    assert torch.equal(basis, expected)


@pytest.mark.parametrize("side", ["right", "left"])
def test_randomized_svd_finds_the_same_subspace(side):
    matrix = low_rank_plus_noise(300, 200, 10, noise=0.05)
    exact = svd_projection(matrix, 8, side)
    approx = randomized_svd_projection(matrix, 8, side, seed=1)
    assert approx.shape == exact.shape
    if side == "left":
        exact, approx = exact.T, approx.T
    # Cosines of the principal angles between the two subspaces: all ~1.
    cosines = torch.linalg.svdvals(exact @ approx.T)
    assert cosines.min() > 0.999
    assert torch.equal(approx, randomized_svd_projection(matrix, 8, side, seed=1).T if side == "left" else approx)


def test_projection_sides():
    assert projection_side(10, 5, "std") == "right" and projection_side(5, 10, "std") == "left"
    assert projection_side(8, 8, "std") == "right"
    assert projection_side(10, 5, "reverse_std") == "left" and projection_side(5, 10, "reverse_std") == "right"
    assert projection_side(10, 5, "left") == "left" and projection_side(5, 10, "right") == "right"
    with pytest.raises(ValueError, match="proj_type"):
        projection_side(5, 10, "full")


@pytest.mark.parametrize("proj_type", ["reverse_std", "left", "right"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_proj_type_steps_with_consistent_shapes(cls, proj_type):
    w = torch.nn.Parameter(torch.randn(24, 16))
    opt = cls([{"params": [w], "role": "hidden"}], rank=4, update_proj_gap=2, proj_type=proj_type)
    for _ in range(3):
        w.grad = torch.randn(24, 16)
        opt.step()
    state = opt.state[w]
    side = projection_side(24, 16, proj_type)
    assert state["projection"].shape == ((4, 16) if side == "right" else (24, 4))
    assert state["exp_avg"].shape == ((24, 4) if side == "right" else (4, 16))
    assert torch.isfinite(w).all()


def _refresh_log(opt, params, steps):
    """Which parameters got a new projection at each step (1-based)."""
    log = []
    previous = {}
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        changed = set()
        for i, p in enumerate(params):
            projection = opt.state[p]["projection"].clone()
            if i not in previous or not torch.equal(previous[i], projection):
                changed.add(i)
            previous[i] = projection
        log.append(changed)
    return log


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_stagger_spreads_refreshes_over_the_gap(cls):
    gap, count = 5, 10
    params = [torch.nn.Parameter(torch.randn(12, 8)) for _ in range(count)]
    plain = _refresh_log(cls([{"params": params, "role": "hidden"}], rank=2, update_proj_gap=gap), params, 3 * gap)
    assert [len(changed) for changed in plain] == ([count] + [0] * (gap - 1)) * 3

    params = [torch.nn.Parameter(torch.randn(12, 8)) for _ in range(count)]
    staggered = _refresh_log(cls([{"params": params, "role": "hidden"}], rank=2, update_proj_gap=gap, stagger=True),
                             params, 3 * gap)
    assert len(staggered[0]) == count  # every parameter needs a first projection
    assert max(len(changed) for changed in staggered[1:]) == count // gap
    for i in range(count):  # after the first, each parameter refreshes exactly once per gap
        refreshes = [step for step, changed in enumerate(staggered[1:], start=2) if i in changed]
        assert all(b - a == gap for a, b in zip(refreshes, refreshes[1:])) and len(refreshes) >= 2


def test_momentum_reset_restarts_bias_correction_and_refreshes_the_projection():
    w = torch.nn.Parameter(torch.randn(12, 8))
    opt = GaLore([{"params": [w], "role": "hidden"}], rank=2, update_proj_gap=100)
    for _ in range(3):
        w.grad = torch.randn(12, 8)
        opt.step()
    before = opt.state[w]["projection"].clone()
    assert reset_moments(opt) == 1
    assert opt.state[w]["step"].item() == 0 and not opt.state[w]["exp_avg"].any()
    w.grad = torch.randn(12, 8)
    opt.step()
    assert not torch.equal(before, opt.state[w]["projection"])
    assert opt.state[w]["step"].item() == 1


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unprojectable_parameters_fall_back_to_adamw_with_one_warning(cls):
    vector = torch.nn.Parameter(torch.randn(16))
    small = torch.nn.Parameter(torch.randn(3, 40))  # rank 4 >= its smaller side 3
    square = torch.nn.Parameter(torch.randn(4, 4))  # rank 4 == its smaller side
    fine = torch.nn.Parameter(torch.randn(20, 12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = cls([{"params": [vector, small, square, fine], "role": "hidden"}], rank=4)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "3 parameter(s) cannot be projected at rank 4" in messages[0] and "AdamW" in messages[0]
    for p in (vector, small, square, fine):
        p.grad = torch.randn_like(p)
    opt.step()  # no IndexError
    for p in (vector, small, square):
        assert opt.state[p]["exp_avg"].shape == p.shape and "projection" not in opt.state[p]
    assert "projection" in opt.state[fine]


def test_roles_other_than_hidden_get_adamw_silently():
    model = build_model(TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = lowmem.optim.build("galore", model, rank=8)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert "projection" not in opt.state[model.embed_tokens.weight]
    assert opt.state[model.lm_head.weight]["exp_avg"].shape == model.lm_head.weight.shape
    assert "projection" in opt.state[model.layers[0].mlp.down_proj.weight]


def test_tensors_of_more_dims_are_viewed_as_matrices():
    conv = torch.nn.Parameter(torch.randn(16, 4, 3, 3))
    opt = GaLore([{"params": [conv], "role": "hidden"}], rank=4)
    conv.grad = torch.randn_like(conv)
    before = conv.detach().clone()
    opt.step()
    assert opt.state[conv]["projection"].shape == (16, 4)  # viewed 16 x 36: a left projection
    assert conv.shape == (16, 4, 3, 3) and not torch.equal(before, conv)


BAD = [
    ({"lr": -1.0}, "lr"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"betas": 0.9}, "betas"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"update_proj_gap": 0}, "update_proj_gap"),
    ({"scale": 0.0}, "scale"),
    ({"scale": -1.0}, "scale"),
    ({"proj_type": "full"}, "proj_type"),
    ({"svd": "lanczos"}, "svd"),
    ({"stagger": "yes"}, "stagger"),
]


@pytest.mark.parametrize("bad,name", BAD, ids=[b[1] for b in BAD])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bad_hyperparameters_raise(cls, bad, name):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=name):
        cls([w], **bad)
    with pytest.raises(ValueError, match=name):  # also in a param group's own settings
        cls([{"params": [w], **bad}])


@pytest.mark.parametrize("cls,bad,name", [
    (Fira, {"compat": "released"}, "compat"),
    (Apollo, {"scale_type": "row"}, "scale_type"),
    (Apollo, {"proj": "orthogonal"}, "proj"),
    (Apollo, {"seed": -1}, "seed"),
    (Apollo, {"seed": 1.5}, "seed"),
])
def test_method_specific_bad_hyperparameters_raise(cls, bad, name):
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.randn(8, 8))], **bad)


def test_bad_hyperparameter_message_names_value_and_range():
    with pytest.raises(ValueError, match=r"invalid rank: 0; it must be an integer >= 1"):
        GaLore([torch.nn.Parameter(torch.randn(8, 8))], rank=0)
    with pytest.raises(ValueError, match=r"unknown proj_type 'full'; choose one of: std, reverse_std, left, right"):
        GaLore([torch.nn.Parameter(torch.randn(8, 8))], proj_type="full")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_sparse_and_complex_gradients_raise_and_missing_grads_are_skipped(cls):
    w = torch.nn.Parameter(torch.randn(12, 8))
    idle = torch.nn.Parameter(torch.randn(12, 8))
    opt = cls([{"params": [w, idle], "role": "hidden"}], rank=2)
    w.grad = torch.randn(12, 8).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    z = torch.nn.Parameter(torch.randn(12, 8, dtype=torch.complex64))
    opt_complex = cls([{"params": [z], "role": "hidden"}], rank=2)
    z.grad = torch.randn_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        opt_complex.step()
    w.grad = torch.randn(12, 8)
    opt.step()
    assert idle not in opt.state or not opt.state[idle]


def _paper_state_elements(rows: int, cols: int, rank: int) -> int:
    """methods.md: 2 r max(m, n) for the moments + r min(m, n) for the projection."""
    return 2 * rank * max(rows, cols) + rank * min(rows, cols)


@pytest.mark.parametrize("name", METHODS)
def test_step_on_meta_model_creates_state_of_the_right_shapes(name):
    model = build_model("llama-60m", device="meta")
    optimizer = lowmem.optim.build(name, model, preset="llama-60m")
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        optimizer.step()
    rank = optimizer.param_groups[0]["rank"]
    assert rank == (1 if name == "apollo-mini" else 128)
    for module in (model.layers[0].self_attn.q_proj, model.layers[0].mlp.up_proj, model.layers[0].mlp.down_proj):
        state = optimizer.state[module.weight]
        rows, cols = module.weight.shape
        elements = sum(t.numel() for t in state.values() if torch.is_tensor(t) and t.dim() >= 1)
        assert elements == _paper_state_elements(rows, cols, rank)
        assert state["projection"].device.type == "meta" and state["projection"].dtype == torch.float32
        assert state["step"].item() == 2
    # AdamW roles: full-size moments.
    assert optimizer.state[model.lm_head.weight]["exp_avg"].shape == model.lm_head.weight.shape


def test_every_method_declares_the_shared_arguments_explicitly_with_the_same_defaults():
    """GaLore, Fira and APOLLO each list every hyperparameter in their own signature (what
    lowmem.optim.Method reads); the shared ones have the same names and, but for APOLLO's rank and
    scale, the same defaults."""
    import inspect

    shared = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "rank": 128, "update_proj_gap": 200,
              "scale": 0.25, "proj_type": "std", "svd": "exact", "stagger": False, "foreach": True,
              "state_bits": None, "stochastic_rounding": False, "compiled": False, "batch_elements": None}
    own = {GaLore: {}, Fira: {"compat": "official"}, Apollo: {"scale_type": "channel", "proj": "random", "seed": 0}}
    for cls, extra in own.items():
        params = inspect.signature(cls.__init__).parameters
        assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values()), cls.__name__
        defaults = {name: p.default for name, p in params.items() if name not in ("self", "params")}
        expected = {**shared, **extra, **({"rank": 256, "scale": 1.0} if cls is Apollo else {})}
        assert defaults == expected, cls.__name__
    w = torch.nn.Parameter(torch.randn(12, 8))
    opt = Apollo([{"params": [w], "role": "hidden"}], rank=2, seed=3, lr=0.5)
    assert (opt.defaults["rank"], opt.defaults["seed"], opt.defaults["lr"], opt.defaults["eps"]) == (2, 3, 0.5, 1e-6)
    with pytest.raises(TypeError):
        Apollo([w], ranks=2)


@pytest.mark.parametrize("cls", CLASSES)
def test_step_evaluates_the_closure_with_grad_and_returns_its_loss(cls):
    w = torch.nn.Parameter(torch.randn(12, 8))
    opt = cls([{"params": [w], "role": "hidden"}], rank=2)

    def closure():
        opt.zero_grad()
        loss = w.square().sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() == pytest.approx(before.square().sum().item())
    assert not torch.equal(w.detach(), before)


@pytest.mark.parametrize("name", METHODS)
def test_a_batched_step_equals_one_matrix_at_a_time_bit_for_bit(name, monkeypatch):
    # Issue 28: the r-side Adam of a batch of matrices runs as one foreach call per operation; on the CPU
    # that is the same per-tensor arithmetic, so weights and state match the per-matrix path exactly,
    # through refreshes (gap 2) and weight decay.
    import lowmem.optim.projection as projection

    batch_sizes: list[int] = []  # how many matrices each low-rank Adam call took
    adam = projection.low_rank_adam

    def counting_adam(low_ranks, *args, **kwargs):
        batch_sizes.append(len(low_ranks))
        return adam(low_ranks, *args, **kwargs)

    monkeypatch.setattr(projection, "low_rank_adam", counting_adam)

    def five_steps(**hparams) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[int]]:
        batch_sizes.clear()
        torch.manual_seed(0)
        model = build_model(TINY)
        optimizer = lowmem.optim.build(name, model, lr=1e-2, rank=4, update_proj_gap=2, weight_decay=0.1, **hparams)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        return model, optimizer, list(batch_sizes)

    batched_model, batched, batched_sizes = five_steps(batch_elements=3 * TINY.hidden_size * TINY.intermediate_size)
    single_model, single, single_sizes = five_steps(batch_elements=0)
    assert max(batched_sizes) >= 3 and len(batched_sizes) > 5  # several batches per step, several matrices each
    assert set(single_sizes) == {1}
    # Unset (the default, or absent from a checkpoint from before the option): the device's default, per matrix on the
    # CPU, where batching measured no faster; batched elsewhere, and on meta so that the memory estimate
    # counts a batch's temporaries.
    _, default, default_sizes = five_steps()
    assert default_sizes == single_sizes
    for group in default.param_groups:  # as loaded from a checkpoint saved before the option
        del group["batch_elements"]
    batch_sizes.clear()
    default.step()
    assert set(batch_sizes) == {1}
    assert projection.default_projected_batch_elements(torch.device("meta")) == projection.PROJECTED_BATCH_ELEMENTS
    assert lowmem.optim.build(name, batched_model, **parse_key_values(["batch_elements=7"], "--opt")).defaults[
        "batch_elements"] == 7
    with pytest.raises(ValueError, match="batch_elements"):
        lowmem.optim.build(name, batched_model, rank=4, batch_elements=-1)
    for a, b in zip(batched_model.parameters(), single_model.parameters()):
        assert torch.equal(a, b)
        for key, value in batched.state[a].items():
            other = single.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
