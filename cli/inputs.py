"""Reading what a command is given: networks, patched checkpoints and their plans.

Each function turns command-line values into library objects, or raises a
:class:`~transform_core.errors.RockqError` that names the file or option at fault. torch
and the library are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_PATCHED = "a patched checkpoint written by 'rockq patch'"

# Endings a default output name replaces, longest first so that a patched checkpoint's
# double ending goes as a whole.
_ENDINGS = (".patched.safetensors", ".safetensors", ".pt", ".pth", ".bin", ".json")


def arch_kwargs(text: str | None) -> dict[str, Any] | None:
    """Parse ``--arch-kwargs``: a JSON object, or ``None`` when the option was not given.

    Example:
        >>> arch_kwargs('{"hidden": 64}')
        {'hidden': 64}

    Raises:
        RockqError: Not valid JSON, or JSON that is not an object.
    """
    from transform_core.errors import RockqError

    if text is None:
        return None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise RockqError(
            f"is not valid JSON ({err.msg} at column {err.colno}); give an object such as "
            "'{\"hidden\": 64}'",
            key="--arch-kwargs",
        ) from None
    except _NotJson as err:
        raise RockqError(
            f"holds {err}, which JSON does not have; give finite numbers", key="--arch-kwargs"
        ) from None
    except RecursionError:
        raise RockqError(
            "is nested too deeply to read; give an object such as '{\"hidden\": 64}'",
            key="--arch-kwargs",
        ) from None
    if not isinstance(value, dict):
        raise RockqError(f"must be a JSON object, got {type(value).__name__}", key="--arch-kwargs")
    return value


class _NotJson(ValueError):
    """A value Python's JSON reader takes but JSON does not have."""


def _no_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which would also make the output's metadata invalid JSON."""
    raise _NotJson(name)


def load_model(
    model: Path, arch: str | None, arch_kwargs_text: str | None, trust: list[str] | None
) -> Any:
    """Load the network (or bare tensors) named on the command line, safely.

    Returns:
        A :class:`~transform_core.checkpoint.LoadedNetwork`.
    """
    from transform_core.checkpoint import load_network

    return load_network(
        model, arch=arch, arch_kwargs=arch_kwargs(arch_kwargs_text), trust=trust or ()
    )


def check_finite(named: Iterable[tuple[str, Any]], path: Path) -> None:
    """Refuse the first floating-point tensor that holds a NaN or an Inf.

    Args:
        named: ``(name, tensor)`` pairs, such as a state dict's items.
        path: The file they came from, for the message.

    Raises:
        CheckpointError: Names the tensor, how many values are not finite, and the way out.
    """
    import torch

    from transform_core.errors import CheckpointError

    for name, tensor in named:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if tensor.itemsize == 1:
            tensor = tensor.float()  # float8 has no sum; float32 holds its values exactly
        # A finite sum means every value is finite (NaN and Inf propagate), and a sum reads
        # the tensor once without a mask: over ten times faster than isfinite().all().
        # Only a sum that is not finite (or overflowed) needs the check value by value.
        if math.isfinite(tensor.sum().item()):
            continue
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"holds {bad} NaN or Inf value(s); fix the input, or pass --allow-nonfinite "
                "to quantise it anyway (NaN stays NaN, Inf saturates)",
                path=str(path),
                key=name,
            )


def read_files(*given: Path | str | None) -> list[Path]:
    """The files among a command's arguments, which its outputs must never overwrite.

    A recipe argument may be a built-in name rather than a file; it counts only when a
    file of that name exists.

    Example:
        >>> read_files(Path("missing.pt"), "xylo", None)
        []
    """
    return [Path(p) for p in given if p is not None and Path(p).exists()]


def default_output(source: Path, suffix: str) -> Path:
    """The output beside ``source``: its name without a known ending, plus ``suffix``.

    Example:
        >>> default_output(Path("runs/net.patched.safetensors"), ".quantised.safetensors")
        PosixPath('runs/net.quantised.safetensors')
    """
    name = source.name
    for ending in _ENDINGS:
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return source.with_name(name + suffix)


def load_patched_plan(
    checkpoint: Path,
    *,
    trust: list[str] | None,
    no_network: str,
    seed: int | None = None,
    not_patched_fix: str = "",
) -> tuple[Any, Any]:
    """Read a patched checkpoint, rebuild its network and plan its recipe on it again.

    Args:
        checkpoint: The file from ``rockq patch``.
        trust: Packages its embedded network may use.
        no_network: Ends the refusal of a checkpoint without a network: what the network
            was needed for, and what to do instead.
        seed: Overrides the seed the checkpoint recorded.
        not_patched_fix: Ends the refusal of another kind of file with a second way out.

    Returns:
        The :class:`~transform_core.checkpoint.PatchedCheckpoint` and its
        :class:`~transform_core.pipeline.Plan`.

    Raises:
        CheckpointError: A missing file, a damaged safetensors header, another kind of
            file, or no network in it.
    """
    from transform_core.checkpoint import is_patched, load_patched
    from transform_core.errors import CheckpointError
    from transform_core.imports import named_in_file
    from transform_core.pipeline import plan_network
    from transform_core.recipe import parse_recipe
    from transform_core.safetensors_io import is_safetensors, read_header, require_file

    require_file(checkpoint, expected=_PATCHED)
    if is_safetensors(checkpoint):
        read_header(checkpoint)  # a damaged header says what is wrong, not "not patched"
    if not is_patched(checkpoint):
        raise CheckpointError(
            f"is not a patched checkpoint; create one with 'rockq patch MODEL RECIPE'"
            f"{not_patched_fix}",
            path=str(checkpoint),
        )
    ckpt = load_patched(checkpoint, trust=trust or ())
    if ckpt.network is None:
        raise CheckpointError(f"holds no network {no_network}", path=str(checkpoint))
    with named_in_file(str(checkpoint), trust or ()):  # its custom code needs --trust
        recipe = parse_recipe(ckpt.recipe, source=f"{checkpoint} (recipe)")
    plan = plan_network(ckpt.network, recipe, seed=seed if seed is not None else ckpt.seed)
    return ckpt, plan
