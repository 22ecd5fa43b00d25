"""Fused rounding on CUDA: one Triton kernel per call, and the data range without a host wait.

:func:`fused_round` runs stochastic or deterministic rounding as one Triton kernel (when
Triton is installed): one read, one write. Its random bits are those of the CPU paths
(:func:`transform_core.kernels.hash_bits`, a hash of each element's position and a key),
with the key drawn on the device from the caller's generator, and stochastic rounding
decides up or down exactly as there. :func:`data_ends` finds the range of the
finite values (of the whole tensor or of each channel) in one pass, and
:func:`round_in_data_range` rounds with a plan derived from that range inside the kernel,
so a transform whose range comes from its data is two kernels and nothing waits for the
host. All return ``None`` for anything they do not cover (a CPU tensor, no Triton, fast
paths off), and the caller falls back to the plain chain of :mod:`transform_core.quantise`.

Example:
    >>> fused_round(torch.ones(4), in_lo=-1.0, in_quantum=1.0, out_lo=-1.0, out_hi=1.0,
    ...             out_quantum=1.0, top=2.0, stochastic=False) is None  # CPU: not covered
    True
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from transform_core.kernels import HASH_M1, HASH_M2, Bound, fast_paths_enabled

# Triton and its language module are imported on first use: importing them costs a good
# part of a second, and CPU-only installs do not have them.
tl: Any = None
_triton: Any = None
_round_kernel_jit: Any = None
_param_jit: Any = None
_hash_bits_jit: Any = None
_HASH_M1: Any = None
_HASH_M2: Any = None
_rounded_levels_jit: Any = None
_range_plan_jit: Any = None
_ranged_kernel_jit: Any = None
_segments_jit: Any = None
_columns_jit: Any = None
_TRITON_MISSING = False

# Rounding kernels: a program rounds _ROUND_BLOCK elements, as four quarters, with
# _ROUND_WARPS warps.
_ROUND_BLOCK, _ROUND_WARPS = 2048, 8
# Range kernels: a program reduces _CHUNK contiguous elements of one channel's segment,
# _RANGE_BLOCK at a time, or a band of _BAND rows of _COLUMNS columns where segments are
# shorter than _SEGMENT_MIN.
_RANGE_BLOCK, _RANGE_WARPS = 2048, 8
_CHUNK = 4 * _RANGE_BLOCK
_SEGMENT_MIN = 2048
_ROWS, _BAND, _COLUMNS = 8, 64, 256
# Offsets are int32, and a program may reach up to 2**13 elements past the end.
_MAX_ELEMENTS = 2**31 - 2**14
_ABSENT, _VALUE, _SCALAR, _CHANNEL = 3, 0, 1, 2


def _param(ptr, val, chan, mask, KIND: tl.constexpr):  # type: ignore[no-untyped-def]
    # A parameter is a kernel argument (_VALUE), one element in memory (_SCALAR), or one
    # value per channel (_CHANNEL).
    if KIND == 0:
        p = val
    elif KIND == 1:
        p = tl.load(ptr)
    else:
        p = tl.load(ptr + chan, mask=mask, other=0.0)
    return p


def _hash_bits(offs, key):  # type: ignore[no-untyped-def]
    # kernels.hash_bits of the elements at offs (below 2**31): a hash of position and key.
    h = offs.to(tl.uint32) ^ key
    h = (h ^ (h >> 16)) * _HASH_M1
    h = (h ^ (h >> 13)) * _HASH_M2
    return h ^ (h >> 16)


def _rounded_levels(y, bits, top, STOCHASTIC: tl.constexpr):  # type: ignore[no-untyped-def]
    # Level indices: rounded down or up at random, or half to even; then clamp(0, top)
    # keeping NaN.
    if STOCHASTIC:
        # As kernels.stochastic_floor_: up when the top 24 random bits, an integer below
        # 2**24, fall below fraction * 2**24. Both sides are exact in float32, so a value
        # on a level stays there; a NaN or infinite level compares false and stays.
        down = tl.floor(y)
        up = (bits >> 8).to(tl.float32) < (y - down) * 16777216.0
        y = tl.where(up, down + 1.0, down)
    else:
        # Adding and removing 2**23 leaves the integer nearest y, ties to even, for
        # |y| < 2**23; larger floats are integers already. y * 0 restores the sign of a zero
        # result (rint(-0.3) is -0.0).
        big = tl.where(y < 0.0, -8388608.0, 8388608.0)
        r = (y + big) - big
        r = tl.where(r == 0.0, y * 0.0, r)
        y = tl.where(tl.abs(y) < 8388608.0, r, y)
    # clamp(0, top) that keeps NaN, as torch.clamp does.
    y = tl.where(y < 0.0, 0.0, y)
    y = tl.where(y > top, top, y)
    return y


def _round_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    out_ptr,
    key_ptr,
    lo_ptr,
    lo_val,
    iq_ptr,
    iq_val,
    oq_ptr,
    oq_val,
    olo_ptr,
    olo_val,
    ohi_ptr,
    ohi_val,
    zl_ptr,
    zl_val,
    dg_ptr,
    dg_val,
    fb_ptr,
    fb_val,
    top,
    n,
    channels,
    inner,
    LO: tl.constexpr,
    IQ: tl.constexpr,
    OQ: tl.constexpr,
    OLO: tl.constexpr,
    OHI: tl.constexpr,
    ZL: tl.constexpr,
    DG: tl.constexpr,
    FB: tl.constexpr,
    IQ_RECIPROCAL: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The same steps as the plain chain, in the same order and with IEEE division, so the
    # deterministic result is bit-for-bit the chain's. Offsets are int32: the caller keeps
    # n + BLOCK below 2**31.
    # Each program takes BLOCK elements as four quarters.
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK // 4)
    key = pid  # unused unless STOCHASTIC
    if STOCHASTIC:
        key = tl.load(key_ptr).to(tl.uint32)
    for k in tl.static_range(4):
        offs = pid * BLOCK + k * (BLOCK // 4) + lane
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if PER_CHANNEL:  # noqa: SIM108 (a compile-time branch in Triton)
            chan = (offs // inner) % channels
        else:
            chan = offs * 0
        lo = _param_jit(lo_ptr, lo_val, chan, mask, LO)
        if IQ_RECIPROCAL:
            # torch on CUDA divides by a host scalar as a product with its float32 reciprocal.
            y = (x - lo) * iq_val
        else:
            iq = _param_jit(iq_ptr, iq_val, chan, mask, IQ)
            y = tl.div_rn(x - lo, iq)
        bits = offs  # unused unless STOCHASTIC
        if STOCHASTIC:
            bits = _hash_bits_jit(offs, key)
        y = _rounded_levels_jit(y, bits, top, STOCHASTIC)
        if DG != 3:
            # A zero-width input range with an explicit output range: finite values go to the
            # fallback level.
            dg = _param_jit(dg_ptr, dg_val, chan, mask, DG)
            fb = _param_jit(fb_ptr, fb_val, chan, mask, FB)
            y = tl.where(dg != 0.0, tl.where((x - x) == 0.0, fb, y), y)
        oq = _param_jit(oq_ptr, oq_val, chan, mask, OQ)
        olo = _param_jit(olo_ptr, olo_val, chan, mask, OLO)
        out = y * oq + olo
        ohi = _param_jit(ohi_ptr, ohi_val, chan, mask, OHI)
        out = tl.where(y == top, ohi, out)
        if ZL != 3:
            zl = _param_jit(zl_ptr, zl_val, chan, mask, ZL)
            out = tl.where(y == zl, 0.0, out)
        tl.store(out_ptr + offs, out, mask=mask)


def _range_plan(  # type: ignore[no-untyped-def]
    neg_lo, hi, steps, steps_reciprocal, SYMMETRIC: tl.constexpr, STEPS_RECIPROCAL: tl.constexpr
):
    # (lo, hi, quantum, degenerate) from a row of ends, with the chain's float32 operations
    # in the chain's order (see quantise._finite_range and quantise._Plan).
    if SYMMETRIC:
        # max|x| * [-1, 1]; +0.0 where a channel has no finite value.
        hi = tl.maximum(tl.maximum(neg_lo, hi), 0.0)
        lo = -hi
    else:
        lo = 0.0 - neg_lo
        empty = lo > hi
        lo = tl.where(empty, 0.0, lo)
        hi = tl.where(empty, 0.0, hi)
    width = hi - lo
    if STEPS_RECIPROCAL:  # noqa: SIM108 (a compile-time branch in Triton)
        # torch on CUDA divides by a host scalar as a product with its float32 reciprocal.
        quantum = width * steps_reciprocal
    else:
        quantum = tl.div_rn(width, steps)
    return lo, hi, quantum, width <= 0.0


def _ranged_round_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    out_ptr,
    key_ptr,
    ends_ptr,
    steps,
    steps_reciprocal,
    out_lo,
    out_hi,
    out_quantum,
    zero_level,
    fallback_level,
    n,
    channels,
    columns,
    row_magic,
    row_shift,
    channel_magic,
    channel_shift,
    SYMMETRIC: tl.constexpr,
    DEFAULT_OUTPUT: tl.constexpr,
    ZERO: tl.constexpr,
    STEPS_RECIPROCAL: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    LAYOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Rounding whose input range is the data's, read from the (channels, 2) table of
    # [-min, max] that the range kernels write; the plan is derived here, so that the
    # deterministic result is bit-for-bit the chain's.
    # Layouts (LAYOUT): 0, one range; 1, a channel per element, (offs // inner) % channels;
    # 2, a channel per quarter (inner a multiple of BLOCK // 4); 3, channels the last
    # dimension, a multiple of BLOCK // 4 wide: program p takes four rows of the same
    # BLOCK // 4 channels. The divisions are products with 64-bit magic numbers, exact for
    # offsets below 2**31 and far cheaper than integer division.
    # Programs run in reverse order of the data: the range kernels read it in order, so its
    # end is what their last programs left in the L2 cache (2 % faster on an H100).
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    lane = tl.arange(0, BLOCK // 4)
    key = pid  # unused unless STOCHASTIC
    if STOCHASTIC:
        key = tl.load(key_ptr).to(tl.uint32)
    top = steps
    if LAYOUT == 0 or LAYOUT == 3:
        # The plan once per program: one range, or the same channels in all four quarters.
        chan = 0
        if LAYOUT == 3:
            blocks = (pid.to(tl.int64) * row_magic) >> row_shift  # pid // columns
            chan = (pid - blocks * columns).to(tl.int32) * (BLOCK // 4) + lane
            first = (blocks * 4).to(tl.int32)
        lo, hi, quantum, degenerate = _range_plan_jit(
            tl.load(ends_ptr + 2 * chan),
            tl.load(ends_ptr + 2 * chan + 1),
            steps,
            steps_reciprocal,
            SYMMETRIC,
            STEPS_RECIPROCAL,
        )
    for k in tl.static_range(4):
        if LAYOUT == 3:
            offs = (first + k) * channels + chan
        else:
            offs = pid * BLOCK + k * (BLOCK // 4) + lane
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if LAYOUT == 1 or LAYOUT == 2:
            if LAYOUT == 1:
                start = offs.to(tl.int64)
            else:
                start = (pid * BLOCK + k * (BLOCK // 4)).to(tl.int64)
            row = (start * row_magic) >> row_shift  # start // inner
            chan = (row - ((row * channel_magic) >> channel_shift) * channels).to(tl.int32)
            lo, hi, quantum, degenerate = _range_plan_jit(
                tl.load(ends_ptr + 2 * chan),
                tl.load(ends_ptr + 2 * chan + 1),
                steps,
                steps_reciprocal,
                SYMMETRIC,
                STEPS_RECIPROCAL,
            )
        y = tl.div_rn(x - lo, tl.where(degenerate, 1.0, quantum))
        bits = offs  # unused unless STOCHASTIC
        if STOCHASTIC:
            bits = _hash_bits_jit(offs, key)
        y = _rounded_levels_jit(y, bits, top, STOCHASTIC)
        if DEFAULT_OUTPUT:
            out = y * quantum + lo
            out = tl.where(y == top, hi, out)
            if ZERO:
                # The middle level of a symmetric range that is not all zero (-1: none).
                out = tl.where(y == tl.where(hi > 0.0, top * 0.5, -1.0), 0.0, out)
        else:
            y = tl.where(degenerate, tl.where((x - x) == 0.0, fallback_level, y), y)
            out = y * out_quantum + out_lo
            out = tl.where(y == top, out_hi, out)
            if ZERO:
                out = tl.where(y == zero_level, 0.0, out)
        tl.store(out_ptr + offs, out, mask=mask)


def _segments_range_kernel(  # type: ignore[no-untyped-def]
    x_ptr, ends_ptr, inner, channels, parts, CHUNK: tl.constexpr, BLOCK: tl.constexpr
):
    # The tensor is contiguous segments of `inner` elements, segment s in channel
    # s % channels. Program p takes part p % parts of segment p // parts and folds its finite
    # values into the channel's row of ends: [-min, max], zeros as +0.0.
    pid = tl.program_id(0)
    segment = pid // parts
    start = (pid % parts) * CHUNK
    base = x_ptr + segment * inner
    lane = tl.arange(0, BLOCK)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    for i in tl.static_range(CHUNK // BLOCK):
        idx = start + i * BLOCK + lane
        mask = idx < inner
        v = tl.load(base + idx, mask=mask, other=0.0)
        finite = mask & ((v - v) == 0.0)
        lo = tl.minimum(lo, tl.where(finite, v, float("inf")))
        hi = tl.maximum(hi, tl.where(finite, v, float("-inf")))
    row = ends_ptr + 2 * (segment % channels)
    tl.atomic_max(row, 0.0 - tl.min(lo, axis=0))
    tl.atomic_max(row + 1, tl.max(hi, axis=0) + 0.0)


def _columns_range_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    ends_ptr,
    rows,
    width,
    inner,
    column_blocks,
    ROWS: tl.constexpr,
    BAND: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    # The tensor as a (rows, width) matrix whose column c is in channel c // inner. Program
    # p folds a band of BAND rows of COLUMNS columns into ends (a one-dimensional grid:
    # either count may pass the 65535 that a second grid dimension allows).
    pid = tl.program_id(0)
    cols = (pid % column_blocks) * COLUMNS + tl.arange(0, COLUMNS)
    col_ok = cols < width
    first = (pid // column_blocks) * BAND
    lo = tl.full([ROWS, COLUMNS], float("inf"), tl.float32)
    hi = tl.full([ROWS, COLUMNS], float("-inf"), tl.float32)
    for i in tl.static_range(BAND // ROWS):
        row = first + i * ROWS + tl.arange(0, ROWS)
        mask = (row < rows)[:, None] & col_ok[None, :]
        v = tl.load(x_ptr + row[:, None] * width + cols[None, :], mask=mask, other=0.0)
        finite = mask & ((v - v) == 0.0)
        lo = tl.minimum(lo, tl.where(finite, v, float("inf")))
        hi = tl.maximum(hi, tl.where(finite, v, float("-inf")))
    chan = ends_ptr + 2 * (cols // inner)
    tl.atomic_max(chan, 0.0 - tl.min(lo, axis=0), mask=col_ok)
    tl.atomic_max(chan + 1, tl.max(hi, axis=0) + 0.0, mask=col_ok)


def _load_triton() -> bool:
    """Import Triton and build the kernels once; ``False`` if Triton is not installed."""
    global tl, _triton, _round_kernel_jit, _param_jit, _TRITON_MISSING
    global \
        _hash_bits_jit, \
        _HASH_M1, \
        _HASH_M2, \
        _rounded_levels_jit, \
        _range_plan_jit, \
        _ranged_kernel_jit
    global _segments_jit, _columns_jit
    if _round_kernel_jit is not None:
        return True
    if _TRITON_MISSING:
        return False
    try:
        import triton
        import triton.language as language
    except ImportError:
        _TRITON_MISSING = True
        return False
    tl = language
    _triton = triton
    _param_jit = triton.jit(_param)
    # The hash's multipliers, as constants that the kernels may read.
    _HASH_M1, _HASH_M2 = language.constexpr(HASH_M1), language.constexpr(HASH_M2)
    _hash_bits_jit = triton.jit(_hash_bits)
    _rounded_levels_jit = triton.jit(_rounded_levels)
    _range_plan_jit = triton.jit(_range_plan)
    _ranged_kernel_jit = triton.jit(_ranged_round_kernel)
    _segments_jit = triton.jit(_segments_range_kernel)
    _columns_jit = triton.jit(_columns_range_kernel)
    _round_kernel_jit = triton.jit(_round_kernel)
    return True


def _kernel_param(
    p: object, value: Tensor, channel_shape: list[int] | None
) -> tuple[Tensor, float, int] | None:
    """(pointer, value, kind) for one kernel parameter, or ``None`` if the layout is unknown."""
    if p is None:
        return value, 0.0, _ABSENT
    if isinstance(p, Tensor):
        if p.numel() == 1:
            if p.device.type == "cpu" and value.device.type != "cpu":
                # A CPU scalar is read for free and used as torch uses it, cast to float32.
                return value, float(p.reshape(())), _VALUE
            return p.reshape(1).to(torch.float32), 0.0, _SCALAR
        if channel_shape is None or list(p.shape) != channel_shape or p.device != value.device:
            return None
        return p.reshape(-1).to(torch.float32).contiguous(), 0.0, _CHANNEL
    if isinstance(p, (bool, int, float)):
        return value, float(p), _VALUE
    return None


def _channel_layout(value: Tensor, params: Sequence[object]) -> tuple[list[int], int, int] | None:
    """(keepdim shape, channels, inner size) shared by the per-channel parameters."""
    varying = [p for p in params if isinstance(p, Tensor) and p.numel() > 1]
    if not varying:
        return [], 1, 1
    shape = list(varying[0].shape)
    if len(shape) != value.dim():
        return None
    sized = [d for d, s in enumerate(shape) if s != 1]
    if len(sized) != 1 or shape[sized[0]] != value.shape[sized[0]]:
        return None
    dim = sized[0]
    return shape, value.shape[dim], math.prod(value.shape[dim + 1 :])


def fused_round(
    value: Tensor,
    *,
    in_lo: Bound,
    in_quantum: Bound,
    out_quantum: Bound,
    out_lo: Bound,
    out_hi: Bound,
    top: float,
    zero_level: Bound | None = None,
    fallback: Bound | None = None,
    fallback_level: Bound = 0.0,
    stochastic: bool,
    generator: torch.Generator | None = None,
) -> Tensor | None:
    """Round ``value`` to levels in one CUDA kernel, or return ``None`` if that cannot run.

    Computes, per element, with ``levels = (value - in_lo) / in_quantum``:

    1. ``floor(levels + u)`` (``stochastic``, ``u`` uniform on ``[0, 1)``) or
       ``round(levels)`` (half to even), then ``clamp(0, top)`` keeping ``NaN``;
    2. where ``fallback`` is set and the value is finite: ``fallback_level``;
    3. ``level * out_quantum + out_lo``, with level ``top`` set to ``out_hi`` exactly and
       level ``zero_level`` (if given) set to ``0``.

    Bounds are floats, one-element tensors, or per-channel tensors kept with ``keepdim``.
    The kernel runs for contiguous float32 CUDA tensors of fewer than 2**31 elements when
    Triton is installed and fast paths are on.

    Args:
        value: The values to round.
        in_lo: Bottom of the input range.
        in_quantum: Input width of one level (non-zero).
        out_quantum: Output width of one level.
        out_lo: Bottom of the output range.
        out_hi: Top of the output range.
        top: Index of the top level (``num_levels - 1``).
        zero_level: Level index pinned to exactly zero, if any.
        fallback: Mask (or flag) of channels whose input range has zero width.
        fallback_level: Level those channels' finite values take.
        stochastic: Stochastic instead of nearest rounding.
        generator: Source of the random key, on ``value``'s device.

    Returns:
        The rounded tensor, or ``None``.
    """
    if not _covered(value) or (value.requires_grad and torch.is_grad_enabled()):
        return None
    return _fused_round(
        value,
        [in_lo, in_quantum, out_quantum, out_lo, out_hi, zero_level, fallback, fallback_level],
        top,
        stochastic,
        generator,
    )


def _fused_round(
    value: Tensor,
    params: list[Bound | None],
    top: float,
    stochastic: bool,
    generator: torch.Generator | None,
) -> Tensor | None:
    """:func:`fused_round` without its device checks (Triton's interpreter runs it on CPU)."""
    in_lo, in_quantum, out_quantum, out_lo, out_hi, zero_level, fallback, fallback_level = params
    if isinstance(fallback, bool):
        fallback = 1.0 if fallback else None
    if fallback is None:
        fallback_level = 0.0
    params = [in_lo, in_quantum, out_quantum, out_lo, out_hi, zero_level, fallback, fallback_level]
    layout = _channel_layout(value, params)
    if layout is None or not _load_triton():
        return None
    shape, channels, inner = layout
    args: list[Tensor | float] = []
    kinds: list[int] = []
    for p in params:
        if isinstance(p, Tensor) and p.dtype == torch.bool:
            p = p.to(torch.float32)
        resolved = _kernel_param(p, value, shape or None)
        if resolved is None:
            return None
        args += [resolved[0], resolved[1]]
        kinds.append(resolved[2])
    reciprocal = kinds[1] == _VALUE and value.device.type == "cuda"
    if reciprocal:
        args[3] = _float32_reciprocal(float(args[3]))
    key = _key(value, generator) if stochastic else value
    out = torch.empty_like(value)
    return _launch_round(value, out, key, args, kinds, top, channels, inner, stochastic, reciprocal)


def _float32_reciprocal(divisor: float) -> float:
    """``1.0f / (float)divisor`` in float32: torch on CUDA divides by a host scalar as a
    product with it.

    Computed in Python, without tensors (two small tensor operations cost some 20 us a
    call): the quotient in double, rounded once more to float32. That is the float32
    quotient exactly, because double has more than twice float32's precision plus two
    bits, so the second rounding cannot land on the other side of a float32 tie.

    Example:
        >>> _float32_reciprocal(3.0) == float(torch.tensor(1.0) / torch.tensor(3.0))
        True
        >>> _float32_reciprocal(0.0), _float32_reciprocal(-math.inf)
        (inf, -0.0)
    """
    d = _to_float32(divisor)
    if d == 0.0:
        return math.copysign(math.inf, d)
    return _to_float32(1.0 / d)


def _to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), beyond its range to infinity."""
    try:
        rounded: float = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # finite, but past the largest float32
        return math.copysign(math.inf, x)
    return rounded


def _key(value: Tensor, generator: torch.Generator | None) -> Tensor:
    """A 32-bit key of :func:`kernels.hash_bits <transform_core.kernels.hash_bits>`, drawn
    on the device from the caller's generator: reproducible from it, no host round trip."""
    key = torch.empty(1, dtype=torch.int64, device=value.device)
    return key.random_(0, 2**32, generator=generator)


