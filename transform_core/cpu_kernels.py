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
:func:`channel_range`, :func:`finite_ends`, :func:`distinct_finite`, :func:`error_sums`)
cut the work into pieces for ``torch.get_num_threads()`` threads, the calling thread
included, each taking the next piece as it finishes one; the kernels release the GIL. Each
loop runs over a slice from index 0: Numba checks an index it cannot prove non-negative
for wrap-around, and such a loop does not vectorise.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
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
        if stochastic:
            # A 32-bit index of its own: one derived from k would be packed from 64 bits.
            index = _u32(start)
            for k in range(xs.size):
                level = _stochastic_level(xs[k], lo, q, index, key, one, two_24)
                outs[k] = _finish(level, oq, olo, ohi, top, zl, zero)
                index = _u32(index + _u32(1))
        else:
            for k in range(xs.size):
                level = np.rint((xs[k] - lo) / q)
                outs[k] = _finish(level, oq, olo, ohi, top, zl, zero)


@_jit(**_COMPILED)
def _round_rows(
    x: Any, out: Any, r0: int, r1: int, params: Any, top: Any, consts: Any, stochastic: bool,
    key: int,
) -> None:  # fmt: skip
    # Rows of params.shape[1] columns, each with its own parameters: the channel is the last
    # dimension, or each column is one element of a channel's run (see _by_rows).
    channels = params.shape[1]
    zero, one, two_24 = consts[0], consts[1], consts[2]
    lo, q, olo, oq, ohi, zl = params[0], params[1], params[2], params[3], params[4], params[5]
    for r in range(r0, r1):
        base = r * channels
        xs, outs = x[base : base + channels], out[base : base + channels]
        if stochastic:
            index = _u32(base)
            for c in range(channels):
                level = _stochastic_level(xs[c], lo[c], q[c], index, key, one, two_24)
                outs[c] = _finish(level, oq[c], olo[c], ohi[c], top, zl[c], zero)
                index = _u32(index + _u32(1))
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
    bound, index = _u32(threshold), _u32(i0)
    xs, outs = x[i0:i1], out[i0:i1]
    for k in range(xs.size):
        v = xs[k]
        outs[k] = v if _bits(index, key) >= bound else zero
        index = _u32(index + _u32(1))


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


@_jit(inline="always")
def _finite_min_max(xs: Any, a: Any, b: Any) -> tuple[Any, Any]:
    # (min, max) of a, b and the finite values of xs.
    for k in range(xs.size):
        v = xs[k]
        finite = v - v == 0  # False for infinities and NaN
        a = v if finite and v < a else a
        b = v if finite and v > b else b
    return a, b


_MIN_MAX_LANES = 16


@_jit(inline="always")
def _finite_min_max_lanes(xs: Any, a: Any, b: Any, lo_lanes: Any, hi_lanes: Any) -> tuple[Any, Any]:
    # _finite_min_max over _MIN_MAX_LANES running minima and maxima (scratch arrays of that
    # size), which vectorises where one running pair cannot: for groups of 81 to 4096
    # values 2.5x to 3x faster in float32, 1.7x to 1.9x in float64. Between 0.0 and -0.0 it
    # may keep either: channel_range's caller makes a zero end +0.0.
    inf = xs.dtype.type(np.inf)
    whole = xs.size - xs.size % _MIN_MAX_LANES
    if whole:
        lo_lanes[:] = inf
        hi_lanes[:] = -inf
        for i in range(0, whole, _MIN_MAX_LANES):
            row = xs[i : i + _MIN_MAX_LANES]
            for j in range(_MIN_MAX_LANES):
                v = row[j]
                finite = v - v == 0
                lo_lanes[j] = np.minimum(lo_lanes[j], v if finite else inf)
                hi_lanes[j] = np.maximum(hi_lanes[j], v if finite else -inf)
        for j in range(_MIN_MAX_LANES):
            a = np.minimum(a, lo_lanes[j])
            b = np.maximum(b, hi_lanes[j])
    return _finite_min_max(xs[whole:], a, b)


