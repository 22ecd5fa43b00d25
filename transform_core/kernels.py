"""Fast execution of the element-wise transforms in :mod:`transform_core.quantise`.

The transforms are memory bound: each reads a tensor and writes one of the same size, with
a handful of arithmetic operations per element in between. Written as a chain of tensor
operations (subtract, divide, round, clamp, a few masks, multiply, add, and a buffer of
random numbers), every step reads and writes the whole tensor, and most allocate a new
one. On CPU a fresh buffer of many megabytes costs more than the arithmetic on it: the
operating system maps each page on first touch. A chain of ten steps then costs several
times a plain copy.

Three remedies live here, and one for CUDA beside it:

- :func:`map_blocks` runs a chain block by block (:data:`BLOCK` elements at a time) and
  writes each block's result into one output tensor. The blocks of input, temporaries
  and output stay in cache from the first step to the last, the temporaries are small
  enough for the allocator to recycle, and the only large allocation is the result. The
  chain itself is unchanged, so results are bit-for-bit those of the whole-tensor chain.
- :class:`LevelMap` pins the top and zero levels with vectorised operations (a clamp, an
  exact gap added through a float mask, ``hardshrink``) where it can prove them exact;
  boolean masks and ``masked_fill`` are not vectorised on CPU and cost more than the
  rest of a rounding. :func:`abs_max` finds ``max|x|`` without an ``abs()`` copy.
- :func:`add_uniform_noise_`, :func:`drop_mask` and :func:`zero_dropped` draw random
  numbers cheaply on CPU. The generator's Mersenne Twister costs about the same per draw
  whether the draw becomes one float or 64 random bits, so one 64-bit draw here gives
  four 16-bit noise values ``(k + 0.5) / 2**16`` (rounding up with probability within
  ``2**-17`` of the exact fraction) or two 32-bit dropout thresholds (drop probability
  exact to ``2**-32``). Streams are reproducible from the generator's state.
- On CUDA, :mod:`transform_core.cuda_kernels` runs the rounding as one Triton kernel
  and finds the data range in one pass.

Tensors below :data:`SMALL` elements take the plain chains: there the fast paths' fixed
cost per call outweighs what they save. ``torch.compile`` would fuse each chain into one
pass on CPU too, but it costs seconds per process before its first call (6 s with a warm
cache, 20 s cold, on two cores), more than it saves when a checkpoint is quantised once.

:func:`fast_paths` turns all of this off for a block of code, which is how the benchmarks
compare both sides in one run.

Example:
    >>> x = torch.linspace(-1.0, 1.0, 5)
    >>> map_blocks(lambda block, out: torch.mul(block, 2, out=out), x)
    tensor([-2., -1.,  0.,  1.,  2.])
    >>> g = torch.Generator().manual_seed(0)
    >>> noisy = add_uniform_noise_(torch.zeros(1000), g)
    >>> bool(((noisy > 0) & (noisy < 1)).all())
    True
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "SMALL",
    "LevelMap",
    "abs_max",
    "add_uniform_noise_",
    "drop_mask",
    "fast_paths",
    "fast_paths_enabled",
    "map_blocks",
    "zero_dropped",
]

Bound = float | Tensor

#: Elements per block on CPU. A block of float32 input, output and temporaries fits the
#: L2 caches of two cores, and Python's per-operation overhead stays a few percent.
BLOCK = 1 << 17

#: Below this many elements the plain chains run: there the fast paths' fixed cost per
#: call (a few more small operations) would exceed what they save.
SMALL = 1 << 15

_state = threading.local()


def fast_paths_enabled() -> bool:
    """Whether the fast paths are on in this thread (they are unless :func:`fast_paths` says)."""
    return bool(getattr(_state, "enabled", True))


@contextlib.contextmanager
def fast_paths(enabled: bool = True) -> Iterator[None]:
    """Turn the fast paths on or off inside a ``with`` block, in this thread.

    With them off, every transform runs its plain whole-tensor chain of tensor operations
    and draws its random numbers with ``torch.rand``: slower, and the reference that the
    fast paths are checked and measured against.

    Args:
        enabled: ``False`` to run the plain chains.

    Example:
        >>> with fast_paths(False):
        ...     fast_paths_enabled()
        False
        >>> fast_paths_enabled()
        True
    """
    before = fast_paths_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = before


# --------------------------------------------------------------------------------------
# Block-wise execution on CPU


def _row_blocks(value: Tensor, params: Sequence[object]) -> Tensor | None:
    """A view of ``value`` whose leading dimension can be cut into blocks, or ``None``.

    Parameters of one element broadcast to any block, so the value is flattened. Larger
    ones (a per-channel range, kept with ``keepdim``) must have size 1 in dimension 0; the
    value is then cut into groups of whole rows.
    """
    varying = [p for p in params if isinstance(p, Tensor) and p.numel() > 1]
    if not varying:
        return value.reshape(-1)
    if value.dim() < 2 or value.shape[0] == 1:
        return None
    if all(p.dim() == value.dim() and p.shape[0] == 1 for p in varying):
        return value
    return None


def map_blocks(
    fn: Callable[[Tensor, Tensor | None], Tensor],
    value: Tensor,
    params: Sequence[object] = (),
) -> Tensor:
    """Compute ``fn(value, None)`` block by block on CPU, for an element-wise ``fn``.

    ``fn(block, out)`` computes the function of ``block``. ``out`` is the matching block of
    the result (``value``'s dtype), or ``None`` when the value is not cut: ``fn`` may write
    into it and return it, which saves a copy; any other tensor it returns is copied
    there. ``fn`` must act on each element independently (broadcasting against
    ``params``), keep the shape, and not need a gradient through it.

    Large contiguous CPU tensors are cut into blocks of about :data:`BLOCK` elements.
    Anything else (CUDA, small or non-contiguous tensors, a value that needs a gradient,
    fast paths off, a result whose dtype is not ``value``'s) gets ``fn(value, None)``.

    Args:
        fn: Element-wise function of a tensor, with an optional output block.
        value: The input.
        params: Tensors that ``fn`` broadcasts against ``value`` (per-channel ranges, say);
            they decide how the value may be cut. Anything else in it is ignored.

    Returns:
        ``fn(value, None)``, bit-for-bit.

    Example:
        >>> lo = torch.tensor([[0.0, 10.0]])
        >>> map_blocks(lambda v, out: torch.sub(v, lo, out=out), torch.ones(3, 2), [lo])
        tensor([[ 1., -9.],
                [ 1., -9.],
                [ 1., -9.]])
    """
    if (
        value.device.type != "cpu"
        or value.numel() <= BLOCK
        or not value.is_contiguous()
        or (value.requires_grad and torch.is_grad_enabled())
        or not fast_paths_enabled()
    ):
        return fn(value, None)
    rows = _row_blocks(value, params)
    if rows is None:
        return fn(value, None)
    per_row = rows[0].numel() if rows.dim() > 1 else 1
    step = max(1, BLOCK // per_row)
    out = torch.empty_like(value)
    out_rows = out.view(rows.shape)
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        target = out_rows[start : start + step]
        result = fn(block, target)
        if result is target or (
            result.data_ptr() == target.data_ptr() and result.shape == target.shape
        ):
            continue
        if result.shape != block.shape:
            raise ValueError(
                f"map_blocks needs an element-wise function: a block of shape "
                f"{tuple(block.shape)} gave {tuple(result.shape)}"
            )
        if result.dtype != value.dtype and start == 0:
            # The whole chain would promote; blocks would have to cast.
            return fn(value, None)
        target.copy_(result)
    return out


# --------------------------------------------------------------------------------------
# Random numbers


def add_uniform_noise_(levels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Add uniform noise on ``(0, 1)`` to ``levels`` in place, for stochastic rounding.

    ``floor(levels + noise)`` then rounds up with probability (close to) the fractional
    part. On CPU the noise is ``(k + 0.5) / 2**16`` with ``k`` uniform on ``[0, 2**16)``,
    four values from each 64-bit draw of ``generator``: the probability of rounding up is
    within ``2**-17`` of the exact fraction, far below a level's resolution. Elsewhere (on
    other devices, below :data:`SMALL` elements, fast paths off) it is ``torch.rand``
    noise in ``levels``'s dtype.

    Args:
        levels: Level indices (floating point); modified in place.
        generator: Source of the random bits, on ``levels``'s device.

    Returns:
        ``levels``.
    """
    if levels.device.type != "cpu" or not fast_paths_enabled() or levels.numel() < SMALL:
        noise = torch.rand(
            levels.shape, generator=generator, device=levels.device, dtype=levels.dtype
        )
        return levels.add_(noise)
    n = levels.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64)
    # The full 64-bit range takes one 64-bit draw per word.
    words.random_(-(2**63), None, generator=generator)
    bits = words.view(torch.int16)[:n].view(levels.shape)
    # k + 32768.5 and its scaling by 2**-16 are exact in float32 and float64; half
    # precision cannot hold the 17 significant bits, so its noise is made in float32.
    dtype = levels.dtype if levels.dtype in (torch.float32, torch.float64) else torch.float32
    # alpha * noise is exact (a power of two), so levels + u is rounded once.
    return levels.add_(bits.to(dtype).add_(32768.5), alpha=2.0**-16)


def drop_mask(
    shape: torch.Size | Sequence[int],
    drop_prob: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A boolean mask that is ``True`` (drop) with probability ``drop_prob`` per element.

    On CPU each 64-bit draw of ``generator`` makes two 32-bit thresholds, so the drop
    probability is exact to ``2**-32``. Elsewhere (on other devices, below :data:`SMALL`
    elements, fast paths off) it is ``torch.rand(shape) < drop_prob``.

    Args:
        shape: Shape of the mask.
        drop_prob: Probability of ``True``, in ``[0, 1]``.
        device: Device of the mask.
        generator: Source of the random bits, on that device.

    Returns:
        A ``torch.bool`` tensor.

    Example:
        >>> drop_mask((4,), 0.0)
        tensor([False, False, False, False])
        >>> drop_mask((4,), 1.0)
        tensor([True, True, True, True])
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = math.prod(shape)
    if device.type != "cpu" or not fast_paths_enabled() or n < SMALL:
        return torch.rand(shape, generator=generator, device=device) < drop_prob
    words = torch.empty((n + 1) // 2, dtype=torch.int64)
    words.random_(-(2**63), None, generator=generator)
    bits = words.view(torch.int32)[:n].view(shape)
    # A signed 32-bit k is below t - 2**31 with probability t / 2**32, t = p * 2**32.
    threshold = round(drop_prob * 2.0**32) - 2**31
    if threshold > 2**31 - 1:
        return torch.ones(shape, dtype=torch.bool)
    return bits < threshold


_SAME_SIZE_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def zero_dropped(
    value: Tensor,
    drop_prob: float,
    *,
    generator: torch.Generator | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``value.masked_fill(drop_mask(value.shape, drop_prob), 0.0)``: dropout without rescaling.

    Dropped values become ``+0.0``, infinities and ``NaN`` included; kept values are
    unchanged, bit for bit. On CPU (no gradient needed) the mask is made and applied as
    integers: ``bits & -(random >= threshold)``, three vectorised operations where
    boolean masks and ``masked_fill`` are not vectorised. The random stream and the
    result are those of :func:`drop_mask` and ``masked_fill``.

    Args:
        value: Floating-point values.
        drop_prob: Probability of dropping each value, in ``[0, 1]``.
        generator: Source of the random bits, on ``value``'s device.
        out: Where to write the result on the fast path (shaped and typed like ``value``).

    Returns:
        A new tensor, or ``out``.

    Example:
        >>> zero_dropped(torch.tensor([1.0, float("nan")]), 1.0)
        tensor([0., 0.])
    """
    int_dtype = _SAME_SIZE_INT.get(value.dtype)
    if (
        int_dtype is None
        or value.device.type != "cpu"
        or (value.requires_grad and torch.is_grad_enabled())
        or not value.is_contiguous()
        or not fast_paths_enabled()
        or value.numel() < SMALL
    ):
        drop = drop_mask(value.shape, drop_prob, device=value.device, generator=generator)
        return value.masked_fill(drop, 0.0)
    n = value.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int64)
    words.random_(-(2**63), None, generator=generator)
    bits = words.view(torch.int32)[:n].view(value.shape)
    threshold = round(drop_prob * 2.0**32) - 2**31
    if out is None:
        out = torch.empty_like(value)
    if threshold > 2**31 - 1:
        return out.zero_()
    # keep: 1 where bits >= threshold (the complement of drop_mask), then -1: all bits set.
    keep = torch.ge(bits, threshold, out=torch.empty(value.shape, dtype=int_dtype)).neg_()
    torch.bitwise_and(value.view(int_dtype), keep, out=out.view(int_dtype))
    return out


# --------------------------------------------------------------------------------------
# Ranges


def abs_max(value: Tensor, dims: tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """``value.abs().amax(dims)`` without the temporary ``abs()`` tensor.

    Over all elements, one ``aminmax`` pass reads the data once; over some dimensions, the
    minimum and maximum are reduced separately. ``NaN`` propagates, as with ``amax``.

    Args:
        value: A non-empty tensor.
        dims: Dimensions to reduce; ``None`` for all.
        keepdim: Keep reduced dimensions with size 1.

    Returns:
        The largest magnitude, exactly ``value.abs().amax(dims, keepdim)``.

    Example:
        >>> abs_max(torch.tensor([[-3.0, 1.0], [2.0, -0.5]]), (0,))
        tensor([3., 1.])
    """
    if not fast_paths_enabled() or value.numel() < SMALL:
        return value.abs().amax(dim=dims if dims is not None else (), keepdim=keepdim)
    with torch.no_grad():
        if dims is None or len(dims) == value.dim():
            lo, hi = torch.aminmax(value)
            if keepdim:
                lo, hi = lo.reshape([1] * value.dim()), hi.reshape([1] * value.dim())
        else:
            # Separate reductions: aminmax over a dimension is several times slower on CPU.
            lo, hi = value.amin(dim=dims, keepdim=keepdim), value.amax(dim=dims, keepdim=keepdim)
        # max(-lo, hi) is max|x|: -lo is exact, and NaN in either propagates.
        return torch.maximum(lo.neg_(), hi)


# --------------------------------------------------------------------------------------
# Level indices to output values


def _identical(a: float, b: float) -> bool:
    # Equal with the same sign: masked_fill with 0.0 gives +0.0, never -0.0.
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _scalar(p: object) -> bool:
    return isinstance(p, (int, float)) or (isinstance(p, Tensor) and p.numel() == 1)


class LevelMap:
    """Map level indices to output values, with the top level and the zero level exact.

    ``apply_(levels)`` computes ``levels * quantum + lo`` in place, then sets level ``top``
    to exactly ``hi`` and level ``zero_level`` (if any) to exactly ``0``: the multiply-add
    alone can miss either by a rounding error.

    The plain way, comparing every level with ``top`` and ``zero_level`` and filling with
    boolean masks, is the slowest part of a rounding transform on CPU: masks and masked
    fills are not vectorised there. For scalar parameters on CPU this checks, once, what
    the multiply-add gives at the levels next to those two, and picks a vectorised
    equivalent that gives the same values for every level:

    - top: nothing (``top * quantum + lo == hi`` already), a ``clamp`` to ``hi`` (it
      overshoots, and only the top level does), or adding the exact gap ``hi - v_top`` at
      the top level through a float ``0/1`` mask (it undershoots);
    - zero: nothing (already ``0``), or ``hardshrink`` by a threshold that only the zero
      level's value is within.

    Anything else keeps the masks. ``NaN`` levels stay ``NaN`` either way.

    Args:
        quantum: Output width of one level.
        lo: Output value of level 0 before pinning.
        hi: Exact output value of level ``top``.
        top: Index of the top level.
        zero_level: Index of the level that must be exactly zero, or ``None``; a tensor
            holding ``-1`` means none.
        dtype: dtype of the levels that will be mapped.
        device: Their device.

    Example:
        >>> m = LevelMap(0.1, -1.0, 1.0, 20.0, 10.0, torch.float32, torch.device("cpu"))
        >>> m.apply_(torch.tensor([0.0, 10.0, 20.0]))
        tensor([-1.,  0.,  1.])
    """

    def __init__(
        self,
        quantum: Bound,
        lo: Bound,
        hi: Bound,
        top: float,
        zero_level: Bound | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.quantum, self.lo, self.hi, self.top, self.zero_level = quantum, lo, hi, top, zero_level
        self.dtype = dtype
        self.top_fix, self.zero_fix = "mask", "mask"
        self.gap = self.threshold = self.hi_value = 0.0
        scalars = all(_scalar(p) for p in (quantum, lo, hi)) and (
            zero_level is None or _scalar(zero_level)
        )
        # Chosen on the first large tensor: the choice costs a few small operations.
        self._eligible = device.type == "cpu" and scalars
        self._chosen = False

    def _choose(self) -> None:
        # Reading CPU scalars costs nothing; on CUDA it would wait for the device.
        z = None if self.zero_level is None else float(torch.as_tensor(self.zero_level))
        has_zero = z is not None and 0 <= z <= self.top and z == int(z)
        probes = [self.top, self.top - 1] + ([z - 1, z, z + 1] if has_zero and z else [])
        with torch.no_grad():
            # The multiply-add exactly as apply_ runs it, at the levels that matter.
            values = (torch.tensor(probes, dtype=self.dtype) * self.quantum + self.lo).tolist()
            hi = (
                self.hi.to(self.dtype)
                if isinstance(self.hi, Tensor)
                else torch.tensor(float(self.hi), dtype=self.dtype)
            )
            self.hi_value = float(hi)
            v_top, v_below = values[0], values[1]
            gap = float(hi - values[0])
            if _identical(v_top, self.hi_value):
                self.top_fix = "none"
            elif v_top > self.hi_value > v_below:
                self.top_fix = "clamp"
            elif (
                v_below < v_top < self.hi_value
                and float(torch.tensor(v_top, dtype=self.dtype) + gap) == self.hi_value
            ):
                self.top_fix, self.gap = "add", gap
            if not has_zero:
                self.zero_fix = "none"
            elif len(values) == 5 and z is not None and 0 < z < self.top:
                below, v_zero, above = values[2:]
                threshold = float(torch.as_tensor(abs(above - below) / 4, dtype=self.dtype))
                if _identical(v_zero, 0.0):
                    self.zero_fix = "none"
                elif abs(v_zero) <= threshold < min(abs(below), abs(above)):
                    self.zero_fix, self.threshold = "shrink", threshold

    def apply_(self, levels: Tensor) -> Tensor:
        """Map ``levels`` (clamped to ``[0, top]``, or ``NaN``) to output values in place.

        Args:
            levels: Level indices of dtype ``self.dtype``; overwritten.

        Returns:
            The output values (``levels`` itself, or a new tensor after ``hardshrink``).
        """
        large = levels.numel() >= SMALL
        if large and self._eligible and not self._chosen and fast_paths_enabled():
            self._choose()
            self._chosen = True
        if not large or self.top_fix == "mask" or self.zero_fix == "mask":
            at_top = levels == self.top
            at_zero = None if self.zero_level is None else levels == self.zero_level
            out = levels.mul_(self.quantum).add_(self.lo)
            if isinstance(self.hi, Tensor) and self.hi.dim() > 0:
                out = torch.where(at_top, self.hi, out)  # one top per channel
            else:
                out.masked_fill_(at_top, self.hi)
            if at_zero is not None:
                out.masked_fill_(at_zero, 0.0)
            return out
        bump = (
            torch.eq(levels, self.top, out=torch.empty_like(levels))
            if self.top_fix == "add"
            else None
        )
        out = levels.mul_(self.quantum).add_(self.lo)
        if self.top_fix == "clamp":
            out.clamp_(max=self.hi_value)
        elif bump is not None:
            # 0 * gap adds +0.0, which changes nothing but a -0.0 (never an output here).
            out.add_(bump, alpha=self.gap)
        if self.zero_fix == "shrink":
            out = torch.nn.functional.hardshrink(out, self.threshold)
        return out
