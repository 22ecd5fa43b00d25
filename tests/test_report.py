"""Tests for transform_core.report: per-tensor statistics, totals, limits, encodings."""

from __future__ import annotations

import itertools
import json
import math
import os
from functools import reduce
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transform_core.errors import ConfigError
from transform_core.report import (
    FORMAT,
    Report,
    TensorReport,
    Totals,
    Violation,
    describe_transform,
    tensor_report,
)

GOLDEN = Path(__file__).parent / "golden"


# --- per-tensor statistics ------------------------------------------------------------


def test_ternary_tensor_has_three_values_two_bits_and_unit_step() -> None:
    r = tensor_report("w", torch.tensor([[-1.0, 0.0, 1.0], [1.0, 1.0, -1.0]]))
    assert (r.distinct, r.bits_needed) == (3, 2)
    assert (r.min, r.max, r.step) == (-1.0, 1.0, 1.0)
    assert r.on_integer_grid
    # [-1, 1] fits signed 2-bit [-2, 1].
    assert (r.int_signed, r.int_bits) == (True, 2)
    assert (r.shape, r.numel, r.dtype, r.nonfinite) == ((2, 3), 6, "float32", 0)


def test_scaled_ternary_tensor_has_step_but_no_integer_type() -> None:
    r = tensor_report("w", torch.tensor([-0.5, 0.0, 0.5, 0.5]))
    assert (r.distinct, r.bits_needed, r.step) == (3, 2, 0.5)
    assert not r.on_integer_grid
    assert (r.int_signed, r.int_bits) == (None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.int32, torch.float64])
def test_int8_grid_is_signed_8_bits(dtype: torch.dtype) -> None:
    r = tensor_report("w", torch.arange(-128, 128).to(dtype))
    assert (r.distinct, r.bits_needed, r.step) == (256, 8, 1.0)
    assert (r.min, r.max) == (-128.0, 127.0)
    assert (r.on_integer_grid, r.int_signed, r.int_bits) == (True, True, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_unsigned_range_is_unsigned_8_bits(dtype: torch.dtype) -> None:
    r = tensor_report("w", torch.arange(0, 256).flip(0).to(dtype))
    assert (r.distinct, r.bits_needed, r.step) == (256, 8, 1.0)
    assert (r.int_signed, r.int_bits) == (False, 8)


@pytest.mark.parametrize(
    ("lo", "hi", "signed", "bits"),
    [
        (-3, 3, True, 3),
        (-4, 3, True, 3),
        (-4, 4, True, 4),
        (-5, 3, True, 4),
        (-1, 0, True, 1),
        (-129, 0, True, 9),
        (0, 1, False, 1),
        (0, 256, False, 9),
        (5, 6, False, 3),
    ],
)
def test_integer_type_is_the_smallest_that_holds_the_range(
    lo: int, hi: int, signed: bool, bits: int
) -> None:
    r = tensor_report("w", torch.tensor([float(lo), float(hi)]))
    assert (r.int_signed, r.int_bits) == (signed, bits)


def test_decimal_grid_has_step_but_is_not_integer() -> None:
    # k * 0.1 is not exact in binary: the step must survive float32 rounding noise.
    values = (torch.arange(-50, 51, dtype=torch.float64) * 0.1).float()
    r = tensor_report("w", values)
    assert (r.distinct, r.bits_needed) == (101, 7)
    assert r.step == pytest.approx(0.1, rel=1e-6)
    assert not r.on_integer_grid
    assert r.int_bits is None


def test_fine_grid_of_many_levels_is_recovered_in_float32() -> None:
    # 65536 levels over [-1, 1]: a few hundred ulps per step, so the smallest gap alone
    # is off by far more than the final answer may be.
    step = 2.0 / 65535
    values = (torch.arange(65536, dtype=torch.float64) * step - 1.0).float()
    r = tensor_report("w", values)
    assert (r.distinct, r.bits_needed) == (65536, 16)
    assert r.step == pytest.approx(step, rel=1e-6)


def test_random_tensor_has_no_step() -> None:
    g = torch.Generator().manual_seed(0)
    r = tensor_report("w", torch.randn(1000, generator=g))
    assert (r.distinct, r.bits_needed) == (1000, 10)
    assert r.step is None
    assert not r.on_integer_grid


def test_grid_with_a_gap_off_the_smallest_step_has_no_step() -> None:
    r = tensor_report("w", torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64))
    assert r.step is None
    assert r.distinct == 3


def test_gaps_of_a_few_ulps_are_not_mistaken_for_a_grid() -> None:
    # Gaps of 10 and 11 ulps lie within 16 ulps of a 10.5-ulp grid, but a step that
    # fine cannot be told from plain float32 data.
    ulps = torch.tensor([0, 10, 20, 30, 41, 52, 63], dtype=torch.float64)
    r = tensor_report("w", (1.0 + ulps * 2.0**-23).float())
    assert r.distinct == 7
    assert r.step is None


