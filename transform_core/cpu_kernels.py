"""Compiled CPU kernels: each element-wise transform, and the report's statistics, as one
pass over memory.

Numba compiles these loops to vectorised machine code. Each computes, element by element,
exactly the operations of the tensor chains in :mod:`transform_core.quantise` and
:mod:`transform_core.kernels`, in the same order and precision, with the same counter-based
random bits (:func:`transform_core.kernels.hash_bits`): a compiled kernel changes how fast a
transform runs, never what it returns. :func:`distinct_finite` and :func:`error_sums` give
:mod:`transform_core.tensor_report` the same values and sums as its NumPy code. The tests
check all of that bit for bit.

This module imports Numba, so :mod:`transform_core.kernels` imports it only in a
background thread, once a process has done enough work for it to pay: loading Numba and
its cached machine code takes about a second, which a program that transforms a few
tensors once should not wait for. Until it is ready, the tensor chains run.

The dispatchers (:func:`round_levels`, :func:`int_quant`, :func:`dropout`, :func:`decay`,
:func:`channel_range`, :func:`distinct_finite`, :func:`error_sums`) split the work over
``torch.get_num_threads()`` threads, the calling thread included; the kernels release the
GIL. Each loop runs over a slice from index 0: Numba checks an index it cannot prove
non-negative for wrap-around, and such a loop does not vectorise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import numba
import numpy as np
import torch
from torch import Tensor

from transform_core.kernels import HASH_M1, HASH_M2, output_like
from transform_core.tensor_report import ERROR_BLOCK, ERROR_LANES

_COMPILED: dict[str, Any] = {"nogil": True, "cache": True, "error_model": "numpy"}
_u32 = np.uint32
_i32 = np.int32
_F = TypeVar("_F", bound=Callable[..., Any])


def _jit(**options: Any) -> Callable[[_F], _F]:
    """``numba.njit(**options)``, typed. ``cache``: machine code is kept beside this file
    (or in Numba's user cache), so later processes load it instead of compiling."""
    return cast(Callable[[_F], _F], numba.njit(**options))


@_jit(inline="always")
def _bits(index: Any, key: Any) -> Any:
    # kernels.hash_bits of element ``index`` (below 2**32), in 32-bit arithmetic.
    h = _u32(index ^ key)
    h = _u32(h ^ (h >> _u32(16)))
    h = _u32(h * _u32(HASH_M1))
    h = _u32(h ^ (h >> _u32(13)))
    h = _u32(h * _u32(HASH_M2))
    return _u32(h ^ (h >> _u32(16)))


@_jit(inline="always")
def _finish(level: Any, oq: Any, olo: Any, ohi: Any, top: Any, zero_level: Any, zero: Any) -> Any:
    # _Plan.finish and LevelMap (its mask form): saturate, map, pin the top and zero levels.
    if level < zero:  # NaN stays NaN; infinities saturate
        level = zero
    if level > top:
        level = top
    out = level * oq + olo
    if level == top:
        out = ohi
    if level == zero_level:
        out = zero
    return out


@_jit(inline="always")
def _stochastic_level(v: Any, lo: Any, q: Any, index: Any, key: Any, one: Any, two_24: Any) -> Any:
    # kernels.stochastic_floor_: up when the top 24 random bits, an integer n, fall below
    # fraction * 2**24 = s (exact). n < s is n < ceil(s), compared as int32, which vectorises.
    # A NaN or infinite level stays what it is, whatever the comparison says.
    level = (v - lo) / q
    floor = np.floor(level)
    if _i32(_bits(index, key) >> _u32(8)) < _i32(np.ceil((level - floor) * two_24)):
        floor += one
    return floor


# consts holds 0, 1 and 2**24 in the value's dtype: a Python float would promote to float64.
# params[k, c] holds parameter k of channel c: input low end, input quantum, output low end,
# output quantum, output high end, zero level (-1 for none).


@_jit(**_COMPILED)
def _round_groups(
    x: Any, out: Any, g0: int, g1: int, i0: int, i1: int, inner: int, params: Any,
    top: Any, consts: Any, stochastic: bool, key: int,
) -> None:  # fmt: skip
    # Groups of ``inner`` consecutive elements share one channel's parameters: x is
    # (outer, channels, inner) flattened.
    channels = params.shape[1]
    zero, one, two_24 = consts[0], consts[1], consts[2]
    for g in range(g0, g1):
        c = g % channels
        lo, q, olo, oq, ohi, zl = (
            params[0, c],
            params[1, c],
            params[2, c],
            params[3, c],
            params[4, c],
            params[5, c],
        )
        start = g * inner + i0
        # Loops run over slices from 0: an index Numba can prove non-negative needs no
        # wrap-around check, and only then does the loop vectorise.
        xs, outs = x[start : start + i1 - i0], out[start : start + i1 - i0]
        first = _u32(start)
        if stochastic:
            for k in range(xs.size):
                level = _stochastic_level(xs[k], lo, q, _u32(first + _u32(k)), key, one, two_24)
                outs[k] = _finish(level, oq, olo, ohi, top, zl, zero)
        else:
            for k in range(xs.size):
                level = np.rint((xs[k] - lo) / q)
                outs[k] = _finish(level, oq, olo, ohi, top, zl, zero)


@_jit(**_COMPILED)
def _round_rows(
    x: Any, out: Any, r0: int, r1: int, params: Any, top: Any, consts: Any, stochastic: bool,
    key: int,
) -> None:  # fmt: skip
    # The channel is the last dimension: each row runs over all channels' parameters.
    channels = params.shape[1]
    zero, one, two_24 = consts[0], consts[1], consts[2]
    lo, q, olo, oq, ohi, zl = params[0], params[1], params[2], params[3], params[4], params[5]
    for r in range(r0, r1):
        base = r * channels
        xs, outs = x[base : base + channels], out[base : base + channels]
        first = _u32(base)
        if stochastic:
            for c in range(channels):
                index = _u32(first + _u32(c))
                level = _stochastic_level(xs[c], lo[c], q[c], index, key, one, two_24)
                outs[c] = _finish(level, oq[c], olo[c], ohi[c], top, zl[c], zero)
        else:
            for c in range(channels):
                level = np.rint((xs[c] - lo[c]) / q[c])
                outs[c] = _finish(level, oq[c], olo[c], ohi[c], top, zl[c], zero)


@_jit(**_COMPILED)
def _int_quant(x: Any, out: Any, i0: int, i1: int, centre: Any, scale: Any, limit: Any) -> None:
    xs, outs = x[i0:i1], out[i0:i1]
    for k in range(xs.size):
        level = np.rint((xs[k] - centre) * scale)
        if level < -limit:
            level = -limit
        if level > limit:
            level = limit
        outs[k] = level


@_jit(**_COMPILED)
def _dropout(x: Any, out: Any, i0: int, i1: int, threshold: int, key: int, zero: Any) -> None:
    bound, first = _u32(threshold), _u32(i0)
    xs, outs = x[i0:i1], out[i0:i1]
    for k in range(xs.size):
        v = xs[k]
        outs[k] = v if _bits(_u32(first + _u32(k)), key) >= bound else zero


@_jit(**_COMPILED)
def _decay(x: Any, out: Any, i0: int, i1: int, thresholds: Any, table: Any) -> None:
    # table[number of thresholds <= v], NaN kept. Counted tile by tile, one threshold at a
    # time: each pass over a tile vectorises, where a search per element would not.
    count = np.zeros(1024, dtype=np.int32)
    for start in range(i0, i1, 1024):
        stop = min(start + 1024, i1)
        xs, outs, counts = x[start:stop], out[start:stop], count[: stop - start]
        counts[:] = 0
        for t in thresholds:
            for k in range(xs.size):
                counts[k] += np.int32(xs[k] >= t)
        for k in range(xs.size):
            v = xs[k]
            outs[k] = v if v != v else table[counts[k]]


@_jit(**_COMPILED)
def _range_groups(x: Any, lo: Any, hi: Any, g0: int, g1: int, inner: int) -> None:
    # Finite minimum and maximum of each group of ``inner`` elements, into its channel.
    channels = lo.size
    for g in range(g0, g1):
        c = g % channels
        a, b = lo[c], hi[c]
        xs = x[g * inner : (g + 1) * inner]
        for k in range(xs.size):
            v = xs[k]
            finite = v - v == 0  # False for infinities and NaN
            a = v if finite and v < a else a
            b = v if finite and v > b else b
        lo[c], hi[c] = a, b


@_jit(**_COMPILED)
def _range_rows(x: Any, lo: Any, hi: Any, r0: int, r1: int) -> None:
    # The channel is the last dimension: each row updates every channel's minimum and maximum.
    channels = lo.size
    for r in range(r0, r1):
        xs = x[r * channels : (r + 1) * channels]
        for c in range(channels):
            v = xs[c]
            finite = v - v == 0
            lo[c] = v if finite and v < lo[c] else lo[c]
            hi[c] = v if finite and v > hi[c] else hi[c]


_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd


@_jit(**_COMPILED)
def _insert_distinct(
    bits: Any, table: Any, shift: Any, finite_mask: Any, negative_zero: Any, limit: int
) -> tuple[int, int]:
    # Adds each finite value's bit pattern (-0.0 as +0.0) to an open-addressing hash set
    # (Fibonacci hashing, linear probing; an empty slot holds a NaN pattern, which no
    # finite value has). Returns (distinct, non-finite); stops early, with distinct >
    # limit, once the set would hold more than ``limit`` values.
    one = np.uint64(1)
    slots = np.uint64(table.size - 1)
    empty = table[0]  # the caller fills the table with the empty pattern
    distinct = 0
    nonfinite = 0
    for k in range(bits.size):
        b = bits[k]
        if b & finite_mask == finite_mask:  # exponent all ones: infinity or NaN
            nonfinite += 1
            continue
        if b == negative_zero:
            b = b ^ b
        slot = (np.uint64(b) * _FIBONACCI) >> shift
        while True:
            held = table[slot]
            if held == b:
                break
            if held == empty:
                table[slot] = b
                distinct += 1
                if distinct > limit:
                    return distinct, nonfinite
                break
            slot = (slot + one) & slots
    return distinct, nonfinite


_LANES = 1024
# tensor_report.ERROR_LANES, as a constant of this file: a loop of a constant trip count
# vectorises better, and Numba's cache sees a change only in this file (checked below).
if _LANES != ERROR_LANES:  # pragma: no cover - a guard for editing one file only
    raise ImportError(f"cpu_kernels._LANES is {_LANES}, tensor_report.ERROR_LANES {ERROR_LANES}")


@_jit(inline="always")
def _error_row_finite(v: Any, r: Any, e_acc: Any, r_acc: Any, top: Any) -> None:
    # One row of _LANES pairs, a lane each, taking every pair as finite: if one is not, its
    # lane's sum of squared errors is not finite either, and the block is done again.
    for j in range(_LANES):
        y = np.float64(r[j])
        e = np.float64(v[j]) - y
        e_acc[j] += e * e
        r_acc[j] += y * y
        top[j] = max(abs(e), top[j])


@_jit(inline="always")
def _error_row(v: Any, r: Any, e_acc: Any, r_acc: Any, top: Any, n: Any) -> None:
    # One row of _LANES pairs. Pairs whose float64 difference is not finite count as zeros,
    # as in tensor_report's NumPy sums.
    for j in range(_LANES):
        y = np.float64(r[j])
        e = np.float64(v[j]) - y
        ok = e - e == 0
        e = e if ok else 0.0
        y = y if ok else 0.0
        e_acc[j] += e * e
        r_acc[j] += y * y
        top[j] = max(abs(e), top[j])
        n[j] += ok


@_jit(**_COMPILED)
def _error_blocks(
    v: Any, r: Any, b0: int, b1: int, block: int, err_sq: Any, ref_sq: Any, top: Any, n: Any
) -> None:
    # tensor_report.error_block_sums, block by block: lane j of block b sums err**2 and
    # ref**2 over the block's rows in order (NumPy's sum along the rows of the block, viewed
    # as (rows, lanes)). A short last row is copied into zero padding, which adds nothing.
    tail_v = np.zeros(_LANES, dtype=v.dtype)
    tail_r = np.zeros(_LANES, dtype=r.dtype)
    # Sums in arrays of this function's own, which the compiler knows alias no input.
    e_acc = np.zeros(_LANES)
    r_acc = np.zeros(_LANES)
    top_b = np.zeros(_LANES)
    n_b = np.zeros(_LANES, dtype=np.int64)
    for b in range(b0, b1):
        vs = v[b * block : min((b + 1) * block, v.size)]
        rs = r[b * block : min((b + 1) * block, r.size)]
        rows, rest = divmod(vs.size, _LANES)
        tail_v[:] = 0
        tail_r[:] = 0
        tail_v[:rest] = vs[rows * _LANES :]
        tail_r[:rest] = rs[rows * _LANES :]
        for careful in (False, True):
            e_acc[:] = 0.0
            r_acc[:] = 0.0
            top_b[:] = 0.0
            n_b[:] = 0
            for i in range(rows + (rest > 0)):
                if i < rows:
                    row_v = vs[i * _LANES : (i + 1) * _LANES]
                    row_r = rs[i * _LANES : (i + 1) * _LANES]
                else:
                    row_v, row_r = tail_v, tail_r
                if careful:
                    _error_row(row_v, row_r, e_acc, r_acc, top_b, n_b)
                else:
                    _error_row_finite(row_v, row_r, e_acc, r_acc, top_b)
            if careful:
                if rest:
                    n_b[rest:] -= 1  # the padding's pairs are finite: not counted
                break
            if np.isfinite(e_acc).all():
                n_b[:] = rows
                n_b[:rest] += 1
                break
        err_sq[b], ref_sq[b], top[b], n[b] = e_acc, r_acc, top_b, n_b


# --------------------------------------------------------------------------------------
# Dispatch

Calls = list[tuple[Any, tuple[Any, ...]]]

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _parallel(calls: Calls) -> None:
    """Run ``fn(*args)`` for each call, on worker threads when there are several."""
    global _pool, _pool_pid
    if len(calls) == 1:
        fn, args = calls[0]
        fn(*args)
        return
    # A forked child inherits the pool but not its threads: it needs a pool of its own.
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < len(calls) - 1:
        _pool = ThreadPoolExecutor(len(calls) - 1, thread_name_prefix="rockq-kernel")
        _pool_pid = os.getpid()
    # The calling thread takes the first share itself rather than waiting idle.
    futures = [_pool.submit(fn, *args) for fn, args in calls[1:]]
    fn, args = calls[0]
    fn(*args)
    for future in futures:
        future.result()


def _spans(count: int, parts: int) -> list[tuple[int, int]]:
    # At least one span, empty for nothing to do.
    step = max(1, -(-count // parts))
    return [(s, min(count, s + step)) for s in range(0, count, step)] or [(0, 0)]


def _threads(numel: int) -> int:
    # A thread per 256k elements at most: below that, starting one costs more than it saves.
    return max(1, min(torch.get_num_threads(), numel >> 18))


def _flat(value: Tensor) -> Any:
    return value.detach().reshape(-1).numpy()


def round_levels(
    value: Tensor,
    params: Tensor,
    channel_dim: int | None,
    top: float,
    stochastic: bool,
    key: int,
) -> Tensor:
    """Round ``value`` to levels and map them to output values, in one pass.

    Args:
        value: A contiguous float32 or float64 CPU tensor.
        params: ``(6, channels)`` in ``value``'s dtype: input low end, input quantum, output
            low end, output quantum, output high end, zero level (-1 for none); one column
            (channels 1) for scalar parameters.
        channel_dim: The dimension the columns run along, or ``None`` for scalar parameters.
        top: Index of the top level.
        stochastic: Round stochastically, with the random bits of ``key``.
        key: Key of :func:`transform_core.kernels.hash_bits`.
    """
    out = output_like(value)
    x, o, p = _flat(value), _flat(out), params.numpy()
    top_value, key = x.dtype.type(top), _u32(key)
    consts = np.array([0.0, 1.0, 2.0**24], dtype=x.dtype)
    channels = p.shape[1]
    if channel_dim is None:
        outer, inner = 1, value.numel()
    else:
        outer = math.prod(value.shape[:channel_dim])
        inner = math.prod(value.shape[channel_dim + 1 :])
    threads = _threads(value.numel())
    calls: Calls
    if inner == 1 and channels > 1:
        calls = [
            (_round_rows, (x, o, r0, r1, p, top_value, consts, stochastic, key))
            for r0, r1 in _spans(outer, threads)
        ]
    elif outer * channels >= threads:
        calls = [
            (_round_groups, (x, o, g0, g1, 0, inner, inner, p, top_value, consts, stochastic, key))
            for g0, g1 in _spans(outer * channels, threads)
        ]
    else:
        calls = [
            (_round_groups, (x, o, 0, outer * channels, i0, i1, inner, p, top_value, consts,
                             stochastic, key))
            for i0, i1 in _spans(inner, threads)
        ]  # fmt: skip
    _parallel(calls)
    return out


def channel_range(value: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """Minimum and maximum of the finite values of each slice along ``channel_dim``.

    Args:
        value: A contiguous float32 or float64 CPU tensor.
        channel_dim: The channel dimension.

    Returns:
        ``(lo, hi)`` shaped for broadcasting against ``value`` (size 1 in every other
        dimension); ``[0, 0]`` for a channel without a finite value.
    """
    x = _flat(value)
    channels = value.shape[channel_dim]
    outer = math.prod(value.shape[:channel_dim])
    inner = math.prod(value.shape[channel_dim + 1 :])
    threads = _threads(value.numel())
    kernel: Any
    if inner == 1:
        kernel, spans = _range_rows, _spans(outer, threads)
    else:
        kernel, spans = _range_groups, _spans(outer * channels, threads)
    partial = [
        (np.full(channels, np.inf, dtype=x.dtype), np.full(channels, -np.inf, dtype=x.dtype))
        for _ in spans
    ]
    extra = () if inner == 1 else (inner,)
    _parallel(
        [
            (kernel, (x, lo, hi, a, b, *extra))
            for (lo, hi), (a, b) in zip(partial, spans, strict=True)
        ]
    )
    lo = np.minimum.reduce([p[0] for p in partial])
    hi = np.maximum.reduce([p[1] for p in partial])
    empty = lo > hi  # no finite value: still +inf and -inf
    lo[empty], hi[empty] = 0.0, 0.0
    shape = [1] * value.dim()
    shape[channel_dim] = channels
    return torch.from_numpy(lo).view(shape), torch.from_numpy(hi).view(shape)


def _element_wise(kernel: Any, value: Tensor, *args: Any) -> Tensor:
    out = output_like(value)
    x, o = _flat(value), _flat(out)
    _parallel([(kernel, (x, o, i0, i1, *args)) for i0, i1 in _spans(x.size, _threads(x.size))])
    return out


def int_quant(value: Tensor, centre: float, scale: float, limit: float) -> Tensor:
    """``clamp(round((value - centre) * scale), -limit, limit)`` in one pass."""
    t = _flat(value).dtype.type
    return _element_wise(_int_quant, value, t(centre), t(scale), t(limit))


def dropout(value: Tensor, threshold: int, key: int) -> Tensor:
    """Zero each element whose random bits fall below ``threshold`` (out of ``2**32``)."""
    if threshold >= 2**32:
        return torch.zeros_like(value)
    return _element_wise(_dropout, value, threshold, _u32(key), _flat(value).dtype.type(0.0))


def decay(value: Tensor, thresholds: Tensor, table: Tensor) -> Tensor:
    """``table[number of thresholds <= value]``, ``NaN`` kept: bit-shift decays in one pass."""
    return _element_wise(_decay, value, thresholds.numpy(), table.numpy())


_BIT_TYPES = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


def distinct_finite(values: Any, limit: int) -> tuple[Any, int] | None:
    """Sorted distinct finite values of a float32 or float64 array, and its non-finite count.

    ``-0.0`` counts as ``0.0``. Returns ``None`` as soon as more than ``limit`` distinct
    values turn up (a sort is then the faster way), having read only part of the array.
    Each thread fills a hash set of its own share; their union is the answer.
    """
    uint = _BIT_TYPES[values.dtype]
    info = np.finfo(values.dtype)
    finite_mask = uint(((1 << info.nexp) - 1) << info.nmant)
    negative_zero = uint(1 << (info.bits - 1))
    bits = values.reshape(-1).view(uint)
    # A table at most half full: a probe then mostly ends at its first slot.
    size = 1 << max(4, (2 * min(limit + 1, bits.size)).bit_length())
    shift = np.uint64(64 - size.bit_length() + 1)
    spans = _spans(bits.size, _threads(bits.size))
    tables = [np.full(size, np.iinfo(uint).max, dtype=uint) for _ in spans]
    results: list[tuple[int, int]] = []

    def share(table: Any, i0: int, i1: int) -> None:
        results.append(
            _insert_distinct(bits[i0:i1], table, shift, finite_mask, negative_zero, limit)
        )

    _parallel([(share, (table, i0, i1)) for table, (i0, i1) in zip(tables, spans, strict=True)])
    if any(distinct > limit for distinct, _ in results):
        return None
    empty = np.iinfo(uint).max
    found = np.unique(
        np.concatenate([table[table != empty] for table in tables]).view(values.dtype)
    )
    if found.size > limit:
        return None
    return found, sum(nonfinite for _, nonfinite in results)


def error_sums(values: Any, reference: Any) -> tuple[Any, Any, float, int]:
    """:func:`transform_core.tensor_report.error_block_sums`, bit for bit, in one pass.

    Args:
        values: A float32 or float64 array.
        reference: An array of the same size, float32 or float64.
    """
    blocks = -(-values.size // ERROR_BLOCK)
    err_sq = np.empty((blocks, ERROR_LANES))
    ref_sq = np.empty((blocks, ERROR_LANES))
    top = np.empty((blocks, ERROR_LANES))
    count = np.empty((blocks, ERROR_LANES), dtype=np.int64)
    v, r = values.reshape(-1), reference.reshape(-1)
    _parallel(
        [
            (_error_blocks, (v, r, b0, b1, ERROR_BLOCK, err_sq, ref_sq, top, count))
            for b0, b1 in _spans(blocks, _threads(values.size))
        ]
    )
    return err_sq, ref_sq, float(top.max(initial=0.0)), int(count.sum())


def warm_up() -> None:
    """Compile (or load from Numba's cache) every kernel for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(6, dtype=dtype).view(2, 3)
        for stochastic in (False, True):
            for dim, channels in ((None, 1), (0, 2), (1, 3)):
                params = torch.ones(6, channels, dtype=dtype)
                round_levels(x, params, dim, 1.0, stochastic, 1)
        int_quant(x, 0.0, 1.0, 1.0)
        dropout(x, 1 << 31, 1)
        decay(x, torch.zeros(2, dtype=dtype), torch.zeros(3, dtype=dtype))
        channel_range(x, 0)
        channel_range(x, 1)
        values = x.reshape(-1).numpy()
        distinct_finite(values, 4)
        error_sums(values, values)
