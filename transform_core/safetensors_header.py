"""The safetensors header: dtype names, layout order and a validated reading of the header.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}, ...}``, padded
with spaces to a multiple of 8) and then the raw little-endian tensor bytes. Because the
header says where every tensor lives, a file can be read one tensor at a time and written
one tensor at a time, so memory stays bounded by the largest tensor.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file({"w": torch.ones(2, 3)}, path, {"note": "hi"})
    >>> header = read_header(path)
    >>> header.metadata, header.tensors["w"].shape, header.tensors["w"].nbytes
    ({'note': 'hi'}, (2, 3), 24)
    >>> NAME_TO_DTYPE["BF16"], is_safetensors(path)
    (torch.bfloat16, True)
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transform_core.errors import CheckpointError
from transform_core.files import KNOWN_FORMATS, PathLike, require_file, unreadable

__all__ = [
    "DTYPE_TO_NAME",
    "LAYOUT_RANK",
    "NAME_TO_DTYPE",
    "SafetensorsHeader",
    "StoredTensor",
    "count_names",
    "is_safetensors",
    "load_json_text",
    "read_header",
]

# safetensors' dtype names in its own (ascending) order. safetensors lays tensors out by
# dtype, largest order first, then by name; following the same order makes our files
# byte-identical to safetensors' own for the same tensors.
_DTYPE_ORDER = [
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E8M0", "float8_e8m0fnu"),  # the shared scales of MX formats
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
LAYOUT_RANK: dict[str, int] = {name: rank for rank, (name, _) in enumerate(_DTYPE_ORDER)}

# safetensors refuses headers above 100 MB; a larger length field means a foreign file.
_MAX_HEADER = 100 * 1024 * 1024
# The largest size or offset torch takes (a signed 64-bit integer).
_MAX_SIZE = 2**63 - 1


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
    try:
        with file.open("rb") as handle:
            head = handle.read(9)
    except OSError:
        return False  # the reader that follows says why
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= _MAX_HEADER and head[8:9] == b"{"


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def load_json_text(raw: bytes, label: str, what: str, expected: str = KNOWN_FORMATS) -> Any:
    r"""Parse UTF-8 JSON bytes that a file holds, refusing what no safetensors reader takes.

    Refused, as one line naming the file: invalid UTF-8 or JSON, nesting too deep to
    parse, and escaped lone surrogates (``"\ud800"``), which make names that cannot be
    written back as UTF-8.

    Example:
        >>> try:
        ...     load_json_text(b'{"w\\ud800": 1}', "t.safetensors", "its header")
        ... except CheckpointError as err:
        ...     print(err.message)
        its header holds a lone surrogate ('w\ud800'), which is not text; re-create the file
    """
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{what} is not valid JSON ({err}); expected {expected}", path=label
        ) from None
    except RecursionError:
        raise CheckpointError(
            f"{what} is JSON nested too deeply to read; re-create the file", path=label
        ) from None
    # Only a \uD800-\uDFFF escape makes a surrogate: most headers need no walk.
    for text in _strings(value) if _SURROGATE_ESCAPE.search(raw) else ():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(
                f"{what} holds a lone surrogate ({text!r}), which is not text; re-create the file",
                path=label,
            ) from None
    return value


def _strings(value: Any) -> Iterator[str]:
    """Every string in parsed JSON, keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def read_header(path: PathLike) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without reading tensor data.

    Checks that every tensor's dtype is known, its byte range matches its shape, the
    ranges tile the data block exactly and the file is as long as the header says.

    Raises:
        CheckpointError: The file is missing, not a regular file, empty, unreadable,
            truncated, not a safetensors file, or has a malformed entry (naming the tensor).
    """
    file = require_file(path, expected="a .safetensors file")
    label = str(path)
    size = file.stat().st_size
    try:
        handle = file.open("rb")
    except OSError as err:
        raise unreadable(path, err) from None
    with handle:
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
    header = load_json_text(raw, label, "is not a safetensors file: its header")
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
    name_of_dtype = entry["dtype"]
    dtype = NAME_TO_DTYPE.get(name_of_dtype) if isinstance(name_of_dtype, str) else None
    if dtype is None:
        raise CheckpointError(
            f"has dtype {_shown(name_of_dtype)}, which this reader does not support; "
            f"expected one of {', '.join(NAME_TO_DTYPE)}; convert the tensor",
            path=label,
            key=name,
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_is_size(n) for n in shape)):
        raise CheckpointError(
            f"is corrupt: shape {_shown(shape)} is not a list of whole numbers from 0 to "
            "2**63 - 1; re-create the file",
            path=label,
            key=name,
        )
    if math.prod(n for n in shape if n) > _MAX_SIZE:
        # torch multiplies the sizes out, even beside a zero size.
        raise CheckpointError(
            f"is corrupt: shape {_shown(shape)} is too large for torch (its non-zero sizes "
            "multiply to more than 2**63 - 1); re-create the file",
            path=label,
            key=name,
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_size(n) for n in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            f"is corrupt: data_offsets {_shown(offsets)} is not [begin, end] with whole "
            "numbers 0 <= begin <= end; re-create the file",
            path=label,
            key=name,
        )
    numel = math.prod(shape)
    if offsets[1] - offsets[0] != numel * dtype.itemsize:
        raise CheckpointError(
            f"is corrupt: shape {shape} of {entry['dtype']} needs {numel * dtype.itemsize} bytes "
            f"but data_offsets {offsets} give {offsets[1] - offsets[0]}; re-create the file",
            path=label,
            key=name,
        )
    return StoredTensor(name, dtype, tuple(shape), file, (offsets[0], offsets[1]))


def _is_size(value: object) -> bool:
    """Whether a header value is a size or offset: a JSON whole number (not ``true``), >= 0.

    Example:
        >>> _is_size(3), _is_size(True), _is_size(-1), _is_size(1.0)
        (True, False, False, False)
    """
    # bool is a subclass of int: JSON's true would otherwise pass as 1.
    return type(value) is int and 0 <= value <= _MAX_SIZE


def _shown(value: object, limit: int = 60) -> str:
    """A header value as JSON writes it, cut short for a one-line message.

    Example:
        >>> _shown([True, 16]), _shown(list(range(40)), limit=20)
        ('[true, 16]', '[0, 1, 2, 3, 4, 5...')
    """
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def count_names(names: Sequence[str], limit: int = 3) -> str:
    """Count tensor names and show the first few, for one-line messages.

    Example:
        >>> count_names(["a"]), count_names(["a", "b", "c", "d"])
        ("1 tensor ('a')", "4 tensors ('a', 'b', 'c' and 1 more)")
    """
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown}{more})"
