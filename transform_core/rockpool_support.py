"""Rockpool spiking networks: their parameter families, module registry and parameter files.

Rockpool ``TorchModule`` networks (``Sequential``, ``Residual``, ``LinearTorch``,
``LIFTorch``, ...) are torch modules with a second bookkeeping layer on top: each module
keeps its own registry of sub-modules and of attributes, each attribute with a kind
(``Parameter``, ``State``, ``SimulationParameter``) and an optional family (``"weights"``,
``"taus"``, ``"decays"``, ``"bitshifts"``, ``"thresholds"``, ``"bias"``, ``"biases"``).
This module reads that registry and keeps it in step when patching replaces a sub-module.

Nothing here imports Rockpool: a module is recognised as a Rockpool module only once the
caller has imported Rockpool to build it, so the rest of the library never needs it.

Rockpool names families with plain strings but compares them by identity, so a family read
from a YAML file matches nothing there; here, as everywhere in this library, families are
compared by equality.

Example:
    >>> from torch import nn
    >>> is_rockpool_module(nn.Linear(2, 2)), dict(declared_families(nn.Linear(2, 2)))
    (False, {})
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from transform_core.errors import CheckpointError, did_you_mean

__all__ = [
    "declared_families",
    "is_rockpool_module",
    "load_rockpool_params",
    "main_output",
    "reset_state",
    "sync_submodule",
]

# Rockpool keeps these per module, under ``ModuleBase``'s name-mangled attribute names:
# attributes as name -> [value, kind, family, init_func, shape]; sub-modules as
# name -> [module, class name].
_ATTRIBUTES = "_ModuleBase__registered_attributes"
_MODULES = "_ModuleBase__modules"


def is_rockpool_module(module: object) -> bool:
    """Whether ``module`` is a Rockpool module (of any backend), without importing Rockpool.

    User subclasses of Rockpool's ``TorchModule`` count too, wherever they are defined.

    Example:
        >>> from torch import nn
        >>> is_rockpool_module(nn.ReLU())
        False
    """
    base_module = sys.modules.get("rockpool.nn.modules.module")
    base = getattr(base_module, "ModuleBase", None)
    return isinstance(base, type) and isinstance(module, base)


def _registry(module: nn.Module, name: str) -> dict[str, Any]:
    registry = vars(module).get(name)
    return registry if isinstance(registry, dict) else {}


def declared_families(module: nn.Module) -> Mapping[str, str]:
    """The families a Rockpool module registers for its own parameters: attribute -> family.

    Only trainable ``Parameter`` attributes count, as in Rockpool's own
    ``module.parameters(family)``; states and simulation parameters are left out, so a
    transform never replaces a state that the forward pass updates.

    Args:
        module: Any torch module; a module that is not a Rockpool module declares nothing.

    Returns:
        Attribute name -> family name, for the attributes that have a family.
    """
    if not is_rockpool_module(module):
        return {}
    families: dict[str, str] = {}
    for attr, entry in _registry(module, _ATTRIBUTES).items():
        if (
            isinstance(entry, (tuple, list))
            and len(entry) > 2
            and entry[1] == "Parameter"
            and isinstance(entry[2], str)
        ):
            # str() drops any str subclass; the family is compared by value from here on.
            families[attr] = str(entry[2])
    return families


def sync_submodule(parent: nn.Module, name: str, child: nn.Module) -> None:
    """Record ``child`` as sub-module ``name`` in a Rockpool parent's own registry.

    Patching replaces sub-modules in torch's ``_modules``, which Rockpool's forward pass
    reads; Rockpool's indexing (``net[0]``), ``modules()``, ``parameters()``, ``state()``
    and ``as_graph()`` read the parent's registry, which must hold the same module. Setting
    the attribute instead would let Rockpool convert the wrapper into a Rockpool module.

    Args:
        parent: The module whose child was replaced; nothing happens unless it is a
            Rockpool module that registered ``name``.
        name: The child's attribute name.
        child: The new child (a wrapper, or the module it wrapped).
    """
    if not is_rockpool_module(parent):
        return
    registry = _registry(parent, _MODULES)
    if name in registry:
        registry[name] = [child, type(child).__name__]


def main_output(result: Any) -> Tensor:
    """The output tensor of a forward call, in either calling convention.

    A Rockpool module returns ``(output, state, record)``; after Rockpool's
    ``.to_torch()``, or for a plain torch module, the output tensor itself.

    Args:
        result: What calling the network returned.

    Returns:
        The output tensor.

    Raises:
        TypeError: If ``result`` is neither a tensor nor a tuple starting with one.

    Example:
        >>> out = torch.ones(2)
        >>> main_output((out, {}, {})) is out, main_output(out) is out
        (True, True)
    """
    if isinstance(result, Tensor):
        return result
    if isinstance(result, tuple) and result and isinstance(result[0], Tensor):
        return result[0]
    raise TypeError(
        f"expected a forward call to return a tensor or a tuple starting with one, "
        f"got {type(result).__name__}"
    )


def _unwrap(module: nn.Module) -> nn.Module:
    # Patching wrappers hold the module they wrap as ``_mod``; they hold no tensors of
    # their own. Imported here because patching imports this module.
    from transform_core.patching import ActWrapper, TWrapper

    while isinstance(module, (TWrapper, ActWrapper)):
        module = module._mod
    return module


def _rockpool_tree(net: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Qualified name and module of each module of ``net``, seeing through wrappers."""
    module = _unwrap(net)
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _rockpool_tree(child, f"{prefix}.{name}" if prefix else name)


