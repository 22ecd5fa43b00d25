"""Loading networks safely from the inputs rockq accepts.

Networks come from four kinds of input, picked by :func:`load_network`:

* **A whole-module pickle** (``torch.save(model)``), loaded without running arbitrary
  code: its globals must be on the allowlist of :mod:`transform_core.safe_pickle`, which
  takes in the packages the user trusts (``trust=["pkg"]``, ``--trust pkg``).
* **A state dict plus an architecture**: a ``.pt``/``.pth`` state dict (loaded with
  ``weights_only``) or safetensors, and ``arch="package.module:factory"`` (with optional
  keyword arguments) that builds the network; keys and shapes must match exactly (see
  :mod:`transform_core.state_dicts`). A Rockpool parameter file (``.json``) takes an
  architecture too.
* **A patched checkpoint** written by ``rockq patch`` (see
  :mod:`transform_core.patched_checkpoint`), rebuilt with the network it records.
* **Tensors only** (no network): a ``.safetensors`` file or a folder of shards with a
  ``*.safetensors.index.json``, read tensor by tensor (see :mod:`transform_core.safetensors_io`).

The functions of those modules that callers use are importable from here as well.

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
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from transform_core.errors import CheckpointError
from transform_core.files import KNOWN_FORMATS, PathLike, read_input, sha256_file
from transform_core.patched_checkpoint import (
    FORMAT_VERSION,
    RESERVED_PREFIX,
    PatchedCheckpoint,
    SourceInfo,
    is_patched,
    load_patched,
    save_patched,
)
from transform_core.rockpool_support import load_rockpool_params
from transform_core.safe_pickle import check_trust, load_pickled_module, module_from_bytes
from transform_core.safetensors_io import TensorSource, open_tensors
from transform_core.state_dicts import (
    build_from_arch,
    build_loaded,
    load_state_dict_file,
    load_state_dict_strict,
    looks_like_safetensors,
    refuse_shard_index,
)

__all__ = [
    "FORMAT_VERSION",
    "RESERVED_PREFIX",
    "LoadedNetwork",
    "PatchedCheckpoint",
    "SourceInfo",
    "build_from_arch",
    "build_loaded",
    "is_patched",
    "load_network",
    "load_patched",
    "load_pickled_module",
    "load_state_dict_file",
    "load_state_dict_strict",
    "save_patched",
    "sha256_file",
]


class LoadedNetwork:
    """What :func:`load_network` returns.

    Attributes:
        module: The network, or ``None`` in tensor mode.
        tensors: The tensor reader, in tensor mode.
        network_bytes: The whole-module pickle exactly as loaded, for embedding in a
            patched checkpoint.
    """

    def __init__(
        self,
        module: nn.Module | None,
        source: SourceInfo | Callable[[], SourceInfo],
        tensors: TensorSource | None = None,
        network_bytes: bytes | None = None,
    ) -> None:
        self.module = module
        self.tensors = tensors
        self.network_bytes = network_bytes
        self._source = source

    @property
    def source(self) -> SourceInfo:
        """Where it came from. In tensor mode the input's SHA-256 is found when first asked
        for: after ``tensors.iter_tensors(digest=True)`` has read every file, without
        reading them again."""
        if callable(self._source):
            self._source = self._source()
        return self._source

    def __repr__(self) -> str:
        kind = "tensors" if self.module is None else type(self.module).__name__
        return f"LoadedNetwork({kind})"


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
    trusted = check_trust(trust)
    kwargs = _check_kwargs(arch_kwargs)
    if arch is None and arch_kwargs is not None:
        raise CheckpointError(
            "are given without arch (--arch), the factory they are for; name the factory "
            "'package.module:function', or leave them out",
            key="arch_kwargs",
        )
    label = str(path)
    target = Path(path)
    if not target.exists():
        raise CheckpointError(f"no such file or folder; expected {KNOWN_FORMATS}", path=label)
    refuse_shard_index(path)
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
        module = build_loaded(arch, kwargs, state, path=label)
        del state  # the network holds the loaded tensors now
        digest = open_tensors(path).sha256() if target.is_dir() else sha256_file(path)
        info = SourceInfo("arch", label, digest, arch=arch, arch_kwargs=kwargs, trust=trusted)
        return LoadedNetwork(module, info)
    if looks_like_safetensors(path):
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

        def describe() -> SourceInfo:
            return SourceInfo("tensors", label, tensors.sha256(), trust=trusted)

        return LoadedNetwork(None, describe, tensors)
    data = read_input(path)
    module = module_from_bytes(data, label, trusted)
    info = SourceInfo("pickle", label, hashlib.sha256(data).hexdigest(), trust=trusted)
    return LoadedNetwork(module, info, network_bytes=data)
