"""Golden exports: a fixed tiny model (weights drawn from a seeded generator) quantized with data-free recipes
and exported per format must reproduce the committed bytes (sha256 of every tensor and JSON file).

Regenerate after an intended format change with `LOWBIT_UPDATE_GOLDEN=1 python -m pytest tests/export/test_golden.py`
and review the diff of tests/export/golden/.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowbit.algorithms.calibrate import needs_data
from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.export import ExportOptions, export
from lowbit.quant import preset

GOLDEN = Path(__file__).parent / "golden"
CASES = {  # name -> (preset, export format, export options)
    "hf-int4_awq": ("int4_awq", "hf", {}),
    "hf-nvfp4_wo": ("nvfp4_wo", "hf", {}),
    "hf-fp8_pb_wo": ("fp8_pb_wo", "hf", {}),
    "hf-int8_wo": ("int8_wo", "hf", {}),
    "ct-int4_awq": ("int4_awq", "compressed-tensors", {}),
    "ct-nvfp4_wo": ("nvfp4_wo", "compressed-tensors", {}),
    "ct-mxfp4": ("mxfp4", "compressed-tensors", {}),
    "trtllm-int4_awq-tp2": ("int4_awq", "trtllm", {"tp": 2}),
    "trtllm-no_quant-tp2": ("no_quant", "trtllm", {"tp": 2}),
}


@pytest.fixture(scope="module")
def fixed_model(tmp_path_factory) -> Path:
    """A 1-layer Llama whose weights come from a seeded generator, not from transformers' initialisation."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=1, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False,
        dtype="bfloat16",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(20261123)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("golden") / "model"
    model.save_pretrained(out)
    return out


def digest(directory: Path) -> dict[str, object]:
    """sha256 of every tensor (dtype, shape, bytes) and of every JSON file (without version stamps)."""
    tensors: dict[str, list[object]] = {}
    files: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    t = f.get_tensor(key)
                    raw = t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
                    sha = hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]
                    tensors[f"{path.name}:{key}"] = [str(t.dtype), list(t.shape), sha]
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            data.pop("transformers_version", None)
            for section in (data, data.get("quantization_config") or {}, data.get("quantization") or {}):
                if isinstance(section, dict):
                    section.pop("producer", None)
            files[path.name] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
        else:
            files[path.name] = "present"
    return {"files": files, "tensors": tensors}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_golden(fixed_model, tmp_path, case):
    name, fmt, options = CASES[case]
    source = fixed_model
    if name != "no_quant":
        calib = torch.zeros(1, 8, dtype=torch.long)  # data-free recipes never run it
        recipe = preset(name)
        if needs_data(recipe.algorithm):  # AWQ's search would make the bytes depend on transformers' numerics
            recipe = recipe.with_algorithm("max")
        source = quantize_checkpoint(fixed_model, recipe, tmp_path / "ckpt", calib, progress=False).output
    out = export(source, fmt, tmp_path / "out", ExportOptions(progress=False, **options))
    got = digest(out)
    golden = GOLDEN / f"{case}.json"
    if os.environ.get("LOWBIT_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    expected = json.loads(golden.read_text())
    changed = sorted(k for k in set(expected["tensors"]) | set(got["tensors"])
                     if expected["tensors"].get(k) != got["tensors"].get(k))  # fmt: skip
    assert not changed, f"{len(changed)} tensors differ from the golden export, e.g. {changed[:5]}"
    assert got["files"] == expected["files"]
