"""One tensor after quantisation: distinct values, bits, grid, integer type and error.

:func:`tensor_report` describes a tensor in a few sorts and passes over its values, with no
Python loop over elements, as a :class:`TensorReport`; :mod:`transform_core.report` sums
those up into the whole report.

JSON encoding: ``None`` (``null``) means "not applicable" (no step, no reference, no
finite values). The only non-finite numbers a tensor report holds are an SQNR of ``inf``
(exact quantisation) or ``-inf`` (an all-zero reference), and a ``max_abs_error`` or
``rmse`` of ``inf`` when an error is beyond the float64 range (float64 values near
``±1.8e308``); :meth:`TensorReport.to_dict` writes these as the strings ``"inf"`` and
``"-inf"`` (and a NaN, which a report never holds, as ``"nan"``) so the JSON stays strict
and :meth:`TensorReport.from_dict` reads them back. The ``min``, ``max`` and ``step`` of
an integer tensor are JSON integers, exact however large.

Example:
    >>> import torch
    >>> t = tensor_report("fc.weight", torch.tensor([-0.5, 0.0, 0.5, 0.5]), family="weights",
    ...                   transform=describe_transform("stochastic_rounding", {"num_levels": 3}))
    >>> t.distinct, t.bits_needed, t.step, t.on_integer_grid, t.quantised
    (3, 2, 0.5, False, True)
    >>> TensorReport.from_dict(t.to_dict()) == t
    True
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from transform_core import kernels
from transform_core.errors import ConfigError, did_you_mean

__all__ = ["NON_QUANTISING", "TensorReport", "describe_transform", "tensor_report"]

NON_QUANTISING: frozenset[str] = frozenset({"identity", "dropout"})
"""Transform names that leave the set of values unconstrained: a tensor under one of these
(or under no transform) is not counted as quantised."""

# Grids with more levels than this cannot be told apart from plain float data.
_MAX_GRID_LEVELS = 2**31
# Residuals from the fitted grid may be this many units of the dtype's epsilon (relative
# to the largest magnitude): rounding transforms compute ``k * step`` in the tensor's own
# precision and pick up a few ulps on the way.
_GRID_ULPS = 16
# ... but never more than this fraction of a step, or every float tensor is "on a grid".
_GRID_MAX_FRACTION = 0.05
# How many values a quick check looks at before a full pass.
_SCREEN = 4096

_TENSOR_FLOATS = ("min", "max", "step", "max_abs_error", "rmse", "sqnr_db")
# Python ints for a tensor of an integer dtype: int64 values past 2**53 have no exact float.
_TENSOR_EXACT = ("min", "max", "step")
# The JSON kinds of the other tensor fields, which from_dict checks.
_NONE = type(None)
_TENSOR_KINDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "family": (str, _NONE),
    "dtype": (str,),
    "numel": (int,),
    "transform": (str, _NONE),
    "distinct": (int,),
    "bits_needed": (int,),
    "on_integer_grid": (bool,),
    "int_signed": (bool, _NONE),
    "int_bits": (int, _NONE),
    "nonfinite": (int,),
}


def describe_transform(name: str, args: Mapping[str, Any] | None = None) -> str:
    """Return the text a report shows for a transform and its arguments.

    Args:
        name: The transform's registry name.
        args: Its arguments, in the order to show them.

    Returns:
        ``name(key=value, ...)``, with values as ``repr`` shows them.

    Example:
        >>> describe_transform("stochastic_rounding", {"num_levels": 16})
        'stochastic_rounding(num_levels=16)'
        >>> describe_transform("identity")
        'identity()'
    """
    shown = ", ".join(f"{key}={value!r}" for key, value in (args or {}).items())
    return f"{name}({shown})"


def _transform_name(transform: str | None) -> str | None:
    if transform is None:
        return None
    return transform.split("(", 1)[0].strip()


@dataclass(frozen=True)
class TensorReport:
    """What one tensor looks like after quantisation.

    Statistics are over the finite values; ``nonfinite`` counts the rest. A complex
    tensor is described by its real and imaginary parts: each part counts as one value
    in ``distinct``, ``min``, ``max``, ``step``, ``nonfinite`` and the errors (``numel``
    still counts elements). Build one with :func:`tensor_report`.

    Attributes:
        name: Qualified tensor name (``"layers.0.weight"``).
        family: Parameter family (``"weights"``), or ``None``.
        shape: Tensor shape.
        dtype: Dtype name without the ``torch.`` prefix (``"float32"``).
        numel: Number of elements.
        transform: Transform text such as ``"stochastic_rounding(num_levels=16)"``, or ``None``.
        distinct: Number of distinct finite values.
        bits_needed: ``ceil(log2(distinct))``; 0 for a constant or empty tensor.
        min: Smallest finite value, or ``None`` if there is none. A Python ``int`` for an
            integer dtype (exact for all of int64 and uint64), else a ``float``.
        max: Largest finite value, or ``None`` if there is none; typed as ``min``.
        step: The smallest gap between distinct values, when every value lies on the grid
            ``min + k * step`` within float tolerance (exactly, for an integer dtype); else
            ``None`` (also for fewer than two distinct values, and for a step beyond the
            float64 range). Typed as ``min``.
        on_integer_grid: Every finite value is an integer (true for no finite values).
        int_signed: Whether the smallest integer type holding ``[min, max]`` is signed;
            ``None`` unless on the integer grid with at least one finite value.
        int_bits: Width of that type, at least 1 (``[-3, 3]`` needs signed 3 bits,
            ``[0, 255]`` unsigned 8); ``None`` when ``int_signed`` is.
        nonfinite: Number of NaN and infinite elements.
        max_abs_error: Largest ``|tensor - reference|``, or ``None`` without a reference;
            ``inf`` if it is beyond the float64 range.
        rmse: Root mean square of ``tensor - reference``, or ``None``; ``inf`` if it is
            beyond the float64 range.
        sqnr_db: ``10 log10(sum(ref**2) / sum(err**2))``: ``inf`` when exact, ``-inf``
            for an all-zero reference, ``None`` without a reference.

    Error statistics cover the elements where both the tensor and the reference are
    finite; they are ``None`` when there is no such element.
    """

    name: str
    family: str | None
    shape: tuple[int, ...]
    dtype: str
    numel: int
    transform: str | None
    distinct: int
    bits_needed: int
    min: int | float | None
    max: int | float | None
    step: int | float | None
    on_integer_grid: bool
    int_signed: bool | None
    int_bits: int | None
    nonfinite: int
    max_abs_error: float | None = None
    rmse: float | None = None
    sqnr_db: float | None = None

    @property
    def quantised(self) -> bool:
        """Whether the tensor's transform quantises (anything but none, identity, dropout).

        Example:
            >>> import torch
            >>> tensor_report("b", torch.zeros(2), transform="dropout(dropout_prob=0.5)").quantised
            False
        """
        name = _transform_name(self.transform)
        return name is not None and name not in NON_QUANTISING

    @property
    def dtype_bits(self) -> int:
        """Storage width of one element of :attr:`dtype`, in bits."""
        return _dtype_bits(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-safe data (see the module doc for ``inf``), plus
        ``quantised``."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "shape":
                value = list(value)
            elif f.name in _TENSOR_FLOATS:
                value = encode_float(value)
            data[f.name] = value
        data["quantised"] = self.quantised
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, key: str = "tensor") -> TensorReport:
        """Read back what :meth:`to_dict` wrote.

        Args:
            data: A mapping with every field; ``quantised`` is derived and ignored.
            key: Where ``data`` sits in a larger document, for error messages.

        Returns:
            The equal :class:`TensorReport`.

        Raises:
            ConfigError: If a field is missing, unknown or of the wrong kind (a ``min``,
                ``max`` or ``step`` of an integer tensor must be an integer or null).
        """
        names = [f.name for f in fields(cls)]
        check_keys(data, required=names, optional=("quantised",), key=key)
        dtype = data["dtype"]
        integer = isinstance(dtype, str) and _is_integer(_dtype(dtype, key=f"{key}.dtype"))
        values: dict[str, Any] = {}
        for name in names:
            value = data[name]
            if integer and name in _TENSOR_EXACT:
                value = _decode_int(value, key=f"{key}.{name}")
            elif name == "shape":
                if not isinstance(value, list | tuple) or not all(
                    isinstance(n, int) and not isinstance(n, bool) for n in value
                ):
                    raise ConfigError(
                        f"expected a list of integers, got {value!r}", key=f"{key}.shape"
                    )
                value = tuple(value)
            elif name in _TENSOR_FLOATS:
                value = _decode_float(value, key=f"{key}.{name}")
            elif not isinstance(value, _TENSOR_KINDS[name]) or (
                isinstance(value, bool) and bool not in _TENSOR_KINDS[name]
            ):
                kinds = " or ".join(
                    "null" if k is _NONE else k.__name__ for k in _TENSOR_KINDS[name]
                )
                raise ConfigError(f"expected {kinds}, got {value!r}", key=f"{key}.{name}")
            values[name] = value
        _dtype_bits(values["dtype"], key=f"{key}.dtype")
        return cls(**values)


def tensor_report(
    name: str,
    tensor: torch.Tensor,
    *,
    family: str | None = None,
    transform: str | None = None,
    reference: torch.Tensor | None = None,
) -> TensorReport:
    """Describe one tensor: distinct values, bits, grid, integer range, errors.

    Runs in a few sorts and passes over the data, with no Python loop over elements
    (a 16M-element tensor takes a fraction of a second on CPU).

    Args:
        name: Qualified tensor name.
        tensor: The (quantised) values; any dtype (float8 and complex included), any
            device.
        family: Its parameter family, if any.
        transform: Text of the transform that produced it (see :func:`describe_transform`).
        reference: The tensor before quantisation, same shape, for error statistics.

    Returns:
        The :class:`TensorReport`.

    Raises:
        TypeError: If ``tensor`` or ``reference`` is not a tensor.
        ValueError: If ``reference`` has a different shape.

    Example:
        >>> import torch
        >>> r = tensor_report("w", torch.tensor([-3.0, 0.0, 3.0]), reference=torch.tensor([-3.0, 0.5, 3.0]))
        >>> r.distinct, r.bits_needed, r.step, r.int_signed, r.int_bits, r.max_abs_error
        (3, 2, 3.0, True, 3, 0.5)
        >>> c = tensor_report("z", torch.tensor([1 + 2j, 1 - 2j]))  # parts 1, 2, 1, -2
        >>> c.dtype, c.numel, c.distinct, c.min, c.max
        ('complex64', 2, 3, -2.0, 2.0)
    """
    _check_tensor(name, tensor, "tensor")
    values = _as_array(tensor)
    distinct_values, nonfinite = _distinct_finite(values)
    distinct = int(distinct_values.size)
    lo: int | float | None = None
    hi: int | float | None = None
    step: int | float | None = None
    int_signed: bool | None = None
    int_bits: int | None = None
    on_integer_grid = True
    if distinct and _is_integer(tensor.dtype):
        # Python ints, not floats: int64 values past 2**53 would lose their differences.
        lo, hi = int(distinct_values[0]), int(distinct_values[-1])
        step = _integer_step(distinct_values)
        int_signed, int_bits = _int_type(lo, hi)
    elif distinct:
        # Adding 0.0 turns a -0.0 into 0.0, so a range never reads "-0.0".
        lo = float(distinct_values[0]) + 0.0
        hi = float(distinct_values[-1]) + 0.0
        step = _grid_step(distinct_values, _epsilon(tensor.dtype))
        on_integer_grid = _all_integers(distinct_values)
        if on_integer_grid:
            int_signed, int_bits = _int_type(int(lo), int(hi))
    errors: tuple[float | None, float | None, float | None] = (None, None, None)
    magnitude = max(abs(lo), abs(hi)) if lo is not None and hi is not None else 0
    if reference is not None:
        _check_tensor(name, reference, "reference")
        if tuple(reference.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{name}: reference shape {tuple(reference.shape)} differs from tensor shape "
                f"{tuple(tensor.shape)}; pass the tensor's own value from before quantisation"
            )
        if tensor.is_complex() != reference.is_complex():
            # Compare as complex numbers: a real tensor's imaginary parts are zero.
            values = _as_array(tensor, as_complex=True)
            errors = _errors(values, _as_array(reference, as_complex=True), magnitude)
        else:
            errors = _errors(values, _as_array(reference), magnitude)
    return TensorReport(
        name=name,
        family=family,
        shape=tuple(int(n) for n in tensor.shape),
        dtype=_dtype_name(tensor.dtype),
        numel=int(tensor.numel()),
        transform=transform,
        distinct=distinct,
        bits_needed=(distinct - 1).bit_length() if distinct > 1 else 0,
        min=lo,
        max=hi,
        step=step,
        on_integer_grid=on_integer_grid,
        int_signed=int_signed,
        int_bits=int_bits,
        nonfinite=nonfinite,
        max_abs_error=errors[0],
        rmse=errors[1],
        sqnr_db=errors[2],
    )


def _check_tensor(name: str, value: object, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name}: expected the {what} as a torch.Tensor, got {type(value).__name__}"
        )


def _as_array(tensor: torch.Tensor, *, as_complex: bool = False) -> npt.NDArray[Any]:
    """Return the elements as a flat NumPy array that sorts fast and exactly.

    A complex tensor (or any tensor, with ``as_complex``) gives its real and imaginary
    parts, one after the other for each element.

    Example:
        >>> _as_array(torch.tensor([1 + 2j, 3 - 4j])).tolist()
        [1.0, 2.0, 3.0, -4.0]
        >>> _as_array(torch.tensor([0.5, 1.0]).to(torch.float8_e4m3fn)).tolist()
        [0.5, 1.0]
    """
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if as_complex and not tensor.is_complex():
        tensor = tensor.to(torch.complex128 if tensor.dtype == torch.float64 else torch.complex64)
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor.resolve_conj())
    if tensor.dtype == torch.bool or (tensor.is_floating_point() and tensor.itemsize <= 2):
        tensor = tensor.float()  # exact; NumPy has no bfloat16 or float8
    array: npt.NDArray[Any] = tensor.reshape(-1).numpy()
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 2:
        # Exact in float32, which NumPy sorts with SIMD, several times faster than int8.
        array = array.astype(np.float32)
    return array


_DISTINCT_LIMIT = 1 << 16
"""Up to this many distinct values, the compiled kernels count them in a hash set; beyond,
a sort is faster (and unquantised data has about as many distinct values as elements)."""


def _distinct_finite(array: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], int]:
    """Return the sorted distinct finite values (in the array's dtype) and the non-finite count."""
    compiled = _compiled_kernels(array)
    if compiled is not None:
        found: tuple[npt.NDArray[Any], int] | None = compiled.distinct_finite(
            array, _DISTINCT_LIMIT
        )
        if found is not None:
            return found
    with kernels.chain_timer():
        return _sorted_distinct(array)


def _sorted_distinct(array: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], int]:
    nonfinite = 0
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            nonfinite = int(array.size - np.count_nonzero(finite))
            array = array[finite]
    ordered = np.sort(array)
    if ordered.size < 2:
        return ordered, nonfinite
    first = np.empty(ordered.size, dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first], nonfinite


