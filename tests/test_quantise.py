"""Tests for the tensor transforms in ``transform_core.quantise``.

Expected values are computed independently, in float64, from the semantics stated in the
module docstring: ``num_levels`` equally spaced levels over the output range, input range
from the finite data (symmetric with ``maintain_zero``), values rescaled input -> output.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from transform_core.quantise import (
    class_calc_q_decay,
    deterministic_channel_rounding,
    deterministic_rounding,
    dropout,
    identity,
    int_quant,
    make_backward_passthrough,
    stochastic_channel_rounding,
    stochastic_rounding,
    t_decay,
)

NAN = math.nan
INF = math.inf

ROUNDERS = [deterministic_rounding, stochastic_rounding]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _round(fn: Callable[..., Tensor], value: Tensor, **kwargs: Any) -> Tensor:
    """Call a rounding function, giving the stochastic ones a fixed generator."""
    if fn is not deterministic_rounding:
        kwargs.setdefault("generator", _gen())
    return fn(value, **kwargs)


def _data_range(value: Tensor, maintain_zero: bool) -> tuple[float, float]:
    """The default input range, computed independently in float64 over finite values."""
    finite = value.double()[torch.isfinite(value)]
    if finite.numel() == 0:
        return 0.0, 0.0
    if maintain_zero:
        peak = finite.abs().max().item()
        return -peak, peak
    return finite.min().item(), finite.max().item()


def _rescale(
    value: Tensor, in_range: tuple[float, float], out_range: tuple[float, float]
) -> Tensor:
    """Map ``value`` affinely from ``in_range`` to ``out_range`` (saturating), in float64."""
    (a, b), (c, d) = in_range, out_range
    unit = ((value.double() - a) / (b - a)).clamp(0.0, 1.0)
    return c + unit * (d - c)


def _levels_of(out: Tensor, out_range: tuple[float, float], num_levels: int) -> Tensor:
    """Level indices of ``out`` on the grid of ``out_range`` (non-integers if off the grid)."""
    lo, hi = out_range
    return (out.double() - lo) / ((hi - lo) / (num_levels - 1))


def _assert_on_grid(out: Tensor, out_range: tuple[float, float], num_levels: int) -> None:
    lo, hi = out_range
    finite = out[torch.isfinite(out)].double()
    assert bool((finite >= lo).all() and (finite <= hi).all()), (finite, out_range)
    levels = _levels_of(finite, out_range, num_levels)
    assert torch.allclose(levels, levels.round(), atol=1e-3), levels


# --------------------------------------------------------------------------------------
# Levels and ranges, as the reference


def test_reference_example_three_levels() -> None:
    out = deterministic_rounding(torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), num_levels=3)
    # -0.5 sits exactly between two levels; ties go to the even level index (torch.round).
    assert out.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("fn", ROUNDERS)
def test_default_range_is_symmetric_with_maintain_zero(fn: Callable[..., Tensor]) -> None:
    x = torch.tensor([0.25, 0.6, 1.0])
    # Symmetric range [-1, 1] with 3 levels: the grid is {-1, 0, 1}.
    out = _round(fn, x, num_levels=3)
    assert set(out.tolist()) <= {-1.0, 0.0, 1.0}
    assert out[2].item() == 1.0
    # The data's own range [0.25, 1] with 3 levels: the grid is {0.25, 0.625, 1}.
    out = _round(fn, x, num_levels=3, maintain_zero=False)
    assert set(out.tolist()) <= {0.25, 0.625, 1.0}
    assert out[0].item() == 0.25 and out[2].item() == 1.0


@pytest.mark.parametrize("fn", ROUNDERS)
def test_explicit_input_range_used_as_given(fn: Callable[..., Tensor]) -> None:
    # maintain_zero must not symmetrise an explicit range: [0, 2] with 3 levels is {0, 1, 2};
    # a symmetrised [-2, 2] would be {-2, 0, 2}.
    x = torch.tensor([0.0, 1.0, 2.0])
    out = _round(fn, x, input_range=[0.0, 2.0], num_levels=3)
    assert out.tolist() == [0.0, 1.0, 2.0]
    out = deterministic_rounding(torch.tensor([1.2]), input_range=[0.0, 2.0], num_levels=3)
    assert out.tolist() == [1.0]


def test_explicit_ranges_rescale_input_to_output() -> None:
    x = torch.linspace(0.003, 0.993, 100)  # never within 0.02 of a tie
    out = deterministic_rounding(x, input_range=[0.0, 1.0], output_range=[0.0, 10.0], num_levels=11)
    expected = torch.round(x.double() * 10)
    assert torch.equal(out.double(), expected)


def test_output_range_defaults_to_input_range() -> None:
    x = torch.tensor([0.3, 1.7, 3.9])
    explicit = deterministic_rounding(
        x, input_range=[0.0, 4.0], output_range=[0.0, 4.0], num_levels=5
    )
    default = deterministic_rounding(x, input_range=[0.0, 4.0], num_levels=5)
    assert torch.equal(explicit, default)
    assert default.tolist() == [0.0, 2.0, 4.0]


def test_ranges_accept_tensors() -> None:
    x = torch.tensor([0.4, 0.6, 1.6])
    as_list = deterministic_rounding(
        x, input_range=[0.0, 2.0], output_range=[-1.0, 1.0], num_levels=3
    )
    as_tensor = deterministic_rounding(
        x,
        input_range=torch.tensor([0.0, 2.0]),
        output_range=torch.tensor([-1.0, 1.0]),
        num_levels=3,
    )
    assert torch.equal(as_list, as_tensor)
    assert as_list.tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("fn", ROUNDERS)
def test_values_outside_explicit_input_range_saturate(fn: Callable[..., Tensor]) -> None:
    x = torch.tensor([-5.0, 0.5, 5.0])
    out = _round(fn, x, input_range=[0.0, 1.0], output_range=[0.0, 10.0], num_levels=11)
    assert out[0].item() == 0.0 and out[2].item() == 10.0
    assert out[1].item() in (5.0,)


def test_integer_tensors_are_promoted() -> None:
    out = deterministic_rounding(torch.tensor([0, 1, 2, 4]), num_levels=3)
    assert out.dtype == torch.get_default_dtype()
    assert out.tolist() == [0.0, 0.0, 4.0, 4.0]


def test_result_is_a_new_tensor_and_input_unchanged() -> None:
    x = torch.tensor([0.1, -0.7, 0.35])
    before = x.clone()
    for fn in ROUNDERS:
        out = _round(fn, x, num_levels=5)
        assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)


# --------------------------------------------------------------------------------------
# Zero-width ranges


@pytest.mark.parametrize("fn", ROUNDERS)
@pytest.mark.parametrize("maintain_zero", [True, False])
def test_all_zero_tensor_stays_zero(fn: Callable[..., Tensor], maintain_zero: bool) -> None:
    out = _round(fn, torch.zeros(5), num_levels=16, maintain_zero=maintain_zero)
    assert torch.equal(out, torch.zeros(5))


@pytest.mark.parametrize("fn", ROUNDERS)
@pytest.mark.parametrize("maintain_zero", [True, False])
@pytest.mark.parametrize("constant", [2.0, -3.5, 0.1, 7.3e-4, 123.456])
@pytest.mark.parametrize("num_levels", [2, 16, 255, 256])
def test_constant_tensor_stays_itself(
    fn: Callable[..., Tensor], maintain_zero: bool, constant: float, num_levels: int
) -> None:
    x = torch.full((4,), constant)
    out = _round(fn, x, num_levels=num_levels, maintain_zero=maintain_zero)
    assert torch.equal(out, x)


@pytest.mark.parametrize("fn", ROUNDERS)
def test_zero_width_with_explicit_output_range(fn: Callable[..., Tensor]) -> None:
    zeros = torch.zeros(3)
    # maintain_zero: the level nearest zero.
    out = _round(fn, zeros, output_range=[-1.0, 1.0], num_levels=3)
    assert out.tolist() == [0.0, 0.0, 0.0]
    out = _round(fn, zeros, output_range=[0.5, 2.5], num_levels=3)
    assert out.tolist() == [0.5, 0.5, 0.5]
    # Without maintain_zero: the start of the output range.
    out = _round(
        fn, torch.full((3,), 4.0), output_range=[-1.0, 1.0], num_levels=3, maintain_zero=False
    )
    assert out.tolist() == [-1.0, -1.0, -1.0]


@pytest.mark.parametrize("fn", ROUNDERS)
def test_zero_width_gradient_passes_straight_through(fn: Callable[..., Tensor]) -> None:
    # A zero-initialised parameter must still be trainable through the rounding.
    x = torch.zeros(4, requires_grad=True)
    _round(fn, x, num_levels=16).sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, torch.ones(4))


# --------------------------------------------------------------------------------------
# Argument checks


ALL_ROUNDERS: list[Callable[..., Tensor]] = [
    deterministic_rounding,
    stochastic_rounding,
    lambda v, **kw: stochastic_channel_rounding(v.reshape(-1, 1), [-1.0, 1.0], **kw),
]


@pytest.mark.parametrize("fn", ALL_ROUNDERS)
@pytest.mark.parametrize("bad", [1, 0, -4, 2.5, "8", True, None])
def test_bad_num_levels_raise(fn: Callable[..., Tensor], bad: Any) -> None:
    with pytest.raises(ValueError, match=r"num_levels must be an integer >= 2") as info:
        fn(torch.ones(3), num_levels=bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


def test_integer_valued_float_num_levels_accepted() -> None:
    out = deterministic_rounding(torch.tensor([-1.0, 0.2, 1.0]), num_levels=3.0)  # type: ignore[arg-type]
    assert out.tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("fn", ROUNDERS)
@pytest.mark.parametrize("which", ["input_range", "output_range"])
def test_reversed_range_raises_with_fix(fn: Callable[..., Tensor], which: str) -> None:
    with pytest.raises(ValueError, match=rf"{which} is reversed.*\[min, max\]"):
        fn(torch.ones(3), **{which: [1.0, -1.0]})


@pytest.mark.parametrize(
    "bad", [[0.0], [0.0, 1.0, 2.0], "ab", [0.0, math.inf], [math.nan, 1.0], ["a", 1.0]]
)
def test_malformed_range_raises(bad: Any) -> None:
    with pytest.raises(ValueError, match="input_range"):
        deterministic_rounding(torch.ones(3), input_range=bad)


@pytest.mark.parametrize("which", ["input_range", "output_range"])
def test_a_range_beyond_the_dtype_raises(which: str) -> None:
    half = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match=rf"^{which} \[-100000.0, 100000.0\] is beyond float16"):
        deterministic_rounding(half, **{which: [-1e5, 1e5]})
    assert deterministic_rounding(half.float(), **{which: [-1e5, 1e5]}).dtype == torch.float32
    # each end fits, but not the width between them
    with pytest.raises(ValueError, match="convert the tensor to float64"):
        stochastic_rounding(torch.ones(3), **{which: [-3e38, 3e38]})
    with pytest.raises(ValueError, match=r"^output_range \[-40000.0, 40000.0\] is beyond f"):
        stochastic_channel_rounding(half.reshape(3, 1), output_range=[-4e4, 4e4])


_HALF_CASES = [
    (deterministic_rounding, {}),
    (stochastic_rounding, {}),
    (deterministic_rounding, {"output_range": [-1.0, 1.0], "maintain_zero": False}),
    (deterministic_channel_rounding, {"output_range": [-1.0, 1.0], "dim": 0}),
    (stochastic_channel_rounding, {"output_range": [-1.0, 1.0], "dim": 1}),
]


@pytest.mark.parametrize(("rounder", "args"), _HALF_CASES)
def test_float16_values_wider_than_its_range_round_in_float32(rounder: Any, args: Any) -> None:
    # max|x| beyond 32752: the range [-peak, peak] is wider than float16's largest value.
    x = torch.tensor([[40000.0, -40000.0, 1.0], [30000.0, float("nan"), float("inf")]]).half()
    extra = (
        {"generator": _gen(1)}
        if rounder in (stochastic_rounding, stochastic_channel_rounding)
        else {}
    )
    got = rounder(x, num_levels=255, **args, **extra)
    wide = rounder(x.float(), num_levels=255, **args, **({"generator": _gen(1)} if extra else {}))
    assert got.dtype == torch.float16 and int(got.isnan().sum()) == 1  # the NaN stays
    torch.testing.assert_close(got, wide.half(), rtol=0, atol=0, equal_nan=True)
    # Gradients still pass straight through to the float16 tensor.
    leaf = x.clone().requires_grad_()
    rounder(leaf, num_levels=255, **args, **extra).sum().backward()
    assert leaf.grad is not None and leaf.grad.dtype == torch.float16


def test_float16_values_within_half_its_range_round_in_float16() -> None:
    x = torch.tensor([-30000.0, 1.0, 30000.0]).half()
    assert torch.equal(
        deterministic_rounding(x, num_levels=3), torch.tensor([-30000.0, 0, 30000.0]).half()
    )


def test_results_stay_values_of_the_inputs_dtype() -> None:
    x = torch.tensor([40000.0, -40000.0]).half()
    with pytest.raises(
        ValueError, match=r"^output_range \[-100000.0, 100000.0\] is beyond float16"
    ):
        deterministic_rounding(x, output_range=[-1e5, 1e5])
    with pytest.raises(ValueError, match=r"^num_levels must be at most 65505 for float16 values"):
        stochastic_rounding(torch.ones(3).half(), num_levels=2**20)
    assert stochastic_rounding(torch.ones(3), num_levels=2**20).dtype == torch.float32


@pytest.mark.parametrize("rounder", ROUNDERS)
def test_complex_values_are_refused(rounder: Any) -> None:
    with pytest.raises(ValueError, match=r"^complex values \(complex64\) cannot be rounded"):
        rounder(torch.ones(3, dtype=torch.complex64))


def test_reversed_tensor_range_raises() -> None:
    with pytest.raises(ValueError, match="min <= max"):
        stochastic_rounding(torch.ones(3), output_range=torch.tensor([1.0, 0.0]))


EMPTY_CASES: list[tuple[str, Callable[[Tensor], Tensor]]] = [
    ("deterministic_rounding", lambda v: deterministic_rounding(v)),
    ("deterministic_rounding_no_zero", lambda v: deterministic_rounding(v, maintain_zero=False)),
    ("stochastic_rounding", lambda v: stochastic_rounding(v)),
    ("stochastic_rounding_no_zero", lambda v: stochastic_rounding(v, maintain_zero=False)),
    ("int_quant", lambda v: int_quant(v)),
    ("int_quant_no_zero", lambda v: int_quant(v, maintain_zero=False)),
    ("dropout", lambda v: dropout(v)),
    ("t_decay", lambda v: t_decay(v)),
    ("identity", lambda v: identity(v)),
]


@pytest.mark.parametrize(("name", "fn"), EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_empty_tensor_gives_empty_tensor(
    name: str, fn: Callable[[Tensor], Tensor], shape: tuple[int, ...]
) -> None:
    out = fn(torch.empty(shape))
    assert out.shape == shape and out.is_floating_point()


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0), (2, 0, 4)])
def test_channel_rounding_empty_tensor(shape: tuple[int, ...]) -> None:
    out = stochastic_channel_rounding(torch.empty(shape), [-1.0, 1.0])
    assert out.shape == shape


def test_empty_tensor_still_checks_arguments() -> None:
    with pytest.raises(ValueError, match="num_levels"):
        deterministic_rounding(torch.empty(0), num_levels=1)


# --------------------------------------------------------------------------------------
# Non-finite values


@pytest.mark.parametrize("fn", ROUNDERS)
@pytest.mark.parametrize("maintain_zero", [True, False])
def test_nan_stays_nan_and_range_ignores_it(fn: Callable[..., Tensor], maintain_zero: bool) -> None:
    finite = torch.tensor([0.5, -1.0, 0.25, 0.8])
    x = torch.cat([torch.tensor([NAN]), finite])
    out = _round(fn, x, num_levels=5, maintain_zero=maintain_zero)
    assert torch.isnan(out[0])
    assert bool(torch.isfinite(out[1:]).all())
    _assert_on_grid(out[1:], _data_range(finite, maintain_zero), 5)
    if fn is deterministic_rounding:
        assert torch.equal(
            out[1:], deterministic_rounding(finite, num_levels=5, maintain_zero=maintain_zero)
        )


@pytest.mark.parametrize("fn", ROUNDERS)
@pytest.mark.parametrize("maintain_zero", [True, False])
def test_infinities_map_to_range_ends(fn: Callable[..., Tensor], maintain_zero: bool) -> None:
    x = torch.tensor([INF, -INF, 0.5, -0.25, NAN])
    lo, hi = _data_range(x, maintain_zero)
    out = _round(fn, x, num_levels=7, maintain_zero=maintain_zero)
    assert out[0].item() == hi and out[1].item() == lo
    assert bool(torch.isfinite(out[:4]).all()) and torch.isnan(out[4])
    out = _round(fn, x, output_range=[-2.0, 2.0], num_levels=7, maintain_zero=maintain_zero)
    assert out[:2].tolist() == [2.0, -2.0]


@pytest.mark.parametrize("fn", ROUNDERS)
@pytest.mark.parametrize("maintain_zero", [True, False])
def test_infinities_with_zero_width_finite_range(
    fn: Callable[..., Tensor], maintain_zero: bool
) -> None:
    # The finite values span nothing, so both ends of the range are the constant itself.
    constant = 0.0 if maintain_zero else 3.0
    x = torch.tensor([constant, INF, -INF, constant])
    out = _round(fn, x, num_levels=9, maintain_zero=maintain_zero)
    assert out.tolist() == [constant] * 4
    out = _round(fn, x, output_range=[-1.0, 1.0], num_levels=9, maintain_zero=maintain_zero)
    assert out[1:3].tolist() == [1.0, -1.0]
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("fn", ROUNDERS)
def test_no_finite_values(fn: Callable[..., Tensor]) -> None:
    out = _round(fn, torch.tensor([NAN, INF, -INF]), num_levels=4)
    assert torch.isnan(out[0]) and bool(torch.isfinite(out[1:]).all())


# --------------------------------------------------------------------------------------
# Straight-through gradients of the rounding functions


@pytest.mark.parametrize("fn", ROUNDERS)
def test_rounding_gradient_is_straight_through(fn: Callable[..., Tensor]) -> None:
    x = torch.tensor([0.13, -0.72, 0.5, 0.99], requires_grad=True)
    _round(fn, x, num_levels=8).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, torch.ones(4))


@pytest.mark.parametrize("fn", ROUNDERS)
def test_rounding_gradient_scales_with_rescaling(fn: Callable[..., Tensor]) -> None:
    x = torch.tensor([0.13, 0.72, 0.5], requires_grad=True)
    _round(fn, x, input_range=[0.0, 1.0], output_range=[0.0, 10.0], num_levels=11).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, torch.full((3,), 10.0))


@pytest.mark.parametrize(
    "round_to",
    [
        lambda x, s: stochastic_rounding(x, [-1.0, 1.0], [-s, s], num_levels=9, generator=_gen()),
        lambda x, s: deterministic_rounding(x, [-1.0, 1.0], [-s, s], num_levels=9),
        lambda x, s: stochastic_channel_rounding(x, [-s, s], num_levels=9, generator=_gen()),
        lambda x, s: deterministic_channel_rounding(x, [-s, s], num_levels=9),
    ],
    ids=["stochastic", "deterministic", "stochastic channel", "deterministic channel"],
)
def test_a_learned_output_scale_gets_its_gradient(round_to: Callable[..., Tensor]) -> None:
    # out = k * 2s / (n - 1) - s, so d out / d s = out / s at every element.
    x = torch.empty(40_000).uniform_(-1, 1, generator=_gen()).reshape(200, 200)
    x[0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    weights = torch.rand(200, 200, generator=_gen())
    scale = torch.tensor(3.0, requires_grad=True)
    out = round_to(x.clone().requires_grad_(), scale)
    plain = round_to(x, 3.0)
    assert torch.equal(out.detach().nan_to_num(7.0), plain.nan_to_num(7.0))  # values unchanged
    (out.nan_to_num(0.0) * weights).sum().backward()
    expected = (weights * plain / 3.0).nan_to_num(0.0).double().sum()  # inf inputs too
    assert scale.grad is not None and math.isclose(scale.grad, expected, rel_tol=1e-4)


def test_a_learned_input_range_gets_a_finite_gradient_past_inf_and_nan() -> None:
    x = torch.tensor([0.3, -0.7, math.inf, -math.inf, math.nan])
    width = torch.tensor(1.0, requires_grad=True)
    out = deterministic_rounding(x, [-width, width], [-1.0, 1.0], num_levels=5)
    assert torch.equal(out[:4], torch.tensor([0.5, -0.5, 1.0, -1.0])) and out[4].isnan()
    out[:4].sum().backward()
    # d/dw of round(2 (x + w) / w) * 0.5 - 1, straight through: -x / w**2 per finite x.
    assert width.grad is not None and math.isclose(width.grad, 0.4, rel_tol=1e-6)


def test_rounding_without_grad_records_no_graph() -> None:
    x = torch.tensor([0.2, 0.4], requires_grad=True)
    with torch.no_grad():
        out = stochastic_rounding(x, num_levels=4, generator=_gen())
    assert out.grad_fn is None and not out.requires_grad


# --------------------------------------------------------------------------------------
# stochastic_rounding: randomness


def test_stochastic_rounding_is_unbiased() -> None:
    draws = 20_000
    x = torch.tensor([0.1, -0.37, 0.5, 0.93, -1.0, 0.0, 0.61])
    # Symmetric range [-1, 1], 6 levels: quantum 0.4, so no input sits on a level but the ends.
    out = stochastic_rounding(x.expand(draws, -1).contiguous(), num_levels=6, generator=_gen(3))
    quantum = 2.0 / 5
    # Each draw has standard deviation at most quantum / 2; allow 6 standard errors.
    bound = 6 * (quantum / 2) / math.sqrt(draws)
    assert torch.allclose(out.double().mean(0), x.double(), atol=bound, rtol=0)
    # Only the two neighbouring levels are ever used.
    spread = out.max(0).values - out.min(0).values
    assert bool((spread <= quantum + 1e-6).all())


def test_stochastic_rounding_probability_matches_fraction() -> None:
    # 0.1 of the way from level 0 to level 1: rounds up with probability 0.1.
    x = torch.full((50_000,), 0.1)
    out = stochastic_rounding(x, input_range=[0.0, 1.0], num_levels=2, generator=_gen(5))
    share_up = (out == 1.0).double().mean().item()
    assert abs(share_up - 0.1) < 6 * math.sqrt(0.1 * 0.9 / x.numel())
    assert set(out.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    "call",
    [
        lambda v, g: stochastic_rounding(v, num_levels=4, generator=g),
        lambda v, g: stochastic_channel_rounding(v.reshape(50, 20), [-1.0, 1.0], 4, generator=g),
        lambda v, g: dropout(v, 0.5, generator=g),
    ],
    ids=["stochastic_rounding", "stochastic_channel_rounding", "dropout"],
)
def test_generator_reproducibility(call: Callable[[Tensor, torch.Generator], Tensor]) -> None:
    x = torch.linspace(-0.95, 0.95, 1000)
    first = call(x, _gen(42))
    again = call(x, _gen(42))
    other = call(x, _gen(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_generator_state_advances() -> None:
    g = _gen(7)
    x = torch.linspace(-0.95, 0.95, 1000)
    assert not torch.equal(stochastic_rounding(x, generator=g), stochastic_rounding(x, generator=g))


def test_random_numbers_on_the_tensor_device_cpu() -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    out = stochastic_rounding(torch.rand(8, generator=_gen()), num_levels=4, generator=g)
    assert out.device.type == "cpu"


@pytest.mark.gpu
def test_random_numbers_on_the_tensor_device_cuda(cuda_device: torch.device) -> None:
    x = torch.linspace(-0.95, 0.95, 4096, device=cuda_device)
    g = torch.Generator(device=cuda_device)
    first = stochastic_rounding(x, num_levels=6, generator=g.manual_seed(1))
    again = stochastic_rounding(x, num_levels=6, generator=g.manual_seed(1))
    assert first.device == x.device and torch.equal(first, again)
    no_gen = stochastic_rounding(x, num_levels=6)
    assert no_gen.device == x.device
    _assert_on_grid(no_gen.cpu(), (-0.95, 0.95), 6)
    w = x.reshape(64, 64)
    chan = stochastic_channel_rounding(w, [-1.0, 1.0], 5, generator=g.manual_seed(2))
    assert chan.device == x.device
    dropped = dropout(x, 0.5, generator=g.manual_seed(3))
    assert dropped.device == x.device and 0 < int((dropped == 0).sum()) < x.numel()
    decays = t_decay(torch.tensor([0.5, 0.8], device=cuda_device))
    assert decays.device == x.device and decays.cpu().tolist() == [0.5, 0.75]
    ints = int_quant(x, n_bits=4)
    assert ints.device == x.device and ints.abs().max().item() == 7.0


# --------------------------------------------------------------------------------------
# Large tensors: the same semantics at sizes where faster code paths may take over

LARGE = (1 << 17) + 5  # not a multiple of any power-of-two block size


@pytest.mark.parametrize("num_levels", [15, 256])
@pytest.mark.parametrize("maintain_zero", [True, False])
def test_large_deterministic_rounding(num_levels: int, maintain_zero: bool) -> None:
    x = torch.randn(LARGE, generator=_gen(21))
    x[:7] = 0.0
    out = deterministic_rounding(x, num_levels=num_levels, maintain_zero=maintain_zero)
    in_range = _data_range(x, maintain_zero)
    _assert_on_grid(out, in_range, num_levels)
    quantum = (in_range[1] - in_range[0]) / (num_levels - 1)
    error = (out.double() - x.double()).abs().max().item()
    assert error <= quantum / 2 * (1 + 1e-4)
    # The data's extremes are the ends of the range and keep their values exactly.
    if maintain_zero:
        assert out.abs().max().item() == x.abs().max().item()
    else:
        assert (out.min().item(), out.max().item()) == (x.min().item(), x.max().item())
    if maintain_zero and num_levels % 2:
        assert bool((out[:7] == 0).all())
    assert torch.equal(
        deterministic_rounding(out, num_levels=num_levels, maintain_zero=maintain_zero), out
    )


def test_large_stochastic_rounding() -> None:
    x = torch.rand(LARGE, generator=_gen(22)) * 2 - 1
    out = stochastic_rounding(x, num_levels=9, generator=_gen(1))
    in_range = _data_range(x, True)
    _assert_on_grid(out, in_range, 9)
    quantum = (in_range[1] - in_range[0]) / 8
    residual = out.double() - x.double()
    assert residual.abs().max().item() <= quantum * (1 + 1e-4)
    # Unbiased over the whole tensor: the mean residual is within sampling error of 0.
    assert abs(residual.mean().item()) < 6 * (quantum / 2) / math.sqrt(LARGE)
    assert torch.equal(out, stochastic_rounding(x, num_levels=9, generator=_gen(1)))
    assert not torch.equal(out, stochastic_rounding(x, num_levels=9, generator=_gen(2)))


def test_large_non_finite_and_channels() -> None:
    x = torch.randn(LARGE, generator=_gen(23))
    x[[5, 1000, LARGE - 1]] = torch.tensor([NAN, INF, -INF])
    out = stochastic_rounding(x, num_levels=5, generator=_gen())
    peak = x[torch.isfinite(x)].abs().max().item()
    assert torch.isnan(out[5]) and out[1000].item() == peak and out[LARGE - 1].item() == -peak
    assert int(torch.isnan(out).sum()) == 1
    w = torch.randn(LARGE - 5, 3, generator=_gen(24)) * torch.tensor([1.0, 10.0, 0.1])
    chan = stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=5, generator=_gen())
    _assert_on_grid(chan, (-1.0, 1.0), 5)
    assert torch.equal(chan.abs().amax(0), torch.ones(3))
    expected, _ = _loop_channel_rounding(w, (-1.0, 1.0), 5, True, 1)
    assert (chan.double() - expected).abs().max().item() <= 0.5 * (1 + 1e-4)


def test_large_int_quant_and_dropout() -> None:
    x = torch.randn(LARGE, generator=_gen(25))
    out = int_quant(x, n_bits=4)
    assert out.abs().max().item() == 7.0 and torch.equal(out, out.round())
    expected = torch.round(x.double() * (7 / x.abs().max().double()))
    assert (out.double() - expected).abs().max().item() <= 1.0
    assert float((out.double() != expected).double().mean()) < 1e-4
    kept = dropout(torch.ones(LARGE), 0.25, generator=_gen(26))
    share = (kept == 1).double().mean().item()
    assert abs(share - 0.75) < 6 * math.sqrt(0.75 * 0.25 / LARGE)
    assert set(kept.unique().tolist()) == {0.0, 1.0}


@pytest.mark.gpu
@pytest.mark.parametrize("size", [1000, LARGE])
def test_cuda_matches_cpu_semantics(cuda_device: torch.device, size: int) -> None:
    x = torch.randn(size, generator=_gen(31))
    x[:5] = 0.0
    x[5:8] = torch.tensor([NAN, INF, -INF])
    xc = x.to(cuda_device)
    for num_levels in (2, 15, 256):
        for maintain_zero in (True, False):
            kwargs: dict[str, Any] = {"num_levels": num_levels, "maintain_zero": maintain_zero}
            cpu = deterministic_rounding(x, **kwargs)
            gpu = deterministic_rounding(xc, **kwargs).cpu()
            lo, hi = _data_range(x, maintain_zero)
            quantum = (hi - lo) / (num_levels - 1)
            # The same level, and the same value up to a fused multiply-add's ulp, except
            # at ties, where CUDA's scalar division (by a reciprocal) may break the other way.
            exact = (x.double() - lo) / quantum
            tie = (exact - exact.floor() - 0.5).abs() < 1e-4
            close = (gpu - cpu).abs() <= 1e-6 * max(abs(lo), abs(hi))
            assert bool((close | tie | torch.isnan(x)).all())
            assert bool(((gpu - cpu).abs()[tie] <= quantum * (1 + 1e-4)).all())
            assert torch.equal(torch.isnan(gpu), torch.isnan(cpu))
            # The pinned values are exact: the data's extremes (the ends of the range), zero.
            finite = torch.where(torch.isfinite(x), x, 0.0)
            ends = [finite.abs().argmax()] if maintain_zero else [finite.argmin(), finite.argmax()]
            for i in ends:
                assert gpu[i] == x[i] and cpu[i] == x[i]
            if maintain_zero and num_levels % 2:
                assert bool((gpu[:5] == 0).all())
            rng = _data_range(x, maintain_zero)
            _assert_on_grid(gpu, rng, num_levels)
            sto = stochastic_rounding(
                xc, **kwargs, generator=torch.Generator(cuda_device).manual_seed(0)
            )
            _assert_on_grid(sto.cpu(), rng, num_levels)
            assert torch.equal(torch.isnan(sto.cpu()), torch.isnan(x))
            if maintain_zero and num_levels % 2:
                assert bool((sto[:5] == 0).all())
    explicit = {"input_range": [-1.0, 1.0], "output_range": [0.0, 10.0], "num_levels": 11}
    gap = deterministic_rounding(xc, **explicit).cpu() - deterministic_rounding(x, **explicit)
    gap = gap[~torch.isnan(x)].abs()
    assert gap.max().item() <= 1.0 and int((gap > 1e-5).sum()) <= 3  # only at ties
    # Unbiased on the device too.
    draws = torch.linspace(-0.9, 0.9, 7, device=cuda_device).expand(20_000, -1).contiguous()
    mean = (
        stochastic_rounding(
            draws, num_levels=6, generator=torch.Generator(cuda_device).manual_seed(4)
        )
        .double()
        .mean(0)
    )
    assert torch.allclose(
        mean.cpu(), draws[0].double().cpu(), atol=6 * 0.18 / math.sqrt(20_000) + 1e-4, rtol=0
    )
    # Per-channel ranges, gradients and empty tensors.
    w = _exact_level_matrix(9, [1.0, 2.0**-7, 2.0**5], half_levels=4)
    assert torch.equal(
        stochastic_channel_rounding(w.to(cuda_device), [-1.0, 1.0], 9).cpu(),
        stochastic_channel_rounding(w, [-1.0, 1.0], 9),
    )
    leaf = xc[8:100].clone().requires_grad_()
    stochastic_rounding(leaf, num_levels=4).sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad.cpu(), torch.ones(92))
    assert deterministic_rounding(torch.empty(0, device=cuda_device)).shape == (0,)
    assert stochastic_channel_rounding(
        torch.empty(0, 3, device=cuda_device), [-1.0, 1.0]
    ).shape == (0, 3)
    assert torch.equal(int_quant(xc[8:], n_bits=5).cpu(), int_quant(x[8:], n_bits=5))
    decays = torch.linspace(0.01, 0.99, 99)
    assert torch.equal(t_decay(decays.to(cuda_device)).cpu(), t_decay(decays))


# --------------------------------------------------------------------------------------
# stochastic_channel_rounding


def _exact_level_matrix(rows: int, scales: list[float], half_levels: int, seed: int = 0) -> Tensor:
    """Columns of integers times a power-of-two scale, each column reaching +-half_levels.

    With ``num_levels = 2 * half_levels + 1`` every value sits exactly on a level of its
    column's own symmetric range, so stochastic rounding has nothing random left to do.
    """
    g = _gen(seed)
    ints = torch.randint(-half_levels, half_levels + 1, (rows, len(scales)), generator=g)
    ints[0] = half_levels
    ints[1] = -half_levels
    return ints.double().mul(torch.tensor(scales, dtype=torch.float64)).float()


def _loop_channel_rounding(
    w: Tensor, out_range: tuple[float, float], num_levels: int, maintain_zero: bool, dim: int
) -> tuple[Tensor, list[tuple[float, float]]]:
    """Per-channel loop: the expected value of each element and each channel's input range."""
    expected = torch.empty_like(w, dtype=torch.float64)
    ranges = []
    for c in range(w.shape[dim]):
        channel = w.select(dim, c)
        in_range = _data_range(channel, maintain_zero)
        ranges.append(in_range)
        expected.select(dim, c).copy_(_rescale(channel, in_range, out_range))
    return expected, ranges


