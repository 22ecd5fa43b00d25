"""Rich rendering of plans, reports, inventories and listings.

Everything here takes plain data (the ``to_dict()`` of a plan or report, lists of tensor
infos) and prints it; nothing computes. Rich reads a string given to a table or to
``print`` as markup, so every string that comes from the user (a path, a tensor, module,
family or recipe name, rule text) goes through :func:`~rich.markup.escape`: a tensor named
``w[0]`` or a file ``runs/[exp1]/model.pt`` is shown as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape as _escape_markup
from rich.table import Table

from cli.main import one_line


def escape(text: str) -> str:
    """A user's string (a path, a tensor or module name) as plain text on one line: Rich
    markup escaped, and line breaks and control characters shown as ``\\n`` and so on."""
    return _escape_markup(one_line(text))


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _size(bits: int) -> str:
    """Bytes that ``bits`` need, whole bytes rounded up: 590 bits take 74 bytes."""
    size: float = -(-bits // 8)
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def _smaller(before: int, after: int) -> str:
    """How many times smaller ``after`` is than ``before``, as the size lines say it."""
    if not before:
        return "no values"
    if not after:
        return "no bits needed"
    return f"{before / after:.3g}x smaller"


def inventory(
    console: Console,
    rows: Sequence[Mapping[str, Any]],
    title: str,
    tied: Mapping[str, str] | None = None,
) -> None:
    """Every tensor of a network with its family, then totals per family.

    ``tied`` maps each other name of a tensor held in several places to its listed name.
    """
    table = Table(title=escape(title), show_lines=False)
    for column in ("name", "module", "family", "shape", "dtype", "size", "kind"):
        table.add_column(column, justify="right" if column == "size" else "left")
    totals: dict[str, list[int]] = {}
    for row in rows:
        family = row["family"] or "-"
        table.add_row(
            escape(row["name"]),
            escape(row["module_class"] or "-"),
            escape(family),
            "x".join(str(n) for n in row["shape"]) or "scalar",
            row["dtype"],
            str(row["numel"]),
            "buffer" if row["is_buffer"] else "param",
        )
        count = totals.setdefault(family, [0, 0])
        count[0] += 1
        count[1] += row["numel"]
    console.print(table)
    summary = Table(title="per family")
    for column in ("family", "tensors", "elements"):
        summary.add_column(column, justify="left" if column == "family" else "right")
    for family, (tensors, elements) in sorted(totals.items()):
        summary.add_row(escape(family), str(tensors), str(elements))
    console.print(summary)
    if tied:
        pairs = ", ".join(f"{other} is {listed}" for other, listed in tied.items())
        console.print(f"[bold]tied[/] (one tensor, listed once): {escape(pairs)}")


def plan(console: Console, data: Mapping[str, Any]) -> None:
    """A dry run: matches per rule, unmatched tensors, overlaps and sizes."""
    table = Table(title=escape(f"recipe {data['recipe']} (seed {data['seed']})"))
    for column in ("rule", "selector", "transform", "matches"):
        table.add_column(column)
    for rule in data["rules"]:
        matches = rule["matches"]
        shown = escape(", ".join(matches[:6])) + (
            f", … (+{len(matches) - 6})" if len(matches) > 6 else ""
        )
        if not matches:
            shown = "[yellow]nothing (optional)[/]" if rule["optional"] else "[red]nothing[/]"
        table.add_row(
            escape(rule["rule"]), escape(rule["selector"]), escape(rule["transform"]), shown
        )
    console.print(table)
    unmatched = data["unmatched_tensors"]
    if unmatched:
        console.print(
            f"[bold]not transformed[/] ({len(unmatched)}): " + escape(", ".join(unmatched))
        )
    for overlap in data["overlaps"]:
        what = overlap.get("tensor") or overlap.get("module")
        console.print(
            f"[bold]overlap[/] {escape(str(what))}: matched by "
            f"{escape(', '.join(overlap['rules']))}; {escape(str(overlap['winner']))} wins"
        )
    for instance in data.get("scale_groups", ()):
        members = ", ".join(
            m["name"] + ("" if m["sets_range"] else " (scaled along)") for m in instance["members"]
        )
        console.print(
            f"[bold]scale group[/] {escape(instance['group'])} (per {escape(instance['per'])}): "
            f"{escape(members)}"
        )
    before, after = data["size_bits"]["before"], data["size_bits"]["after"]
    console.print(
        f"size: {_size(before)} before, {_size(after)} at the recipe's bit widths "
        f"({_smaller(before, after)})"
    )


def report(console: Console, data: Mapping[str, Any], title: str = "quantisation report") -> None:
    """The per-tensor bit-width table and totals."""
    from transform_core.report_markdown import complex_note

    with_reference = any(t.get("max_abs_error") is not None for t in data["tensors"])
    table = Table(title=escape(title))
    columns = [
        "tensor",
        "family",
        "shape",
        "transform",
        "values",
        "bits",
        "integer",
        "min",
        "max",
        "step",
    ]
    if with_reference:
        columns += ["max err", "rmse", "sqnr dB"]
    for column in columns:
        numeric = column in ("values", "bits", "min", "max", "step", "max err", "rmse", "sqnr dB")
        table.add_column(column, justify="right" if numeric else "left")
    for t in data["tensors"]:
        integer = "-"
        if t["on_integer_grid"] and t["int_bits"] is not None:
            integer = f"{'int' if t['int_signed'] else 'uint'}{t['int_bits']}"
        row = [
            escape(t["name"]),
            escape(t["family"] or "-"),
            "x".join(str(n) for n in t["shape"]) or "scalar",
            escape(t["transform"] or "-"),
            str(t["distinct"]),
            str(t["bits_needed"]),
            integer,
            _number(t["min"]),
            _number(t["max"]),
            _number(t["step"]),
        ]
        if with_reference:
            row += [_number(t["max_abs_error"]), _number(t["rmse"]), _number(t["sqnr_db"], 3)]
        table.add_row(*row)
    console.print(table)
    note = complex_note([t["name"] for t in data["tensors"] if t["dtype"].startswith("complex")])
    if note:
        console.print(escape(note))
    totals = data["totals"]
    console.print(
        f"quantised: {totals['quantised_parameters']} of {totals['parameters']} values "
        f"({100 * totals['quantised_share']:.1f}%) in {totals['tensors']} tensors; "
        f"size {_size(totals['float32_bits'])} at float32, {_size(totals['reported_bits'])} "
        f"at the reported bit widths ({_smaller(totals['float32_bits'], totals['reported_bits'])})"
    )
    missing = data.get("meta", {}).get("not_in_reference")
    if missing:
        from transform_core.safetensors_header import count_names

        shown = count_names(missing)
        console.print(escape(f"not in the reference, so without error figures: {shown}"))
    for violation in data.get("violations", []):
        console.print(f"[red]limit[/] {escape(violation['name'])}: {escape(violation['reason'])}")
    present = {t["family"] for t in data["tensors"]}
    unused = [family for family in data.get("limits", {}) if family not in present]
    if unused:
        # A misspelt family would otherwise check nothing without a word.
        from transform_core.errors import did_you_mean

        named = ", ".join(
            f"'{f}'{did_you_mean(f, [p for p in present if p is not None])}" for f in unused
        )
        console.print(
            f"[yellow]limits[/] for {escape(named)} checked no tensor: none has that family"
        )


def transforms(console: Console, specs: Iterable[Any]) -> None:
    """Each transform a recipe can name, with its arguments and defaults."""
    table = Table(title="transforms")
    for column in ("name", "arguments", "description"):
        table.add_column(column)
    for spec in specs:
        args = ", ".join(
            f"{a.name}: {a.type}" + ("" if a.required else f" = {a.default!r}") for a in spec.args
        )
        table.add_row(escape(spec.name), escape(args or "-"), escape(spec.summary))
    console.print(table)


def recipes(console: Console, listing: Mapping[str, str]) -> None:
    """The built-in recipes with their one-line descriptions."""
    table = Table(title="built-in recipes")
    table.add_column("name")
    table.add_column("description")
    for name, description in listing.items():
        table.add_row(escape(name), escape(description))
    console.print(table)


def transforms_markdown(specs: Iterable[Any]) -> str:
    """The transforms table as Markdown, as README shows it (a test keeps README in step)."""
    lines = ["| transform | arguments (defaults) | what it does |", "|---|---|---|"]
    for spec in specs:
        args = ", ".join(
            f"`{a.name}`" + ("" if a.required else f" = `{a.default!r}`") for a in spec.args
        )
        summary = spec.summary.replace("``", "`").replace("|", "\\|")
        lines.append(f"| `{spec.name}` | {args or '-'} | {summary} |")
    return "\n".join(lines)
