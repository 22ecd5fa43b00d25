"""Fast execution of the element-wise transforms in :mod:`transform_core.quantise`.

The transforms are memory bound: each reads a tensor and writes one of the same size, with
a handful of arithmetic operations per element in between. Written as a chain of tensor
operations (subtract, divide, round, clamp, a few masks, multiply, add, and a buffer of
random numbers), every step reads and writes the whole tensor, and most allocate a new
one. On CPU a fresh buffer of many megabytes costs more than the arithmetic on it: the
operating system maps each page on first touch. A chain of ten steps then costs several
times a plain copy.

The remedies, for large CPU tensors (:data:`SMALL` elements or more):

- Compiled kernels (:mod:`transform_core.cpu_kernels`, with Numba) run each transform as
  one pass over memory on all of torch's threads. They compute exactly what the chains
  compute, so they change speed, never results. They load in a background thread once
  a process has spent :data:`LOAD_AFTER_SECONDS` in the chains (:func:`compiled_kernels`);
  until then, or without Numba, the chains run.
- :func:`map_blocks` runs a chain block by block (:data:`BLOCK` elements at a time) and
  writes each block's result into one output tensor. The blocks of input, temporaries
  and output stay in cache from the first step to the last, the temporaries are small
  enough for the allocator to recycle, and the only large allocation is the result. The
  chain itself is unchanged, so results are bit-for-bit those of the whole-tensor chain.
- :class:`LevelMap` pins the top and zero levels with vectorised operations (a clamp, an
  exact gap added through a float mask, ``hardshrink``) where it can prove them exact;
  boolean masks and ``masked_fill`` are not vectorised on CPU and cost more than the
  rest of a rounding. :func:`abs_max` finds ``max|x|`` without an ``abs()`` copy.
- Random numbers are counter-based (:func:`hash_bits`): one draw from the caller's
  generator keys a call, and element ``i`` gets a hash of ``i`` and the key. Threads,
  blocks and the compiled kernels then draw the same numbers for the same element, and
  making them costs a few integer operations rather than a Mersenne Twister step each.
  :func:`stochastic_floor_` rounds up with probability within ``2**-24`` of the
  fraction; :func:`drop_mask` and :func:`zero_dropped` drop with probability exact to
  ``2**-32``.
- On CUDA, :mod:`transform_core.cuda_kernels` runs the rounding as one Triton kernel
  and finds the data range in one pass.

Tensors below :data:`SMALL` elements take the plain chains with ``torch.rand`` noise:
there the fast paths' fixed cost per call outweighs what they save. ``torch.compile``
would fuse each chain too, but it costs seconds per process before its first call (6 s
with a warm cache, 20 s cold, on two cores), on the caller's time.

:func:`fast_paths` turns all of this off for a block of code and :func:`compiled` only the
compiled kernels, which is how the benchmarks compare the paths in one run.

Example:
    >>> x = torch.linspace(-1.0, 1.0, 5)
    >>> map_blocks(lambda block, out, start: torch.mul(block, 2, out=out), x)
    tensor([-2., -1.,  0.,  1.,  2.])
    >>> levels = torch.full((SMALL,), 2.25)
    >>> rounded = stochastic_floor_(levels, torch.Generator().manual_seed(0))
    >>> sorted(set(rounded.tolist()))
    [2.0, 3.0]
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import Tensor

from transform_core.errors import ConfigError

__all__ = [
    "BLOCK",
    "ENVIRONMENT_SWITCHES",
    "LOAD_AFTER_SECONDS",
    "OUTPUT_CACHE_BYTES",
    "SMALL",
    "LevelMap",
    "abs_max",
    "chain_timer",
    "check_environment",
    "compiled",
    "compiled_enabled",
    "compiled_kernels",
    "drop_mask",
    "drop_threshold",
    "fast_paths",
    "fast_paths_enabled",
    "hash_bits",
    "large_cpu",
    "map_blocks",
    "output_like",
    "random_key",
    "reusable_empty",
    "start_loading_compiled_kernels",
    "stochastic_floor_",
    "switched_off_by_environment",
    "wait_for_compiled_kernels",
    "zero_dropped",
]

Bound = float | Tensor

#: Elements per block on CPU. A block of float32 input, output and temporaries fits the
#: L2 caches of two cores, and Python's per-operation overhead stays a few percent.
BLOCK = 1 << 17

#: Below this many elements the plain chains run: there the fast paths' fixed cost per
#: call (a few more small operations) would exceed what they save.
SMALL = 1 << 15

_state = threading.local()


def fast_paths_enabled() -> bool:
    """Whether the fast paths are on in this thread (they are unless :func:`fast_paths` says)."""
    return bool(getattr(_state, "enabled", True))


@contextlib.contextmanager
def fast_paths(enabled: bool = True) -> Iterator[None]:
    """Turn the fast paths on or off inside a ``with`` block, in this thread.

    With them off, every transform runs its plain whole-tensor chain of tensor operations
    and draws its random numbers with ``torch.rand``: slower, and the reference that the
    fast paths are checked and measured against.

    Args:
        enabled: ``False`` to run the plain chains.

    Example:
        >>> with fast_paths(False):
        ...     fast_paths_enabled()
        False
        >>> fast_paths_enabled()
        True
    """
    before = fast_paths_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = before


# --------------------------------------------------------------------------------------
# Compiled kernels


#: Seconds of tensor chains on large CPU tensors after which a process starts loading the
#: compiled kernels. Loading takes about a second (Numba, then its cached machine code; a
#: first compilation after installing takes several); a process exits only once it is done.
#: Waiting for this much work first keeps that cost in proportion: a program that
#: transforms a few tensors once never pays it, and one that trains or quantises a large
#: network pays it at most once, early, beside work it then speeds up.
LOAD_AFTER_SECONDS = 1.0


class _Compiled:
    """The compiled CPU kernels' loading state: loaded once per process, in the background."""

    module: Any = None
    thread: threading.Thread | None = None
    failure: str | None = None
    chain_seconds = 0.0
    lock = threading.Lock()


