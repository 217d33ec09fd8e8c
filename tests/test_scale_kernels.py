"""SCALE's fused CPU kernels (lowmem.optim.scale_kernels, issue 28): each row's EMA, norm and update in
one pass, and the columns' sums of squares, against the eager step they replace under compiled=True."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.errors import LowmemError
from lowmem.optim import scale_kernels
from lowmem.optim.scale import RMS_FLOOR, scale_update

# Odd widths (not a multiple of the vector length), a single row and column, and enough rows (> 256 per
# thread) that two threads split a matrix and the split falls inside the second matrix.
SHAPES = [(37, 19), (1, 1), (5, 1), (3, 64), (700, 33)]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _tensors(seed: int, with_momentum: bool):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen) for shape in SHAPES]
    grads = [torch.randn(shape, generator=gen) for shape in SHAPES]
    buffers = [torch.randn(shape, generator=gen) if with_momentum and i % 2 == 0 else None
               for i, shape in enumerate(SHAPES)]
    return params, grads, buffers


def _relative(ours: torch.Tensor, theirs: torch.Tensor, start: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).norm() / (theirs.double() - start.double()).norm()).item()


@pytest.mark.parametrize("with_momentum", [False, True], ids=["gradients", "momentum"])
def test_rows_are_the_eager_step_over_ten_steps(with_momentum, threads):
    """Ten steps with weight decay and a new lr each: every weight within 1e-6 of the eager step relative
    to how far it moved, every momentum within 1e-6 of its own size."""
    start, grads, start_buffers = _tensors(0, with_momentum)
    ours, theirs = [p.clone() for p in start], [p.clone() for p in start]
    our_buffers = [None if m is None else m.clone() for m in start_buffers]
    their_buffers = [None if m is None else m.clone() for m in start_buffers]
    for step in range(10):
        lr = 1e-2 * (step + 1)
        scale_kernels.scale_rows_(ours, grads, our_buffers, lr=lr, momentum=0.9, weight_decay=0.1,
                                  rms_floor=RMS_FLOOR)
        scale_update(theirs, grads, their_buffers, [1] * len(theirs), lr=lr, momentum=0.9, weight_decay=0.1,
                     normalization="column")
    for shape, a, b, s in zip(SHAPES, ours, theirs, start):
        assert _relative(a, b, s) <= 1e-6, shape
    for a, b in zip(our_buffers, their_buffers):
        if b is not None:
            assert ((a - b).norm() / b.norm()).item() <= 1e-6


def test_a_row_with_nan_turns_nan_and_a_zero_row_only_decays_as_in_the_eager_step():
    params, grads, buffers = _tensors(1, with_momentum=False)
    grads[0][3, 5] = float("nan")
    grads[0][4].zero_()
    ours, theirs = [p.clone() for p in params], [p.clone() for p in params]
    scale_kernels.scale_rows_(ours, grads, buffers, lr=0.1, momentum=0.9, weight_decay=0.5, rms_floor=RMS_FLOOR)
    scale_update(theirs, grads, buffers, [1] * len(theirs), lr=0.1, momentum=0.9, weight_decay=0.5,
                 normalization="column")
    assert ours[0][3].isnan().all() and theirs[0][3].isnan().all()
    assert ours[0].isnan().sum() == ours[0].size(1)  # the other rows are finite
    torch.testing.assert_close(ours[0][4], params[0][4] * (1 - 0.1 * 0.5), rtol=0, atol=0)
    torch.testing.assert_close(theirs[0][4], ours[0][4], rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 3, 255, 513, 3000])
def test_column_sums_of_squares(rows, threads):
    matrix = torch.randn(rows, 37, generator=torch.Generator().manual_seed(rows))
    sums = scale_kernels.column_sum_of_squares(matrix)
    assert sums.shape == (1, 37)
    torch.testing.assert_close(sums, matrix.double().square().sum(0, keepdim=True).float(), rtol=2e-6, atol=0)


def test_only_plain_contiguous_fp32_cpu_tensors_are_usable():
    matrix = torch.randn(4, 6)
    assert scale_kernels.usable(matrix, torch.nn.Parameter(matrix.clone()), None)
    assert not scale_kernels.usable(matrix, matrix.t())
    assert not scale_kernels.usable(matrix.bfloat16())
    assert not scale_kernels.usable(torch.empty(4, 6, device="meta"))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache and no library loaded in this process."""
    monkeypatch.setenv("LOWMEM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(scale_kernels, "_library", None)
    return tmp_path


def test_the_library_is_built_once_into_the_cache_and_reused(fresh_cache, monkeypatch):
    scale_kernels.column_sum_of_squares(torch.ones(2, 3))
    built = list(fresh_cache.glob("scale_kernels_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(scale_kernels, "_library", None)
    assert scale_kernels.column_sum_of_squares(torch.ones(2, 3)).tolist() == [[2.0, 2.0, 2.0]]
    assert list(fresh_cache.glob("scale_kernels_*.so")) == built and built[0].stat().st_mtime_ns == stamp
    assert not [p for p in fresh_cache.iterdir() if p not in built]  # no scratch left behind


@pytest.mark.parametrize("compiler, message", [
    ("/nonexistent/cc", "could not run"),
    ("false", "failed"),
])
def test_a_compiler_that_cannot_build_says_so_and_how_to_fix_it(compiler, message, fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", compiler)
    with pytest.raises(LowmemError, match=message) as error:
        scale_kernels.column_sum_of_squares(torch.ones(2, 3))
    assert "compiled=false" in str(error.value) and "C compiler" in str(error.value)
    assert not list(fresh_cache.glob("*.so"))


def test_scale_compiled_takes_the_kernels_for_fp32_cpu_matrices_only(monkeypatch):
    """Under SCALE(compiled=True) the fp32 CPU matrices go to the kernels, rows and columns; the step is
    eager's within rounding (tests/test_compiled_step.py holds it to 1e-6 over ten steps)."""
    import lowmem.optim
    from lowmem.models import build_model
    from lowmem.optim import adamw
    from lowmem.testing import TINY

    calls = {"rows": 0, "columns": 0}
    rows, columns = scale_kernels.scale_rows_, scale_kernels.column_sum_of_squares

    def counted_rows(params, *args, **kwargs):
        calls["rows"] += len(params)
        return rows(params, *args, **kwargs)

    def counted_columns(matrix):
        calls["columns"] += 1
        return columns(matrix)

    monkeypatch.setattr(adamw, "COMPILE_BACKEND", "eager")  # the vectors' AdamW: traced, not built by inductor
    monkeypatch.setattr(scale_kernels, "scale_rows_", counted_rows)
    monkeypatch.setattr(scale_kernels, "column_sum_of_squares", counted_columns)
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = lowmem.optim.build("scale", model, compiled=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    matrices = [p for p in model.parameters() if p.dim() == 2]
    assert calls == {"rows": len(matrices) - 1, "columns": 1}  # all but the embedding; the embedding
    assert math.isfinite(sum(p.sum().item() for p in model.parameters()))