def _epsilon(dtype: torch.dtype) -> float:
    """Relative precision of the values: the dtype's (of its parts, if complex), and at
    least float64's."""
    if dtype.is_complex:
        dtype = dtype.to_real()
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(eps, float(np.finfo(np.float64).eps))


def _all_integers(distinct: npt.NDArray[Any]) -> bool:
    if distinct.dtype.kind in "iub":
        return True
    # Float data usually fails in the first few values; check those before the rest.
    head = distinct[:_SCREEN]
    if not np.array_equal(np.floor(head), head):
        return False
    rest = distinct[_SCREEN:]
    return bool(np.array_equal(np.floor(rest), rest))


def _grid_step(distinct: npt.NDArray[Any], eps: float) -> float | None:
    """Return the smallest gap if every sorted distinct float lies on ``min + k * gap``.

    Example:
        >>> big = float(np.finfo(np.float64).max)
        >>> _grid_step(np.array([-big, 0.0, big]), 2.0**-52) == big
        True
    """
    if distinct.size < 2:
        return None
    # Differences up to twice the dtype's largest value must not overflow (NumPy would
    # warn and the step come out as inf / inf).
    unit = 1.0
    span = float(distinct[-1]) - float(distinct[0])  # float64; inf beyond its range
    if not math.isfinite(span):
        # float64 values more than its largest value apart: fit the grid to the halved
        # values (exact, but for subnormals far below any tolerance here) and double it.
        distinct = distinct * 0.5
        unit = 2.0
        span = float(distinct[-1]) - float(distinct[0])
    elif span > float(np.finfo(distinct.dtype).max):
        distinct = distinct.astype(np.float64)  # a narrower float: float64 holds the span
    gaps = np.diff(distinct)
    smallest = float(gaps.min())
    if not smallest > 0 or span / smallest > _MAX_GRID_LEVELS:
        return None
    # Cheap screen: on a grid, the first gaps are whole multiples of the smallest one.
    head = gaps[:_SCREEN].astype(np.float64) / smallest
    if float(np.abs(head - np.round(head)).max()) > 0.25:
        return None
    values = distinct.astype(np.float64)
    # Each gap is a small whole number of steps, so rounding gaps (not positions) gives
    # exact level indices even when float noise in the smallest gap would accumulate
    # over many levels; the step is then fitted over the whole span.
    levels = np.cumsum(np.round(np.diff(values) / smallest))
    step = span / float(levels[-1])
    scale = max(abs(float(values[0])), abs(float(values[-1])))
    tolerance = min(_GRID_ULPS * eps * scale, _GRID_MAX_FRACTION * step)
    residual = float(np.abs(values[1:] - (values[0] + levels * step)).max())
    if residual > tolerance or step * unit > sys.float_info.max:
        return None  # off the grid, or a step no float64 holds
    return step * unit