def _load_compiled() -> None:
    try:
        from transform_core import cpu_kernels

        cpu_kernels.warm_up()
        _Compiled.module = cpu_kernels
    except Exception as error:  # any failure means: keep the tensor chains
        _Compiled.failure = f"{type(error).__name__}: {error}"


def _join_loader() -> None:
    # A process must not exit while the loader is inside the compiler.
    thread = _Compiled.thread
    if thread is not None:
        thread.join()


_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


def switched_off_by_environment(variable: str) -> bool:
    """Whether the environment variable reads ``0``, ``false``, ``no`` or ``off`` (any case).

    Unset, empty, ``1``, ``true``, ``yes`` and ``on`` leave the feature on.

    Raises:
        ConfigError: Any other value, so that a typing slip does not go unnoticed.

    Example:
        >>> import os
        >>> os.environ["ROCKQ_EXAMPLE"] = "Off"
        >>> switched_off_by_environment("ROCKQ_EXAMPLE"), switched_off_by_environment("UNSET_ONE")
        (True, False)
        >>> del os.environ["ROCKQ_EXAMPLE"]
    """
    setting = os.environ.get(variable, "").strip().lower()
    if setting not in _OFF + _ON:
        raise ConfigError(
            f"environment variable {variable}={os.environ[variable]!r} is not understood; "
            "set it to 0 (or false, no, off) to turn the feature off, or unset it"
        )
    return setting in _OFF


ENVIRONMENT_SWITCHES = ("ROCKQ_COMPILED_KERNELS", "ROCKQ_DIRECT_IO")
"""The environment variables that turn a fast path off (see :func:`switched_off_by_environment`)."""


def check_environment() -> None:
    """Refuse a value of an :data:`ENVIRONMENT_SWITCHES` variable that is not understood.

    They are read only when their fast path is first due, perhaps never on a small input:
    a command checks them first, so that a typing slip is reported every time.

    Raises:
        ConfigError: Naming the variable and its value.
    """
    for variable in ENVIRONMENT_SWITCHES:
        switched_off_by_environment(variable)


def _start_loading() -> None:
    if switched_off_by_environment("ROCKQ_COMPILED_KERNELS"):
        return
    with _Compiled.lock:
        if _Compiled.thread is None and _Compiled.failure is None:
            _Compiled.thread = threading.Thread(
                target=_load_compiled, name="rockq-compile", daemon=True
            )
            atexit.register(_join_loader)
            _Compiled.thread.start()


