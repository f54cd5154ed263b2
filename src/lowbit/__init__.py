"""lowbit: post-training quantization of Hugging Face LLMs (FP8, INT8, INT4, NVFP4, MX formats).

`import lowbit` is light: `lowbit.quantize`, `lowbit.preset`, `lowbit.load_recipe` and `lowbit.load_model`
load their modules (torch, transformers) on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "quantize": ("lowbit.algorithms.whole_model", "quantize"),
    "preset": ("lowbit.quant.recipe", "preset"),
    "load_recipe": ("lowbit.quant.recipe", "load_recipe"),
    "load_model": ("lowbit.loader", "load_model"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)


__all__ = ["__version__", "load_model", "load_recipe", "preset", "quantize"]
