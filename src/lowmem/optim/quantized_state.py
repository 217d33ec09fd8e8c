"""Optimizer state held in 8 bits: blockwise codes with one fp32 scale per block, the one mechanism
every method's moments use (`--opt state_bits=8`).

References: Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
arXiv 2110.02861 (blockwise absmax scaling, the dynamic tree map); Li, Chen & Zhu, "Memory Efficient
Optimizers with 4-bit States", arXiv 2309.01507 (the zero-point problem: a second moment that
quantizes to 0 turns m / (sqrt(v) + eps) into an update of m / eps, so its map has no zero).

Algorithm, for a state tensor x of a parameter shaped like x:
  x is viewed as rows [shape[0], -1]; each row is cut into blocks of BLOCK elements (the last block of a
  row may be shorter); per block absmax = max |x|, and each x / absmax in [-1, 1] is stored as the
  uint8 index of the nearest of 256 map values (or, with stochastic rounding, one of the two
  neighbours with probability by distance, so the rounding is unbiased). Dequantized: map[code] * absmax.
  A step dequantizes to fp32, updates there, and requantizes (`dequantized`, the one place this happens);
  the parameter's update uses the fp32 moments of this step, before their requantization.

Maps (`dynamic_map`): the dynamic tree of Dettmers et al. Its decades 10^-6 ... 10^0 of |value| hold
2^d (signed) or 2^(d+1) (unsigned: no sign bit) values for decade d = 0..6, the midpoints of that many
equal parts of [0.1, 1] scaled by 10^(d-6), plus 0 and 1: 127 + 127 + 2 (signed) or 254 + 2 (unsigned)
= 256. These are the same 256 values as bitsandbytes' `create_dynamic_map` (tests/test_quantized_state.py).
First moments and momenta use the signed map. Second moments use the unsigned map without zero: the
code that would be 0 becomes the one value of a seventh decade down (0.55e-7: a code with all seven
exponent bits set leaves no fraction bit), so a positive v never dequantizes to 0 unless its whole block is 0.

Why blocks never cross a row: FSDP2 shards a parameter (and so its state) on dim 0, by whole rows. With
every block inside one row, a shard's codes and scales are exactly the blocks of its rows: codes are
shaped like the parameter and scales are [rows, ceil(row_length / BLOCK)], both sharded on dim 0 like
the parameter (DTensors with its placements), so a checkpoint reshards to any number of processes and
each rank quantizes alone, without communication.

Which tensors: only those with >= 2 dimensions and >= MIN_QUANTIZED_NUMEL elements, decided from the
parameter's GLOBAL shape (a DTensor's `shape`), so every rank, and a run at another world size,
decides alike. Vectors (norm gains, biases) stay in full precision: they have no rows to align
blocks with and are a negligible part of the state.

State not shaped like its parameter (`quantizes_state`, `init_quantized_state`): a projected moment
(GaLore, Fira, APOLLO: [rows, r] row-sharded like the parameter, or [r, cols] replicated) is blocked
within its own rows and decided from its own global shape, and only where codes and scales are
smaller than fp32 values (not rows of one element); SMET's compact moment (k*B active entries, never
sharded) is viewed as one row [1, k*B].

State is plain tensors: `<key>_codes` (uint8, shaped like the parameter) and `<key>_absmax` (fp32), for
key in the method's moment names ("exp_avg", "exp_avg_sq"); it loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from lowmem.optim.base import ABSMAX_SUFFIX, is_dtensor, local_tensor

STATE_BITS = (None, 32, 8)  # None and 32: full precision (the default); 8: blockwise 8-bit codes
BLOCK = 256  # elements per block (bitsandbytes' and torchao's 8-bit optimizers use 256 too)
MIN_QUANTIZED_NUMEL = 4096  # smaller tensors stay in full precision (as bitsandbytes' min_8bit_size)
# Elements (of whole rows) that quantize_blockwise / dequantize_blockwise work through at a time: their
# temporaries (fp32 blocks and scaled values, int32 buckets, gathered thresholds) are ~6x the chunk's
# fp32 bytes, which at a 7B model's head (131M elements) would add 3 GB to the step's peak whole.
CHUNK_ELEMENTS = 2 ** 20
CODES, ABSMAX = "_codes", ABSMAX_SUFFIX
# State keys whose values are >= 0 (second moments): the unsigned map without zero. Every other
# quantized key (first moments, momenta) gets the signed map.
UNSIGNED_KEYS = ("exp_avg_sq", "max_exp_avg_sq")
MOMENTUM = "momentum_buffer"  # the momentum of SCALE's and Muon's matrices
DECADES = 7  # 10^-6 ... 10^0


def dynamic_map(signed: bool, with_zero: bool = True) -> torch.Tensor:
    """The 256 sorted fp32 values of the dynamic tree map (module docstring); `with_zero=False` (unsigned
    only) puts 0.55e-7 where 0 would be."""
    if signed and not with_zero:
        raise ValueError("the signed map keeps its zero: first moments change sign")
    values: list[float] = [1.0, 0.0 if with_zero else 0.55e-7]
    for decade in range(DECADES):
        parts = 2 ** decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1, parts + 1, dtype=torch.float32)  # all in fp32, as the reference
        decade_values = 10.0 ** (decade - (DECADES - 1)) * ((edges[:-1] + edges[1:]) / 2)
        values += decade_values.tolist()
        if signed:
            values += (-decade_values).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False, with_zero=False)


def map_for(key: str) -> torch.Tensor:
    return UNSIGNED_MAP if key in UNSIGNED_KEYS else SIGNED_MAP


# Nearest-code lookup by the float's bits, not a binary search (torch.bucketize costs ~100-140 ns per
# element on this CPU, most of an 8-bit step): the top LOOKUP_BITS bits of a float32 (sign, exponent,
# 8 mantissa bits) name a bucket of floats at most 2^-8 = 0.39% wide relative to its values, narrower
# than any two neighbouring midpoints of either map (0.7% apart at the top), so a bucket holds at most
# one midpoint: code = codes below the bucket + (x > that midpoint). Exactly bucketize's answer, ties
# included (a value on a midpoint takes the lower code).
LOOKUP_BITS = 17
_LOOKUPS: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}


def _lookup(qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(code of each bucket's lowest value, the midpoint inside the bucket or +inf), per bucket, for
    `qmap` on the CPU (cached by its values)."""
    key = qmap.numpy().tobytes()
    if key not in _LOOKUPS:
        midpoints = (qmap[:-1] + qmap[1:]) / 2
        shift = 32 - LOOKUP_BITS
        first = (torch.arange(2 ** LOOKUP_BITS, dtype=torch.int64) << shift).to(torch.int32).view(torch.float32)
        last = ((torch.arange(2 ** LOOKUP_BITS, dtype=torch.int64) << shift) | (2 ** shift - 1)).to(torch.int32)
        last = last.view(torch.float32)
        low, high = torch.minimum(first, last), torch.maximum(first, last)  # negative floats run backwards
        below = torch.searchsorted(midpoints, low, side="left")  # midpoints < low: the bucket's lowest code
        inside = torch.searchsorted(midpoints, high, side="right") - below  # midpoints in [low, high]
        finite = torch.isfinite(low) & torch.isfinite(high)
        assert int(inside[finite].max()) <= 1, "a lookup bucket holds two midpoints"
        threshold = torch.where(inside > 0, midpoints[below.clamp(max=midpoints.numel() - 1)], torch.inf)
        _LOOKUPS[key] = (below.to(torch.uint8), threshold.to(torch.float32))
    return _LOOKUPS[key]


