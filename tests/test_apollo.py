"""APOLLO and APOLLO-Mini against the official apollo-torch, the seeds in checkpoints, presets.

The random projection is not injected: lowmem reproduces the released generator semantics (seed of
parameter i = i, 1-based over all parameters; randn from Generator(device).manual_seed(seed) / sqrt(r);
the next seed is the 15th randint draw of a CPU generator seeded with the current one), and
test_random_projection_reproduces_the_official_generator checks that directly.
"""

from __future__ import annotations

import io

import pytest
import torch

import lowmem.optim
from lowmem.models import build_model
from lowmem.optim.apollo import Apollo
from lowmem.optim.projection import gaussian_projection, next_seed
from lowmem.testing import TINY, same_gradients_every_parameter, twin_models

STEPS = 30  # with update_proj_gap 10: new random projections at steps 1, 11 and 21
GAP = 10
SHAPES = [(48, 20), (20, 48)]  # tall (right projection) and wide (left projection)

APOLLO = dict(rank=4, scale=1.0, scale_type="channel")
APOLLO_MINI = dict(rank=1, scale=128.0, scale_type="tensor")


def gradient_stream(shape: tuple[int, int], steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    persistent = torch.randn(shape, generator=gen)
    return [persistent + 0.5 * torch.randn(shape, generator=gen) for _ in range(steps)]


def run_side_by_side(make_ours, make_theirs, shapes, steps=STEPS):
    """Both optimizers over the same parameters (one per shape, so seeds 1, 2, ... as released) and
    the same precomputed gradients; returns [(ours, theirs, initial)] per shape."""
    initial = [torch.randn(s, generator=torch.Generator().manual_seed(100 + i)) for i, s in enumerate(shapes)]
    ours = [torch.nn.Parameter(w.clone()) for w in initial]
    theirs = [torch.nn.Parameter(w.clone()) for w in initial]
    opt_ours, opt_theirs = make_ours(ours), make_theirs(theirs)
    streams = [gradient_stream(s, steps, seed=i) for i, s in enumerate(shapes)]
    for step in range(steps):
        for a, b, stream in zip(ours, theirs, streams):
            a.grad, b.grad = stream[step].clone(), stream[step].clone()
        opt_ours.step()
        opt_theirs.step()
    return [(a.detach(), b.detach(), w) for a, b, w in zip(ours, theirs, initial)]


def assert_close(ours, theirs, initial, tol=1e-5):
    relative = ((ours - theirs).norm() / theirs.norm()).item()
    relative_to_update = ((ours - theirs).norm() / (theirs - initial).norm()).item()
    assert (theirs - initial).norm() / initial.norm() > 1e-2, "the oracle run did not move the weights"
    assert relative <= tol and relative_to_update <= tol, (relative, relative_to_update)


def official_apollo(params, proj="random", **hp):
    apollo_torch = pytest.importorskip("apollo_torch", reason="the official APOLLO package apollo-torch is not installed")
    group = {"params": params, "rank": hp.pop("rank"), "update_proj_gap": GAP, "scale": hp.pop("scale"),
             "scale_type": hp.pop("scale_type"), "proj": proj, "proj_type": "std"}
    return apollo_torch.APOLLOAdamW([group], **hp)


CASES = [
    ("apollo", dict(APOLLO, lr=0.01)),
    ("apollo-wd-betas", dict(APOLLO, lr=0.02, weight_decay=0.1, betas=(0.8, 0.99))),
    ("apollo-mini", dict(APOLLO_MINI, lr=0.01)),
]


@pytest.mark.parametrize("hp", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_official_apollo_torch(hp):
    results = run_side_by_side(
        lambda ps: Apollo([{"params": ps, "role": "hidden"}], update_proj_gap=GAP, **hp),
        lambda ps: official_apollo(ps, **dict(hp)), SHAPES)
    for ours, theirs, initial in results:
        assert_close(ours, theirs, initial)


def released_groups(model, **low_rank):
    """The released APOLLO training script's grouping: the nn.Linear weights of modules named *attn*
    or *mlp* in one group with the low-rank settings, after a group of every other parameter."""
    targets = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(key in name for key in ("attn", "mlp"))]
    ids = {id(p) for p in targets}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": targets, **low_rank}]



@pytest.mark.parametrize("name,hp", [
    ("apollo", dict(rank=4, lr=0.01)),
    ("apollo", dict(rank=4, lr=0.02, weight_decay=0.1, betas=(0.8, 0.99))),
    ("apollo-mini", dict(lr=0.01)),
], ids=["apollo", "apollo-wd-betas", "apollo-mini"])
def test_build_matches_official_on_every_parameter_with_the_released_grouping(name, hp):
    """lowmem.optim.build's role groups (hidden first) against apollo_torch given the released script's
    groups (regular first): same seeds, hence the same random matrices, and the released Adam form on
    the embedding, head and gains; 30 steps, new projections at 1, 11, 21."""
    apollo_torch = pytest.importorskip("apollo_torch", reason="the official APOLLO package apollo-torch is not installed")
    ours_model, theirs_model = twin_models()
    ours = lowmem.optim.build(name, ours_model, update_proj_gap=GAP, **hp)
    hp = dict(hp)
    settings = dict(APOLLO_MINI if name == "apollo-mini" else APOLLO, rank=hp.pop("rank", 1))
    theirs = apollo_torch.APOLLOAdamW(released_groups(theirs_model, update_proj_gap=GAP, proj="random",
                                                      proj_type="std", **settings), **hp)
    errors = same_gradients_every_parameter(ours_model, theirs_model, ours, theirs, steps=STEPS)
    assert max(errors.values()) <= 1e-5, {k: v for k, v in errors.items() if v > 1e-5}


def test_svd_projection_variant_matches_official():
    hp = dict(APOLLO, lr=0.01)
    results = run_side_by_side(
        lambda ps: Apollo([{"params": ps, "role": "hidden"}], update_proj_gap=GAP, proj="svd", **hp),
        lambda ps: official_apollo(ps, proj="svd", **dict(hp)), SHAPES)
    for ours, theirs, initial in results:
        assert_close(ours, theirs, initial)


def test_oracle_comparison_can_fail():
    """Another seed (so other random matrices) puts APOLLO far outside the tolerance."""
    hp = dict(APOLLO, lr=0.01)
    results = run_side_by_side(
        lambda ps: Apollo([{"params": ps, "role": "hidden"}], update_proj_gap=GAP, seed=1, **hp),
        lambda ps: official_apollo(ps, **dict(hp)), SHAPES)
    for ours, theirs, _ in results:
        assert ((ours - theirs).norm() / theirs.norm()).item() > 1e-4


@pytest.mark.parametrize("rows,cols,rank", [(48, 20, 4), (20, 48, 4), (64, 64, 1)])
def test_random_projection_reproduces_the_official_generator(rows, cols, rank):
    random_projector = pytest.importorskip("apollo_torch.random_projector", reason="apollo-torch is not installed")
    official = random_projector.GradientProjector(rank, update_proj_gap=GAP, proj_type="std", seed=7)
    grad = torch.randn(rows, cols)
    seed = 7
    for refresh in range(3):
        official.project(grad, refresh * GAP)
        side = "right" if rows >= cols else "left"
        ours = gaussian_projection(rows, cols, rank, side, seed, device=grad.device, dtype=grad.dtype)
        assert torch.equal(ours, official.ortho_matrix)
        seed = next_seed(seed)
        assert seed == official.seed


def test_random_projection_statistics():
    projection = gaussian_projection(4096, 64, 64, "right", seed=3, device=torch.device("cpu"), dtype=torch.float32)
    assert projection.shape == (64, 64)
    big = gaussian_projection(2048, 4096, 16, "left", seed=3, device=torch.device("cpu"), dtype=torch.float32)
    assert big.shape == (2048, 16)
    # 32768 entries: the mean's standard error is 0.25/181 = 0.0014, the variance's 0.0005 (5 sigma below).
    assert abs(big.var().item() - 1 / 16) < 0.0025 and abs(big.mean().item()) < 0.007
    bf16 = gaussian_projection(2048, 4096, 16, "left", seed=3, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, big.bfloat16())  # drawn in fp32, then cast


def _tokens(step: int, batch: int = 4, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(step))


def _train(model, optimizer, start: int, stop: int) -> None:
    for step in range(start, stop):
        tokens = _tokens(step)
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_seeds_are_python_ints_that_a_weights_only_load_keeps_whole():
    # 63-bit seeds (next_seed's draws): a tensor would be cast to the parameter's dtype by
    # load_state_dict and rounded. (The resume itself: tests/test_optimizer_contract.py.)
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = lowmem.optim.build("apollo", model, rank=8, update_proj_gap=4)
    _train(model, optimizer, 0, 5)  # each refresh (steps 1 and 5) advances a seed by next_seed
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = lowmem.optim.build("apollo", build_model(TINY), rank=8, update_proj_gap=4)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    seeds = [s["seed"] for s in resumed.state.values() if "seed" in s]
    assert seeds and all(isinstance(s, int) and s >= 2**32 for s in seeds)
    assert seeds == [s["seed"] for s in optimizer.state.values() if "seed" in s]


def test_registered_names_presets_and_defaults():
    assert {"apollo", "apollo-mini"} <= set(lowmem.optim.available())
    model = build_model(TINY)
    opt = lowmem.optim.build("apollo-mini", model)
    hidden = next(g for g in opt.param_groups if g["role"] == "hidden")
    assert (hidden["rank"], hidden["scale_type"], hidden["scale"], hidden["update_proj_gap"], hidden["lr"]) == (
        1, "tensor", 128.0, 200, 0.01)
    opt = lowmem.optim.build("apollo", model, preset="llama-60m", rank=16)
    hidden = next(g for g in opt.param_groups if g["role"] == "hidden")
    assert (hidden["rank"], hidden["scale_type"], hidden["scale"], hidden["proj"]) == (16, "channel", 1.0, "random")
    apollo = lowmem.optim.method("apollo")
    sizes = ("llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b")
    # The released scripts/pretrain_c4/llama_*_apollo.sh ranks (see lowmem.optim.apollo).
    assert [apollo.presets[s]["rank"] for s in sizes] == [128, 192, 256, 256, 256]
