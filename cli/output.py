"""Where a command's output goes: tables on stdout, progress bars on stderr.

Rich is imported inside the functions, so ``rockq --help`` does not pay for it. Progress
bars show only on a terminal: piped stderr keeps the one-line error contract.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def console(quiet: bool = False) -> Any:
    """A Rich console on stdout; wide off a terminal so that piped tables do not wrap.

    Emoji codes are off: a path or tensor name such as ``a:fire:.weight`` is shown as
    given. Markup stays on for rockq's own styles, so the user's strings that reach it
    (paths, names, rule text) go through :func:`rich.markup.escape` first.
    """
    from rich.console import Console

    return Console(quiet=quiet, width=None if sys.stdout.isatty() else 160, emoji=False)


def show_report(report: Any, quiet: bool, target: Path | None = None) -> None:
    """Print a report's table, and the files written when ``target`` is given."""
    if quiet:
        return
    from rich.markup import escape

    from cli import render
    from transform_core.outputs import report_files

    out = console()
    render.report(out, report.to_dict())
    if target is not None:
        _, json_file, markdown_file = report_files(target)
        out.print(escape(f"wrote {target} and {json_file.name}, {markdown_file.name}"))


@contextmanager
def _bar(quiet: bool, label: str, fields: str) -> Iterator[Any]:
    """A transient progress bar on stderr (label, bar, done of total, fields), or ``None``.

    ``None`` when quiet or off a terminal: there a bar is noise, and Rich would still end
    it with a blank line, which would break the one-line error contract of piped stderr.
    """
    from rich.console import Console

    err = Console(stderr=True)
    if quiet or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    # No markup: the fields show tensor names, which may hold brackets ('w[0]').
    columns = (
        TextColumn(label, markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(fields, markup=False),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        yield progress


@contextmanager
def tensor_progress(quiet: bool, total: int, what: str) -> Iterator[Callable[[str], None]]:
    """A progress bar advanced once per tensor: call it with the tensor's name."""
    with _bar(quiet or total == 0, "{task.description}", "{task.fields[tensor]}") as progress:
        if progress is None:
            yield lambda name: None
            return
        task = progress.add_task(what, total=total, tensor="")
        yield lambda name: progress.update(task, advance=1, tensor=name)


@contextmanager
def training_progress(quiet: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar fed with fine-tuning events: epoch, step, loss and metric.

    Off a terminal the fine-tuning log has the same figures.
    """
    fields = "loss {task.fields[loss]}  metric {task.fields[metric]}"
    with _bar(quiet, "epoch {task.fields[epoch]}", fields) as progress:
        if progress is None:
            yield lambda event: None
            return
        task = progress.add_task("train", total=None, epoch=0, loss="-", metric="-")

        def update(event: dict[str, Any]) -> None:
            shown: dict[str, Any] = {"epoch": event["epoch"], "total": event["total_steps"]}
            if event["kind"] == "train":
                shown["loss"] = f"{event['loss']:.4f}"
            elif event["kind"] == "eval" and event.get("metric") is not None:
                shown["metric"] = f"{event['metric']:.4f}"
            progress.update(task, completed=event["step"], **shown)

        yield update
