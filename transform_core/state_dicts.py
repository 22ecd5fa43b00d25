"""State dicts: reading them from files and loading them strictly into a network.

A state dict holds a network's values but not the network, so it comes with an
architecture: ``arch="package.module:factory"`` (``--arch`` on the command line) names a
class or function that builds the network from keyword arguments (``--arch-kwargs``).
The state dict must then fit that network exactly: every key present, no extra key, every
shape equal.

Example:
    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/w.pt"
    >>> torch.save(torch.nn.Linear(2, 3).state_dict(), path)
    >>> net = build_from_arch("torch.nn:Linear", {"in_features": 2, "out_features": 3})
    >>> load_state_dict_strict(net, load_state_dict_file(path))
    >>> sorted(load_state_dict_file(path))
    ['bias', 'weight']
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transform_core.errors import CheckpointError
from transform_core.files import PathLike, read_input
from transform_core.imports import import_reference
from transform_core.safe_pickle import check_trust, error_line, load_pickle_bytes
from transform_core.safetensors_header import is_safetensors
from transform_core.safetensors_io import open_tensors

__all__ = [
    "build_from_arch",
    "build_loaded",
    "load_state_dict_file",
    "load_state_dict_strict",
    "looks_like_safetensors",
    "refuse_shard_index",
]


def build_from_arch(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Import ``package.module:factory`` and call it with ``kwargs`` to build a network.

    Raises:
        CheckpointError: A malformed spec, a module that cannot be imported, a missing
            factory, a factory that raises or returns something other than a module.

    Example:
        >>> build_from_arch("torch.nn:Linear", {"in_features": 2, "out_features": 3}).weight.shape
        torch.Size([3, 2])
    """
    return _call_factory(_import_factory(spec), spec, kwargs)


def _import_factory(spec: str) -> Callable[..., Any]:
    return import_reference(
        spec,
        noun="factory",
        role="--arch",
        fix="expected a class or function that returns a torch.nn.Module",
        error=CheckpointError,
        key="arch",
    )


def _call_factory(
    factory: Callable[..., Any], spec: str, kwargs: Mapping[str, Any] | None
) -> nn.Module:
    try:
        network = factory(**dict(kwargs or {}))
    except Exception as err:  # the user's factory can raise anything
        raise CheckpointError(
            f"factory '{spec}' raised {type(err).__name__}: {err}; check --arch-kwargs",
            key="arch",
        ) from None
    if not isinstance(network, nn.Module):
        raise CheckpointError(
            f"factory '{spec}' returned a {type(network).__name__}, expected a torch.nn.Module",
            key="arch",
        )
    return network


def looks_like_safetensors(path: PathLike) -> bool:
    """Whether ``path`` is to be read as safetensors: a folder, a ``.safetensors`` name or content.

    Example:
        >>> looks_like_safetensors("missing.safetensors"), looks_like_safetensors("missing.pt")
        (True, False)
    """
    # The suffix decides for files that are too broken to recognise by content, so a
    # damaged .safetensors file gets a safetensors error rather than a pickle one.
    target = Path(path)
    return target.is_dir() or target.suffix == ".safetensors" or is_safetensors(path)


def refuse_shard_index(path: PathLike) -> None:
    """Refuse the index file of a sharded checkpoint given where its folder belongs.

    Raises:
        CheckpointError: For a ``*.safetensors.index.json`` file, naming its folder.

    Example:
        >>> try:
        ...     refuse_shard_index("shards/model.safetensors.index.json")
        ... except CheckpointError as err:
        ...     print(err)
        shards/model.safetensors.index.json: is the index of a sharded checkpoint; pass its folder (shards) instead
    """
    target = Path(path)
    if target.name.endswith(".safetensors.index.json"):
        raise CheckpointError(
            f"is the index of a sharded checkpoint; pass its folder ({target.parent}) instead",
            path=str(path),
        )


