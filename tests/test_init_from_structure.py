"""Structures started from trained dense weights (issue 30: `--init-from DIR --structure ...` dropped
the pretrained hidden matrices). `Structure.apply(model, pretrained=True)`, which the assembly calls
after loading `train.init_from`, starts each structure from the dense matrix it converts and says so
in the log: LoRA computes what the dense model did, Low-Rank is the truncated SVD (exact on a rank-r
matrix), sparse keeps the largest-L1 blocks (everything at density 1), SLTrain adds the residual's
largest entries to the SVD; a structure that cannot start from dense weights is refused."""

from __future__ import annotations

import logging

import pytest
import torch

from lowmem.assembly import build_model
from lowmem.errors import ConfigError
from lowmem.registry import STRUCTURES
from lowmem.structure import Structure, build_structure, hidden_linears
from lowmem.structure.lowrank import factor_modules
from lowmem.structure.sparse import sparse_layers
from lowmem.testing import TINY


def trained(rank: int | None = None) -> torch.nn.Module:
    """A dense fp64 model standing for a trained one; with `rank`, every hidden matrix has that rank."""
    torch.manual_seed(0)
    model = build_model(TINY).double().eval()
    if rank is not None:
        with torch.no_grad():
            for *_, linear in hidden_linears(model):
                out, inp = linear.weight.shape
                linear.weight.copy_(torch.randn(out, rank, dtype=torch.float64) @ torch.randn(rank, inp, dtype=torch.float64) / inp)
    return model


def structured(model: torch.nn.Module, spec: dict) -> tuple[torch.nn.Module, object]:
    twin = build_model(TINY).double()
    twin.load_state_dict(model.state_dict())
    structure = build_structure(spec)
    structure.apply(twin, pretrained=True)
    return twin.eval(), structure


IDS = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def test_lora_starts_at_the_dense_model(caplog):
    dense = trained()
    with caplog.at_level(logging.INFO, logger="lowmem.structure"):
        model, _ = structured(dense, {"name": "lora", "rank": 8})
    torch.testing.assert_close(model(IDS), dense(IDS), rtol=0, atol=0)
    assert "structure lora: started from the trained dense weights: W0 = the trained weight" in caplog.text


def test_lowrank_starts_at_the_truncated_svd(caplog):
    exact = trained(rank=8)  # rank-8 matrices: the rank-8 start is exact
    with caplog.at_level(logging.INFO, logger="lowmem.structure"):
        model, _ = structured(exact, {"name": "lowrank", "rank": 8, "alpha": 16})
    torch.testing.assert_close(model(IDS), exact(IDS), rtol=1e-9, atol=1e-9)
    assert "best rank-8 approximation" in caplog.text and "relative error" in caplog.text
    dense = trained()  # full rank: the start is the best rank-r approximation (Eckart-Young), not W
    model, structure = structured(dense, {"name": "lowrank", "rank": 16, "alpha": 32})
    for (*_, linear), module in zip(hidden_linears(dense), factor_modules(model)):
        u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
        torch.testing.assert_close(module.dense_weight(), (u[:, :16] * s[:16]) @ vh[:16], rtol=1e-9, atol=1e-12)
        # balanced factors: B^T B = A A^T (times scale), as a refactorization leaves them
        torch.testing.assert_close(module.lora_B.t() @ module.lora_B, module.lora_A @ module.lora_A.t(), atol=1e-9, rtol=1e-9)
    assert 0 < min(structure.start_errors) and max(structure.start_errors) < 1
    assert not torch.allclose(model(IDS), dense(IDS), atol=1e-3)


def test_sparse_keeps_the_largest_blocks_and_everything_at_density_one(caplog):
    dense = trained()
    full, _ = structured(dense, {"name": "sparse", "density": 1.0, "block": 4, "storage": "compact"})
    torch.testing.assert_close(full(IDS), dense(IDS), rtol=0, atol=0)
    with caplog.at_level(logging.INFO, logger="lowmem.structure"):
        half, _ = structured(dense, {"name": "sparse", "density": 0.5, "block": 4})
    assert "largest blocks by L1 norm" in caplog.text
    for (*_, linear), layer in zip(hidden_linears(dense), sparse_layers(half)):
        scores = linear.weight.detach().reshape(-1, 4).abs().sum(1)
        active = layer.block_mask()
        assert scores[active].min() >= scores[~active].max()
        torch.testing.assert_close(layer.dense_weight().reshape(-1, 4)[active], linear.weight.detach().reshape(-1, 4)[active])


def test_sltrain_adds_the_residuals_largest_entries_to_the_svd():
    dense = trained()
    model, _ = structured(dense, {"name": "sltrain", "rank": 8, "alpha": 16, "density": 0.05})
    lowrank, _ = structured(dense, {"name": "lowrank", "rank": 8, "alpha": 16})
    for (*_, linear), ours, svd in zip(hidden_linears(dense), factor_modules(model), factor_modules(lowrank)):
        w = linear.weight.detach()
        torch.testing.assert_close(ours.product(), svd.product())
        residual = (w - svd.product()).reshape(-1)
        support = ours.sparse_index.long()
        assert set(support.tolist()) == set(residual.abs().topk(support.numel()).indices.tolist())
        torch.testing.assert_close(ours.sparse_values, residual[support])
        assert torch.all(support[1:] > support[:-1])  # sorted, as the layer's index must be
        assert (w - ours.dense_weight()).norm() < (w - svd.dense_weight()).norm()


def test_a_structure_that_cannot_start_from_dense_weights_is_refused():
    class Scratch(Structure):  # declares no start from dense weights: it would drop them
        name = "scratch-only"

        def convert(self, linear, path):
            return torch.nn.Linear(linear.in_features, linear.out_features, bias=False)

    with pytest.raises(ConfigError, match="cannot start from trained dense weights"):
        Scratch().apply(build_model(TINY), pretrained=True)
    assert {"lora", "lowrank", "sltrain", "sparse"} <= {n for n in STRUCTURES.names() if STRUCTURES.get(n).starts_from_dense}
