"""Loading torch.save pickles without running arbitrary code.

A whole-module pickle (``torch.save(model)``) names the classes and functions it needs
to be rebuilt, and unpickling calls them. Before anything is imported, the pickle's
globals are listed statically and each must be on an allowlist:

* torch's ``nn`` module classes (``torch.nn.modules.*``, ``torch.nn.parameter``);
* the public functions of ``torch.nn.functional`` (activations stored as attributes);
* ``transform_core``'s modules and transforms (``transform_core.quantise``);
* the packages the user trusts (``trust=["pkg"]``, ``--trust pkg`` on the command line).
  Trusting a package lets the pickle call anything defined in it; trust follows where an
  object is defined, so a trusted package's re-export of ``os.system`` stays refused.

Torch's ``weights_only`` unpickler then loads the file with exactly those globals allowed,
besides its own tensor rebuild helpers and plain containers.

Example:
    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/net.pt"
    >>> torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), path)
    >>> [type(m).__name__ for m in load_pickled_module(path)]
    ['Linear', 'ReLU']
    >>> check_trust(["mypkg.models"]), in_packages("mypkg.models.nets", ["mypkg"])
    (('mypkg.models',), True)
"""

from __future__ import annotations

import importlib
import io
import pickletools
import re
import types
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch._utils import IMPORT_MAPPING, NAME_MAPPING

from transform_core.errors import CheckpointError
from transform_core.files import KNOWN_FORMATS, PathLike, read_input
from transform_core.imports import in_packages, is_dotted_name, trust_hint

__all__ = [
    "check_trust",
    "error_line",
    "load_pickle_bytes",
    "load_pickled_module",
    "module_from_bytes",
]


def check_trust(trust: Iterable[str]) -> tuple[str, ...]:
    """Check that every trusted package is a dotted package name; return them as a tuple.

    Raises:
        CheckpointError: An entry such as ``"my-pkg"`` or ``"pkg:fn"``.
    """
    packages = tuple(trust)
    for package in packages:
        if not isinstance(package, str) or not is_dotted_name(package):
            raise CheckpointError(
                f"expected a package name such as 'mypkg' or 'mypkg.models', got {package!r}",
                key="trust",
            )
    return packages


