"""Safetensors files: bounded-memory reading of a file or a sharded folder, and the writers.

:func:`open_tensors` opens a ``.safetensors`` file, or a folder of shards with a Hugging
Face ``*.safetensors.index.json``, as a :class:`TensorSource` that knows every tensor's
name, dtype and shape from the validated headers (:mod:`transform_core.safetensors_header`)
and reads the data one tensor at a time.

Writing lives in :mod:`transform_core.safetensors_writer` and checked, atomic file handling
in :mod:`transform_core.files`; their functions are importable from here as well, so this
module is the one place to reach for safetensors files.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import load_file
    >>> folder = tempfile.mkdtemp()
    >>> save_safetensors({"w": torch.ones(2, 3)}, f"{folder}/w.safetensors", {"note": "hi"})
    >>> load_file(f"{folder}/w.safetensors")["w"].shape
    torch.Size([2, 3])
    >>> source = open_tensors(f"{folder}/w.safetensors")
    >>> source.names, source.info("w").shape, source.metadata
    (['w'], (2, 3), {'note': 'hi'})
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from transform_core import kernels
from transform_core.errors import CheckpointError
from transform_core.files import (
    KNOWN_FORMATS,
    PathLike,
    atomic_output,
    check_output_path,
    require_file,
    sha256_file,
    unreadable,
)
from transform_core.safetensors_header import (
    DTYPE_TO_NAME,
    NAME_TO_DTYPE,
    SafetensorsHeader,
    StoredTensor,
    count_names,
    is_safetensors,
    load_json_text,
    read_header,
)
from transform_core.safetensors_writer import (
    SafetensorsWriter,
    TensorSpec,
    WriteBehind,
    save_safetensors,
    write_safetensors,
)

__all__ = [
    "DTYPE_TO_NAME",
    "KNOWN_FORMATS",
    "NAME_TO_DTYPE",
    "PathLike",
    "SafetensorsHeader",
    "SafetensorsWriter",
    "StoredTensor",
    "TensorSource",
    "TensorSpec",
    "WriteBehind",
    "atomic_output",
    "check_output_path",
    "folder_files",
    "is_safetensors",
    "open_tensors",
    "read_header",
    "require_file",
    "save_safetensors",
    "sha256_file",
    "write_safetensors",
]


class TensorSource:
    """The tensors of one safetensors file or of a sharded folder, read one at a time.

    Build one with :func:`open_tensors`. Names, shapes and dtypes come from the headers;
    data is read only by :meth:`get` and :meth:`iter_tensors`, one tensor at a time, so
    memory stays bounded by the largest tensor.

    Attributes:
        path: The file or folder that was opened.
        index_file: The ``*.safetensors.index.json`` of a sharded folder, else ``None``.
        files: The safetensors files, in reading order.
        metadata: The file's ``__metadata__`` (or, for a folder, the index's ``metadata``
            with values as strings).
    """

    def __init__(
        self,
        path: Path,
        headers: Sequence[SafetensorsHeader],
        *,
        index_file: Path | None = None,
        metadata: dict[str, str] | None = None,
        names: Mapping[Path, Sequence[str]] | None = None,
    ) -> None:
        self.path = path
        self.index_file = index_file
        self.files = tuple(header.path for header in headers)
        self.metadata = dict(metadata or {})
        self._infos: dict[str, StoredTensor] = {}
        self._by_file: dict[Path, list[str]] = {}
        self._data_start = {header.path: header.data_start for header in headers}
        self._digests: dict[Path, str] = {}
        for header in headers:
            wanted = set(names[header.path]) if names is not None else set(header.tensors)
            order = [name for name in header.tensors if name in wanted]
            self._by_file[header.path] = order
            self._infos.update((name, header.tensors[name]) for name in order)

    @property
    def names(self) -> list[str]:
        """All tensor names, shard by shard in file order."""
        return list(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> StoredTensor:
        """Return name, dtype, shape and file of one tensor without reading its data.

        Raises:
            KeyError: No tensor of that name.
        """
        return self._infos[name]

    def infos(self) -> list[StoredTensor]:
        """Return every tensor's :class:`StoredTensor`, in :attr:`names` order."""
        return list(self._infos.values())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from its file.

        Raises:
            KeyError: No tensor of that name.
            CheckpointError: The file can no longer be read.
        """
        info = self._infos[name]
        with _open(info.file) as handle:
            return _read(handle, self._data_start[info.file], info)

    def iter_tensors(self, *, digest: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` file by file, holding one file open and one tensor at a time.

        Tensors come in the order of their data, so each file is read once from start to
        end.

        Args:
            digest: Also compute each file's SHA-256 from the bytes read, in a background
                thread that finishes a tensor before the next is read, so that
                :meth:`sha256` need not read the files again once the iteration is
                complete. The caller must then not change a tensor in place before it
                asks for the next one.

        Raises:
            CheckpointError: A file can no longer be read.
        """
        # On a big-endian machine _read swaps bytes: what it returns is not the file's.
        digest = digest and sys.byteorder == "little"
        with ThreadPoolExecutor(1, thread_name_prefix="rockq-digest") as hashing:
            for file, names in self._by_file.items():
                hasher = hashlib.sha256()
                hashed: Future[None] | None = None
                with _open(file) as handle:
                    head = handle.read(self._data_start[file]) if digest else b""
                    hasher.update(head)
                    for name in names:
                        if hashed is not None:
                            hashed.result()  # the last tensor goes before the next comes
                        tensor = _read(handle, self._data_start[file], self._infos[name])
                        if digest:
                            hashed = hashing.submit(hasher.update, _bytes_of(tensor))
                        yield name, tensor
                        del tensor
                if hashed is not None:
                    hashed.result()
                if digest and len(head) == self._data_start[file]:
                    self._digests[file] = hasher.hexdigest()

    def sha256(self) -> str:
        """Hex SHA-256 of the input: of the file, or for a folder, of a text that lists the
        index's digest and name and then each shard's, a line each.

        A file that :meth:`iter_tensors` has read whole is not read again.

        Raises:
            CheckpointError: A file can no longer be read.
        """
        if self.index_file is None:
            return self._file_sha256(self.files[0])
        digest = hashlib.sha256()
        for file in (self.index_file, *self.files):
            digest.update(f"{self._file_sha256(file)} {file.name}\n".encode())
        return digest.hexdigest()

    def _file_sha256(self, file: Path) -> str:
        known = self._digests.get(file)
        return known if known is not None else sha256_file(file)

    def load_all(self) -> dict[str, torch.Tensor]:
        """Read every tensor into memory (for state dicts that fit)."""
        return dict(self.iter_tensors())