def _chain_ran(seconds: float) -> None:
    """Count time spent in tensor chains on large CPU tensors; start loading when it is due."""
    _Compiled.chain_seconds += seconds
    if (
        _Compiled.thread is None
        and _Compiled.chain_seconds >= LOAD_AFTER_SECONDS
        and compiled_enabled()
    ):
        _start_loading()


@contextlib.contextmanager
def chain_timer() -> Iterator[None]:
    """Count the time of the block as time spent where a compiled kernel would serve.

    Code with a compiled counterpart (the transforms, the report's statistics) runs its
    plain version inside this block, so that the kernels start loading once that time
    adds up to :data:`LOAD_AFTER_SECONDS`.
    """
    started = time.perf_counter()
    try:
        yield
    finally:
        _chain_ran(time.perf_counter() - started)


def compiled_kernels() -> ModuleType | None:
    """The compiled CPU kernels (:mod:`transform_core.cpu_kernels`) if loaded, else ``None``.

    They load in a background thread once the process has spent
    :data:`LOAD_AFTER_SECONDS` in the tensor chains that they replace (or at once, with
    :func:`wait_for_compiled_kernels`), so no transform waits for them. Until then, and
    where Numba is missing or fails, the tensor chains run and give the same results.
    Turned off by :func:`compiled`, or for the process by setting the environment variable
    ``ROCKQ_COMPILED_KERNELS`` to ``0`` (or ``false``, ``no``, ``off``).
    """
    return _Compiled.module if compiled_enabled() else None


def start_loading_compiled_kernels() -> None:
    """Start loading the compiled kernels in the background now, without waiting.

    For a caller that knows a lot of work is coming (a large tensor file): the kernels
    are then ready sooner than the chain time of :data:`LOAD_AFTER_SECONDS` would make
    them. Does nothing where :func:`compiled` turns them off in this thread.
    """
    if compiled_enabled():
        _start_loading()


def wait_for_compiled_kernels() -> ModuleType | None:
    """Load the compiled kernels now and return them (``None`` if they cannot load).

    Example:
        >>> kernels = wait_for_compiled_kernels()  # None without Numba
    """
    _start_loading()
    _join_loader()
    return compiled_kernels()


def compiled_enabled() -> bool:
    """Whether compiled kernels may run in this thread (see :func:`compiled`)."""
    return fast_paths_enabled() and bool(getattr(_state, "compiled", True))


@contextlib.contextmanager
def compiled(enabled: bool = True) -> Iterator[None]:
    """Allow or forbid the compiled CPU kernels inside a ``with`` block, in this thread.

    With them off the tensor chains run, block by block: the same results, more slowly.
    The benchmarks compare both sides this way.

    Example:
        >>> with compiled(False):
        ...     compiled_kernels() is None
        True
    """
    before = getattr(_state, "compiled", True)
    _state.compiled = enabled
    try:
        yield
    finally:
        _state.compiled = before


# --------------------------------------------------------------------------------------
# Result storage


#: Outputs of at most this many bytes in all are kept for reuse by :func:`output_like`,
#: each of at most an eighth of it.
OUTPUT_CACHE_BYTES = 128 << 20


class _Outputs:
    """Storages of recent results, by shape and dtype, for :func:`output_like` to reuse."""

    storages: ClassVar[dict[tuple[tuple[int, ...], torch.dtype], list[torch.UntypedStorage]]] = {}
    kept = 0  # their bytes
    lock = threading.Lock()
    pid = 0


def _unused(storage: torch.UntypedStorage) -> bool:
    # Only the cache's own reference is left: no tensor (autograd's saved ones included).
    return bool(torch._C._storage_Use_Count(storage._cdata) == 1)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def output_like(value: Tensor) -> Tensor:
    """A new contiguous CPU tensor shaped and typed like ``value``, for a transform's result.

    See :func:`reusable_empty`.

    Example:
        >>> first = output_like(torch.zeros(512, 512))
        >>> ptr = first.data_ptr()
        >>> del first
        >>> output_like(torch.zeros(512, 512)).data_ptr() == ptr
        True
    """
    return reusable_empty(tuple(value.shape), value.dtype)


