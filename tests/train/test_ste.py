"""Straight-through gradients of fake quantization, and what prepare_qat leaves trainable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.formats.elements import IntElement
from lowbit.formats.scaled import (
    FP8_CHANNEL,
    FP8_TENSOR,
    INT4_G32,
    INT8_CHANNEL,
    MXFP4,
    NVFP4,
    fake_quant,
    global_scale_from_amax,
    reduce_amax,
    scale_from_amax,
    to_blocks,
)
from lowbit.quant.linear import QuantLinear, QuantSpec
from lowbit.quant.qat import prepare_qat, quantizer_parameters

FORMATS = [INT4_G32, INT8_CHANNEL, FP8_TENSOR, FP8_CHANNEL, NVFP4, MXFP4]


def _clip_bounds(x: torch.Tensor, fmt, amax: torch.Tensor, global_amax: torch.Tensor | None):
    """Per element (lo, hi): the representable range, s * g * [qmin, qmax] (from the spec's scale rules)."""
    g = global_scale_from_amax(global_amax) if fmt.global_scale else None
    s = scale_from_amax(amax, fmt, g) * (g if g is not None else 1)
    blocks = to_blocks(torch.zeros_like(x), fmt)
    s = s.reshape(*s.shape, 1).expand(blocks.shape) if fmt.granularity != "tensor" else s.expand(blocks.shape)
    el = fmt.element
    lo, hi = (el.qmin, el.qmax) if isinstance(el, IntElement) else (-el.max_norm, el.max_norm)
    return (s * lo).reshape(x.shape), (s * hi).reshape(x.shape)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_ste_gradient_is_the_float_gradient_inside_the_clipping_range_and_zero_outside(fmt):
    torch.manual_seed(0)
    x = torch.randn(16, 64) * 0.1
    x[0, :5] = torch.tensor([3.0, -3.0, 0.5, -0.5, 2.0])  # beyond the (shrunk) calibrated range below
    amax = reduce_amax(x, fmt) * 0.6 if fmt.scale_element is None or fmt.name == "nvfp4" else None
    global_amax = x.abs().amax() * 0.6 if fmt.global_scale else None
    if (
        amax is None
    ):  # MX: power-of-two scales from the tensor itself; clip with a smaller calibrated block amax
        amax = reduce_amax(x, fmt) / 4
    x.requires_grad_(True)
    upstream = torch.randn(16, 64)
    y = fake_quant(x, fmt, amax=amax, global_amax=global_amax)
    y.backward(upstream)
    lo, hi = _clip_bounds(x.detach(), fmt, amax, global_amax)
    inside = (x.detach() >= lo) & (x.detach() <= hi)
    assert inside.any() and (~inside).any(), "the test must have elements on both sides"
    # float gradient of the identity: upstream; zero where the element saturates
    # (x / s) * s in the chain rule: equal to the float gradient up to one rounding
    torch.testing.assert_close(
        x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)), rtol=1e-6, atol=0
    )
    # and the forward is unchanged by the gradient path
    torch.testing.assert_close(
        y.detach(), fake_quant(x.detach(), fmt, amax=amax, global_amax=global_amax), rtol=0, atol=0
    )


def test_ste_gradient_flows_through_a_quantized_linear_into_the_weight():
    torch.manual_seed(0)
    lin = QuantLinear(nn.Linear(64, 8, bias=False), QuantSpec((INT4_G32,)))
    lin.calibrate_weight()
    with torch.no_grad():
        lin.weight_quantizer[0].amax *= 0.5  # clip the largest half of each group
    lin.train()
    x = torch.randn(4, 64)
    lin(x).sum().backward()
    w = lin.weight.detach()
    s = (lin.weight_quantizer[0].amax / 7).repeat_interleave(32, dim=1)
    inside = (w >= -8 * s) & (w <= 7 * s)
    expected = torch.where(inside, x.sum(0).expand_as(w), torch.zeros_like(w))
    torch.testing.assert_close(lin.weight.grad, expected, rtol=1e-6, atol=1e-6)


def test_frozen_scales_are_buffers_and_learned_scales_get_the_lsq_gradient():
    torch.manual_seed(0)
    lin = QuantLinear(nn.Linear(64, 8, bias=False), QuantSpec((INT8_CHANNEL,), FP8_TENSOR))
    lin.calibrate_weight()
    lin.input_quantizer.amax = torch.tensor(2.0)
    report = prepare_qat(lin)
    assert report.learned == [] and report.frozen == 2 and quantizer_parameters(lin) == []
    assert all(not n.endswith("amax") for n, _ in lin.named_parameters())

    report = prepare_qat(lin, learn_scales=True)
    assert sorted(report.learned) == ["input_quantizer", "weight_quantizer.0"]
    amax = lin.weight_quantizer[0].amax
    assert isinstance(amax, nn.Parameter)
    lin.train()
    lin(torch.randn(4, 64)).sum().backward()
    assert amax.grad is not None and amax.grad.abs().sum() > 0


def test_nvfp4_weights_recompute_their_block_scales_and_keep_the_global_amax():
    torch.manual_seed(0)
    lin = QuantLinear(nn.Linear(64, 8, bias=False), QuantSpec((NVFP4,)))
    lin.calibrate_weight()
    q = lin.weight_quantizer[0]
    global_amax = q.global_amax.clone()
    report = prepare_qat(lin)
    assert report.recomputed == ["weight_quantizer.0"] and q.recompute_blocks
    with torch.no_grad():
        lin.weight.mul_(0.5)  # the stored block amaxes are now twice too large
    lin.train()
    expected = fake_quant(lin.weight.detach(), NVFP4, amax=None, global_amax=global_amax)
    torch.testing.assert_close(lin.quantized_weight().detach(), expected, rtol=0, atol=0)
    assert torch.equal(q.global_amax, global_amax)
