"""The CLI's input checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cli.inputs import check_finite
from transform_core.errors import CheckpointError


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_the_tensor_and_the_count(dtype: torch.dtype, bad: float) -> None:
    tensor = torch.ones(1000, dtype=dtype)
    tensor[[3, 500]] = bad
    with pytest.raises(CheckpointError, match=r"model\.pt.*fc\.weight.*2 NaN or Inf"):
        check_finite([("ok", torch.ones(3)), ("fc.weight", tensor)], Path("model.pt"))


def test_check_finite_passes_finite_values_whose_sum_overflows() -> None:
    huge = torch.full((4,), 1e308, dtype=torch.float64)
    check_finite([("w", huge), ("steps", torch.arange(3)), ("empty", torch.zeros(0))], Path("m"))


def test_check_finite_catches_infinities_that_cancel_in_a_sum() -> None:
    with pytest.raises(CheckpointError, match="2 NaN or Inf"):
        check_finite([("w", torch.tensor([math.inf, -math.inf, 1.0]))], Path("m"))
