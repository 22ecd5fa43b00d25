"""Compiled CPU kernels: loaded in the background, used where they apply, the chains' bits."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

import transform_core as tt
from transform_core import kernels

cpu_kernels = pytest.importorskip("transform_core.cpu_kernels", reason="needs Numba")

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@pytest.fixture(autouse=True)
def _loaded() -> None:
    assert kernels.wait_for_compiled_kernels() is cpu_kernels


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.isnan()
    return (
        a.dtype == b.dtype
        and torch.equal(nan, b.isnan())
        and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
        and torch.equal(a.signbit() & ~nan, b.signbit() & ~nan)
    )


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in ("round_levels", "int_quant", "dropout", "decay"):
        original = getattr(cpu_kernels, name)

        def counted(*args, _name=name, _original=original):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(cpu_kernels, name, counted)
    return calls


TRANSFORMS: dict[str, Transform] = {
    "stochastic": lambda x, g: tt.stochastic_rounding(x, generator=g),
    "stochastic ranges": lambda x, g: tt.stochastic_rounding(
        x, input_range=[-2, 2], output_range=[-127, 127], num_levels=255, generator=g
    ),
    "deterministic": lambda x, g: tt.deterministic_rounding(x, num_levels=15),
    "deterministic off zero": lambda x, g: tt.deterministic_rounding(
        x, output_range=[0.0, 3.0], maintain_zero=False, num_levels=16
    ),
    "int_quant": lambda x, g: tt.int_quant(x, n_bits=4),
    "int_quant centred": lambda x, g: tt.int_quant(x, maintain_zero=False, map_to_max=True),
    "dropout": lambda x, g: tt.dropout(x, 0.3, generator=g),
    "t_decay": lambda x, g: tt.t_decay(torch.sigmoid(x) * 1.1),
}
CHANNEL: dict[str, Transform] = {
    f"{kind} dim {dim}": (
        lambda x, g, kind=kind, dim=dim: (
            tt.stochastic_channel_rounding(x, [-1, 1], num_levels=16, dim=dim, generator=g)
            if kind == "stochastic_channel"
            else tt.deterministic_channel_rounding(x, num_levels=16, dim=dim)
        )
    )
    for kind in ("stochastic_channel", "deterministic_channel")
    for dim in (0, 1, -1)
}


def _data(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    flat = x.view(-1)
    flat[:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0])
    return x.to(dtype)


def _compare(fn: Transform, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    fast = fn(x, torch.Generator().manual_seed(3))
    assert calls, "the compiled kernel did not run"
    with kernels.compiled(False):
        blocks = fn(x, torch.Generator().manual_seed(3))
    assert len(calls) == 1
    assert _identical(fast, blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("shape", [(300_001,), (700, 500)])
def test_compiled_kernels_give_the_chains_bits(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, name: str, shape: tuple[int, ...]
) -> None:
    _compare(TRANSFORMS[name], _data(shape, dtype), monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CHANNEL))
@pytest.mark.parametrize(
    "shape", [(700, 500), (3, 500, 70), (64, 32, 5, 5), (128, 32, 3, 3), (2, 2000, 3, 3)]
)
def test_compiled_channel_rounding_gives_the_chains_bits(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, name: str, shape: tuple[int, ...]
) -> None:
    _compare(CHANNEL[name], _data(shape, dtype), monkeypatch)


def test_kernels_are_left_to_the_chains_where_they_do_not_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _counting(monkeypatch)
    big = _data((300_001,), torch.float32)
    tt.deterministic_rounding(big.half())  # half precision
    tt.deterministic_rounding(big[::2])  # not contiguous
    tt.deterministic_rounding(big[:1000])  # small
    tt.deterministic_rounding(torch.zeros(300_001), output_range=[-1.0, 1.0])  # zero width
    w = big.clone().requires_grad_()
    tt.dropout(w, 0.5)  # dropout's gradient is the mask, recorded by the chain
    with kernels.fast_paths(False):
        tt.deterministic_rounding(big)
    assert calls == []


def test_gradients_pass_straight_through_the_compiled_kernels() -> None:
    w = _data((700, 500), torch.float32).nan_to_num(0.0, 0.0, 0.0).requires_grad_()
    out = tt.stochastic_rounding(w, input_range=[-4, 4], output_range=[-8, 8])
    out.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.full_like(w, 2.0))


_FILLS = {
    "normal": None,
    "no finite value": math.nan,
    "negative zeros": -0.0,
    "constant": 2.5,
    "infinities": math.inf,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fill", sorted(_FILLS))
@pytest.mark.parametrize("maintain_zero", [True, False])
@pytest.mark.parametrize(
    ("output_range", "num_levels"), [(None, 256), (None, 15), ([-3.0, 3.0], 255), ([0.0, 7.0], 8)]
)
def test_ranges_from_the_data_take_one_compiled_pass_and_give_the_chains_bits(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    fill: str,
    maintain_zero: bool,
    output_range: list[float] | None,
    num_levels: int,
) -> None:
    x = _data((300_001,), dtype)
    if _FILLS[fill] is not None:
        x[4:] = _FILLS[fill]
    passes: list[int] = []
    original = cpu_kernels.finite_ends
    monkeypatch.setattr(cpu_kernels, "finite_ends", lambda v: passes.append(1) or original(v))
    for stochastic in (False, True):
        rounding = tt.stochastic_rounding if stochastic else tt.deterministic_rounding
        args = {"output_range": output_range, "num_levels": num_levels}
        args["maintain_zero"] = maintain_zero
        if stochastic:
            args["generator"] = torch.Generator().manual_seed(5)
        fast = rounding(x, **args)  # type: ignore[arg-type]
        if stochastic:
            args["generator"] = torch.Generator().manual_seed(5)
        with kernels.compiled(False):
            plain = rounding(x, **args)  # type: ignore[arg-type]
        assert _identical(fast, plain), (stochastic, fill)
    assert len(passes) == 2


def test_the_gradient_of_a_range_from_the_data_is_the_chains() -> None:
    w = _data((700, 500), torch.float32).nan_to_num(0.0, 0.0, 0.0)
    grads = []
    for compiled in (True, False):
        x = w.clone().requires_grad_()
        with kernels.compiled(compiled):
            tt.stochastic_rounding(x, output_range=[-1.0, 1.0], num_levels=255).sum().backward()
        assert x.grad is not None
        grads.append(x.grad)
    peak = w.abs().max()
    assert torch.equal(grads[0], grads[1])
    assert torch.allclose(grads[0], torch.full_like(w, 1.0) / peak)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_ends_are_the_negated_minimum_and_the_maximum(dtype: np.dtype) -> None:
    values = np.random.default_rng(0).standard_normal(1_000_003).astype(dtype)
    values[[5, 700_000]] = [np.nan, -np.inf]
    values[999_999] = np.inf
    ends = cpu_kernels.finite_ends(torch.from_numpy(values))
    finite = values[np.isfinite(values)]
    assert ends.dtype == torch.from_numpy(values).dtype
    assert ends.tolist() == [[-finite.min(), finite.max()]]
    nothing = cpu_kernels.finite_ends(torch.full((300_000,), math.nan, dtype=torch.float32))
    assert nothing.tolist() == [[-math.inf, -math.inf]]


def test_hash_bits_are_the_kernels_bits() -> None:
    start = 2**32 - 6000  # up to the last index the kernels take
    for key in (0, 1, 2**31 + 17, 2**32 - 1):
        want = kernels.hash_bits(start, 6000, key)
        got = [
            int(cpu_kernels._bits(np.uint32(i), np.uint32(key))) for i in range(start, 2**32, 97)
        ]
        assert got == want[::97].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_at_the_ends_and_across_tiles(dtype: torch.dtype) -> None:
    ends = torch.tensor([math.inf, 1.0, 0.999, 0.5, 0.0, -math.inf, math.nan], dtype=dtype)
    x = torch.cat([ends, torch.rand(3000, dtype=dtype), ends])  # a ragged last tile
    thresholds, table = tt.quantise._decay_tables(dtype, dtype)
    got = cpu_kernels.decay(x, thresholds, table)
    with kernels.fast_paths(False):
        want = tt.t_decay(x)
    assert _identical(got, want)


def _run(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
        timeout=120,
    )
    return result.stdout.strip()


_PROBE = """
import sys, torch, transform_core as tt
from transform_core import kernels
x = torch.randn(300_001, generator=torch.Generator().manual_seed(0))
first = tt.stochastic_rounding(x, generator=torch.Generator().manual_seed(1))
ready = kernels.wait_for_compiled_kernels() is not None
second = tt.stochastic_rounding(x, generator=torch.Generator().manual_seed(1))
print(ready, torch.equal(first, second), sys.modules.get('numba') is not None)
"""


@pytest.mark.slow
def test_a_fresh_process_loads_in_the_background_and_gets_the_same_values() -> None:
    # The first call runs before the kernels are ready; the second runs compiled.
    assert _run(_PROBE) == "True True True"


@pytest.mark.slow
def test_without_numba_or_when_turned_off_the_chains_run() -> None:
    blocked = "import sys; sys.modules['numba'] = None\n" + _PROBE
    assert _run(blocked) == "False True False"
    for off in ("0", "off", "False"):
        assert _run(_PROBE, ROCKQ_COMPILED_KERNELS=off) == "False True False"


def test_importing_transform_core_does_not_import_numba() -> None:
    assert _run("import sys, transform_core; print('numba' in sys.modules)") == "False"


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def small_pieces(two_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads and pieces of a few thousand elements, so that small tensors split."""
    monkeypatch.setattr(cpu_kernels, "THREAD_ELEMENTS", 1 << 12)
    monkeypatch.setattr(cpu_kernels, "PIECE_ELEMENTS", 1 << 10)


