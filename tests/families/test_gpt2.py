"""GPT-2: its Conv1D layers (weight stored (in, out)) are quantized as Linears, stored back in the checkpoint's
layout, smoothed into its LayerNorms, exported as Linears and read back."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.cli import main
from lowbit.loader import load_model
from lowbit.models.conv1d import conv1d_names, linearize
from lowbit.quant.linear import QuantLinear

pytestmark = pytest.mark.slow

IDS = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(2))


def test_linearized_conv1d_computes_the_same(tiny_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("gpt2", 2), dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(IDS).logits
        names = linearize(model)
        after = model(IDS).logits
    assert len(names) == 8 and not conv1d_names(model)  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_gpt2_awq_quantizes_every_conv1d_and_keeps_the_checkpoint_layout(tiny_factory, text_file, tmp_path):
    src = tiny_factory("gpt2", 2)
    ckpt = tmp_path / "q"
    args = ["quantize", "--model", str(src), "--qformat", "int4_awq", "--calib-data", str(text_file),
            "--calib-size", "8", "--calib-seq-len", "32", "--output", str(ckpt), "-q"]  # fmt: skip
    assert main(args) == 0
    manifest = json.loads((ckpt / "lowbit.json").read_text())
    assert manifest["algorithm"] == "awq_full" and len(manifest["modules"]) == 8
    # the smoothed float weights, in GPT-2's own layout, compute the original model up to BF16 rounding
    smoothed = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert not torch.equal(smoothed.transformer.h[0].ln_1.weight, original.transformer.h[0].ln_1.weight)
    with torch.no_grad():
        a, b = smoothed(IDS).logits, original(IDS).logits
    assert float((a - b).abs().max()) < 0.02 * float(b.abs().max())
    quantized, _ = load_model(ckpt)
    linear = quantized.transformer.h[0].attn.c_attn
    assert isinstance(linear, QuantLinear)
    torch.testing.assert_close(linear.weight.t(), smoothed.transformer.h[0].attn.c_attn.weight, rtol=0, atol=0)
    errors = manifest["errors"]["transformer.h.0.mlp.c_fc"]
    assert errors["after"] < errors["before"]