def _integer_step(distinct: npt.NDArray[Any]) -> int | None:
    """Return the smallest gap of sorted distinct integers if it divides every gap, exactly.

    Grids of more than :data:`_MAX_GRID_LEVELS` levels count as no grid, as for floats.

    Example:
        >>> _integer_step(np.array([-(2**63), 2**63 - 1])), _integer_step(np.array([0, 2, 5]))
        (18446744073709551615, None)
    """
    if distinct.size < 2:
        return None
    if distinct.dtype.kind == "f":
        distinct = distinct.astype(np.int64)  # 8- and 16-bit integers arrive as exact float32
    # Sorted, so every gap lies in [1, 2**64 - 1]: 64-bit unsigned arithmetic, which wraps
    # modulo 2**64, gives it exactly where a signed difference would overflow.
    wide = np.uint64 if distinct.dtype.kind == "u" else np.int64
    gaps = np.diff(distinct.astype(wide).view(np.uint64))
    smallest = gaps.min()
    span = int(distinct[-1]) - int(distinct[0])
    if span > _MAX_GRID_LEVELS * int(smallest) or np.count_nonzero(gaps % smallest):
        return None
    return int(smallest)


def _int_type(lo: int, hi: int) -> tuple[bool, int]:
    """Smallest integer type holding ``[lo, hi]``: ``(signed, bits)``, bits >= 1."""
    if lo >= 0:
        return False, max(hi.bit_length(), 1)
    # Signed b bits hold [-2**(b-1), 2**(b-1) - 1].
    return True, max((-lo - 1).bit_length(), hi.bit_length() if hi > 0 else 0) + 1