@pytest.mark.parametrize(
    ("name", "shape"),
    [(name, (300_001,)) for name in sorted(TRANSFORMS)]
    + [(name, (7, 30, 1001)) for name in sorted(TRANSFORMS) + sorted(CHANNEL)]
    + [(name, (128, 32, 3, 3)) for name in sorted(CHANNEL)],
)
def test_pieces_on_several_threads_give_the_same_bits(
    small_pieces: None, monkeypatch: pytest.MonkeyPatch, name: str, shape: tuple[int, ...]
) -> None:
    fn = {**TRANSFORMS, **CHANNEL}[name]
    x = _data(shape, torch.float32)
    calls: list[int] = []
    original = cpu_kernels._parallel
    monkeypatch.setattr(
        cpu_kernels, "_parallel", lambda c, t: calls.append(len(c)) or original(c, t)
    )
    split = fn(x, torch.Generator().manual_seed(3))
    assert max(calls) >= 8, "the work was not cut into pieces"
    monkeypatch.setattr(cpu_kernels, "THREAD_ELEMENTS", 1 << 40)
    whole = fn(x, torch.Generator().manual_seed(3))
    assert _identical(split, whole)


def test_statistics_in_pieces_on_several_threads_are_the_same(small_pieces: None) -> None:
    values, reference = _report_data(300_001, np.dtype(np.float32))
    split = cpu_kernels.error_sums(values, reference), cpu_kernels.distinct_finite(values, 10**6)
    ends = cpu_kernels.finite_ends(torch.from_numpy(values))
    cpu_kernels.THREAD_ELEMENTS = 1 << 40  # restored by the fixture's monkeypatch
    whole = cpu_kernels.error_sums(values, reference), cpu_kernels.distinct_finite(values, 10**6)
    for a, b in zip(split[0], whole[0], strict=True):
        assert np.array_equal(a, b)
    assert split[1] is not None and whole[1] is not None
    assert np.array_equal(split[1][0], whole[1][0]) and split[1][1] == whole[1][1]
    assert torch.equal(ends, cpu_kernels.finite_ends(torch.from_numpy(values)))


