"""Every model family: a tiny random model goes through quantize -> generate -> export (each format) -> read
back. Each outcome is recorded; `python tools/support_matrix.py` runs this file and writes
docs/support-matrix.md from the records (set LOWBIT_MATRIX_OUT to a JSON-lines file to keep them).

A combination either works (the read-back export computes the checkpoint's logits) or is refused up front
with a one-line error and no output; NO_TRTLLM and FORMAT_REFUSALS list the refusals, so that a combination that
starts or stops working fails here until the lists (and the matrix) say so."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lowbit.cli import main
from lowbit.loader import load_model
from lowbit.quant.recipe import PRESETS as PRESET_NAMES

pytestmark = pytest.mark.slow

FAMILIES = ["llama", "llama3.2", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "starcoder2",
            "falcon", "gpt2", "gpt_bigcode", "mixtral", "qwen2_moe", "qwen3_moe", "nemotron_h", "qwen2_5_vl",
            "qwen3_vl"]  # fmt: skip
LAYERS = {"nemotron_h": 4}  # one block of each kind (Mamba-2, attention, MLP, MoE); else 2
# rows that are a family with another config: Llama 3.1 / 3.2's rope scaling, 3.2's tied embeddings
VARIANTS = {
    "llama3.2": ("llama", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
}  # fmt: skip
PRESETS = [p for p in PRESET_NAMES if p != "no_quant"]
FORMATS = ["hf", "compressed-tensors", "trtllm"]
# families whose TensorRT-LLM tensor names lowbit does not know
NO_TRTLLM = {"gemma2", "gemma3_text", "starcoder2", "falcon", "gpt2", "gpt_bigcode", "phi3", "mixtral", "qwen2_moe",
             "qwen3_moe", "nemotron_h", "qwen2_5_vl", "qwen3_vl"}  # fmt: skip
# (preset, format) -> what the one-line error says: the format has no form for the preset's numerics
FORMAT_REFUSALS = {
    ("mxfp4", "hf"): "the unified HF format has no quant_algo",
    ("w4a8_awq", "compressed-tensors"): "compressed-tensors has no format",
    **{(p, "trtllm"): "has no TensorRT-LLM checkpoint quant_algo"
       for p in ("fp8_pc_pt", "fp8_pb_wo", "nvfp4_wo", "mxfp8", "mxfp4")},
}  # fmt: skip


def expected_refusal(family: str, preset: str, fmt: str) -> str | None:
    if fmt == "trtllm" and family in NO_TRTLLM:
        return "no TensorRT-LLM tensor names"
    return FORMAT_REFUSALS.get((preset, fmt))


def _record(row: dict) -> None:
    out = os.environ.get("LOWBIT_MATRIX_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantize_generate_export_read_back(tiny_factory, text_file, tmp_path, capsys, family, preset):
    model_type, overrides = VARIANTS.get(family, (family, {}))
    src = tiny_factory(model_type, LAYERS.get(family, 2), **overrides)
    ckpt = tmp_path / "q"
    args = ["quantize", "--model", str(src), "--qformat", preset, "--calib-data", str(text_file),
            "--calib-size", "4", "--calib-seq-len", "32", "--output", str(ckpt), "-q"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    manifest = json.loads((ckpt / "lowbit.json").read_text())
    _record({"family": family, "preset": preset, "step": "quantize", "ok": True,
             "algorithm": manifest["algorithm"], "modules": len(manifest["modules"])})  # fmt: skip
    model, _ = load_model(ckpt)
    ids = torch.randint(1, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # type: ignore[operator]
    assert torch.isfinite(logits).all() and generated.shape[1] == 16
    _record({"family": family, "preset": preset, "step": "generate", "ok": True})
    for fmt in FORMATS:
        out = tmp_path / fmt
        capsys.readouterr()
        code = main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out), "-q"])
        err = capsys.readouterr().err.strip()
        expected = expected_refusal(family, preset, fmt)
        if expected is not None:
            assert code == 2 and expected in err and len(err.splitlines()) == 1, err
            assert not out.exists()
            _record(
                {
                    "family": family,
                    "preset": preset,
                    "step": fmt,
                    "ok": False,
                    "why": err.removeprefix("lowbit: error: "),
                }
            )
            continue
        assert code == 0, err
        if fmt != "trtllm":  # lowbit reads hf and compressed-tensors exports back
            exported, _ = load_model(out)
            with torch.no_grad():
                back = exported(ids).logits
            torch.testing.assert_close(back, logits, rtol=0, atol=1e-4 * float(logits.abs().max()))
        _record({"family": family, "preset": preset, "step": fmt, "ok": True})
