"""Presets and YAML recipes: data, first match wins, default skips, clear errors."""

import pytest

from lowbit.errors import LowbitError
from lowbit.formats.scaled import FP8_TENSOR, INT4_G128, NVFP4
from lowbit.quant.recipe import PRESETS, load_recipe, preset, recipe_from_dict

SPEC_PRESETS = (
    "fp8",
    "fp8_pc_pt",
    "fp8_pb_wo",
    "int8_sq",
    "int8_wo",
    "int4_awq",
    "w4a8_awq",
    "nvfp4",
    "nvfp4_awq",
    "nvfp4_wo",
    "mxfp8",
    "mxfp4",
    "no_quant",
)


def test_every_spec_preset_exists_and_round_trips_through_its_dict():
    assert set(SPEC_PRESETS) == set(PRESETS)
    for name in SPEC_PRESETS:
        assert recipe_from_dict(preset(name).to_dict()) == preset(name)


def test_default_skips_and_first_match():
    r = preset("nvfp4")
    assert r.resolve("lm_head") is None
    assert r.resolve("model.embed_tokens") is None
    assert r.resolve("model.layers.0.mlp.gate") is None  # MoE router
    assert r.resolve("model.layers.0.block_sparse_moe.gate") is None
    assert r.resolve("model.visual.blocks.0.attn.qkv") is None
    assert r.resolve("model.layers.0.mlp.gate_proj").weight == (NVFP4,)
    assert preset("no_quant").resolve("model.layers.0.mlp.gate_proj") is None


def test_w4a8_is_int4_then_fp8():
    spec = preset("w4a8_awq").resolve("model.layers.0.self_attn.q_proj")
    assert spec.weight == (INT4_G128, FP8_TENSOR) and spec.input == FP8_TENSOR


def test_exclude_and_kv_cache():
    r = preset("fp8").with_exclude(["*down_proj"]).with_kv_cache("fp8")
    assert r.resolve("model.layers.3.mlp.down_proj") is None
    assert r.resolve("model.layers.3.mlp.up_proj") is not None
    assert r.kv_cache == FP8_TENSOR


def test_unknown_preset_suggests_closest():
    with pytest.raises(LowbitError, match="did you mean 'nvfp4'"):
        preset("nvfp5")


def test_yaml_recipe(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(
        "name: mixed\nkv_cache: fp8\nexclude: ['*layers.0.*']\n"
        "algorithm: awq+gptq\nalgorithm_params: {gptq_damp: 0.05, sequential: false}\nrules:\n"
        "  - {pattern: '*mlp*', weight: {format: int4_g128, group_size: 64}}\n"
        "  - {pattern: '*o_proj', weight: null}\n"
        "  - {pattern: '*', weight: nvfp4, input: nvfp4_dynamic}\n"
    )
    r = load_recipe(path)
    assert r.resolve("model.layers.1.mlp.up_proj").weight[0].group_size == 64
    assert r.resolve("model.layers.1.self_attn.o_proj") is None
    assert r.resolve("model.layers.1.self_attn.q_proj").weight == (NVFP4,)
    assert r.resolve("model.layers.0.self_attn.q_proj") is None
    assert r.algorithm == "awq_lite+gptq" and r.params.gptq_damp == 0.05 and r.params.sequential is False
    assert recipe_from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "rules:\n  - {pattern: '*', weight: int4_g129}\n",
            "unknown format 'int4_g129'.*did you mean 'int4_g128'",
        ),
        ("rulez: []\n", "unknown key 'rulez'.*did you mean 'rules'"),
        ("rules:\n  - {weight: fp8_tensor}\n", "needs a 'pattern'"),
        ("rules:\n  - {pattern: '*', weight: {format: fp8_tensor, group_size: 64}}\n", "has no groups"),
        ("algorithm: awq_ful\n", "did you mean 'awq_full'"),
        ("rules: [\n", "not valid YAML"),
        (
            "algorithm_params: {gptq_dmp: 0.1}\n",
            "unknown algorithm parameter 'gptq_dmp'.*did you mean 'gptq_damp'",
        ),
        ("algorithm: smoothquant+awq_full\n", "SmoothQuant and AWQ both smooth"),
    ],
)
def test_yaml_errors_name_the_cause(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LowbitError, match=message):
        load_recipe(path)