ERROR_LANES = 1024
ERROR_BLOCK = 1 << 16
"""The error statistics sum squares in a fixed order, whichever code computes them: each
block of ``ERROR_BLOCK`` elements (zero-padded) is viewed as ``(rows, ERROR_LANES)`` and
summed along its rows, row by row; the block sums add up block by block, and the lanes
exactly (``math.fsum``). The compiled kernel and NumPy then give the same bits."""

_ERROR_CHUNK = 2 * ERROR_BLOCK
"""Elements per chunk of the NumPy error sums. Their float64 work arrays take 1 MiB each
and stay in the CPU's caches between the passes over them: a 16M-element tensor took
48 ms, against 112 ms with chunks eight times as large."""


def error_block_sums(
    values: npt.NDArray[Any], reference: npt.NDArray[Any]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, int]:
    """Per block and lane sums of ``err**2`` and ``reference**2``, max ``|err|``, pair count.

    ``err`` is ``values - reference`` in float64; pairs where it is not finite (either side
    NaN or infinite, or an overflow) count as zeros and are not counted. Works through the
    arrays in chunks, so memory stays small whatever the tensor's size.

    Example:
        >>> err_sq, ref_sq, max_abs, count = error_block_sums(np.array([1.0, 2.0]), np.array([1.5, np.nan]))
        >>> err_sq.shape, float(err_sq.sum()), max_abs, count
        ((1, 1024), 0.25, 0.5, 1)
    """
    err_blocks, ref_blocks = [], []
    max_abs = 0.0
    count = 0
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are expected
        for start in range(0, values.size, _ERROR_CHUNK):
            err_block, ref_block, chunk_max, chunk_count = _chunk_sums(values, reference, start)
            err_blocks.append(err_block)
            ref_blocks.append(ref_block)
            max_abs = max(max_abs, chunk_max)
            count += chunk_count
    if not err_blocks:
        empty = np.zeros((0, ERROR_LANES))
        return empty, empty, 0.0, 0
    return np.concatenate(err_blocks), np.concatenate(ref_blocks), max_abs, count