def load_state_dict_file(path: PathLike, *, trust: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pt``/``.pth`` (``weights_only``), safetensors or a shard folder.

    Raises:
        CheckpointError: Missing, corrupt or wrong-format input, or a pickle that holds
            something other than a mapping of names to tensors.
    """
    label = str(path)
    refuse_shard_index(path)
    if looks_like_safetensors(path):
        return open_tensors(path).load_all()
    data = read_input(path)
    obj = load_pickle_bytes(data, label, check_trust(trust))
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return dict(obj)
    found = (
        f"a dict with keys {', '.join(repr(k) for k in list(obj)[:5])}"
        if isinstance(obj, Mapping)
        else f"a {type(obj).__name__}"
    )
    raise CheckpointError(
        f"expected a state dict (tensor name -> tensor), found {found}; save model.state_dict() "
        "on its own",
        path=label,
    )


def _listing(items: Sequence[str], what: str, limit: int = 3) -> str:
    shown = ", ".join(items[:limit]) + (
        f", ... {len(items) - limit} more" if len(items) > limit else ""
    )
    # "shape mismatch" takes -es, "missing key" an -s.
    plural = "es" if what.endswith(("s", "sh", "ch", "x", "z")) else "s"
    return f"{len(items)} {what}{plural if len(items) != 1 else ''} ({shown})"


_ARCH_FIX = "check that --arch and --arch-kwargs build the network these weights came from"


def load_state_dict_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    path: str | None = None,
    fix: str = _ARCH_FIX,
) -> None:
    """Load ``state`` into ``module``, refusing missing keys, unexpected keys and shape mismatches.

    Args:
        module: The network.
        state: The state dict.
        path: The file ``state`` came from, for the error message.
        fix: What the error message tells the user to do.

    Raises:
        CheckpointError: One line listing the first few problems of each kind with counts.

    Example:
        >>> net = torch.nn.Linear(2, 3)
        >>> try:
        ...     load_state_dict_strict(net, {"weight": torch.zeros(3, 2)})
        ... except CheckpointError as err:
        ...     print(err)
        the state dict does not fit the network: 1 missing key (bias); check that --arch and --arch-kwargs build the network these weights came from
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {list(state[k].shape)}, network {list(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        _listing(items, what)
        for items, what in (
            (missing, "missing key"),
            (unexpected, "unexpected key"),
            (mismatched, "shape mismatch"),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"the state dict does not fit the network: {'; '.join(problems)}; {fix}", path=path
        )
    try:
        module.load_state_dict(dict(state), strict=True)
    except Exception as err:  # custom load hooks can raise anything
        raise CheckpointError(
            f"the state dict does not load into the network ({error_line(err)})", path=path
        ) from None


def build_loaded(
    spec: str,
    kwargs: Mapping[str, Any] | None,
    state: Mapping[str, torch.Tensor],
    *,
    path: str | None = None,
    fix: str = _ARCH_FIX,
) -> nn.Module:
    """Build the network ``spec`` names and load ``state`` into it strictly.

    The network is first built on torch's ``meta`` device, which allocates no storage,
    and then adopts the loaded tensors (``load_state_dict(assign=True)``), so the weights
    are held once rather than twice. A factory that cannot build on ``meta``, or a network
    that would keep a tensor the state dict does not supply (a non-persistent buffer, a
    tensor attribute) or would change a dtype, is built normally and loaded by copy.

    Raises:
        CheckpointError: As :func:`build_from_arch` and :func:`load_state_dict_strict`.

    Example:
        >>> state = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
        >>> net = build_loaded("torch.nn:Linear", {"in_features": 2, "out_features": 3}, state)
        >>> net.weight.data_ptr() == state["weight"].data_ptr(), net.weight.requires_grad
        (True, True)
    """
    module = _build_on_meta(spec, kwargs, state)
    if module is not None:
        try:
            module.load_state_dict(dict(state), strict=True, assign=True)
        except Exception:  # custom load hooks: fall back to the ordinary path below
            module = None
        else:
            if not _holds_meta_tensors(module):
                return module
    module = build_from_arch(spec, kwargs)
    load_state_dict_strict(module, state, path=path, fix=fix)
    return module


class _FirstImport(BaseException):
    """A module was imported for the first time while a network was built on ``meta``.

    A BaseException, so that a factory's ``except Exception`` does not swallow it.
    """


class _RefuseFirstImports(importlib.abc.MetaPathFinder):
    """Stop the building thread at any import of a module not yet loaded.

    Under ``torch.device("meta")`` every tensor made is a meta tensor, including those a
    module makes when it is first imported (a default argument such as Rockpool's
    ``max_spikes_per_dt=torch.tensor(2.0**16)``). Such a tensor would stay on ``meta``
    for the life of the process, so a build that imports anything is abandoned and the
    network built normally instead. Other threads (the kernels loading in the
    background) import as usual.
    """

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if threading.get_ident() == self.thread:
            raise _FirstImport(fullname)


def _build_on_meta(
    spec: str, kwargs: Mapping[str, Any] | None, state: Mapping[str, torch.Tensor]
) -> nn.Module | None:
    try:
        factory = _import_factory(spec)  # its module's tensors are made as usual
    except CheckpointError:
        return None
    guard = _RefuseFirstImports()
    try:
        # Entered before the guard: torch imports what the device context needs.
        with torch.device("meta"):
            sys.meta_path.insert(0, guard)
            module = _call_factory(factory, spec, kwargs)
    except (CheckpointError, _FirstImport):
        return None
    finally:
        if guard in sys.meta_path:
            sys.meta_path.remove(guard)
    expected = module.state_dict()
    fits = set(expected) == set(state) and all(
        tuple(state[k].shape) == tuple(v.shape) and state[k].dtype == v.dtype
        for k, v in expected.items()
    )
    if not fits or _holds_meta_tensors(module, only_outside_state=True):
        return None
    return module


def _holds_meta_tensors(module: nn.Module, *, only_outside_state: bool = False) -> bool:
    """Whether a meta tensor would survive loading: outside the state dict, or anywhere."""
    persistent = {id(t) for t in module.state_dict(keep_vars=True).values()}
    # nn.Module.modules, not module.modules(): Rockpool modules override it with a dict.
    for sub in nn.Module.modules(module):
        tensors = [*sub._parameters.values(), *sub._buffers.values()]
        tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
        for tensor in tensors:
            if tensor is None or not tensor.is_meta:
                continue
            if not only_outside_state or id(tensor) not in persistent:
                return True
    return False
