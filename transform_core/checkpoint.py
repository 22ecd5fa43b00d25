"""Loading networks safely, and the patched-checkpoint format.

Networks come from three kinds of input, picked by :func:`load_network`:

* **A whole-module pickle** (``torch.save(model)``), loaded without running arbitrary
  code. The pickle's globals are listed statically first, without importing anything,
  and each must be on an allowlist: torch's ``nn`` module classes (``torch.nn.modules.*``,
  ``torch.nn.parameter``), the public functions of ``torch.nn.functional`` (activations
  stored as attributes), ``transform_core``'s modules and transforms
  (``transform_core.quantise``), and the packages the user trusts (``trust=["pkg"]``,
  ``--trust pkg`` on the command line; trusting a package lets the pickle call anything
  defined in it). Torch's ``weights_only`` unpickler then loads the file with exactly
  those globals allowed, besides its own tensor rebuild helpers and plain containers.
* **A state dict plus an architecture**: a ``.pt``/``.pth`` state dict (loaded with
  ``weights_only``) or safetensors, and ``arch="package.module:factory"`` (with optional
  keyword arguments) that builds the network. Keys and shapes must match exactly.
* **Tensors only** (no network): a ``.safetensors`` file or a folder of shards with a
  ``*.safetensors.index.json``, read tensor by tensor (see :mod:`transform_core.safetensors_io`).

The patched checkpoint
----------------------
``rockq patch`` writes, and ``rockq burn-in``, ``rockq report`` and fine-tuning read, one
self-describing ``.safetensors`` file that loads without unsafe unpickling:

* **Tensors**: the raw ``state_dict`` of the *unpatched* network under its original keys,
  plus extra tensors under the reserved prefix ``__rockq__/``:

  * ``__rockq__/network``: the original whole-module pickle, as a ``uint8`` tensor of its
    bytes, when the source was a pickle. It is loaded through the same allowlist.
  * any other ``__rockq__/NAME``: extra state such as optimiser tensors.

* **Metadata** (string -> string):

  ==========================  ==================================================
  ``rockq.format``            ``"patched"``
  ``rockq.format_version``    ``"1"``
  ``rockq.version``           the rockq version that wrote the file
  ``rockq.recipe``            the recipe text, verbatim
  ``rockq.seed``              the seed as decimal text, or ``""`` for none
  ``rockq.source``            JSON of :class:`SourceInfo`: how to rebuild the network
  ``rockq.state``             JSON object of extra state (step counters and so on)
  ==========================  ==================================================

Rebuilding a network from an architecture recorded in a file imports and runs code named
by that file, so :func:`load_patched` asks the caller to trust the factory's package.

Example:
    >>> import tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3)), f"{folder}/net.pt")
    >>> loaded = load_network(f"{folder}/net.pt")
    >>> loaded.source.kind, type(loaded.module).__name__
    ('pickle', 'Sequential')
    >>> save_patched(f"{folder}/patched.safetensors", loaded.module.state_dict(),
    ...              source=loaded.source, recipe="params: []", seed=3,
    ...              network_bytes=loaded.network_bytes)
    >>> ckpt = load_patched(f"{folder}/patched.safetensors")
    >>> ckpt.seed, ckpt.source.kind, type(ckpt.network).__name__
    (3, 'pickle', 'Sequential')
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import pickletools
import re
import types
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from torch._utils import IMPORT_MAPPING, NAME_MAPPING

from transform_core.errors import CheckpointError
from transform_core.imports import import_reference, is_dotted_name
from transform_core.rockpool_support import load_rockpool_params
from transform_core.safetensors_io import (
    KNOWN_FORMATS,
    PathLike,
    TensorSource,
    is_safetensors,
    open_tensors,
    read_header,
    require_file,
    save_safetensors,
    sha256_file,
)

__all__ = [
    "FORMAT_VERSION",
    "RESERVED_PREFIX",
    "LoadedNetwork",
    "PatchedCheckpoint",
    "SourceInfo",
    "build_from_arch",
    "is_patched",
    "load_network",
    "load_patched",
    "load_pickled_module",
    "load_state_dict_file",
    "load_state_dict_strict",
    "save_patched",
    "sha256_file",
]

SourceKind = Literal["pickle", "arch", "tensors", "patched"]
RESERVED_PREFIX = "__rockq__/"
FORMAT_VERSION = "1"
_NETWORK_KEY = RESERVED_PREFIX + "network"


@dataclass(frozen=True)
class SourceInfo:
    """Where a network came from: everything needed to rebuild it later.

    Attributes:
        kind: ``"pickle"`` (whole-module pickle), ``"arch"`` (state dict + factory),
            ``"tensors"`` (no network) or ``"patched"`` (a patched checkpoint).
        path: The input file or folder, as given.
        sha256: Hex SHA-256 of the input (for a folder: of its index and shard digests).
        arch: The ``package.module:factory`` spec, for ``"arch"`` sources.
        arch_kwargs: Keyword arguments for the factory (JSON values).
        trust: Packages trusted while loading.
        origin: For a ``"patched"`` source, the source the patched checkpoint was made from.

    Example:
        >>> info = SourceInfo("arch", "w.pt", "00", arch="pkg.nets:make", arch_kwargs={"n": 4})
        >>> SourceInfo.from_json(info.to_json()) == info
        True
    """

    kind: SourceKind
    path: str
    sha256: str
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    trust: tuple[str, ...] = ()
    origin: SourceInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "kind": self.kind,
            "path": self.path,
            "sha256": self.sha256,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "trust": list(self.trust),
            "origin": None if self.origin is None else self.origin.to_dict(),
        }

    def to_json(self) -> str:
        """Compact JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any, *, path: str | None = None) -> SourceInfo:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            CheckpointError: Malformed data (``path`` names the file it came from).
        """

        def bad(why: str) -> CheckpointError:
            return CheckpointError(
                f"has a malformed source record: {why}; re-create the file with rockq patch",
                path=path,
                key="rockq.source",
            )

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, found {type(data).__name__}")
        kind = data.get("kind")
        if kind not in ("pickle", "arch", "tensors", "patched"):
            raise bad(f"unknown kind {kind!r}")
        for name in ("path", "sha256"):
            if not isinstance(data.get(name), str):
                raise bad(f"'{name}' must be a string")
        arch, kwargs, trust = data.get("arch"), data.get("arch_kwargs"), data.get("trust", [])
        if arch is not None and not isinstance(arch, str):
            raise bad("'arch' must be a string or null")
        if kind == "arch" and arch is None:
            raise bad("an 'arch' source needs 'arch'")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise bad("'arch_kwargs' must be an object or null")
        if not (isinstance(trust, list) and all(isinstance(t, str) for t in trust)):
            raise bad("'trust' must be a list of strings")
        origin = data.get("origin")
        return cls(
            kind=kind,
            path=data["path"],
            sha256=data["sha256"],
            arch=arch,
            arch_kwargs=kwargs,
            trust=tuple(trust),
            origin=None if origin is None else cls.from_dict(origin, path=path),
        )

    @classmethod
    def from_json(cls, text: str, *, path: str | None = None) -> SourceInfo:
        """Parse :meth:`to_json` output.

        Raises:
            CheckpointError: Not valid JSON, or malformed.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointError(
                f"has a source record that is not valid JSON ({err}); re-create the file",
                path=path,
                key="rockq.source",
            ) from None
        return cls.from_dict(data, path=path)


