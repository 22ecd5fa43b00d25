"""Safetensors files: validated headers, bounded-memory reading, atomic and streaming writes.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}, ...}``, padded
with spaces to a multiple of 8) and then the raw little-endian tensor bytes. Because the
header says where every tensor lives, a file can be read one tensor at a time and written
one tensor at a time, so memory stays bounded by the largest tensor.

Every write goes through :func:`atomic_output`: the data lands in a temporary file next
to the target and is renamed over it only once complete, so an interrupted run never
leaves a half-written output, an existing file is only replaced with ``force=True``, and
an input file is never overwritten.

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
import json
import os
import secrets
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open

from transform_core.errors import CheckpointError

PathLike = str | os.PathLike[str]

# safetensors' dtype names in its own (ascending) order. safetensors lays tensors out by
# dtype, largest order first, then by name; following the same order makes our files
# byte-identical to safetensors' own for the same tensors.
_DTYPE_ORDER = [
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("C64", "complex64"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
]
NAME_TO_DTYPE: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _DTYPE_ORDER if hasattr(torch, attr)
}
DTYPE_TO_NAME: dict[torch.dtype, str] = {dtype: name for name, dtype in NAME_TO_DTYPE.items()}
_RANK = {name: rank for rank, (name, _) in enumerate(_DTYPE_ORDER)}

# safetensors refuses headers above 100 MB; a larger length field means a foreign file.
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 1 << 20
KNOWN_FORMATS = "a .safetensors file, a .pt/.pth file from torch.save, or a folder with a *.safetensors.index.json"


def sha256_file(path: PathLike) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks.

    Raises:
        CheckpointError: ``path`` is missing or is a folder.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(delete=False) as f:
        ...     _ = f.write(b"abc")
        >>> sha256_file(f.name)[:16]
        'ba7816bf8f01cfea'
    """
    file = require_file(path)
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def require_file(path: PathLike, *, expected: str = KNOWN_FORMATS) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path` if it is an existing, non-empty file.

    Raises:
        CheckpointError: The path is missing, is a folder, or is empty.
    """
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"no such file; expected {expected}; check the path", path=str(path))
    if file.is_dir():
        raise CheckpointError(
            f"is a folder, expected a file ({expected}); pass a file inside it", path=str(path)
        )
    if file.stat().st_size == 0:
        raise CheckpointError(
            f"is empty (0 bytes); expected {expected}; re-create the file", path=str(path)
        )
    return file


# --- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives in a safetensors file, known without reading its data.

    Attributes:
        name: The tensor's key in the file.
        dtype: Its torch dtype.
        shape: Its shape.
        file: The file holding it (a shard, for a sharded checkpoint).
        offsets: ``(begin, end)`` byte offsets, relative to the start of the data block.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.offsets[1] - self.offsets[0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed and validated header of one safetensors file.

    Attributes:
        path: The file.
        metadata: The ``__metadata__`` map, or ``None`` if the file has none.
        tensors: Tensor infos by name, in the order their data appears in the file.
        data_start: Byte offset of the data block (``8 + header length``).
    """

    path: Path
    metadata: dict[str, str] | None
    tensors: dict[str, StoredTensor]
    data_start: int


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` is a file that starts like a safetensors file (no full validation)."""
    file = Path(path)
    if not file.is_file():
        return False
    with file.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= _MAX_HEADER and head[8:9] == b"{"


def read_header(path: PathLike) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without reading tensor data.

    Checks that every tensor's dtype is known, its byte range matches its shape, the
    ranges tile the data block exactly and the file is as long as the header says.

    Raises:
        CheckpointError: The file is missing, empty, truncated or not a safetensors file.
    """
    file = require_file(path, expected="a .safetensors file")
    label = str(path)
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"is not a safetensors file: {size} bytes is shorter than the 8-byte header length; "
                "re-create the file",
                path=label,
            )
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or length > size - 8:
            raise CheckpointError(
                f"is not a safetensors file or is truncated: its first 8 bytes give a header of "
                f"{length} bytes but the file has {size} bytes; expected {KNOWN_FORMATS}",
                path=label,
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"is not a safetensors file: its header is not valid JSON ({err}); expected {KNOWN_FORMATS}",
            path=label,
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"is not a safetensors file: its header is a JSON {type(header).__name__}, expected an object",
            path=label,
        )
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointError(
            "has invalid __metadata__: expected a map of strings to strings; re-create the file",
            path=label,
        )
    infos = [_tensor_info(name, entry, file, label) for name, entry in header.items()]
    infos.sort(key=lambda info: info.offsets)
    data_size = size - 8 - length
    position = 0
    for info in infos:
        if info.offsets[0] != position:
            raise CheckpointError(
                f"is corrupt: tensor data at byte {info.offsets[0]} should start at byte {position} "
                "(overlapping or missing data); re-create the file",
                path=label,
                key=info.name,
            )
        position = info.offsets[1]
    if position != data_size:
        problem = (
            f"is truncated: its header describes {position} bytes of tensor data but the file "
            f"holds {data_size}"
            if position > data_size
            else f"is corrupt: {data_size - position} unexpected bytes follow the tensor data"
        )
        raise CheckpointError(f"{problem}; re-create the file", path=label)
    return SafetensorsHeader(file, metadata, {info.name: info for info in infos}, 8 + length)


