"""The quantisation report as a Markdown document.

The document has the report's meta facts, a table of tensors, the totals, a table of
families and, when limits were checked, the limits and the tensors outside them. Table
cells are escaped, so a name with a pipe or a newline cannot break a table.

Example:
    >>> import torch
    >>> from transform_core.report import Report, tensor_report
    >>> report = Report.build([tensor_report("w", torch.tensor([0.0, 1.0]))], meta={"seed": 0})
    >>> print("\\n".join(render_markdown(report).splitlines()[:6]))
    # Quantisation report
    <BLANKLINE>
    - seed: 0
    <BLANKLINE>
    ## Tensors
    <BLANKLINE>
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transform_core.report import Report, Totals
    from transform_core.tensor_report import TensorReport

__all__ = ["complex_note", "int_type_text", "number_text", "render_markdown"]


def render_markdown(report: Report) -> str:
    """Return ``report`` as a readable Markdown document.

    Args:
        report: The report.

    Returns:
        The document, ending in a newline.
    """
    lines = ["# Quantisation report", ""]
    if report.meta:
        lines += [f"- {_md(k)}: {_md(_meta_text(v))}" for k, v in report.meta.items()] + [""]
    lines += [
        "## Tensors",
        "",
        "| name | family | shape | dtype | transform | distinct | bits | range | step "
        "| integer type | non-finite | max abs error | rmse | SQNR dB |",
        "|" + "---|" * 14,
    ]
    lines += [_md_row(*_tensor_cells(t)) for t in report.tensors]
    note = complex_note([t.name for t in report.tensors if t.dtype.startswith("complex")])
    if note:
        lines += ["", _md(note)]
    totals = report.totals
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
        for family, sums in report.families.items()
    ]
    if report.limits:
        lines += ["", "## Hardware limits", ""]
        lines += [f"- {_md(f)}: {int_type_text(s, b)}" for f, (s, b) in report.limits.items()]
        lines.append("")
        if report.ok:
            lines.append("All tensors are within their limits.")
        else:
            lines += [f"- **{_md(v.name)}**: {_md(v.reason)}" for v in report.violations]
    return "\n".join(lines) + "\n"


def complex_note(names: list[str], limit: int = 3) -> str:
    """The line a report adds under its table when it holds complex tensors, else ``""``.

    Example:
        >>> complex_note(["z"])
        "Complex tensors ('z') are described by their real and imaginary parts: values, bits, range, step, non-finite and errors count each part."
        >>> complex_note([])
        ''
    """
    if not names:
        return ""
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (
        f"Complex tensors ({shown}{more}) are described by their real and imaginary parts: "
        "values, bits, range, step, non-finite and errors count each part."
    )


def number_text(value: int | float | None) -> str:
    """A number as reports show it: six significant digits, ``""`` for ``None``.

    An ``int`` (an integer tensor's value) is shown in full: int64 values differ past six
    digits.

    Example:
        >>> number_text(0.1 + 0.2), number_text(None), number_text(2**53 + 1)
        ('0.3', '', '9007199254740993')
    """
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}×"


def int_type_text(signed: bool | None, bits: int | None) -> str:
    """An integer type as reports show it, ``""`` when there is none.

    Example:
        >>> int_type_text(True, 8), int_type_text(None, None)
        ('signed 8-bit', '')
    """
    if signed is None or bits is None:
        return ""
    return f"{'signed' if signed else 'unsigned'} {bits}-bit"


def _meta_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _tensor_cells(t: TensorReport) -> list[str]:
    shape = "×".join(str(n) for n in t.shape) or "scalar"
    value_range = "" if t.min is None else f"[{number_text(t.min)}, {number_text(t.max)}]"
    return [
        t.name,
        t.family or "",
        shape,
        t.dtype,
        t.transform or "",
        str(t.distinct),
        str(t.bits_needed),
        value_range,
        number_text(t.step),
        int_type_text(t.int_signed, t.int_bits),
        str(t.nonfinite) if t.nonfinite else "",
        number_text(t.max_abs_error),
        number_text(t.rmse),
        number_text(t.sqnr_db),
    ]


def _sizes(t: Totals) -> list[str]:
    counts = (t.parameters, t.quantised_parameters, t.float32_bits, t.reported_bits)
    return [f"{n:,}" for n in counts] + [_ratio(t.ratio)]


def _md_row(*cells: str) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def _md(text: str) -> str:
    """Escape a table cell: pipes would split it, newlines would end the row."""
    return text.replace("|", "\\|").replace("\n", " ")