def _chunk_sums(
    values: npt.NDArray[Any], reference: npt.NDArray[Any], start: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, int]:
    """:func:`error_block_sums` of the chunk from element ``start`` on."""
    ref = reference[start : start + _ERROR_CHUNK].astype(np.float64)
    err = np.subtract(values[start : start + _ERROR_CHUNK], ref, dtype=np.float64)
    finite = np.isfinite(err)  # also false where either side is not finite
    if finite.all():
        count = err.size
    else:
        err[~finite] = 0.0
        ref[~finite] = 0.0
        count = int(np.count_nonzero(finite))
    max_abs = max(float(err.max()), -float(err.min()))
    blocks = -(-err.size // ERROR_BLOCK)
    if err.size != blocks * ERROR_BLOCK:  # the last chunk: pad to whole blocks
        err = np.pad(err, (0, blocks * ERROR_BLOCK - err.size))
        ref = np.pad(ref, (0, blocks * ERROR_BLOCK - ref.size))
    shape = (blocks, ERROR_BLOCK // ERROR_LANES, ERROR_LANES)
    err_sq = np.multiply(err, err, out=err).reshape(shape).sum(axis=1)
    ref_sq = np.multiply(ref, ref, out=ref).reshape(shape).sum(axis=1)
    return err_sq, ref_sq, max_abs, count


# Past this magnitude, a float64 error or its square may overflow.
_OVERFLOW_RISK = 2.0**500
# The error sums are then done again with every value times 2**-_SHIFT: 2**1024 becomes
# 2**484, whose error (at most twice that) squared and summed over 2**48 elements is
# still finite.
_SHIFT = 540


def _errors(
    values: npt.NDArray[Any], reference: npt.NDArray[Any], magnitude: float = 0.0
) -> tuple[float | None, float | None, float | None]:
    """Return max |err|, RMSE and SQNR (dB) over elements finite in both tensors.

    ``magnitude`` is the largest finite ``|value|`` of the tensor. Where float64 overflows,
    a second, scaled pass finds what the first could not (see :data:`_SHIFT`).

    Example:
        >>> big = np.array([1e200, 3e200])
        >>> _errors(big, np.array([2e200, 3e200]), 3e200)[0]
        1e+200
    """
    max_abs, err_power, ref_power, count = _error_sums(values, reference)
    err_shift = ref_shift = 0  # the true sums: err_power * 4**err_shift, and so for ref
    # A float64 error overflows only where the tensor holds a |value| of 2**970 or more
    # (its pair then counts as non-finite and drops out, unseen); a square or a sum that
    # overflows shows as inf.
    if magnitude > _OVERFLOW_RISK or not (math.isfinite(err_power) and math.isfinite(ref_power)):
        scale = 2.0**-_SHIFT  # exact, but for subnormals far below what dominates here
        scaled = _error_sums(
            np.multiply(values, scale, dtype=np.float64),
            np.multiply(reference, scale, dtype=np.float64),
        )
        if scaled[3] > count:  # pairs dropped for an error beyond the float64 range
            max_abs, count = math.inf, scaled[3]
            err_power, err_shift = scaled[1], _SHIFT
            ref_power, ref_shift = scaled[2], _SHIFT
        else:  # the same pairs: keep what the first pass got right, at full precision
            if not math.isfinite(err_power):
                err_power, err_shift = scaled[1], _SHIFT
            if not math.isfinite(ref_power):
                ref_power, ref_shift = scaled[2], _SHIFT
    if not count:
        return None, None, None
    rmse = math.sqrt(err_power / count) * 2.0**err_shift  # inf beyond float64's range
    if err_power == 0.0:
        sqnr = math.inf
    elif ref_power == 0.0:
        sqnr = -math.inf
    else:
        ratio = ref_power / err_power
        if err_shift == ref_shift and sys.float_info.min <= ratio <= sys.float_info.max:
            sqnr = 10.0 * math.log10(ratio)
        else:  # the ratio would overflow, lose precision or read 0: add logarithms
            shift = 2 * (ref_shift - err_shift) * math.log10(2.0)
            sqnr = 10.0 * (math.log10(ref_power) - math.log10(err_power) + shift)
    return max_abs, rmse, sqnr


def _error_sums(
    values: npt.NDArray[Any], reference: npt.NDArray[Any]
) -> tuple[float, float, float, int]:
    """Max |err|, sum of err**2, sum of reference**2 and pair count, as float64 gives them."""
    compiled = _compiled_kernels(values, reference)
    if compiled is not None:
        err_sq, ref_sq, max_abs, count = compiled.error_sums(values, reference)
    else:
        with kernels.chain_timer():
            err_sq, ref_sq, max_abs, count = error_block_sums(values, reference)
    # Blocks add up in order (NumPy's reduction along the first axis), lanes exactly.
    with np.errstate(over="ignore"):  # an overflow reads inf, which _errors looks for
        err_lanes = np.add.reduce(err_sq, axis=0).tolist()
        ref_lanes = np.add.reduce(ref_sq, axis=0).tolist()
    return max_abs, _exact_sum(err_lanes), _exact_sum(ref_lanes), count


def _exact_sum(parts: list[float]) -> float:
    """``math.fsum`` of non-negative parts, ``inf`` where the sum is past float64's range
    (fsum raises on that rather than returning inf)."""
    try:
        return math.fsum(parts)
    except OverflowError:
        return math.inf


def _compiled_kernels(*arrays: npt.NDArray[Any]) -> Any:
    """The compiled kernels, for float32/float64 arrays large enough for them to pay."""
    if arrays[0].size < kernels.SMALL or any(a.dtype.kind != "f" or a.itemsize < 4 for a in arrays):
        return None
    return kernels.compiled_kernels()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str, *, key: str = "dtype") -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"expected a torch dtype name such as 'float32', got {name!r}", key=key)
    return dtype