@_jit(**_COMPILED)
def _range_groups(x: Any, lo: Any, hi: Any, g0: int, g1: int, inner: int) -> None:
    # Finite minimum and maximum of each group of ``inner`` elements, into its channel.
    channels = lo.size
    lo_lanes = np.empty(_MIN_MAX_LANES, dtype=x.dtype)
    hi_lanes = np.empty(_MIN_MAX_LANES, dtype=x.dtype)
    for g in range(g0, g1):
        c = g % channels
        xs = x[g * inner : (g + 1) * inner]
        lo[c], hi[c] = _finite_min_max_lanes(xs, lo[c], hi[c], lo_lanes, hi_lanes)


@_jit(**_COMPILED)
def _range_span(x: Any, lo: Any, hi: Any, slot: int, i0: int, i1: int) -> None:
    # Finite minimum and maximum of x[i0:i1], into lo[slot] and hi[slot].
    lo[slot], hi[slot] = _finite_min_max(x[i0:i1], lo[slot], hi[slot])


@_jit(**_COMPILED)
def _data_plan(
    ends: Any, steps: Any, symmetric: bool, default_output: bool, middle: Any, consts: Any,
    params: Any,
) -> bool:  # fmt: skip
    # quantise._finite_range and quantise._Plan for one range taken from the data, with
    # their operations in the value's dtype and in their order, into round_levels' table:
    # the input columns, and the output columns too for the default output range (the
    # input range). False, with nothing written, where the range has zero width and an
    # output range is given: the chain handles that. middle: the level pinned to zero in a
    # symmetric range, -1 for none (an odd number of steps).
    zero, one = consts[0], consts[1]
    neg_lo, hi = ends[0], ends[1]
    if symmetric:
        peak = hi if hi > neg_lo else neg_lo  # torch.maximum(-min, max), zeros' signs included
        if peak < zero:  # no finite value
            peak = zero
        lo, hi = -peak, peak
    else:
        lo = -neg_lo
        if lo > hi:  # no finite value
            lo, hi = zero, zero
    width = hi - lo
    degenerate = width <= zero
    if degenerate and not default_output:
        return False
    quantum = width / steps
    params[0, 0] = lo
    params[1, 0] = one if degenerate else quantum
    if default_output:
        params[2, 0], params[3, 0], params[4, 0] = lo, quantum, hi
        params[5, 0] = middle if symmetric and hi > zero else -one
    return True


@_jit(**_COMPILED)
def _range_rows(x: Any, lo: Any, hi: Any, r0: int, r1: int) -> None:
    # Rows of lo.size columns (a column per channel, or per element of a channel's run: see
    # _by_rows): each row updates every column's minimum and maximum. np.minimum/np.maximum,
    # not a conditional store: that compiles to masked stores, which made this kernel take
    # 1.8x as long on AMD Zen (float32; float64 1.1x). On equal ends (0.0 and -0.0) both keep
    # the value held, and _finite_range makes a zero end +0.0 in any case.
    channels = lo.size
    inf = x.dtype.type(np.inf)
    for r in range(r0, r1):
        xs = x[r * channels : (r + 1) * channels]
        for c in range(channels):
            v = xs[c]
            finite = v - v == 0
            lo[c] = np.minimum(lo[c], v if finite else inf)
            hi[c] = np.maximum(hi[c], v if finite else -inf)


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
        # np.maximum, not max(): the compiler makes max() a masked store, which is slow on
        # some CPUs (AMD Zen: the kernel took 1.5x to 1.8x as long). |e| is never -0.0; a NaN
        # here sends the block to the careful pass, so both give the same bits.
        top[j] = np.maximum(abs(e), top[j])


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
        top[j] = np.maximum(abs(e), top[j])  # as in _error_row_finite
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


