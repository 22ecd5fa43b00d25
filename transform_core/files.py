"""Input and output files: checked inputs, digests, and atomic writes that never overwrite an input.

Every output goes through :func:`atomic_output`: the data lands in a temporary file next
to the target and is renamed over it only once complete, so an interrupted run never
leaves a half-written output, an existing file is only replaced with ``force=True``, and
an input file is never overwritten.

Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp() + "/out.txt"
    >>> with atomic_output(out) as tmp:
    ...     _ = tmp.write_text("abc")
    >>> sha256_file(out)[:16]
    'ba7816bf8f01cfea'
    >>> try:
    ...     check_output_path(out, inputs=[out], force=True)
    ... except CheckpointError as err:
    ...     print(err.message.split(";")[0])
    is also an input
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import signal
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from transform_core.errors import CheckpointError

__all__ = [
    "KNOWN_FORMATS",
    "PathLike",
    "atomic_output",
    "atomic_outputs",
    "check_output_path",
    "read_input",
    "require_file",
    "sha256_file",
    "unreadable",
]

PathLike = str | os.PathLike[str]

_CHUNK = 1 << 20
KNOWN_FORMATS = "a .safetensors file, a .pt/.pth file from torch.save, or a folder with a *.safetensors.index.json"
"""The inputs rockq reads, as error messages name them."""


def sha256_file(path: PathLike) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks.

    Raises:
        CheckpointError: ``path`` is missing, is a folder, or cannot be read.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(delete=False) as f:
        ...     _ = f.write(b"abc")
        >>> sha256_file(f.name)[:16]
        'ba7816bf8f01cfea'
    """
    file = require_file(path)
    digest = hashlib.sha256()
    try:
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise unreadable(path, err) from None
    return digest.hexdigest()


