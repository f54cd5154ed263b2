"""The codec table: every row decodes what it encodes, and a new format is a format plus a row."""

from __future__ import annotations

import pytest
import torch

from lowbit.export import codecs
from lowbit.export.codecs import CT, HF, TRTLLM, Codec, Field, codec_for
from lowbit.export.schemes import Scheme
from lowbit.export.source import QLinear
from lowbit.formats.elements import INT8
from lowbit.formats.scaled import FORMATS, ScaledFormat, quantize
from lowbit.formats.scales import Stats, scales
from lowbit.quant.linear import QuantSpec
from lowbit.quant.quantizer import Quantizer


def _qlinear(spec: QuantSpec, seed: int = 0, out_f: int = 64, in_f: int = 256) -> QLinear:
    """A Linear of random weights with max-calibrated weight statistics and a random input amax."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    chain, x = [], w
    for fmt in spec.weight:
        q = Quantizer(fmt)
        q.observe(x)
        chain.append(Stats.of(q.stats()))
        x = q(x)
    inp = Stats()
    if spec.input is not None:
        a = torch.rand((), generator=gen) * 20 + 0.5
        inp = Stats(global_amax=a) if spec.input.global_scale else Stats(amax=a)
    return QLinear("m", spec, w, None, chain, inp)


@pytest.mark.parametrize("row", [*HF, *CT], ids=lambda r: f"{r.target}:{r.name}:{r.key}")
def test_every_row_decodes_what_it_encodes(row: Codec):
    lin = _qlinear(row.formats(128 if row.weight[0].granularity == "group" else None))
    stored = row.encode(lin)
    for suffix, (t, dtype, shape) in stored.items():
        assert t.dtype == dtype and tuple(t.shape) == shape, suffix  # what ExportWriter checks
    chain, inputs = row.decode({k: t for k, (t, _, _) in stored.items()}, lin.spec.weight[0].group_size)
    for got, want in zip(chain, lin.weight_qtensors(), strict=True):
        assert torch.equal(got.values, want.values) and torch.equal(got.scale, want.scale)
        assert (got.global_scale is None) == (want.global_scale is None)
        if want.global_scale is not None:
            assert torch.equal(got.global_scale, want.global_scale)
    if row.input is not None and not (row.input.dynamic and not row.input.global_scale):
        want_in = lin.input_scales()
        assert inputs is not None and want_in is not None
        assert torch.equal(inputs.tensor_scale, want_in.tensor_scale)


@pytest.mark.parametrize("row", TRTLLM, ids=lambda r: r.name)
def test_trtllm_parts_encode_to_the_declared_dtypes(row: Codec):
    lin = _qlinear(row.formats(128))
    for f in row.fields:
        t, axes, enc = row.parts(lin)[f.suffix]
        assert len(axes) == t.dim() and enc(t).dtype == f.encoding.dtype, f.suffix


def test_a_scheme_without_a_row_has_none():
    assert codec_for("hf", Scheme(("mxfp4",), "mxfp4_dynamic", None)) is None
    assert codec_for("compressed-tensors", Scheme(("int4_group", "fp8_tensor"), "fp8_tensor", 128)) is None


def test_a_new_format_is_a_format_and_a_codec_row(monkeypatch, tiny_llama, calib_ids, tmp_path):
    """INT8 weights in groups of 64 (no preset has them): the format and one compressed-tensors row are all
    it takes for a checkpoint to quantize, export, and read back to the same logits. The row's config
    entry (QuantizationArgs) and the reader's format lookup come from the format itself."""
    from lowbit.algorithms.layerwise import quantize_checkpoint
    from lowbit.export import export
    from lowbit.loader import load_model
    from lowbit.quant.recipe import Recipe, Rule

    int8_g64 = ScaledFormat("int8_g64", INT8, "group", group_size=64)
    monkeypatch.setitem(FORMATS, "int8_g64", int8_g64)
    row = Codec(
        "compressed-tensors", "pack-quantized", (int8_g64,), None,
        (Field("weight_packed", "values", codecs._words(8), codecs._words_shape(8)), *codecs._CT_PACKED),
    )  # fmt: skip
    monkeypatch.setitem(codecs.ROWS, "compressed-tensors", (*CT, row))
    recipe = Recipe("int8_g64", (Rule("*", QuantSpec((int8_g64,))),))
    ckpt = quantize_checkpoint(tiny_llama, recipe, tmp_path / "ckpt", calib_ids[:4], progress=False).output
    out = export(ckpt, "compressed-tensors", tmp_path / "ct")
    quantized, _ = load_model(ckpt)
    back, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(quantized(calib_ids[:2]).logits, back(calib_ids[:2]).logits)


def test_exported_input_scales_come_from_the_quantizers_formula():
    """hf NVFP4's input_scale is the quantizer's reciprocal-exact global scale, not amax / (6 * 448)."""
    row = next(c for c in HF if c.name == "NVFP4")
    for seed in range(50):
        lin = _qlinear(row.formats(None), seed)
        fmt = lin.spec.input
        assert fmt is not None
        want = quantize(torch.ones(1, 16), fmt, global_amax=lin.input_stats.global_amax).global_scale
        assert torch.equal(row.encode(lin)["input_scale"][0], want)
        assert torch.equal(scales(fmt, lin.input_stats).tensor_scale, want)
