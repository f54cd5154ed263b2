"""The quantized checkpoint: atomic publication, resume, contents."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.checkpoint.store import CheckpointWriter
from lowbit.errors import LowbitError
from lowbit.quant import preset


class Crash(Exception):
    pass


def _crash_at(monkeypatch, layer: int) -> None:
    original = CheckpointWriter.write_layer

    def write_layer(self, i, weights, quantizers, extra=None):
        if i == layer:
            raise Crash
        original(self, i, weights, quantizers, extra)

    monkeypatch.setattr(CheckpointWriter, "write_layer", write_layer)


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mixtral"])  # plain, Conv1D, MoE experts
def test_crash_leaves_no_complete_looking_output_and_resume_finishes_identically(
    tiny_factory, calib_ids, tmp_path, monkeypatch, model_type
):
    model = tiny_factory(model_type, 3)
    recipe = preset("fp8").with_kv_cache("fp8")
    clean = quantize_checkpoint(model, recipe, tmp_path / "clean", calib_ids, progress=False).output

    out = tmp_path / "run"
    _crash_at(monkeypatch, 2)
    with pytest.raises(Crash):
        quantize_checkpoint(model, recipe, out, calib_ids, progress=False)
    assert not out.exists() and (tmp_path / "run.partial").is_dir()
    monkeypatch.undo()

    with pytest.raises(LowbitError, match="--resume"):
        quantize_checkpoint(model, recipe, out, calib_ids, progress=False)
    with pytest.raises(LowbitError, match="other settings"):
        quantize_checkpoint(model, preset("nvfp4"), out, calib_ids, resume=True, progress=False)
    quantize_checkpoint(model, recipe, out, calib_ids, resume=True, progress=False)
    assert not (tmp_path / "run.partial").exists()
    a, b = _tensors(clean), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptaq_refuses_to_resume_and_keeps_the_partial_output(tiny_llama, calib_ids, tmp_path, monkeypatch):
    """GPTAQ reads the float model's activations, which the finished layers of OUTPUT.partial cannot give
    back: --resume says so and leaves the partial output as it is."""
    recipe = preset("int4_awq").with_algorithm("gptaq")
    out = tmp_path / "run"
    _crash_at(monkeypatch, 1)
    with pytest.raises(Crash):
        quantize_checkpoint(tiny_llama, recipe, out, calib_ids, progress=False)
    monkeypatch.undo()
    before = sorted(p.name for p in (tmp_path / "run.partial").iterdir())
    with pytest.raises(LowbitError, match="--resume cannot rebuild the float model's activations"):
        quantize_checkpoint(tiny_llama, recipe, out, calib_ids, resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "run.partial").iterdir()) == before and not out.exists()


def test_existing_output_needs_overwrite(tiny_llama, calib_ids, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(LowbitError, match="--overwrite"):
        quantize_checkpoint(tiny_llama, preset("int8_wo"), out, calib_ids, progress=False)
    assert (out / "mine.txt").exists()
    quantize_checkpoint(tiny_llama, preset("int8_wo"), out, calib_ids, overwrite=True, progress=False)
    assert not (out / "mine.txt").exists() and (out / "lowbit.json").exists()


@pytest.mark.parametrize(
    ("model_type", "module"),
    [("llama", "model.layers.0.self_attn.q_proj"), ("gpt2", "transformer.h.0.attn.c_attn"),
     ("mixtral", "model.layers.0.mlp.experts.1.w3")],
)  # fmt: skip
def test_contents_are_safetensors_and_json_and_load_as_a_plain_hf_model(
    tiny_factory, calib_ids, tmp_path, model_type, module
):
    src = tiny_factory(model_type, 2)
    out = quantize_checkpoint(src, preset("nvfp4"), tmp_path / "ck", calib_ids, progress=False).output
    suffixes = {p.suffix for p in out.iterdir()}
    assert suffixes <= {".safetensors", ".json", ".jinja"}
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    for (k, a), (_, b) in zip(plain.state_dict().items(), source.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # weights in original precision and layout (max calibration changes none)
    stats = load_file(str(out / "quantizers-layer-00000.safetensors"))
    assert f"{module}.input_quantizer.global_amax" in stats
    assert f"{module}.weight_quantizer.0.amax" in stats