def test_channel_rounding_matches_a_per_column_loop_exactly() -> None:
    scales = [1.0, 2.0**-7, 2.0**5, 0.25]
    w = _exact_level_matrix(9, scales, half_levels=4)
    out = stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=9, generator=_gen())
    loop = torch.stack(
        [deterministic_rounding(w[:, c], output_range=[-1.0, 1.0], num_levels=9) for c in range(4)],
        dim=1,
    )
    assert torch.equal(out, loop)
    expected, _ = _loop_channel_rounding(w, (-1.0, 1.0), 9, True, 1)
    assert torch.equal(out.double(), expected)


@pytest.mark.parametrize("maintain_zero", [True, False])
def test_channel_rounding_statistics_match_per_column_loop(maintain_zero: bool) -> None:
    g = _gen(11)
    w = torch.randn(6, 5, generator=g) * torch.tensor([1.0, 100.0, 0.01, 3.0, 1e-3])
    draws = 4000
    # Repeating along a new leading dim keeps each channel's range, giving many draws at once.
    stacked = w.expand(draws, -1, -1).contiguous()
    out = stochastic_channel_rounding(
        stacked, [-2.0, 2.0], num_levels=7, maintain_zero=maintain_zero, dim=2, generator=g
    )
    expected, _ = _loop_channel_rounding(w, (-2.0, 2.0), 7, maintain_zero, 1)
    quantum = 4.0 / 6
    bound = 6 * (quantum / 2) / math.sqrt(draws)
    assert torch.allclose(out.double().mean(0), expected, atol=bound, rtol=0)
    _assert_on_grid(out, (-2.0, 2.0), 7)


