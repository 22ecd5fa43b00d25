"""Compatibility with the reference implementation, ``rockpool.transform.torch_transform``.

For finite inputs inside the input range, ``deterministic_rounding``, ``int_quant``
(``maintain_zero=True``) and ``t_decay`` (decays in ``(0, 1)``) give the reference's
results bit for bit, and ``stochastic_rounding`` draws from the same distribution on the
same level grid.

Documented differences, where the reference misbehaves (see ``transform_core.quantise``):

- The top of the output range, and with ``maintain_zero`` the level meant to be zero, are
  exact here; the reference's ``min + k * quantum`` can miss them by an ulp. The tests
  below allow exactly that at those two levels.
- Values outside an explicit input range saturate at the ends of the output range; the
  reference extrapolates past them.
- A zero-width range (an all-zero tensor, a constant with ``maintain_zero=False``) gives
  finite values here; the reference divides by a zero quantum and returns NaN.
- Ranges come from finite values only: one inf or NaN does not turn every output NaN.
- The data's range is a constant in the backward pass, so the gradient is exactly the
  straight-through rescale; the reference also differentiates through ``max|x|``. With
  explicit ranges the gradients agree.
- Empty tensors give empty tensors; the reference raises.
- ``stochastic_channel_rounding`` returns a new tensor and works on leaf parameters, on
  any tensor of two or more dims, along ``dim``; the reference writes into its input.
- ``int_quant(maintain_zero=False)`` centres the data on the midpoint of their range;
  the reference subtracts half the range's width, which centres only data starting at 0.
- ``t_decay`` of decays outside ``(0, 1)`` is finite and documented; the reference's is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from transform_core import quantise as ours

pytestmark = pytest.mark.rockpool

reference = pytest.importorskip("rockpool.transform.torch_transform")


def _with_seed(seed: int, fn: Callable[[], Tensor]) -> Tensor:
    """Run ``fn`` (which uses the global RNG, as the reference does) from ``seed``, restoring it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _inputs(seed: int, shape: tuple[int, ...], scale: float) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _assert_matches_reference(
    mine: Tensor, theirs: Tensor, out_range: tuple[float, float] | None, maintain_zero: bool
) -> None:
    """Bit-identical, except where ours pins the top of the range or zero exactly."""
    pinned = torch.zeros_like(mine, dtype=torch.bool)
    if out_range is not None:
        pinned |= mine == out_range[1]
    if maintain_zero:
        pinned |= mine == 0
    assert torch.equal(mine[~pinned], theirs[~pinned])
    magnitude = mine.abs().max().item() if out_range is None else max(map(abs, out_range))
    ulps = 4 * torch.finfo(mine.dtype).eps * magnitude
    assert torch.allclose(mine[pinned], theirs[pinned], atol=ulps, rtol=0)


# --------------------------------------------------------------------------------------
# deterministic_rounding

LEVELS = [2, 3, 7, 16, 255, 256]


@pytest.mark.parametrize("num_levels", LEVELS)
@pytest.mark.parametrize("maintain_zero", [True, False])
@pytest.mark.parametrize(("shape", "scale"), [((200,), 1.0), ((16, 9), 3e-3), ((3, 4, 5), 250.0)])
def test_deterministic_rounding_default_ranges(
    num_levels: int, maintain_zero: bool, shape: tuple[int, ...], scale: float
) -> None:
    x = _inputs(num_levels, shape, scale)
    mine = ours.deterministic_rounding(x, num_levels=num_levels, maintain_zero=maintain_zero)
    theirs = reference.deterministic_rounding(x, num_levels=num_levels, maintain_zero=maintain_zero)
    lo, hi = (-x.abs().max(), x.abs().max()) if maintain_zero else (x.min(), x.max())
    _assert_matches_reference(mine, theirs, (lo.item(), hi.item()), maintain_zero)


@pytest.mark.parametrize("num_levels", LEVELS)
@pytest.mark.parametrize("maintain_zero", [True, False])
@pytest.mark.parametrize(
    ("input_range", "output_range"),
    [([-1.0, 1.0], None), ([-1.0, 1.0], [-10.0, 10.0]), ([-1.5, 2.5], [0.0, 255.0])],
)
def test_deterministic_rounding_explicit_ranges(
    num_levels: int,
    maintain_zero: bool,
    input_range: list[float],
    output_range: list[float] | None,
) -> None:
    # Inside the input range: outside it, ours saturates and the reference extrapolates.
    x = torch.empty(300).uniform_(*input_range, generator=torch.Generator().manual_seed(1))
    kwargs: dict[str, Any] = {
        "input_range": input_range,
        "output_range": output_range,
        "num_levels": num_levels,
        "maintain_zero": maintain_zero,
    }
    mine = ours.deterministic_rounding(x, **kwargs)
    theirs = reference.deterministic_rounding(x, **kwargs)
    out_range = output_range or input_range
    _assert_matches_reference(mine, theirs, (out_range[0], out_range[1]), maintain_zero)