def test_constant_tensor_uses_zero_bits_and_has_no_step() -> None:
    r = tensor_report("w", torch.full((4, 4), 3.5))
    assert (r.distinct, r.bits_needed, r.step) == (1, 0, None)
    assert (r.min, r.max) == (3.5, 3.5)
    assert not r.on_integer_grid


@pytest.mark.parametrize("value", [0.0, -0.0])
def test_zero_tensor_is_unsigned_one_bit_and_reads_positive_zero(value: float) -> None:
    r = tensor_report("w", torch.full((3,), value))
    assert (r.distinct, r.bits_needed, r.step) == (1, 0, None)
    assert r.on_integer_grid
    assert (r.int_signed, r.int_bits) == (False, 1)
    assert r.min is not None
    assert math.copysign(1.0, r.min) == 1.0


def test_mixed_signed_zeros_are_one_value() -> None:
    r = tensor_report("w", torch.tensor([0.0, -0.0, 1.0, -0.0]))
    assert (r.distinct, r.min, r.step) == (2, 0.0, 1.0)


def test_nan_and_inf_are_counted_and_excluded() -> None:
    r = tensor_report("w", torch.tensor([1.0, math.nan, math.inf, -math.inf, 2.0, math.nan]))
    assert r.nonfinite == 4
    assert (r.distinct, r.bits_needed, r.min, r.max, r.step) == (2, 1, 1.0, 2.0, 1.0)
    assert (r.int_signed, r.int_bits) == (False, 2)


def test_all_nan_tensor_has_no_range() -> None:
    r = tensor_report("w", torch.full((3,), math.nan))
    assert (r.nonfinite, r.distinct, r.bits_needed) == (3, 0, 0)
    assert (r.min, r.max, r.step, r.int_bits) == (None, None, None, None)


def test_empty_tensor() -> None:
    r = tensor_report("w", torch.zeros(0, 3))
    assert (r.numel, r.shape, r.distinct, r.bits_needed, r.min) == (0, (0, 3), 0, 0, None)


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.bool, "bool"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16")],
)
def test_small_dtypes_are_reported_exactly(dtype: torch.dtype, name: str) -> None:
    r = tensor_report("w", torch.tensor([0.0, 1.0, 1.0, 0.0]).to(dtype))
    assert (r.dtype, r.distinct, r.bits_needed, r.step) == (name, 2, 1, 1.0)
    assert (r.int_signed, r.int_bits) == (False, 1)


def test_tensor_that_requires_grad_is_reported() -> None:
    p = torch.nn.Parameter(torch.tensor([0.0, 2.0, 4.0]))
    assert tensor_report("w", p).step == 2.0


def test_non_tensors_are_refused() -> None:
    with pytest.raises(TypeError, match=r"w: expected the tensor as a torch.Tensor, got list"):
        tensor_report("w", [1.0, 2.0])  # type: ignore[arg-type]


_FLOAT8 = [
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
]


@pytest.mark.parametrize("dtype", _FLOAT8, ids=str)
def test_float8_tensors_are_reported_exactly(dtype: torch.dtype) -> None:
    values = torch.tensor([-1.0, 0.0, 0.5, 1.0, 1.0])
    r = tensor_report("w", values.to(dtype), reference=values)
    assert r.dtype == str(dtype).removeprefix("torch.")
    assert (r.distinct, r.bits_needed, r.min, r.max, r.step) == (4, 2, -1.0, 1.0, 0.5)
    assert (r.dtype_bits, r.max_abs_error, r.sqnr_db) == (8, 0.0, math.inf)


def test_float8_nan_is_counted_as_non_finite() -> None:
    r = tensor_report("w", torch.tensor([1.0, math.nan, 2.0]).to(torch.float8_e4m3fn))
    assert (r.nonfinite, r.distinct, r.step) == (1, 2, 1.0)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_tensor_is_described_by_its_parts(dtype: torch.dtype) -> None:
    z = torch.tensor([1 + 2j, 1 - 2j, 3 + 0j, complex(math.nan, 1)], dtype=dtype)
    r = tensor_report("z", z, family="weights")
    assert (r.dtype, r.shape, r.numel, r.dtype_bits) == (
        str(dtype)[6:],
        (4,),
        4,
        dtype.itemsize * 8,
    )
    # Parts 1, 2, 1, -2, 3, 0, 1 and a NaN: values -2, 0, 1, 2, 3.
    assert (r.distinct, r.nonfinite, r.min, r.max, r.step) == (5, 1, -2.0, 3.0, 1.0)
    assert (r.on_integer_grid, r.int_signed, r.int_bits) == (True, True, 3)


def test_complex_tensor_errors_compare_the_parts() -> None:
    z = torch.tensor([1 + 1j, 2 - 2j])
    r = tensor_report("z", z, reference=torch.tensor([1 + 1j, 2 - 1j]))
    assert (r.max_abs_error, r.rmse) == (1.0, 0.5)  # sqrt(1 / 4 parts)
    assert r.sqnr_db == pytest.approx(10 * math.log10(1 + 1 + 4 + 1))
    conjugate = tensor_report("z", z.conj(), reference=z.conj().resolve_conj())
    assert conjugate.sqnr_db == math.inf