def require_file(path: PathLike, *, expected: str = KNOWN_FORMATS) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path` if it is an existing, non-empty regular file.

    Only looks at the file's status, never opens it: opening a named pipe would wait for
    a writer, and ``/dev/zero`` never ends.

    Raises:
        CheckpointError: The path is missing, is a folder, is not a regular file (a pipe,
            a device, a socket), is empty, or cannot be looked up.

    Example:
        >>> try:
        ...     require_file("/dev/null")
        ... except CheckpointError as err:
        ...     print(err.message.split(";")[0])
        is not a regular file but a character device
    """
    file = Path(path)
    try:
        status = file.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(
            f"no such file; expected {expected}; check the path", path=str(path)
        ) from None
    except OSError as err:
        raise CheckpointError(
            f"cannot be read ({err.strerror or err}); check the path and its permissions",
            path=str(path),
        ) from None
    mode = status.st_mode
    if stat.S_ISDIR(mode):
        raise CheckpointError(
            f"is a folder, expected a file ({expected}); pass a file inside it", path=str(path)
        )
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"is not a regular file but {_file_kind(mode)}; expected {expected}; save the data "
            "to a file and pass that",
            path=str(path),
        )
    if status.st_size == 0:
        raise CheckpointError(
            f"is empty (0 bytes); expected {expected}; re-create the file", path=str(path)
        )
    return file


def read_input(path: PathLike, *, expected: str = KNOWN_FORMATS) -> bytes:
    """The bytes of an input file, checked by :func:`require_file` first.

    Raises:
        CheckpointError: As :func:`require_file`, or the file cannot be read (no
            permission, an I/O error), naming it.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(delete=False) as f:
        ...     _ = f.write(b"abc")
        >>> read_input(f.name)
        b'abc'
    """
    file = require_file(path, expected=expected)
    try:
        return file.read_bytes()
    except OSError as err:
        raise unreadable(path, err) from None


def unreadable(path: PathLike, err: OSError) -> CheckpointError:
    """The error for an input that exists but cannot be read (no permission, an I/O error)."""
    return CheckpointError(
        f"cannot be read ({err.strerror or err}); check the file and its permissions",
        path=str(path),
    )


def _file_kind(mode: int) -> str:
    """What a file that is not a regular file or a folder is, for messages.

    Example:
        >>> _file_kind(stat.S_IFIFO), _file_kind(stat.S_IFCHR)
        ('a named pipe (FIFO)', 'a character device')
    """
    kinds = (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((text for test, text in kinds if test(mode)), "a special file")


def check_output_path(
    path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()
) -> Path:
    """Check that ``path`` may be written; see :func:`atomic_output` for the rules.

    Raises:
        CheckpointError: The target is an input, exists without ``force``, is a folder or
            another file that is not a regular file (a device, a pipe), or its folder does
            not exist.
    """
    target = Path(path)
    with _writing(target):  # a name too long to look up, say
        _check_output_path(target, str(path), force, inputs)
    return target


def _check_output_path(target: Path, label: str, force: bool, inputs: Iterable[PathLike]) -> None:
    for source in inputs:
        if _same_file(target, Path(source)):
            raise CheckpointError(
                "is also an input; write the output to a different path (--force never "
                "overwrites an input)",
                path=label,
            )
    if not target.name or target.is_dir():
        raise CheckpointError("is a folder; expected an output file path", path=label)
    if target.exists() and not target.is_file():
        # The output is renamed into place: that would replace the device or pipe itself.
        raise CheckpointError(
            f"is not a regular file but {_file_kind(target.stat().st_mode)}; rockq writes "
            "whole files and renames them into place; give a file path",
            path=label,
        )
    parent = target.parent
    if not parent.is_dir():
        raise CheckpointError(
            f"cannot be written: folder '{parent}' does not exist; create it first", path=label
        )
    if target.exists() and not force:
        raise CheckpointError("already exists; pass --force to overwrite it", path=label)


def _same_file(a: Path, b: Path) -> bool:
    if b.is_dir():
        # A sharded input: its index and every shard it names, wherever they are (a
        # subfolder) and whatever they link to (the Hugging Face cache's symlinks).
        from transform_core.safetensors_io import folder_files  # it builds on this module

        return a.exists() and any(_same_file(a, part) for part in folder_files(b))
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
            over a folder's index or shards, is refused even with ``force``.

    Raises:
        CheckpointError: The target is an input, exists without ``force``, is a folder or
            not a regular file, its folder does not exist, or the file cannot be written
            there (no permission, no space left).

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp() + "/out.bin"
        >>> with atomic_output(out) as tmp:
        ...     _ = tmp.write_bytes(b"done")
        >>> Path(out).read_bytes()
        b'done'
    """
    with atomic_outputs([path], force=force, inputs=inputs) as (temp,):
        yield temp


@contextlib.contextmanager
def atomic_outputs(
    paths: Sequence[PathLike], *, force: bool = False, inputs: Iterable[PathLike] = ()
) -> Iterator[list[Path]]:
    """:func:`atomic_output` for files that belong together: all of them or none.

    Yields a temporary path for each of ``paths``. The files they replace are set aside
    until every new one is in place, and put back if one cannot be, so a failure never
    leaves new files beside old ones.

    Raises:
        CheckpointError: As :func:`atomic_output`, for any of ``paths``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_outputs([folder / "a", folder / "b"]) as (a, b):
        ...     _ = a.write_text("1"), b.write_text("2")
        >>> sorted(p.name for p in folder.iterdir())
        ['a', 'b']
    """
    inputs = list(inputs)
    targets = [check_output_path(path, force=force, inputs=inputs) for path in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            with _writing(target):
                temps.append(_create_temp(target))
        # Only a full disk is surely about the output; other errors of the block are the
        # caller's (an input that cannot be read).
        with _writing(targets[0], only=_NO_SPACE):
            yield temps
        for temp, target in zip(temps, targets, strict=True):
            with _writing(target):
                _fsync(temp)
            if not force and target.exists():
                # Another process created the target while we were writing.
                raise CheckpointError(
                    "already exists; pass --force to overwrite it", path=str(target)
                )
        _replace_all(temps, targets)
    finally:
        for temp in temps:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


def _replace_all(temps: list[Path], targets: list[Path]) -> None:
    """Rename each temporary file onto its target; on a failure, undo the ones done.

    Ctrl-C and stop signals wait until the files are all in place and the old ones gone
    (deleting a large old file takes a moment): stopped half-way through, the command
    would leave set-aside ``.old-`` files behind, or report a failure after succeeding.
    """
    placed: list[Path] = []
    set_aside: list[tuple[Path, Path]] = []  # a target's old file, and where it went
    with _stops_deferred():
        try:
            for temp, target in zip(temps, targets, strict=True):
                with _writing(target):
                    if len(targets) > 1 and target.exists():
                        old = _free_name(target, "old")
                        os.replace(target, old)
                        set_aside.append((target, old))
                    os.replace(temp, target)
                    placed.append(target)
        except BaseException:
            for target in placed:
                target.unlink()
            for target, old in set_aside:
                os.replace(old, target)
            raise
        for _, old in set_aside:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        for folder in {target.parent for target in targets}:
            _fsync_dir(folder)


_STOP_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []),
)


@contextlib.contextmanager
def _stops_deferred() -> Iterator[None]:
    """Hold Ctrl-C and stop signals until the block ends, then act on the first one.

    Python runs signal handlers in the main thread whichever thread the system delivers
    a signal to, so a handler that only notes the signal holds it reliably (blocking it
    in the main thread would not: another thread may receive it).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: object) -> None:
        caught.append(signum)

    previous = {}
    for number in _STOP_SIGNALS:
        handler = signal.getsignal(number)
        if handler is not None:  # None: set outside Python, left as it is
            previous[number] = signal.signal(number, hold)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])  # handled now as it would have been


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def _writing(target: Path, *, only: tuple[int, ...] | None = None) -> Iterator[None]:
    """Turn the system's refusal to write ``target`` (of the kinds ``only``, if given)
    into an error that names it and the fix."""
    try:
        yield
    except OSError as err:
        if only is not None and err.errno not in only:
            raise
        reason = err.strerror or str(err)
        if err.errno in _NO_SPACE:
            fix = "free some space or write the output elsewhere"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"write it to a folder you may write to, or change the permissions of '{target.parent}'"
        elif err.errno == errno.ENAMETOOLONG:
            fix = "choose a shorter output name"
        else:
            fix = "check the output path and the disk"
        raise CheckpointError(f"cannot be written ({reason}); {fix}", path=str(target)) from err


def _create_temp(target: Path) -> Path:
    # os.open with O_EXCL (rather than mkstemp) so the final file gets the usual
    # umask-based permissions instead of mkstemp's 0600.
    while True:
        temp = _free_name(target, "tmp")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temp


def _free_name(target: Path, kind: str) -> Path:
    """A hidden name beside ``target`` that is, most likely, not taken."""
    return target.with_name(f".{target.name}.{kind}-{secrets.token_hex(4)}")


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