@pytest.mark.parametrize("fn", ["deterministic_rounding", "stochastic_rounding"])
def test_rounding_gradient_matches_with_explicit_ranges(fn: str) -> None:
    x = torch.empty(50).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(3))
    kwargs: dict[str, Any] = {"input_range": [-1, 1], "output_range": [0, 15], "num_levels": 16}
    grads = []
    for module in (ours, reference):
        leaf = x.clone().requires_grad_()
        getattr(module, fn)(leaf, **kwargs).sum().backward()
        grads.append(leaf.grad)
    assert grads[0] is not None and grads[1] is not None
    # The reference divides then multiplies in float32; ours applies one ratio.
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=0)
    assert torch.allclose(grads[0], torch.full((50,), 7.5))


@pytest.mark.parametrize("ranges", ["output", "input", "input, output by default"])
def test_tensor_ranges_that_require_grad_get_the_references_gradient(ranges: str) -> None:
    x = torch.empty(50).uniform_(-1.4, 1.4, generator=torch.Generator().manual_seed(4))
    weights = torch.linspace(0, 1, 50)
    grads = []
    for module in (ours, reference):
        scale = torch.tensor(2.0, requires_grad=True)
        kwargs: dict[str, Any] = {
            "output": {"input_range": [-1.5, 1.5], "output_range": [-scale, scale]},
            "input": {"input_range": [-scale, scale], "output_range": [-2.0, 2.0]},
            "input, output by default": {"input_range": [-scale, scale]},
        }[ranges]
        out = module.deterministic_rounding(x.clone().requires_grad_(), num_levels=5, **kwargs)
        (out * weights).sum().backward()
        grads.append(scale.grad)
    assert grads[0] is not None and grads[1] is not None
    assert torch.allclose(grads[0], grads[1], rtol=1e-5)


# --------------------------------------------------------------------------------------
# int_quant and t_decay


@pytest.mark.parametrize("n_bits", [2, 3, 4, 8, 12])
@pytest.mark.parametrize("map_to_max", [False, True])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 40.0])
def test_int_quant_matches(n_bits: int, map_to_max: bool, scale: float) -> None:
    x = _inputs(n_bits, (8, 25), scale)
    kwargs = {"maintain_zero": True, "map_to_max": map_to_max, "n_bits": n_bits, "max_n_bits": 8}
    assert torch.equal(ours.int_quant(x, **kwargs), reference.int_quant(x, **kwargs))


def test_int_quant_reference_docstring_example() -> None:
    x = torch.tensor([-1, -0.50, 0.25, 0, 0.25, 0.5, 1])
    for map_to_max in (False, True):
        mine = ours.int_quant(x, n_bits=3, map_to_max=map_to_max)
        assert torch.equal(mine, reference.int_quant(x, n_bits=3, map_to_max=map_to_max))


@pytest.mark.parametrize("dt", [1e-3, 1e-4, 0.05])
def test_t_decay_matches_inside_unit_interval(dt: float) -> None:
    g = torch.Generator().manual_seed(7)
    decays = torch.cat(
        [torch.rand(5000, generator=g) * 0.998 + 0.001, torch.linspace(0.01, 0.99, 99)]
    )
    mine = ours.t_decay(decays, dt=dt)
    theirs = reference.t_decay(decays, dt=dt)
    assert mine.dtype == theirs.dtype
    assert torch.equal(mine, theirs)


# --------------------------------------------------------------------------------------
# stochastic_rounding: same distribution, same grid


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_levels": 5},
        {"num_levels": 16, "maintain_zero": False},
        {"input_range": [-1.0, 1.0], "output_range": [0.0, 10.0], "num_levels": 11},
    ],
    ids=["symmetric", "data-range", "explicit"],
)
def test_stochastic_rounding_same_distribution_and_grid(kwargs: dict[str, Any]) -> None:
    draws = 4000
    x = torch.tensor([-0.93, -0.41, -0.05, 0.0, 0.12, 0.5, 0.77, 1.0])
    stacked = x.expand(draws, -1).contiguous()  # the data's range is unchanged by repeating
    mine = ours.stochastic_rounding(stacked, **kwargs, generator=torch.Generator().manual_seed(0))
    theirs = _with_seed(0, lambda: reference.stochastic_rounding(stacked, **kwargs))

    # The same level grid, up to the ulp at the pinned levels.
    mine_levels, their_levels = mine.unique(), theirs.unique()
    assert mine_levels.numel() == their_levels.numel()
    assert torch.allclose(mine_levels, their_levels, atol=1e-5, rtol=0)

    # The same mean for every element, within sampling error of both.
    out = kwargs.get("output_range")
    if out is None:
        peak = x.abs().max().item()
        lo, hi = (
            (-peak, peak) if kwargs.get("maintain_zero", True) else (x.min().item(), x.max().item())
        )
    else:
        lo, hi = out
    quantum = (hi - lo) / (kwargs["num_levels"] - 1)
    bound = 2 * 6 * (quantum / 2) / math.sqrt(draws)
    assert torch.allclose(mine.double().mean(0), theirs.double().mean(0), atol=bound, rtol=0)


