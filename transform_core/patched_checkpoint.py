"""The patched checkpoint: one self-describing safetensors file per patched network.

``rockq patch`` writes, and ``rockq burn-in``, ``rockq report`` and fine-tuning read, one
``.safetensors`` file that loads without unsafe unpickling:

* **Tensors**: the raw ``state_dict`` of the *unpatched* network under its original keys,
  plus extra tensors under the reserved prefix ``__rockq__/``:

  * ``__rockq__/network``: the original whole-module pickle, as a ``uint8`` tensor of its
    bytes, when the source was a pickle. It is loaded through the allowlist of
    :mod:`transform_core.safe_pickle`.
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
    >>> path = tempfile.mkdtemp() + "/net.patched.safetensors"
    >>> source = SourceInfo("arch", "w.pt", "00", arch="torch.nn:Linear",
    ...                     arch_kwargs={"in_features": 2, "out_features": 3})
    >>> save_patched(path, torch.nn.Linear(2, 3).state_dict(), source=source,
    ...              recipe="params: []", seed=3)
    >>> is_patched(path), load_patched(path, rebuild=False).seed
    (True, 3)
    >>> type(load_patched(path, trust=["torch"]).network).__name__
    'Linear'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import nn

from transform_core.errors import CheckpointError
from transform_core.files import PathLike, read_input, sha256_file
from transform_core.imports import in_packages, trust_hint
from transform_core.safe_pickle import check_trust, module_from_bytes
from transform_core.safetensors_header import is_safetensors, read_header
from transform_core.safetensors_io import open_tensors
from transform_core.safetensors_writer import save_safetensors
from transform_core.state_dicts import build_from_arch, load_state_dict_strict

__all__ = [
    "FORMAT_VERSION",
    "RESERVED_PREFIX",
    "PatchedCheckpoint",
    "SourceInfo",
    "is_patched",
    "load_patched",
    "save_patched",
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
            network_bytes = read_input(source.path)
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
    trusted = check_trust(trust)
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
        network = module_from_bytes(network_bytes, f"{label} ({_NETWORK_KEY})", trusted)
    elif rebuild and source.kind == "arch":
        arch = cast(str, source.arch)
        package = arch.partition(":")[0]
        if not in_packages(package, trusted):
            raise CheckpointError(
                f"rebuilding the network runs factory '{arch}' named in the file; "
                f"{trust_hint(package)}",
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