def test_complex_tensor_against_a_real_reference_has_zero_imaginary_parts() -> None:
    r = tensor_report("z", torch.tensor([1 + 1j, 2 + 0j]), reference=torch.tensor([1.0, 2.0]))
    assert (r.distinct, r.max_abs_error, r.rmse) == (3, 1.0, 0.5)
    back = tensor_report("x", torch.tensor([1.0, 2.0]), reference=torch.tensor([1 + 1j, 2 + 0j]))
    assert (back.dtype, back.distinct, back.max_abs_error) == ("float32", 2, 1.0)


# --- errors against a reference -------------------------------------------------------


def test_reference_errors_match_hand_computation() -> None:
    r = tensor_report(
        "w", torch.tensor([1.0, 2.0, 3.0, 4.0]), reference=torch.tensor([1.0, 2.0, 3.0, 5.0])
    )
    assert r.max_abs_error == 1.0
    assert r.rmse == pytest.approx(0.5)  # sqrt(1 / 4)
    assert r.sqnr_db == pytest.approx(10 * math.log10(39.0))  # (1 + 4 + 9 + 25) / 1


def test_exact_quantisation_has_infinite_sqnr() -> None:
    t = torch.tensor([0.25, -0.5])
    r = tensor_report("w", t, reference=t.clone())
    assert (r.max_abs_error, r.rmse, r.sqnr_db) == (0.0, 0.0, math.inf)


def test_zero_reference_with_error_has_minus_infinite_sqnr() -> None:
    r = tensor_report("w", torch.tensor([1.0, 0.0]), reference=torch.zeros(2))
    assert r.sqnr_db == -math.inf
    assert r.rmse == pytest.approx(math.sqrt(0.5))


def test_no_reference_means_no_errors() -> None:
    r = tensor_report("w", torch.tensor([1.0]))
    assert (r.max_abs_error, r.rmse, r.sqnr_db) == (None, None, None)


def test_non_finite_elements_are_left_out_of_errors() -> None:
    r = tensor_report(
        "w",
        torch.tensor([1.0, math.nan, 3.0]),
        reference=torch.tensor([2.0, 0.0, math.inf]),
    )
    assert (r.max_abs_error, r.rmse) == (1.0, 1.0)
    assert r.sqnr_db == pytest.approx(10 * math.log10(4.0))


def test_reference_of_other_dtype_is_compared_in_float64() -> None:
    r = tensor_report(
        "w", torch.tensor([1, 2], dtype=torch.int8), reference=torch.tensor([1.5, 2.0])
    )
    assert r.max_abs_error == 0.5


def test_reference_shape_mismatch_names_the_tensor() -> None:
    with pytest.raises(ValueError, match=r"layers\.0\.weight: reference shape \(3,\) differs"):
        tensor_report("layers.0.weight", torch.zeros(2, 2), reference=torch.zeros(3))


# --- values at the ends of their dtype's range ------------------------------------------


_WIDE_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", _WIDE_FLOATS, ids=str)
def test_values_spanning_more_than_the_dtype_range_are_reported(dtype: torch.dtype) -> None:
    # max - min is beyond the dtype's range (for float64, beyond any float): pytest turns a
    # NumPy overflow warning into an error, and the step used to divide by zero.
    f = torch.finfo(dtype)
    r = tensor_report("l.clamp", torch.tensor([f.min, f.max], dtype=dtype))
    assert (r.distinct, r.bits_needed, r.min, r.max) == (2, 1, f.min, f.max)
    # The one gap, 2 * max, is a float64 unless the dtype is float64 itself.
    assert r.step == (None if dtype == torch.float64 else 2 * f.max)
    assert (r.on_integer_grid, r.int_signed, r.int_bits) == (
        True,
        True,
        int(f.max).bit_length() + 1,
    )
    three = tensor_report("l.clamp", torch.tensor([f.min, 0.0, f.max], dtype=dtype))
    assert (three.distinct, three.step) == (3, f.max)


@pytest.mark.parametrize("dtype", _WIDE_FLOATS, ids=str)
def test_extreme_values_next_to_ordinary_ones_have_no_step(dtype: torch.dtype) -> None:
    f = torch.finfo(dtype)
    values = torch.tensor([f.min, -1.0, 0.5, 2.0, f.max], dtype=torch.float64).to(dtype)
    r = tensor_report("l.clamp", values)
    assert (r.distinct, r.min, r.max, r.step) == (5, f.min, f.max, None)


