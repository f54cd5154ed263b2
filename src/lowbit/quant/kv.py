"""KV-cache quantization: K and V are fake-quantized after RoPE, where the cache stores them.

Hugging Face models dispatch attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` and
build masks through `ALL_MASK_ATTENTION_FUNCTIONS[...]`. lowbit's implementation, "lowbit_kv", applies the
attention module's `k_quantizer` and `v_quantizer` (when present) to the key and value states, then calls
SDPA. Importing this module changes nothing in transformers: the two tables know "lowbit_kv" only inside
`kv_attention()` (a scoped, nestable registration that leaves the tables as they were on exit), and
`use_kv_attention(model)` makes the model enter that scope around each of its forwards and each forward of
its attention modules (so that a decoder layer called on its own, layer by layer, finds it too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

KV_ATTENTION = "lowbit_kv"
_HOOKED = "_lowbit_kv_hooks"


def _kv_quantized_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    k_quantizer = getattr(module, "k_quantizer", None)
    v_quantizer = getattr(module, "v_quantizer", None)
    if k_quantizer is not None:
        key = k_quantizer(key)
    if v_quantizer is not None:
        value = v_quantizer(value)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


class _Registration:
    """How many `kv_attention()` scopes are open (the tables hold "lowbit_kv" while it is above 0)."""

    depth = 0


@contextlib.contextmanager
def kv_attention() -> Iterator[None]:
    """transformers' attention and mask tables know "lowbit_kv" inside; on leaving the outermost scope the
    entries are removed again (the tables' own entries are never touched)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _Registration.depth == 0:
        ALL_ATTENTION_FUNCTIONS[KV_ATTENTION] = _kv_quantized_attention
        ALL_MASK_ATTENTION_FUNCTIONS[KV_ATTENTION] = sdpa_mask
    _Registration.depth += 1
    try:
        yield
    finally:
        _Registration.depth -= 1
        if _Registration.depth == 0:
            del ALL_ATTENTION_FUNCTIONS[KV_ATTENTION]
            del ALL_MASK_ATTENTION_FUNCTIONS[KV_ATTENTION]


def use_kv_attention(model: nn.Module) -> None:
    """Route `model`'s attention through the KV-quantizing implementation: its config names "lowbit_kv", and
    the model and each of its attention modules open `kv_attention()` for the length of their forward."""
    config = getattr(model, "config", None)
    if config is not None:
        config._attn_implementation = KV_ATTENTION
    for module in [model, *(m for m in model.modules() if is_attention(m))]:
        if getattr(module, _HOOKED, None) is None:
            setattr(module, _HOOKED, _scope_hooks(module))


def _scope_hooks(module: nn.Module) -> tuple[Any, Any]:
    scopes: list[contextlib.ExitStack] = []

    def enter(*_: Any) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(kv_attention())
        scopes.append(stack)

    def leave(*_: Any) -> None:
        if scopes:
            scopes.pop().close()

    return module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)


def is_attention(module: nn.Module) -> bool:
    """Attention modules that dispatch through the attention interface (they hold the model config)."""
    return type(module).__name__.endswith("Attention") and hasattr(module, "config")