def _parallel(calls: Calls, threads: int) -> None:
    """Run ``fn(*args)`` for each call on up to ``threads`` threads, the calling one included.

    Each thread takes the next call that has not started, so a thread slowed down by
    another on its core (torch's OpenMP threads spin for a while after each operation)
    leaves more of the work to the others instead of holding up the whole.
    """
    global _pool, _pool_pid
    threads = min(threads, len(calls))
    if threads <= 1:
        for fn, args in calls:
            fn(*args)
        return
    # A forked child inherits the pool but not its threads: it needs a pool of its own.
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < threads - 1:
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="rockq-kernel")
        _pool_pid = os.getpid()
    pending = iter(calls)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                call = next(pending, None)
            if call is None:
                return
            fn, args = call
            fn(*args)

    futures = [_pool.submit(work) for _ in range(threads - 1)]
    try:
        work()  # the calling thread works too rather than waiting idle
    finally:
        # Return only once no worker still uses the arrays, even after an error.
        wait(futures)
    for future in futures:
        future.result()


def _spans(count: int, parts: int) -> list[tuple[int, int]]:
    # At least one span, empty for nothing to do.
    step = max(1, -(-count // parts))
    return [(s, min(count, s + step)) for s in range(0, count, step)] or [(0, 0)]


#: A thread per this many elements at most. Below that a second thread costs more than it
#: saves: besides starting it, torch's OpenMP threads spin for milliseconds after each
#: operation, so in a training step a thread of ours shares its core with one of them (on
#: two cores, a 1M-element weight took 1.6 ms on two threads, 1.4 ms on one).
THREAD_ELEMENTS = 1 << 21

#: With several threads, the work is cut into pieces of at least this many elements, about
#: four per thread, for :func:`_parallel` to hand out.
PIECE_ELEMENTS = 1 << 17


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // THREAD_ELEMENTS))


def _pieces(numel: int, threads: int) -> int:
    if threads == 1:
        return 1
    return max(threads, min(4 * threads, numel // PIECE_ELEMENTS))


def _flat(value: Tensor) -> Any:
    return value.detach().reshape(-1).numpy()


#: Channels whose runs are this short or shorter (``inner``: a 3 x 3 convolution weight
#: along dim 1 has runs of 9) are handled a row at a time, ``outer`` rows of
#: ``channels * inner`` columns, each column with its channel's parameters. A loop over one
#: run at a time vectorises poorly for short runs: for a 256 x 128 x 3 x 3 float32 weight
#: the range took 1.45 against 0.36 ns per value, stochastic rounding 2.98 against 0.70.
#: The rows stayed ahead up to runs of 49 (7 x 7) in float32 and float64; at 64 they were
#: no faster in float32 and slower in float64.
RUN_ELEMENTS = 49

#: The row layout holds per-column arrays of a row's length (six parameters to round;
#: running ends per piece for the range): rows up to this many values, and at least
#: :data:`LAYOUT_MIN_ROWS` of them, so that those arrays stay small beside the tensor. With
#: 4 rows of 32K values the range took 2.4 times as long as a run at a time; with 16 rows
#: rounding still gained (float32 and float64), and the range too in float32.
ROW_ELEMENTS = 1 << 15
LAYOUT_MIN_ROWS = 16


def _by_rows(outer: int, channels: int, inner: int) -> bool:
    """Whether channels laid out as ``(outer, channels, inner)`` go a row at a time."""
    if inner == 1:
        return channels > 1
    return inner <= RUN_ELEMENTS and outer >= LAYOUT_MIN_ROWS and channels * inner <= ROW_ELEMENTS


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
    pieces = _pieces(value.numel(), threads)
    calls: Calls
    if _by_rows(outer, channels, inner):
        if inner > 1:
            p = np.repeat(p, inner, axis=1)  # a column per element of a row
        calls = [
            (_round_rows, (x, o, r0, r1, p, top_value, consts, stochastic, key))
            for r0, r1 in _spans(outer, pieces)
        ]
    elif outer * channels >= pieces:
        calls = [
            (_round_groups, (x, o, g0, g1, 0, inner, inner, p, top_value, consts, stochastic, key))
            for g0, g1 in _spans(outer * channels, pieces)
        ]
    else:
        calls = [
            (_round_groups, (x, o, 0, outer * channels, i0, i1, inner, p, top_value, consts,
                             stochastic, key))
            for i0, i1 in _spans(inner, pieces)
        ]  # fmt: skip
    _parallel(calls, threads)
    return out


def finite_ends(value: Tensor) -> Tensor:
    """``[[-min, max]]`` of the finite values of ``value``; ``-inf`` for none.

    The one-row table that :func:`transform_core.cuda_kernels.data_ends` makes on the GPU.
    One pass (torch's ``aminmax``) where every value is finite; where one is not, a
    compiled pass that skips them follows.

    Args:
        value: A contiguous float32 or float64 CPU tensor.
    """
    # torch's aminmax is vectorised, where a reduction that skips non-finite values would
    # not be: it answers whenever the data has no NaN or infinity, by far the usual case.
    lo_t, hi_t = torch.aminmax(value.detach())
    lo_all, hi_all = lo_t.item(), hi_t.item()
    x = _flat(value)
    if math.isfinite(lo_all) and math.isfinite(hi_all):
        return torch.from_numpy(np.array([[-lo_all, hi_all]], dtype=x.dtype))
    threads = _threads(x.size)
    spans = _spans(x.size, _pieces(x.size, threads))
    lo = np.full(len(spans), np.inf, dtype=x.dtype)
    hi = np.full(len(spans), -np.inf, dtype=x.dtype)
    _parallel([(_range_span, (x, lo, hi, k, a, b)) for k, (a, b) in enumerate(spans)], threads)
    return torch.from_numpy(np.array([[-lo.min(), hi.max()]], dtype=x.dtype))


def data_range_table(
    ends: Tensor,
    *,
    steps: int,
    symmetric: bool,
    output_range: tuple[float, float] | None,
    zero_level: float | None,
) -> Tensor | None:
    """The ``params`` of :func:`round_levels` for an input range taken from ``ends``.

    What :class:`transform_core.quantise._Plan` makes of :func:`finite_ends`' range, bit
    for bit, without its tensor operations: ``max|x| * [-1, 1]`` when ``symmetric``, the
    level width, and (with the input range as the output) the middle level pinned to
    zero. ``None`` where the range has zero width and ``output_range`` is given.

    Args:
        ends: A :func:`finite_ends` table.
        steps: Number of levels minus one.
        symmetric: The range is ``max|x| * [-1, 1]`` (``maintain_zero``).
        output_range: ``(lo, hi)`` of the output, or ``None`` for the input range.
        zero_level: The level pinned to zero with a given output range, if any.
    """
    row = ends.numpy().reshape(-1)
    dtype = row.dtype.type
    params = np.empty((6, 1), dtype=row.dtype)
    if output_range is not None:
        out_lo, out_hi = output_range
        pinned = -1.0 if zero_level is None else zero_level
        params[2:, 0] = (out_lo, (out_hi - out_lo) / steps, out_hi, pinned)
    middle = dtype(steps / 2 if steps % 2 == 0 else -1.0)
    consts = np.array([0.0, 1.0], dtype=row.dtype)
    if not _data_plan(row, dtype(steps), symmetric, output_range is None, middle, consts, params):
        return None
    return torch.from_numpy(params)


def channel_range(value: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """Minimum and maximum of the finite values of each slice along ``channel_dim``.

    Args:
        value: A contiguous float32 or float64 CPU tensor.
        channel_dim: The channel dimension.

    Returns:
        ``(lo, hi)`` shaped for broadcasting against ``value`` (size 1 in every other
        dimension); ``[0, 0]`` for a channel without a finite value. A zero end of a
        channel holding both 0.0 and -0.0 may be either.
    """
    x = _flat(value)
    channels = value.shape[channel_dim]
    outer = math.prod(value.shape[:channel_dim])
    inner = math.prod(value.shape[channel_dim + 1 :])
    threads = _threads(value.numel())
    pieces = _pieces(value.numel(), threads)
    kernel: Any
    by_rows = _by_rows(outer, channels, inner)
    if by_rows:
        kernel, spans, columns = _range_rows, _spans(outer, pieces), channels * inner
    else:
        kernel, spans, columns = _range_groups, _spans(outer * channels, pieces), channels
    partial = [
        (np.full(columns, np.inf, dtype=x.dtype), np.full(columns, -np.inf, dtype=x.dtype))
        for _ in spans
    ]
    extra = () if by_rows else (inner,)
    _parallel(
        [
            (kernel, (x, lo, hi, a, b, *extra))
            for (lo, hi), (a, b) in zip(partial, spans, strict=True)
        ],
        threads,
    )
    lo = np.minimum.reduce([p[0] for p in partial])
    hi = np.maximum.reduce([p[1] for p in partial])
    if columns != channels:  # a column per element of a row: fold each channel's run
        lo, hi = lo.reshape(channels, inner).min(axis=1), hi.reshape(channels, inner).max(axis=1)
    empty = lo > hi  # no finite value: still +inf and -inf
    lo[empty], hi[empty] = 0.0, 0.0
    shape = [1] * value.dim()
    shape[channel_dim] = channels
    return torch.from_numpy(lo).view(shape), torch.from_numpy(hi).view(shape)


def _element_wise(kernel: Any, value: Tensor, *args: Any) -> Tensor:
    out = output_like(value)
    x, o = _flat(value), _flat(out)
    threads = _threads(x.size)
    spans = _spans(x.size, _pieces(x.size, threads))
    _parallel([(kernel, (x, o, i0, i1, *args)) for i0, i1 in spans], threads)
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


#: The first try of :func:`distinct_finite` counts up to this many values, in hash sets of
#: 16 KiB (float32) that stay in the fastest cache; quantised tensors rarely have more.
FIRST_DISTINCT_LIMIT = 1 << 10


def distinct_finite(values: Any, limit: int) -> tuple[Any, int] | None:
    """Sorted distinct finite values of a float32 or float64 array, and its non-finite count.

    ``-0.0`` counts as ``0.0``. Returns ``None`` as soon as more than ``limit`` distinct
    values turn up (a sort is then the faster way), having read only part of the array.
    Each thread fills a hash set of its own share; their union is the answer. A first try
    with small sets (:data:`FIRST_DISTINCT_LIMIT`) serves most quantised tensors; where it
    gives up, having read little, sets large enough for ``limit`` values take over.
    """
    if limit > FIRST_DISTINCT_LIMIT:
        found = _distinct_within(values, FIRST_DISTINCT_LIMIT)
        if found is not None:
            return found
    return _distinct_within(values, limit)


def _distinct_within(values: Any, limit: int) -> tuple[Any, int] | None:
    uint = _BIT_TYPES[values.dtype]
    info = np.finfo(values.dtype)
    finite_mask = uint(((1 << info.nexp) - 1) << info.nmant)
    negative_zero = uint(1 << (info.bits - 1))
    bits = values.reshape(-1).view(uint)
    # A table at most half full: a probe then mostly ends at its first slot.
    size = 1 << max(4, (2 * min(limit + 1, bits.size)).bit_length())
    shift = np.uint64(64 - size.bit_length() + 1)
    threads = _threads(bits.size)
    spans = _spans(bits.size, threads)  # a hash set per span: one per thread
    tables = [np.full(size, np.iinfo(uint).max, dtype=uint) for _ in spans]
    results: list[tuple[int, int]] = []

    def share(table: Any, i0: int, i1: int) -> None:
        results.append(
            _insert_distinct(bits[i0:i1], table, shift, finite_mask, negative_zero, limit)
        )

    _parallel(
        [(share, (table, i0, i1)) for table, (i0, i1) in zip(tables, spans, strict=True)], threads
    )
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
    threads = _threads(values.size)
    _parallel(
        [
            (_error_blocks, (v, r, b0, b1, ERROR_BLOCK, err_sq, ref_sq, top, count))
            for b0, b1 in _spans(blocks, _pieces(values.size, threads))
        ],
        threads,
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
        ends = finite_ends(torch.tensor([math.nan, 1.0], dtype=dtype))  # the kernel's way
        for symmetric in (False, True):
            data_range_table(ends, steps=2, symmetric=symmetric, output_range=None, zero_level=None)
        values = x.reshape(-1).numpy()
        distinct_finite(values, 4)
        error_sums(values, values)
