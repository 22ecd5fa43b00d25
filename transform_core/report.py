"""The quantisation report as plain data.

A report describes every tensor written to a quantised checkpoint: how many distinct
values it uses, how many bits those need, the grid they lie on, whether they fit an
integer type, and (given the tensor before quantisation) how much error quantisation
added. :class:`Report` adds totals, per-family totals and an optional check against
hardware limits. Rendering is left to the caller: :meth:`Report.to_dict` gives
JSON-safe data, :meth:`Report.to_json` and :meth:`Report.to_markdown` give text.

JSON encoding: ``None`` (``null``) means "not applicable" (no step, no reference, no
finite values). The only non-finite numbers a report holds are an SQNR of ``inf``
(exact quantisation) or ``-inf`` (an all-zero reference) and a size ratio of ``inf``;
:meth:`Report.to_dict` writes these as the strings ``"inf"`` and ``"-inf"`` (and a NaN,
which a report never holds, as ``"nan"``) so the JSON stays strict and
:meth:`Report.from_dict` reads them back.

Example:
    >>> import torch
    >>> t = tensor_report("fc.weight", torch.tensor([-0.5, 0.0, 0.5, 0.5]), family="weights",
    ...                   transform="stochastic_rounding(num_levels=3)")
    >>> t.distinct, t.bits_needed, t.step, t.on_integer_grid
    (3, 2, 0.5, False)
    >>> r = Report.build([t], limits={"weights": (True, 8)})
    >>> r.ok, r.totals.reported_bits
    (False, 8)
    >>> print(r.violations[0])
    fc.weight: expected integers for signed 8-bit [-128, 127], found non-integer values (step 0.5)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from transform_core.errors import ConfigError, did_you_mean

__all__ = [
    "FORMAT",
    "NON_QUANTISING",
    "Report",
    "TensorReport",
    "Totals",
    "Violation",
    "describe_transform",
    "tensor_report",
]

FORMAT = "rockq-report/1"
"""The value of the ``format`` key in :meth:`Report.to_dict`; bumped on incompatible changes."""

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
_TOTALS_KEYS = (
    "tensors",
    "parameters",
    "quantised_parameters",
    "quantised_share",
    "float32_bits",
    "reported_bits",
    "ratio",
)


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

    Statistics are over the finite values; ``nonfinite`` counts the rest. Build one with
    :func:`tensor_report`.

    Attributes:
        name: Qualified tensor name (``"layers.0.weight"``).
        family: Parameter family (``"weights"``), or ``None``.
        shape: Tensor shape.
        dtype: Dtype name without the ``torch.`` prefix (``"float32"``).
        numel: Number of elements.
        transform: Transform text such as ``"stochastic_rounding(num_levels=16)"``, or ``None``.
        distinct: Number of distinct finite values.
        bits_needed: ``ceil(log2(distinct))``; 0 for a constant or empty tensor.
        min: Smallest finite value, or ``None`` if there is none.
        max: Largest finite value, or ``None`` if there is none.
        step: The smallest gap between distinct values, when every value lies on the grid
            ``min + k * step`` within float tolerance; else ``None`` (also for fewer than two
            distinct values).
        on_integer_grid: Every finite value is an integer (true for no finite values).
        int_signed: Whether the smallest integer type holding ``[min, max]`` is signed;
            ``None`` unless on the integer grid with at least one finite value.
        int_bits: Width of that type, at least 1 (``[-3, 3]`` needs signed 3 bits,
            ``[0, 255]`` unsigned 8); ``None`` when ``int_signed`` is.
        nonfinite: Number of NaN and infinite elements.
        max_abs_error: Largest ``|tensor - reference|``, or ``None`` without a reference.
        rmse: Root mean square of ``tensor - reference``, or ``None``.
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
    min: float | None
    max: float | None
    step: float | None
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
                value = _encode_float(value)
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
            ConfigError: If a field is missing, unknown or of the wrong kind.
        """
        names = [f.name for f in fields(cls)]
        _check_keys(data, required=names, optional=("quantised",), key=key)
        values: dict[str, Any] = {}
        for name in names:
            value = data[name]
            if name == "shape":
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
        tensor: The (quantised) values; any real dtype, any device.
        family: Its parameter family, if any.
        transform: Text of the transform that produced it (see :func:`describe_transform`).
        reference: The tensor before quantisation, same shape, for error statistics.

    Returns:
        The :class:`TensorReport`.

    Raises:
        TypeError: If ``tensor`` or ``reference`` is not a tensor.
        ValueError: If a tensor is complex, or ``reference`` has a different shape.

    Example:
        >>> import torch
        >>> r = tensor_report("w", torch.tensor([-3.0, 0.0, 3.0]), reference=torch.tensor([-3.0, 0.5, 3.0]))
        >>> r.distinct, r.bits_needed, r.step, r.int_signed, r.int_bits, r.max_abs_error
        (3, 2, 3.0, True, 3, 0.5)
    """
    _check_tensor(name, tensor, "tensor")
    values = _as_array(tensor)
    distinct_values, nonfinite = _distinct_finite(values)
    distinct = int(distinct_values.size)
    lo = hi = None
    step = None
    int_signed: bool | None = None
    int_bits: int | None = None
    on_integer_grid = True
    if distinct:
        # Adding 0.0 turns a -0.0 into 0.0, so a range never reads "-0.0".
        lo = float(distinct_values[0]) + 0.0
        hi = float(distinct_values[-1]) + 0.0
        step = _grid_step(distinct_values, _epsilon(tensor.dtype))
        on_integer_grid = _all_integers(distinct_values)
        if on_integer_grid:
            int_signed, int_bits = _int_type(int(lo), int(hi))
    errors: tuple[float | None, float | None, float | None] = (None, None, None)
    if reference is not None:
        _check_tensor(name, reference, "reference")
        if tuple(reference.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{name}: reference shape {tuple(reference.shape)} differs from tensor shape "
                f"{tuple(tensor.shape)}; pass the tensor's own value from before quantisation"
            )
        errors = _errors(values, _as_array(reference))
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


@dataclass(frozen=True)
class Totals:
    """Parameter counts and sizes over a set of tensors.

    Attributes:
        tensors: Number of tensors.
        parameters: Number of elements, all tensors.
        quantised_parameters: Elements of tensors whose transform quantises.
        float32_bits: Size with every floating-point element as a float32 and integer
            tensors at their own width.
        reported_bits: Size with quantised tensors at their ``bits_needed`` and the rest
            at their own dtype's width.
    """

    tensors: int
    parameters: int
    quantised_parameters: int
    float32_bits: int
    reported_bits: int

    @property
    def quantised_share(self) -> float:
        """Fraction of parameters that are quantised (0.0 for no parameters)."""
        return self.quantised_parameters / self.parameters if self.parameters else 0.0

    @property
    def ratio(self) -> float | None:
        """``float32_bits / reported_bits``; ``inf`` if nothing needs bits, ``None`` if empty."""
        if not self.float32_bits:
            return None
        return self.float32_bits / self.reported_bits if self.reported_bits else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Return counts, share and ratio as JSON-safe data."""
        data = {key: getattr(self, key) for key in _TOTALS_KEYS}
        data["ratio"] = _encode_float(self.ratio)
        return data

    @classmethod
    def of(cls, entries: Iterable[TensorReport]) -> Totals:
        """Sum up ``entries``.

        Example:
            >>> import torch
            >>> t = Totals.of([tensor_report("w", torch.ones(4), transform="int_quant()")])
            >>> t.float32_bits, t.reported_bits, t.ratio
            (128, 0, inf)
        """
        tensors = parameters = quantised = reported = as_float32 = 0
        for entry in entries:
            tensors += 1
            parameters += entry.numel
            # Integer tensors (counters, indices) stay at their own width in both columns.
            floating = "float" in entry.dtype
            as_float32 += entry.numel * (32 if floating else entry.dtype_bits)
            if entry.quantised:
                quantised += entry.numel
                reported += entry.numel * entry.bits_needed
            else:
                reported += entry.numel * entry.dtype_bits
        return cls(tensors, parameters, quantised, as_float32, reported)


