"""Writing safetensors files: tensor by tensor, atomically, byte-identical to safetensors' own.

:class:`SafetensorsWriter` fixes the header from the names, dtypes and shapes up front and
then takes each tensor's bytes in any order, so a file is written with one tensor in memory
at a time. :func:`write_safetensors` streams tensors into a new file through
:func:`~transform_core.files.atomic_output`; :func:`save_safetensors` saves a dict of
tensors, tied and non-contiguous ones included.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import load_file
    >>> out = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_safetensors({"w": torch.ones(2, 3)}, out, {"note": "hi"})
    >>> load_file(out)["w"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from transform_core.errors import CheckpointError
from transform_core.files import PathLike, atomic_output
from transform_core.safetensors_header import (
    DTYPE_TO_NAME,
    LAYOUT_RANK,
    NAME_TO_DTYPE,
    count_names,
)

__all__ = [
    "SafetensorsWriter",
    "TensorSpec",
    "WritableFile",
    "WriteBehind",
    "save_safetensors",
    "write_safetensors",
]

TensorSpec = tuple[torch.dtype, Sequence[int]]


class WritableFile(Protocol):
    """What :class:`SafetensorsWriter` needs of a file: an open binary file, an
    ``io.BytesIO`` or a :class:`~transform_core.direct_file.DirectFile`."""

    def write(self, data: bytes | memoryview, /) -> int:
        """Write ``data`` at the position and return its length."""

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        """Move the position and return it."""

    def tell(self) -> int:
        """The position."""

    def flush(self) -> None:
        """Hand buffered bytes to the operating system."""

    def fileno(self) -> int:
        """The descriptor, for ``fdatasync``."""


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
        file: WritableFile,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - no big-endian test machine
            # Tensor bytes are written as they lie in memory; safetensors is little-endian.
            raise CheckpointError(
                "writing safetensors tensor by tensor needs a little-endian machine; run "
                "rockq on an x86-64 or ARM64 machine"
            )
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
        entries.sort(key=lambda e: (-LAYOUT_RANK[e[1]], e[0]))
        self._tensors: dict[str, Any] = {}
        self._slots: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for name, dtype_name, shape in entries:
            dtype = NAME_TO_DTYPE[dtype_name]
            numel = 1
            for n in shape:
                numel *= n
            end = offset + numel * dtype.itemsize
            self._tensors[name] = {
                "dtype": dtype_name,
                "shape": shape,
                "data_offsets": [offset, end],
            }
            self._slots[name] = (dtype, tuple(shape), offset, end)
            offset = end
        raw = self._header(metadata)
        self._file = file
        self._data_start = 8 + len(raw)
        self._size = self._data_start + offset
        self._pending = set(self._slots)
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)

    def _header(self, metadata: Mapping[str, str] | None) -> bytes:
        header: dict[str, Any] = {}
        if metadata is not None:
            header["__metadata__"] = {key: metadata[key] for key in sorted(metadata)}
        header.update(self._tensors)
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return raw + b" " * (-len(raw) % 8)

    def replace_metadata(self, metadata: Mapping[str, str] | None) -> None:
        """Rewrite the header with other metadata of the same encoded length.

        For a value known only once the data is written (an input digest, say): write
        a placeholder of the same length first.

        Raises:
            ValueError: The new header's length differs from the one written.
        """
        raw = self._header(metadata)
        if 8 + len(raw) != self._data_start:
            raise ValueError(
                f"new metadata makes a header of {len(raw)} bytes, the file's has "
                f"{self._data_start - 8}; keep every value's length"
            )
        self._file.seek(8)
        self._file.write(raw)

    @property
    def names(self) -> list[str]:
        """Tensor names in the order their data is laid out in the file."""
        return list(self._slots)

    @property
    def largest_bytes(self) -> int:
        """Size in bytes of the largest declared tensor (0 for none)."""
        return max((end - begin for _, _, begin, end in self._slots.values()), default=0)

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

    def sync(self) -> None:
        """Flush what was written so far and have the OS write it to disk now (``fdatasync``).

        Nothing for a file without a descriptor (an in-memory buffer).
        """
        self._file.flush()
        try:
            fd = self._file.fileno()
        except (AttributeError, OSError):  # io.BytesIO and the like
            return
        getattr(os, "fdatasync", os.fsync)(fd)

    def close(self) -> None:
        """Check that every declared tensor was written.

        Raises:
            ValueError: Some declared tensors were never written.
        """
        if self._pending:
            raise ValueError(f"{count_names(sorted(self._pending))} declared but never written")
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() != self._size:  # pragma: no cover - guards the layout maths
            raise RuntimeError(f"wrote {self._file.tell()} bytes, expected {self._size}")


class WriteBehind:
    """Write tensors through a :class:`SafetensorsWriter` in a background thread.

    :meth:`write` queues a tensor and returns at once; one thread writes the queue in
    order. :meth:`wait` holds the caller back while the tensors in flight leave no room
    under ``budget_bytes`` for one more of the largest declared size, so that memory stays
    bounded. With ``sync`` (the default), every :data:`SYNC_BYTES` bytes a second thread
    has the OS put the file on disk (:meth:`SafetensorsWriter.sync`) while writing goes on:
    the disk works while the caller computes, and the ``fsync`` that makes the finished
    file durable finds little left to do. A file written past the page cache
    (:class:`~transform_core.direct_file.DirectFile`) needs none: its data is on the
    device already, and a flush between its writes stalls them. An error in the writing
    thread is raised by a later call, and nothing queued after it is written.

    Use it as a context manager: leaving the block waits for every write.

    Example:
        >>> import io, torch
        >>> buffer = io.BytesIO()
        >>> writer = SafetensorsWriter(buffer, {"w": (torch.float32, [2])})
        >>> with WriteBehind(writer) as behind:
        ...     behind.write("w", torch.ones(2))
        >>> writer.close()
    """

    SYNC_BYTES = 64 << 20
    """Bytes written between two requests to put them on disk."""
    BUDGET_BYTES = 64 << 20
    """Default bound on the bytes queued or being written; a tensor larger than the room
    left goes through alone."""

    def __init__(
        self,
        writer: SafetensorsWriter,
        *,
        budget_bytes: int = BUDGET_BYTES,
        sync: bool = True,
    ) -> None:
        self._writer = writer
        self._sync = sync
        self._room = max(0, budget_bytes - writer.largest_bytes)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rockq-write")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="rockq-sync")
        self._queued: deque[tuple[Future[None], int]] = deque()
        self._syncing: Future[None] | None = None
        self._unsynced = 0
        self._failed = False  # set by the writing thread once a write has failed

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor for :meth:`SafetensorsWriter.write`; the caller must not change it
        in place afterwards."""
        self._collect()
        nbytes = tensor.numel() * tensor.element_size()
        self._queued.append((self._pool.submit(self._write, name, tensor), nbytes))

    def wait(self) -> None:
        """Wait until one more tensor of the largest size fits under the budget."""
        self._collect()
        while self._queued and sum(n for _, n in self._queued) > self._room:
            self._queued.popleft()[0].result()

    def _collect(self) -> None:
        # Forget finished writes, raising the error of a failed one.
        while self._queued and self._queued[0][0].done():
            self._queued.popleft()[0].result()

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        # After a failed write (a full disk, an interrupt) the file is abandoned: the tensors
        # queued behind it are not written. The failure reaches the caller from its own future.
        if self._failed:
            return
        try:
            self._writer.write(name, tensor)
        except BaseException:
            self._failed = True
            raise
        self._unsynced += tensor.numel() * tensor.element_size()
        if not self._sync:
            return
        if self._unsynced >= self.SYNC_BYTES and (self._syncing is None or self._syncing.done()):
            if self._syncing is not None:
                self._syncing.result()  # raise what the last one met
            self._unsynced = 0
            self._syncing = self._syncer.submit(self._writer.sync)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is None:
                while self._queued:
                    self._queued.popleft()[0].result()
                if self._syncing is not None:
                    self._syncing.result()
        finally:
            # On an error, what was queued and not begun is dropped, and the write under
            # way finishes before the file may be closed.
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._syncer.shutdown(wait=True)


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
        >>> from safetensors.torch import load_file
        >>> out = tempfile.mkdtemp() + "/s.safetensors"
        >>> specs = {f"w{i}": (torch.float32, [2]) for i in range(3)}
        >>> write_safetensors(out, specs, ((n, torch.full((2,), float(i))) for i, n in enumerate(specs)))
        >>> load_file(out)["w2"].tolist()
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
        >>> from safetensors.torch import load_file
        >>> shared = torch.arange(4.0)
        >>> out = tempfile.mkdtemp() + "/tied.safetensors"
        >>> save_safetensors({"a": shared, "b": shared}, out)
        >>> sorted(load_file(out))
        ['a', 'b']
    """
    specs = {name: (t.dtype, list(t.shape)) for name, t in tensors.items()}
    write_safetensors(path, specs, tensors.items(), metadata, force=force, inputs=inputs)