def reusable_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``torch.empty(shape, dtype=dtype)`` on CPU, in the storage of an earlier one if free.

    A training step transforms the same weights every forward pass, and each result lives
    until the backward pass; tensor mode reads and transforms tensor after tensor of the
    same shape. Freshly allocated each time, megabytes come as new pages from the
    operating system, mapped and zeroed one by one on first touch and unmapped again
    afterwards: that costs more than computing them. So the storages handed out are kept,
    and one of the same shape and dtype is handed out again once nothing uses it any more
    (its reference count shows that); otherwise a new one is allocated. At most
    :data:`OUTPUT_CACHE_BYTES` are kept, the least recently used shape going first, each
    storage at most an eighth of that (16 MiB).

    Example:
        >>> a = reusable_empty((1024,), torch.uint8)
        >>> b = reusable_empty((1024,), torch.uint8)  # a is in use: another storage
        >>> a.data_ptr() != b.data_ptr()
        True
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > OUTPUT_CACHE_BYTES // 8:
        # Larger tensors are rare in training, where their first touch is small next to
        # the work done with them; kept, they would add to a one-off run's peak memory.
        return torch.empty(shape, dtype=dtype)
    key = (shape, dtype)
    with _Outputs.lock:
        if _Outputs.pid != os.getpid():  # a forked child starts afresh
            _Outputs.storages, _Outputs.kept, _Outputs.pid = {}, 0, os.getpid()
        kept = _Outputs.storages.pop(key, [])  # put back last: the most recently used
        _Outputs.storages[key] = kept
        free = next((s for s in kept if s.nbytes() == nbytes and _unused(s)), None)
        if free is None:
            free = torch.empty(shape, dtype=dtype).untyped_storage()
            kept.append(free)
            _Outputs.kept += nbytes
        out = torch.empty(0, dtype=dtype).set_(free, 0, shape, _contiguous_strides(shape))
        while _Outputs.kept > OUTPUT_CACHE_BYTES:
            (old_shape, old_dtype), storages = next(iter(_Outputs.storages.items()))
            storages.pop(0)  # counted at its size when made, whatever a caller did since
            _Outputs.kept -= math.prod(old_shape) * old_dtype.itemsize
            if not storages:
                del _Outputs.storages[(old_shape, old_dtype)]
    return out


# --------------------------------------------------------------------------------------
# Block-wise execution on CPU


def _row_blocks(value: Tensor, params: Sequence[object]) -> Tensor | None:
    """A view of ``value`` whose leading dimension can be cut into blocks, or ``None``.

    Parameters of one element broadcast to any block, so the value is flattened. Larger
    ones (a per-channel range, kept with ``keepdim``) must have size 1 in dimension 0; the
    value is then cut into groups of whole rows.
    """
    varying = [p for p in params if isinstance(p, Tensor) and p.numel() > 1]
    if not varying:
        return value.reshape(-1)
    if value.dim() < 2 or value.shape[0] == 1:
        return None
    if all(p.dim() == value.dim() and p.shape[0] == 1 for p in varying):
        return value
    return None


def map_blocks(
    fn: Callable[[Tensor, Tensor | None, int], Tensor],
    value: Tensor,
    params: Sequence[object] = (),
) -> Tensor:
    """Compute ``fn(value, None, 0)`` block by block on CPU, for an element-wise ``fn``.

    ``fn(block, out, start)`` computes the function of ``block``, which starts at flat
    element ``start`` of ``value`` (for position-keyed random bits, see :func:`hash_bits`).
    ``out`` is the matching block of the result (``value``'s dtype), or ``None`` when the
    value is not cut: ``fn`` may write into it and return it, which saves a copy; any
    other tensor it returns is copied there. ``fn`` must act on each element
    independently (broadcasting against ``params``), keep the shape, and not need a
    gradient through it.

    Large contiguous CPU tensors are cut into blocks of about :data:`BLOCK` elements.
    Anything else (CUDA, small or non-contiguous tensors, a value that needs a gradient,
    fast paths off, a result whose dtype is not ``value``'s) gets ``fn(value, None, 0)``.

    Args:
        fn: Element-wise function of a tensor, with an optional output block.
        value: The input.
        params: Tensors that ``fn`` broadcasts against ``value`` (per-channel ranges, say);
            they decide how the value may be cut. Anything else in it is ignored.

    Returns:
        ``fn(value, None, 0)``, bit-for-bit.

    Example:
        >>> lo = torch.tensor([[0.0, 10.0]])
        >>> map_blocks(lambda v, out, start: torch.sub(v, lo, out=out), torch.ones(3, 2), [lo])
        tensor([[ 1., -9.],
                [ 1., -9.],
                [ 1., -9.]])
    """
    if not large_cpu(value):
        return _map_blocks(fn, value, params)
    with chain_timer():
        return _map_blocks(fn, value, params)