@pytest.mark.parametrize("dtype", _WIDE_FLOATS, ids=str)
def test_errors_between_the_ends_of_the_range_are_reported(dtype: torch.dtype) -> None:
    f = torch.finfo(dtype)
    r = tensor_report(
        "w",
        torch.tensor([f.max, f.min], dtype=dtype),
        reference=torch.tensor([f.min, f.max], dtype=dtype),
    )
    # Each error is 2 * max: a float64 for the narrower dtypes, past its range for float64.
    error = math.inf if dtype == torch.float64 else 2 * f.max
    assert (r.max_abs_error, r.rmse) == (error, error)
    assert r.sqnr_db == pytest.approx(10 * math.log10(1 / 4))  # (2 max**2) / (2 * 4 max**2)


def test_float64_errors_whose_squares_overflow_are_reported() -> None:
    r = tensor_report(
        "w",
        torch.tensor([1e200, 3e200], dtype=torch.float64),
        reference=torch.tensor([2e200, 3e200], dtype=torch.float64),
    )
    assert r.max_abs_error == 1e200
    assert r.rmse == pytest.approx(1e200 / math.sqrt(2), rel=1e-12)
    assert r.sqnr_db == pytest.approx(10 * math.log10((4 + 9) / 1), rel=1e-12)
    # Huge values with tiny errors: the errors keep their own scale.
    small = tensor_report(
        "w",
        torch.tensor([1e300, 1.0], dtype=torch.float64),
        reference=torch.tensor([1e300, 1.5], dtype=torch.float64),
    )
    assert (small.max_abs_error, small.rmse) == (0.5, pytest.approx(0.5 / math.sqrt(2)))
    assert small.sqnr_db == pytest.approx(10 * (600 - math.log10(0.25)), rel=1e-12)


def test_float64_error_sums_past_the_float64_range_are_reported() -> None:
    # Each square is finite (1.44e308), their sum is not.
    r = tensor_report(
        "w", torch.tensor([1.2e154, -1.2e154], dtype=torch.float64), reference=torch.zeros(2)
    )
    assert (r.max_abs_error, r.sqnr_db) == (1.2e154, -math.inf)
    assert r.rmse == pytest.approx(1.2e154, rel=1e-12)


def test_sqnr_far_below_zero_is_reported() -> None:
    # sum(ref**2) / sum(err**2) is below the smallest float64: the ratio would read 0.
    r = tensor_report(
        "w",
        torch.tensor([1e10], dtype=torch.float64),
        reference=torch.tensor([1e-160], dtype=torch.float64),
    )
    assert r.max_abs_error == 1e10
    assert r.sqnr_db == pytest.approx(10 * (-320 - 20), abs=0.01)