def _dtype_bits(name: str, *, key: str = "dtype") -> int:
    return _dtype(name, key=key).itemsize * 8


def _is_integer(dtype: torch.dtype) -> bool:
    """An integer dtype (bool, whose values arrive as floats, is not one here)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def encode_float(value: float | None) -> float | str | None:
    """A float for strict JSON: infinities and NaN become ``"inf"``, ``"-inf"``, ``"nan"``.

    Example:
        >>> encode_float(float("-inf")), encode_float(0.5), encode_float(None)
        ('-inf', 0.5, None)
    """
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _decode_float(value: object, *, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"expected a number, null, 'inf', '-inf' or 'nan', got {value!r}", key=key)


def _decode_int(value: object, *, key: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigError(
        f"expected an integer or null for a tensor of an integer dtype, got {value!r}", key=key
    )


def expect_mapping(value: object, key: str) -> Mapping[str, Any]:
    """Return ``value`` if it is a mapping, for reading reports back.

    Raises:
        ConfigError: Anything else, keyed on ``key``.
    """
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {value!r:.60}", key=key)
    return value


def check_keys(
    data: Mapping[str, Any], *, required: Iterable[str], optional: Iterable[str], key: str
) -> None:
    """Refuse unknown keys (with a suggestion) and missing required keys in report data.

    Raises:
        ConfigError: The first unknown or missing key, keyed on ``key``.
    """
    required = list(required)
    known = [*required, *optional]
    for name in data:
        if name not in known:
            raise ConfigError(f"unknown key {name!r}{did_you_mean(str(name), known)}", key=key)
    for name in required:
        if name not in data:
            raise ConfigError(f"missing key {name!r}", key=key)