def test_channel_ranges_are_each_channels_own() -> None:
    w = torch.tensor([[1.0, 100.0, 0.01], [-0.5, -50.0, 0.0], [0.25, 25.0, -0.01]])
    out = stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=9, generator=_gen())
    # Every column is the first one scaled, so they all round identically.
    assert torch.equal(out[:, 0], out[:, 1])
    assert out[:, 2].tolist() == [1.0, 0.0, -1.0]
    assert out[0, 0].item() == 1.0 and out[1, 0].item() == -0.5


def test_channel_rounding_returns_new_tensor() -> None:
    w = torch.randn(4, 3, generator=_gen())
    before = w.clone()
    out = stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=5, generator=_gen())
    assert out.data_ptr() != w.data_ptr()
    assert torch.equal(w, before)


def test_channel_rounding_on_a_leaf_parameter_passes_gradient() -> None:
    w = torch.nn.Parameter(torch.tensor([[1.0, 10.0], [-0.5, -5.0], [0.2, 2.0]]))
    out = stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=5, generator=_gen())
    assert out.requires_grad and w.grad is None
    out.sum().backward()
    assert w.grad is not None
    # Straight through the rounding; the per-column rescale (output / input width) remains.
    assert torch.allclose(w.grad, torch.tensor([[1.0, 0.1]]).expand(3, 2))