def test_a_report_of_extreme_values_is_strict_json(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from transform_core.pipeline import checkpoint_report

    f = torch.finfo(torch.float32)
    path = tmp_path / "clamp.safetensors"
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    save_file({"l.weight": weight, "l.clamp": torch.tensor([f.min, f.max])}, path)
    report = checkpoint_report(path)
    clamp = next(t for t in report.tensors if t.name == "l.clamp")
    assert (clamp.min, clamp.max, clamp.step) == (f.min, f.max, 2 * f.max)
    assert Report.from_dict(json.loads(report.to_json())) == report


def test_an_error_past_float64_reads_inf_in_json() -> None:
    f = torch.finfo(torch.float64)
    big = torch.tensor([f.max], dtype=torch.float64)
    e = tensor_report("w", big, reference=-big)
    data = Report.build([e]).to_dict()["tensors"][0]
    assert (data["max_abs_error"], data["rmse"]) == ("inf", "inf")
    assert Report.from_dict(json.loads(Report.build([e]).to_json())).tensors[0] == e


# --- 64-bit integers --------------------------------------------------------------------


def test_int64_range_is_exact_and_fits_int64() -> None:
    r = tensor_report("step", torch.tensor([-(2**63), 0, 2**63 - 1]))
    assert (r.min, r.max) == (-(2**63), 2**63 - 1)
    assert isinstance(r.min, int) and isinstance(r.max, int)
    assert (r.int_signed, r.int_bits) == (True, 64)
    # 0 is 2**63 above the minimum, the maximum 2**63 - 1 above 0: no common step.
    assert r.step is None


def test_int64_values_past_2_53_keep_their_differences() -> None:
    r = tensor_report("idx", torch.tensor([2**53, 2**53 + 1, 2**53 + 3]))
    assert (r.distinct, r.min, r.max, r.step) == (3, 2**53, 2**53 + 3, 1)
    assert all(isinstance(v, int) for v in (r.min, r.max, r.step))
    assert (r.int_signed, r.int_bits) == (False, 54)


def test_uint64_range_fits_uint64() -> None:
    r = tensor_report("u64", torch.tensor([0, 2**64 - 1], dtype=torch.uint64))
    assert (r.min, r.max, r.step) == (0, 2**64 - 1, 2**64 - 1)
    assert (r.int_signed, r.int_bits) == (False, 64)


@pytest.mark.parametrize(
    ("dtype", "lo", "hi"),
    [
        (torch.int8, -128, 127),
        (torch.int16, -(2**15), 2**15 - 1),
        (torch.int32, -(2**31), 2**31 - 1),
        (torch.uint32, 0, 2**32 - 1),
    ],
    ids=str,
)
def test_integer_ends_are_python_ints(dtype: torch.dtype, lo: int, hi: int) -> None:
    r = tensor_report("w", torch.tensor([lo, hi, lo]).to(dtype))
    assert (r.min, r.max, r.step) == (lo, hi, hi - lo)
    assert all(type(v) is int for v in (r.min, r.max, r.step))
    assert r.int_bits == dtype.itemsize * 8


def test_integer_grid_off_the_smallest_gap_has_no_step() -> None:
    assert tensor_report("w", torch.tensor([0, 2, 5])).step is None
    assert tensor_report("w", torch.tensor([0, 2, 6])).step == 2


def test_full_range_int64_is_within_a_signed_64_bit_limit() -> None:
    e = tensor_report("step", torch.tensor([-(2**63), 2**63 - 1]), family="counters")
    assert Report.build([e], limits={"counters": (True, 64)}).ok
    u = tensor_report("u", torch.tensor([0, 2**64 - 1], dtype=torch.uint64), family="counters")
    assert Report.build([u], limits={"counters": (False, 64)}).ok
    assert not Report.build([u], limits={"counters": (True, 64)}).ok


def test_integer_tensors_are_exact_in_json() -> None:
    entries = [
        tensor_report("step", torch.tensor([-(2**63), 0, 2**63 - 1])),
        tensor_report("idx", torch.tensor([2**53, 2**53 + 1])),
        tensor_report("u64", torch.tensor([0, 2**64 - 1], dtype=torch.uint64)),
    ]
    report = Report.build(entries)
    text = report.to_json()
    assert '"min": -9223372036854775808' in text
    assert '"max": 9007199254740993' in text
    assert '"max": 18446744073709551615' in text
    back = Report.from_dict(json.loads(text))
    assert back == report
    assert [type(t.step) for t in back.tensors] == [type(None), int, int]


def test_from_dict_refuses_a_fraction_for_an_integer_tensor() -> None:
    data = Report.build([tensor_report("idx", torch.tensor([0, 2]))]).to_dict()
    data["tensors"][0]["step"] = 0.5
    with pytest.raises(ConfigError, match=r"tensors\[0\]\.step: expected an integer or null"):
        Report.from_dict(data)


# --- totals and families --------------------------------------------------------------


def _entries() -> list[TensorReport]:
    return [
        tensor_report(
            "a.weight",
            torch.tensor([-1.0, 0.0, 1.0, 1.0]),
            family="weights",
            transform="stochastic_rounding(num_levels=3)",
        ),
        tensor_report(
            "a.bias", torch.tensor([0.5, 0.25]), family="biases", transform="dropout(p=0.5)"
        ),
        tensor_report("n.weight", torch.ones(8, dtype=torch.float16), family="norms"),
        tensor_report("step", torch.tensor([3], dtype=torch.int64)),
        tensor_report("b.weight", torch.zeros(6), family="weights", transform="identity()"),
    ]


def test_quantised_means_a_transform_other_than_identity_or_dropout() -> None:
    assert [e.quantised for e in _entries()] == [True, False, False, False, False]


def test_totals_count_parameters_and_sizes() -> None:
    t = Report.build(_entries()).totals
    assert (t.tensors, t.parameters, t.quantised_parameters) == (5, 21, 4)
    assert t.quantised_share == pytest.approx(4 / 21)
    # Floating tensors count at 32 bits; the int64 counter stays at its own 64.
    assert t.float32_bits == 20 * 32 + 64
    # 4 x 2 bits + 2 float32 + 8 float16 + 1 int64 + 6 float32.
    assert t.reported_bits == 4 * 2 + 2 * 32 + 8 * 16 + 64 + 6 * 32
    assert t.ratio == pytest.approx(704 / 456)


def test_totals_count_a_complex_element_as_two_values() -> None:
    # Built by hand, as Report.from_dict does: parts -1, 0, 1 in 2 bits each.
    z = TensorReport(
        name="z",
        family=None,
        shape=(4,),
        dtype="complex64",
        numel=4,
        transform="int_quant()",
        distinct=3,
        bits_needed=2,
        min=-1.0,
        max=1.0,
        step=1.0,
        on_integer_grid=True,
        int_signed=True,
        int_bits=2,
        nonfinite=0,
    )
    t = Totals.of([z])
    assert (t.parameters, t.float32_bits, t.reported_bits) == (4, 4 * 64, 4 * 2 * 2)
    wide = Totals.of([tensor_report("z", torch.zeros(2, dtype=torch.complex128))])
    assert (wide.float32_bits, wide.reported_bits) == (2 * 64, 2 * 128)


def test_family_totals_are_sorted_with_no_family_last() -> None:
    families = Report.build(_entries()).families
    assert list(families) == ["biases", "norms", "weights", None]
    assert families["weights"] == Totals(2, 10, 4, 320, 8 + 192)
    assert families[None].parameters == 1


def test_empty_report_has_no_ratio() -> None:
    r = Report.build([])
    assert (r.totals.parameters, r.totals.quantised_share, r.totals.ratio) == (0, 0.0, None)
    assert r.ok


def test_duplicate_tensor_names_are_refused() -> None:
    e = tensor_report("w", torch.zeros(1))
    with pytest.raises(ValueError, match="'w' is reported twice"):
        Report.build([e, e])


def test_describe_transform_formats_arguments() -> None:
    text = describe_transform("stochastic_rounding", {"num_levels": 16, "output_range": (-1, 1)})
    assert text == "stochastic_rounding(num_levels=16, output_range=(-1, 1))"


# --- hardware limits ------------------------------------------------------------------


def _limited(values: list[float], limit: tuple[bool, int]) -> Report:
    entry = tensor_report("w", torch.tensor(values), family="weights", transform="int_quant()")
    other = tensor_report("x", torch.tensor([0.5, 1e9]), family="other")
    return Report.build([entry, other], limits={"weights": limit})


def test_tensor_within_its_limit_passes() -> None:
    r = _limited([-128.0, 0.0, 127.0], (True, 8))
    assert r.ok
    assert r.violations == ()


def test_non_integer_values_violate() -> None:
    r = _limited([0.0, 0.5], (True, 8))
    assert not r.ok
    assert r.violations == (
        Violation(
            "w",
            "weights",
            "expected integers for signed 8-bit [-128, 127], found non-integer values (step 0.5)",
        ),
    )


@pytest.mark.parametrize(
    ("values", "limit", "found"),
    [
        ([-129.0, 0.0], (True, 8), "range [-129, 0]"),
        ([0.0, 128.0], (True, 8), "range [0, 128]"),
        ([-1.0, 3.0], (False, 4), "range [-1, 3]"),
        ([0.0, 16.0], (False, 4), "range [0, 16]"),
    ],
)
def test_range_outside_the_limit_violates(
    values: list[float], limit: tuple[bool, int], found: str
) -> None:
    (violation,) = _limited(values, limit).violations
    assert violation.reason.endswith(f"found {found}")
    assert str(violation).startswith("w: expected integers for ")


def test_non_finite_values_violate() -> None:
    reasons = [v.reason for v in _limited([1.0, math.inf], (False, 2)).violations]
    assert reasons == ["expected integers for unsigned 2-bit [0, 3], found 1 non-finite values"]


def test_families_without_a_limit_are_not_checked() -> None:
    r = _limited([1.0], (False, 1))
    assert [v.name for v in r.violations] == []
    assert r.limits == {"weights": (False, 1)}


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ((True, 0), r"limits\.weights: expected bits as an integer >= 1, got 0"),
        (("yes", 8), r"limits\.weights: expected signed as true or false, got 'yes'"),
        ((True,), r"limits\.weights: expected \(signed, bits\)"),
        ((True, 8.0), r"expected bits as an integer >= 1, got 8\.0"),
    ],
)
def test_bad_limits_are_config_errors(limit: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Report.build([], limits={"weights": limit})  # type: ignore[dict-item]


def test_meta_must_be_json_safe() -> None:
    with pytest.raises(ConfigError, match=r"^meta: expected JSON-safe values"):
        Report.build([], meta={"seed": math.nan})
    with pytest.raises(ConfigError, match=r"^meta: "):
        Report.build([], meta={"net": torch.zeros(1)})


# --- encodings ------------------------------------------------------------------------


def _small_report() -> Report:
    """A fixed report whose numbers are exact in binary, for the golden file."""
    entries = [
        tensor_report(
            "layers.0.weight",
            torch.tensor([[-0.5, 0.0, 0.5], [0.5, 0.0, -0.5]]),
            family="weights",
            transform="stochastic_rounding(num_levels=3)",
            reference=torch.tensor([[-0.5, 0.25, 0.5], [0.5, 0.0, -0.75]]),
        ),
        tensor_report(
            "layers.0.bias",
            torch.tensor([1.0, -2.0, 3.0]),
            family="biases",
            transform="int_quant(n_bits=3)",
            reference=torch.tensor([1.0, -2.0, 3.0]),
        ),
        tensor_report("norm.weight", torch.tensor([1.0, 1.5], dtype=torch.float16), family="norms"),
        tensor_report("counter", torch.arange(4)),
    ]
    meta = {
        "rockq_version": "0.1.0",
        "recipe": "int4-weights",
        "seed": 0,
        "input_sha256": "0" * 64,
    }
    return Report.build(entries, limits={"weights": (True, 4), "biases": (True, 2)}, meta=meta)


def test_small_report_matches_golden_json() -> None:
    path = GOLDEN / "report_small.json"
    text = _small_report().to_json() + "\n"
    if os.environ.get("ROCKQ_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == text


def test_to_dict_keys_are_stable_and_infinities_are_strings() -> None:
    data = _small_report().to_dict()
    assert list(data) == [
        "format",
        "meta",
        "totals",
        "families",
        "limits",
        "ok",
        "violations",
        "tensors",
    ]
    assert data["format"] == FORMAT
    assert data["tensors"][1]["sqnr_db"] == "inf"
    assert data["families"][-1]["family"] is None
    assert data["limits"] == {
        "weights": {"signed": True, "bits": 4},
        "biases": {"signed": True, "bits": 2},
    }
    json.dumps(data, allow_nan=False)  # strict JSON: would raise on a float inf


def test_report_round_trips_through_json() -> None:
    report = _small_report()
    assert Report.from_dict(json.loads(report.to_json())) == report


def test_minus_infinity_round_trips() -> None:
    e = tensor_report("w", torch.tensor([1.0]), reference=torch.zeros(1))
    report = Report.build([e])
    assert report.to_dict()["tensors"][0]["sqnr_db"] == "-inf"
    assert Report.from_dict(json.loads(report.to_json())) == report


def test_from_dict_refuses_other_formats() -> None:
    with pytest.raises(ConfigError, match=r"^format: expected format 'rockq-report/1', found None"):
        Report.from_dict({"tensors": []})


def test_from_dict_names_the_bad_key() -> None:
    data = _small_report().to_dict()
    data["tensors"][2]["distinc"] = data["tensors"][2].pop("distinct")
    with pytest.raises(
        ConfigError, match=r"tensors\[2\]: unknown key 'distinc' \(did you mean 'distinct'\?\)"
    ):
        Report.from_dict(data)
    data = _small_report().to_dict()
    data["tensors"][0]["rmse"] = "big"
    with pytest.raises(ConfigError, match=r"tensors\[0\]\.rmse: expected a number"):
        Report.from_dict(data)
    data = _small_report().to_dict()
    del data["limits"]["weights"]["bits"]
    with pytest.raises(ConfigError, match=r"limits\.weights: missing key 'bits'"):
        Report.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("distinct", "3", r"tensors\[1\]\.distinct: expected int, got '3'"),
        ("numel", True, r"tensors\[1\]\.numel: expected int, got True"),
        ("family", 7, r"tensors\[1\]\.family: expected str or null, got 7"),
        ("shape", [3.0], r"tensors\[1\]\.shape: expected a list of integers"),
        ("dtype", "float33", r"tensors\[1\]\.dtype: expected a torch dtype name"),
    ],
)
def test_from_dict_checks_field_kinds(field: str, value: object, message: str) -> None:
    data = _small_report().to_dict()
    data["tensors"][1][field] = value
    with pytest.raises(ConfigError, match=message):
        Report.from_dict(data)


