"""Every scale an export writes is, bit for bit, the scale the checkpoint's fake quantizers compute with.

For each preset with static activation statistics and each export format that stores it, every quantized
Linear's exported weight scales and input scale are compared with `formats.quantize` run by the loaded
checkpoint's own quantizers (what `Quantizer.forward` computes). compressed-tensors stores NVFP4 global
scales as reciprocals: their reciprocal must give the quantizer's scale exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.export import export
from lowbit.formats.elements import E4M3, decode
from lowbit.formats.scaled import quantize
from lowbit.loader import load_model
from lowbit.quant import preset
from lowbit.quant.convert import quant_linears
from lowbit.quant.quantizer import Quantizer

STATIC = ("fp8", "int8_sq", "w4a8_awq", "nvfp4", "nvfp4_awq")  # presets whose activations keep statistics
TARGETS = {p: ("hf", "compressed-tensors") for p in STATIC} | {"w4a8_awq": ("hf",)}  # CT has no W4A8 form


@pytest.fixture(scope="module")
def checkpoints(tiny_llama: Path, tokenizer_dir: Path, text_file: Path, tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    from lowbit.data.text import calibration_windows

    calib = calibration_windows(text_file, AutoTokenizer.from_pretrained(tokenizer_dir), 8, 64)
    root = tmp_path_factory.mktemp("scales")
    return {
        name: quantize_checkpoint(tiny_llama, preset(name), root / name, calib, progress=False).output
        for name in STATIC
    }


def _uses(q: Quantizer, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(block scales, global scale) that the quantizer's forward computes on a tensor shaped like `like`."""
    amax = q.amax if q.needs_block_amax else None
    qt = quantize(like.float(), q.fmt, amax=amax, global_amax=q.global_amax, amin=q.amin)
    return qt.scale, qt.global_scale


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(("name", "target"), [(p, t) for p in STATIC for t in TARGETS[p]])
def test_exported_scales_are_the_fake_quantizers_scales(checkpoints, name, target, tmp_path):
    out = export(checkpoints[name], target, tmp_path / "out")
    stored = _tensors(out)
    model, _ = load_model(checkpoints[name])
    checked = 0
    for module, lin in quant_linears(model):
        chain = lin.weight_quantizer.quantizers()
        scale, glob = _uses(chain[0], lin.weight)
        inp = lin.input_quantizer
        assert inp is not None
        in_scale, in_glob = _uses(inp, torch.ones(1, lin.in_features))
        if target == "hf":
            w = stored[f"{module}.weight_scale"]
            got = decode(w, E4M3) if w.dtype == torch.float8_e4m3fn else w.float()
            assert torch.equal(got.reshape(scale.shape), scale), module
            if glob is not None:
                assert torch.equal(stored[f"{module}.weight_scale_2"].reshape(()), glob), module
            if len(chain) > 1:  # W4A8's FP8 level
                level, _ = _uses(chain[1], lin.weight)
                assert torch.equal(stored[f"{module}.weight_scale_2"].reshape(()), level.reshape(())), module
            expected_in = in_glob if in_glob is not None else in_scale
            assert torch.equal(stored[f"{module}.input_scale"].reshape(()), expected_in.reshape(())), module
        else:
            w = stored[f"{module}.weight_scale"]
            got = decode(w, E4M3) if w.dtype == torch.float8_e4m3fn else w.float()
            assert torch.equal(got.reshape(scale.shape), scale), module
            if glob is not None:
                assert torch.equal(1 / stored[f"{module}.weight_global_scale"].reshape(()), glob), module
            if in_glob is not None:
                assert torch.equal(1 / stored[f"{module}.input_global_scale"].reshape(()), in_glob), module
            else:
                assert torch.equal(stored[f"{module}.input_scale"].reshape(()), in_scale.reshape(())), module
        checked += 1
    assert checked == 14  # 2 layers x 7 Linears
    if target == "hf":
        assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]


def test_nvfp4_input_global_scales_are_exact_where_amax_over_6x448_is_not(tmp_path, checkpoints):
    """About 12% of float32 amaxes give an `amax / (6 * 448)` whose fp32 reciprocal does not map back to it;
    the quantizer then raises its global scale by an ulp. Give every input quantizer such an amax."""
    import shutil

    from safetensors.torch import save_file

    ckpt = tmp_path / "nvfp4"
    shutil.copytree(checkpoints["nvfp4"], ckpt)
    candidates = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 30 + 0.1
    naive = candidates / (6 * 448)
    values = iter(candidates[(1 / (1 / naive)) != naive])
    for f in sorted(ckpt.glob("quantizers-*.safetensors")):
        stats = load_file(f)
        for key in stats:
            if key.endswith("input_quantizer.global_amax"):
                stats[key] = next(values).reshape(stats[key].shape)
        save_file(stats, f)
    model, _ = load_model(ckpt)
    for target in ("hf", "compressed-tensors"):
        stored = _tensors(export(ckpt, target, tmp_path / target))
        for module, lin in quant_linears(model):
            assert lin.input_quantizer is not None
            _, g = _uses(lin.input_quantizer, torch.ones(1, lin.in_features))
            assert g is not None
            if target == "hf":
                assert torch.equal(stored[f"{module}.input_scale"].reshape(()), g), module
            else:
                assert torch.equal(1 / stored[f"{module}.input_global_scale"].reshape(()), g), module