@dataclass(frozen=True)
class Violation:
    """A tensor outside its family's hardware limit.

    Attributes:
        name: The tensor.
        family: Its family (the one with the limit).
        reason: One line: what the limit expects and what was found.
    """

    name: str
    family: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass(frozen=True)
class Report:
    """Per-tensor reports with totals, per-family totals and limit checks.

    Build one with :meth:`Report.build`; the derived fields are computed there.

    Attributes:
        tensors: Per-tensor reports, in the order given.
        totals: Totals over all tensors.
        families: Totals per family, sorted by name with ``None`` (no family) last.
        limits: Hardware limits checked: family -> ``(signed, bits)``.
        violations: Tensors outside their family's limit, one entry per problem.
        meta: Free-form JSON-safe facts (rockq version, recipe name, seed, input sha256).
    """

    tensors: tuple[TensorReport, ...]
    totals: Totals
    families: dict[str | None, Totals]
    limits: dict[str, tuple[bool, int]]
    violations: tuple[Violation, ...]
    meta: dict[str, Any]

    @property
    def ok(self) -> bool:
        """True when no tensor violates a limit."""
        return not self.violations

    @classmethod
    def build(
        cls,
        entries: Iterable[TensorReport],
        *,
        limits: Mapping[str, tuple[bool, int]] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Report:
        """Assemble a report and check each tensor of a limited family.

        A tensor violates a ``(signed, bits)`` limit when it has non-finite values, when
        its values are not all integers, or when its range exceeds the integer range of
        that width (``[-2**(bits-1), 2**(bits-1) - 1]`` signed, ``[0, 2**bits - 1]``
        unsigned).

        Args:
            entries: Tensor reports; names must be unique.
            limits: Family -> ``(signed, bits)``, with ``bits >= 1``.
            meta: JSON-serialisable facts about the run.

        Returns:
            The :class:`Report`.

        Raises:
            ValueError: If two entries share a name.
            ConfigError: If a limit is not ``(bool, int >= 1)`` or ``meta`` is not JSON-safe.

        Example:
            >>> import torch
            >>> w = tensor_report("w", torch.tensor([0.0, 200.0]), family="weights")
            >>> [str(v) for v in Report.build([w], limits={"weights": (True, 8)}).violations]
            ['w: expected integers for signed 8-bit [-128, 127], found range [0, 200]']
        """
        tensors = tuple(entries)
        seen: set[str] = set()
        for entry in tensors:
            if entry.name in seen:
                raise ValueError(f"tensor {entry.name!r} is reported twice; names must be unique")
            seen.add(entry.name)
        checked = _check_limits(limits or {})
        meta_copy = dict(meta or {})
        try:
            meta_copy = json.loads(json.dumps(meta_copy, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"expected JSON-safe values (str, finite number, bool, None, list, dict), {err}",
                key="meta",
            ) from None
        names = sorted({e.family for e in tensors}, key=lambda f: (f is None, f or ""))
        families = {f: Totals.of(e for e in tensors if e.family == f) for f in names}
        violations = tuple(
            v
            for entry in tensors
            if entry.family in checked
            for v in _violations(entry, entry.family, *checked[entry.family])
        )
        return cls(tensors, Totals.of(tensors), families, checked, violations, meta_copy)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-safe data with stable keys.

        Keys, in order: ``format``, ``meta``, ``totals``, ``families`` (a list of totals
        with a ``family`` key, ``null`` for no family), ``limits`` (family ->
        ``{"signed", "bits"}``), ``ok``, ``violations`` (``{"name", "family", "reason"}``)
        and ``tensors`` (:meth:`TensorReport.to_dict`). Infinities are strings.
        """
        return {
            "format": FORMAT,
            "meta": json.loads(json.dumps(self.meta)),
            "totals": self.totals.to_dict(),
            "families": [{"family": f, **t.to_dict()} for f, t in self.families.items()],
            "limits": {f: {"signed": s, "bits": b} for f, (s, b) in self.limits.items()},
            "ok": self.ok,
            "violations": [
                {"name": v.name, "family": v.family, "reason": v.reason} for v in self.violations
            ],
            "tensors": [t.to_dict() for t in self.tensors],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Read back what :meth:`to_dict` wrote; derived parts are recomputed.

        Args:
            data: A mapping as :meth:`to_dict` returns (e.g. parsed from :meth:`to_json`).

        Returns:
            A report equal to the one written.

        Raises:
            ConfigError: If ``data`` is not a report of this :data:`FORMAT`.

        Example:
            >>> import torch
            >>> r = Report.build([tensor_report("w", torch.arange(4.0))], meta={"seed": 0})
            >>> Report.from_dict(json.loads(r.to_json())) == r
            True
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}", key="report")
        if data.get("format") != FORMAT:
            raise ConfigError(
                f"expected format {FORMAT!r}, found {data.get('format')!r}; "
                "write the report again with this version of rockq",
                key="format",
            )
        entries = data.get("tensors")
        if not isinstance(entries, list):
            raise ConfigError(f"expected a list, got {entries!r:.60}", key="tensors")
        tensors = [
            TensorReport.from_dict(_mapping(e, f"tensors[{i}]"), key=f"tensors[{i}]")
            for i, e in enumerate(entries)
        ]
        limits: dict[str, tuple[bool, int]] = {}
        for family, limit in _mapping(data.get("limits", {}), "limits").items():
            limit = _mapping(limit, f"limits.{family}")
            _check_keys(limit, required=("signed", "bits"), optional=(), key=f"limits.{family}")
            limits[family] = (limit["signed"], limit["bits"])
        return cls.build(tensors, limits=limits, meta=_mapping(data.get("meta", {}), "meta"))

    def to_json(self, *, indent: int | None = 2) -> str:
        """Return :meth:`to_dict` as strict JSON (no NaN/Infinity literals)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    def to_markdown(self) -> str:
        """Return a readable Markdown document: meta, tensor table, totals, families, limits.

        Example:
            >>> import torch
            >>> md = Report.build([tensor_report("w", torch.tensor([0.0, 1.0]))]).to_markdown()
            >>> md.splitlines()[0]
            '# Quantisation report'
        """
        lines = ["# Quantisation report", ""]
        if self.meta:
            lines += [f"- {_md(k)}: {_md(_meta_text(v))}" for k, v in self.meta.items()] + [""]
        lines += [
            "## Tensors",
            "",
            "| name | family | shape | dtype | transform | distinct | bits | range | step "
            "| integer type | non-finite | max abs error | rmse | SQNR dB |",
            "|" + "---|" * 14,
        ]
        lines += [_md_row(*_tensor_cells(t)) for t in self.tensors]
        totals = self.totals
        lines += [
            "",
            "## Totals",
            "",
            f"- tensors: {totals.tensors}",
            f"- parameters: {totals.parameters:,} ({totals.quantised_parameters:,} quantised, "
            f"{totals.quantised_share:.1%})",
            f"- size: {totals.float32_bits:,} bits at float32, {totals.reported_bits:,} bits "
            f"at reported widths (ratio {_ratio(totals.ratio)})",
            "",
            "## Families",
            "",
            "| family | tensors | parameters | quantised | float32 bits | reported bits | ratio |",
            "|" + "---|" * 7,
        ]
        lines += [
            _md_row(family or "(none)", str(sums.tensors), *_sizes(sums))
            for family, sums in self.families.items()
        ]
        if self.limits:
            lines += ["", "## Hardware limits", ""]
            lines += [f"- {_md(f)}: {_int_type_text(s, b)}" for f, (s, b) in self.limits.items()]
            lines.append("")
            if self.ok:
                lines.append("All tensors are within their limits.")
            else:
                lines += [f"- **{_md(v.name)}**: {_md(v.reason)}" for v in self.violations]
        return "\n".join(lines) + "\n"


# --- statistics -------------------------------------------------------------------


def _check_tensor(name: str, value: object, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name}: expected the {what} as a torch.Tensor, got {type(value).__name__}"
        )
    if value.is_complex():
        raise ValueError(
            f"{name}: complex {what} ({value.dtype}) is not supported; report the real part"
        )


def _as_array(tensor: torch.Tensor) -> npt.NDArray[Any]:
    """Return the elements as a flat NumPy array that sorts fast and exactly."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype in (torch.float16, torch.bfloat16, torch.bool):
        tensor = tensor.float()  # exact; NumPy has no bfloat16
    array: npt.NDArray[Any] = tensor.reshape(-1).numpy()
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 2:
        # Exact in float32, which NumPy sorts with SIMD, several times faster than int8.
        array = array.astype(np.float32)
    return array


def _distinct_finite(array: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], int]:
    """Return the sorted distinct finite values (in the array's dtype) and the non-finite count."""
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
    """Relative precision of the values: the dtype's, and at least float64's."""
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
    """Return the smallest gap if every sorted distinct value lies on ``min + k * gap``."""
    if distinct.size < 2:
        return None
    if distinct.dtype.kind in "iub":
        distinct = distinct.astype(np.float64)  # integer differences could wrap
    gaps = np.diff(distinct)
    smallest = float(gaps.min())
    span = float(distinct[-1]) - float(distinct[0])
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
    return step if residual <= tolerance else None


def _int_type(lo: int, hi: int) -> tuple[bool, int]:
    """Smallest integer type holding ``[lo, hi]``: ``(signed, bits)``, bits >= 1."""
    if lo >= 0:
        return False, max(hi.bit_length(), 1)
    # Signed b bits hold [-2**(b-1), 2**(b-1) - 1].
    return True, max((-lo - 1).bit_length(), hi.bit_length() if hi > 0 else 0) + 1


def _errors(
    values: npt.NDArray[Any], reference: npt.NDArray[Any]
) -> tuple[float | None, float | None, float | None]:
    """Return max |err|, RMSE and SQNR (dB) over elements finite in both tensors."""
    err = np.subtract(values, reference, dtype=np.float64)
    finite = np.isfinite(err)  # also false where either side is non-finite
    if not finite.all():
        err, reference = err[finite], reference[finite]
    if not err.size:
        return None, None, None
    ref = reference.astype(np.float64)
    err_power = float(np.dot(err, err))
    ref_power = float(np.dot(ref, ref))
    max_abs = float(np.abs(err).max())
    rmse = math.sqrt(err_power / err.size)
    if err_power == 0.0:
        sqnr = math.inf
    elif ref_power == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(ref_power / err_power)
    return max_abs, rmse, sqnr


def _violations(entry: TensorReport, family: str, signed: bool, bits: int) -> list[Violation]:
    kind = _int_type_text(signed, bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    expected = f"expected integers for {kind} [{lo}, {hi}]"
    found: list[str] = []
    if entry.nonfinite:
        found.append(f"{entry.nonfinite} non-finite values")
    if not entry.on_integer_grid:
        grid = f" (step {_num(entry.step)})" if entry.step is not None else ""
        found.append(f"non-integer values{grid}")
    elif entry.min is not None and entry.max is not None and (entry.min < lo or entry.max > hi):
        found.append(f"range [{_num(entry.min)}, {_num(entry.max)}]")
    return [Violation(entry.name, family, f"{expected}, found {f}") for f in found]


def _check_limits(limits: Mapping[str, tuple[bool, int]]) -> dict[str, tuple[bool, int]]:
    checked: dict[str, tuple[bool, int]] = {}
    for family, limit in limits.items():
        key = f"limits.{family}"
        if not isinstance(family, str):
            raise ConfigError(f"expected a family name, got {family!r}", key="limits")
        if not isinstance(limit, tuple | list) or len(limit) != 2:
            raise ConfigError(f"expected (signed, bits) such as (True, 8), got {limit!r}", key=key)
        signed, bits = limit
        if not isinstance(signed, bool):
            raise ConfigError(f"expected signed as true or false, got {signed!r}", key=key)
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
            raise ConfigError(f"expected bits as an integer >= 1, got {bits!r}", key=key)
        checked[family] = (signed, bits)
    return checked


# --- encoding ---------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_bits(name: str, *, key: str = "dtype") -> int:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"expected a torch dtype name such as 'float32', got {name!r}", key=key)
    return dtype.itemsize * 8


def _encode_float(value: float | None) -> float | str | None:
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


def _mapping(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {value!r:.60}", key=key)
    return value


def _check_keys(
    data: Mapping[str, Any], *, required: Iterable[str], optional: Iterable[str], key: str
) -> None:
    required = list(required)
    known = [*required, *optional]
    for name in data:
        if name not in known:
            raise ConfigError(f"unknown key {name!r}{did_you_mean(str(name), known)}", key=key)
    for name in required:
        if name not in data:
            raise ConfigError(f"missing key {name!r}", key=key)


# --- text -------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}×"


def _int_type_text(signed: bool | None, bits: int | None) -> str:
    if signed is None or bits is None:
        return ""
    return f"{'signed' if signed else 'unsigned'} {bits}-bit"


def _meta_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _tensor_cells(t: TensorReport) -> list[str]:
    shape = "×".join(str(n) for n in t.shape) or "scalar"
    value_range = "" if t.min is None else f"[{_num(t.min)}, {_num(t.max)}]"
    return [
        t.name,
        t.family or "",
        shape,
        t.dtype,
        t.transform or "",
        str(t.distinct),
        str(t.bits_needed),
        value_range,
        _num(t.step),
        _int_type_text(t.int_signed, t.int_bits),
        str(t.nonfinite) if t.nonfinite else "",
        _num(t.max_abs_error),
        _num(t.rmse),
        _num(t.sqnr_db),
    ]


def _sizes(t: Totals) -> list[str]:
    counts = (t.parameters, t.quantised_parameters, t.float32_bits, t.reported_bits)
    return [f"{n:,}" for n in counts] + [_ratio(t.ratio)]


def _md_row(*cells: str) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def _md(text: str) -> str:
    """Escape a table cell: pipes would split it, newlines would end the row."""
    return text.replace("|", "\\|").replace("\n", " ")