def test_markdown_shows_tensors_totals_and_violations() -> None:
    md = _small_report().to_markdown()
    lines = md.splitlines()
    assert lines[0] == "# Quantisation report"
    assert "- recipe: int4-weights" in lines
    row = next(line for line in lines if line.startswith("| layers.0.weight |"))
    assert (
        "| weights | 2×3 | float32 | stochastic_rounding(num_levels=3) | 3 | 2 | [-0.5, 0.5] | 0.5 |"
        in row
    )
    assert "- tensors: 4" in lines
    assert "- parameters: 15 (9 quantised, 60.0%)" in lines
    assert any(
        line.startswith("- **layers.0.bias**: expected integers for signed 2-bit [-2, 1]")
        for line in lines
    )


def test_markdown_escapes_pipes_in_cells() -> None:
    md = Report.build([tensor_report("a|b", torch.zeros(1))]).to_markdown()
    assert "| a\\|b |" in md


def test_markdown_notes_that_complex_tensors_count_their_parts() -> None:
    plain = Report.build([tensor_report("w", torch.zeros(2))]).to_markdown()
    assert "Complex" not in plain
    entries = [tensor_report(f"z{i}", torch.zeros(2, dtype=torch.complex64)) for i in range(4)]
    md = Report.build(entries).to_markdown()
    assert (
        "Complex tensors ('z0', 'z1', 'z2' and 1 more) are described by their real and "
        "imaginary parts" in md
    )
    row = next(line for line in md.splitlines() if line.startswith("| z0 |"))
    assert "| complex64 |" in row