@pytest.mark.parametrize(
    ("shape", "dim"), [((3, 4), 1), ((3, 4), 0), ((3, 4), -1), ((2, 3, 4), 1), ((5, 2, 3, 3), 0)]
)
def test_channel_rounding_any_dims(shape: tuple[int, ...], dim: int) -> None:
    w = torch.randn(shape, generator=_gen(2))
    out = stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=5, dim=dim, generator=_gen())
    assert out.shape == w.shape
    _assert_on_grid(out, (-1.0, 1.0), 5)
    # Each channel's largest magnitude has a level of its own at an end of the range.
    others = tuple(d for d in range(w.dim()) if d != dim % w.dim())
    assert torch.equal(out.abs().amax(dim=others), torch.ones(w.shape[dim]))


def test_channel_rounding_dim_keyword_matches_transpose() -> None:
    w = _exact_level_matrix(7, [1.0, 0.5, 4.0], half_levels=3).T.contiguous()
    by_rows = stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=7, dim=0, generator=_gen())
    by_cols = stochastic_channel_rounding(w.T, [-1.0, 1.0], num_levels=7, dim=1, generator=_gen())
    assert torch.equal(by_rows, by_cols.T)


def test_channel_rounding_non_finite_stays_in_its_channel() -> None:
    w = torch.tensor([[NAN, 1.0], [0.5, -0.5], [INF, 0.5]])  # column 1 sits on its levels
    out = stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=5, generator=_gen())
    assert torch.isnan(out[0, 0]) and out[2, 0].item() == 1.0 and out[1, 0].item() == 1.0
    assert bool(torch.isfinite(out[:, 1]).all())
    assert torch.equal(out[:, 1], torch.tensor([1.0, -0.5, 0.5]))


