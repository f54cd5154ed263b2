"""Every code of every element format, checked against torch's own dtypes and the spec's tables."""

import pytest
import torch

from lowbit.formats.elements import (
    E2M1,
    E2M1_VALUES,
    E4M3,
    E5M2,
    INT4,
    INT8,
    UINT4,
    decode,
    decode_e8m0,
    encode,
    encode_e8m0,
    round_minifloat_reference,
    round_to_grid,
)

FP8 = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)]


@pytest.mark.parametrize(("element", "dtype"), FP8)
def test_fp8_decode_every_code_matches_torch(element, dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    ours, ref = decode(codes, element), codes.float()
    finite = torch.isfinite(ref)
    assert torch.equal(ours[finite], ref[finite])
    assert torch.equal(encode(ours[finite], element).view(torch.uint8), codes.view(torch.uint8)[finite])


@pytest.mark.parametrize(("element", "dtype"), FP8)
def test_fp8_rounding_matches_torch_cast_at_every_midpoint(element, dtype):
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties: round half to even
    x = torch.cat(
        [
            grid,
            mids,
            torch.nextafter(mids, grid[1:]),
            torch.nextafter(mids, grid[:-1]),
            torch.randn(10000) * element.max_norm / 4,
        ]
    )
    x = x.clamp(-element.max_norm, element.max_norm)
    assert torch.equal(round_to_grid(x, element), x.to(dtype).float())


def test_fp8_saturates_instead_of_nan():
    x = torch.tensor([1e6, -1e6, 449.0, 464.0, 480.0])
    assert round_to_grid(x, E4M3).abs().max() == 448
    assert round_to_grid(torch.tensor([1e9]), E5M2).item() == 57344


def test_e2m1_every_code_matches_spec_table():
    codes = torch.arange(16, dtype=torch.uint8)
    values = decode(codes, E2M1)
    expected = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    assert torch.equal(values, expected)
    assert torch.equal(encode(values, E2M1), codes)  # -0.0 keeps its sign bit (code 8)


def test_e2m1_rounding_boundaries_ties_to_even_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, 0.2500001, 0.7499999, 4.9999])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.5, 0.5, 4.0])
    assert torch.equal(round_to_grid(x, E2M1), expected)
    assert torch.equal(round_to_grid(-x, E2M1), -expected)


def test_e2m1_rounding_is_nearest_on_dense_sweep():
    x = torch.linspace(-7, 7, 100001)
    grid = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES[1:]))
    q = round_to_grid(x, E2M1)
    best = (x[:, None] - grid[None]).abs().min(1).values
    assert torch.all((x - q).abs() <= best + 1e-7)


def test_e8m0_every_code():
    codes = torch.arange(256, dtype=torch.uint8)
    values = decode_e8m0(codes)
    assert torch.isnan(values[255])
    assert torch.equal(values[:255], torch.exp2(torch.arange(255, dtype=torch.float32) - 127))
    assert torch.equal(encode_e8m0(values[:255]), codes[:255])


@pytest.mark.parametrize("element", [INT8, INT4, UINT4])
def test_int_round_half_even_and_clamp(element):
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1e4, -1e4])
    q = round_to_grid(x, element)
    assert torch.equal(
        q[:5].clamp(element.qmin, element.qmax),
        torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0]).clamp(element.qmin, element.qmax),
    )
    assert q[5] == element.qmax and q[6] == element.qmin
    codes = torch.arange(element.qmin, element.qmax + 1).float()
    assert torch.equal(decode(encode(codes, element), element), codes)


@pytest.mark.parametrize("element", [E4M3, E5M2, E2M1])
def test_fast_rounding_equals_reference_at_every_midpoint_and_on_a_sweep(element):
    grid = torch.tensor(
        sorted(
            {
                float(v)
                for v in decode(
                    torch.arange(2**element.bits, dtype=torch.uint8).view(element.torch_dtype or torch.uint8),
                    element,
                )
                if abs(float(v)) < float("inf")
            }
        )
    )
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat(
        [
            grid,
            mids,
            torch.nextafter(mids, grid[1:]),
            torch.nextafter(mids, grid[:-1]),
            torch.linspace(-2 * element.max_norm, 2 * element.max_norm, 200001),
            torch.zeros(1),
            -torch.zeros(1),
        ]
    )
    assert torch.equal(round_to_grid(x, element), round_minifloat_reference(x, element))


@pytest.mark.parametrize("element", [E4M3, E5M2, E2M1])
def test_minifloat_rounding_saturates_infinities_keeps_nan_and_flushes_tiny_values(element):
    x = torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, 1e-45, -1e-45, 1e-39])
    m = element.max_norm
    assert torch.equal(round_to_grid(x, element), torch.tensor([m, -m, m, -m, 0.0, -0.0, 0.0]))
    assert torch.signbit(round_to_grid(x, element)[5])
    assert torch.isnan(round_to_grid(torch.tensor([float("nan")]), element)).all()
    assert torch.equal(round_to_grid(x, element), round_minifloat_reference(x, element))


def test_fp8_rounding_passes_gradients_straight_through_as_the_cast_does():
    s = torch.tensor([0.3, 1.7, 500.0], requires_grad=True)
    q = round_to_grid(s, E4M3)
    q.sum().backward()
    assert torch.equal(q.detach(), round_to_grid(s.detach(), E4M3))
    assert torch.equal(s.grad, torch.tensor([1.0, 1.0, 0.0]))  # saturated: no gradient, as clamp gives