def reset_state(net: nn.Module) -> int:
    """Reset the state (membrane potentials, synaptic currents, ...) of every Rockpool module.

    Rockpool modules carry their state from one call to the next, as a recurrent network
    does; reset it before each independent input, for example each training batch.

    Args:
        net: A network, patched or not; Rockpool modules anywhere in it are reset, also
            inside plain torch containers.

    Returns:
        The number of Rockpool modules whose ``reset_state()`` was called (each resets its
        own sub-modules).
    """
    count = 0
    done: list[str] = []
    for path, module in _rockpool_tree(net):
        if not is_rockpool_module(module) or any(_within(path, p) for p in done):
            continue  # not Rockpool, or reset already with its Rockpool parent
        cast(Any, module).reset_state()
        done.append(path)
        count += 1
    return count


def _within(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(f"{ancestor}.")


# --------------------------------------------------------------------------------------
# Rockpool parameter files


_FORMAT_HINT = "a Rockpool parameter file written by net.save(path)"


def load_rockpool_params(net: nn.Module, path: str | Path, *, strict: bool = True) -> list[str]:
    """Load a Rockpool parameter file (from ``net.save(path)``) into ``net``, checking it.

    Whole Rockpool networks cannot be pickled (their modules hold lambdas), so they are
    kept either as a torch ``state_dict`` or as Rockpool's JSON parameter file. That file
    nests one object per sub-module; each value is JSON text (``"[0.1, 0.2]"``), or
    ``null`` for a callable. Unlike Rockpool's ``net.load(path)``, which overwrites tensors
    whatever their shape, this checks every name and shape, and keeps each tensor object
    (an optimiser holding it keeps working). ``net`` may be patched: values go to the
    wrapped modules.

    Tensors (parameters, and simulation parameters held as tensors) are loaded. Other
    settings (``dt``, ``noise_std``, ``leak_mode``, ...) define the architecture: with
    ``strict``, each must equal the network's own. The file holds no states.

    Args:
        net: The network, built with the architecture the file was saved from.
        path: The JSON file.
        strict: Also require every parameter of ``net`` to be in the file, and every
            setting in the file to match the network's.

    Returns:
        The qualified names of the tensors loaded, as in the un-patched ``state_dict()``.

    Raises:
        CheckpointError: If the file is missing or not valid JSON, or names a sub-module or
            attribute that ``net`` lacks, or a shape differs; with ``strict``, also if a
            parameter is missing or a setting differs.

    Example:
        >>> import tempfile, os
        >>> from rockpool.nn.modules import LinearTorch
        >>> lin = LinearTorch((2, 1))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     lin.save(os.path.join(tmp, "net.json"))
        ...     load_rockpool_params(LinearTorch((2, 1)), os.path.join(tmp, "net.json"))
        ['weight']
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"no such file; expected {_FORMAT_HINT}", path=str(file)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"cannot read it ({err}); expected {_FORMAT_HINT}", path=str(file)
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"not valid JSON ({err.msg}, column {err.colno}); expected {_FORMAT_HINT}",
            path=str(file),
            line=err.lineno,
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"expected a JSON object of module names, found {type(data).__name__}; "
            f"expected {_FORMAT_HINT}",
            path=str(file),
        )
    loader = _Loader(str(file), strict)
    with torch.no_grad():
        loader.load(_unwrap(net), data, "")
    if strict:
        missing = [
            _join(p, attr)
            for p, module in _rockpool_tree(net)
            for attr, value in module._parameters.items()
            if value is not None and _join(p, attr) not in loader.loaded
        ]
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise CheckpointError(
                f"{len(missing)} parameter(s) of the network are not in the file: {shown}; "
                "build the network with the architecture the file was saved from, or "
                "pass strict=False to keep their current values",
                path=str(file),
            )
    return loader.loaded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Loader:
    """Walks a parsed parameter file alongside the network, loading and checking."""

    def __init__(self, path: str, strict: bool) -> None:
        self.path = path
        self.strict = strict
        self.loaded: list[str] = []

    def error(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(message, path=self.path, key=key or "<root>")

    def load(self, module: nn.Module, node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            where = _join(prefix, key)
            if isinstance(value, dict):
                child = module._modules.get(key)
                if child is None:
                    names = [n for n, m in module._modules.items() if m is not None]
                    raise self.error(
                        where,
                        f"names no sub-module of {type(module).__name__}; it has "
                        f"{names or 'none'}{did_you_mean(key, names)}; build the network "
                        "with the architecture the file was saved from",
                    )
                self.load(_unwrap(child), value, where)
            else:
                self.load_value(module, key, value, where)

    def load_value(self, module: nn.Module, key: str, value: Any, where: str) -> None:
        known = _attribute_names(module)
        if key not in known:
            raise self.error(
                where,
                f"names no parameter or setting of {type(module).__name__}; it has "
                f"{sorted(known) or 'none'}{did_you_mean(key, known)}",
            )
        if value is None:
            return  # a callable (e.g. a surrogate gradient): not stored in the file
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise self.error(
                    where, f"expected JSON text as value, found {value[:40]!r} ({err.msg})"
                ) from None
        current: Tensor | None = module._parameters.get(key)
        if current is None:
            current = module._buffers.get(key)
        if current is not None:
            self.load_tensor(current, value, where)
        elif self.strict:
            self.check_setting(getattr(module, key, None), value, where)

    def load_tensor(self, current: Tensor, value: Any, where: str) -> None:
        try:
            new = torch.as_tensor(value, dtype=current.dtype)
        except (TypeError, ValueError, RuntimeError) as err:
            raise self.error(
                where, f"expected a number or a nested list of numbers, found {value!r} ({err})"
            ) from None
        if new.shape != current.shape:
            raise self.error(
                where,
                f"expected shape {tuple(current.shape)}, found {tuple(new.shape)}; build the "
                "network with the sizes the file was saved with",
            )
        current.copy_(new)
        self.loaded.append(where)

    def check_setting(self, current: Any, value: Any, where: str) -> None:
        if _same_setting(current, value):
            return
        raise self.error(
            where,
            f"the network has {current!r}, the file has {value!r}; build the network with "
            "the file's setting, or pass strict=False to keep the network's",
        )


def _attribute_names(module: nn.Module) -> set[str]:
    names = set(_registry(module, _ATTRIBUTES))
    names.update(k for k, v in module._parameters.items() if v is not None)
    names.update(k for k, v in module._buffers.items() if v is not None)
    return names


def _same_setting(current: Any, value: Any) -> bool:
    if callable(current):
        return True  # Rockpool writes callables (surrogate gradients) as null
    if isinstance(current, (str, bool)) or isinstance(value, (str, bool)) or current is None:
        return bool(current == value)
    if isinstance(current, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(float(current), float(value), rel_tol=1e-6, abs_tol=1e-12)
    # Arrays and lists: Rockpool depends on numpy, so it is there whenever a file is read.
    import numpy as np

    try:
        return bool(np.allclose(np.asarray(current, dtype=float), np.asarray(value, dtype=float)))
    except (TypeError, ValueError):
        return bool(current == value)