@contextlib.contextmanager
def _open(file: Path) -> Iterator[io.FileIO]:
    try:
        handle = io.FileIO(file, "rb")
    except OSError as err:
        raise CheckpointError(
            f"cannot be read ({err.strerror}); check the file still exists", path=str(file)
        ) from None
    with handle:
        yield handle


def _read(handle: io.FileIO, data_start: int, info: StoredTensor) -> torch.Tensor:
    """Read one tensor's bytes into a fresh tensor with plain file reads.

    Plain reads rather than a memory map: the pages of a mapped file count towards the
    process's resident memory once touched, so streaming a large file through a map looks
    (and, under memory pressure, behaves) like holding all of it.
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian test machine
        # The file's bytes are little-endian; safetensors' own reader swaps them.
        with safe_open(str(info.file), framework="pt", device="cpu") as opened:
            tensor: torch.Tensor = opened.get_tensor(info.name)
            return tensor
    # Storage that an earlier tensor no longer uses: no fresh pages to map and zero.
    data = kernels.reusable_empty((info.nbytes,), torch.uint8)
    view = data.numpy().data
    handle.seek(data_start + info.offsets[0])
    done = 0
    while done < info.nbytes:
        count = handle.readinto(view[done:])
        if not count:
            raise CheckpointError(
                f"ends {info.nbytes - done} bytes into tensor data that the header promises; "
                "the file is truncated, copy it again",
                path=str(info.file),
                key=info.name,
            )
        done += count
    return data.view(info.dtype).reshape(info.shape)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a freshly read (contiguous CPU) tensor, without a copy."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def open_tensors(path: PathLike) -> TensorSource:
    """Open a safetensors file, or a folder of shards with an index, for tensor-by-tensor reading.

    A folder must hold exactly one ``*.safetensors.index.json`` in the Hugging Face
    layout (``{"weight_map": {tensor name: shard file}}``); every listed shard must exist
    and hold the tensors the index assigns to it, and nothing else.

    Raises:
        CheckpointError: Missing, empty, corrupt or inconsistent files.

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> save_safetensors({"a": torch.zeros(3), "b": torch.ones(2)}, f"{folder}/t.safetensors")
        >>> [(n, t.tolist()) for n, t in open_tensors(f"{folder}/t.safetensors").iter_tensors()]
        [('a', [0.0, 0.0, 0.0]), ('b', [1.0, 1.0])]
    """
    root = Path(path)
    if not root.is_dir():
        header = read_header(path)
        return TensorSource(root, [header], metadata=header.metadata)
    indexes = sorted(root.glob("*.safetensors.index.json"))
    if len(indexes) != 1:
        shards = len(list(root.glob("*.safetensors")))
        found = (
            f"none (and {shards} .safetensors files)"
            if not indexes
            else ", ".join(p.name for p in indexes)
        )
        raise CheckpointError(
            f"expected a folder with exactly one *.safetensors.index.json, found {found}; "
            "pass a single .safetensors file or a folder with one index",
            path=str(path),
        )
    return _open_sharded(root, indexes[0])


def folder_files(root: PathLike) -> list[Path]:
    """The files a shard folder is read from: its index and its shards (``[]`` if unreadable).

    Example:
        >>> import tempfile, json, torch
        >>> folder = Path(tempfile.mkdtemp())
        >>> save_safetensors({"a": torch.zeros(1)}, folder / "part.safetensors")
        >>> _ = (folder / "m.safetensors.index.json").write_text(
        ...     json.dumps({"weight_map": {"a": "part.safetensors"}}))
        >>> [p.name for p in folder_files(folder)]
        ['m.safetensors.index.json', 'part.safetensors']
    """
    try:
        source = open_tensors(root)
    except CheckpointError:
        return []
    return [p for p in (source.index_file, *source.files) if p is not None]


def _open_sharded(root: Path, index_file: Path) -> TensorSource:
    label = str(index_file)
    # Checked before it is opened: reading a named pipe would wait for a writer.
    require_file(index_file, expected="a safetensors index (JSON with a 'weight_map')")
    try:
        raw = index_file.read_bytes()
    except OSError as err:
        raise unreadable(index_file, err) from None
    index = load_json_text(raw, label, "its text", "a safetensors index with a 'weight_map'")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (
        isinstance(weight_map, dict)
        and weight_map
        and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise CheckpointError(
            "expected an object with a non-empty 'weight_map' of tensor name -> shard file; "
            "fix the index",
            path=label,
            key="weight_map",
        )
    names: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        relative = Path(shard)
        if relative.is_absolute() or ".." in relative.parts:
            raise CheckpointError(
                f"shard {shard!r} points outside the folder; expected a file name inside it",
                path=label,
                key=f"weight_map.{name}",
            )
        names.setdefault(root / relative, []).append(name)
    headers = []
    for file, wanted in names.items():
        if not file.exists():
            raise CheckpointError(
                f"lists shard {file.name!r}, which does not exist; restore the shard or fix the index",
                path=label,
            )
        header = read_header(file)
        missing = [n for n in wanted if n not in header.tensors]
        listed = set(wanted)
        extra = [n for n in header.tensors if n not in listed]
        if missing or extra:
            problem = (
                f"the index puts {count_names(missing)} in it but the shard does not hold them"
                if missing
                else f"it holds {count_names(extra)} that the index does not list"
            )
            raise CheckpointError(
                f"shard does not match {index_file.name}: {problem}; fix the index",
                path=str(file),
            )
        headers.append(header)
    meta = index.get("metadata")
    metadata = (
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        if isinstance(meta, dict)
        else {}
    )
    return TensorSource(root, headers, index_file=index_file, metadata=metadata, names=names)