def _map_blocks(
    fn: Callable[[Tensor, Tensor | None, int], Tensor],
    value: Tensor,
    params: Sequence[object],
) -> Tensor:
    if (
        value.device.type != "cpu"
        or value.numel() <= BLOCK
        or not value.is_contiguous()
        or (value.requires_grad and torch.is_grad_enabled())
        or not fast_paths_enabled()
    ):
        return fn(value, None, 0)
    rows = _row_blocks(value, params)
    if rows is None:
        return fn(value, None, 0)
    per_row = rows[0].numel() if rows.dim() > 1 else 1
    step = max(1, BLOCK // per_row)
    out = torch.empty_like(value)
    out_rows = out.view(rows.shape)
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        target = out_rows[start : start + step]
        result = fn(block, target, start * per_row)
        if result is target or (
            result.data_ptr() == target.data_ptr() and result.shape == target.shape
        ):
            continue
        if result.shape != block.shape:
            raise ValueError(
                f"map_blocks needs an element-wise function: a block of shape "
                f"{tuple(block.shape)} gave {tuple(result.shape)}"
            )
        if result.dtype != value.dtype and start == 0:
            # The whole chain would promote; blocks would have to cast.
            return fn(value, None, 0)
        target.copy_(result)
    return out


# --------------------------------------------------------------------------------------
# Random numbers


#: Constants of :func:`hash_bits`, murmur3's 32-bit finaliser (every input bit moves every
#: output bit), and a multiplier for the high word of indices past ``2**32``.
HASH_HIGH = 0x85EBCA77
HASH_M1 = 0x85EBCA6B
HASH_M2 = 0xC2B2AE35
_M32 = 0xFFFFFFFF


def random_key(generator: torch.Generator | None = None) -> int:
    """Draw a 32-bit key for :func:`hash_bits` from ``generator`` (a CPU generator).

    One draw per transform call: the generator's state advances the same way however
    large the tensor is and however it is processed.
    """
    word = torch.empty((), dtype=torch.int64).random_(0, 2**32, generator=generator)
    return int(word)


def hash_bits(start: int, count: int, key: int) -> Tensor:
    """32 random bits (as int64 in ``[0, 2**32)``) for flat elements ``start .. start+count-1``.

    Counter-based: element ``i`` of a tensor always gets the same bits for the same
    ``key``, whichever block or thread computes it, so a transform cut into blocks, or run
    by a compiled kernel (:mod:`transform_core.cpu_kernels`, which computes the same
    function), gives the same result as one made in a single piece.

    Args:
        start: Flat index of the first element.
        count: Number of elements.
        key: From :func:`random_key`.

    Example:
        >>> bits = hash_bits(0, 4, key=7)
        >>> torch.equal(bits[2:], hash_bits(2, 2, key=7))
        True
        >>> bool(((bits >= 0) & (bits < 2**32)).all())
        True
    """
    index = torch.arange(start, start + count, dtype=torch.int64)
    h = torch.bitwise_and(index, _M32)
    if start + count > 2**32:
        h.bitwise_xor_(index.bitwise_right_shift_(32).mul_(HASH_HIGH).bitwise_and_(_M32))
    h.bitwise_xor_(key)
    h.bitwise_xor_(h >> 16).mul_(HASH_M1).bitwise_and_(_M32)
    h.bitwise_xor_(h >> 13).mul_(HASH_M2).bitwise_and_(_M32)
    return h.bitwise_xor_(h >> 16)


def large_cpu(value: Tensor) -> bool:
    """Whether ``value`` takes the CPU fast paths: on CPU, :data:`SMALL` elements or more,
    fast paths on. Such tensors draw :func:`hash_bits` random numbers."""
    return value.device.type == "cpu" and fast_paths_enabled() and value.numel() >= SMALL


def stochastic_floor_(
    levels: Tensor,
    generator: torch.Generator | None = None,
    *,
    key: int | None = None,
    start: int = 0,
) -> Tensor:
    """Round ``levels`` down or up at random, up with probability its fractional part.

    On CPU for :data:`SMALL` elements or more, ``levels`` rounds up when the top 24 of its
    :func:`hash_bits` fall below ``fraction * 2**24``: the probability is within ``2**-24``
    of the fraction. Elsewhere (other devices, small tensors, fast paths off) it is
    ``floor(levels + torch.rand(...))`` as exact arithmetic gives it: a value on a level
    stays there.

    Args:
        levels: Level indices (floating point); may be overwritten.
        generator: Source of the random numbers, on ``levels``'s device.
        key: The key of the random bits, if drawn already (the blocks of one tensor share it).
        start: Flat index of ``levels``'s first element within the whole tensor.

    Returns:
        The rounded levels.
    """
    if not large_cpu(levels) and key is None:
        noise = torch.rand(
            levels.shape, generator=generator, device=levels.device, dtype=levels.dtype
        )
        # floor(levels + noise), decided exactly: up when fraction + noise >= 1. The sum
        # levels + noise rounds to the next level when the noise is within half a unit of
        # 1 - fraction, which would move values that sit on a level; fraction + noise is
        # exact below 1 (both are multiples of the noise's unit for levels of 1 or more).
        floor = torch.floor(levels)
        fraction = levels.sub_(floor)  # exact
        return floor.add_(noise.add_(fraction).ge_(1.0))
    if key is None:
        key = random_key(generator)
    floor = torch.floor(levels)
    fraction = levels.sub_(floor)  # exact
    if fraction.dtype not in (torch.float32, torch.float64):
        # Half precision cannot hold 2**24, nor the noise exactly; float32 holds both.
        fraction = fraction.float()
    scaled = fraction.mul_(2.0**24)  # exact: a power of two
    noise = hash_bits(start, levels.numel(), key).bitwise_right_shift_(8).view(levels.shape)
    # noise < 2**24 converts exactly to scaled's dtype, so the comparison is exact.
    return floor.add_(torch.lt(noise, scaled, out=torch.empty(scaled.shape, dtype=torch.bool)))


def drop_threshold(drop_prob: float) -> int:
    """Elements whose :func:`hash_bits` fall below this drop: probability exact to ``2**-32``."""
    return round(drop_prob * 2.0**32)


def drop_mask(
    shape: torch.Size | Sequence[int],
    drop_prob: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A boolean mask that is ``True`` (drop) with probability ``drop_prob`` per element.

    On CPU for :data:`SMALL` elements or more, an element drops when its
    :func:`hash_bits` fall below ``round(drop_prob * 2**32)``, so the probability is
    exact to ``2**-32``. Elsewhere (on other devices, small masks, fast paths off) it is
    ``torch.rand(shape) < drop_prob``.

    Args:
        shape: Shape of the mask.
        drop_prob: Probability of ``True``, in ``[0, 1]``.
        device: Device of the mask.
        generator: Source of the random bits, on that device.

    Returns:
        A ``torch.bool`` tensor.

    Example:
        >>> drop_mask((4,), 0.0)
        tensor([False, False, False, False])
        >>> drop_mask((4,), 1.0)
        tensor([True, True, True, True])
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = math.prod(shape)
    if device.type != "cpu" or not fast_paths_enabled() or n < SMALL:
        return torch.rand(shape, generator=generator, device=device) < drop_prob
    key = random_key(generator)
    return hash_bits(0, n, key).view(shape) < drop_threshold(drop_prob)


_SAME_SIZE_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def zero_dropped(
    value: Tensor,
    drop_prob: float,
    *,
    generator: torch.Generator | None = None,
    key: int | None = None,
    start: int = 0,
    out: Tensor | None = None,
) -> Tensor:
    """``value.masked_fill(drop_mask(value.shape, drop_prob), 0.0)``: dropout without rescaling.

    Dropped values become ``+0.0``, infinities and ``NaN`` included; kept values are
    unchanged, bit for bit. On CPU (no gradient needed) the mask is applied as integers,
    ``bits & -(keep)``, where boolean masks and ``masked_fill`` are not vectorised. The
    random bits and the result are those of :func:`drop_mask` and ``masked_fill``.

    Args:
        value: Floating-point values.
        drop_prob: Probability of dropping each value, in ``[0, 1]``.
        generator: Source of the random bits, on ``value``'s device.
        key: The key of the random bits, if drawn already (the blocks of one tensor share it).
        start: Flat index of ``value``'s first element within the whole tensor.
        out: Where to write the result on the fast path (shaped and typed like ``value``).

    Returns:
        A new tensor, or ``out``.

    Example:
        >>> zero_dropped(torch.tensor([1.0, float("nan")]), 1.0)
        tensor([0., 0.])
    """
    int_dtype = _SAME_SIZE_INT.get(value.dtype)
    if key is None and not large_cpu(value):
        drop = drop_mask(value.shape, drop_prob, device=value.device, generator=generator)
        return value.masked_fill(drop, 0.0)
    if key is None:
        key = random_key(generator)
    keep = hash_bits(start, value.numel(), key).view(value.shape) >= drop_threshold(drop_prob)
    if (
        int_dtype is None
        or not value.is_contiguous()
        or (value.requires_grad and torch.is_grad_enabled())
    ):
        return value.masked_fill(~keep, 0.0)
    if out is None:
        out = torch.empty_like(value)
    # keep as 1 or 0, negated: all bits set, or none.
    mask = keep.to(int_dtype).neg_()
    torch.bitwise_and(value.view(int_dtype), mask, out=out.view(int_dtype))
    return out


# --------------------------------------------------------------------------------------
# Ranges


def abs_max(value: Tensor, dims: tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """``value.abs().amax(dims)`` without the temporary ``abs()`` tensor.

    Over all elements, one ``aminmax`` pass reads the data once; over some dimensions, the
    minimum and maximum are reduced separately. ``NaN`` propagates, as with ``amax``.

    Args:
        value: A non-empty tensor.
        dims: Dimensions to reduce; ``None`` for all.
        keepdim: Keep reduced dimensions with size 1.

    Returns:
        The largest magnitude, exactly ``value.abs().amax(dims, keepdim)``.

    Example:
        >>> abs_max(torch.tensor([[-3.0, 1.0], [2.0, -0.5]]), (0,))
        tensor([3., 1.])
    """
    if not fast_paths_enabled() or value.numel() < SMALL:
        return value.abs().amax(dim=dims if dims is not None else (), keepdim=keepdim)
    with torch.no_grad():
        if dims is None or len(dims) == value.dim():
            lo, hi = torch.aminmax(value)
            if keepdim:
                lo, hi = lo.reshape([1] * value.dim()), hi.reshape([1] * value.dim())
        else:
            # Separate reductions: aminmax over a dimension is several times slower on CPU.
            lo, hi = value.amin(dim=dims, keepdim=keepdim), value.amax(dim=dims, keepdim=keepdim)
        # max(-lo, hi) is max|x|: -lo is exact, and NaN in either propagates.
        return torch.maximum(lo.neg_(), hi)


# --------------------------------------------------------------------------------------
# Level indices to output values


def _identical(a: float, b: float) -> bool:
    # Equal with the same sign: masked_fill with 0.0 gives +0.0, never -0.0.
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _scalar(p: object) -> bool:
    return isinstance(p, (int, float)) or (isinstance(p, Tensor) and p.numel() == 1)


class LevelMap:
    """Map level indices to output values, with the top level and the zero level exact.

    ``apply_(levels)`` computes ``levels * quantum + lo`` in place, then sets level ``top``
    to exactly ``hi`` and level ``zero_level`` (if any) to exactly ``0``: the multiply-add
    alone can miss either by a rounding error.

    The plain way, comparing every level with ``top`` and ``zero_level`` and filling with
    boolean masks, is the slowest part of a rounding transform on CPU: masks and masked
    fills are not vectorised there. For scalar parameters on CPU this checks, once, what
    the multiply-add gives at the levels next to those two, and picks a vectorised
    equivalent that gives the same values for every level:

    - top: nothing (``top * quantum + lo == hi`` already), a ``clamp`` to ``hi`` (it
      overshoots, and only the top level does), or adding the exact gap ``hi - v_top`` at
      the top level through a float ``0/1`` mask (it undershoots);
    - zero: nothing (already ``0``), or ``hardshrink`` by a threshold that only the zero
      level's value is within.

    Anything else keeps the masks. ``NaN`` levels stay ``NaN`` either way.

    Args:
        quantum: Output width of one level.
        lo: Output value of level 0 before pinning.
        hi: Exact output value of level ``top``.
        top: Index of the top level.
        zero_level: Index of the level that must be exactly zero, or ``None``; a tensor
            holding ``-1`` means none.
        dtype: dtype of the levels that will be mapped.
        device: Their device.

    Example:
        >>> m = LevelMap(0.1, -1.0, 1.0, 20.0, 10.0, torch.float32, torch.device("cpu"))
        >>> m.apply_(torch.tensor([0.0, 10.0, 20.0]))
        tensor([-1.,  0.,  1.])
    """

    def __init__(
        self,
        quantum: Bound,
        lo: Bound,
        hi: Bound,
        top: float,
        zero_level: Bound | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.quantum, self.lo, self.hi, self.top, self.zero_level = quantum, lo, hi, top, zero_level
        self.dtype = dtype
        self.top_fix, self.zero_fix = "mask", "mask"
        self.gap = self.threshold = self.hi_value = 0.0
        scalars = all(_scalar(p) for p in (quantum, lo, hi)) and (
            zero_level is None or _scalar(zero_level)
        )
        # Chosen on the first large tensor: the choice costs a few small operations.
        self._eligible = device.type == "cpu" and scalars
        self._chosen = False

    def _choose(self) -> None:
        # Reading CPU scalars costs nothing; on CUDA it would wait for the device.
        z = None if self.zero_level is None else float(torch.as_tensor(self.zero_level))
        has_zero = z is not None and 0 <= z <= self.top and z == int(z)
        probes = [self.top, self.top - 1] + ([z - 1, z, z + 1] if has_zero and z else [])
        with torch.no_grad():
            # The multiply-add exactly as apply_ runs it, at the levels that matter.
            values = (torch.tensor(probes, dtype=self.dtype) * self.quantum + self.lo).tolist()
            hi = (
                self.hi.to(self.dtype)
                if isinstance(self.hi, Tensor)
                else torch.tensor(float(self.hi), dtype=self.dtype)
            )
            self.hi_value = float(hi)
            v_top, v_below = values[0], values[1]
            gap = float(hi - values[0])
            if _identical(v_top, self.hi_value):
                self.top_fix = "none"
            elif v_top > self.hi_value > v_below:
                self.top_fix = "clamp"
            elif (
                v_below < v_top < self.hi_value
                and float(torch.tensor(v_top, dtype=self.dtype) + gap) == self.hi_value
            ):
                self.top_fix, self.gap = "add", gap
            if not has_zero:
                self.zero_fix = "none"
            elif len(values) == 5 and z is not None and 0 < z < self.top:
                below, v_zero, above = values[2:]
                threshold = float(torch.as_tensor(abs(above - below) / 4, dtype=self.dtype))
                if _identical(v_zero, 0.0):
                    self.zero_fix = "none"
                elif abs(v_zero) <= threshold < min(abs(below), abs(above)):
                    self.zero_fix, self.threshold = "shrink", threshold

    def apply_(self, levels: Tensor) -> Tensor:
        """Map ``levels`` (clamped to ``[0, top]``, or ``NaN``) to output values in place.

        Args:
            levels: Level indices of dtype ``self.dtype``; overwritten.

        Returns:
            The output values (``levels`` itself, or a new tensor after ``hardshrink``).
        """
        large = levels.numel() >= SMALL
        if large and self._eligible and not self._chosen and fast_paths_enabled():
            self._choose()
            self._chosen = True
        if not large or self.top_fix == "mask" or self.zero_fix == "mask":
            at_top = levels == self.top
            at_zero = None if self.zero_level is None else levels == self.zero_level
            out = levels.mul_(self.quantum).add_(self.lo)
            if isinstance(self.hi, Tensor) and self.hi.dim() > 0:
                out = torch.where(at_top, self.hi, out)  # one top per channel
            else:
                out.masked_fill_(at_top, self.hi)
            if at_zero is not None:
                out.masked_fill_(at_zero, 0.0)
            return out
        bump = (
            torch.eq(levels, self.top, out=torch.empty_like(levels))
            if self.top_fix == "add"
            else None
        )
        out = levels.mul_(self.quantum).add_(self.lo)
        if self.top_fix == "clamp":
            out.clamp_(max=self.hi_value)
        elif bump is not None:
            # 0 * gap adds +0.0, which changes nothing but a -0.0 (never an output here).
            out.add_(bump, alpha=self.gap)
        if self.zero_fix == "shrink":
            out = torch.nn.functional.hardshrink(out, self.threshold)
        return out
