"""Settings that rockq makes to a process of its own.

Each lasts as long as the process. :func:`cli.main.run`, the console entry point, marks
the process as rockq's (:func:`claim`); an app run inside a caller's process (a test's
``CliRunner``, a notebook) is left as it is, except for :func:`let_openmp_threads_sleep`,
which only sets a default in the environment.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
from types import FrameType

_own = False

# glibc's mallopt parameters (malloc.h): the size from which a new block is mapped on its
# own, and how much free memory at the top of a heap is kept rather than given back.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

LARGE_BLOCK_BYTES = 4 << 20
"""Blocks of this size or more get mappings of their own under :func:`map_large_blocks`;
smaller ones, such as the 1 MiB arrays of the reports' NumPy error sums, are reused from the
heap."""


class Terminated(KeyboardInterrupt):
    """A request to stop (SIGTERM, SIGHUP), raised where the program is, as Ctrl-C is.

    So a ``kill`` or a closed terminal cleans up as Ctrl-C does: the temporary files of
    outputs are deleted on the way out, where the default action would end the process
    at once and leave them.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def claim() -> None:
    """Mark this process as rockq's own (the console command), and have SIGTERM and
    SIGHUP raise :class:`Terminated`."""
    global _own
    _own = True
    for signum in (signal.SIGTERM, signal.SIGHUP):
        # A signal its parent had ignored (nohup's SIGHUP) stays ignored.
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _raise_terminated)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


# Extension modules built with nanobind, which at exit prints every object of theirs that
# is still alive as a leak, a screenful on stderr. torch's optimisers load Triton's.
_LEAK_REPORTING_MODULES = ("triton._C.libtriton",)


def freeze_imports() -> None:
    """Keep the objects alive now out of every later garbage collection (``gc.freeze``).

    torch leaves over 150,000 objects that live until the process ends. Frozen, no
    collection walks them again: neither the full ones during a long run nor the one at
    exit, which took 0.5 s on two cores. Not in a caller's process, where it would keep
    that process's garbage. Once a module that reports leaks at exit is loaded (Triton's,
    by a training step), nothing is frozen, and what was is thawed: the collection at exit
    then frees its objects rather than leave them to be reported.
    """
    if not _own:
        return
    if any(name in sys.modules for name in _LEAK_REPORTING_MODULES):
        gc.unfreeze()
    else:
        gc.freeze()


def let_openmp_threads_sleep() -> None:
    """Have torch's OpenMP threads sleep between operations instead of spinning.

    Tensor mode's own threads (compiled kernels, writing, hashing) need the CPU that idle
    OpenMP threads would spin on: on two cores a 1 GiB tensor file took 1 to 2 s longer.
    A value the user set wins; it takes effect only before torch is loaded.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def map_large_blocks() -> bool:
    """Give every new block of :data:`LARGE_BLOCK_BYTES` or more a mapping of its own,
    which goes back to the system as soon as it is freed, and give back free memory at the
    top of a heap beyond that size (glibc's ``mallopt``).

    By default glibc raises its mapping size as large blocks are freed, up to 32 MiB, and
    keeps freed blocks below it in its heaps, resident. Tensor mode frees such blocks
    while the compiled kernels load (temporaries of its first tensors' reports), and its
    peak memory has a bound to keep. For a 4 GiB file of 16 MiB tensors the peak went
    from 472 to 456 MiB, and with writes held back 50 ms each (a slow disk) from between
    487 and 519 MiB to 467 MiB in every run; the time did not change (14.3 s and 14.4 s,
    means of five alternating runs). Tensor mode reuses its buffers from tensor to tensor,
    so later on nothing is mapped afresh. Not for training, which would map and fault in
    its large temporaries afresh at every step.

    Returns:
        Whether the setting was made: only in rockq's own process, with glibc.
    """
    if not _own or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without it
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, LARGE_BLOCK_BYTES)
    )