def test_a_slow_thread_leaves_its_pieces_to_the_others(two_threads: None) -> None:
    done: list[tuple[str, int]] = []

    def piece(index: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.2)  # a worker held up, as by another thread on its core
        done.append((threading.current_thread().name, index))

    started = time.perf_counter()
    cpu_kernels._parallel([(piece, (k,)) for k in range(40)], 2)
    assert sorted(k for _, k in done) == list(range(40))
    main = sum(name == threading.main_thread().name for name, _ in done)
    assert main >= 38 and time.perf_counter() - started < 2.0


def test_an_error_in_a_piece_is_raised_after_all_threads_stop(two_threads: None) -> None:
    running: list[int] = []

    def piece(index: int) -> None:
        running.append(index)
        time.sleep(0.01)
        if index == 3:
            raise ValueError("piece 3")
        running.remove(index)

    with pytest.raises(ValueError, match="piece 3"):
        cpu_kernels._parallel([(piece, (k,)) for k in range(8)], 2)
    assert running == [3]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_the_kernels_on_threads_of_its_own(small_pieces: None) -> None:
    x = _data((1 << 20,), torch.float32)
    want = cpu_kernels.int_quant(x, 0.0, 30.0, 127.0).numpy()  # the pool now has threads
    assert cpu_kernels._pool is not None
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the kernels ran and agreed
        # Only NumPy and the kernels here: torch's own thread pool does not survive a fork
        # (which is why DataLoader workers run with one thread).
        got = cpu_kernels.int_quant(x, 0.0, 30.0, 127.0).numpy()
        os._exit(0 if np.array_equal(got, want, equal_nan=True) else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


_TRIGGER = """
import torch, transform_core as tt
from transform_core import kernels
kernels.LOAD_AFTER_SECONDS = {after}
tt.deterministic_rounding(torch.randn(300_001))
print(kernels._Compiled.thread is not None)
"""


def test_loading_starts_only_after_enough_work_in_the_chains() -> None:
    assert _run(_TRIGGER.format(after=1000.0)) == "False"
    assert _run(_TRIGGER.format(after=0.0)) == "True"


@pytest.mark.parametrize("maintain_zero", [True, False])
@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((600, 300), 1),
        ((300, 600), 0),
        ((40, 30, 9, 9), 1),
        ((128, 30, 3, 3), 1),
        ((2, 2000, 3, 3), 1),
    ],
)
def test_channel_ranges_are_the_chains(
    monkeypatch: pytest.MonkeyPatch, maintain_zero: bool, shape: tuple[int, ...], dim: int
) -> None:
    x = _data(shape, torch.float32)
    x.select(dim, 1).fill_(math.nan)  # no finite value
    x.select(dim, 2).fill_(-0.0)  # zero width, negative zeros
    x.select(dim, 3).fill_(math.inf)
    x.select(dim, 4).fill_(-5.0)
    others = tuple(d for d in range(x.dim()) if d != dim)
    calls: list[int] = []
    original = cpu_kernels.channel_range
    monkeypatch.setattr(cpu_kernels, "channel_range", lambda *a: calls.append(1) or original(*a))
    fast = tt.quantise._finite_range(x, maintain_zero, others)
    with kernels.compiled(False):
        plain = tt.quantise._finite_range(x, maintain_zero, others)
    assert calls
    for a, b in zip(fast, plain, strict=True):
        assert a.shape == b.shape and _identical(a, b)
    assert fast[0].flatten()[1:4].tolist() == [0.0, 0.0, 0.0]