def nearest_codes(normalized: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """The index of the nearest value of `qmap` (on the CPU) to each entry of fp32 `normalized` (in
    [-1, 1]); a tie takes the lower index (torch.bucketize over the midpoints, by bucket lookup)."""
    base, threshold = (t.to(normalized.device) for t in _lookup(qmap))
    bucket = ((normalized.reshape(-1).view(torch.int32) >> (32 - LOOKUP_BITS)) & (2 ** LOOKUP_BITS - 1))
    above = normalized.reshape(-1) > threshold.index_select(0, bucket)  # index_select: the fastest gather here
    return base.index_select(0, bucket).add_(above).reshape(normalized.shape)


def check_state_bits(value: Any) -> None:
    if not (value is None or type(value) is int) or value not in STATE_BITS:
        raise ValueError(f"invalid state_bits: {value!r}; choose one of: 32 (or None: full precision), 8")


def quantizes(shape: torch.Size | tuple[int, ...], state_bits: int | None) -> bool:
    """Whether a parameter of GLOBAL shape `shape` keeps its moments in `state_bits` codes."""
    return state_bits == 8 and len(shape) >= 2 and math.prod(shape) >= MIN_QUANTIZED_NUMEL


def blocks_per_row(shape: torch.Size | tuple[int, ...], block: int = BLOCK) -> int:
    row_length = math.prod(shape[1:])
    return -(-row_length // block)


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """`x` as [rows, blocks per row, block], each row zero-padded to whole blocks (zeros change no absmax)."""
    rows = x.reshape(x.shape[0], -1)
    pad = blocks_per_row(x.shape, block) * block - rows.shape[1]
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, block)


def _rows_per_chunk(shape: torch.Size | tuple[int, ...], block: int) -> int:
    return max(1, CHUNK_ELEMENTS // (blocks_per_row(shape, block) * block))


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, block: int = BLOCK,
                       generator: torch.Generator | None = None,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like `x`, fp32 absmax [rows, blocks per row]) of `x`, whose dim 0 is its rows
    (to block a 1-D tensor as one row, pass `x.view(1, -1)`). Nearest map value (a tie, x / absmax
    exactly between two values, takes the lower); with a `generator`, stochastic rounding between the
    two neighbours. `out`: (codes, absmax) to write into. Works through CHUNK_ELEMENTS of rows at a
    time, so its fp32 and index temporaries stay that small whatever the tensor's size."""
    rows, step = x.shape[0], _rows_per_chunk(x.shape, block)
    if out is None and rows <= step:
        return _quantize_rows(x, qmap, block, generator)
    codes, absmax = out if out is not None else (
        torch.empty(x.shape, dtype=torch.uint8, device=x.device),
        torch.empty(rows, blocks_per_row(x.shape, block), dtype=torch.float32, device=x.device))
    for start in range(0, rows, step):
        chunk_codes, chunk_absmax = _quantize_rows(x[start:start + step], qmap, block, generator)
        codes[start:start + step].copy_(chunk_codes)
        absmax[start:start + step].copy_(chunk_absmax)
    return codes, absmax


def _quantize_rows(x: torch.Tensor, qmap: torch.Tensor, block: int,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocked(x.float(), block)
    smallest, largest = torch.aminmax(blocks, dim=-1)  # no |x| temporary the size of the tensor
    absmax = torch.maximum(smallest.neg_(), largest)
    # Times the reciprocal, as bitsandbytes' kernels scale (x / absmax can differ in the last bit, which
    # moves a value sitting on a midpoint). A zero block stays zero whatever its codes (value * 0);
    # scaling it by 1 keeps it finite.
    normalized = (blocks * (1 / torch.where(absmax > 0, absmax, 1.0)).unsqueeze(-1)).clamp_(-1, 1)
    if generator is None:
        codes = nearest_codes(normalized, qmap)
    else:
        qmap = qmap.to(x.device)
        lower = (torch.bucketize(normalized, qmap, right=True) - 1).clamp_(0, qmap.numel() - 2)
        low, high = qmap[lower], qmap[lower + 1]
        up = (normalized - low) / (high - low)  # in [0, 1] where normalized is inside the map's range
        if normalized.is_meta:  # the memory estimate: shapes only, nothing to draw
            draw = torch.empty_like(normalized)
        else:  # drawn where the generator lives (the parameter's device, or the CPU)
            draw = torch.rand(normalized.shape, generator=generator, device=generator.device).to(normalized.device)
        codes = lower + (draw < up)
    row_length = math.prod(x.shape[1:])
    codes = codes.reshape(x.shape[0], -1)[:, :row_length].to(torch.uint8).reshape(x.shape)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor,
                         block: int = BLOCK) -> torch.Tensor:
    """The fp32 values of `codes` (shaped like the tensor) with per-block `absmax` [rows, blocks per row],
    CHUNK_ELEMENTS of rows at a time (no temporary larger than that beside the result)."""
    rows, step = codes.shape[0], _rows_per_chunk(codes.shape, block)
    if rows <= step:
        return _dequantize_rows(codes, absmax, qmap, block)
    values = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    for start in range(0, rows, step):
        values[start:start + step] = _dequantize_rows(codes[start:start + step], absmax[start:start + step], qmap, block)
    return values


def _dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block: int) -> torch.Tensor:
    values = qmap.to(codes.device).index_select(0, codes.reshape(-1).int()).reshape(codes.shape)
    blocks = _blocked(values, block) * absmax.unsqueeze(-1)
    row_length = math.prod(codes.shape[1:])
    # Contiguous like the moment it stands for (a row ending in a short block would leave a strided
    # view, on which a method's reductions can take another kernel and round differently).
    return blocks.reshape(codes.shape[0], -1)[:, :row_length].contiguous().view(codes.shape)