def test_stochastic_channel_rounding_matches_on_exact_levels() -> None:
    # Every value sits on a level of its column's range, so neither side has anything random.
    ints = torch.randint(-4, 5, (10, 3), generator=torch.Generator().manual_seed(2))
    ints[0], ints[1] = 4, -4
    w = ints.float() * torch.tensor([1.0, 0.125, 16.0])
    mine = ours.stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=9)
    theirs = reference.stochastic_channel_rounding(w.clone(), [-1.0, 1.0], num_levels=9)
    assert torch.equal(mine, theirs)


def test_stochastic_channel_rounding_same_distribution() -> None:
    draws = 3000
    w = _inputs(4, (6, 4), 1.0) * torch.tensor([1.0, 10.0, 0.1, 3.0])
    stacked = w.repeat(draws, 1)  # a column's range is unchanged by repeating rows
    mine = ours.stochastic_channel_rounding(
        stacked, [-1.0, 1.0], num_levels=7, generator=torch.Generator().manual_seed(1)
    )
    theirs = _with_seed(
        1, lambda: reference.stochastic_channel_rounding(stacked.clone(), [-1.0, 1.0], num_levels=7)
    )
    mean_mine = mine.double().reshape(draws, 6, 4).mean(0)
    mean_theirs = theirs.double().reshape(draws, 6, 4).mean(0)
    bound = 2 * 6 * (1 / 6) / math.sqrt(draws)
    assert torch.allclose(mean_mine, mean_theirs, atol=bound, rtol=0)


def test_dropout_same_distribution() -> None:
    x = torch.ones(40_000)
    mine = ours.dropout(x, 0.3, generator=torch.Generator().manual_seed(0))
    theirs = _with_seed(0, lambda: reference.dropout(x, 0.3))
    share_mine, share_theirs = (t.mean().item() for t in (mine, theirs))
    assert abs(share_mine - share_theirs) < 2 * 6 * math.sqrt(0.21 / x.numel())
    assert set(mine.unique().tolist()) == set(theirs.unique().tolist()) == {0.0, 1.0}


def test_make_backward_passthrough_matches() -> None:
    x = _inputs(5, (20,), 2.0)
    results = []
    for make in (ours.make_backward_passthrough, reference.make_backward_passthrough):
        leaf = x.clone().requires_grad_()
        out = make(torch.round)(leaf)
        (out * torch.arange(20.0)).sum().backward()
        results.append((out.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# The documented differences hold


def test_documented_differences() -> None:
    zeros = torch.zeros(4)
    assert torch.isnan(reference.deterministic_rounding(zeros)).all()
    assert torch.equal(ours.deterministic_rounding(zeros), zeros)

    with_inf = torch.tensor([0.5, -1.0, math.inf])
    assert torch.isnan(reference.deterministic_rounding(with_inf, num_levels=5)).all()
    assert ours.deterministic_rounding(with_inf, num_levels=5).tolist() == [0.5, -1.0, 1.0]

    outside = torch.tensor([-5.0, 5.0])
    kwargs: dict[str, Any] = {"input_range": [0, 1], "output_range": [0, 10], "num_levels": 11}
    assert reference.deterministic_rounding(outside, **kwargs).tolist() == [-50.0, 50.0]
    assert ours.deterministic_rounding(outside, **kwargs).tolist() == [0.0, 10.0]

    shifted = torch.tensor([1.0, 2.0, 3.0])
    assert reference.int_quant(shifted, maintain_zero=False, n_bits=3).tolist() == [0.0, 2.0, 3.0]
    assert ours.int_quant(shifted, maintain_zero=False, n_bits=3).tolist() == [-3.0, 0.0, 3.0]

    w = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    before = w.clone()
    ours.stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=3)
    assert torch.equal(w, before)
    reference.stochastic_channel_rounding(w, [-1.0, 1.0], num_levels=3)
    assert not torch.equal(w, before)
