"""Rounding, quantisation and dropout transforms: pure tensor functions.

Every function here takes a tensor and returns a new tensor of the same shape; none has
state, touches a module or does I/O. Randomness comes in through an optional keyword-only
``generator`` (a :class:`torch.Generator` on the tensor's device), so results can be
reproduced from a seed.

Gradients are straight-through: rounding is treated as the identity in the backward pass,
and only the affine rescaling from the input to the output space scales the gradient
(``output_quantum / input_quantum``, which is 1 when the output range is the input range).
:func:`dropout` passes the gradient through its mask.

Levels and ranges follow the reference API:

- ``num_levels`` equally spaced levels span the output range.
- The input range defaults to the data's range, or to ``max|x| * [-1, 1]`` when
  ``maintain_zero`` is true. The output range defaults to the input range.
- An explicit ``input_range`` or ``output_range`` is used as given.

Where the reference misbehaves, these functions define the result instead:

- Ranges are computed over finite values only. ``NaN`` stays ``NaN`` where it was, and
  ``-inf``/``+inf`` map to the ends of the output range.
- Values outside an explicit input range saturate at the ends of the output range.
- A zero-width input range (an all-zero tensor, or a constant one with
  ``maintain_zero=False``) gives finite values: with the default output range the finite
  values are returned unchanged (zeros stay zeros, a constant stays itself); with an
  explicit output range they map to its level nearest zero (``maintain_zero``) or to its
  start.
- The top of the output range, and with ``maintain_zero`` a level meant to be zero, are
  exact, where ``min + k * quantum`` alone could miss them by a rounding error.
- Integer tensors are promoted to the default floating-point dtype.
"""

from __future__ import annotations

import decimal
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from transform_core import cuda_kernels, kernels

__all__ = [
    "class_calc_q_decay",
    "deterministic_channel_rounding",
    "deterministic_rounding",
    "dropout",
    "identity",
    "int_quant",
    "make_backward_passthrough",
    "stochastic_channel_rounding",
    "stochastic_rounding",
    "t_decay",
]

Range = Sequence[float] | Tensor
Bound = float | Tensor


# --------------------------------------------------------------------------------------
# Straight-through gradients


