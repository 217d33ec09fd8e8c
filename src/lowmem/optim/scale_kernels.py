"""SCALE's fused CPU kernels: each row's momentum EMA, norm and update in one pass (issue 28).

SCALE's step is memory-bound: on the CPU its cost is the number of passes over the matrices. Two parts
of it cannot be brought to one pass by torch ops or by torch.compile (torch 2.13):

  rows     the head's `m = lerp(m, G, 1 - beta)`, then `W -= lr * sqrt(n) * m / max(||m_row||, 1e-8 sqrt(n))`:
           inductor's C++ code generation crashes fusing the EMA with the row's norm and update
           (pytorch#196570); the forms that compile lose that fusion and take 2.5-10 floors
  columns  the embedding's norm of each column across all rows: inductor's column reduction takes 1.9
           floors, the blocked eager one 0.75

This module compiles a few lines of C once with the system's C compiler (`CC`, else `cc`, `gcc` or
`clang`), caches the library by a hash of the source, flags and CPU, and calls it through ctypes on the
tensors' memory:

  scale_rows      for each row of each matrix: d = lerp(m, g, 1 - beta) written back to m (or d = g
                  without momentum) while its sum of squares accumulates, then, with the row still in
                  cache, W = W * (1 - lr * wd) + step * d / max(||d||, floor): G and m read once, W and m
                  written once
  column_sumsq    the sum of squares of each column, rows streamed once into a row-sized accumulator

The arithmetic is the eager step's (lowmem.optim.scale.scale_update), in fp32 with a different
summation order, so a row's norm differs in its last bits. The rows (and the columns' partial sums) are
split across `torch.get_num_threads()` OpenMP threads: torch's own, as the library links the libgomp torch
has loaded. Only plain, contiguous fp32 CPU tensors come here (`usable`); the rest of `compiled=True` goes
through inductor.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from lowmem.errors import LowmemError
from lowmem.optim.base import is_dtensor

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#else  /* built without OpenMP (a compiler without it): one thread */
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif

/* Rows [begin, end) of the matrices' concatenated rows. momentum[i] == 0: no momentum, d = g. */
static void rows_range(int64_t count, float* const* weights, const float* const* grads, float* const* momentum,
                       const int64_t* rows, const int64_t* cols, const float* steps, const float* floors,
                       float decay, float ema_weight, int64_t begin, int64_t end) {
    int64_t first = 0;
    for (int64_t i = 0; i < count && first < end; first += rows[i], ++i) {
        int64_t lo = begin > first ? begin - first : 0, hi = end - first < rows[i] ? end - first : rows[i];
        int64_t n = cols[i];
        for (int64_t r = lo; r < hi; ++r) {
            float* restrict w = weights[i] + r * n;
            const float* restrict g = grads[i] + r * n;
            const float* d = g;
            float sum = 0.0f;
            if (momentum[i]) {
                float* restrict m = momentum[i] + r * n;
                #pragma omp simd reduction(+:sum)
                for (int64_t j = 0; j < n; ++j) {
                    float v = m[j] + ema_weight * (g[j] - m[j]);
                    m[j] = v;
                    sum += v * v;
                }
                d = m;
            } else {
                #pragma omp simd reduction(+:sum)
                for (int64_t j = 0; j < n; ++j) sum += g[j] * g[j];
            }
            float norm = sqrtf(sum);
            /* NaN stays NaN, as clamp_min in the eager step */
            float scale = steps[i] * (1.0f / (norm >= floors[i] || norm != norm ? norm : floors[i]));
            #pragma omp simd
            for (int64_t j = 0; j < n; ++j) w[j] = w[j] * decay + scale * d[j];
        }
    }
}

void scale_rows(int64_t count, float* const* weights, const float* const* grads, float* const* momentum,
                const int64_t* rows, const int64_t* cols, const float* steps, const float* floors,
                float decay, float ema_weight, int64_t total_rows, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
        rows_range(count, weights, grads, momentum, rows, cols, steps, floors, decay, ema_weight,
                   total_rows * part / parts, total_rows * (part + 1) / parts);
    }
}

/* sums[t][j] = sum over thread t's share of the rows of matrix[r][j]^2; sums has `threads` rows. */
void column_sumsq(const float* matrix, int64_t rows, int64_t cols, float* sums, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
        float* restrict acc = sums + part * cols;
        for (int64_t j = 0; j < cols; ++j) acc[j] = 0.0f;
        for (int64_t r = rows * part / parts; r < rows * (part + 1) / parts; ++r) {
            const float* restrict row = matrix + r * cols;
            #pragma omp simd
            for (int64_t j = 0; j < cols; ++j) acc[j] += row[j] * row[j];
        }
    }
}
"""
# -fopenmp: the library links libgomp.so.1, which resolves to the copy torch has already loaded, so the
# kernels run on torch's own OpenMP threads (as inductor's CPU kernels do), not on a second pool.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
WITHOUT_OPENMP = tuple("-fopenmp-simd" if flag == "-fopenmp" else flag for flag in FLAGS)  # if -fopenmp fails
# Rows a thread must get before a matrix is split across threads: opening an OpenMP region costs
# microseconds, 256 rows of a 512-wide matrix are tens of microseconds of work (a choice, not tuned).
MIN_ROWS_PER_THREAD = 256

