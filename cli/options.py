"""The options several ``rockq`` commands share, each with its help text in one place.

Each name is an :data:`typing.Annotated` type for a command's parameter, for example
``seed: Seed = None``; a command that needs an option of its own declares it inline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

EXIT_LIMITS = 3
"""Exit code of ``rockq report --check`` when a tensor breaks its hardware limit."""

RecipeArg = Annotated[
    str, typer.Argument(metavar="RECIPE", help="Recipe: a YAML file or a built-in name.")
]
PatchedCheckpoint = Annotated[
    Path, typer.Argument(metavar="CHECKPOINT", help="Patched checkpoint from 'rockq patch'.")
]
Arch = Annotated[
    str | None,
    typer.Option(
        help="Factory 'package.module:function' that builds the network for a state-dict "
        "input (imports and runs that code).",
    ),
]
ArchKwargs = Annotated[
    str | None, typer.Option(help="JSON object of keyword arguments for the --arch factory.")
]
Trust = Annotated[
    list[str] | None,
    typer.Option(help="Package whose classes a pickled network may use (repeatable)."),
]
Seed = Annotated[
    int | None, typer.Option(help="Seed for random transforms (default: the recipe's, else 0).")
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
AllowNonfinite = Annotated[
    bool,
    typer.Option("--allow-nonfinite", help="Accept NaN or Inf values in the input's parameters."),
]
Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Training data: a .safetensors file with 'inputs' and 'targets' (and optional "
        "'val_inputs', 'val_targets'), or 'package.module:function' returning "
        "(train_loader, val_loader).",
    ),
]
Device = Annotated[str, typer.Option(help="Where to train: auto, cpu or cuda.")]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue an interrupted run from the output's last checkpoint."),
]


def output_file(value: str) -> Path:
    """Parse an output file option; a path that ends in a separator names a folder.

    ``Path("out/")`` drops the separator, so without this check ``-o newdir/`` would write
    a file named ``newdir``.

    Example:
        >>> output_file("out/model.safetensors")
        PosixPath('out/model.safetensors')
    """
    if value.endswith(("/", os.sep)):
        raise typer.BadParameter(
            f"'{value}' names a folder; give a file path, such as '{value}model.safetensors'"
        )
    return Path(value)