def _like_param(local: torch.Tensor, param: torch.Tensor, global_shape: tuple[int, ...]) -> torch.Tensor:
    """`local` as a DTensor sharded as `param` (rows on dim 0) when `param` is one, else `local`."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    stride = tuple(math.prod(global_shape[i + 1:]) for i in range(len(global_shape)))
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=global_shape, stride=stride,
                              run_check=False)


def init_quantized(state: dict[str, Any], key: str, param: torch.Tensor, block: int = BLOCK) -> None:
    """Zero state `key` of `param`, shaped like it, in codes (`init_quantized_state` with the parameter's
    shape, its rows on this rank, laid out as the parameter)."""
    local = local_tensor(param)
    init_quantized_state(state, key, tuple(param.shape), local.shape[0], local.device,
                         layout=lambda values, shape: _like_param(values, param, shape), block=block)


def init_moment(state: dict[str, Any], key: str, param: torch.Tensor, state_bits: int | None) -> None:
    """Zero moment `key` of `param`: in codes when `state_bits` quantizes a parameter of its global shape,
    else a full-precision tensor shaped like the parameter (the one place a method decides which)."""
    if quantizes(param.shape, state_bits):
        init_quantized(state, key, param)
    else:
        state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)


def quantizes_state(shape: torch.Size | tuple[int, ...], state_bits: int | None) -> bool:
    """`quantizes`, for a state tensor with rows of its own, not shaped like its parameter (a projected
    moment [rows, r] or [r, cols], SMET's compact moment viewed as one row [1, k*B]), of GLOBAL shape
    `shape`: and only where its codes and scales take fewer bytes than its fp32 values, which rows of
    one element (1 code + a 4-byte scale each: APOLLO-Mini's right-side rank-1 moments) do not."""
    if not quantizes(shape, state_bits):
        return False
    row_length = math.prod(shape[1:])
    return row_length + 4 * blocks_per_row(shape) < 4 * row_length


def init_quantized_state(state: dict[str, Any], key: str, global_shape: tuple[int, ...], local_rows: int,
                         device: torch.device,
                         layout: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor] | None = None,
                         block: int = BLOCK) -> None:
    """Zero state `key` in codes, for a state tensor that is not shaped like its parameter (`init_quantized`
    is for one that is): of GLOBAL shape `global_shape`, of which this rank holds `local_rows` rows (all
    of them, or its rows of a row-sharded one). `<key>_codes` [local_rows, *global_shape[1:]] at the map's
    code nearest 0, `<key>_absmax` [local_rows, blocks per row] 0. `layout(local, global_shape)` lays each
    out as the state lies under FSDP2 (a DTensor: rows sharded like the parameter's, or replicated;
    lowmem.optim.projection.state_like); None keeps them plain tensors."""
    zero_code = int(torch.argmin(map_for(key).abs()))
    codes = torch.full((local_rows, *global_shape[1:]), zero_code, dtype=torch.uint8, device=device)
    absmax = torch.zeros(local_rows, blocks_per_row(global_shape, block), device=device)
    wrap = layout or (lambda local, shape: local)
    state[key + CODES] = wrap(codes, tuple(global_shape))
    state[key + ABSMAX] = wrap(absmax, (global_shape[0], absmax.shape[1]))


def rounding_generator(stochastic: bool, position: int, step: torch.Tensor | int,
                       param: torch.Tensor) -> torch.Generator | None:
    """Stochastic rounding's generator for the update of the parameter at `position` (its place in its
    optimizer) that makes its step `step` + 1, or None for nearest rounding. Seeded by both, so the draws
    do not depend on the order parameters are updated in (inside backward or after it); on the
    parameter's device (the CPU for a meta parameter). Under FSDP2 each rank draws for its own rows."""
    if not stochastic:
        return None
    seed = position * 1_000_003 + int(step) + 1
    device = "cpu" if param.is_meta else local_tensor(param).device
    return torch.Generator(device=device).manual_seed(seed)


def is_quantized(state: dict[str, Any], key: str) -> bool:
    return key + CODES in state


def reset_quantized(state: dict[str, Any], key: str, mask: torch.Tensor | None = None) -> None:
    """Zero quantized state `key` (whole, or the `mask` entries: a dequantize-zero-requantize)."""
    if mask is None:
        local_tensor(state[key + ABSMAX]).zero_()  # every value of a block with absmax 0 is 0
        return
    with dequantized(state, (key,)) as (values,):
        values.masked_fill_(local_tensor(mask).to(values.device), 0)


@contextmanager
def dequantized(state: dict[str, Any], keys: tuple[str, ...], block: int = BLOCK,
                generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> Iterator[list[torch.Tensor]]:
    """The values of quantized state `keys` (this rank's part) in `dtype` (fp32; fp64 beside fp64
    weights), to update in place; on leaving, each is requantized into its codes and absmax (not if the
    block raised: the state stays as it was)."""
    codes = [local_tensor(state[key + CODES]) for key in keys]
    absmaxes = [local_tensor(state[key + ABSMAX]) for key in keys]
    values = [dequantize_blockwise(c, a, map_for(key), block).to(dtype) for key, c, a in zip(keys, codes, absmaxes)]
    yield values
    for key, value, c, a in zip(keys, values, codes, absmaxes):
        quantize_blockwise(value, map_for(key), block, generator, out=(c, a))


def init_momentum(state: dict[str, Any], param: torch.Tensor, state_bits: int | None) -> None:
    """Zero momentum of a matrix: full precision, or 8-bit codes (with a float32 `step`, the count of its
    updates, which seeds stochastic rounding) when `state_bits` quantizes its global shape. SCALE's and
    Muon's."""
    init_moment(state, MOMENTUM, param, state_bits)
    if is_quantized(state, MOMENTUM):
        state["step"] = torch.tensor(0.0, dtype=torch.float32)


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself in fp32 or fp64, else an fp32 copy (bf16 weights are updated in fp32)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


@contextmanager
def dequantized_step(param: torch.Tensor, state: dict[str, Any], keys: tuple[str, ...],
                     generator: torch.Generator | None, grad: torch.Tensor | None = None,
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    """(weights, gradient, moments) of this rank's part of `param`, whose state `keys` are 8-bit codes,
    for a method's full-precision update to run on in place: the weights and gradient (`grad`, else
    `param.grad`) in at least fp32 (themselves when they are; else fp32 copies, the weights written back
    on leaving), the moments dequantized in the weights' dtype and requantized on leaving (rounding with
    `generator`; not if the update raised: the state stays as it was). The one shape of every method's
    8-bit update: `dequantized_rows` with the whole tensors as one block, so the moments need not be
    shaped like the parameter (SMET's compact row)."""
    blocks = dequantized_rows(param, state, keys, generator, grad, whole=True)
    yield next(blocks)
    next(blocks, None)  # requantizes the moments and writes the weights back


def dequantized_rows(param: torch.Tensor, state: dict[str, Any], keys: tuple[str, ...],
                     generator: torch.Generator | None, grad: torch.Tensor | None = None, whole: bool = False,
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    """`dequantized_step` a block of whole rows at a time, for an update that treats rows independently
    (elementwise, or normalized within each row) of a parameter whose state `keys` are shaped like it:
    yields (weights, gradient, moments) of each block of this rank's rows (CHUNK_ELEMENTS, the
    quantizer's own chunk; `whole`: one block of the whole tensors), requantizing the block's moments
    and writing back its weights before the next. No fp32 working copy of the whole matrix is alive at
    once (at a 7B head, AdamW's four were ~2 GB of the step's peak), and a block's passes find it in
    cache. Bitwise the whole update, but for stochastic rounding of a matrix of several blocks, which
    draws block by block instead of moment by moment. An update that raises leaves the earlier blocks
    updated and its own block as it was."""
    local = local_tensor(param)
    grad = local_tensor(param.grad if grad is None else grad)
    codes = [local_tensor(state[key + CODES]) for key in keys]
    absmaxes = [local_tensor(state[key + ABSMAX]) for key in keys]
    step = _rows_per_chunk(local.shape, BLOCK)
    blocks = [slice(None)] if whole else [slice(start, start + step) for start in range(0, local.shape[0], step)]
    for rows in blocks:
        local_rows = local[rows]
        weights = at_least_fp32(local_rows)
        moments = [dequantize_blockwise(c[rows], a[rows], map_for(key)).to(weights.dtype)
                   for key, c, a in zip(keys, codes, absmaxes)]
        yield weights, grad[rows].to(weights.dtype), moments
        for key, value, c, a in zip(keys, moments, codes, absmaxes):
            quantize_blockwise(value, map_for(key), BLOCK, generator, out=(c[rows], a[rows]))
        if weights is not local_rows:
            local_rows.copy_(weights)


@contextmanager
def dequantized_momentum(param: torch.Tensor, state: dict[str, Any], stochastic_rounding: bool,
                         position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`dequantized_step` of a matrix's 8-bit momentum (SCALE's and Muon's), each of (weights, gradient,
    momentum) shaped like the parameter: a DTensor with its placements when the parameter is one (this
    rank's rows), so a core's gathers and all-reduces apply as to a full-precision momentum. Rounding is
    seeded by `position` and the state's `step`, which then counts this update."""
    generator = rounding_generator(stochastic_rounding, position, state["step"], param)
    with dequantized_step(param, state, (MOMENTUM,), generator) as (weights, grad, (momentum,)):
        yield tuple(_like_param(t, param, tuple(param.shape)) for t in (weights, grad, momentum))
    state["step"] += 1


def dequantized_momentum_rows(param: torch.Tensor, state: dict[str, Any], stochastic_rounding: bool,
                              position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`dequantized_momentum` a block of this rank's rows at a time (`dequantized_rows`, plain tensors),
    for an update whose rows are independent (SCALE's column normalization of a [out, in] matrix, sign,
    none); the state's `step` then counts this update."""
    generator = rounding_generator(stochastic_rounding, position, state["step"], param)
    for weights, grad, (momentum,) in dequantized_rows(param, state, (MOMENTUM,), generator):
        yield weights, grad, momentum
    state["step"] += 1

__all__ = [
    "at_least_fp32",
    "BLOCK",
    "MIN_QUANTIZED_NUMEL",
    "SIGNED_MAP",
    "STATE_BITS",
    "UNSIGNED_MAP",
    "blocks_per_row",
    "check_state_bits",
    "dequantize_blockwise",
    "dequantized",
    "dequantized_momentum",
    "dequantized_momentum_rows",
    "dequantized_rows",
    "dequantized_step",
    "dynamic_map",
    "init_moment",
    "init_momentum",
    "init_quantized",
    "init_quantized_state",
    "is_quantized",
    "map_for",
    "quantize_blockwise",
    "quantizes",
    "quantizes_state",
    "reset_quantized",
    "rounding_generator",
]
