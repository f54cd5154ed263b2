"""Quantizer statistics, QuantLinear, and the in-memory quantize() API."""

import torch
from torch import nn

from lowbit.algorithms.whole_model import quantize
from lowbit.formats.scaled import FP8_TENSOR, INT4_G128, NVFP4, NVFP4_DYNAMIC, fake_quant
from lowbit.quant import Quantizer, QuantLinear, QuantSpec, preset
from lowbit.quant.convert import calibrate_max


def test_quantizer_keeps_running_max_and_quantizes_with_it():
    q = Quantizer(FP8_TENSOR)
    q.calibrating = True
    q(torch.tensor([1.0, -3.0]))
    q(torch.tensor([2.0]))
    q.calibrating = False
    assert q.amax.item() == 3.0
    x = torch.tensor([5.0, 0.3])
    assert torch.equal(q(x), fake_quant(x, FP8_TENSOR, amax=torch.tensor(3.0)))


def test_nvfp4_activation_keeps_global_amax_static_and_blocks_dynamic():
    q = Quantizer(NVFP4_DYNAMIC)
    q.calibrating = True
    q(torch.randn(4, 32) * 2)
    q.calibrating = False
    assert q.amax is None and q.global_amax is not None
    x = torch.randn(4, 32)
    assert torch.equal(q(x), fake_quant(x, NVFP4_DYNAMIC, global_amax=q.global_amax))


def test_quant_linear_shares_parameters_and_matches_fake_quant():
    lin = nn.Linear(256, 64, bias=True)
    ql = QuantLinear(lin, QuantSpec((INT4_G128,), FP8_TENSOR))
    assert ql.weight is lin.weight and ql.bias is lin.bias
    x = torch.randn(3, 256)
    calibrate_max(ql, lambda m: m(x))
    expected = nn.functional.linear(
        fake_quant(x, FP8_TENSOR, amax=x.abs().amax()), fake_quant(lin.weight, INT4_G128), lin.bias
    )
    assert torch.equal(ql(x), expected)
    with torch.no_grad():
        lin.weight.mul_(2)  # the cached quantized weight follows the weight
    ql.calibrate_weight()
    assert torch.equal(ql.quantized_weight(), fake_quant(lin.weight, INT4_G128))


def test_in_memory_quantize_api_on_tiny_model(tiny_llama, calib_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    base = model(calib_ids[:2]).logits
    specs = quantize(model, preset("nvfp4").with_kv_cache("fp8"), lambda m: m(calib_ids[:8]))
    assert len(specs) == 2 * 7 and all(s.weight == (NVFP4,) for s in specs.values())
    attn = model.model.layers[0].self_attn
    assert attn.k_quantizer.amax is not None and attn.v_quantizer.amax is not None
    out = model(calib_ids[:2]).logits
    assert not torch.equal(out, base) and torch.isfinite(out).all()


def test_bake_keeps_the_output_and_frees_the_float_weight():
    lin = nn.Linear(256, 64)
    ql = QuantLinear(lin, QuantSpec((INT4_G128,)))
    calibrate_max(ql, None)
    x = torch.randn(3, 256)
    before = ql(x)
    ql.bake()
    assert torch.equal(ql(x), before) and torch.equal(ql.weight, fake_quant(ql.weight, INT4_G128))
    assert ql._qweight is None