def test_the_shapes_above_cover_both_layouts_of_short_runs() -> None:
    # (outer, channels, inner) of the shapes above along dim 1: 3 x 3 and 5 x 5 runs go a
    # row at a time; too few rows, or runs too long, go a run at a time.
    assert cpu_kernels._by_rows(128, 32, 9) and cpu_kernels._by_rows(64, 32, 25)
    assert cpu_kernels._by_rows(700, 500, 1)
    assert not cpu_kernels._by_rows(2, 2000, 9)
    assert not cpu_kernels._by_rows(3, 500, 70)
    assert not cpu_kernels._by_rows(1, 300, 600)


# --- the report's statistics -------------------------------------------------------------


def _report_data(size: int, dtype: np.dtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference values and their rounding to 1/40: few distinct values, with NaN, infinities,
    negative zeros and a pair that differs only in non-finite ways."""
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal(size).astype(dtype)
    values = (np.round(reference * 40) / 40).astype(dtype)
    if size > 20:
        values[[3, 11]] = np.nan
        reference[[5, 11]] = np.inf
        values[7] = -np.inf
        values[13] = -0.0
    return values, reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [0, 1, 17, 65_536, 65_537, 300_001])
def test_distinct_values_are_the_sorts(dtype: np.dtype, size: int) -> None:
    from transform_core.tensor_report import _sorted_distinct

    values, _ = _report_data(size, dtype)
    found = cpu_kernels.distinct_finite(values, 1 << 16)
    assert found is not None
    expected, nonfinite = _sorted_distinct(values)
    assert found[1] == nonfinite
    assert found[0].dtype == values.dtype
    assert np.array_equal(found[0], expected)
    assert not np.signbit(found[0][found[0] == 0]).any()  # -0.0 counted as 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("distinct", [1023, 1024, 1025, 20_000])
def test_more_distinct_values_than_the_first_try_holds_are_counted_again(
    dtype: np.dtype, distinct: int
) -> None:
    values = np.tile(np.arange(distinct, dtype=dtype) - 500.0, 300_001 // distinct + 1)
    found = cpu_kernels.distinct_finite(values, 1 << 16)
    assert found is not None and found[1] == 0
    assert np.array_equal(found[0], np.arange(distinct, dtype=dtype) - 500.0)
    assert cpu_kernels.FIRST_DISTINCT_LIMIT == 1024  # the cases above sit around it


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_too_many_distinct_values_give_up_early(dtype: np.dtype) -> None:
    values = np.arange(300_001, dtype=dtype)
    assert cpu_kernels.distinct_finite(values, 1000) is None
    assert cpu_kernels.distinct_finite(values[:1000], 1000) is not None
    # Two threads that each hold under the limit, but more than it together.
    halves = np.concatenate([np.arange(700.0), np.arange(700.0, 1400.0)] * 200).astype(dtype)
    assert cpu_kernels.distinct_finite(halves, 1000) is None


@pytest.mark.parametrize(("vdtype", "rdtype"), [(np.float32,) * 2, (np.float64,) * 2,
                                                (np.float32, np.float64)])  # fmt: skip
@pytest.mark.parametrize("size", [0, 1, 17, 1024, 65_536, 65_537, 300_001, 1_048_576 + 3])
def test_error_sums_are_numpys_bits(vdtype: np.dtype, rdtype: np.dtype, size: int) -> None:
    from transform_core.tensor_report import error_block_sums

    values, reference = _report_data(size, vdtype, seed=size)
    reference = reference.astype(rdtype)
    compiled = cpu_kernels.error_sums(values, reference)
    plain = error_block_sums(values, reference)
    assert compiled[0].shape == plain[0].shape
    assert np.array_equal(compiled[0], plain[0]) and np.array_equal(compiled[1], plain[1])
    assert compiled[2:] == plain[2:]


def test_error_sums_skip_pairs_that_overflow() -> None:
    from transform_core.tensor_report import error_block_sums

    values = np.full(70_000, 1.5e308)
    reference = -values
    reference[:5] = 1.5e308  # these pairs agree; the rest differ by more than float64 holds
    values[6], reference[6] = 1e160, 0.0  # a finite difference whose square overflows
    compiled = cpu_kernels.error_sums(values, reference)
    plain = error_block_sums(values, reference)
    assert compiled[3] == plain[3] == 5 + 1
    assert np.array_equal(compiled[0], plain[0], equal_nan=True)
    assert math.isinf(compiled[0].sum())