class _StraightThrough(torch.autograd.Function):
    """Forward computes ``compute(value)``; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(
        ctx: Any, value: Tensor, compute: Callable[[Tensor], Tensor], scale: Bound | None
    ) -> Tensor:
        ctx.scale = scale
        return compute(value)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        scale = ctx.scale
        grad = grad_output if scale is None else grad_output * scale
        return grad, None, None


def _straight_through(
    value: Tensor,
    compute: Callable[[Tensor], Tensor],
    scale: Bound | Callable[[], Bound | None] | None = None,
) -> Tensor:
    """Run ``compute`` without recording a graph, passing the gradient straight through.

    ``scale`` may be a function that gives it: it is called only when a gradient is needed.
    """
    if value.requires_grad and torch.is_grad_enabled():
        if callable(scale):
            scale = scale()
        out = _StraightThrough.apply(value, compute, scale)  # type: ignore[no-untyped-call]
        if out.shape != value.shape:
            raise ValueError(
                f"a straight-through function must keep the shape: got {tuple(value.shape)} "
                f"in and {tuple(out.shape)} out"
            )
        return out  # type: ignore[no-any-return]
    with torch.no_grad():
        return compute(value)


def make_backward_passthrough(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap ``function`` so that its forward pass is unchanged and its backward pass is the identity.

    The wrapped function takes the tensor to transform first; any further positional or
    keyword arguments are passed on unchanged and receive no gradient.

    Args:
        function: ``f(x, *args, **kwargs) -> y`` with ``y`` shaped like ``x``.

    Returns:
        A function computing ``f`` whose gradient with respect to ``x`` is passed through.

    Raises:
        ValueError: If ``f`` changes the shape of a tensor that needs a gradient.

    Example:
        >>> floor = make_backward_passthrough(torch.floor)
        >>> x = torch.tensor([0.4, 1.7], requires_grad=True)
        >>> floor(x).sum().backward()
        >>> x.grad
        tensor([1., 1.])
    """

    @functools.wraps(function)
    def passthrough(value: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return _straight_through(value, lambda v: function(v, *args, **kwargs))

    return passthrough


def identity(value: Tensor) -> Tensor:
    """Return ``value`` unchanged: the transform that does nothing.

    Example:
        >>> identity(torch.tensor([0.3]))
        tensor([0.3000])
    """
    return value


# --------------------------------------------------------------------------------------
# Argument checks and ranges


def _is_number(value: Any) -> bool:
    """A real number that is not a boolean: Python's, NumPy's scalars, and the like.

    Example:
        >>> import numpy as np
        >>> _is_number(np.float32(0.5)), _is_number(np.int64(3)), _is_number(True)
        (True, True, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_num_levels(num_levels: Any, name: str = "num_levels") -> int:
    whole = _is_number(num_levels) and (
        isinstance(num_levels, numbers.Integral)
        or (math.isfinite(num_levels) and float(num_levels).is_integer())
    )
    if not whole:
        raise ValueError(f"{name} must be an integer >= 2, got {num_levels!r}")
    levels = int(num_levels)
    if levels < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {levels}")
    return levels


def _check_levels_for(num_levels: Any, dtype: torch.dtype) -> int:
    """A number of levels whose top index, ``num_levels - 1``, is a value of ``dtype``.

    Example:
        >>> try:
        ...     _check_levels_for(2**20, torch.float16)
        ... except ValueError as err:
        ...     print(err)
        num_levels must be at most 65505 for float16 values (its largest is 65504), got 1048576
    """
    levels = _check_num_levels(num_levels)
    largest = torch.finfo(dtype).max
    if levels - 1 > largest:
        raise ValueError(
            f"num_levels must be at most {math.floor(largest) + 1} for "
            f"{str(dtype).removeprefix('torch.')} values (its largest is {largest:g}), got "
            f"{levels}"
        )
    return levels


def _check_bits(n_bits: Any, name: str, dtype: torch.dtype) -> int:
    """A bit depth whose integers, up to ``2**(n_bits-1) - 1``, are all values of ``dtype``.

    Checked before that power is computed: for an absurd depth it would never finish.
    Beyond the bound the largest integer itself is not a value of the dtype (in float16,
    ``2**15 - 1`` rounds to ``2**15``, outside int16).

    Example:
        >>> try:
        ...     _check_bits(13, "n_bits", torch.float16)
        ... except ValueError as err:
        ...     print(err)
        n_bits must be at most 12 for float16 values (float16 holds every integer only up to 2**11), got 13; convert the tensor to float32
    """
    bits = _check_num_levels(n_bits, name)
    # Every integer up to 2**(mantissa bits + 1) is a value of the dtype, and no further.
    exact = round(-math.log2(torch.finfo(dtype).eps)) + 1
    most = exact + 1
    if bits > most:
        dtype_name = str(dtype).removeprefix("torch.")
        wider = "float32" if torch.finfo(dtype).bits < 32 else "float64"
        fix = "" if dtype == torch.float64 else f"; convert the tensor to {wider}"
        raise ValueError(
            f"{name} must be at most {most} for {dtype_name} values ({dtype_name} holds every "
            f"integer only up to 2**{exact}), got {bits}{fix}"
        )
    return bits


def _check_range(
    bounds: Range | None, name: str, dtype: torch.dtype | None = None
) -> tuple[Bound, Bound] | None:
    """Validate a ``[min, max]`` pair; tensors are checked only when that needs no device sync.

    With ``dtype``, number bounds and the width between them must be values of it.

    Example:
        >>> try:
        ...     _check_range([-1e5, 1e5], "input_range", torch.float16)
        ... except ValueError as err:
        ...     print(err)
        input_range [-100000.0, 100000.0] is beyond float16 values (largest 65504); narrow it, or convert the tensor to float32
    """
    if bounds is None:
        return None
    if isinstance(bounds, Tensor):
        if bounds.numel() != 2:
            raise ValueError(f"{name} must be [min, max], got a tensor of {bounds.numel()} values")
        lo_t, hi_t = bounds.reshape(2)[0], bounds.reshape(2)[1]
        if bounds.device.type == "cpu" and not bool(torch.isfinite(bounds).all() and lo_t <= hi_t):
            raise ValueError(
                f"{name} must be finite [min, max] with min <= max, got {bounds.tolist()}"
            )
        return lo_t, hi_t
    if isinstance(bounds, (str, bytes)) or len(bounds) != 2:
        raise ValueError(f"{name} must be a pair [min, max], got {bounds!r}")
    lo, hi = bounds
    pair: list[Bound] = []
    for bound in (lo, hi):
        if isinstance(bound, Tensor):
            pair.append(bound)
            continue
        if not _is_number(bound):
            raise ValueError(f"{name} must hold two numbers, got {bounds!r}")
        if not math.isfinite(bound):
            raise ValueError(f"{name} must be finite, got {bounds!r}")
        pair.append(float(bound))
    if any(isinstance(b, Tensor) for b in pair):
        return pair[0], pair[1]
    low, high = float(pair[0]), float(pair[1])
    if low > high:
        raise ValueError(
            f"{name} is reversed: got [{lo}, {hi}]; give it as [min, max], e.g. [{hi}, {lo}]"
        )
    # The levels and the step between them are values of the tensor's dtype.
    if dtype is not None and max(-low, high, high - low) > torch.finfo(dtype).max:
        largest = torch.finfo(dtype).max
        wider = "float32" if torch.finfo(dtype).bits < 32 else "float64"
        raise ValueError(
            f"{name} [{low}, {high}] is beyond {str(dtype).removeprefix('torch.')} values "
            f"(largest {largest:g}); narrow it, or convert the tensor to {wider}"
        )
    return pair[0], pair[1]


def _as_float(value: Tensor) -> Tensor:
    if value.is_complex():
        raise ValueError(
            f"complex values ({str(value.dtype).removeprefix('torch.')}) cannot be rounded; "
            "round the real and imaginary parts (torch.view_as_real) instead"
        )
    return value if value.is_floating_point() else value.to(torch.get_default_dtype())


_HALF_PEAK = torch.finfo(torch.float16).max / 2
"""Beyond this magnitude, a float16 range from the data ``[-peak, peak]`` is wider than
float16's largest value: its width, and the levels near its top, would overflow to inf."""


def _rounding_input(value: Tensor) -> tuple[Tensor, torch.dtype]:
    """``value`` as floating point to round, and the dtype of the result.

    A float16 tensor whose finite values reach beyond :data:`_HALF_PEAK` is rounded in
    float32 and the result returned as float16: in float16 its levels would be NaN.

    Example:
        >>> x, dtype = _rounding_input(torch.tensor([-40000.0, 40000.0]).half())
        >>> x.dtype, dtype
        (torch.float32, torch.float16)
    """
    value = _as_float(value)
    if value.dtype != torch.float16 or value.numel() == 0:
        return value, value.dtype
    # One pass without a temporary; only NaN or an infinity (which the data range leaves
    # out, and aminmax does not) sends the tensor to the pass over finite values.
    low, high = (float(end) for end in torch.aminmax(value.detach()))
    peak = max(-low, high)
    if not math.isfinite(peak) or math.isnan(low) or math.isnan(high):
        finite = value.detach().abs().nan_to_num_(nan=0.0, posinf=0.0)
        peak = float(finite.amax())
    if peak > _HALF_PEAK:
        return value.float(), torch.float16
    return value, value.dtype


def _finite_range(
    value: Tensor, maintain_zero: bool, reduce_dims: tuple[int, ...] | None = None
) -> tuple[Tensor, Tensor]:
    """The data's range over finite values, over all elements or over ``reduce_dims``.

    With ``maintain_zero`` the range is symmetric: ``max|x| * [-1, 1]``. A slice with no
    finite value gets the range ``[0, 0]``.
    """
    # The range is a constant of the transform: no gradient flows through it (and up to
    # torch 2.11 aminmax has no derivative, so recording it breaks the backward pass).
    value = value.detach()
    dims = reduce_dims if reduce_dims is not None else tuple(range(value.dim()))
    keep = reduce_dims is not None
    if value.numel() == 0:
        # Reductions refuse empty tensors; an empty slice has no finite value, so [0, 0].
        shape = [1 if d in dims else n for d, n in enumerate(value.shape)] if keep else []
        zero = value.new_zeros(shape)
        return zero, zero
    if reduce_dims is None and value.dim():
        # One pass over the finite values on CUDA, without waiting for the device.
        ends = cuda_kernels.data_ends(value)
        if ends is not None:
            lo, hi = cuda_kernels.range_from_ends(ends, maintain_zero)
            return lo.reshape(()), hi.reshape(())
    if reduce_dims is not None:
        # Per-channel ranges: one pass of the compiled kernel where it applies. Either way
        # "+ 0.0" makes a zero end +0.0, so that both paths agree on the sign of zeros.
        compiled = _compiled_for(value)
        if compiled is not None and len(set(dims)) == value.dim() - 1:
            channel = next(d for d in range(value.dim()) if d not in dims)
            lo, hi = compiled.channel_range(value, channel)
            if maintain_zero:
                peak = torch.maximum(lo.neg(), hi).add_(0.0)
                return -peak, peak
            return lo.add_(0.0), hi.add_(0.0)
    if maintain_zero:
        peak = kernels.abs_max(value, reduce_dims, keep) if value.dim() else value.abs()
        if not bool(torch.isfinite(peak).all()):
            masked = torch.where(torch.isfinite(value), value.abs(), 0.0)
            peak = masked.amax(dim=dims, keepdim=keep) if value.dim() else masked
        if keep:
            peak = peak + 0.0
        return -peak, peak
    if value.dim() == 0:
        lo = hi = value
    elif reduce_dims is None:
        lo, hi = torch.aminmax(value)
    else:
        lo, hi = value.amin(dim=dims, keepdim=True), value.amax(dim=dims, keepdim=True)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        finite = torch.isfinite(value)
        inf = torch.tensor(math.inf, dtype=value.dtype, device=value.device)
        lo = torch.where(finite, value, inf).amin(dim=dims, keepdim=keep)
        hi = torch.where(finite, value, -inf).amax(dim=dims, keepdim=keep)
        empty = ~torch.isfinite(lo)
        lo = torch.where(empty, 0.0, lo)
        hi = torch.where(empty, 0.0, hi)
    if keep:
        lo, hi = lo + 0.0, hi + 0.0
    return lo, hi


def _compiled_for(value: Tensor) -> Any:
    """The compiled CPU kernels if they take ``value`` (a large contiguous float32/64 CPU
    tensor, under ``2**32`` elements) and are loaded, else ``None``."""
    if (
        not kernels.large_cpu(value)
        or value.dtype not in (torch.float32, torch.float64)
        or not value.is_contiguous()
        or value.numel() >= 2**32  # the kernels count elements in 32 bits
    ):
        return None
    return kernels.compiled_kernels()


class _Plan:
    """Everything needed to map values to level indices and back, for one call."""

    def __init__(
        self,
        in_lo: Bound,
        in_hi: Bound,
        out_lo: Bound,
        out_hi: Bound,
        num_levels: int,
        default_output: bool,
        maintain_zero: bool,
    ) -> None:
        steps = num_levels - 1
        in_width = in_hi - in_lo
        out_width = out_hi - out_lo
        self.top = float(steps)
        self.out_lo = out_lo
        self.out_hi = out_hi
        self.out_quantum = out_width / steps
        degenerate: Tensor | bool
        safe_quantum: Bound
        if isinstance(in_width, Tensor):
            degenerate = in_width <= 0
            safe_quantum = torch.where(degenerate, torch.ones_like(in_width), in_width / steps)
        else:
            degenerate = in_width <= 0
            safe_quantum = 1.0 if degenerate else in_width / steps
        self.degenerate = degenerate
        self.in_lo = in_lo
        self.in_quantum = safe_quantum
        # The level a zero-width input maps to: the one nearest zero when zero is kept.
        self.fallback_level: Bound = 0.0
        if maintain_zero and not default_output:
            self.fallback_level = _nearest_level_to_zero(out_lo, self.out_quantum, steps)
        self.default_output = default_output
        # lo + k * quantum can miss zero by an ulp; with maintain_zero the level meant to be
        # zero is pinned to exactly zero (None: no level sits on zero).
        self.zero_level = (
            _zero_level(out_lo, out_hi, self.out_quantum, steps) if maintain_zero else None
        )
        self._level_map: kernels.LevelMap | None = None

    @property
    def scale(self) -> Bound | None:
        """d(output)/d(input) of the affine map, used as the straight-through gradient.

        ``None`` (the identity) when the output range is the input range, zero-width included.
        """
        if self.default_output:
            return None
        return self.out_quantum / self.in_quantum

    def levels(self, value: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.sub(value, self.in_lo, out=out).div_(self.in_quantum)

    def round(
        self, value: Tensor, *, stochastic: bool, generator: torch.Generator | None = None
    ) -> Tensor:
        """``finish(value, levels)`` with ``levels`` rounded stochastically or to nearest.

        One fused kernel on CUDA where it applies; elsewhere the plain chain, run block by
        block on large CPU tensors so that it makes one pass over memory (see
        :mod:`transform_core.kernels` and :mod:`transform_core.cuda_kernels`).
        """
        fused = cuda_kernels.fused_round(
            value,
            in_lo=self.in_lo,
            in_quantum=self.in_quantum,
            out_quantum=self.out_quantum,
            out_lo=self.out_lo,
            out_hi=self.out_hi,
            top=self.top,
            zero_level=self.zero_level,
            fallback=None if self.default_output else self.degenerate,
            fallback_level=self.fallback_level,
            stochastic=stochastic,
            generator=generator,
        )
        if fused is not None:
            return fused
        # Large CPU tensors take position-keyed random bits, one key per call, so that the
        # compiled kernel and the chain cut into blocks draw the same numbers.
        key = kernels.random_key(generator) if stochastic and kernels.large_cpu(value) else None
        compiled = _compiled_for(value)
        if compiled is not None:
            layout = self._channel_layout(value)
            if layout is not None:
                params, channel_dim = layout
                rounded: Tensor = compiled.round_levels(
                    value, params, channel_dim, self.top, stochastic, 0 if key is None else key
                )
                return rounded

        def chain(block: Tensor, out: Tensor | None, start: int) -> Tensor:
            levels = self.levels(block, out)
            if stochastic:
                levels = kernels.stochastic_floor_(levels, generator, key=key, start=start)
            else:
                levels = levels.round_()
            return self.finish(block, levels)

        # Per-channel tensors in the plan decide how the value can be cut into blocks.
        return kernels.map_blocks(chain, value, list(vars(self).values()))

    def _channel_layout(self, value: Tensor) -> tuple[Tensor, int | None] | None:
        """The plan as the compiled kernel's ``(6, channels)`` table, and the channel dim.

        ``None`` where the kernel does not apply: a zero-width input range with an explicit
        output range (rare; the chain handles it), or parameters that vary along more than
        one dimension (no plan made here does that).
        """
        if not self.default_output and (
            self.degenerate is True
            or (isinstance(self.degenerate, Tensor) and bool(self.degenerate.any()))
        ):
            return None
        zero_level = -1.0 if self.zero_level is None else self.zero_level
        columns = [self.in_lo, self.in_quantum, self.out_lo, self.out_quantum, self.out_hi]
        columns.append(zero_level)
        if all(not isinstance(c, Tensor) or c.numel() == 1 for c in columns):
            # Scalars (the common case, once per forward pass): skip the tensor operations.
            scalars = [float(c) for c in columns]
            return torch.tensor(scalars, dtype=value.dtype).view(6, 1), None
        tensors = [torch.as_tensor(c, dtype=value.dtype) for c in columns]
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))  # type: ignore[no-untyped-call]
        varying = [d for d, n in enumerate(shape) if n > 1]
        if len(varying) > 1 or len(shape) > value.dim():
            return None
        channel_dim = varying[0] + value.dim() - len(shape) if varying else None
        width = shape[varying[0]] if varying else 1
        table = torch.stack([t.expand(shape).reshape(-1) for t in tensors]).reshape(6, width)
        return table.contiguous(), channel_dim

    def finish(self, value: Tensor, levels: Tensor) -> Tensor:
        """Saturate level indices, map them to the output space, and handle edge cases."""
        levels = levels.clamp_(0.0, self.top)  # NaN stays NaN; +-inf saturate
        # A zero-width input range with an explicit output range: finite values go to the
        # fallback level, infinities keep their saturated ends. With the default output range
        # nothing is needed: every finite value sits at level 0, which is the value itself.
        if not self.default_output:
            if isinstance(self.degenerate, bool):
                if self.degenerate:
                    levels = torch.where(torch.isfinite(value), self.fallback_level, levels)
            elif bool(self.degenerate.any()):
                fallback = self.degenerate & torch.isfinite(value)
                levels = torch.where(fallback, self.fallback_level, levels)
        # lo + top * quantum can miss the top of the range by an ulp, either way; LevelMap
        # pins the top and zero levels, vectorised where it can prove that is exact.
        level_map = self._level_map
        if level_map is None or level_map.dtype != levels.dtype:
            level_map = self._level_map = kernels.LevelMap(
                self.out_quantum,
                self.out_lo,
                self.out_hi,
                self.top,
                self.zero_level,
                levels.dtype,
                levels.device,
            )
        return level_map.apply_(levels)