@dataclass
class LoadedNetwork:
    """What :func:`load_network` returns.

    Attributes:
        module: The network, or ``None`` in tensor mode.
        source: Where it came from.
        tensors: The tensor reader, in tensor mode.
        network_bytes: The whole-module pickle exactly as loaded, for embedding in a
            patched checkpoint.
    """

    module: nn.Module | None
    source: SourceInfo
    tensors: TensorSource | None = None
    network_bytes: bytes | None = field(default=None, repr=False)


# --- safe unpickling -------------------------------------------------------------------


def _check_trust(trust: Iterable[str]) -> tuple[str, ...]:
    packages = tuple(trust)
    for package in packages:
        if not isinstance(package, str) or not is_dotted_name(package):
            raise CheckpointError(
                f"expected a package name such as 'mypkg' or 'mypkg.models', got {package!r}",
                key="trust",
            )
    return packages


def _under(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


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
    if _under(module, ["torch.nn.modules", "torch.nn.parameter"]):
        return isinstance(obj, type) and obj.__module__.startswith("torch.nn.")
    if module == "torch.nn.functional":
        if isinstance(obj, types.FunctionType):
            return obj.__module__ == module
        return isinstance(obj, types.BuiltinFunctionType) and obj.__module__ in (
            "torch",
            "torch._C._nn",
        )
    if _under(module, ["transform_core"]):
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return _under(obj.__module__, ["transform_core"])
        # Wrappers store transforms, which are pure tensor functions; the rest of the
        # package writes files, which a pickle must never be able to call.
        return (
            module == "transform_core.quantise"
            and isinstance(obj, type | types.FunctionType)
            and obj.__module__ == module
        )
    return False


def _builtin_candidate(module: str) -> bool:
    return _under(
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
        top = module.split(".")[0]
        refusal = (
            f"the pickle needs global '{full}', which is not allowed; if you trust package "
            f"'{top}', pass --trust {top}"
        )
        if any(part.startswith("__") for part in name.split(".")):
            raise CheckpointError(refusal, path=label)  # reaches into module internals
        if _under(module, trust):
            obj = _resolve(module, name, label)
            if isinstance(obj, types.ModuleType):
                raise CheckpointError(
                    f"the pickle needs global '{full}', which is a module, not a class or "
                    "function; this file cannot be loaded safely",
                    path=label,
                )
            home = getattr(obj, "__module__", None) or module
            if not _under(home, trust):
                # A trusted package re-exports something from elsewhere (`from os import
                # system`): trust follows where the object is defined, not where it is found.
                home_top = home.split(".")[0]
                raise CheckpointError(
                    f"the pickle needs global '{full}', which is defined in '{home}' outside "
                    f"the trusted packages; if you trust package '{home_top}', pass --trust "
                    f"{home_top}",
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


def _one_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()
    first = lines[0] if lines else type(err).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _safe_load_bytes(data: bytes, label: str, trust: tuple[str, ...]) -> object:
    """torch.load with weights_only, allowing exactly the globals our policy accepts."""
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
            f"cannot be read as a torch.save archive ({_one_line(err)}); re-save it", path=label
        ) from None
    allowed = _allowlist(found, unsafe, trust, label)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler and trusted __setstate__ can raise anything
        raise CheckpointError(
            f"cannot be loaded safely ({_one_line(err)}); re-save it with torch.save or pass "
            "its state dict with --arch",
            path=label,
        ) from None


def _module_from_bytes(data: bytes, label: str, trust: tuple[str, ...]) -> nn.Module:
    obj = _safe_load_bytes(data, label, trust)
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
    data = require_file(path).read_bytes()
    return _module_from_bytes(data, str(path), _check_trust(trust))


# --- architecture + state dict ---------------------------------------------------------


def build_from_arch(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Import ``package.module:factory`` and call it with ``kwargs`` to build a network.

    Raises:
        CheckpointError: A malformed spec, a module that cannot be imported, a missing
            factory, a factory that raises or returns something other than a module.

    Example:
        >>> build_from_arch("torch.nn:Linear", {"in_features": 2, "out_features": 3}).weight.shape
        torch.Size([3, 2])
    """
    factory = import_reference(
        spec,
        noun="factory",
        role="--arch",
        fix="expected a class or function that returns a torch.nn.Module",
        error=CheckpointError,
        key="arch",
    )
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


def _looks_like_safetensors(path: PathLike) -> bool:
    # The suffix decides for files that are too broken to recognise by content, so a
    # damaged .safetensors file gets a safetensors error rather than a pickle one.
    target = Path(path)
    return target.is_dir() or target.suffix == ".safetensors" or is_safetensors(path)


def load_state_dict_file(path: PathLike, *, trust: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pt``/``.pth`` (``weights_only``), safetensors or a shard folder.

    Raises:
        CheckpointError: Missing, corrupt or wrong-format input, or a pickle that holds
            something other than a mapping of names to tensors.
    """
    label = str(path)
    if _looks_like_safetensors(path):
        return open_tensors(path).load_all()
    data = require_file(path).read_bytes()
    obj = _safe_load_bytes(data, label, _check_trust(trust))
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
    return f"{len(items)} {what}{'s' if len(items) != 1 else ''} ({shown})"


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
        >>> load_state_dict_strict(net, {"weight": torch.zeros(3, 2)})
        Traceback (most recent call last):
        ...
        transform_core.errors.CheckpointError: the state dict does not fit the network: 1 missing key (bias); check that --arch and --arch-kwargs build the network these weights came from
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
            f"the state dict does not load into the network ({_one_line(err)})", path=path
        ) from None


# --- entry point -----------------------------------------------------------------------


def _folder_digest(source: TensorSource) -> str:
    digest = hashlib.sha256()
    for file in (source.index_file, *source.files):
        if file is not None:
            digest.update(f"{sha256_file(file)} {file.name}\n".encode())
    return digest.hexdigest()


def _check_kwargs(arch_kwargs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if arch_kwargs is None:
        return None
    kwargs = dict(arch_kwargs)
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"expected JSON values (numbers, strings, lists, objects), got {err}", key="arch_kwargs"
        ) from None
    return kwargs


def load_network(
    path: PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust: Iterable[str] = (),
) -> LoadedNetwork:
    """Load a network (or, for bare tensors, a tensor reader) from ``path``.

    * With ``arch``: ``path`` is a state dict (``.pt``/``.pth``, safetensors or a shard
      folder), loaded strictly into ``build_from_arch(arch, arch_kwargs)``, or a Rockpool
      parameter file (``.json``, from ``net.save(path)``), loaded with
      :func:`~transform_core.rockpool_support.load_rockpool_params`.
    * A patched checkpoint: rebuilt with :func:`load_patched`.
    * Other safetensors files and shard folders: tensor mode, ``module`` is ``None``.
    * Anything else: a whole-module pickle, loaded through the allowlist.

    Args:
        path: The input file or folder.
        arch: ``"package.module:factory"`` that builds the network for a state dict.
        arch_kwargs: Keyword arguments for the factory (JSON values).
        trust: Packages whose globals a pickle may use.

    Raises:
        CheckpointError: Every problem with the input, as one line naming the file and the fix.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save(torch.nn.Linear(2, 3).state_dict(), path)
        >>> loaded = load_network(path, arch="torch.nn:Linear",
        ...                       arch_kwargs={"in_features": 2, "out_features": 3})
        >>> loaded.source.kind, loaded.module.out_features
        ('arch', 3)
    """
    trusted = _check_trust(trust)
    kwargs = _check_kwargs(arch_kwargs)
    label = str(path)
    target = Path(path)
    if not target.exists():
        raise CheckpointError(f"no such file or folder; expected {KNOWN_FORMATS}", path=label)
    if arch is not None and target.suffix == ".json" and target.is_file():
        # Rockpool's own parameter file (net.save(path)): names and shapes are checked.
        module = build_from_arch(arch, kwargs)
        load_rockpool_params(module, target)
        info = SourceInfo(
            "arch", label, sha256_file(path), arch=arch, arch_kwargs=kwargs, trust=trusted
        )
        return LoadedNetwork(module, info)
    if arch is None and target.suffix == ".json" and target.is_file():
        raise CheckpointError(
            "is a JSON file: a Rockpool parameter file (net.save(path)) holds values, not the "
            "network; pass --arch package.module:factory that builds the network",
            path=label,
        )
    if arch is not None:
        state = load_state_dict_file(path, trust=trusted)
        module = build_from_arch(arch, kwargs)
        load_state_dict_strict(module, state, path=label)
        digest = _folder_digest(open_tensors(path)) if target.is_dir() else sha256_file(path)
        info = SourceInfo("arch", label, digest, arch=arch, arch_kwargs=kwargs, trust=trusted)
        return LoadedNetwork(module, info)
    if _looks_like_safetensors(path):
        if not target.is_dir() and is_patched(path):
            ckpt = load_patched(path, trust=trusted)
            info = SourceInfo(
                "patched",
                label,
                ckpt.sha256,
                arch=ckpt.source.arch,
                arch_kwargs=ckpt.source.arch_kwargs,
                trust=trusted,
                origin=ckpt.source,
            )
            return LoadedNetwork(ckpt.network, info, network_bytes=ckpt.network_bytes)
        tensors = open_tensors(path)
        digest = _folder_digest(tensors) if target.is_dir() else sha256_file(path)
        return LoadedNetwork(None, SourceInfo("tensors", label, digest, trust=trusted), tensors)
    data = require_file(path).read_bytes()
    module = _module_from_bytes(data, label, trusted)
    info = SourceInfo("pickle", label, hashlib.sha256(data).hexdigest(), trust=trusted)
    return LoadedNetwork(module, info, network_bytes=data)


# --- the patched checkpoint ------------------------------------------------------------


@dataclass
class PatchedCheckpoint:
    """A patched checkpoint as read by :func:`load_patched`.

    Attributes:
        path: The file.
        sha256: Its SHA-256.
        network: The rebuilt unpatched network with ``state_dict`` loaded, or ``None`` when
            the source was tensors only.
        state_dict: The raw tensors under their original keys.
        source: Where the network originally came from.
        recipe: The recipe text.
        seed: The seed, or ``None``.
        version: The rockq version that wrote the file.
        state: Extra JSON state.
        extra_tensors: Tensors stored under ``__rockq__/`` (prefix removed), except the
            embedded network.
        network_bytes: The embedded whole-module pickle, if any.
    """

    path: str
    sha256: str
    network: nn.Module | None
    state_dict: dict[str, torch.Tensor]
    source: SourceInfo
    recipe: str
    seed: int | None
    version: str
    state: dict[str, Any] = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    network_bytes: bytes | None = field(default=None, repr=False)


def _rockq_version() -> str:
    import transform_core  # at call time the package is fully initialised

    return str(getattr(transform_core, "__version__", "unknown"))


def save_patched(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: SourceInfo,
    recipe: str,
    seed: int | None = None,
    network_bytes: bytes | None = None,
    state: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    force: bool = False,
    inputs: Iterable[PathLike] = (),
) -> None:
    """Write a patched checkpoint (format in the module docstring), atomically.

    Args:
        path: The output ``.safetensors`` file.
        state_dict: The raw state dict of the unpatched network; tied tensors are fine.
        source: Where the network came from (a ``"patched"`` source records its origin).
        recipe: The recipe text.
        seed: The seed used, if any.
        network_bytes: The whole-module pickle, required in effect for ``"pickle"``
            sources; when omitted it is read from ``source.path`` and checked against
            ``source.sha256``.
        state: Extra JSON-ready state.
        extra_tensors: Extra tensors, stored as ``__rockq__/NAME``.
        force: Replace an existing file.
        inputs: Files that must not be overwritten (``source.path`` is always included).

    Raises:
        CheckpointError: The output may not be written, a key uses the reserved prefix, or
            the source pickle changed since it was loaded.
        ValueError: ``state`` is not JSON-ready, or an extra tensor is named ``network``.
    """
    if source.kind == "patched" and source.origin is not None:
        source = source.origin
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(RESERVED_PREFIX):
            raise CheckpointError(
                f"uses the reserved prefix {RESERVED_PREFIX!r}; rename the parameter", key=key
            )
        tensors[key] = tensor
    if source.kind == "pickle":
        if network_bytes is None:
            network_bytes = require_file(source.path).read_bytes()
            if hashlib.sha256(network_bytes).hexdigest() != source.sha256:
                raise CheckpointError(
                    "changed since the network was loaded; load it again", path=source.path
                )
        tensors[_NETWORK_KEY] = torch.frombuffer(bytearray(network_bytes), dtype=torch.uint8)
    for key, tensor in (extra_tensors or {}).items():
        if RESERVED_PREFIX + key == _NETWORK_KEY:
            raise ValueError("the extra tensor name 'network' is reserved for the embedded network")
        tensors[RESERVED_PREFIX + key] = tensor
    try:
        state_json = json.dumps(dict(state or {}), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"state must hold JSON values only: {err}") from None
    metadata = {
        "rockq.format": "patched",
        "rockq.format_version": FORMAT_VERSION,
        "rockq.version": _rockq_version(),
        "rockq.recipe": recipe,
        "rockq.seed": "" if seed is None else str(int(seed)),
        "rockq.source": source.to_json(),
        "rockq.state": state_json,
    }
    save_safetensors(tensors, path, metadata, force=force, inputs=[*inputs, source.path])


def is_patched(path: PathLike) -> bool:
    """Whether ``path`` is a safetensors file whose metadata marks it as a patched checkpoint."""
    if not is_safetensors(path):
        return False
    try:
        return (read_header(path).metadata or {}).get("rockq.format") == "patched"
    except CheckpointError:
        return False


def load_patched(
    path: PathLike, *, trust: Iterable[str] = (), rebuild: bool = True
) -> PatchedCheckpoint:
    """Read a patched checkpoint and rebuild its unpatched network.

    The network comes from the embedded pickle (through the allowlist) or from the
    recorded factory. A factory named in a file is code the file asks to run, so its
    package must be in ``trust``.

    Args:
        path: The patched ``.safetensors`` file.
        trust: Packages the embedded pickle or the recorded factory may use.
        rebuild: Rebuild the network; with ``False`` only tensors and metadata are read,
            ``network`` is ``None`` and nothing needs trusting.

    Raises:
        CheckpointError: Not a patched checkpoint, a newer format version, malformed
            metadata, an untrusted factory, or a network that cannot be rebuilt.
    """
    label = str(path)
    trusted = _check_trust(trust)
    header = read_header(path)
    meta = header.metadata or {}
    fmt = meta.get("rockq.format")
    if fmt != "patched":
        found = "no 'rockq.format' in its metadata" if fmt is None else f"rockq.format {fmt!r}"
        raise CheckpointError(
            f"is not a rockq patched checkpoint ({found}); create one with rockq patch", path=label
        )
    version = meta.get("rockq.format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"has patched-checkpoint format version {version!r}; this rockq reads version "
            f"{FORMAT_VERSION!r}; use the rockq version that wrote it",
            path=label,
            key="rockq.format_version",
        )
    if "rockq.source" not in meta:
        raise CheckpointError(
            "has no 'rockq.source' metadata; re-create it with rockq patch", path=label
        )
    source = SourceInfo.from_json(meta["rockq.source"], path=label)
    seed_text = meta.get("rockq.seed", "")
    try:
        seed = int(seed_text) if seed_text else None
        state = json.loads(meta.get("rockq.state") or "{}")
    except ValueError:
        raise CheckpointError(
            "has malformed rockq.seed or rockq.state metadata; re-create it with rockq patch",
            path=label,
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError("has rockq.state that is not a JSON object", path=label)
    state_dict: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in open_tensors(path).iter_tensors():
        if key.startswith(RESERVED_PREFIX):
            extra[key.removeprefix(RESERVED_PREFIX)] = tensor
        else:
            state_dict[key] = tensor
    embedded = extra.pop("network", None)
    network_bytes = None if embedded is None else embedded.numpy().tobytes()
    network: nn.Module | None = None
    if rebuild and source.kind == "pickle":
        if network_bytes is None:
            raise CheckpointError(
                f"records a pickled network but holds no {_NETWORK_KEY!r} tensor; re-create it "
                "with rockq patch",
                path=label,
            )
        network = _module_from_bytes(network_bytes, f"{label} ({_NETWORK_KEY})", trusted)
    elif rebuild and source.kind == "arch":
        arch = cast(str, source.arch)
        package = arch.partition(":")[0]
        if not _under(package, trusted):
            top = package.split(".")[0]
            raise CheckpointError(
                f"rebuilding the network runs factory '{arch}' named in the file; if you trust "
                f"package '{top}', pass --trust {top}",
                path=label,
            )
        network = build_from_arch(arch, source.arch_kwargs)
    if network is not None:
        fix = "the file is inconsistent; re-create it with rockq patch"
        load_state_dict_strict(network, state_dict, path=label, fix=fix)
    return PatchedCheckpoint(
        path=label,
        sha256=sha256_file(path),
        network=network,
        state_dict=state_dict,
        source=source,
        recipe=meta.get("rockq.recipe", ""),
        seed=seed,
        version=meta.get("rockq.version", "unknown"),
        state=state,
        extra_tensors=extra,
        network_bytes=network_bytes,
    )
