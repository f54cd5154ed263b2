"""The in-place fast paths of the formats equal the out-of-place definitions bit for bit."""

import pytest
import torch

from lowbit.formats.elements import (
    E2M1,
    E4M3,
    E5M2,
    INT4,
    INT8,
    UINT4,
    round_minifloat_reference,
    round_to_grid,
)
from lowbit.formats.scaled import FORMATS, dequantize, fake_quant, quantize, reduce_amax, scale_map


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _sweep() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-39, 3e38])
    return torch.cat(
        [random_bits.to(torch.int32).view(torch.float32), torch.linspace(-600, 600, 100_001), special]
    )


@pytest.mark.parametrize("element", [E4M3, E5M2, E2M1, INT4, INT8, UINT4], ids=lambda e: e.name)
def test_rounding_in_place_equals_out_of_place_and_the_reference(element):
    x = _sweep()
    expected = round_to_grid(x, element)
    in_place = x.clone()
    out = round_to_grid(in_place, element, out=in_place)
    assert out.data_ptr() == in_place.data_ptr()
    assert torch.equal(_bits(out), _bits(expected))
    if element in (E4M3, E5M2, E2M1):
        assert torch.equal(_bits(expected), _bits(round_minifloat_reference(x, element)))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_fake_quant_equals_dequantize_of_quantize(name):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(1)
    for shape in [(256, 256), (3, 40, 256), (130, 300)]:
        if (fmt.granularity == "block" and len(shape) != 2) or shape[-1] % (fmt.group_size or 1):
            continue
        x = torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 4
        x[1] = 0.0
        given = {"amax": reduce_amax(x, fmt) * 0.8} if fmt.symmetric else {}
        if fmt.global_scale:
            given["global_amax"] = x.abs().amax() * 0.9
        for kw in ({}, given):
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                expected = dequantize(quantize(xd, fmt, **kw), dtype)
                assert torch.equal(fake_quant(xd, fmt, **kw), expected), (shape, kw.keys(), dtype)


@pytest.mark.parametrize(
    "name", ["int4_g128", "int4_g128_asym", "nvfp4", "mxfp4", "fp8_tensor", "int8_channel"]
)
def test_scale_map_fake_quant_equals_its_formula(name):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g)
    m = scale_map(w, fmt)
    idx = torch.randperm(256, generator=g)[:5]
    cols = w[:, idx] * 1.1
    s = m.scale[:, idx]
    if m.zero is None:
        expected = round_to_grid(cols / s, fmt.element) * s
    else:
        z = m.zero[:, idx]
        expected = (round_to_grid(cols / s + z, fmt.element) - z) * s
    assert torch.equal(m.fake_quant(cols, idx), expected)
    assert torch.equal(cols, w[:, idx] * 1.1)  # the input is left as it was