def test_markdown_says_when_all_limits_hold() -> None:
    e = tensor_report("w", torch.tensor([1.0]), family="weights")
    assert (
        "All tensors are within their limits."
        in Report.build([e], limits={"weights": (False, 1)}).to_markdown()
    )


# --- properties -----------------------------------------------------------------------


def _expected_step(ks: list[int]) -> int | None:
    levels = sorted(set(ks))
    gaps = [b - a for a, b in itertools.pairwise(levels)]
    if not gaps:
        return None
    smallest = min(gaps)
    return smallest if all(g % smallest == 0 for g in gaps) else None


_STEPS = st.one_of(
    st.sampled_from([0.1, 0.25, 1.0, 1 / 3, 7.0]),
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=150, deadline=None)
@given(ks=st.lists(st.integers(-1000, 1000), min_size=1, max_size=40), step=_STEPS)
def test_grid_of_integer_multiples_is_recovered_in_float64(ks: list[int], step: float) -> None:
    r = tensor_report("w", torch.tensor(ks, dtype=torch.float64) * step)
    n = len(set(ks))
    assert r.distinct == n
    assert r.bits_needed == math.ceil(math.log2(n))
    expected = _expected_step(ks)
    if expected is None:
        assert r.step is None
    else:
        assert r.step == pytest.approx(expected * step, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    ks=st.lists(st.integers(-300, 300), min_size=1, max_size=40),
    stride=st.integers(1, 5),
    step=_STEPS,
)
def test_grid_of_integer_multiples_is_recovered_in_float32(
    ks: list[int], stride: int, step: float
) -> None:
    # Adjacent levels 0 and stride pin the smallest gap; all gaps are multiples of it.
    levels = [0, stride] + [k * stride for k in ks]
    values = (torch.tensor(levels, dtype=torch.float64) * step).float()
    r = tensor_report("w", values)
    n = len(set(levels))
    assert r.distinct == n
    assert r.bits_needed == math.ceil(math.log2(n))
    assert r.step is not None
    scale = max(abs(k) for k in levels) * step
    assert abs(r.step - stride * step) <= torch.finfo(torch.float32).eps * scale