class _DataRangePlan:
    """A plan whose input range is the data's own, found in one pass of a kernel.

    The range is a table of ends (``[-min, max]`` of the finite values): on the GPU
    :func:`cuda_kernels.data_ends` writes it on the device, and the rounding kernel derives
    the rest of the plan from it, so that the transform is two kernels and never waits for
    the device; on the CPU the compiled kernels find it
    (:func:`~transform_core.cpu_kernels.finite_ends`) and make the plan's table without
    tensor operations. The same plan as tensors (:class:`_Plan`) is built only when
    something needs it: the straight-through gradient's scale, or a call that the kernels
    do not take.
    """

    def __init__(
        self,
        ends: Tensor,
        channel_dim: int | None,
        shape: torch.Size,
        output_range: tuple[float, float] | None,
        num_levels: int,
        maintain_zero: bool,
        compiled: Any = None,
    ) -> None:
        self.ends = ends
        self.compiled = compiled  # the compiled CPU kernels, where they found the ends
        self.channel_dim = channel_dim
        self.shape = shape
        self.output_range = output_range
        self.num_levels = num_levels
        self.maintain_zero = maintain_zero
        self._tensor_plan: _Plan | None = None

    @classmethod
    def from_data(
        cls,
        value: Tensor,
        channel_dim: int | None,
        output_range: tuple[Bound, Bound] | None,
        num_levels: int,
        maintain_zero: bool,
    ) -> _DataRangePlan | None:
        """The plan for ``value`` if the GPU or compiled CPU kernels take it, else ``None``.

        On the CPU only a range over the whole tensor (``channel_dim`` ``None``): channel
        ranges there take :func:`_finite_range`'s compiled pass.
        """
        if output_range is not None:
            lo, hi = output_range
            if isinstance(lo, Tensor) or isinstance(hi, Tensor):
                return None  # the kernel takes numbers as the output range
            output_range = (lo, hi)
        ends = cuda_kernels.data_ends(value, channel_dim)
        compiled = None
        if ends is None and channel_dim is None:
            compiled = _compiled_for(value)
            ends = None if compiled is None else compiled.finite_ends(value)
        if ends is None:
            return None
        return cls(
            ends, channel_dim, value.shape, output_range, num_levels, maintain_zero, compiled
        )

    @property
    def tensor_plan(self) -> _Plan:
        """The same plan as tensors, as :func:`_finite_range` would have made it."""
        if self._tensor_plan is None:
            lo, hi = cuda_kernels.range_from_ends(self.ends, self.maintain_zero)
            if self.channel_dim is None:
                lo, hi = lo.reshape(()), hi.reshape(())
            else:
                keep = [1] * len(self.shape)
                keep[self.channel_dim] = self.shape[self.channel_dim]
                lo, hi = lo.reshape(keep), hi.reshape(keep)
            out_lo, out_hi = self.output_range if self.output_range is not None else (lo, hi)
            self._tensor_plan = _Plan(
                lo,
                hi,
                out_lo,
                out_hi,
                self.num_levels,
                self.output_range is None,
                self.maintain_zero,
            )
        return self._tensor_plan

    @property
    def scale(self) -> Bound | None:
        """As :attr:`_Plan.scale`."""
        if self.output_range is None:
            return None
        return self.tensor_plan.scale

    def round(
        self, value: Tensor, *, stochastic: bool, generator: torch.Generator | None = None
    ) -> Tensor:
        """As :meth:`_Plan.round`, in one kernel where it applies."""
        steps = self.num_levels - 1
        zero_level: float | None = None
        fallback_level = 0.0
        if self.output_range is not None and self.maintain_zero:
            out_lo, out_hi = self.output_range
            quantum = (out_hi - out_lo) / steps
            zero = _zero_level(out_lo, out_hi, quantum, steps)
            zero_level = None if zero is None else float(zero)
            fallback_level = float(_nearest_level_to_zero(out_lo, quantum, steps))
        compiled = self.compiled
        if compiled is not None and compiled is _compiled_for(value):
            table = compiled.data_range_table(
                self.ends,
                steps=steps,
                symmetric=self.maintain_zero,
                output_range=self.output_range,
                zero_level=zero_level,
            )
            if table is not None:
                # The key as _Plan.round draws it, so that both give the same numbers.
                key = kernels.random_key(generator) if stochastic else 0
                cpu_rounded: Tensor = compiled.round_levels(
                    value, table, None, float(steps), stochastic, key
                )
                return cpu_rounded
        rounded = cuda_kernels.round_in_data_range(
            value,
            self.ends,
            channel_dim=self.channel_dim,
            steps=steps,
            symmetric=self.maintain_zero,
            output_range=self.output_range,
            zero_level=zero_level,
            fallback_level=fallback_level,
            stochastic=stochastic,
            generator=generator,
        )
        if rounded is not None:
            return rounded
        return self.tensor_plan.round(value, stochastic=stochastic, generator=generator)


