"""Fast paths: same results as the plain chains, and random numbers that keep their promises."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest
import torch

from transform_core import cuda_kernels, kernels, quantise
from transform_core.errors import ConfigError
from transform_core.kernels import LevelMap

NAN, INF = math.nan, math.inf
BIG = kernels.BLOCK * 2 + 1234  # several blocks and a ragged end


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, dtypes, NaN positions and signs of zeros (NaN's own sign is free)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = a.isnan()
    return (
        torch.equal(nan, b.isnan())
        and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
        and torch.equal(a.signbit() & ~nan, b.signbit() & ~nan)
    )


def _data(n: int = BIG, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    x[:5] = torch.tensor([NAN, INF, -INF, 0.0, -0.0])
    return x


@pytest.fixture(params=["compiled", "blocks"])
def fast_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the compiled kernels loaded, then with the chains cut into blocks."""
    if request.param == "compiled":
        if kernels.wait_for_compiled_kernels() is None:
            pytest.skip("the compiled kernels need Numba")
        yield request.param
    else:
        with kernels.compiled(False):
            yield request.param


def _both(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    fast = fn(*args, **kwargs)
    with kernels.fast_paths(False):
        plain = fn(*args, **kwargs)
    return fast, plain


# --------------------------------------------------------------------------------------
# Deterministic transforms: fast == plain, bit for bit


@pytest.mark.parametrize("num_levels", [2, 3, 16, 255, 256])
@pytest.mark.parametrize("maintain_zero", [True, False])
@pytest.mark.parametrize(
    ("input_range", "output_range"),
    [(None, None), (None, [-1.0, 1.0]), ([-0.5, 2.0], [0.0, 10.0]), (None, [0.0, 3.0])],
)
def test_deterministic_rounding_fast_paths_match_the_chain(
    fast_path: str,
    num_levels: int,
    maintain_zero: bool,
    input_range: list[float],
    output_range: list[float],
) -> None:
    x = _data()
    fast, plain = _both(
        quantise.deterministic_rounding, x, input_range, output_range, num_levels, maintain_zero
    )
    assert _identical(fast, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_deterministic_rounding_dtypes_and_degenerate_data(
    fast_path: str, dtype: torch.dtype
) -> None:
    for x in (
        _data().to(dtype),
        torch.zeros(BIG, dtype=dtype),
        torch.full((BIG,), 2.5, dtype=dtype),
    ):
        for output_range in (None, [-1.0, 1.0]):
            fast, plain = _both(quantise.deterministic_rounding, x, None, output_range, 15)
            assert _identical(fast, plain)


@pytest.mark.parametrize("maintain_zero", [True, False])
@pytest.mark.parametrize("map_to_max", [True, False])
def test_int_quant_fast_paths_match_the_chain(
    fast_path: str, maintain_zero: bool, map_to_max: bool
) -> None:
    fast, plain = _both(quantise.int_quant, _data(), maintain_zero, map_to_max, 4)
    assert _identical(fast, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_t_decay_fast_paths_match_the_chain(fast_path: str, dtype: torch.dtype) -> None:
    decay = torch.rand(BIG, generator=torch.Generator().manual_seed(2)) * 1.2 - 0.1
    decay[:6] = torch.tensor([NAN, 0.0, -0.0, 1.0, INF, -INF])
    fast, plain = _both(quantise.t_decay, decay.to(dtype))
    assert _identical(fast, plain)


def test_t_decay_thresholds_agree_with_the_logarithms() -> None:
    # Away from the thresholds (where float rounding decides), n = round(log2(-1 / ln d)).
    d = torch.rand(100_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    n = torch.log2(-1.0 / torch.log(d))
    clear = (n - n.round()).abs() < 0.49
    want = 1.0 - torch.exp2(-n.round().clamp(0, 53))
    assert torch.equal(quantise.t_decay(d)[clear], want[clear])
    assert clear.float().mean() > 0.95


def test_t_decay_ends_of_the_range(fast_path: str) -> None:
    max_shift = 24  # float32: the largest n with 1 - 2**-n below 1, plus one
    ends = torch.tensor([1.0, 5.0, INF, 0.0, -3.0, -INF])
    for x in (ends, ends.repeat(kernels.SMALL)):
        out = quantise.t_decay(x)
        assert out[:6].tolist() == [1 - 2.0**-max_shift] * 3 + [0.0] * 3


@pytest.mark.parametrize(("shape", "dim"), [((700, 300), 1), ((300, 700), 0), ((60, 30, 9, 9), 1)])
def test_channel_rounding_on_levels_matches_the_chain(
    fast_path: str, shape: tuple[int, ...], dim: int
) -> None:
    # Integer levels times a power of two per channel, each channel reaching level 7: the
    # arithmetic is exact, every value sits on a level and rounds to it whatever the noise.
    gen = torch.Generator().manual_seed(3)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    scale = (2.0 ** torch.randint(-3, 4, (shape[dim],), generator=gen)).view(view)
    levels = torch.randint(-7, 8, shape, generator=gen).float()
    first = [0] * len(shape)
    first[dim] = slice(None)  # type: ignore[call-overload]
    levels[tuple(first)] = 7.0
    w = levels * scale
    w.select(dim, 0).zero_()  # a zero-width channel
    fast, plain = _both(quantise.stochastic_channel_rounding, w, [-7.0, 7.0], 15, dim=dim)
    assert _identical(fast, plain)
    want = levels.clone()
    want.select(dim, 0).zero_()  # the zero-width channel goes to the level nearest zero
    assert _identical(fast, want)


# --------------------------------------------------------------------------------------
# Random numbers


def test_stochastic_rounding_is_unbiased_and_reproducible(fast_path: str) -> None:
    x = torch.full((BIG,), 0.3137)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = quantise.stochastic_rounding(x, input_range=[0.0, 1.0], num_levels=11, generator=g1)
    b = quantise.stochastic_rounding(x, input_range=[0.0, 1.0], num_levels=11, generator=g2)
    assert torch.equal(a, b)
    assert a.unique().tolist() == pytest.approx([0.3, 0.4])
    # Rounds up with probability 0.137: the mean is within 4 standard errors of the input.
    sem = math.sqrt(0.137 * 0.863 / BIG) * 0.1
    assert abs(a.double().mean().item() - 0.3137) < 4 * sem
    c = quantise.stochastic_rounding(x, input_range=[0.0, 1.0], num_levels=11, generator=g1)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("fraction", [0.0, 1e-3, 0.25, 0.5, 0.9])
def test_stochastic_floor_rounds_up_with_the_fraction(fraction: float) -> None:
    n = 400_000
    levels = torch.full((n,), 41.0 + fraction, dtype=torch.float64)
    out = kernels.stochastic_floor_(levels, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {41.0, 42.0}
    up = (out == 42.0).double().mean().item()
    assert abs(up - fraction) <= 4 * math.sqrt(max(fraction * (1 - fraction), 1e-6) / n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_small_tensors_on_a_level_stay_there_and_round_up_with_the_fraction(
    dtype: torch.dtype,
) -> None:
    # bfloat16 holds 20 + k/8: 20 + noise in bfloat16 would round to 21 whenever the noise
    # is above 1 - 1/16, for 6 % of the elements sitting on level 20 (float16: 0.8 %).
    n = kernels.SMALL - 1
    on_level = torch.full((n,), 20.0, dtype=dtype)
    out = kernels.stochastic_floor_(on_level, torch.Generator().manual_seed(1))
    assert torch.equal(out, torch.full((n,), 20.0, dtype=dtype))
    quarter = torch.full((n,), 20.25, dtype=dtype)
    out = kernels.stochastic_floor_(quarter, torch.Generator().manual_seed(2))
    up = (out == 21.0).double().mean().item()
    assert set(out.unique().tolist()) <= {20.0, 21.0}
    assert abs(up - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_stochastic_rounding_of_large_tensors_is_unbiased_in_every_dtype(
    fast_path: str, dtype: torch.dtype
) -> None:
    n = 200_000
    x = torch.full((n,), 0.3137, dtype=dtype)
    # The level as the transform computes it, in the dtype: about 3.137.
    fraction = (torch.sub(x, 0.0).div_(0.1).double() - 3).mean().item()
    out = quantise.stochastic_rounding(x, input_range=[0.0, 1.0], num_levels=11)
    up = (out.double() > 0.35).double().mean().item()
    assert abs(up - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / n)


def test_hash_bits_are_uniform_and_positional() -> None:
    bits = kernels.hash_bits(0, 1 << 20, key=12345)
    assert bits.min() >= 0 and bits.max() < 2**32
    assert bits.unique().numel() == bits.numel()  # a bijection of the index
    u = bits.double() / 2**32
    assert abs(u.mean().item() - 0.5) < 0.002
    # Neighbouring elements are uncorrelated; each bit is set half of the time.
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01
    for bit in (0, 7, 16, 31):
        assert abs(((bits >> bit) & 1).double().mean().item() - 0.5) < 0.005
    assert torch.equal(kernels.hash_bits(1000, 24, key=12345), bits[1000:1024])
    assert not torch.equal(kernels.hash_bits(0, 1000, key=12346), bits[:1000])
    # Indices past 2**32 take their high word into account.
    assert not torch.equal(kernels.hash_bits(2**32, 1000, key=12345), bits[:1000])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.97, 1.0])
def test_drop_mask_probability(fast_path: str, p: float) -> None:
    mask = kernels.drop_mask((200_000,), p, generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - p) < 0.005


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_zero_dropped_is_masked_fill_of_the_same_mask(dtype: torch.dtype, p: float) -> None:
    x = _data(10_001).to(dtype)
    fast = kernels.zero_dropped(x, p, generator=torch.Generator().manual_seed(5))
    mask = kernels.drop_mask(x.shape, p, generator=torch.Generator().manual_seed(5))
    assert _identical(fast, x.masked_fill(mask, 0.0))


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout_fast_paths_match_the_masked_fill(fast_path: str, p: float) -> None:
    x = _data()
    out = quantise.dropout(x, p, generator=torch.Generator().manual_seed(5))
    mask = kernels.drop_mask(x.shape, p, generator=torch.Generator().manual_seed(5))
    assert _identical(out, x.masked_fill(mask, 0.0))
    assert abs((out == 0).double().mean().item() - p) < 0.01


def test_dropout_gradient_is_the_mask() -> None:
    w = torch.ones(BIG, requires_grad=True)
    out = quantise.dropout(w, 0.4, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, (out != 0).float())


# --------------------------------------------------------------------------------------
# Building blocks


def test_map_blocks_cuts_rows_only_where_parameters_broadcast() -> None:
    x = torch.randn(kernels.BLOCK // 100, 300)
    per_col = torch.randn(1, 300)
    per_row = torch.randn(x.shape[0], 1)
    calls: list[tuple[int, ...]] = []

    def fn(param: torch.Tensor):  # type: ignore[no-untyped-def]
        def chain(block: torch.Tensor, out: torch.Tensor | None, start: int) -> torch.Tensor:
            calls.append(tuple(block.shape))
            return torch.sub(block, param, out=out)

        return chain

    assert torch.equal(kernels.map_blocks(fn(per_col), x, [per_col]), x - per_col)
    assert len(calls) > 1
    calls.clear()
    assert torch.equal(kernels.map_blocks(fn(per_row), x, [per_row]), x - per_row)
    assert calls == [tuple(x.shape)]


def test_map_blocks_passes_each_block_its_start() -> None:
    x = torch.zeros(BIG)
    out = kernels.map_blocks(
        lambda block, out, start: torch.arange(start, start + block.numel(), dtype=x.dtype), x
    )
    assert torch.equal(out, torch.arange(BIG, dtype=x.dtype))


def test_map_blocks_refuses_a_shape_change() -> None:
    with pytest.raises(ValueError, match="element-wise"):
        kernels.map_blocks(lambda block, out, start: block[:1], torch.zeros(BIG))


def test_map_blocks_keeps_a_promoting_chain_whole() -> None:
    out = kernels.map_blocks(lambda block, out, start: block.double(), torch.zeros(BIG))
    assert out.dtype == torch.float64


def test_output_like_reuses_storage_only_when_nothing_uses_it() -> None:
    w = torch.zeros(300, 200)
    first = kernels.output_like(w)
    held = kernels.output_like(w)  # the first is still in use
    assert held.data_ptr() != first.data_ptr()
    assert held.shape == w.shape and held.is_contiguous() and held.dtype == w.dtype
    ptrs = {first.data_ptr(), held.data_ptr()}
    del first, held
    again = kernels.output_like(w)
    assert again.data_ptr() in ptrs
    busy = again.data_ptr()
    # Saved for a backward pass, it is still in use even without a Python reference.
    leaf = torch.ones(300, 200, requires_grad=True)
    loss = (leaf * again).sum()
    del again
    other = kernels.output_like(w)
    assert other.data_ptr() in ptrs - {busy}
    third = kernels.output_like(w)  # none free: a new storage, kept beside the others
    assert third.data_ptr() not in ptrs
    ptrs.add(third.data_ptr())
    del other, third
    loss.backward()  # type: ignore[no-untyped-call]
    del loss
    all_free = [kernels.output_like(w) for _ in range(3)]
    assert {t.data_ptr() for t in all_free} == ptrs


def test_output_like_keeps_at_most_the_cache_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "OUTPUT_CACHE_BYTES", 4 << 20)
    for rows in range(1, 40):
        kernels.output_like(torch.zeros(rows, 1000, dtype=torch.float64))
    kept = [s for storages in kernels._Outputs.storages.values() for s in storages]
    assert sum(s.nbytes() for s in kept) == kernels._Outputs.kept <= 4 << 20
    resized = kernels.output_like(torch.zeros(7, 7))
    resized.resize_(100)  # a caller may do anything with its result
    del resized
    assert kernels.output_like(torch.zeros(7, 7)).shape == (7, 7)


@pytest.mark.parametrize("dims", [None, (0,), (1,), (0, 2)])
def test_abs_max_is_abs_amax(dims: tuple[int, ...] | None) -> None:
    x = torch.randn(50, 60, 70)  # above kernels.SMALL, where the fast path runs
    for keepdim in (True, False):
        want = x.abs().amax(dim=dims if dims is not None else (), keepdim=keepdim)
        assert torch.equal(kernels.abs_max(x, dims, keepdim), want)
    x[1, 2, 3] = NAN
    assert kernels.abs_max(x).isnan()


def _level_map_reference(levels, quantum, lo, hi, top, zero):  # type: ignore[no-untyped-def]
    at_top = levels == top
    at_zero = None if zero is None else levels == zero
    out = levels.mul_(quantum).add_(lo)
    out.masked_fill_(at_top, hi)
    if at_zero is not None:
        out.masked_fill_(at_zero, 0.0)
    return out


def test_level_map_matches_masks() -> None:
    rng = random.Random(0)
    fixes = set()
    for _ in range(200):
        dtype = rng.choice([torch.float32, torch.float64])
        top = float(rng.choice([1, 2, 14, 15, 254, 255, 65535]))
        lo = rng.choice([-1.0, -rng.random() * 10, -(2.0 ** rng.randint(-10, 10)), 0.0])
        hi = -lo if rng.random() < 0.4 else lo + rng.random() * 20
        quantum = (hi - lo) / top
        zero = float(round(-lo / quantum)) if quantum > 0 and rng.random() < 0.7 else None
        if zero is not None and not 0 <= zero <= top:
            zero = None
        as_tensors = rng.random() < 0.5
        args = (
            (
                torch.tensor(quantum, dtype=dtype),
                torch.tensor(lo, dtype=dtype),
                torch.tensor(hi, dtype=dtype),
            )
            if as_tensors
            else (quantum, lo, hi)
        )
        level_map = LevelMap(*args, top, zero, dtype, torch.device("cpu"))
        levels = torch.randint(0, int(top) + 1, (kernels.SMALL,)).to(dtype)
        levels[:3] = torch.tensor([0.0, top, NAN], dtype=dtype)
        if zero is not None:
            levels[3] = zero
        want = _level_map_reference(levels.clone(), *args, top, zero)
        assert _identical(level_map.apply_(levels.clone()), want)
        fixes.add((level_map.top_fix, level_map.zero_fix))
    # Every vectorised fix was exercised.
    assert {f for f, _ in fixes} >= {"none", "clamp", "add"}
    assert {z for _, z in fixes} >= {"none", "shrink"}


def test_fast_paths_switch_is_scoped() -> None:
    assert kernels.fast_paths_enabled()
    with kernels.fast_paths(False):
        assert not kernels.fast_paths_enabled()
        with kernels.fast_paths(True):
            assert kernels.fast_paths_enabled()
        assert not kernels.fast_paths_enabled()
    assert kernels.fast_paths_enabled()


def test_fused_round_is_for_cuda_only() -> None:
    x = torch.randn(100)
    got = cuda_kernels.fused_round(
        x,
        in_lo=-1.0,
        in_quantum=0.1,
        out_quantum=0.1,
        out_lo=-1.0,
        out_hi=1.0,
        top=20.0,
        stochastic=False,
    )
    assert got is None


def test_small_tensors_take_the_plain_chains() -> None:
    # Below kernels.SMALL the fast paths cost more than they save: same stream as torch.rand.
    x = torch.randn(1000)
    fast = quantise.stochastic_rounding(x, generator=torch.Generator().manual_seed(0))
    with kernels.fast_paths(False):
        plain = quantise.stochastic_rounding(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast, plain)


def test_switches_in_the_environment_are_read_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, off in (("0", True), ("OFF", True), (" no ", True), ("", False), ("yes", False)):
        monkeypatch.setenv("ROCKQ_SOME_SWITCH", value)
        assert kernels.switched_off_by_environment("ROCKQ_SOME_SWITCH") is off
    monkeypatch.setenv("ROCKQ_SOME_SWITCH", "of")
    with pytest.raises(ConfigError, match="ROCKQ_SOME_SWITCH='of' is not understood"):
        kernels.switched_off_by_environment("ROCKQ_SOME_SWITCH")
