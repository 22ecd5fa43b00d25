"""A file written past the page cache where the system allows it (``O_DIRECT``).

Writing gigabytes through the page cache costs CPU time to copy every byte into it and
to manage its pages, and leaves the cache full of data that a burn-in never reads back:
on a two-core virtual machine, writing 4 GiB took 4 to 8 s of system time that way and
0.3 s with ``O_DIRECT``. :class:`DirectFile` writes the whole pages of each large write
with ``O_DIRECT``, through a page-aligned staging buffer, and the few bytes at either end
(and every small write) through the page cache as usual, so any offset and length work.
Where ``O_DIRECT`` is missing or refused (another operating system, some file systems),
or the environment variable ``ROCKQ_DIRECT_IO`` is ``0`` (or ``false``, ``no``, ``off``),
everything goes through the page cache.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp(), "data.bin")
    >>> with DirectFile(path) as file:
    ...     _ = file.write(b"header")
    ...     _ = file.write(bytes(3 << 20))
    ...     _ = file.seek(0)
    ...     _ = file.write(b"HEADER")
    >>> data = path.read_bytes()
    >>> data[:6], len(data)
    (b'HEADER', 3145734)
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from types import TracebackType

import numpy as np

from transform_core import kernels
from transform_core.files import PathLike

__all__ = ["DirectFile"]

_PAGE = mmap.PAGESIZE


class DirectFile:
    """A binary file opened for writing, large writes going past the page cache.

    Offers what :class:`~transform_core.safetensors_writer.SafetensorsWriter` uses of a
    file: ``write``, ``seek``, ``tell``, ``flush``, ``fileno`` and ``close``. The file is
    created or truncated. Each page of the file is written one way only for a given write,
    and Linux keeps the two ways coherent, so rewriting a range (a header) is safe.

    Args:
        path: The file to create or truncate.
        direct: Try ``O_DIRECT`` at all (unless ``ROCKQ_DIRECT_IO`` turns it off);
            ``False`` gives an ordinary unbuffered file.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/zeros.bin"
        >>> with DirectFile(path) as file:
        ...     file.write(bytes(5000))
        5000
        >>> os.path.getsize(path)
        5000
    """

    MIN_DIRECT_BYTES = 1 << 20
    """Writes with fewer whole pages than this go through the page cache: the device
    would be waited on for little."""
    STAGE_BYTES = 16 << 20
    """Size of the page-aligned buffer each direct write is copied through: on a virtual
    disk, 8 MiB writes took 10 s for 4 GiB and 16 MiB writes 8 s."""

    def __init__(self, path: PathLike, *, direct: bool = True) -> None:
        # O_BINARY: on Windows a descriptor is otherwise opened in text mode.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self._fd = os.open(path, flags, 0o666)
        self._direct_fd: int | None = None
        if (
            direct
            and hasattr(os, "O_DIRECT")
            and not kernels.switched_off_by_environment("ROCKQ_DIRECT_IO")
        ):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # a file system without O_DIRECT: the page cache it is
                self._direct_fd = None
        self._stage: mmap.mmap | None = None
        self._position = 0
        self._size = 0

    @property
    def direct(self) -> bool:
        """Whether large writes still go past the page cache."""
        return self._direct_fd is not None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at the current position; returns its length."""
        view = memoryview(data).cast("B")
        start, end = self._position, self._position + len(view)
        first = -(-start // _PAGE) * _PAGE  # the whole pages inside [start, end)
        last = end // _PAGE * _PAGE
        if self._direct_fd is not None and last - first >= self.MIN_DIRECT_BYTES:
            self._write_cached(view[: first - start], start)
            self._write_direct(view[first - start : last - start], first)
            self._write_cached(view[last - start :], last)
        else:
            self._write_cached(view, start)
        self._position = end
        if view:  # as with any file, writing nothing past the end leaves the size
            self._size = max(self._size, end)
        return len(view)

    def _write_cached(self, view: memoryview, offset: int) -> None:
        while view:
            if hasattr(os, "pwrite"):
                done = os.pwrite(self._fd, view, offset)
            else:  # Windows: one thread writes at a time, so seeking first is safe
                os.lseek(self._fd, offset, os.SEEK_SET)
                done = os.write(self._fd, view)
            view, offset = view[done:], offset + done

    def _write_direct(self, view: memoryview, offset: int) -> None:
        if self._stage is None:
            self._stage = mmap.mmap(-1, self.STAGE_BYTES)  # anonymous maps are page-aligned
        stage = np.frombuffer(self._stage, dtype=np.uint8)
        source = np.frombuffer(view, dtype=np.uint8)
        for begin in range(0, len(source), self.STAGE_BYTES):
            piece = source[begin : begin + self.STAGE_BYTES]
            # np.copyto lets other threads run while it copies; a memoryview copy would not.
            np.copyto(stage[: len(piece)], piece)
            if not self._pwrite_direct(memoryview(self._stage)[: len(piece)], offset + begin):
                self._write_cached(view[begin:], offset + begin)
                return

    def _pwrite_direct(self, view: memoryview, offset: int) -> bool:
        """Write whole pages with ``O_DIRECT``; ``False`` once the file system refuses it."""
        assert self._direct_fd is not None
        while view:
            try:
                done = os.pwrite(self._direct_fd, view, offset)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                # Refused before any byte was written: alignment this device does not
                # take, or a file system without O_DIRECT. Carry on through the cache.
                self._close_direct()
                return False
            view, offset = view[done:], offset + done
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position, as :meth:`io.IOBase.seek`; returns the new position."""
        bases = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}
        if whence not in bases:
            raise ValueError(f"whence must be 0, 1 or 2, got {whence}")
        position = bases[whence] + offset
        if position < 0:
            raise ValueError(f"negative position {position}")
        self._position = position
        return position

    def tell(self) -> int:
        """The current position."""
        return self._position

    def flush(self) -> None:
        """Nothing to flush: every write goes straight to the operating system."""

    def fileno(self) -> int:
        """The descriptor to ``fsync``; it covers the bytes written either way."""
        return self._fd

    def _close_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def close(self) -> None:
        """Close the file; the data is not forced to disk (``fsync`` before, if needed)."""
        self._close_direct()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        stage, self._stage = self._stage, None
        if stage is not None:
            # After a failed write, the error's traceback may still hold a view of the
            # buffer; it is then unmapped once that goes, and the error is not masked.
            with contextlib.suppress(BufferError):
                stage.close()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