def _zero_level(out_lo: Bound, out_hi: Bound, out_quantum: Bound, steps: int) -> Bound | None:
    """The level index meant to be zero, or ``None`` (``-1`` for tensor bounds) if none is.

    Python bounds are checked in double precision, far finer than any tensor dtype. Tensor
    bounds (the data's own range) are checked without a device sync, and only for the
    symmetric ranges that ``maintain_zero`` makes, whose middle level is zero.
    """
    if isinstance(out_lo, Tensor) or isinstance(out_hi, Tensor) or isinstance(out_quantum, Tensor):
        if steps % 2:
            return None
        symmetric = (torch.as_tensor(out_lo) == -torch.as_tensor(out_hi)) & (
            torch.as_tensor(out_hi) > 0
        )
        return torch.where(symmetric, steps / 2, -1.0)
    if out_quantum <= 0:
        return None
    level = round(-out_lo / out_quantum)
    if 0 <= level <= steps and abs(level * out_quantum + out_lo) <= 1e-12 * abs(out_lo):
        return float(level)
    return None


def _nearest_level_to_zero(out_lo: Bound, out_quantum: Bound, steps: int) -> Bound:
    if isinstance(out_lo, Tensor) or isinstance(out_quantum, Tensor):
        quantum = torch.as_tensor(out_quantum)
        level = torch.where(quantum > 0, torch.round(-out_lo / quantum), torch.zeros_like(quantum))
        return level.clamp(0, steps)
    if out_quantum <= 0:
        return 0.0
    return float(min(max(round(-out_lo / out_quantum), 0), steps))


