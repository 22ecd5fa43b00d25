"""Fused rounding on CUDA: one Triton kernel per call, and the data range without a host wait.

:func:`fused_round` runs stochastic or deterministic rounding as one Triton kernel (when
Triton is installed): one read, one write. Its noise comes from Philox, keyed by a seed
drawn on the device from the caller's generator, and :func:`finite_range` finds the data
range in one pass, so nothing waits for the host. Both return ``None`` for anything they
do not cover (a CPU tensor, no Triton, fast paths off), and the caller falls back to the
plain chain of :mod:`transform_core.quantise`.

Example:
    >>> fused_round(torch.ones(4), in_lo=-1.0, in_quantum=1.0, out_lo=-1.0, out_hi=1.0,
    ...             out_quantum=1.0, top=2.0, stochastic=False) is None  # CPU: not covered
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from transform_core.kernels import Bound, fast_paths_enabled

# Triton and its language module are imported on first use: importing them costs a good
# part of a second, and CPU-only installs do not have them.
tl: Any = None
_triton: Any = None
_round_kernel_jit: Any = None
_param_jit: Any = None
_minmax_jit: Any = None
_TRITON_MISSING = False

_GPU_BLOCK = 2048
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


def _round_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    out_ptr,
    seed_ptr,
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
    # Each program takes BLOCK elements as four quarters; one Philox call gives the four
    # quarters' random words at once (it makes four 32-bit words per counter).
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK // 4)
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
        r0, r1, r2, r3 = tl.randint4x(seed, pid * (BLOCK // 4) + lane)
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
        if STOCHASTIC:
            if k == 0:
                bits = r0
            elif k == 1:
                bits = r1
            elif k == 2:
                bits = r2
            else:
                bits = r3
            # 24 random bits, as torch.rand's float32: u in [0, 1 - 2**-24].
            y = tl.floor(y + (bits >> 8).to(tl.float32) * 5.9604644775390625e-08)
        else:
            # Round half to even: adding and removing 2**23 leaves the integer nearest y, ties
            # to even, for |y| < 2**23; larger floats are integers already. y * 0 restores the
            # sign of a zero result (rint(-0.3) is -0.0).
            big = tl.where(y < 0.0, -8388608.0, 8388608.0)
            r = (y + big) - big
            r = tl.where(r == 0.0, y * 0.0, r)
            y = tl.where(tl.abs(y) < 8388608.0, r, y)
        # clamp(0, top) that keeps NaN, as torch.clamp does.
        y = tl.where(y < 0.0, 0.0, y)
        y = tl.where(y > top, top, y)
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


def _finite_minmax_kernel(x_ptr, part_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    # Each program writes the min and max of its block's finite values; a block without
    # any writes (+max, -max), which the final reduction ignores.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    finite = mask & ((x - x) == 0.0)
    lo = tl.min(tl.where(finite, x, 3.4028234663852886e38), axis=0)
    hi = tl.max(tl.where(finite, x, -3.4028234663852886e38), axis=0)
    tl.store(part_ptr + 2 * pid, lo)
    tl.store(part_ptr + 2 * pid + 1, hi)


def _load_triton() -> bool:
    """Import Triton and build the kernels once; ``False`` if Triton is not installed."""
    global tl, _triton, _round_kernel_jit, _param_jit, _minmax_jit, _TRITON_MISSING
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
    _minmax_jit = triton.jit(_finite_minmax_kernel)
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
        generator: Source of the seed, on ``value``'s device.

    Returns:
        The rounded tensor, or ``None``.
    """
    if (
        value.device.type != "cuda"
        or value.dtype != torch.float32
        or not value.is_contiguous()
        or value.numel() == 0
        or value.numel() >= 2**31 - 2 * _GPU_BLOCK
        or (value.requires_grad and torch.is_grad_enabled())
        or not fast_paths_enabled()
    ):
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
        # As torch computes it on the host: 1.0f / float(b), in float32.
        one = torch.ones((), dtype=torch.float32)
        args[3] = float(one / torch.tensor(float(args[3]), dtype=torch.float32))
    if stochastic:
        # A seed drawn on the device from the caller's generator: reproducible from it, and
        # no host round trip.
        seed = torch.empty(1, dtype=torch.int64, device=value.device).random_(generator=generator)
    else:
        seed = value
    out = torch.empty_like(value)
    return _launch_round(
        value, out, seed, args, kinds, top, channels, inner, stochastic, reciprocal
    )


def _launch_round(
    value: Tensor,
    out: Tensor,
    seed: Tensor,
    args: list[Tensor | float],
    kinds: list[int],
    top: float,
    channels: int,
    inner: int,
    stochastic: bool,
    reciprocal: bool,
) -> Tensor:
    n = value.numel()
    grid = (_triton.cdiv(n, _GPU_BLOCK),)
    lo, iq, oq, olo, ohi, zl, dg, fb = kinds
    _round_kernel_jit[grid](
        value,
        out,
        seed,
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
        BLOCK=_GPU_BLOCK,
        num_warps=8,
        # Keep y * quantum + lo two roundings, as the chain computes it, not one fma.
        enable_fp_fusion=False,
    )
    return out


def finite_range(value: Tensor) -> tuple[Tensor, Tensor] | None:
    """Minimum and maximum of the finite values, in one pass on CUDA, or ``None``.

    ``aminmax`` followed by a check for non-finite values waits for the device to answer;
    this reads the data once and never waits. A tensor without finite values gets
    ``[0, 0]``. Runs where :func:`fused_round` does (contiguous float32 CUDA tensors, with
    Triton and fast paths on); ``None`` elsewhere.

    Args:
        value: The data.

    Returns:
        ``(lo, hi)`` as 0-dim tensors on ``value``'s device, or ``None``.
    """
    if (
        value.device.type != "cuda"
        or value.dtype != torch.float32
        or not value.is_contiguous()
        or value.numel() == 0
        or value.numel() >= 2**31 - 2 * _GPU_BLOCK
        or not fast_paths_enabled()
        or not _load_triton()
    ):
        return None
    return _finite_range(value)


def _finite_range(value: Tensor) -> tuple[Tensor, Tensor]:
    n = value.numel()
    programs = _triton.cdiv(n, _GPU_BLOCK)
    partial = torch.empty(programs, 2, dtype=value.dtype, device=value.device)
    _minmax_jit[(programs,)](value, partial, n, BLOCK=_GPU_BLOCK, num_warps=8)
    lo, hi = partial[:, 0].amin(), partial[:, 1].amax()
    empty = lo > hi
    zero = torch.zeros((), dtype=value.dtype, device=value.device)
    return torch.where(empty, zero, lo), torch.where(empty, zero, hi)