def _launch_round(
    value: Tensor,
    out: Tensor,
    key: Tensor,
    args: list[Tensor | float],
    kinds: list[int],
    top: float,
    channels: int,
    inner: int,
    stochastic: bool,
    reciprocal: bool,
) -> Tensor:
    n = value.numel()
    grid = (_triton.cdiv(n, _ROUND_BLOCK),)
    lo, iq, oq, olo, ohi, zl, dg, fb = kinds
    _round_kernel_jit[grid](
        value,
        out,
        key,
        *args,
        float(top),
        n,
        channels,
        inner,
        LO=lo,
        IQ=iq,
        OQ=oq,
        OLO=olo,
        OHI=ohi,
        ZL=zl,
        DG=dg,
        FB=fb,
        IQ_RECIPROCAL=reciprocal,
        STOCHASTIC=stochastic,
        PER_CHANNEL=channels > 1,
        BLOCK=_ROUND_BLOCK,
        num_warps=_ROUND_WARPS,
        # Keep y * quantum + lo two roundings, as the chain computes it, not one fma.
        enable_fp_fusion=False,
    )
    return out


def _magic_divisor(d: int) -> tuple[int, int]:
    """``(m, s)`` with ``(n * m) >> s == n // d`` for every ``0 <= n < 2**31``.

    With ``s = 31 + ceil(log2 d)`` and ``m = ceil(2**s / d)``, ``m * d`` exceeds ``2**s`` by
    less than ``d``, which moves ``n * m / 2**s`` above ``n / d`` by less than ``1 / d``: not
    enough to reach the next integer. ``m`` stays below ``2**32 + 1``, so the product fits
    in 64 bits.

    Example:
        >>> m, s = _magic_divisor(7)
        >>> [(n * m) >> s for n in (0, 6, 7, 2**31 - 1)] == [0, 0, 1, (2**31 - 1) // 7]
        True
    """
    shift = 31 + (d - 1).bit_length()
    return -(-(1 << shift) // d), shift


def _covered(value: Tensor) -> bool:
    """Whether the kernels take ``value``: contiguous float32 on CUDA, fewer than 2**31
    elements, with fast paths on."""
    return (
        value.device.type == "cuda"
        and value.dtype == torch.float32
        and value.is_contiguous()
        and 0 < value.numel() < _MAX_ELEMENTS
        and fast_paths_enabled()
    )


def data_ends(value: Tensor, channel_dim: int | None = None) -> Tensor | None:
    """``[-min, max]`` of the finite values, in one pass on CUDA without a host wait, or ``None``.

    Returns a ``(channels, 2)`` float32 tensor on ``value``'s device: one row per slice
    along ``channel_dim``, or a single row for the whole tensor. A zero end is ``+0.0``, and
    a row without finite values is ``[-inf, -inf]``. Runs where :func:`fused_round` does
    (contiguous float32 CUDA tensors, with Triton and fast paths on); ``None`` elsewhere.

    Args:
        value: The data.
        channel_dim: The channel dimension, or ``None`` for one range over everything.

    Returns:
        The table of ends, or ``None``.
    """
    if not _covered(value) or not _load_triton():
        return None
    if channel_dim is None:
        outer, channels, inner = 1, 1, value.numel()
    else:
        shape = value.shape
        outer, channels = math.prod(shape[:channel_dim]), shape[channel_dim]
        inner = math.prod(shape[channel_dim + 1 :])
    # Programs fold their values in with atomic maxima, which do not depend on their order.
    ends = torch.full((channels, 2), -math.inf, dtype=torch.float32, device=value.device)
    if channel_dim is None or inner >= _SEGMENT_MIN:
        parts = _triton.cdiv(inner, _CHUNK)
        _segments_jit[(outer * channels * parts,)](
            value,
            ends,
            inner,
            channels,
            parts,
            CHUNK=_CHUNK,
            BLOCK=_RANGE_BLOCK,
            num_warps=_RANGE_WARPS,
        )
        return ends
    # Short segments (a channel dimension at or near the end): reduce down the columns of
    # the (outer, channels * inner) matrix, a band of rows per program.
    rows, width = outer, channels * inner
    column_blocks = _triton.cdiv(width, _COLUMNS)
    _columns_jit[(column_blocks * _triton.cdiv(rows, _BAND),)](
        value,
        ends,
        rows,
        width,
        inner,
        column_blocks,
        ROWS=_ROWS,
        BAND=_BAND,
        COLUMNS=_COLUMNS,
        num_warps=8,
    )
    return ends


def range_from_ends(ends: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` of each row of a :func:`data_ends` table, as the plain chain finds them.

    With ``symmetric``, ``max|x| * [-1, 1]``; a row without finite values gets ``[0, 0]``.

    Example:
        >>> ends = torch.tensor([[1.0, 3.0], [-math.inf, -math.inf]])  # [-min, max]
        >>> range_from_ends(ends, symmetric=False)
        (tensor([-1., 0.]), tensor([3., 0.]))
        >>> range_from_ends(ends, symmetric=True)
        (tensor([-3., -0.]), tensor([3., 0.]))
    """
    neg_lo, hi = ends[:, 0], ends[:, 1]
    if symmetric:
        peak = torch.maximum(neg_lo, hi).clamp_min_(0.0)
        return -peak, peak
    lo = 0.0 - neg_lo
    empty = lo > hi
    return torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)


def round_in_data_range(
    value: Tensor,
    ends: Tensor,
    *,
    channel_dim: int | None,
    steps: int,
    symmetric: bool,
    output_range: tuple[float, float] | None,
    zero_level: float | None,
    fallback_level: float,
    stochastic: bool,
    generator: torch.Generator | None = None,
) -> Tensor | None:
    """Round ``value`` with its input range taken from ``ends``, in one CUDA kernel, or ``None``.

    The kernel derives what :class:`transform_core.quantise._Plan` would from the range
    (the symmetric range when ``symmetric``, the level width, a zero-width range's
    fallback) and then rounds as :func:`fused_round` does. ``output_range`` is the given
    output range, or ``None`` for the input range; ``zero_level`` and ``fallback_level``
    are the plan's for a given output range (with the input range as output, the middle
    level of a symmetric range is pinned to zero when ``steps`` is even).

    Args:
        value: The values to round.
        ends: Their :func:`data_ends` table (one row, or one per channel).
        channel_dim: The channel dimension of ``ends``' rows, or ``None``.
        steps: Number of levels minus one.
        symmetric: Round in ``max|x| * [-1, 1]`` (``maintain_zero``).
        output_range: ``(lo, hi)`` of the output, or ``None``.
        zero_level: Level pinned to zero with a given output range, if any.
        fallback_level: Level of finite values where the input range has zero width.
        stochastic: Stochastic instead of nearest rounding.
        generator: Source of the random key, on ``value``'s device.

    Returns:
        The rounded tensor, or ``None``.
    """
    if (
        not _covered(value)
        or (value.requires_grad and torch.is_grad_enabled())
        or not _load_triton()
    ):
        return None
    channels, inner = 1, 1
    if channel_dim is not None:
        channels, inner = value.shape[channel_dim], math.prod(value.shape[channel_dim + 1 :])
    n, quarter = value.numel(), _ROUND_BLOCK // 4
    columns, programs = 1, _triton.cdiv(n, _ROUND_BLOCK)
    if channels == 1:
        layout = 0
    elif inner == 1 and channels % quarter == 0 and n + 4 * channels < 2**31:
        layout, columns = 3, channels // quarter
        programs = columns * _triton.cdiv(n // channels, 4)
    else:
        layout = 2 if inner % quarter == 0 else 1
    row_magic, row_shift = _magic_divisor(columns if layout == 3 else inner)
    channel_magic, channel_shift = _magic_divisor(channels)
    if output_range is None:
        out_lo = out_hi = out_quantum = 0.0
        zero = symmetric and steps % 2 == 0
    else:
        out_lo, out_hi = output_range
        out_quantum = (out_hi - out_lo) / steps
        zero = zero_level is not None
    on_cuda = value.device.type == "cuda"
    reciprocal = _float32_reciprocal(steps) if on_cuda else 0.0
    key = _key(value, generator) if stochastic else value
    out = torch.empty_like(value)
    _ranged_kernel_jit[(programs,)](
        value,
        out,
        key,
        ends,
        float(steps),
        reciprocal,
        out_lo,
        out_hi,
        out_quantum,
        -1.0 if zero_level is None else zero_level,
        fallback_level,
        n,
        channels,
        columns,
        row_magic,
        row_shift,
        channel_magic,
        channel_shift,
        SYMMETRIC=symmetric,
        DEFAULT_OUTPUT=output_range is None,
        ZERO=zero,
        STEPS_RECIPROCAL=on_cuda,
        STOCHASTIC=stochastic,
        LAYOUT=layout,
        BLOCK=_ROUND_BLOCK,
        num_warps=_ROUND_WARPS,
        enable_fp_fusion=False,
    )
    return out