def test_channel_rounding_zero_channel() -> None:
    w = torch.tensor([[0.0, 1.0], [0.0, -1.0]], requires_grad=True)
    out = stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=3, generator=_gen())
    assert out[:, 0].tolist() == [0.0, 0.0]
    out.sum().backward()
    assert w.grad is not None and bool(torch.isfinite(w.grad).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"value": torch.ones(4)}, "2 or more dimensions"),
        ({"value": torch.ones(2, 2), "dim": 2}, "dim must be an integer in"),
        ({"value": torch.ones(2, 2), "dim": -3}, "dim must be an integer in"),
        ({"value": torch.ones(2, 2), "output_range": None}, "output_range is required"),
        ({"value": torch.ones(2, 2), "output_range": [1.0, 0.0]}, "reversed"),
        ({"value": torch.ones(2, 2), "num_levels": 1}, "num_levels"),
    ],
)
def test_channel_rounding_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("output_range", [-1.0, 1.0])
    with pytest.raises(ValueError, match=match):
        stochastic_channel_rounding(**kwargs)


# --------------------------------------------------------------------------------------
# int_quant


def test_int_quant_scales_largest_magnitude_to_largest_integer() -> None:
    x = torch.tensor([0.3, -0.9, 0.45, 0.0])
    out = int_quant(x, n_bits=4)
    assert out.tolist() == [2.0, -7.0, 4.0, 0.0]  # 7 / 0.9 * [0.3, 0.45] = [2.33, 3.5]
    assert torch.equal(out, out.round())