def _with_range_gradients(result: Tensor, value: Tensor, plan: _Plan | _DataRangePlan) -> Tensor:
    """``result``, with the gradient it has with respect to range bounds that need one.

    Ranges given as tensors that require a gradient (a learned scale) receive the gradient
    of ``k * out_quantum + out_lo``, with ``k`` the level index and straight through the
    rounding of ``(x - in_lo) / in_quantum``, as in the original; ``value``'s own gradient
    is :func:`_straight_through`'s. The values are ``result``'s, unchanged.
    """
    if not isinstance(plan, _Plan) or not torch.is_grad_enabled():
        return result
    bounds = (plan.in_lo, plan.in_quantum, plan.out_lo, plan.out_quantum)
    if not any(isinstance(b, Tensor) and b.requires_grad for b in bounds):
        return result
    out_lo, out_quantum = plan.out_lo, plan.out_quantum
    with torch.no_grad():
        # The level index of each result, exact: results lie on out_lo + k * out_quantum.
        level = torch.sub(result, out_lo).div_(out_quantum).round_()
        # No inf or NaN in the expressions below: such elements get no gradient from them.
        on_level, finite_x = torch.isfinite(level), torch.isfinite(value)
        level = torch.where(on_level, level, 0.0)
        x = torch.where(finite_x, value, 0.0)
    u = (x - plan.in_lo) / plan.in_quantum  # differentiable in the input range only
    out_quantum_value = out_quantum.detach() if isinstance(out_quantum, Tensor) else out_quantum
    from_input = (u - u.detach()) * out_quantum_value
    from_output = level * out_quantum + out_lo
    from_output = from_output - from_output.detach()
    # Zero in value: the ranges' gradient in the backward pass, and nothing else.
    return result + (
        torch.where(finite_x & on_level, from_input, 0.0) + torch.where(on_level, from_output, 0.0)
    )


def _plan(
    value: Tensor,
    input_range: Range | None,
    output_range: Range | None,
    num_levels: Any,
    maintain_zero: bool,
    dtype: torch.dtype,
) -> _Plan | _DataRangePlan:
    """The level plan of a rounding; ranges are checked against ``dtype``, the result's."""
    levels = _check_levels_for(num_levels, dtype)
    given_in = _check_range(input_range, "input_range", dtype)
    given_out = _check_range(output_range, "output_range", dtype)
    if given_in is None:
        from_data = _DataRangePlan.from_data(value, None, given_out, levels, maintain_zero)
        if from_data is not None:
            return from_data
    in_lo, in_hi = given_in if given_in is not None else _finite_range(value, maintain_zero)
    out_lo, out_hi = given_out if given_out is not None else (in_lo, in_hi)
    return _Plan(in_lo, in_hi, out_lo, out_hi, levels, given_out is None, maintain_zero)


# --------------------------------------------------------------------------------------
# Rounding transforms


