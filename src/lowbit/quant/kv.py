"""KV-cache quantization: K and V are fake-quantized after RoPE, where the cache stores them.

Hugging Face models dispatch attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`.
lowbit registers one more implementation, "lowbit_kv", that applies the attention module's `k_quantizer`
and `v_quantizer` (when present) to the key and value states, then calls SDPA. Registering adds a key to
transformers' table and changes nothing else; a model uses it only once `use_kv_attention` is called.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

KV_ATTENTION = "lowbit_kv"


def _kv_quantized_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> Any:
    k_quantizer = getattr(module, "k_quantizer", None)
    v_quantizer = getattr(module, "v_quantizer", None)
    if k_quantizer is not None:
        key = k_quantizer(key)
    if v_quantizer is not None:
        value = v_quantizer(value)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


ALL_ATTENTION_FUNCTIONS.register(KV_ATTENTION, _kv_quantized_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(KV_ATTENTION, sdpa_mask)


def use_kv_attention(config: PretrainedConfig) -> None:
    """Route the model's attention through the KV-quantizing implementation."""
    config._attn_implementation = KV_ATTENTION


def is_attention(module: nn.Module) -> bool:
    """Attention modules that dispatch through the attention interface (they hold the model config)."""
    return type(module).__name__.endswith("Attention") and hasattr(module, "config")
