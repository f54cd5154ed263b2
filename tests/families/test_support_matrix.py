"""Every model family: a tiny random model goes through quantize -> generate -> export (each format) -> read
back. Each outcome is recorded; `python tools/support_matrix.py` runs this file and writes
docs/support-matrix.md from the records (set LOWBIT_MATRIX_OUT to a JSON-lines file to keep them).

A combination either works (the read-back export computes the checkpoint's logits) or is refused up front
with a one-line error and no output; EXPECTED_REFUSALS lists the refusals, so that a combination that
starts or stops working fails here until the list (and the matrix) says so."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lowbit.checkpoint.load import load_model
from lowbit.cli import main

pytestmark = pytest.mark.slow

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "starcoder2",
            "falcon", "gpt2", "gpt_bigcode", "mixtral", "qwen3_moe", "nemotron_h", "qwen2_5_vl",
            "qwen3_vl"]  # fmt: skip
LAYERS = {"nemotron_h": 4}  # one block of each kind (Mamba-2, attention, MLP, MoE); else 2
PRESETS = ["fp8", "int4_awq", "nvfp4"]
FORMATS = ["hf", "compressed-tensors", "trtllm"]
# (family, format) -> what the one-line error says; every preset
EXPECTED_REFUSALS = {
    ("gemma2", "trtllm"): "use --format hf",
    ("gemma3_text", "trtllm"): "use --format hf",
    ("starcoder2", "trtllm"): "use --format hf",
    ("falcon", "trtllm"): "use --format hf",
    ("gpt_bigcode", "trtllm"): "use --format hf",
    ("gpt2", "trtllm"): "use --format hf",
    ("phi3", "trtllm"): "use --format hf",
    ("mixtral", "trtllm"): "use --format hf",
    ("qwen3_moe", "trtllm"): "use --format hf",
    ("nemotron_h", "trtllm"): "use --format hf",
    ("qwen2_5_vl", "trtllm"): "use --format hf",
    ("qwen3_vl", "trtllm"): "use --format hf",
}


def _record(row: dict) -> None:
    out = os.environ.get("LOWBIT_MATRIX_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantize_generate_export_read_back(tiny_factory, text_file, tmp_path, capsys, family, preset):
    src = tiny_factory(family, LAYERS.get(family, 2))
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
        expected = EXPECTED_REFUSALS.get((family, fmt))
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
