"""Architectures that transformers knows and lowbit has no facts for still quantize (every Linear, max / GPTQ),
with a warning naming what is missing, instead of failing."""

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.loader import load_model
from lowbit.quant import preset

CONFIGS = {
    "opt": dict(hidden_size=128, ffn_dim=256, num_attention_heads=4, num_hidden_layers=2, vocab_size=256,
                word_embed_proj_dim=128),
    "bloom": dict(hidden_size=128, n_head=4, n_layer=2, vocab_size=256),
}  # fmt: skip


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_unknown_architecture_quantizes_every_linear(tmp_path, caplog, model_type):
    torch.manual_seed(0)
    src = tmp_path / "model"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **CONFIGS[model_type])).save_pretrained(
        src
    )
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING):
        result = quantize_checkpoint(src, preset("int4_awq"), tmp_path / "q", calib, progress=False)
    assert any("no lowbit facts" in r.message and "families.py" in r.message for r in caplog.records)
    assert any("no smoothing groups" in r.message for r in caplog.records)  # AWQ skipped, said so
    plain = AutoModelForCausalLM.from_pretrained(src)
    linears = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert sorted(result.modules) == sorted(linears)
    model, _ = load_model(result.output)
    with torch.no_grad():
        assert torch.isfinite(model(calib[:1]).logits).all()
    gptq = quantize_checkpoint(
        src, preset("int4_awq").with_algorithm("gptq"), tmp_path / "g", calib, progress=False
    )
    assert sorted(gptq.modules) == sorted(linears)


def test_a_recipe_that_matches_nothing_is_an_error(tmp_path):
    from lowbit.errors import LowbitError

    src = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=64, n_head=4, n_layer=1, vocab_size=128)
    ).save_pretrained(src)
    with pytest.raises(LowbitError, match=r"matches no Linear layer of gpt2; check the recipe's patterns"):
        quantize_checkpoint(
            src, preset("fp8").with_exclude(["*.h.*"]), tmp_path / "q", torch.zeros(1, 8, dtype=torch.long),
            progress=False,
        )
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_moe_checkpoints_without_facts_are_refused_up_front(tmp_path):
    """Mixtral, Qwen2/3-MoE have expert facts (tests/families/test_moe.py); a MoE architecture without them,
    whose checkpoint transformers fuses on load, is refused before any output exists."""
    from lowbit.errors import LowbitError

    src = tmp_path / "olmoe"
    config = AutoConfig.for_model(
        "olmoe", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=128, num_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    with pytest.raises(LowbitError, match="renames or fuses"):
        quantize_checkpoint(
            src, preset("fp8"), tmp_path / "q", torch.zeros(1, 8, dtype=torch.long), progress=False
        )
    assert not (tmp_path / "q.partial").exists()
