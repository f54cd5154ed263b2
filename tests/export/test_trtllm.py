"""TensorRT-LLM checkpoint export: the tensor-parallel split reassembles to tp=1 exactly, pipeline stages hold the
right layers, config.json follows spec §7, and bad inputs give one-line errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.errors import LowbitError
from lowbit.export.api import ExportOptions
from lowbit.export.source import Source
from lowbit.export.trtllm import Parts, codec, export_trtllm, split_parts
from lowbit.export.writer import ExportWriter
from lowbit.formats.elements import E2M1, decode
from lowbit.formats.packing import unpack_nibbles
from lowbit.formats.scaled import MXFP4, MXFP4_DYNAMIC
from lowbit.quant import preset
from lowbit.quant.linear import QuantSpec

# Big enough that int4 groups of 128 and NVFP4 blocks of 16 split across 4 ranks on both parallel styles.
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN = 8, 4, 64, 512, 1024
SHAPE = dict(
    hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
    head_dim=HEAD_DIM,
)  # fmt: skip
COLUMN = ("attention.qkv.", "mlp.fc.", "mlp.gate.")
ROW = ("attention.dense.", "mlp.proj.")


@pytest.fixture(scope="module")
def checkpoints(tiny_factory, tmp_path_factory, tokenizer_dir, text_file) -> dict[str, Path]:
    """The plain tiny model and three quantized checkpoints of it, made once for the module."""
    from transformers import AutoTokenizer

    from lowbit.data.text import calibration_windows

    model = tiny_factory("llama", 2, **SHAPE)
    calib = calibration_windows(text_file, AutoTokenizer.from_pretrained(tokenizer_dir), 4, 32)
    root = tmp_path_factory.mktemp("trtllm-ckpt")
    recipes = {
        "fp8": preset("fp8").with_kv_cache("fp8"),
        "int4_awq": preset("int4_awq").with_algorithm("max"),
        "nvfp4": preset("nvfp4"),
    }
    out = {"no_quant": model}
    for name, recipe in recipes.items():
        out[name] = quantize_checkpoint(model, recipe, root / name, calib, progress=False).output
    return out


def export(src: Path, out: Path, **options) -> Path:
    with ExportWriter(out) as writer:
        export_trtllm(Source(src), writer, ExportOptions(**options))
        return writer.finish()


def ranks(out: Path) -> list[dict[str, torch.Tensor]]:
    n = json.loads((out / "config.json").read_text())["mapping"]["world_size"]
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == sorted(
        f"rank{i}.safetensors" for i in range(n)
    )
    return [load_file(str(out / f"rank{i}.safetensors")) for i in range(n)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def gather(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The tp=1 tensor from its rank shards, by spec §7's rules."""
    if (shards[0].dim() == 1 and shards[0].numel() == 1) or "layernorm" in name or "ln_f" in name:
        return shards[0]  # per-tensor scales and norms: replicated
    if "qkv" in name:  # q, k, v each split then concatenated per rank
        n = shards[0].shape[0]
        q = n * HEADS // (HEADS + 2 * KV_HEADS)
        k = (n - q) // 2
        parts = [s.split([q, k, k]) for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts]) for i in range(3)])
    if any(r in name for r in ROW):
        return (
            shards[0] if shards[0].dim() == 1 else torch.cat(shards, dim=1)
        )  # per-row scales, bias: replicated
    return torch.cat(shards)  # column-parallel, embedding, lm_head


def replicated(name: str, shards: list[torch.Tensor]) -> bool:
    return (
        shards[0].numel() == 1
        or "layernorm" in name
        or "ln_f" in name
        or (any(r in name for r in ROW) and shards[0].dim() == 1)
    )


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "nvfp4", "no_quant"])
def test_tensor_parallel_shards_reassemble_to_tp1_exactly(checkpoints, tmp_path, fmt):
    full = ranks(export(checkpoints[fmt], tmp_path / "tp1"))[0]
    for tp in (2, 4):
        shards = ranks(export(checkpoints[fmt], tmp_path / f"tp{tp}", tp=tp))
        assert all(set(s) == set(full) for s in shards)
        for name, t in full.items():
            pieces = [bits(s[name]) for s in shards]
            if replicated(name, pieces):
                assert all(torch.equal(p, pieces[0]) for p in pieces), name  # identical on every rank
            assert torch.equal(gather(name, pieces), bits(t)), f"{fmt} tp={tp}: {name}"
            assert pieces[0].dtype == bits(t).dtype