_library: ctypes.CDLL | None = None


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether these tensors (None: absent) can go through the kernels: plain contiguous fp32 on the CPU."""
    return all(t is None or (not is_dtensor(t) and t.device.type == "cpu" and t.dtype == torch.float32
                             and t.is_contiguous() and t.dim() >= 1) for t in tensors)


def scale_rows_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor | None],
                *, lr: float, momentum: float, weight_decay: float, rms_floor: float) -> None:
    """SCALE's update of matrices normalized within rows ([size(0), -1] views), in place: the weight decay,
    each momentum's EMA (a `None` buffer: the raw gradient), and `W -= lr * d / max(rms(d_row), rms_floor)`."""
    if not params:
        return
    lr, momentum, weight_decay = float(lr), float(momentum), float(weight_decay)  # a 0-dim tensor lr too
    count = len(params)
    rows = [p.size(0) for p in params]
    cols = [p.numel() // max(1, p.size(0)) for p in params]
    pointers, sizes, values = ctypes.c_void_p * count, ctypes.c_int64 * count, ctypes.c_float * count
    _load().scale_rows(
        count, pointers(*(p.data_ptr() for p in params)), pointers(*(g.data_ptr() for g in grads)),
        pointers(*(None if m is None else m.data_ptr() for m in momentum_buffers)), sizes(*rows), sizes(*cols),
        values(*(-lr * n ** 0.5 for n in cols)), values(*(rms_floor * n ** 0.5 for n in cols)),
        1 - lr * weight_decay, 1 - momentum, sum(rows), _threads(sum(rows)))


def column_sum_of_squares(matrix: torch.Tensor) -> torch.Tensor:
    """The sum of squares of each column of a contiguous 2-D fp32 CPU matrix, [1, cols]."""
    rows, cols = matrix.shape
    threads = _threads(rows)
    sums = torch.empty(threads, cols, dtype=torch.float32)
    _load().column_sumsq(matrix.data_ptr(), rows, cols, sums.data_ptr(), threads)
    return sums.sum(0, keepdim=True) if threads > 1 else sums


def _threads(rows: int) -> int:
    return max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))


def cache_dir() -> Path:
    """Where the built library is kept: $LOWMEM_KERNEL_CACHE, else $XDG_CACHE_HOME/lowmem or ~/.cache/lowmem."""
    if os.environ.get("LOWMEM_KERNEL_CACHE"):
        return Path(os.environ["LOWMEM_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowmem"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu() -> str:
    # -march=native code is for this CPU: a cache shared by other machines keys on their flags too.
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _load() -> ctypes.CDLL:
    global _library
    if _library is not None:
        return _library
    compiler = _compiler()
    key = hashlib.sha256("\0".join((SOURCE, str(compiler), *FLAGS, _cpu())).encode()).hexdigest()[:16]
    path = cache_dir() / f"scale_kernels_{key}.so"
    if not path.exists():
        _build(compiler, path)
    library = ctypes.CDLL(str(path))
    pointer, count, value = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.scale_rows.argtypes = [count, pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                                   value, value, count, ctypes.c_int]
    library.scale_rows.restype = None
    library.column_sumsq.argtypes = [pointer, count, count, pointer, ctypes.c_int]
    library.column_sumsq.restype = None
    _library = library
    return library


def _build(compiler: str | None, path: Path) -> None:
    fix = ("install a C compiler (set CC to choose one) or train with "
           "compiled=false")
    if compiler is None:
        raise LowmemError(f"compiled=True on the CPU builds SCALE's fused kernels, but no C compiler was found "
                          f"(CC, cc, gcc, clang): {fix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # same filesystem: the rename is atomic
        source, built = Path(scratch) / "scale_kernels.c", Path(scratch) / path.name
        source.write_text(SOURCE)
        try:
            for flags in (FLAGS, WITHOUT_OPENMP):
                result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"],
                                        capture_output=True, text=True, timeout=300)
                if result.returncode == 0:
                    break
        except (OSError, subprocess.TimeoutExpired) as error:
            raise LowmemError(f"compiled=True on the CPU builds SCALE's fused kernels, but the C compiler "
                              f"{compiler!r} could not run ({error}): {fix}") from error
        if result.returncode != 0:
            raise LowmemError(f"compiled=True on the CPU builds SCALE's fused kernels, but {compiler} failed "
                              f"(exit {result.returncode}): {result.stderr.strip()[-800:]}\nFix: {fix}")
        os.replace(built, path)  # concurrent builders (torchrun's ranks) each install a whole library
