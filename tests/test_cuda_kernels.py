"""The Triton kernels against the chains they replace, on a GPU and in Triton's interpreter.

Each test runs twice: on a CUDA device (marked ``gpu``), and on the CPU through Triton's
interpreter, which executes the same kernel source with NumPy, so that machines without a
GPU check the kernels' arithmetic too. The interpreter needs Triton installed; on CPU the
chains divide where CUDA multiplies by a reciprocal, and the kernels follow each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transform_core import cuda_kernels, kernels, quantise

NAN, INF = math.nan, math.inf

# The interpreter computes with NumPy, which warns where IEEE arithmetic meets inf and NaN.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

# The module's Triton objects, rebuilt for the interpreter and restored afterwards.
_KERNELS = ("tl", "_triton", *(name for name in vars(cuda_kernels) if name.endswith("_jit")))


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``"cuda"`` where a GPU is; ``"cpu"`` with the kernels run by Triton's interpreter."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if not cuda_kernels._load_triton():
            pytest.skip("needs Triton")
        yield "cuda"
        return
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the kernels run on it")
    # Triton builds its own language functions for the interpreter only if the switch is on
    # when it is first imported.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    if type(triton.language.standard.min).__name__ != "InterpretedFunction":
        pytest.skip("Triton was imported before its interpreter was switched on")
    for name in _KERNELS:
        monkeypatch.setattr(cuda_kernels, name, None)
    monkeypatch.setattr(cuda_kernels, "_TRITON_MISSING", False)
    assert cuda_kernels._load_triton()
    # The interpreter runs kernels on CPU tensors: let them through the device check.
    covered = cuda_kernels._covered
    monkeypatch.setattr(
        cuda_kernels,
        "_covered",
        lambda v: covered(v) or (v.device.type == "cpu" and _cpu_covered(v)),
    )
    yield "cpu"


def _cpu_covered(value: torch.Tensor) -> bool:
    return (
        value.dtype == torch.float32
        and value.is_contiguous()
        and value.numel() > 0
        and kernels.fast_paths_enabled()
    )


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN positions and signs of zeros (NaN's own sign is free)."""
    nan = a.isnan()
    return (
        a.shape == b.shape
        and torch.equal(nan, b.isnan())
        and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
        and torch.equal(a.signbit() & ~nan, b.signbit() & ~nan)
    )