def _tensor_info(name: str, entry: Any, file: Path, label: str) -> StoredTensor:
    if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
        raise CheckpointError(
            "is corrupt: the header entry is not {dtype, shape, data_offsets}; re-create the file",
            path=label,
            key=name,
        )
    dtype = NAME_TO_DTYPE.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(
            f"has dtype {entry['dtype']!r}, which this reader does not support; expected one of "
            f"{', '.join(NAME_TO_DTYPE)}; convert the tensor",
            path=label,
            key=name,
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (
        isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) for n in offsets)
    ):
        raise CheckpointError(
            f"is corrupt: bad shape {shape!r} or data_offsets {offsets!r}; re-create the file",
            path=label,
            key=name,
        )
    numel = 1
    for n in shape:
        numel *= n
    if offsets[1] - offsets[0] != numel * dtype.itemsize:
        raise CheckpointError(
            f"is corrupt: shape {shape} of {entry['dtype']} needs {numel * dtype.itemsize} bytes "
            f"but data_offsets {offsets} give {offsets[1] - offsets[0]}; re-create the file",
            path=label,
            key=name,
        )
    return StoredTensor(name, dtype, tuple(shape), file, (offsets[0], offsets[1]))


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
            return _get(handle, info)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` file by file, holding one file open and one tensor at a time.

        Raises:
            CheckpointError: A file can no longer be read.
        """
        for file, names in self._by_file.items():
            with _open(file) as handle:
                for name in names:
                    yield name, _get(handle, self._infos[name])

    def load_all(self) -> dict[str, torch.Tensor]:
        """Read every tensor into memory (for state dicts that fit)."""
        return dict(self.iter_tensors())


@contextlib.contextmanager
def _open(file: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types from Rust
        raise CheckpointError(
            f"cannot be read ({err}); check the file was not changed or truncated", path=str(file)
        ) from err
    with handle as opened:
        yield opened


def _get(handle: Any, info: StoredTensor) -> torch.Tensor:
    try:
        tensor = handle.get_tensor(info.name)
    except Exception as err:  # safetensors raises its own error types from Rust
        raise CheckpointError(
            f"cannot be read ({err}); check the file was not changed or truncated",
            path=str(info.file),
            key=info.name,
        ) from err
    if not isinstance(tensor, torch.Tensor):  # pragma: no cover - safetensors contract
        raise CheckpointError("did not read as a tensor", path=str(info.file), key=info.name)
    return tensor


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


def _open_sharded(root: Path, index_file: Path) -> TensorSource:
    label = str(index_file)
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"is not valid JSON ({err}); expected a safetensors index with a 'weight_map'",
            path=label,
        ) from None
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
                f"the index puts {_few(missing)} in it but the shard does not hold them"
                if missing
                else f"it holds {_few(extra)} that the index does not list"
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


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown}{more})"


# --- writing ---------------------------------------------------------------------------


def check_output_path(
    path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()
) -> Path:
    """Check that ``path`` may be written; see :func:`atomic_output` for the rules.

    Raises:
        CheckpointError: The target is an input, exists without ``force``, is a folder,
            or its folder does not exist.
    """
    target = Path(path)
    label = str(path)
    for source in inputs:
        if _same_file(target, Path(source)):
            raise CheckpointError(
                "is also an input; write the output to a different path (--force never "
                "overwrites an input)",
                path=label,
            )
    if target.is_dir():
        raise CheckpointError("is a folder; expected an output file path", path=label)
    parent = target.parent
    if not parent.is_dir():
        raise CheckpointError(
            f"cannot be written: folder '{parent}' does not exist; create it first", path=label
        )
    if target.exists() and not force:
        raise CheckpointError("already exists; pass --force to overwrite it", path=label)
    return target


def _same_file(a: Path, b: Path) -> bool:
    if b.is_dir():
        # A sharded input: any existing file inside the folder counts as part of it.
        return a.exists() and a.resolve().parent == b.resolve()
    with contextlib.suppress(OSError):
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
    return a.resolve() == b.resolve()


@contextlib.contextmanager
def atomic_output(
    path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary path to write; move it onto ``path`` only if the block succeeds.

    The temporary file ``.NAME.tmp-RANDOM`` sits in the target's folder, so the final
    ``os.replace`` is atomic. On success it is flushed to disk and renamed; on any
    exception, ``KeyboardInterrupt`` included, it is deleted and the target is untouched.

    Args:
        path: The output file.
        force: Replace an existing file.
        inputs: Files (or shard folders) this run reads; writing over one of them, or
            over an existing file in an input folder, is refused even with ``force``.

    Raises:
        CheckpointError: The target is an input, exists without ``force``, is a folder, or
            its folder does not exist.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp() + "/out.bin"
        >>> with atomic_output(out) as tmp:
        ...     _ = tmp.write_bytes(b"done")
        >>> Path(out).read_bytes()
        b'done'
    """
    target = check_output_path(path, force=force, inputs=inputs)
    temp = _create_temp(target)
    try:
        yield temp
        _fsync(temp)
        if not force and target.exists():
            # Another process created the target while we were writing.
            raise CheckpointError("already exists; pass --force to overwrite it", path=str(path))
        os.replace(temp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def _create_temp(target: Path) -> Path:
    # os.open with O_EXCL (rather than mkstemp) so the final file gets the usual
    # umask-based permissions instead of mkstemp's 0600.
    while True:
        temp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temp


def _fsync(file: Path) -> None:
    with file.open("rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable; not every platform can open a folder.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TensorSpec = tuple[torch.dtype, Sequence[int]]


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, with the header fixed up front.

    The layout (dtype order, then name) and header bytes follow safetensors' own writer,
    so for the same tensors the file is byte-identical to ``safetensors.torch.save_file``
    (metadata keys are written sorted; safetensors' order for two or more keys is not
    deterministic). Tensors may be written in any order: each goes to its own offset.

    Args:
        file: A binary file opened for writing (and seeking), positioned at 0.
        specs: ``name -> (dtype, shape)`` for every tensor the file will hold.
        metadata: Optional ``__metadata__`` strings.

    Raises:
        CheckpointError: A dtype safetensors cannot store.

    Example:
        >>> import io, torch
        >>> buffer = io.BytesIO()
        >>> writer = SafetensorsWriter(buffer, {"b": (torch.float32, [2]), "a": (torch.int64, [])})
        >>> writer.names
        ['a', 'b']
        >>> writer.write("b", torch.ones(2)); writer.write("a", torch.tensor(7)); writer.close()
        >>> from safetensors.torch import load
        >>> load(buffer.getvalue())["a"].item()
        7
    """

    def __init__(
        self,
        file: IO[bytes],
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - no big-endian test machine
            raise NotImplementedError("writing safetensors needs a little-endian machine")
        entries: list[tuple[str, str, list[int]]] = []
        for name, (dtype, shape) in specs.items():
            if name == "__metadata__":
                raise ValueError("'__metadata__' is reserved and cannot name a tensor")
            if dtype not in DTYPE_TO_NAME:
                raise CheckpointError(
                    f"has dtype {dtype}, which safetensors cannot store; convert it to one of "
                    f"{', '.join(str(d) for d in DTYPE_TO_NAME)}",
                    key=name,
                )
            entries.append((name, DTYPE_TO_NAME[dtype], [int(n) for n in shape]))
        entries.sort(key=lambda e: (-_RANK[e[1]], e[0]))
        header: dict[str, Any] = {}
        if metadata is not None:
            header["__metadata__"] = {key: metadata[key] for key in sorted(metadata)}
        self._slots: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for name, dtype_name, shape in entries:
            dtype = NAME_TO_DTYPE[dtype_name]
            numel = 1
            for n in shape:
                numel *= n
            end = offset + numel * dtype.itemsize
            header[name] = {"dtype": dtype_name, "shape": shape, "data_offsets": [offset, end]}
            self._slots[name] = (dtype, tuple(shape), offset, end)
            offset = end
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._file = file
        self._data_start = 8 + len(raw)
        self._size = self._data_start + offset
        self._pending = set(self._slots)
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)

    @property
    def names(self) -> list[str]:
        """Tensor names in the order their data is laid out in the file."""
        return list(self._slots)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes at its offset.

        Raises:
            ValueError: Unknown or already written name, or a dtype/shape other than declared.
        """
        if name not in self._slots:
            raise ValueError(f"tensor {name!r} was not declared when the writer was created")
        if name not in self._pending:
            raise ValueError(f"tensor {name!r} was already written")
        dtype, shape, begin, end = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(shape)}"
            )
        if end > begin:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._file.seek(self._data_start + begin)
            self._file.write(data.numpy().data)
        self._pending.discard(name)

    def close(self) -> None:
        """Check that every declared tensor was written.

        Raises:
            ValueError: Some declared tensors were never written.
        """
        if self._pending:
            raise ValueError(f"{_few(sorted(self._pending))} declared but never written")
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() != self._size:  # pragma: no cover - guards the layout maths
            raise RuntimeError(f"wrote {self._file.tell()} bytes, expected {self._size}")


def write_safetensors(
    path: PathLike,
    specs: Mapping[str, TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
    inputs: Iterable[PathLike] = (),
) -> None:
    """Stream tensors into a new safetensors file atomically, one tensor in memory at a time.

    Args:
        path: The output file.
        specs: ``name -> (dtype, shape)`` of every tensor, known before any data is written.
        tensors: ``(name, tensor)`` pairs in any order, typically a generator that produces
            each tensor just in time.
        metadata: Optional ``__metadata__`` strings.
        force: Replace an existing file.
        inputs: Files that must not be overwritten.

    Raises:
        CheckpointError: The output may not be written (see :func:`atomic_output`).
        ValueError: ``tensors`` does not match ``specs``.

    Example:
        >>> import tempfile, torch
        >>> out = tempfile.mkdtemp() + "/s.safetensors"
        >>> specs = {f"w{i}": (torch.float32, [2]) for i in range(3)}
        >>> write_safetensors(out, specs, ((n, torch.full((2,), float(i))) for i, n in enumerate(specs)))
        >>> open_tensors(out).get("w2").tolist()
        [2.0, 2.0]
    """
    with atomic_output(path, force=force, inputs=inputs) as temp, temp.open("wb") as handle:
        writer = SafetensorsWriter(handle, specs, metadata)
        for name, tensor in tensors:
            writer.write(name, tensor)
        writer.close()


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
    inputs: Iterable[PathLike] = (),
) -> None:
    """Save a dict of tensors as safetensors, atomically.

    Unlike ``safetensors.torch.save_file``, tensors that share storage (tied weights) and
    non-contiguous tensors are accepted: each is written as its own copy.

    Raises:
        CheckpointError: The output may not be written (see :func:`atomic_output`), or a
            dtype safetensors cannot store.

    Example:
        >>> import tempfile, torch
        >>> shared = torch.arange(4.0)
        >>> out = tempfile.mkdtemp() + "/tied.safetensors"
        >>> save_safetensors({"a": shared, "b": shared}, out)
        >>> sorted(open_tensors(out).names)
        ['a', 'b']
    """
    specs = {name: (t.dtype, list(t.shape)) for name, t in tensors.items()}
    write_safetensors(path, specs, tensors.items(), metadata, force=force, inputs=inputs)