def test_codes_and_scales_are_the_checkpoint_qtensors(checkpoints, tmp_path):
    """tp=1 tensors decode to exactly the values the fake-quantized model computes with."""
    for fmt in ("fp8", "int4_awq", "nvfp4"):
        source = Source(checkpoints[fmt])
        unit = source.unit("model.layers.1")
        t = ranks(export(checkpoints[fmt], tmp_path / fmt))[0]
        down = unit.linears["model.layers.1.mlp.down_proj"]
        q = down.weight_qtensors()[0]
        w, s = (
            t["transformer.layers.1.mlp.proj.weight"],
            t["transformer.layers.1.mlp.proj.weights_scaling_factor"],
        )
        if fmt == "fp8":
            assert w.dtype == torch.float8_e4m3fn and torch.equal(w.float(), q.values)
            assert s.shape == (1,) and torch.equal(s, q.scale.reshape(1))
            assert t["transformer.layers.1.mlp.proj.activation_scaling_factor"].shape == (1,)
        elif fmt == "int4_awq":  # ModelOpt nibbles along the output dim, viewed as int8 (spec §4)
            assert w.dtype == torch.int8 and w.shape == (HIDDEN // 2, FFN)
            assert torch.equal(unpack_nibbles(w.view(torch.uint8), dim=0, signed=True).float(), q.values)
            assert s.dtype == torch.float32 and torch.equal(s, q.scale) and s.shape == (HIDDEN, FFN // 128)
        else:
            assert w.dtype == torch.uint8 and w.shape == (HIDDEN, FFN // 2)
            assert torch.equal(decode(unpack_nibbles(w, dim=-1), E2M1), q.values)
            assert s.dtype == torch.float8_e4m3fn and torch.equal(s.float(), q.scale)
            g = t["transformer.layers.1.mlp.proj.weights_scaling_factor_2"]
            assert torch.equal(g, q.global_scale.reshape(1))
        # qkv: q, k, v concatenated on the output dim
        qkv = t["transformer.layers.1.attention.qkv.weight"]
        rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        assert qkv.shape[0] == (rows // 2 if fmt == "int4_awq" else rows)


def test_kv_cache_scale_is_max_of_k_and_v_amax_over_448(checkpoints, tmp_path):
    t = ranks(export(checkpoints["fp8"], tmp_path / "kv", tp=2))
    kv = Source(checkpoints["fp8"]).unit("model.layers.0").kv["model.layers.0.self_attn"]
    expected = (torch.maximum(kv.stats("k").amax, kv.stats("v").amax) / 448).reshape(1)
    for r in t:
        got = r["transformer.layers.0.attention.kv_cache_scaling_factor"]
        assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("tp", [1, 2])
def test_pipeline_parallel_puts_layers_on_their_stage(checkpoints, tmp_path, tp):
    full = ranks(export(checkpoints["nvfp4"], tmp_path / "tp", tp=tp))
    staged = ranks(export(checkpoints["nvfp4"], tmp_path / "pp", tp=tp, pp=2))
    assert json.loads((tmp_path / "pp" / "config.json").read_text())["mapping"] == {
        "world_size": 2 * tp, "tp_size": tp, "pp_size": 2,
    }  # fmt: skip
    for tp_rank in range(tp):
        first, last = staged[tp_rank], staged[tp + tp_rank]  # rank = pp_rank * tp + tp_rank
        ref = full[tp_rank]
        assert "transformer.vocab_embedding.weight" in first and "lm_head.weight" not in first
        assert "lm_head.weight" in last and "transformer.ln_f.weight" in last
        assert "transformer.vocab_embedding.weight" not in last and "transformer.ln_f.weight" not in first
        for stage, layer in ((first, 0), (last, 1)):  # one layer per stage, renumbered from 0 per stage
            mine = {k for k in stage if k.startswith("transformer.layers.")}
            assert all(k.startswith("transformer.layers.0.") for k in mine)
            want = {k: v for k, v in ref.items() if k.startswith(f"transformer.layers.{layer}.")}
            assert len(mine) == len(want)
            for k, v in want.items():
                assert torch.equal(bits(stage[k.replace(f"layers.{layer}.", "layers.0.")]), bits(v)), k


def test_config_json_fields(checkpoints, tmp_path):
    out = export(checkpoints["fp8"], tmp_path / "fp8", tp=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["decoder"] == "llama"
    assert cfg["dtype"] == "bfloat16" and cfg["logits_dtype"] == "float32"
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        2,
        HEADS,
        KV_HEADS,
    )
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_size"]) == (
        HIDDEN, FFN, 512, HEAD_DIM,
    )  # fmt: skip
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["rotary_scaling"] is None
    assert cfg["rotary_base"] > 0 and cfg["norm_epsilon"] > 0 and cfg["max_position_embeddings"] == 512
    assert cfg["hidden_act"] == "silu" and cfg["rmsnorm"] is True and cfg["bias"] is False
    assert cfg["use_parallel_embedding"] is True and cfg["embedding_sharding_dim"] == 0
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert cfg["quantization"] == {
        "quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "group_size": 128, "has_zero_point": False,
        "pre_quant_scale": False, "exclude_modules": ["lm_head"],
    }  # fmt: skip
    assert (out / "tokenizer.json").is_file()
    int4 = json.loads((export(checkpoints["int4_awq"], tmp_path / "int4") / "config.json").read_text())
    assert int4["quantization"]["quant_algo"] == "W4A16_AWQ" and int4["quantization"]["group_size"] == 128
    plain = json.loads((export(checkpoints["no_quant"], tmp_path / "plain") / "config.json").read_text())
    assert (
        plain["quantization"]["quant_algo"] is None and plain["quantization"]["kv_cache_quant_algo"] is None
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(tp=3), "num_attention_heads=8 is not divisible by --inference-tp 3"),
        (dict(tp=8), "num_key_value_heads=4 is not divisible by --inference-tp 8"),
        (dict(pp=3), "num_hidden_layers=2 is not divisible by --inference-pp 3"),
    ],
)
def test_bad_parallelism_is_a_one_line_error_and_no_output(checkpoints, tmp_path, options, message):
    with pytest.raises(LowbitError) as err:
        export(checkpoints["fp8"], tmp_path / "out", **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unknown_architecture_needs_decoder_type_and_the_override_works(checkpoints, tmp_path):
    model = tmp_path / "mystery"
    shutil.copytree(checkpoints["no_quant"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(
        json.dumps({**cfg, "model_type": "mystery", "architectures": ["MysteryLM"]})
    )
    with pytest.raises(LowbitError, match="--decoder-type") as err:
        export(model, tmp_path / "out")
    assert "\n" not in str(err.value)
    out = export(model, tmp_path / "out", decoder_type="llama")
    written = json.loads((out / "config.json").read_text())
    assert written["decoder"] == "llama" and written["architecture"] == "LlamaForCausalLM"
    assert len(ranks(out)[0]) == len(ranks(export(checkpoints["no_quant"], tmp_path / "ref"))[0])


def test_presets_without_a_trtllm_quant_algo_name_the_fix():
    with pytest.raises(LowbitError, match="use --format hf or compressed-tensors") as err:
        codec(QuantSpec((MXFP4,), MXFP4_DYNAMIC))
    assert "\n" not in str(err.value)


def test_fused_qkv_with_different_per_tensor_scales_is_an_error():
    def parts(scale: float) -> Parts:
        def f32(v: torch.Tensor) -> torch.Tensor:
            return v.float()

        return Parts({"weight": (torch.zeros(4, 4), ("out", "in"), f32),
                      "weights_scaling_factor": (torch.tensor([scale]), ("-",), f32)})  # fmt: skip

    assert len(split_parts("transformer.layers.0.attention.qkv", [parts(1.0)] * 3, "column", 2)) == 2
    with pytest.raises(LowbitError, match="q, k and v have different weights_scaling_factor"):
        split_parts("transformer.layers.0.attention.qkv", [parts(1.0), parts(2.0), parts(1.0)], "column", 2)