def _pickle_globals(data: bytes, label: str) -> list[tuple[str, str]]:
    """List the (module, name) globals of a torch.save archive without executing it."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        if any(n.endswith("/constants.pkl") for n in names):
            raise CheckpointError(
                "is a TorchScript archive, not a torch.save checkpoint; save the module with "
                "torch.save(model) or pass its state dict with --arch",
                path=label,
            )
        records = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(records) != 1:
            raise CheckpointError(
                "is a zip archive but not a torch.save checkpoint (no single data.pkl record); "
                "save the network with torch.save",
                path=label,
            )
        pickled = archive.read(records[0])
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise CheckpointError(
            f"is not a readable torch.save archive (corrupt or truncated: {err}); re-save it "
            "with torch.save",
            path=label,
        ) from None
    found: list[tuple[str, str]] = []
    try:
        for opcode, arg, _ in pickletools.genops(pickled):
            if opcode.name == "GLOBAL":
                module, name = str(arg).split(" ", 1)
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
                found.append((module, name))
    except (ValueError, EOFError) as err:
        raise CheckpointError(
            f"holds a corrupt pickle ({err}); re-save it with torch.save", path=label
        ) from None
    return found


def _allowed_builtin(module: str, name: str, obj: object) -> bool:
    """Whether a global outside the trusted packages is on the built-in allowlist."""
    if "." in name or name.startswith("_"):
        return False
    if in_packages(module, ["torch.nn.modules", "torch.nn.parameter"]):
        return isinstance(obj, type) and obj.__module__.startswith("torch.nn.")
    if module == "torch.nn.functional":
        if isinstance(obj, types.FunctionType):
            return obj.__module__ == module
        return isinstance(obj, types.BuiltinFunctionType) and obj.__module__ in (
            "torch",
            "torch._C._nn",
        )
    if in_packages(module, ["transform_core"]):
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return in_packages(obj.__module__, ["transform_core"])
        # Wrappers store transforms, which are pure tensor functions; the rest of the
        # package writes files, which a pickle must never be able to call.
        return (
            module == "transform_core.quantise"
            and isinstance(obj, type | types.FunctionType)
            and obj.__module__ == module
        )
    return False


def _builtin_candidate(module: str) -> bool:
    return in_packages(
        module, ["torch.nn.modules", "torch.nn.parameter", "torch.nn.functional", "transform_core"]
    )


def _resolve(module: str, name: str, label: str) -> object:
    full = f"{module}.{name}"
    try:
        obj: object = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except Exception as err:  # importing a trusted package can raise anything
        raise CheckpointError(
            f"the pickle needs global '{full}', which cannot be imported ({type(err).__name__}: "
            f"{err}); install the package that defines it or put it on PYTHONPATH",
            path=label,
        ) from None
    return obj


def _allowlist(
    found: Sequence[tuple[str, str]], unsafe: set[str], trust: tuple[str, ...], label: str
) -> list[Any]:
    # found and unsafe use torch's own name mapping, so every unsafe global is in found;
    # anything else is refused rather than skipped.
    pairs = {f"{module}.{name}": (module, name) for module, name in found}
    for full in sorted(unsafe - pairs.keys()):
        module, _, name = full.rpartition(".")
        pairs[full] = (module, name)
    allowed: list[Any] = []
    for full, (module, name) in pairs.items():
        if full not in unsafe:
            continue  # torch's weights_only unpickler allows it by default
        refusal = f"the pickle needs global '{full}', which is not allowed; {trust_hint(module)}"
        if any(part.startswith("__") for part in name.split(".")):
            raise CheckpointError(refusal, path=label)  # reaches into module internals
        if in_packages(module, trust):
            obj = _resolve(module, name, label)
            if isinstance(obj, types.ModuleType):
                raise CheckpointError(
                    f"the pickle needs global '{full}', which is a module, not a class or "
                    "function; this file cannot be loaded safely",
                    path=label,
                )
            home = getattr(obj, "__module__", None) or module
            if not in_packages(home, trust):
                # A trusted package re-exports something from elsewhere (`from os import
                # system`): trust follows where the object is defined, not where it is found.
                raise CheckpointError(
                    f"the pickle needs global '{full}', which is defined in '{home}' outside "
                    f"the trusted packages; {trust_hint(home)}",
                    path=label,
                )
        elif _builtin_candidate(module):
            obj = _resolve(module, name, label)
            if not _allowed_builtin(module, name, obj):
                raise CheckpointError(refusal, path=label)
        else:
            raise CheckpointError(refusal, path=label)
        allowed.append((obj, full))
    return allowed


def error_line(err: BaseException) -> str:
    """One line of an error from torch or a user's hook, fit for a one-line message.

    Colour codes are removed, torch's ``WeightsUnpickler error:`` line is preferred, and
    a long line is cut at 300 characters.

    Example:
        >>> error_line(RuntimeError("Weights only load failed.\\nWeightsUnpickler error: bad"))
        'bad'
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()
    first = lines[0] if lines else type(err).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def load_pickle_bytes(data: bytes, label: str, trust: tuple[str, ...]) -> object:
    """``torch.load`` with ``weights_only``, allowing exactly the globals the allowlist accepts.

    Args:
        data: The bytes of a zip-format ``torch.save`` file.
        label: Names the data in error messages (the file, usually).
        trust: Packages whose globals the pickle may use (checked by :func:`check_trust`).

    Returns:
        Whatever was saved.

    Raises:
        CheckpointError: Not a zip-format ``torch.save`` file, corrupt, or a global that is
            not allowed (the message names it and the ``--trust`` flag).
    """
    if data[:2] != b"PK":
        kind = (
            "an old-style (non-zip) torch.save file"
            if data[:1] == b"\x80"
            else "not a torch.save file"
        )
        raise CheckpointError(
            f"is {kind}; expected {KNOWN_FORMATS}; re-save the network with a current torch.save",
            path=label,
        )
    found = _pickle_globals(data, label)
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
    except Exception as err:  # torch reports corrupt archives with assorted error types
        raise CheckpointError(
            f"cannot be read as a torch.save archive ({error_line(err)}); re-save it", path=label
        ) from None
    allowed = _allowlist(found, unsafe, trust, label)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler and trusted __setstate__ can raise anything
        raise CheckpointError(
            f"cannot be loaded safely ({error_line(err)}); re-save it with torch.save or pass "
            "its state dict with --arch",
            path=label,
        ) from None


def module_from_bytes(data: bytes, label: str, trust: tuple[str, ...]) -> nn.Module:
    """Load a whole-module pickle from bytes through :func:`load_pickle_bytes`.

    Raises:
        CheckpointError: As :func:`load_pickle_bytes`, or the pickle holds something other
            than an ``nn.Module`` (a state dict gets a hint to pass ``--arch``).
    """
    obj = load_pickle_bytes(data, label, trust)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"holds a state dict ({len(obj)} tensors), not a whole network; pass "
            "--arch package.module:factory to build the network it belongs to",
            path=label,
        )
    raise CheckpointError(
        f"holds a {type(obj).__name__}, expected a torch.nn.Module saved with torch.save(model)",
        path=label,
    )


def load_pickled_module(path: PathLike, *, trust: Iterable[str] = ()) -> nn.Module:
    """Load a whole-module pickle without running code outside the allowlist.

    Args:
        path: A file written by ``torch.save(model)``.
        trust: Packages whose classes and functions the pickle may use.

    Raises:
        CheckpointError: The file is missing, corrupt, not a module, or needs a global
            that is not allowed (the message names it and the ``--trust`` flag).

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/net.pt"
        >>> torch.save(torch.nn.Linear(2, 1), path)
        >>> load_pickled_module(path).weight.shape
        torch.Size([1, 2])
    """
    data = read_input(path)
    return module_from_bytes(data, str(path), check_trust(trust))
