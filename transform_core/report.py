"""The quantisation report as plain data.

A report describes every tensor written to a quantised checkpoint: how many distinct
values it uses, how many bits those need, the grid they lie on, whether they fit an
integer type, and (given the tensor before quantisation) how much error quantisation
added. :class:`Report` adds totals, per-family totals and an optional check against
hardware limits. Rendering is left to the caller: :meth:`Report.to_dict` gives
JSON-safe data, :meth:`Report.to_json` and :meth:`Report.to_markdown` give text.

Each tensor is described by :func:`~transform_core.tensor_report.tensor_report`; the
Markdown text comes from :mod:`transform_core.report_markdown`. The names of
:mod:`transform_core.tensor_report` are importable from here as well.

JSON encoding: ``None`` (``null``) means "not applicable" (no step, no reference, no
finite values). The only non-finite numbers a report holds are an SQNR of ``inf``
(exact quantisation) or ``-inf`` (an all-zero reference), an error of ``inf`` (beyond the
float64 range) and a size ratio of ``inf``; :meth:`Report.to_dict` writes these as the
strings ``"inf"`` and ``"-inf"`` (and a NaN, which a report never holds, as ``"nan"``) so
the JSON stays strict and :meth:`Report.from_dict` reads them back. An integer tensor's
``min``, ``max`` and ``step`` are exact JSON integers.

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
from dataclasses import dataclass
from typing import Any

from transform_core.errors import ConfigError
from transform_core.report_markdown import int_type_text, number_text, render_markdown
from transform_core.tensor_report import (
    NON_QUANTISING,
    TensorReport,
    check_keys,
    describe_transform,
    encode_float,
    expect_mapping,
    tensor_report,
)

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

_TOTALS_KEYS = (
    "tensors",
    "parameters",
    "quantised_parameters",
    "quantised_share",
    "float32_bits",
    "reported_bits",
    "ratio",
)


@dataclass(frozen=True)
class Totals:
    """Parameter counts and sizes over a set of tensors.

    Attributes:
        tensors: Number of tensors.
        parameters: Number of elements, all tensors.
        quantised_parameters: Elements of tensors whose transform quantises.
        float32_bits: Size with every floating-point element as a float32 (a complex
            one as two) and integer tensors at their own width.
        reported_bits: Size with quantised tensors at their ``bits_needed`` (for each
            part of a complex element) and the rest at their own dtype's width.
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
        data["ratio"] = encode_float(self.ratio)
        return data

    @classmethod
    def of(cls, entries: Iterable[TensorReport]) -> Totals:
        """Sum up ``entries``.

        Example:
            >>> import torch
            >>> t = Totals.of([tensor_report("w", torch.ones(4), transform="int_quant()")])
            >>> t.float32_bits, t.reported_bits, t.ratio
            (128, 0, inf)
            >>> z = torch.tensor([1 + 1j, 1 - 1j], dtype=torch.complex128)
            >>> t = Totals.of([tensor_report("z", z, transform="int_quant()")])
            >>> t.float32_bits, t.reported_bits
            (128, 4)
        """
        tensors = parameters = quantised = reported = as_float32 = 0
        for entry in entries:
            tensors += 1
            parameters += entry.numel
            # A complex element is two values, each reported on its own.
            parts = 2 if entry.dtype.startswith("complex") else 1
            # Integer tensors (counters, indices) stay at their own width in both columns.
            floating = "float" in entry.dtype or parts == 2
            as_float32 += entry.numel * (32 * parts if floating else entry.dtype_bits)
            if entry.quantised:
                quantised += entry.numel
                reported += entry.numel * entry.bits_needed * parts
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
            TensorReport.from_dict(expect_mapping(e, f"tensors[{i}]"), key=f"tensors[{i}]")
            for i, e in enumerate(entries)
        ]
        limits: dict[str, tuple[bool, int]] = {}
        for family, limit in expect_mapping(data.get("limits", {}), "limits").items():
            limit = expect_mapping(limit, f"limits.{family}")
            check_keys(limit, required=("signed", "bits"), optional=(), key=f"limits.{family}")
            limits[family] = (limit["signed"], limit["bits"])
        return cls.build(tensors, limits=limits, meta=expect_mapping(data.get("meta", {}), "meta"))

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
        return render_markdown(self)


def _violations(entry: TensorReport, family: str, signed: bool, bits: int) -> list[Violation]:
    kind = int_type_text(signed, bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    expected = f"expected integers for {kind} [{lo}, {hi}]"
    found: list[str] = []
    if entry.nonfinite:
        found.append(f"{entry.nonfinite} non-finite values")
    if not entry.on_integer_grid:
        grid = f" (step {number_text(entry.step)})" if entry.step is not None else ""
        found.append(f"non-integer values{grid}")
    elif entry.min is not None and entry.max is not None and (entry.min < lo or entry.max > hi):
        found.append(f"range [{number_text(entry.min)}, {number_text(entry.max)}]")
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