def _data(n: int, device: str, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    x[:5] = torch.tensor([NAN, INF, -INF, 0.0, -0.0])
    return x.to(device)


def _counting(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, int]:
    """Count the calls of these functions of cuda_kernels that ran a kernel (not ``None``)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        launch = getattr(cuda_kernels, name)

        def counted(*args, _launch=launch, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            result = _launch(*args, **kwargs)
            calls[_name] += result is not None
            return result

        monkeypatch.setattr(cuda_kernels, name, counted)
    return calls


def _both(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    fast = fn(*args, **kwargs)
    with kernels.fast_paths(False):
        plain = fn(*args, **kwargs)
    return fast, plain


# --------------------------------------------------------------------------------------
# The data's range


def _reference_ends(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    rows = x.reshape(1, -1) if dim is None else x.movedim(dim, 0).reshape(x.shape[dim], -1)
    finite = torch.isfinite(rows)
    lo = torch.where(finite, rows, INF).amin(1)
    hi = torch.where(finite, rows, -INF).amax(1)
    return torch.stack([0.0 - lo, hi + 0.0], 1)


@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((5000,), None),
        ((3, 20000), None),
        ((48, 4100), 0),  # long segments: a program per piece of a channel
        ((48, 4100), 1),  # the last dimension: bands of rows, a column per channel
        ((70, 33), 1),
        ((300, 600), 1),  # several bands of rows and blocks of columns
        ((4, 6, 5, 3), 1),  # short segments inside: several columns per channel
        ((2, 3, 2100), 1),
    ],
)
def test_data_ends_are_each_channels_finite_range(
    device: str, shape: tuple[int, ...], dim: int | None
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    flat = x.view(-1)
    flat[::97], flat[5::131], flat[7::151] = NAN, INF, -0.0
    if dim is not None:
        x.select(dim, 1).fill_(NAN)  # a channel without finite values
        x.select(dim, 2).zero_()
    ends = cuda_kernels.data_ends(x.to(device), dim)
    assert ends is not None
    assert _identical(ends.cpu(), _reference_ends(x, dim))


def test_range_from_ends_ignores_non_finite_values(device: str) -> None:
    for x in (
        _data(1 << 14, "cpu"),
        torch.tensor([NAN, INF, -INF]),
        torch.full((5000,), -2.0),
        torch.zeros(3),
    ):
        ends = cuda_kernels.data_ends(x.to(device))
        assert ends is not None
        lo, hi = cuda_kernels.range_from_ends(ends, symmetric=False)
        finite = x[torch.isfinite(x)]
        want = (finite.min().item(), finite.max().item()) if finite.numel() else (0.0, 0.0)
        assert (lo.item(), hi.item()) == want
    for maintain_zero in (True, False):
        fast = quantise._finite_range(_data(1 << 14, device), maintain_zero)
        with kernels.fast_paths(False):
            plain = quantise._finite_range(_data(1 << 14, device), maintain_zero)
        assert all(_identical(a, b) for a, b in zip(fast, plain, strict=True))


# --------------------------------------------------------------------------------------
# Rounding: bit for bit the chain's


@pytest.mark.parametrize("num_levels", [2, 3, 256])
@pytest.mark.parametrize(
    ("input_range", "output_range"),
    [
        (None, None),
        (None, [-1.0, 1.0]),
        (None, [0.0, 3.0]),
        ([-0.5, 2.0], [0.0, 10.0]),
        ([-0.5, 2.0], None),
    ],
)
def test_deterministic_rounding_is_the_chain(
    device: str, monkeypatch: pytest.MonkeyPatch, num_levels: int, input_range, output_range
) -> None:  # type: ignore[no-untyped-def]
    calls = _counting(monkeypatch, "_launch_round", "round_in_data_range")
    for x in (
        _data(1 << 13, device),
        torch.zeros(4096, device=device),
        torch.full((3000,), -2.5, device=device),
        torch.full((3000,), NAN, device=device),
    ):
        for maintain_zero in (True, False):
            fast, plain = _both(
                quantise.deterministic_rounding,
                x,
                input_range,
                output_range,
                num_levels,
                maintain_zero,
            )
            assert _identical(fast, plain)
    kernel = "round_in_data_range" if input_range is None else "_launch_round"
    assert calls[kernel] == 8


@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((12, 2050), 0),  # a channel index per element
        ((12, 2050), 1),
        ((4, 6, 5, 3), 1),
        ((6, 1024), 0),  # a channel per quarter of a program's block
        ((6, 1024), 1),  # columns: the same channels for four rows (two rows left over)
    ],
)
@pytest.mark.parametrize("output_range", [None, [-1.0, 1.0], [0.0, 15.0]])
def test_deterministic_channel_rounding_is_the_chain(
    device: str, monkeypatch: pytest.MonkeyPatch, shape, dim: int, output_range
) -> None:  # type: ignore[no-untyped-def]
    calls = _counting(monkeypatch, "round_in_data_range")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    w.select(dim, 3).zero_()  # a zero-width channel
    w.view(-1)[7] = NAN
    w = w.to(device)
    for num_levels in (16, 17):
        for maintain_zero in (True, False):
            fast, plain = _both(
                quantise.deterministic_channel_rounding,
                w,
                output_range,
                num_levels,
                maintain_zero,
                dim=dim,
            )
            assert _identical(fast, plain)
    assert calls["round_in_data_range"] == 4


def test_channel_plan_of_given_bounds_is_the_chain(device: str) -> None:
    # Per-channel bounds handed to the general fused kernel, as tensors.
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    w.select(1, 3).zero_()
    w[5, 7] = NAN
    w = w.to(device)
    for maintain_zero in (True, False):
        with kernels.fast_paths(False):
            lo, hi = quantise._finite_range(w, maintain_zero, (0,))
        plan = quantise._Plan(lo, hi, -1.0, 1.0, 16, False, maintain_zero)
        fast = plan.round(w, stochastic=False)
        with kernels.fast_paths(False):
            plan._level_map = None
            plain = plan.round(w, stochastic=False)
        assert _identical(fast, plain)


# --------------------------------------------------------------------------------------
# Stochastic rounding: unbiased, and reproducible from the generator


@pytest.mark.parametrize("input_range", [None, [0.0, 1.0]])
def test_stochastic_rounding_is_unbiased_and_reproducible(
    device: str, input_range: list[float] | None
) -> None:
    n = 1 << 15
    x = torch.full((n,), 0.3137, device=device)
    x[0], x[1] = 1.0, 0.0  # the data's range is [0, 1] either way
    draws = []
    for _ in range(2):
        g = torch.Generator(device=device).manual_seed(3)
        draws.append(
            quantise.stochastic_rounding(
                x, input_range, [0.0, 10.0], 11, maintain_zero=False, generator=g
            )
        )
    assert torch.equal(draws[0], draws[1])
    up = (draws[0][2:] > 3.5).double().mean().item()
    assert abs(up - 0.137) < 4 * math.sqrt(0.137 * 0.863 / n)
    assert set(draws[0].unique().tolist()) <= {0.0, 3.0, 4.0, 10.0}


def test_a_value_on_a_level_stays_there(device: str) -> None:
    levels = torch.arange(-127.0, 128.0).repeat(200).to(device)  # each on a level
    g = torch.Generator(device=device).manual_seed(1)
    out = quantise.stochastic_rounding(levels, [-127.0, 127.0], num_levels=255, generator=g)
    assert torch.equal(out, levels)


_KEY = 0x9E3779B9


@pytest.mark.parametrize(
    ("shape", "transform"),
    [
        ((300_001,), lambda x: quantise.stochastic_rounding(x, num_levels=16)),
        ((300_001,), lambda x: quantise.stochastic_rounding(x, [-2.0, 2.0], [-1.0, 1.0], 255)),
        ((600, 512), lambda x: quantise.stochastic_channel_rounding(x, [-1.0, 1.0], 16, dim=-1)),
        ((5, 8, 1024), lambda x: quantise.stochastic_channel_rounding(x, [-1.0, 1.0], 16)),
        ((64, 30, 70), lambda x: quantise.stochastic_channel_rounding(x, [-1.0, 1.0], 16)),
    ],
    ids=["data range", "given range", "channels last", "channel blocks", "channel per element"],
)
def test_stochastic_rounding_draws_the_bits_of_the_cpu_paths(
    device: str,
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """With the same key, the kernels round up and down exactly where the CPU paths do."""
    if device != "cpu":
        pytest.skip("the CPU paths divide where CUDA multiplies by a reciprocal")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 3
    x.view(-1)[:4] = torch.tensor([NAN, INF, -INF, -0.0])
    monkeypatch.setattr(cuda_kernels, "_key", lambda value, generator: torch.tensor([_KEY]))
    monkeypatch.setattr(kernels, "random_key", lambda generator=None: _KEY)
    calls = _counting(monkeypatch, "round_in_data_range", "fused_round")
    kernel = transform(x)
    assert sum(calls.values()) == 1, "no kernel ran"
    monkeypatch.setattr(cuda_kernels, "_covered", lambda value: False)
    assert _identical(kernel, transform(x))


def test_stochastic_channel_rounding_keeps_each_channel_in_range(device: str) -> None:
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(4))
    w[:, 5] *= 100.0
    w = w.to(device)
    g = torch.Generator(device=device).manual_seed(5)
    out = quantise.stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=256, generator=g)
    assert out.abs().max().item() <= 1.0 and out.unique().numel() <= 256
    # Column 5's range is 100 times the others': its values keep their place in it.
    peak = w.abs().amax(0)
    expected = (w / peak).cpu()
    assert (out.cpu() - expected).abs().max().item() <= 2 / 255 + 1e-6


def test_the_gradient_scale_of_a_data_range_plan_is_the_chain(device: str) -> None:
    x = (torch.randn(5000, generator=torch.Generator().manual_seed(6)) * 4).to(device)
    grads = []
    for fast in (True, False):
        leaf = x.clone().requires_grad_()
        with kernels.fast_paths(fast):
            out = quantise.stochastic_rounding(leaf, output_range=[-1.0, 1.0], num_levels=16)
        out.sum().backward()
        assert leaf.grad is not None
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    assert grads[0][0].item() == pytest.approx(2.0 / (2 * x.abs().max().item()))


@given(
    d=st.integers(1, 2**31 - 1),
    n=st.one_of(st.integers(0, 2**31 - 1), st.just(2**31 - 1), st.just(0)),
)
def test_magic_divisor_divides_exactly(d: int, n: int) -> None:
    m, s = cuda_kernels._magic_divisor(d)
    assert m < 2**32 + 1
    assert (n * m) >> s == n // d
    # The worst cases: just below a multiple of d.
    edge = (n // d) * d - 1
    if edge >= 0:
        assert (edge * m) >> s == edge // d


@given(st.one_of(st.floats(width=32), st.floats(), st.sampled_from([0.0, -0.0, 3.5e38, -1e-46])))
def test_float32_reciprocal_is_torchs(divisor: float) -> None:
    # torch casts a host scalar to float32 and takes 1.0f / it, in float32.
    want = torch.tensor(1.0) / torch.tensor(divisor, dtype=torch.float32)
    got = torch.tensor(cuda_kernels._float32_reciprocal(divisor), dtype=torch.float32)
    assert _identical(got, want)
