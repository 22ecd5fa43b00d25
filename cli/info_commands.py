"""Commands that show what rockq offers: ``recipes``, ``transforms`` and ``demo``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer

from cli.options import Debug, Json, Quiet
from cli.output import console


def recipes(
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="Print this built-in recipe.")
    ] = None,
    debug: Debug = False,
) -> None:
    """List the built-in recipes, or print one."""
    from transform_core.recipe import builtin_recipe_text, builtin_recipes

    if name is not None:
        typer.echo(builtin_recipe_text(name), nl=False)
        return
    from cli import render

    render.recipes(console(), builtin_recipes())


def transforms(json_output: Json = False, debug: Debug = False) -> None:
    """List the transforms a recipe can name, with their arguments and defaults."""
    from transform_core.registry import available_transforms

    specs = available_transforms()
    if json_output:
        listing = [
            {
                "name": s.name,
                "summary": s.summary,
                "args": [
                    {"name": a.name, "type": a.type, "required": a.required}
                    | ({} if a.required else {"default": a.default})
                    for a in s.args
                ],
            }
            for s in specs
        ]
        typer.echo(json.dumps(listing, indent=2))
        return
    from cli import render

    render.transforms(console(), specs)


def demo(
    out_dir: Annotated[
        Path | None,
        typer.Option(help="Folder for the example's files (default: a new temporary folder)."),
    ] = None,
    recipe: Annotated[str, typer.Option(help="Recipe to apply (path or built-in name).")] = "int8",
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Run the whole pipeline on a small built-in example network and show the report."""
    import tempfile

    import torch

    from cli.example import build_example
    from transform_core.errors import CheckpointError
    from transform_core.files import atomic_output
    from transform_core.outputs import report_files
    from transform_core.recipe import load_recipe

    load_recipe(recipe)  # a recipe that does not load stops the demo before any write
    folder = Path(tempfile.mkdtemp(prefix="rockq-demo-")) if out_dir is None else out_dir
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(
            "exists and is not a folder; pick another --out-dir", path=str(folder)
        )
    new_folder = out_dir is None or not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"cannot be created ({err.strerror}); pick another --out-dir", path=str(folder)
        ) from err
    model = folder / "example.pt"
    patched = folder / "example.patched.safetensors"
    quantised = folder / "example.quantised.safetensors"
    files = [model, patched, *report_files(quantised)]
    for existing in files:
        if existing.exists():
            raise CheckpointError("already exists; pick an empty --out-dir", path=str(existing))
    try:
        with atomic_output(model) as tmp:
            torch.save(build_example(), tmp)
        _demo_steps(model, recipe, patched, quantised, quiet, debug)
    except BaseException:
        # The files are the demo's own: a failed demo takes them away, so that it can
        # run again in the same folder.
        for file in files:
            file.unlink(missing_ok=True)
        if new_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    from rich.markup import escape

    console(quiet).print(
        escape(f"\nNext: rockq report {quantised} --reference {model}   (files are in {folder})")
    )


def _demo_steps(
    model: Path, recipe: str, patched: Path, quantised: Path, quiet: bool, debug: bool
) -> None:
    """The demo's commands on the example network saved at ``model``."""
    from rich.markup import escape

    from cli.quantise_commands import burn_in_command, inspect, patch

    out = console(quiet)
    out.print(f"[bold]1. example network[/] saved to {escape(str(model))}")
    if not quiet:
        inspect(model, debug=debug)
    out.print(f"[bold]2. plan[/] for recipe '{escape(recipe)}'")
    patch(model, recipe, dry_run=True, quiet=quiet, debug=debug)
    out.print("[bold]3. patch[/]")
    patch(model, recipe, output=patched, quiet=quiet, debug=debug)
    out.print("[bold]4. burn-in and report[/]")
    burn_in_command(patched, output=quantised, quiet=quiet, debug=debug)
