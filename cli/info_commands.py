"""Commands that show what rockq offers: ``recipes``, ``transforms`` and ``demo``."""

from __future__ import annotations

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
    from cli.quantise_commands import burn_in_command, inspect, patch
    from transform_core.errors import CheckpointError

    folder = Path(tempfile.mkdtemp(prefix="rockq-demo-")) if out_dir is None else out_dir
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(
            "exists and is not a folder; pick another --out-dir", path=str(folder)
        )
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "example.pt"
    patched = folder / "example.patched.safetensors"
    quantised = folder / "example.quantised.safetensors"
    for existing in (model, patched, quantised):
        if existing.exists():
            raise CheckpointError("already exists; pick an empty --out-dir", path=str(existing))
    torch.save(build_example(), model)
    out = console(quiet)
    out.print(f"[bold]1. example network[/] saved to {model}")
    if not quiet:
        inspect(model, debug=debug)
    out.print(f"[bold]2. plan[/] for recipe '{recipe}'")
    patch(model, recipe, dry_run=True, quiet=quiet, debug=debug)
    out.print("[bold]3. patch[/]")
    patch(model, recipe, output=patched, quiet=quiet, debug=debug)
    out.print("[bold]4. burn-in and report[/]")
    burn_in_command(patched, output=quantised, quiet=quiet, debug=debug)
    out.print(f"\nNext: rockq report {quantised} --reference {model}   (files are in {folder})")