def test_expected_step_helper_agrees_with_gcd() -> None:
    # The property tests' oracle: a grid exists exactly when the gcd equals the smallest gap.
    for ks in ([0, 2, 4], [0, 2, 5], [3, 9, 12], [1]):
        levels = sorted(set(ks))
        gaps = [b - a for a, b in itertools.pairwise(levels)]
        gcd = reduce(math.gcd, gaps, 0)
        expected = _expected_step(ks)
        assert expected == (gcd if gaps and gcd == min(gaps) else None)


def test_error_statistics_over_several_chunks_match_a_direct_computation() -> None:
    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(3 * (1 << 20) + 17, generator=generator)
    values = torch.round(reference * 8) / 8
    values[5] = float("nan")
    reference[(1 << 20) + 3] = float("inf")
    entry = tensor_report("w", values, reference=reference)
    both = torch.isfinite(values) & torch.isfinite(reference)
    err = (values[both] - reference[both]).double()
    ref = reference[both].double()
    assert entry.max_abs_error == pytest.approx(float(err.abs().max()), rel=1e-12)
    assert entry.rmse == pytest.approx(float(err.square().mean().sqrt()), rel=1e-9)
    sqnr = 10 * math.log10(float(ref.square().sum()) / float(err.square().sum()))
    assert entry.sqnr_db == pytest.approx(sqnr, rel=1e-9)


def _sequential_sums(values: list[float], reference: list[float]) -> tuple[float, float, int]:
    """The error sums' defined order, one addition at a time: lanes of each block row by
    row, blocks one after another per lane, lanes exactly."""
    from transform_core.tensor_report import ERROR_BLOCK, ERROR_LANES

    totals = [[0.0] * ERROR_LANES, [0.0] * ERROR_LANES]
    count = 0
    for start in range(0, len(values), ERROR_BLOCK):
        block = [[0.0] * ERROR_LANES, [0.0] * ERROR_LANES]
        for k in range(start, min(start + ERROR_BLOCK, len(values))):
            err = values[k] - reference[k]
            if not math.isfinite(err):
                continue
            count += 1
            block[0][(k - start) % ERROR_LANES] += err * err
            block[1][(k - start) % ERROR_LANES] += reference[k] * reference[k]
        for total, part in zip(totals, block, strict=True):
            for lane in range(ERROR_LANES):
                total[lane] += part[lane]
    return math.fsum(totals[0]), math.fsum(totals[1]), count


@pytest.mark.parametrize("size", [5, 1030, 70_001])
def test_error_sums_follow_their_defined_order_on_every_path(size: int) -> None:
    from transform_core import kernels

    generator = torch.Generator().manual_seed(size)
    reference = torch.randn(size, generator=generator, dtype=torch.float64) * 1e3
    values = torch.round(reference * 3) / 3
    values[size // 2] = float("nan")
    err_power, ref_power, count = _sequential_sums(values.tolist(), reference.tolist())
    expected = (
        math.sqrt(err_power / count),
        10.0 * math.log10(ref_power / err_power),
    )
    kernels.wait_for_compiled_kernels()  # where Numba is installed, large inputs use it
    for compiled in (True, False):
        with kernels.compiled(compiled):
            entry = tensor_report("w", values, reference=reference)
        assert (entry.rmse, entry.sqnr_db) == expected  # bit for bit


def test_markdown_shows_integer_values_in_full() -> None:
    idx = tensor_report("idx", torch.tensor([2**53, 2**53 + 1]))
    md = Report.build([idx]).to_markdown()
    assert "[9007199254740992, 9007199254740993]" in md
