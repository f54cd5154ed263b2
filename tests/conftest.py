"""Shared fixtures: tiny models made from configs (random weights), a tokenizer trained on the fly,
calibration text from the standard library's sources."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOCAB = 512


def _stdlib_text(limit: int = 400_000) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for name in (
        "argparse.py",
        "textwrap.py",
        "fractions.py",
        "heapq.py",
        "difflib.py",
        "pathlib.py",
        "shlex.py",
    ):
        text = (root / name).read_text(encoding="utf-8")
        parts.append(text)
        size += len(text)
        if size > limit:
            break
    return "\n\n".join(parts)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(_stdlib_text())
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(text_file)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "mistral": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "qwen3": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "gpt_bigcode": dict(hidden_size=128, n_inner=256, num_attention_heads=4),
    "gpt2": dict(n_embd=128, n_inner=256, n_head=4, n_positions=512),
    "qwen2": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
    "gemma": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "gemma2": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "gemma3_text": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "phi3": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
    "starcoder2": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
    "falcon": dict(hidden_size=128, num_attention_heads=4),
    "mixtral": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_local_experts=4, num_experts_per_tok=2,
    ),
    "nemotron_h": dict(  # Mamba-2, attention, MLP and MoE blocks
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16, n_groups=1, hybrid_override_pattern="M*-E",
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=128, n_group=1, topk_group=1,
    ),
    "qwen3_vl": dict(  # vision-language: the text model below, a 2-block vision tower with a deepstack merger
        text_config=dict(
            hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            rope_scaling={"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, patch_size=16,
            deepstack_visual_indexes=[0], spatial_merge_size=2, temporal_patch_size=2,
        ),
    ),
    "qwen2_5_vl": dict(
        text_config=dict(
            hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            rope_scaling={"rope_type": "default", "mrope_section": [8, 4, 4]},
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, patch_size=14,
            fullatt_block_indexes=[1], window_size=56, spatial_merge_size=2, temporal_patch_size=2,
        ),
    ),
    "qwen2_moe": dict(  # routed experts plus a gated shared expert
        hidden_size=128, intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
    ),
}


def make_tiny_model(
    out: Path,
    tokenizer_dir: Path,
    model_type: str = "llama",
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    **overrides: object,
) -> Path:
    """A random tiny causal LM saved as a Hugging Face directory with the test tokenizer."""
    import shutil

    from transformers import AutoConfig

    from lowbit.models.loading import auto_model_class

    torch.manual_seed(seed)
    kwargs = {
        **TINY_CONFIGS[model_type],
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        **overrides,
    }
    vlm = "text_config" in kwargs
    if vlm:  # a vision-language model: the sizes are the language model's; 4 more tokens for images
        text = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("text_config", "vision_config")}
        text["vocab_size"] = int(text["vocab_size"]) + len(VISION_TOKENS)  # type: ignore[call-overload]
        kwargs["text_config"] = {**kwargs["text_config"], **text}
        kwargs.update({k: text[k] for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")})
        kwargs.update({key: VOCAB + i for i, key in enumerate(VISION_TOKENS.values())})
    config = AutoConfig.for_model(model_type, **kwargs)
    model = auto_model_class(config).from_config(config)
    with torch.no_grad():  # weights with some outliers, as trained models have
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05).mul_(1 + 4 * (torch.rand(p.shape[1]) < 0.02))
    model.to(dtype).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    if vlm:
        _vision_assets(out, config)
    return out


VISION_TOKENS = {  # token -> the config key of its id (ids VOCAB, VOCAB + 1, ...)
    "<|vision_start|>": "vision_start_token_id",
    "<|vision_end|>": "vision_end_token_id",
    "<|image_pad|>": "image_token_id",
    "<|video_pad|>": "video_token_id",
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _vision_assets(out: Path, config: object) -> None:
    """The image processor and the tokenizer's image tokens and chat template, as a VLM checkpoint has them."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id  # type: ignore[attr-defined]
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    vision = config.vision_config  # type: ignore[attr-defined]
    Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size, min_pixels=32 * 32, max_pixels=128 * 128,
    ).save_pretrained(out)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[..., Path]:
    cache: dict[tuple, Path] = {}

    def factory(model_type: str = "llama", layers: int = 2, **overrides: object) -> Path:
        key = (model_type, layers, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            cache[key] = make_tiny_model(
                tmp_path_factory.mktemp(model_type), tokenizer_dir, model_type, layers, **overrides
            )
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_factory: Callable[..., Path]) -> Path:
    return tiny_factory("llama", 2)


@pytest.fixture()
def calib_ids(tokenizer_dir: Path, text_file: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from lowbit.data.text import calibration_windows

    return calibration_windows(text_file, AutoTokenizer.from_pretrained(tokenizer_dir), 16, 64)