def stochastic_rounding(
    value: Tensor,
    input_range: Range | None = None,
    output_range: Range | None = None,
    num_levels: int = 256,
    maintain_zero: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Round each value stochastically to one of its two neighbouring levels.

    A value a fraction ``f`` of the way from level ``k`` to level ``k + 1`` rounds up with
    probability ``f`` and down with probability ``1 - f``, so the rounding is unbiased:
    the mean over many draws approaches the (rescaled) input.

    Args:
        value: Values to round.
        input_range: ``[min, max]`` of the input space; by default the data's range
            (``max|x| * [-1, 1]`` when ``maintain_zero``).
        output_range: ``[min, max]`` of the output space; by default the input range.
        num_levels: Number of equally spaced output levels (at least 2).
        maintain_zero: Make the default input range symmetric, so that zero stays zero
            when ``num_levels`` is odd.
        generator: Source of the random numbers, on ``value``'s device.

    Returns:
        A new floating-point tensor shaped like ``value``.

    Raises:
        ValueError: For ``num_levels < 2`` or non-integer, or a malformed or reversed range.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> stochastic_rounding(torch.tensor([-1., 0., 1.]), num_levels=3, generator=g)
        tensor([-1.,  0.,  1.])
    """
    value, dtype = _rounding_input(value)
    plan = _plan(value, input_range, output_range, num_levels, maintain_zero, dtype)

    def compute(x: Tensor) -> Tensor:
        return plan.round(x, stochastic=True, generator=generator)

    rounded = _straight_through(value, compute, lambda: plan.scale)
    return _with_range_gradients(rounded, value, plan).to(dtype)


def deterministic_rounding(
    value: Tensor,
    input_range: Range | None = None,
    output_range: Range | None = None,
    num_levels: int = 256,
    maintain_zero: bool = True,
) -> Tensor:
    """Round each value to its nearest level (ties to the even level index, as ``torch.round``).

    Args:
        value: Values to round.
        input_range: ``[min, max]`` of the input space; by default the data's range
            (``max|x| * [-1, 1]`` when ``maintain_zero``).
        output_range: ``[min, max]`` of the output space; by default the input range.
        num_levels: Number of equally spaced output levels (at least 2).
        maintain_zero: Make the default input range symmetric, so that zero stays zero
            when ``num_levels`` is odd.

    Returns:
        A new floating-point tensor shaped like ``value``.

    Raises:
        ValueError: For ``num_levels < 2`` or non-integer, or a malformed or reversed range.

    Example:
        >>> deterministic_rounding(torch.tensor([-1., -0.5, 0., 0.5, 1.]), num_levels=3)
        tensor([-1., -1.,  0.,  1.,  1.])
        >>> deterministic_rounding(torch.tensor([0.2, 0.7]), input_range=[0., 1.],
        ...                        output_range=[0., 10.], num_levels=11)
        tensor([2., 7.])
    """
    value, dtype = _rounding_input(value)
    plan = _plan(value, input_range, output_range, num_levels, maintain_zero, dtype)

    def compute(x: Tensor) -> Tensor:
        return plan.round(x, stochastic=False)

    rounded = _straight_through(value, compute, lambda: plan.scale)
    return _with_range_gradients(rounded, value, plan).to(dtype)


def stochastic_channel_rounding(
    value: Tensor,
    output_range: Range,
    num_levels: int = 256,
    maintain_zero: bool = True,
    *,
    dim: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Stochastic rounding with the input range computed for each channel separately.

    A channel is a slice along ``dim`` (by default dim 1, the columns of a matrix). Each
    channel's input range is its own data range (``max|x| * [-1, 1]`` when
    ``maintain_zero``); all channels map to the same ``output_range``.

    Args:
        value: A tensor of 2 or more dimensions.
        output_range: ``[min, max]`` of the output space.
        num_levels: Number of equally spaced output levels (at least 2).
        maintain_zero: Make each channel's input range symmetric. The output range should
            be symmetric too for zero to map to zero.
        dim: The channel dimension.
        generator: Source of the random numbers, on ``value``'s device.

    Returns:
        A new floating-point tensor shaped like ``value``.

    Raises:
        ValueError: For fewer than 2 dimensions, a bad ``dim``, ``num_levels`` or range.

    Example:
        >>> w = torch.tensor([[1.0, 10.0], [-1.0, -10.0]])
        >>> stochastic_channel_rounding(w, output_range=[-1, 1], num_levels=3)
        tensor([[ 1.,  1.],
                [-1., -1.]])
    """
    value, dtype = _rounding_input(value)
    if output_range is None:
        raise ValueError("output_range is required, as [min, max]")
    plan = _channel_plan(value, output_range, num_levels, maintain_zero, dim, "stochastic", dtype)

    def compute(x: Tensor) -> Tensor:
        return plan.round(x, stochastic=True, generator=generator)

    rounded = _straight_through(value, compute, lambda: plan.scale)
    return _with_range_gradients(rounded, value, plan).to(dtype)


def deterministic_channel_rounding(
    value: Tensor,
    output_range: Range | None = None,
    num_levels: int = 256,
    maintain_zero: bool = True,
    *,
    dim: int = 1,
) -> Tensor:
    """Round each value to its nearest level, with the input range computed per channel.

    The deterministic counterpart of :func:`stochastic_channel_rounding`: a channel is a
    slice along ``dim``, and each channel's input range is its own data range
    (``max|x| * [-1, 1]`` when ``maintain_zero``). Without an ``output_range`` each channel
    keeps its own range, so the values stay in the tensor's scale: per-channel (for example
    per-output-neuron, ``dim=0`` for a torch ``Linear`` weight) quantisation.

    Args:
        value: A tensor of 2 or more dimensions.
        output_range: ``[min, max]`` of the output space shared by all channels; by default
            each channel's own input range.
        num_levels: Number of equally spaced output levels (at least 2).
        maintain_zero: Make each channel's input range symmetric.
        dim: The channel dimension.

    Returns:
        A new floating-point tensor shaped like ``value``.

    Raises:
        ValueError: For fewer than 2 dimensions, a bad ``dim``, ``num_levels`` or range.

    Example:
        >>> w = torch.tensor([[1.0, 0.4], [-10.0, 6.0]])
        >>> deterministic_channel_rounding(w, num_levels=3, dim=0)
        tensor([[  1.,   0.],
                [-10.,  10.]])
    """
    value, dtype = _rounding_input(value)
    plan = _channel_plan(
        value, output_range, num_levels, maintain_zero, dim, "deterministic", dtype
    )

    def compute(x: Tensor) -> Tensor:
        return plan.round(x, stochastic=False)

    rounded = _straight_through(value, compute, lambda: plan.scale)
    return _with_range_gradients(rounded, value, plan).to(dtype)


def _channel_plan(
    value: Tensor,
    output_range: Range | None,
    num_levels: Any,
    maintain_zero: bool,
    dim: int,
    kind: str,
    dtype: torch.dtype,
) -> _Plan | _DataRangePlan:
    """The level plan of a per-channel rounding: one input range per slice along ``dim``;
    the output range is checked against ``dtype``, the result's."""
    if value.dim() < 2:
        raise ValueError(
            f"{kind}_channel_rounding needs a tensor of 2 or more dimensions, got shape "
            f"{tuple(value.shape)}; use {kind}_rounding for vectors"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or not -value.dim() <= dim < value.dim():
        raise ValueError(
            f"dim must be an integer in [{-value.dim()}, {value.dim() - 1}], got {dim!r}"
        )
    levels = _check_levels_for(num_levels, dtype)
    checked = _check_range(output_range, "output_range", dtype)
    channel = dim % value.dim()
    from_data = _DataRangePlan.from_data(value, channel, checked, levels, maintain_zero)
    if from_data is not None:
        return from_data
    others = tuple(d for d in range(value.dim()) if d != channel)
    in_lo, in_hi = _finite_range(value, maintain_zero, others)
    out_lo, out_hi = checked if checked is not None else (in_lo, in_hi)
    return _Plan(in_lo, in_hi, out_lo, out_hi, levels, checked is None, maintain_zero)


def int_quant(
    value: Tensor,
    maintain_zero: bool = True,
    map_to_max: bool = False,
    n_bits: int = 8,
    max_n_bits: int = 8,
) -> Tensor:
    """Scale values so that the largest magnitude becomes ``2**(n_bits-1) - 1``, then round.

    The result holds signed integers (as floats) in ``[-(2**(n_bits-1) - 1), 2**(n_bits-1) - 1]``.
    With ``map_to_max``, the largest magnitude becomes ``2**(max_n_bits-1) - 1`` instead
    (as in the reference, ``n_bits`` then has no effect). Without ``maintain_zero``, the
    data are first centred on the midpoint of their range, so that they use the whole
    integer range. An all-zero tensor stays zero. The gradient is the scale factor
    (straight through the rounding).

    Args:
        value: Values to quantise.
        maintain_zero: Keep zero at zero (no centring).
        map_to_max: Stretch the ``n_bits`` integers to the extremes of ``max_n_bits`` bits.
        n_bits: Bit depth that sets the largest integer, at least 2.
        max_n_bits: Bit depth used by ``map_to_max``, at least 2.

    Returns:
        A new floating-point tensor of integer values.

    Raises:
        ValueError: If ``n_bits`` or ``max_n_bits`` is not an integer >= 2, or is more
            bits than ``value``'s dtype holds every integer of (12 for float16, 9 for
            bfloat16, 25 for float32, 54 for float64).

    Example:
        >>> x = torch.tensor([-1., -0.5, -0.25, 0., 0.25, 0.5, 1.])
        >>> int_quant(x, n_bits=3)
        tensor([-3., -2., -1.,  0.,  1.,  2.,  3.])
        >>> int_quant(x, n_bits=3, map_to_max=True)
        tensor([-127.,  -64.,  -32.,    0.,   32.,   64.,  127.])
    """
    value = _as_float(value)
    bits = _check_bits(n_bits, "n_bits", value.dtype)
    max_bits = _check_bits(max_n_bits, "max_n_bits", value.dtype)
    # A float: torch would take a Python int as int64, too narrow beyond 63 bits.
    largest = float(2 ** (bits - 1) - 1)
    if value.numel() == 0:
        return value.clone()
    centre: Bound = 0.0
    # One pass for the range of the finite values. The largest |x - centre| follows from its
    # ends, exactly: x -> x - centre is monotonic in floating point.
    lo, hi = _finite_range(value, False)
    if not maintain_zero:
        centre = (lo + hi) / 2
    peak = torch.maximum(hi - centre, centre - lo)
    scale = torch.where(peak > 0, largest / peak, torch.ones_like(peak))
    if map_to_max:
        scale = scale * ((2 ** (max_bits - 1) - 1) / largest)
    limit = float(2 ** (max(bits, max_bits if map_to_max else bits) - 1) - 1)

    def compute(x: Tensor) -> Tensor:
        compiled = _compiled_for(x)
        if compiled is not None:
            quantised: Tensor = compiled.int_quant(x, float(centre), float(scale), limit)
            return quantised
        return kernels.map_blocks(
            lambda block, out, start: (
                torch.sub(block, centre, out=out).mul_(scale).round_().clamp_(-limit, limit)
            ),
            x,
        )

    return _straight_through(value, compute, scale)


def dropout(
    param: Tensor, dropout_prob: float = 0.5, *, generator: torch.Generator | None = None
) -> Tensor:
    """Set each value to zero with probability ``dropout_prob``; keep the rest unchanged.

    Unlike :func:`torch.nn.functional.dropout`, the kept values are not rescaled. The
    gradient is the mask: 1 where a value was kept, 0 where it was dropped.

    Args:
        param: Values to drop out.
        dropout_prob: Probability of zeroing each value, in ``[0, 1]``.
        generator: Source of the random numbers, on ``param``'s device.

    Returns:
        A new tensor shaped like ``param``.

    Raises:
        ValueError: If ``dropout_prob`` is not a number in ``[0, 1]``.

    Example:
        >>> dropout(torch.ones(4), dropout_prob=0.0)
        tensor([1., 1., 1., 1.])
        >>> dropout(torch.ones(4), dropout_prob=1.0)
        tensor([0., 0., 0., 0.])
    """
    if not _is_number(dropout_prob) or not 0.0 <= dropout_prob <= 1.0:
        raise ValueError(f"dropout_prob must be a number in [0, 1], got {dropout_prob!r}")
    dropout_prob = float(dropout_prob)  # a NumPy scalar computes in its own precision
    param = _as_float(param)

    # Zeroed (masked_fill) rather than multiplied by the mask: a dropped inf or NaN is zero
    # too, not NaN. Large CPU tensors: one key of position-keyed random bits, then one
    # compiled pass, or the chain block by block so that the masks stay in cache.
    if not kernels.large_cpu(param):
        return kernels.zero_dropped(param, dropout_prob, generator=generator)
    key = kernels.random_key(generator)
    compiled = None if param.requires_grad and torch.is_grad_enabled() else _compiled_for(param)
    if compiled is not None:
        dropped: Tensor = compiled.dropout(param, kernels.drop_threshold(dropout_prob), key)
        return dropped
    return kernels.map_blocks(
        lambda block, out, start: kernels.zero_dropped(
            block, dropout_prob, key=key, start=start, out=out
        ),
        param,
    )


# --------------------------------------------------------------------------------------
# Decay quantisation


@functools.cache
def _decay_tables(dtype: torch.dtype, work_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Thresholds and values of the bit-shift decays, for decays of ``dtype``.

    A decay ``d`` has shift ``n = round(log2(tau / dt)) = round(log2(-1 / ln d))``, which is
    at least ``k + 1`` exactly when ``d >= exp(-2**(-k - 1/2))``. So ``n`` is the number of
    thresholds ``t_k = exp(-2**(-k - 1/2))`` at or below ``d``: one comparison per possible
    shift instead of two logarithms and a rounding per value. Each ``t_k`` is computed to
    40 digits and rounded up to ``work_dtype``, so comparing a ``work_dtype`` value with it
    is comparing with the exact threshold. Shifts run up to the largest whose decay
    ``1 - 2**-n`` is still below 1 in ``dtype``; decays at or above 1 get that one.

    Returns:
        ``(thresholds, values)``: ``values[n] = 1 - 2**-n`` in ``dtype``.
    """
    max_shift = round(-math.log2(torch.finfo(dtype).eps)) + 1
    with decimal.localcontext() as context:
        context.prec = 40
        half = decimal.Decimal(2).sqrt() / 2  # 2**(-1/2)
        exact = [(-(half / decimal.Decimal(2) ** k)).exp() for k in range(max_shift)]
    thresholds = torch.tensor([_round_up(t, work_dtype) for t in exact], dtype=work_dtype)
    values = torch.tensor([1.0 - 2.0**-n for n in range(max_shift + 1)], dtype=torch.float64)
    return thresholds, values.to(dtype)


def _round_up(exact: decimal.Decimal, dtype: torch.dtype) -> float:
    """The smallest value of ``dtype`` at or above ``exact`` (a number in (0, 1))."""
    up, down = torch.tensor(2.0, dtype=dtype), torch.tensor(0.0, dtype=dtype)
    value = torch.tensor(float(exact), dtype=dtype)  # the nearest value, or next to it
    while decimal.Decimal(float(value)) < exact:
        value = torch.nextafter(value, up)
    below = torch.nextafter(value, down)
    while decimal.Decimal(float(below)) >= exact:
        value, below = below, torch.nextafter(below, down)
    return float(value)


class class_calc_q_decay:  # the reference API's name, kept
    """Quantise decay factors ``exp(-dt / tau)`` to the bit-shift decays ``1 - 2**-n``.

    A leaky neuron whose state decays by ``x -= x >> n`` each step has decay
    ``1 - 2**-n``. This finds ``n = round(log2(tau / dt))`` for each decay and returns the
    matching bit-shift decay. Decays ``<= 0`` give 0 (``n = 0``); decays ``>= 1``, which
    never decay, give the closest bit-shift decay below 1 that the dtype can hold. ``NaN``
    stays ``NaN``.

    Args:
        dt: Simulation time step in seconds (positive).

    Example:
        >>> class_calc_q_decay(dt=1e-3)(torch.tensor([0.5, 0.8, 0.95]))
        tensor([0.5000, 0.7500, 0.9375])
    """

    def __init__(self, dt: float) -> None:
        # An infinite step would turn every decay into 0.
        if not _is_number(dt) or not 0 < dt < math.inf:
            raise ValueError(f"dt must be a positive, finite number of seconds, got {dt!r}")
        self.dt = float(dt)

    def calc_q_decay(self, decay: Tensor) -> Tensor:
        """Return the bit-shift decays for ``decay`` (same shape, dtype and device)."""
        decay = _as_float(decay)
        # Half precision is compared in float32, which holds it exactly.
        work_dtype = decay.dtype if torch.finfo(decay.dtype).bits >= 32 else torch.float32
        thresholds, table = _decay_tables(decay.dtype, work_dtype)
        with torch.no_grad():
            compiled = _compiled_for(decay)
            if compiled is not None:
                decays: Tensor = compiled.decay(decay, thresholds, table)
                return decays
            thresholds, table = thresholds.to(decay.device), table.to(decay.device)

            def chain(block: Tensor, out: Tensor | None, start: int) -> Tensor:
                work = block.to(work_dtype)
                shift = torch.bucketize(work, thresholds, right=True)
                return torch.where(torch.isnan(block), block, table[shift])

            # Block by block on large CPU tensors: the chain makes a few temporaries.
            return kernels.map_blocks(chain, decay)

    def __call__(self, decay: Tensor) -> Tensor:
        return self.calc_q_decay(decay)

    calc_bitshift_decay = calc_q_decay
    """The original implementation's name for :meth:`calc_q_decay`."""


def t_decay(decay: Tensor, dt: float = 0.001) -> Tensor:
    """Quantise LIF decay factors to bit-shift decays, with a straight-through gradient.

    See :class:`class_calc_q_decay` for the mapping and its edge cases.

    Args:
        decay: Decay factors ``exp(-dt / tau)``, such as LIF ``alpha`` and ``beta``.
        dt: Simulation time step in seconds.

    Returns:
        Quantised decays of the same shape, dtype and device.

    Example:
        >>> t_decay(torch.tensor([0.4156, 0.8306, 0.9475]))
        tensor([0.0000, 0.7500, 0.9375])
    """
    return _straight_through(decay, class_calc_q_decay(dt))
