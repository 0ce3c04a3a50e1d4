"""The tests' own tolerances (helpers.py) near zero: below a half-precision dtype's smallest normal
number the spacing of representable values stops shrinking (subnormals), so a bound in ulps must use
that spacing, or a kernel output that rounded correctly to a subnormal would fail (or a wrong one pass)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rounded, rounding_ulps, ulp

# dtype: (smallest normal, spacing of its subnormals)
SUBNORMAL = {torch.float16: (2.0**-14, 2.0**-24), torch.bfloat16: (2.0**-126, 2.0**-133)}


@pytest.mark.parametrize("dtype", list(SUBNORMAL), ids=["fp16", "bf16"])
def test_ulp_is_the_subnormal_spacing_below_the_smallest_normal(dtype: torch.dtype) -> None:
    normal, spacing = SUBNORMAL[dtype]
    values = torch.tensor([normal / 3, normal / 1000, spacing, 0.0], dtype=torch.float64)
    assert torch.equal(ulp(values, dtype), torch.full_like(values, spacing))
    # from the smallest normal on, the spacing grows with the exponent again
    mantissa = {torch.float16: 11, torch.bfloat16: 8}[dtype]
    assert ulp(torch.tensor([normal * 4], dtype=torch.float64), dtype).item() == normal * 4 * 2.0 ** (1 - mantissa)


@pytest.mark.parametrize("dtype", list(SUBNORMAL), ids=["fp16", "bf16"])
def test_rounding_to_a_subnormal_passes_and_a_wrong_subnormal_fails(dtype: torch.dtype) -> None:
    normal, spacing = SUBNORMAL[dtype]
    expected = torch.tensor([normal / 7, -normal / 13, 2.5 * spacing], dtype=torch.float64)
    rounded = expected.to(dtype)  # what a kernel that rounds correctly stores
    assert ((rounded.double() - expected).abs() > 0).any()  # the values do round
    assert_rounded(rounded, expected, rtol=0.0)
    wrong = (expected + 2 * rounding_ulps() * spacing + spacing).to(dtype)
    with pytest.raises(AssertionError):
        assert_rounded(wrong, expected, rtol=0.0)