@pytest.mark.parametrize("n_bits", [2, 3, 8, 12])
def test_int_quant_integer_range(n_bits: int) -> None:
    x = torch.randn(200, generator=_gen(1))
    out = int_quant(x, n_bits=n_bits)
    largest = 2 ** (n_bits - 1) - 1
    assert out.abs().max().item() == largest
    assert torch.equal(out, out.round())


@pytest.mark.parametrize(
    ("dtype", "most"),
    [(torch.float16, 12), (torch.bfloat16, 9), (torch.float32, 25), (torch.float64, 54)],
)
def test_int_quant_bits_are_bounded_by_the_integers_the_dtype_holds(
    dtype: torch.dtype, most: int
) -> None:
    x = torch.tensor([-1.0, 0.5, 1.0], dtype=dtype)
    out = int_quant(x, n_bits=most)
    assert [int(v) for v in out.tolist()] == [
        -(2 ** (most - 1) - 1),
        2 ** (most - 2),
        2 ** (most - 1) - 1,
    ]
    for bits in ({"n_bits": most + 1}, {"map_to_max": True, "max_n_bits": most + 1}):
        with pytest.raises(ValueError, match=f"must be at most {most} for "):
            int_quant(x, **bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be at most"):
        int_quant(x, n_bits=10**20)  # refused at once, never computed


def test_int_quant_map_to_max() -> None:
    x = torch.tensor([-1.0, 0.5, 1.0 / 3, 0.1])
    out = int_quant(x, n_bits=3, map_to_max=True, max_n_bits=5)
    # As the reference: the largest magnitude maps to 2**(5-1) - 1 = 15 and every value is
    # scaled by the same factor before rounding, so n_bits has no effect.
    assert out.tolist() == [-15.0, 8.0, 5.0, 2.0]  # 7.5 ties to even
    assert torch.equal(int_quant(x, n_bits=6, map_to_max=True, max_n_bits=5), out)


def test_int_quant_without_maintain_zero_centres_the_data() -> None:
    out = int_quant(torch.tensor([0.0, 1.0, 2.0, 0.5]), maintain_zero=False, n_bits=3)
    assert out.tolist() == [-3.0, 0.0, 3.0, -2.0]  # centre 1: [-1, 0, 1, -0.5] * 3


def test_int_quant_zero_tensor_and_non_finite() -> None:
    assert int_quant(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    out = int_quant(torch.tensor([NAN, INF, -INF, 0.5, -1.0]), n_bits=3)
    assert torch.isnan(out[0])
    assert out[1:].tolist() == [3.0, -3.0, 2.0, -3.0]


def test_int_quant_gradient_is_the_scale() -> None:
    x = torch.tensor([0.5, -2.0, 1.0], requires_grad=True)
    int_quant(x, n_bits=3).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, torch.full((3,), 1.5))  # 3 / max|x|


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"n_bits": 1}, "n_bits"), ({"max_n_bits": 2.5}, "max_n_bits")]
)
def test_int_quant_bad_bits_raise(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 2"):
        int_quant(torch.ones(3), **kwargs)


# --------------------------------------------------------------------------------------
# dropout


def test_dropout_gradient_is_the_mask() -> None:
    x = torch.linspace(0.5, 2.0, 64).requires_grad_()
    out = dropout(x, 0.5, generator=_gen())
    out.sum().backward()
    kept = out != 0
    assert x.grad is not None
    assert torch.equal(x.grad, kept.float())
    # Kept values are not rescaled.
    assert torch.equal(out[kept], x.detach()[kept])
    assert 0 < int(kept.sum()) < 64


def test_dropout_probability_zero_and_one() -> None:
    x = torch.randn(100, generator=_gen())
    assert torch.equal(dropout(x, 0.0, generator=_gen()), x)
    assert torch.equal(dropout(x, 1.0, generator=_gen()), torch.zeros(100))
    assert torch.equal(dropout(x, 0, generator=_gen()), x)


def test_dropout_keeps_the_expected_share() -> None:
    x = torch.ones(40_000)
    kept = (dropout(x, 0.8, generator=_gen(9)) != 0).double().mean().item()
    assert abs(kept - 0.2) < 6 * math.sqrt(0.2 * 0.8 / x.numel())


def test_dropout_of_non_finite_values() -> None:
    x = torch.tensor([INF, -INF, NAN] * 20)
    out = dropout(x, 0.5, generator=_gen())
    dropped = ~torch.isnan(x) & (out != x)
    # A dropped value is zero, whatever it was; kept values are unchanged.
    assert bool(dropped.any())
    assert bool((out[dropped] == 0).all())
    kept_or_nan = out[~dropped]
    assert bool((torch.isnan(kept_or_nan) | torch.isinf(kept_or_nan) | (kept_or_nan == 0)).all())
    assert int((out == 0).sum()) + int(torch.isinf(out).sum()) + int(torch.isnan(out).sum()) == 60
    assert bool((out[2::3] == 0).any()), "a dropped NaN must be zero, not NaN"


@pytest.mark.parametrize("bad", [-0.1, 1.5, NAN, "0.5", True, None])
def test_dropout_bad_probability_raises(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"dropout_prob must be a number in \[0, 1\]"):
        dropout(torch.ones(3), bad)


# --------------------------------------------------------------------------------------
# make_backward_passthrough and identity


def test_backward_passthrough_forward_is_f_backward_is_identity() -> None:
    floor = make_backward_passthrough(torch.floor)
    x = torch.tensor([0.4, 1.7, -2.2], requires_grad=True)
    out = floor(x)
    assert torch.equal(out, torch.floor(x.detach()))
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_backward_passthrough_passes_extra_arguments() -> None:
    clamp = make_backward_passthrough(torch.clamp)
    x = torch.tensor([-3.0, 0.5, 3.0], requires_grad=True)
    out = clamp(x, min=-1.0, max=1.0)
    assert out.tolist() == [-1.0, 0.5, 1.0]
    out.sum().backward()
    assert x.grad is not None
    # torch.clamp's own gradient would be zero outside [-1, 1].
    assert torch.equal(x.grad, torch.ones(3))
    assert clamp.__name__ == torch.clamp.__name__


def test_backward_passthrough_rejects_shape_change() -> None:
    total = make_backward_passthrough(torch.sum)
    with pytest.raises(ValueError, match="keep the shape"):
        total(torch.ones(3, requires_grad=True))
    # Without a gradient to pass, any function is fine.
    assert total(torch.ones(3)).item() == 3.0


def test_identity_returns_its_argument() -> None:
    x = torch.randn(3, generator=_gen())
    assert identity(x) is x


# --------------------------------------------------------------------------------------
# t_decay and class_calc_q_decay


def test_t_decay_reference_example() -> None:
    decays = torch.tensor([0.4156, 0.8306, 0.1557, 0.9475, 0.4532, 0.3585, 0.4014, 0.9380])
    expected = [0.0, 0.75, 0.0, 0.9375, 0.0, 0.0, 0.0, 0.9375]
    assert t_decay(decays).tolist() == expected


def test_t_decay_values_are_bit_shift_decays() -> None:
    decays = torch.linspace(0.01, 0.999, 500, dtype=torch.float64)
    out = t_decay(decays)
    shifts = -torch.log2(1.0 - out)
    assert torch.equal(shifts, shifts.round())
    # n = round(log2(tau / dt)) with tau = -dt / log(decay), computed here in float64.
    expected = torch.round(torch.log2(-1.0 / torch.log(decays))).clamp(min=0)
    assert torch.equal(shifts, expected)


def test_t_decay_is_monotonic() -> None:
    out = t_decay(torch.linspace(0.0, 1.0, 1001))
    assert bool((out.diff() >= 0).all())


def test_t_decay_edge_decays() -> None:
    x = torch.tensor([0.0, 1.0, -0.5, 1.5, NAN, INF, -INF])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = t_decay(x)
    top = 1.0 - 2.0**-24  # the bit-shift decay closest to 1 in float32
    assert out[[0, 2, 6]].tolist() == [0.0, 0.0, 0.0]
    assert out[[1, 3, 5]].tolist() == [top, top, top]
    assert bool((out[[1, 3, 5]] < 1.0).all())
    assert torch.isnan(out[4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_t_decay_preserves_dtype_without_warnings(dtype: torch.dtype) -> None:
    decays = torch.tensor([0.0, 0.3, 0.5, 0.8, 0.9, 0.99, 1.0], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = t_decay(decays)
    assert out.dtype == dtype and out.device == decays.device
    assert bool(torch.isfinite(out).all()) and bool((out < 1).all())
    # Below 1, the result is the float64 answer for the same stored decays.
    assert torch.equal(out[:-1].double(), t_decay(decays[:-1].double()))


@pytest.mark.parametrize("dt", [1e-9, 1e-6, 1e-3, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_t_decay_independent_of_dt(dt: float, dtype: torch.dtype) -> None:
    # round(log2(tau / dt)) with tau = -dt / log(decay): dt cancels, whatever the dtype.
    decays = torch.linspace(0.05, 0.98, 60).to(dtype)
    assert torch.equal(t_decay(decays, dt=dt), t_decay(decays, dt=1e-3))


def test_t_decay_gradient_passes_straight_through() -> None:
    decays = torch.tensor([0.3, 0.8, 0.95], requires_grad=True)
    (t_decay(decays) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert decays.grad is not None
    assert torch.equal(decays.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_class_calc_q_decay_is_callable() -> None:
    quantiser = class_calc_q_decay(dt=1e-3)
    x = torch.tensor([0.5, 0.8, 0.95])
    assert quantiser(x).tolist() == [0.5, 0.75, 0.9375]
    assert torch.equal(quantiser(x), quantiser.calc_q_decay(x))
    assert torch.equal(quantiser(x), quantiser.calc_bitshift_decay(x))  # the original's name


@pytest.mark.parametrize(
    ("transform", "plain", "numpy_args"),
    [
        (
            stochastic_rounding,
            {"num_levels": 16, "output_range": [-1.0, 1.0]},
            {"num_levels": np.int64(16), "output_range": np.array([-1, 1], dtype=np.float32)},
        ),
        (
            deterministic_rounding,
            {"num_levels": 5, "input_range": [-2.0, 2.0]},
            {"num_levels": np.int32(5), "input_range": np.array([-2.0, 2.0])},
        ),
        (int_quant, {"n_bits": 8}, {"n_bits": np.uint8(8)}),
        (dropout, {"dropout_prob": 0.3}, {"dropout_prob": np.float32(0.3)}),
        (t_decay, {"dt": 1e-3}, {"dt": np.float32(1e-3)}),
    ],
)
def test_numpy_scalars_and_arrays_are_numbers_too(
    transform: Callable[..., torch.Tensor], plain: dict[str, Any], numpy_args: dict[str, Any]
) -> None:
    x = torch.rand(40_000, generator=torch.Generator().manual_seed(1)) * 0.99

    def run(args: dict[str, Any]) -> torch.Tensor:
        if transform in (stochastic_rounding, dropout):
            args = {**args, "generator": torch.Generator().manual_seed(0)}
        return transform(x, **args)

    assert torch.equal(run(numpy_args), run(plain))


@pytest.mark.parametrize("num_levels", [np.float64(2.5), np.bool_(True), np.float32("nan")])
def test_numpy_values_that_are_not_level_counts_are_refused(num_levels: Any) -> None:
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
        stochastic_rounding(torch.ones(3), num_levels=num_levels)


@pytest.mark.parametrize("dt", [0, -1e-3, NAN, float("inf"), "1e-3", True])
def test_class_calc_q_decay_rejects_bad_dt(dt: Any) -> None:
    with pytest.raises(ValueError, match="dt must be a positive, finite number"):
        class_calc_q_decay(dt)


# --------------------------------------------------------------------------------------
# Property-based tests of the rounding functions

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

# Magnitudes far from float32's limits: the transforms work in the tensor's dtype.
_magnitudes = st.floats(min_value=2.0**-20, max_value=1e4, width=32)
_values = st.one_of(
    st.just(0.0), st.builds(lambda m, s: m * s, _magnitudes, st.sampled_from([-1.0, 1.0]))
)
_tensors = st.lists(_values, min_size=1, max_size=24).map(torch.tensor)
_num_levels = st.integers(min_value=2, max_value=300)


@st.composite
def _ranges(draw: st.DrawFn) -> tuple[float, float]:
    lo = draw(st.floats(min_value=-100.0, max_value=100.0, width=32))
    width = draw(st.floats(min_value=1.0, max_value=100.0, width=32))
    hi = float(torch.tensor(lo + width).item())  # representable in float32
    return lo, hi


@st.composite
def _rounding_case(draw: st.DrawFn) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "value": draw(_tensors),
        "num_levels": draw(_num_levels),
        "maintain_zero": draw(st.booleans()),
    }
    if draw(st.booleans()):
        kwargs["input_range"] = draw(_ranges())
    if draw(st.booleans()):
        kwargs["output_range"] = draw(_ranges())
    return kwargs


def _expected_ranges(kwargs: dict[str, Any]) -> tuple[tuple[float, float], tuple[float, float]]:
    in_range = kwargs.get("input_range") or _data_range(kwargs["value"], kwargs["maintain_zero"])
    out_range = kwargs.get("output_range") or in_range
    return tuple(in_range), tuple(out_range)  # type: ignore[return-value]


def _check_rounding_properties(
    out: Tensor, kwargs: dict[str, Any], max_error_levels: float
) -> None:
    value, num_levels = kwargs["value"], kwargs["num_levels"]
    in_range, out_range = _expected_ranges(kwargs)
    assert out.shape == value.shape and bool(torch.isfinite(out).all())
    if in_range[1] - in_range[0] <= 0:
        return  # zero-width ranges are covered by their own tests
    # On the level grid and inside the output range.
    _assert_on_grid(out, out_range, num_levels)
    assert out.unique().numel() <= num_levels
    # At most max_error_levels quanta from the exactly rescaled input.
    quantum = (out_range[1] - out_range[0]) / (num_levels - 1)
    error = (out.double() - _rescale(value, in_range, out_range)).abs().max().item()
    slack = 1e-3 * quantum + 1e-6 * max(abs(out_range[0]), abs(out_range[1]))
    assert error <= max_error_levels * quantum + slack, (error, quantum)


@PROPERTY_SETTINGS
@given(_rounding_case())
def test_deterministic_rounding_properties(kwargs: dict[str, Any]) -> None:
    out = deterministic_rounding(**kwargs)
    _check_rounding_properties(out, kwargs, max_error_levels=0.5)


@PROPERTY_SETTINGS
@given(_rounding_case(), st.integers(min_value=0, max_value=2**31))
def test_stochastic_rounding_properties(kwargs: dict[str, Any], seed: int) -> None:
    out = stochastic_rounding(**kwargs, generator=_gen(seed))
    _check_rounding_properties(out, kwargs, max_error_levels=1.0)


@PROPERTY_SETTINGS
@given(_tensors, _num_levels, st.booleans())
def test_deterministic_rounding_is_idempotent(
    value: Tensor, num_levels: int, maintain_zero: bool
) -> None:
    once = deterministic_rounding(value, num_levels=num_levels, maintain_zero=maintain_zero)
    twice = deterministic_rounding(once, num_levels=num_levels, maintain_zero=maintain_zero)
    assert torch.equal(once, twice)


@PROPERTY_SETTINGS
@given(_rounding_case())
def test_deterministic_rounding_is_idempotent_with_explicit_output(kwargs: dict[str, Any]) -> None:
    once = deterministic_rounding(**kwargs)
    # Give the output range back in the form the first call computed it in: Python floats
    # are used in double precision, the data's range in the tensor's dtype.
    out_range = kwargs.get("output_range") or kwargs.get("input_range")
    if out_range is None:
        out_range = torch.tensor(_data_range(kwargs["value"], kwargs["maintain_zero"]))
    kwargs = {**kwargs, "value": once, "input_range": out_range, "output_range": out_range}
    assert torch.equal(deterministic_rounding(**kwargs), once)


@PROPERTY_SETTINGS
@given(_tensors, st.integers(min_value=1, max_value=150), st.sampled_from(ROUNDERS), st.booleans())
def test_maintain_zero_maps_zero_to_zero_for_odd_levels(
    value: Tensor, half: int, fn: Callable[..., Tensor], explicit_output: bool
) -> None:
    value = torch.cat([value, torch.zeros(3)])
    kwargs: dict[str, Any] = {"num_levels": 2 * half + 1, "maintain_zero": True}
    if explicit_output:
        kwargs["output_range"] = [-3.0, 3.0]
    out = _round(fn, value, **kwargs)
    assert bool((out[value == 0] == 0).all()), out


@settings(max_examples=25, deadline=None)
@given(_rounding_case(), st.integers(min_value=0, max_value=2**31))
def test_stochastic_rounding_unbiased_property(kwargs: dict[str, Any], seed: int) -> None:
    draws = 2000
    value = kwargs["value"]
    in_range, out_range = _expected_ranges(kwargs)
    if in_range[1] - in_range[0] <= 0:
        return
    # A default range comes from the data, and repeating the data does not change it.
    stacked = {**kwargs, "value": value.expand(draws, -1).contiguous()}
    out = stochastic_rounding(**stacked, generator=_gen(seed))
    quantum = (out_range[1] - out_range[0]) / (kwargs["num_levels"] - 1)
    expected = _rescale(value, in_range, out_range)
    bound = 6 * (quantum / 2) / math.sqrt(draws) + 1e-3 * quantum
    bound += 1e-6 * max(abs(out_range[0]), abs(out_range[1]))
    assert torch.allclose(out.double().mean(0), expected, atol=bound, rtol=0)


# --- deterministic_channel_rounding ----------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("maintain_zero", [True, False])
def test_deterministic_channel_rounding_is_per_slice_deterministic_rounding(
    dim: int, maintain_zero: bool
) -> None:
    w = torch.randn(6, 5, generator=_gen()) * torch.tensor([0.01, 1.0, 30.0, 2.0, 0.5])
    out = deterministic_channel_rounding(w, num_levels=7, maintain_zero=maintain_zero, dim=dim)
    loop = torch.stack(
        [
            deterministic_rounding(w.select(dim, c), num_levels=7, maintain_zero=maintain_zero)
            for c in range(w.shape[dim])
        ],
        dim=dim % 2,
    )
    assert torch.allclose(out, loop, rtol=0, atol=1e-6 * float(w.abs().max()))
    for c in range(w.shape[dim]):
        assert w.select(dim, c).unique().numel() >= out.select(dim, c).unique().numel()
        assert out.select(dim, c).unique().numel() <= 7


def test_deterministic_channel_rounding_keeps_each_rows_scale_and_exact_extremes() -> None:
    w = torch.tensor([[1.0, 0.4, -0.2], [-10.0, 6.0, 2.0]])
    out = deterministic_channel_rounding(w, num_levels=3, dim=0)
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0], [-10.0, 10.0, 0.0]]))


def test_deterministic_channel_rounding_with_an_output_range_and_straight_gradient() -> None:
    w = torch.tensor([[0.5, -1.0], [4.0, 2.0]], requires_grad=True)
    out = deterministic_channel_rounding(w, output_range=[-2, 2], num_levels=5, dim=0)
    assert torch.equal(out.detach(), torch.tensor([[1.0, -2.0], [2.0, 1.0]]))
    out.sum().backward()
    assert w.grad is not None and torch.all(w.grad > 0)


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (torch.ones(4), {}, "2 or more dimensions"),
        (torch.ones(2, 2), {"dim": 2}, "dim must be an integer"),
        (torch.ones(2, 2), {"num_levels": 1}, "num_levels"),
        (torch.ones(2, 2), {"output_range": [1.0, -1.0]}, "reversed"),
    ],
)
def test_deterministic_channel_rounding_rejects_bad_arguments(
    value: Tensor, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        deterministic_channel_rounding(value, **kwargs)


def test_deterministic_channel_rounding_on_a_large_tensor_matches_a_small_one() -> None:
    # Large CPU tensors run block by block; the per-channel top levels must survive that.
    w = torch.randn(2048, 1100, generator=_gen())
    out = deterministic_channel_rounding(w, num_levels=15, dim=0)
    rows = torch.cat(
        [
            deterministic_channel_rounding(w[i : i + 64], num_levels=15, dim=0)
            for i in range(0, 2048, 64)
        ]
    )
    assert torch.equal(out, rows)
    assert torch.equal(out.abs().amax(dim=1), w.abs().amax(dim=1))
